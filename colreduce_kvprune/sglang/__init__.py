"""SGLang plugin: prune each long prompt's KV cache right after its prefill, free the pruned slots, decode on.

Loaded by SGLang (0.5.23.x) through the `sglang.srt.plugins` entry point (`register`), in every SGLang process.
Configure it with `KVPRUNE_CONFIG=snapkv.yaml` (the same YAML as for vLLM and transformers); without it no hook is
installed and SGLang runs unchanged. With it, the engine refuses to start (ConfigError, before any subprocess or KV
pool exists) on a bad config, a policy SGLang cannot realise (PyramidKV, Ada-KV), another SGLang version,
speculative decoding, mixed chunks, page_size > 1, multi-device engines, or models other than decoder-only full
attention (MLA, sliding-window, hybrid, multimodal); and it sets disable_overlap_schedule=True and
disable_radix_cache=True with a logged reason. Chunked prefill is supported.

Pieces: settings.py (config discovery, engine-start checks), hooks.py (the SGLang hooks H0–H3), pruning.py (the
tensor work: recorded queries, per-layer selection, compaction by index rewrite or K/V moves).
Optional: `KVPRUNE_SGLANG_EVENTS=path.jsonl` appends one JSON line per pruned request (prompt and kept tokens,
free KV slots before/after the free).
"""
from __future__ import annotations

_registered = False


def register() -> None:
    """`sglang.srt.plugins` entry point: idempotent, imports SGLang lazily; no config → no hooks.

    SGLang catches and only logs exceptions raised here, so every refusal is raised from the hooks instead
    (settings.prepare_server_args, when the engine resolves its arguments)."""
    global _registered
    if _registered:
        return
    from .settings import configured_path

    if configured_path() is None:
        return
    _registered = True
    from . import hooks
    from .settings import version_problem

    hooks.install(version_ok=version_problem() is None)
