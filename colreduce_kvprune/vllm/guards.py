"""Attention backends the plugin cannot prune with, registered over vLLM's so that a configured pruning run fails at
engine start instead of silently doing nothing (the plugin's code would never run with them: no scoring, no
compaction, vLLM's own KV cache manager). Without a pruning config they are vLLM's classes unchanged.

`guard(member)` registers `Guarded_<NAME>` of this module for an AttentionBackendEnum member; the class is made on
first use (only when vLLM selects that backend, so a backend whose module cannot be imported here costs nothing): a
subclass of vLLM's backend whose impl resolves the pruning config in `__init__` — `settings.resolve` refuses
unsupported models (MLA, ...) with its own reasons — and, when pruning is configured, raises a ConfigError naming the
backend and the ones that prune.
"""
from __future__ import annotations

from ..config import ConfigError

PRUNING_BACKENDS = {"cpu": ("CPU_ATTN",), "cuda": ("FLASH_ATTN", "TRITON_ATTN")}
GUARDED_BACKENDS = {
    "cpu": ("CPU_MLA", "AMX_MLA"),
    "cuda": ("FLASHINFER", "TRITON_FLASHINFER", "FLEX_ATTENTION", "TURBOQUANT", "TRITON_FLASH_ATTN",
             "FLASH_ATTN_DIFFKV", "TRITON_ATTN_DIFFKV", "TREE_ATTN", "FLASHMLA", "FLASH_ATTN_MLA",
             "FLASHINFER_MLA", "TRITON_MLA", "CUTLASS_MLA", "TOKENSPEED_MLA"),
}
_PREFIX = "Guarded_"


def guard_all(platform: str) -> None:
    """Register the guards of this platform ("cpu" | "cuda") for the backend names vLLM knows."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for name in GUARDED_BACKENDS[platform]:
        if name in AttentionBackendEnum.__members__:
            register_backend(AttentionBackendEnum[name], f"{__name__}.{_PREFIX}{name}")


def __getattr__(attr: str):
    if not attr.startswith(_PREFIX):
        raise AttributeError(attr)
    cls = _make_guard(attr[len(_PREFIX):])
    globals()[attr] = cls
    return cls


def _make_guard(name: str):
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    base = resolve_obj_by_qualname(AttentionBackendEnum[name].value)      # vLLM's own class, not the override
    impl = base.get_impl_cls()

    def __init__(self, *args, **kwargs):
        from .backend_common import _current_config

        impl.__init__(self, *args, **kwargs)
        if _current_config() is not None:      # raises first for models the plugin refuses (MLA, ...)
            platform = "cpu" if name in GUARDED_BACKENDS["cpu"] else "cuda"
            ok = " or ".join(PRUNING_BACKENDS[platform])
            raise ConfigError(f"colreduce_kvprune prunes the KV cache with vLLM's {ok} attention backend, but this "
                              f"engine selected {name}; pass attention_backend=\"{PRUNING_BACKENDS[platform][0]}\" "
                              f"(vllm serve: --attention-backend {PRUNING_BACKENDS[platform][0]}) if the model "
                              "supports it")

    guarded_impl = type(f"Guarded{impl.__name__}", (impl,), {"__init__": __init__, "__module__": __name__})
    return type(_PREFIX + name, (base,), {"get_impl_cls": staticmethod(lambda: guarded_impl),
                                         "__module__": __name__, "__qualname__": _PREFIX + name})
