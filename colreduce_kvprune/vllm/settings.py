"""Where the plugin finds its pruning config, and the engine-start checks of the vLLM configuration.

Config sources, first found wins:
1. `additional_config={"kv_prune": <YAML path or mapping>}` on `LLM(...)` (`--additional-config` on `vllm serve`);
2. the environment variable `KVPRUNE_CONFIG=<YAML path>`.
With neither, the plugin is inactive and vLLM runs unchanged.

`resolve(vllm_config)` is called on the worker when the attention layers are built (the first point of engine start
where the whole vLLM config is known). Every problem (bad config, unsupported model or engine setting) is reported
in one `ConfigError`, so the engine stops before it allocates the KV cache.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

from ..config import ConfigError, PruneConfig, load_config
from ..policies import check_engine

ENV_VAR = "KVPRUNE_CONFIG"
ADDITIONAL_CONFIG_KEY = "kv_prune"


def config_source(vllm_config) -> tuple[str | Mapping | None, str]:
    """(the config as given, where it came from), or (None, "") when pruning is not configured."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, Mapping) and extra.get(ADDITIONAL_CONFIG_KEY) is not None:
        return extra[ADDITIONAL_CONFIG_KEY], f'additional_config["{ADDITIONAL_CONFIG_KEY}"]'
    path = os.environ.get(ENV_VAR)
    if path:
        return path, f"${ENV_VAR}"
    return None, ""


def resolve(vllm_config) -> PruneConfig | None:
    """The pruning config for this engine, or None when pruning is not configured.

    Raises ConfigError (bad config, or a model / engine setting the plugin cannot prune correctly)."""
    source, where = config_source(vllm_config)
    if source is None:
        return None
    try:
        config = load_config(source)
        check_engine(config, "vllm")
    except ConfigError as e:
        raise ConfigError(f"colreduce_kvprune (config from {where}): {e}") from e
    problems = unsupported_settings(vllm_config)
    if problems:
        raise ConfigError("colreduce_kvprune cannot prune the KV cache with this vLLM configuration "
                          f"(pruning config from {where}):\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def unsupported_settings(vllm_config) -> list[str]:
    """Human-readable reasons why pruning cannot run with this vLLM config ([] when it can); the version-specific
    ones (an unsupported vLLM release first) come from versions.py."""
    from . import versions

    problems = versions.engine_problems(vllm_config)
    mc = vllm_config.model_config
    if mc is not None:
        if getattr(mc, "is_encoder_decoder", False):
            problems.append("encoder-decoder models are not supported (decoder-only models with full attention)")
        if getattr(mc, "use_mla", False):
            problems.append("MLA attention (DeepSeek-style) is not supported: its latent cache has no per-head K/V")
        if getattr(mc, "is_hybrid", False) or getattr(mc, "is_attention_free", False):
            problems.append("hybrid / attention-free (Mamba, linear attention) models are not supported")
        window = mc.get_sliding_window() if hasattr(mc, "get_sliding_window") else None
        layer_types = getattr(mc.hf_text_config, "layer_types", None) or ()
        if window is not None or any("sliding" in str(t) or "chunk" in str(t) for t in layer_types):
            problems.append(f"sliding-window models are not supported (sliding_window={window}): "
                            "a window already evicts tokens by position")
        if getattr(mc, "enable_prompt_embeds", False):
            problems.append("prompt embeddings (enable_prompt_embeds=True) are not supported: the plugin needs each "
                            "request's prompt token count to re-prune a request recomputed after preemption")
        if getattr(mc, "attention_chunk_size", None):
            problems.append("chunked local attention models are not supported")
    chunks = chunked_prefill(vllm_config)
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto") or "auto")
    if chunks and cache_dtype not in ("auto", "float16", "bfloat16", "float32", "half", "float"):
        # the last chunk reads the earlier chunks' keys and values back from the cache (compaction.assemble)
        problems.append(f"chunked prefill with a quantized KV cache (kv_cache_dtype={cache_dtype}) is not supported: "
                        "a prompt's earlier chunks would be read back quantized when it is scored; pass "
                        "enable_chunked_prefill=False (vllm serve: --no-enable-chunked-prefill) or an unquantized "
                        "cache")
    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) > 1:
        problems.append(f"pipeline_parallel_size={pc.pipeline_parallel_size} is not supported: the pruning step "
                        "runs in every attention layer's rank, and no test covers stages handing on a pruned batch "
                        "(tensor parallelism is supported)")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(pc, name, 1) > 1:
            problems.append(f"{name}={getattr(pc, name)} is not supported: context parallelism splits a request's "
                            "tokens over ranks, and the plugin compacts each request's blocks on one rank")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV transfer / disaggregated prefill connectors are not supported")
    return problems


def chunked_prefill(vllm_config) -> bool:
    """Whether vLLM may prefill a prompt over several steps (chunked prefill, or a long-prefill token threshold)."""
    sc = vllm_config.scheduler_config
    return bool(sc.enable_chunked_prefill or getattr(sc, "long_prefill_token_threshold", 0))


def cudagraph_support(support, pruning: bool):
    """The CUDA-graph support a pruning backend declares to vLLM, from its base backend's (AttentionCGSupport).

    The plugin's work after a prefill step's attention (scores, selection, compaction, the stash of a chunk) is
    Python in the attention layer's forward: it runs only where attention runs eagerly, never in a replayed full
    graph. So with pruning: no full graphs of mixed prefill-decode batches, at most UNIFORM_SINGLE_TOKEN_DECODE
    (vLLM keeps full graphs for decode-only batches: FULL_AND_PIECEWISE at its defaults). vLLM also runs a prompt's
    one-token chunk beside decodes as a decode, in such a graph: those rows are captured by the layers and handled
    at the next build (compaction.LateRows), so this holds with chunked prefill too. vLLM resolves the cudagraph
    mode from this and warns, or refuses an explicit full mode."""
    from vllm.v1.attention.backend import AttentionCGSupport

    if not pruning:
        return support
    cap = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    return support if support.value <= cap.value else cap


def resolved_settings(cfg) -> dict:
    """What vLLM resolved its defaults to (cfg: the engine's VllmConfig), for the settings the plugin's paths depend
    on (the benchmarks record it per engine: a pruning backend changes the cudagraph mode)."""
    return {"cudagraph_mode": str(cfg.compilation_config.cudagraph_mode),
            "enforce_eager": cfg.model_config.enforce_eager,
            "async_scheduling": cfg.scheduler_config.async_scheduling,
            "enable_chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
            "block_size": cfg.cache_config.block_size}


def config_to_json(config: PruneConfig) -> str:
    """The config as a canonical JSON string (carried by the KV cache spec from worker to scheduler)."""
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_json(text: str) -> PruneConfig:
    return load_config(json.loads(text))
