"""Pruning summary kept by the scheduler-side KV cache manager.

Read it after a run with `colreduce_kvprune.vllm.get_stats(llm)`. The manager lives in the process that runs the
scheduler: with `VLLM_ENABLE_V1_MULTIPROCESSING=0` that is the caller's process; with multiprocessing (the default,
and always with `vllm serve`) it is the engine-core process, and the per-request lines in vLLM's debug log
(`VLLM_LOGGING_LEVEL=DEBUG`, logger `vllm.colreduce_kvprune`) are the way to observe pruning.
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass


@dataclass
class PruneStats:
    """Counters of one engine (one KV cache group).

    requests_pruned: prefills whose KV was compacted (a request preempted and recomputed counts once more);
    requests_recomputed: those of them that recomputed a preempted request with outputs (pruned as before, outputs
    kept); prompt_tokens / kept_tokens: their prompt tokens before / after;
    blocks_freed: KV blocks returned to the pool right after those prefills; peak_blocks_in_use: the most blocks
    of the pool (null block excluded) held at once, sampled after every allocation; num_blocks: pool size.
    """
    requests_pruned: int = 0
    requests_recomputed: int = 0
    prompt_tokens: int = 0
    kept_tokens: int = 0
    blocks_freed: int = 0
    peak_blocks_in_use: int = 0
    num_blocks: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


_MANAGERS: "weakref.WeakSet" = weakref.WeakSet()   # live pruning managers of this process
_created = 0


def track(manager) -> None:
    global _created
    _MANAGERS.add(manager)
    _created += 1


def managers_created() -> int:
    """How many pruning managers (one per engine scheduler) this process has created."""
    return _created


def live_managers() -> list:
    return list(_MANAGERS)


def get_stats(llm=None) -> PruneStats:
    """The pruning summary of `llm` (an `LLM` run in-process), or with no argument of the engine created last in
    this process. Raises RuntimeError when the scheduler is not in this process (multiprocessing) or the plugin is
    not pruning."""
    managers = _managers_of(llm) if llm is not None else live_managers()[-1:]
    if not managers:
        raise RuntimeError(
            "no colreduce_kvprune KV cache manager in this process: pruning is not configured, or the scheduler "
            "runs in another process (set VLLM_ENABLE_V1_MULTIPROCESSING=0, or read the debug log lines of "
            "logger vllm.colreduce_kvprune)")
    total = PruneStats()
    for m in managers:
        s = m.prune_stats
        for name in ("requests_pruned", "requests_recomputed", "prompt_tokens", "kept_tokens", "blocks_freed"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.peak_blocks_in_use = max(total.peak_blocks_in_use, s.peak_blocks_in_use)
        total.num_blocks = max(total.num_blocks, s.num_blocks)
    return total


def _managers_of(llm) -> list:
    """The pruning managers of an in-process LLM (LLM → LLMEngine → InprocClient → EngineCore → Scheduler)."""
    from .manager import PruneManager

    core = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    kv = getattr(scheduler, "kv_cache_manager", None)
    coordinator = getattr(kv, "coordinator", None)
    return [m for m in getattr(coordinator, "single_type_managers", ()) if isinstance(m, PruneManager)]
