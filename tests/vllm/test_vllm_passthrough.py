"""Plugin installed but inactive: outputs identical to vanilla vLLM (VLLM_PLUGINS=none, in a fresh process).
Budget >= every prompt: pruning configured but nothing to prune, outputs identical to vanilla too."""
import pytest

from colreduce_kvprune.vllm import get_stats
from vllm_helpers import baseline_without_plugins, engine, greedy, random_prompts

LENGTHS = (300, 57, 200, 129, 96, 40, 511)
VLLM_DEFAULTS = dict(enable_prefix_caching=None, enable_chunked_prefill=None, async_scheduling=None,
                     max_num_batched_tokens=None, enforce_eager=None)     # on CUDA: torch.compile + CUDA graphs


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=2)


@pytest.fixture(scope="module")
def vanilla(llama_path, prompts):
    return baseline_without_plugins(llama_path, prompts, max_tokens=16)


def test_no_config_equals_vanilla_with_vllm_defaults(llama_path, prompts, vanilla):
    with engine(llama_path, None, **VLLM_DEFAULTS) as llm:
        got = greedy(llm, prompts, max_tokens=16)
        with pytest.raises(RuntimeError, match="no colreduce_kvprune KV cache manager"):
            get_stats(llm)                      # no pruning manager: the scheduler is vLLM's own
    assert got == vanilla


def test_budget_covering_every_prompt_equals_vanilla(llama_path, prompts, vanilla):
    config = dict(policy="snapkv", budget={"keep_tokens": 512}, window=16, sink_tokens=4, min_prompt_tokens=1)
    with engine(llama_path, config) as llm:
        got = greedy(llm, prompts, max_tokens=16)
        stats = get_stats(llm)
    assert stats.requests_pruned == 0 and stats.blocks_freed == 0
    assert got == vanilla
