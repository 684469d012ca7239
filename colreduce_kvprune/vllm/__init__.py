"""vLLM plugin: prune each long prompt's KV cache right after its prefill, free the pruned blocks, decode on.

Loaded by vLLM through the `vllm.general_plugins` entry point (`register`). Configure it with
`additional_config={"kv_prune": "snapkv.yaml"}` (or a mapping) on `LLM(...)`, `--additional-config
'{"kv_prune": "snapkv.yaml"}'` on `vllm serve`, or `KVPRUNE_CONFIG=snapkv.yaml`; without a config vLLM runs
unchanged. It runs at vLLM's defaults: CUDA graphs (the builder writes the pruned layout into persistent
buffers the captured graphs read), async scheduling, prefix caching (pruned requests bypass it, manager.py; the
others use it) and chunked prefill (each chunk keeps what the last one needs, which reads the earlier chunks' keys
back from the paged cache and scores the prompt as a whole). What it cannot run is refused at engine start
(settings.py, guards.py).

Pieces: settings.py (config discovery, engine-start checks), backend_*.py (attention backends: score, compact,
remap), guards.py (the other backends, which refuse a configured run), compaction.py (the backend-independent tensor work),
prompt_lengths.py (a logits processor, entry point `vllm.logits_processors`, that tells the builder each row's
prompt length, so that a request recomputed after preemption is pruned as before), manager.py (scheduler: free tail
blocks, count in compacted tokens), stats.py (`get_stats(llm)`), versions.py (the supported vLLM releases, 0.32.x
and 0.33.x, and everything that differs between them).
"""
from __future__ import annotations

import os

_registered = False


def register() -> None:
    """vLLM general-plugin entry point; runs in every vLLM process, idempotent, imports vLLM internals lazily.

    Installs the pruning attention backends (over CPU_ATTN, FLASH_ATTN, TRITON_ATTN) and the KV cache spec /
    manager pair. They are exact pass-throughs for an engine without a pruning config."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import versions
    from .settings import ENV_VAR

    version = versions.installed()
    if not versions.supported(version):
        msg = versions.unsupported_message(version) + ": KV pruning is unavailable"
        if os.environ.get(ENV_VAR):
            from ..config import ConfigError
            raise ConfigError(msg + f" (and ${ENV_VAR} asks for it)")
        from vllm.logger import init_logger
        # an engine given additional_config={"kv_prune": ...} is refused when its workers start (prompt_lengths.py)
        init_logger("vllm.colreduce_kvprune").warning(msg + "; an engine given a pruning config will not start")
        return

    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from .manager import PrunableFullAttentionSpec, PruneManager

    from .guards import guard_all

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.backend_cpu.PruneCPUAttentionBackend")
        guard_all("cpu")
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.FLASH_ATTN, f"{__name__}.backend_cuda.PruneFlashAttentionBackend")
        register_backend(AttentionBackendEnum.TRITON_ATTN, f"{__name__}.backend_cuda.PruneTritonAttentionBackend")
        guard_all("cuda")
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(PrunableFullAttentionSpec, PruneManager, uniform_type_base_spec=FullAttentionSpec)


def get_stats(llm=None):
    """Pruning summary (PruneStats: requests_pruned, requests_recomputed, prompt_tokens, kept_tokens, blocks_freed,
    peak_blocks_in_use, num_blocks) of an in-process `LLM`; see stats.py for multiprocessing."""
    from .stats import get_stats as _get_stats

    return _get_stats(llm)
