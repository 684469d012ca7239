"""`LLM(model, additional_config={"kv_prune": "snapkv.yaml"})` with no other engine argument (the shipped config by
its bare name), at vLLM's own defaults. On the CPU build: prefix caching and chunked prefill on, torch.compile. On
CUDA: also CUDA graphs (full ones for decode-only batches: settings.cudagraph_support) and async scheduling. Greedy tokens equal the transformers
path in float32 (on CUDA with TRITON_ATTN: FlashAttention takes 16-bit only); on CUDA the bare call (bfloat16,
FlashAttention) starts and prunes too."""
import torch

from colreduce_kvprune.config import load_config
from colreduce_kvprune.vllm import get_stats
from vllm_helpers import DEVICE, random_prompts, reference, shutdown


def test_vllm_defaults(llama_path):
    from vllm import LLM, SamplingParams

    shipped = load_config("snapkv.yaml")                  # keep 25%, prompts of >= 1024 tokens
    prompts = random_prompts((1500, 300, 2100, 1200), seed=9)
    kw = dict(model=llama_path, skip_tokenizer_init=True, additional_config={"kv_prune": "snapkv.yaml"})
    if DEVICE != "cpu":
        bare = LLM(**kw)                                    # bfloat16 ("auto" of a float32 checkpoint), FA3
        try:
            bare.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=4),
                          use_tqdm=False)
            assert get_stats(bare).requests_pruned == 3
            assert bare.llm_engine.vllm_config.model_config.dtype == torch.bfloat16
        finally:
            shutdown(bare)
        kw["attention_backend"] = "TRITON_ATTN"
    # dtype float32 for a token-for-token comparison (vLLM's "auto" runs a float32 checkpoint in 16 bits)
    llm = LLM(**kw, dtype="float32")
    try:
        cfg = llm.llm_engine.vllm_config
        graphs = str(cfg.compilation_config.cudagraph_mode)
        settings = (cfg.cache_config.enable_prefix_caching, cfg.scheduler_config.enable_chunked_prefill,
                    bool(cfg.scheduler_config.async_scheduling), cfg.model_config.enforce_eager)
        sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, detokenize=False)
        got = []
        for batch in (prompts, prompts[:1], prompts[1:3]):    # decode batches of 4, 1 and 2 rows (graph sizes)
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
            got.append([list(o.outputs[0].token_ids) for o in outs])
        stats = get_stats(llm)
    finally:
        shutdown(llm)
    if DEVICE == "cpu":
        assert settings[:2] == (True, True)               # vLLM's CPU defaults, left as they are
    else:
        # what this test is for on CUDA: graphs captured and replayed, async scheduling, prefix caching, chunks;
        # vLLM's default FULL_AND_PIECEWISE stays (full graphs for decode-only batches: settings.cudagraph_support)
        assert settings == (True, True, True, False) and graphs.endswith("FULL_AND_PIECEWISE"), (settings, graphs)
    assert stats.requests_pruned == 3 + 1 + 1 and stats.prompt_tokens == 1500 + 2100 + 1200 + 1500 + 2100
    want = reference(llama_path, prompts, shipped, max_tokens=12)
    assert got == [want, want[:1], want[1:3]]
