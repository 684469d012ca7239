"""vLLM's CPU attention backend (CPU_ATTN) with pruning after prefill. Registered over CPU_ATTN (the CPU platform
uses no other backend for standard attention). Tested in CI (tests/vllm)."""
from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from .backend_common import PruneBuilderMixin, PruneImplMixin, prunable_spec
from .versions import kv_cache_update_bypass


class PruneCPUAttentionMetadataBuilder(PruneBuilderMixin, CPUAttentionMetadataBuilder):
    pass


class PruneCPUAttentionImpl(PruneImplMixin, CPUAttentionBackendImpl):
    def prune_kv_views(self, kv_cache):
        # None: CPU_ATTN's key cache layout depends on the ISA kernels (cpu_attn_reshape_and_cache packs keys for
        # vec / vec16 / amx / neon), so a chunked prefill keeps its earlier chunks' keys and values in host memory
        return None


class PruneCPUAttentionBackend(CPUAttentionBackend):
    supports_kv_cache_update_bypass = kv_cache_update_bypass(CPUAttentionBackend)   # vLLM 0.33: off while pruning

    @staticmethod
    def get_impl_cls():
        return PruneCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PruneCPUAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        return prunable_spec(super().customize_spec(spec))
