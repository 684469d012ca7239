"""Where the SGLang plugin finds its pruning config, and the engine-start checks of the SGLang configuration.

The config comes from the environment variable `KVPRUNE_CONFIG=<YAML path>` (as for vLLM); SGLang's subprocesses
(scheduler, detokenizer) inherit it. Without it the plugin installs no hook and SGLang runs unchanged.

`prepare_server_args` runs in the launching process as a BEFORE hook of `ServerArgs.resolve_once` (before any
SGLang subprocess or KV pool exists): it loads and checks the config, refuses unsupported SGLang versions and
settings, and forces the two settings pruning needs (`disable_overlap_schedule`, `disable_radix_cache`) with a
logged reason. `check_resolved` runs AFTER `resolve_once` and refuses what is known only then (the model's
architecture, settings that the resolution switched on). Every problem of one kind is listed in one ConfigError.
"""
from __future__ import annotations

import functools
import logging
import os

from ..config import ConfigError, PruneConfig, load_config
from ..policies import check_engine

ENV_VAR = "KVPRUNE_CONFIG"
EVENTS_ENV_VAR = "KVPRUNE_SGLANG_EVENTS"     # optional JSONL file: one line per pruned request (tests, reports)
SUPPORTED_SGLANG = "0.5.23"                   # major.minor.patch; any 0.5.23.x build (post/dev/local) is accepted

logger = logging.getLogger("colreduce_kvprune.sglang")

# ServerArgs fields forced when pruning is configured: (field, value, why)
FORCED_ARGS = (
    ("disable_overlap_schedule", True,
     "the overlap scheduler plans the next decode step (and allocates its KV slot) before the prefill result, "
     "where pruning happens, is processed"),
    ("disable_radix_cache", True,
     "a pruned request's KV slots no longer hold its prompt's tokens in order, so they must never enter the "
     "prefix tree (it would also free them twice)"),
)


def configured_path() -> str | None:
    """The config path from $KVPRUNE_CONFIG, or None (pruning off)."""
    return os.environ.get(ENV_VAR) or None


@functools.lru_cache(maxsize=8)
def _load(path: str) -> PruneConfig:
    try:
        config = load_config(path)
        check_engine(config, "sglang")
    except ConfigError as e:
        raise ConfigError(f"colreduce_kvprune (config from ${ENV_VAR}={path}): {e}") from e
    return config


def current_config() -> PruneConfig | None:
    """The pruning config of this process (loaded once per path), or None when pruning is not configured.
    Raises ConfigError for a bad config or a policy SGLang cannot realise."""
    path = configured_path()
    return None if path is None else _load(path)


def sglang_version_supported(version: str) -> bool:
    """True for 0.5.23 and its 0.5.23.x / post / dev / local builds."""
    base = version.split("+")[0]
    s = SUPPORTED_SGLANG
    return base == s or (base.startswith(s) and not base[len(s)].isdigit())


def version_problem() -> str | None:
    import sglang

    version = getattr(sglang, "__version__", "unknown")
    if sglang_version_supported(version):
        return None
    return (f"SGLang {version} is not supported: this plugin is written for SGLang {SUPPORTED_SGLANG}.x "
            f"(pip install 'sglang=={SUPPORTED_SGLANG}')")


def unsupported_args(server_args) -> list[str]:
    """Human-readable reasons why pruning cannot run with these (raw or resolved) ServerArgs ([] when it can)."""
    problems = []
    get = functools.partial(getattr, server_args)
    spec = get("speculative_algorithm", None)
    if spec not in (None, "", "NONE", "none"):
        problems.append(f"speculative decoding is not supported (speculative_algorithm={spec!r})")
    if get("enable_mixed_chunk", False):
        problems.append("enable_mixed_chunk is not supported: a prefill must finish in a batch of its own to be "
                        "scored and compacted; leave enable_mixed_chunk off")
    page = get("page_size", 1)
    if page not in (None, 1):
        problems.append(f"page_size={page} is not supported: pruned tokens are freed one slot at a time; "
                        "use page_size=1")
    for name in ("tp_size", "pp_size", "dp_size", "ep_size"):
        if (get(name, 1) or 1) > 1:
            problems.append(f"{name}={get(name)} is not supported (single-device engines only)")
    if get("disaggregation_mode", "null") not in (None, "null"):
        problems.append("prefill/decode disaggregation is not supported")
    if get("enable_hierarchical_cache", False):
        problems.append("the hierarchical cache is not supported (it needs the radix cache)")
    if get("is_embedding", False):
        problems.append("embedding models have no decode phase to prune for")
    if get("enable_lora", False) or get("lora_paths", None):
        problems.append("LoRA is not supported by the pruning plugin")
    return problems


def unsupported_model(model_config) -> list[str]:
    """Reasons why this SGLang ModelConfig cannot be pruned ([] for a decoder-only model with full attention)."""
    problems = []
    arch = getattr(getattr(model_config, "attention_arch", None), "name", None)
    if arch is not None and arch != "MHA":
        problems.append(f"attention architecture {arch} is not supported (MLA's latent cache has no per-head K/V; "
                        "SSM models have no KV cache): decoder-only models with full multi-head/GQA attention")
    if getattr(model_config, "is_hybrid_swa", False) or getattr(model_config, "sliding_window_size", None):
        problems.append("sliding-window (or hybrid full/sliding) attention models are not supported")
    try:
        linear = model_config.linear_attn_registry_result
    except Exception:   # noqa: BLE001 - an unknown architecture: not a hybrid linear-attention model
        linear = None
    if linear is not None:
        problems.append("hybrid linear-attention / Mamba models are not supported")
    if getattr(model_config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models are not supported")
    if getattr(model_config, "is_multimodal", False):
        problems.append("multimodal models are not supported (text decoder-only models)")
    return problems


def _refuse(problems: list[str], where: str) -> None:
    if problems:
        raise ConfigError(f"colreduce_kvprune cannot prune the KV cache with this SGLang {where} "
                          f"(pruning config from ${ENV_VAR}={configured_path()}):\n"
                          + "\n".join(f"  - {p}" for p in problems))


def prepare_server_args(server_args) -> None:
    """BEFORE hook of ServerArgs.resolve_once (launching process): check, then force the settings pruning needs."""
    if getattr(server_args, "_resolution_finished", False) or configured_path() is None:
        return
    version = version_problem()
    _refuse([version] if version else [], "version")
    current_config()                                  # ConfigError for a bad config / unsupported policy
    _refuse(unsupported_args(server_args), "configuration")
    for name, value, why in FORCED_ARGS:
        if getattr(server_args, name, None) != value:
            logger.warning("colreduce_kvprune: setting %s=%s because %s", name, value, why)
            setattr(server_args, name, value)


def check_resolved(server_args) -> None:
    """AFTER hook of ServerArgs.resolve_once: refuse what the resolution switched on, and unsupported models."""
    if configured_path() is None:
        return
    problems = unsupported_args(server_args)
    for name, value, _ in FORCED_ARGS:
        if getattr(server_args, name, value) != value:
            problems.append(f"{name} must be {value} (SGLang's resolution changed it)")
    _refuse(problems, "configuration")
    if str(getattr(server_args, "model_path", "")).lower() in ("", "none", "dummy"):
        return
    from sglang.srt.arg_groups.model_override_base import model_config_of

    _refuse(unsupported_model(model_config_of(server_args)), "model")
