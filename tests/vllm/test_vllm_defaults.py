"""`LLM(model, additional_config={"kv_prune": "snapkv.yaml"})` with no other engine argument (the shipped config by
its bare name): on vLLM's CPU build it prunes with vLLM's own defaults (prefix caching and chunked prefill on) and
equals the transformers path; on CUDA the settings still missing are refused at engine start, each by name."""
import pytest

from colreduce_kvprune.config import ConfigError, load_config
from colreduce_kvprune.vllm import get_stats
from vllm_helpers import DEVICE, random_prompts, reference, shutdown


def test_vllm_defaults(llama_path):
    from vllm import LLM, SamplingParams

    shipped = load_config("snapkv.yaml")                  # keep 25%, prompts of >= 1024 tokens
    prompts = random_prompts((1500, 300, 2100), seed=9)
    # dtype float32 for a token-for-token comparison (vLLM's "auto" runs a float32 checkpoint in 16 bits); no
    # other engine argument
    kw = dict(model=llama_path, skip_tokenizer_init=True, dtype="float32",
              additional_config={"kv_prune": "snapkv.yaml"})
    if DEVICE != "cpu":
        with pytest.raises(ConfigError, match=r"(?s)enforce_eager=True.*chunked prefill.*async"):
            LLM(**kw)
        return
    llm = LLM(**kw)
    try:
        cfg = llm.llm_engine.vllm_config
        defaults = (cfg.cache_config.enable_prefix_caching, cfg.scheduler_config.enable_chunked_prefill)
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        stats = get_stats(llm)
    finally:
        shutdown(llm)
    assert defaults == (True, True)                       # vLLM's CPU defaults, left as they are
    assert stats.requests_pruned == 2 and stats.prompt_tokens == 1500 + 2100
    assert got == reference(llama_path, prompts, shipped, max_tokens=8)
