"""The trained retrieval model (tests/data/retrieval-llama) under pruning: vLLM + plugin and the transformers path
give the same answer tokens on every sample of the CI subset (tests/test_quality.py), for the unpruned model and
for the pruned cases the quality tests assert on (SnapKV 25%, random 10%) plus StreamingLLM and TOVA at 10%.
Both greedy in float32; a sample whose answer differs between the engines fails the test. The full table
(benchmarks/quality/README.md: 60 samples, 1k-4k contexts, 25 cases) gave identical tokens on every sample; this
subset is its first 16 samples (4 per context length), ~13 s per case on 2 CPU cores. H2O is left out here: its
all-query scoring takes minutes on CPU at 4k contexts."""
import os
import sys

import pytest

from vllm_helpers import engine, greedy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "quality"))
import data  # noqa: E402
import eval as quality_eval  # noqa: E402

sys.path.pop(0)

MODEL = os.path.join(ROOT, "tests", "data", "retrieval-llama")
if not os.path.exists(os.path.join(MODEL, "model.safetensors")):
    pytest.skip("no trained retrieval model in tests/data/retrieval-llama (benchmarks/quality/gpu_train.sh)",
                allow_module_level=True)
SUBSET_SEED, SUBSET_NUM, SUBSET_LENS = 2024, 16, (1024, 2048, 3072, 4096)     # as tests/test_quality.py
CASES = [("none", 1.0), ("snapkv", 0.25), ("random", 0.1), ("streamingllm", 0.1), ("tova", 0.1)]


@pytest.fixture(scope="module")
def samples():
    return quality_eval.subset(MODEL, SUBSET_SEED, SUBSET_NUM, SUBSET_LENS)


@pytest.fixture(scope="module")
def hf_model():
    return quality_eval.load_hf_model(MODEL)


@pytest.mark.parametrize("policy,ratio", CASES, ids=[f"{p}-{r:g}" for p, r in CASES])
def test_vllm_answers_equal_transformers(samples, hf_model, policy, ratio):
    prompts = [s.prompt for s in samples]
    cfg = quality_eval.policy_config("snapkv" if policy == "none" else policy, ratio)
    longest = max(map(len, prompts)) + data.ANSWER_LEN
    with engine(MODEL, None if policy == "none" else cfg, max_model_len=longest,
                max_num_batched_tokens=longest) as llm:
        got = greedy(llm, prompts, max_tokens=data.ANSWER_LEN)
    want = quality_eval.generate_transformers(hf_model, prompts, cfg, data.ANSWER_LEN)
    differ = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not differ, f"samples {differ}: vLLM {[got[i] for i in differ]} != transformers {[want[i] for i in differ]}"
    # the answers are meaningful: the unpruned model gets most of them right
    if policy == "none":
        assert sum(g == s.answer for g, s in zip(got, samples)) >= 0.85 * len(samples)
