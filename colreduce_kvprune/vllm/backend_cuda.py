"""vLLM 0.32's CUDA attention backends (FLASH_ATTN, TRITON_ATTN) with pruning after prefill.

UNTESTED ON GPU: no CUDA build of vLLM could be run where this was written. The classes are the same mixins as the
CPU backend (tested), whose GPU paths were written to need no per-request host sync: the builder reads host
copies (query_start_loc_cpu, seq_lens_cpu_upper_bound) and does the per-row remap with device gathers; scores use
colreduce_varlen (Triton on CUDA); the kept K/V are written with the backend's own do_kv_cache_update
(reshape_and_cache_flash). Known limits: the builder returns a new block-table tensor, so run with
enforce_eager=True (CUDA graphs would replay the captured buffers).
"""
from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from .backend_common import PruneBuilderMixin, PruneImplMixin, prunable_spec


class PruneFlashAttentionMetadataBuilder(PruneBuilderMixin, FlashAttentionMetadataBuilder):
    pass


class PruneFlashAttentionImpl(PruneImplMixin, FlashAttentionImpl):
    pass


class PruneFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return PruneFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PruneFlashAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        return prunable_spec(super().customize_spec(spec))


class PruneTritonAttentionMetadataBuilder(PruneBuilderMixin, TritonAttentionMetadataBuilder):
    pass


class PruneTritonAttentionImpl(PruneImplMixin, TritonAttentionImpl):
    pass


class PruneTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return PruneTritonAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PruneTritonAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        return prunable_spec(super().customize_spec(spec))
