"""vLLM's CUDA attention backends (FLASH_ATTN, TRITON_ATTN) with pruning after prefill: the same mixins as the
CPU backend over vLLM's classes. The builder reads host copies (query_start_loc_cpu, seq_lens_cpu_upper_bound, the
runner's is_prefilling) and does the per-row remap with device gathers into its own persistent buffers; scores use
colreduce_varlen (Triton on CUDA); the kept K/V are written with the backend's own do_kv_cache_update
(reshape_and_cache_flash). Run on an H200 under both model runners (V1, V2), TRITON_ATTN in float32 and FLASH_ATTN
(FA3) in bfloat16, with vLLM 0.32.0, and under the V2 runner with vLLM 0.33.0 (tests/vllm passes there):
benchmarks/results/h200_vllm/README.md; what differs between the two releases: versions.py.
"""
from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from .backend_common import PruneBuilderMixin, PruneImplMixin, prunable_spec
from .versions import kv_cache_update_bypass


class _CudaCacheLayout:
    def prune_kv_views(self, kv_cache):
        # FLASH_ATTN and TRITON_ATTN (unquantized): (num_blocks, Hkv, block_size, 2·D) in logical order, keys then
        # values along the last dim (their forward: kv_cache.transpose(1, 2).split(head_size, dim=-1))
        return kv_cache.transpose(1, 2).split(self.head_size, dim=-1)


class PruneFlashAttentionMetadataBuilder(PruneBuilderMixin, FlashAttentionMetadataBuilder):
    pass


class PruneFlashAttentionImpl(_CudaCacheLayout, PruneImplMixin, FlashAttentionImpl):
    pass


class PruneFlashAttentionBackend(FlashAttentionBackend):
    supports_kv_cache_update_bypass = kv_cache_update_bypass(FlashAttentionBackend)   # vLLM 0.33: off while pruning

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


class PruneTritonAttentionImpl(_CudaCacheLayout, PruneImplMixin, TritonAttentionImpl):
    pass


class PruneTritonAttentionBackend(TritonAttentionBackend):
    supports_kv_cache_update_bypass = kv_cache_update_bypass(TritonAttentionBackend)   # vLLM 0.33: off while pruning

    @staticmethod
    def get_impl_cls():
        return PruneTritonAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PruneTritonAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        return prunable_spec(super().customize_spec(spec))
