"""The YAML pruning config: frozen, validated dataclasses and a loader with precise error messages.

    cfg = load_config("configs/snapkv.yaml")        # or load_config({"policy": "snapkv", "budget": {...}})
    text = dump_config(cfg)                          # YAML; load_config(yaml.safe_load(text)) == cfg

Every error is a `ConfigError` (a ValueError) naming the file (when loaded from one), the key path
(e.g. `budget.keep_ratio`) and the allowed values. Keys that only some policies use (`pooling`, `reduction`,
`group_reduce`, `pyramid`, `adakv`, `seed`) are rejected with a clear message when written for a policy that
ignores them — a config never carries a setting that silently does nothing. Omitted keys take the defaults below.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import yaml

POLICIES = ("snapkv", "h2o", "tova", "streamingllm", "pyramidkv", "adakv", "knorm", "random")
REDUCTIONS = ("sum", "mean", "max")
POOLING_KINDS = ("max", "avg")
ATTENTION_POLICIES = ("snapkv", "h2o", "tova", "pyramidkv", "adakv")   # score with colreduce
POOLING_POLICIES = ("snapkv", "pyramidkv", "adakv")                    # SnapKV-style pooled window scores

# Which top-level keys each policy reads (besides the ones all policies read).
_COMMON_KEYS = ("policy", "budget", "window", "sink_tokens", "per_head", "min_prompt_tokens")
_POLICY_KEYS = {
    "snapkv": ("pooling", "reduction", "group_reduce"),
    "pyramidkv": ("pooling", "reduction", "group_reduce", "pyramid"),
    "adakv": ("pooling", "reduction", "group_reduce", "adakv"),
    "h2o": ("reduction", "group_reduce"),
    "tova": ("reduction", "group_reduce"),
    "streamingllm": (),
    "knorm": (),
    "random": ("seed",),
}
_ALL_KEYS = _COMMON_KEYS + ("pooling", "reduction", "group_reduce", "pyramid", "adakv", "seed")


class ConfigError(ValueError):
    """A pruning config is invalid; the message names the file, the key path and the allowed values."""


@dataclass(frozen=True)
class Budget:
    """Tokens kept per (layer, kv head): exactly one of keep_ratio / keep_tokens.

    keep_ratio: kept = ceil(keep_ratio · N) (exact decimal arithmetic), then clamped to [min_tokens, max_tokens].
    keep_tokens: kept = keep_tokens. In both cases never fewer than sink_tokens + window, never more than N.
    """
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    min_tokens: int = 0
    max_tokens: int | None = None

    def to_dict(self) -> dict:
        if self.keep_tokens is not None:
            return {"keep_tokens": self.keep_tokens}
        out: dict[str, Any] = {"keep_ratio": self.keep_ratio}
        if self.min_tokens:
            out["min_tokens"] = self.min_tokens
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        return out


@dataclass(frozen=True)
class Pooling:
    """SnapKV pooling of the window scores over the token axis: stride 1, padding kernel // 2 (odd kernel;
    1 = none). avg counts the zero padding (count_include_pad, as the SnapKV reference code does)."""
    kind: str = "max"
    kernel: int = 7

    def to_dict(self) -> dict:
        return {"kind": self.kind, "kernel": self.kernel}


@dataclass(frozen=True)
class PyramidOptions:
    """PyramidKV's linear per-layer profile: the free budget (beyond sinks + window) of layer l falls linearly from
    2F − F/beta (first layer) to F/beta (last layer); the layer average is exactly F (the configured budget)."""
    beta: float = 20.0

    def to_dict(self) -> dict:
        return {"beta": self.beta}


@dataclass(frozen=True)
class AdaKVOptions:
    """Ada-KV: each kv head is guaranteed floor(alpha · F) scored tokens (F = free budget per head); the rest of
    the layer's Hkv · F free tokens goes to the highest scores over all heads together."""
    alpha: float = 0.2

    def to_dict(self) -> dict:
        return {"alpha": self.alpha}


@dataclass(frozen=True)
class PruneConfig:
    """A validated pruning config (see the module docstring and configs/*.yaml)."""
    policy: str
    budget: Budget
    window: int = 32
    sink_tokens: int = 4
    per_head: bool = True
    min_prompt_tokens: int = 0
    pooling: Pooling = field(default_factory=Pooling)
    reduction: str = "sum"
    group_reduce: str = "mean"
    pyramid: PyramidOptions = field(default_factory=PyramidOptions)
    adakv: AdaKVOptions = field(default_factory=AdaKVOptions)
    seed: int = 0

    def __post_init__(self):
        _validate(self, source=None)

    @property
    def protected_tokens(self) -> int:
        """sinks + window: the tokens every policy keeps (on prompts at least that long)."""
        return self.sink_tokens + self.window

    def to_dict(self) -> dict:
        """Plain dict with the keys this policy reads; load_config(cfg.to_dict()) == cfg."""
        out: dict[str, Any] = {"policy": self.policy, "budget": self.budget.to_dict(), "window": self.window,
                               "sink_tokens": self.sink_tokens, "per_head": self.per_head,
                               "min_prompt_tokens": self.min_prompt_tokens}
        for key in _POLICY_KEYS[self.policy]:
            value = getattr(self, key)
            out[key] = value.to_dict() if dataclasses.is_dataclass(value) else value
        return out


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path_or_mapping: str | os.PathLike | Mapping | PruneConfig) -> PruneConfig:
    """Load and validate a pruning config from a YAML file path or a mapping (a PruneConfig is returned as is)."""
    if isinstance(path_or_mapping, PruneConfig):
        return path_or_mapping
    if isinstance(path_or_mapping, Mapping):
        return _from_mapping(path_or_mapping, source=None)
    if not isinstance(path_or_mapping, (str, os.PathLike)):
        raise ConfigError(f"load_config expects a YAML file path or a mapping, got {type(path_or_mapping).__name__}")
    path = os.fspath(path_or_mapping)
    if not os.path.exists(path) and os.path.basename(path) == path:
        path = _shipped_config(path) or path
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        shipped = ", ".join(shipped_configs())
        raise ConfigError(f"{path}: config file not found (a bare name also finds the configs shipped with the "
                          f"package: {shipped})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = e.problem or "invalid YAML"
        if e.context and e.context_mark is not None and mark is not e.context_mark:
            problem += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {e}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; it needs at least `policy` and `budget`")
    return _from_mapping(data, source=path)


def _shipped_dir():
    """The folder of the configs shipped with the package: colreduce_kvprune.configs when installed, the source tree's
    configs/ in an editable install (which does not map that data-only package)."""
    from importlib import resources

    try:
        return resources.files("colreduce_kvprune.configs")
    except ModuleNotFoundError:
        from pathlib import Path

        return Path(__file__).resolve().parent.parent / "configs"


def shipped_configs() -> list[str]:
    """File names of the configs shipped with the package ("snapkv.yaml", ...)."""
    folder = _shipped_dir()
    return sorted(f.name for f in folder.iterdir() if f.name.endswith(".yaml")) if folder.is_dir() else []


def _shipped_config(name: str) -> str | None:
    """The path of a shipped config by file name, or None. A file of that name in the working directory wins
    (load_config reads it before asking here)."""
    return os.fspath(_shipped_dir() / name) if name in shipped_configs() else None


def dump_config(config: PruneConfig) -> str:
    """The config as YAML text (keys in the canonical order); loading it back gives an equal config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one mapping is an error (YAML would silently keep the last)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _fail(source: str | None, keypath: str, msg: str):
    prefix = f"{source}: " if source else ""
    raise ConfigError(f"{prefix}{keypath}: {msg}" if keypath else f"{prefix}{msg}")


def _check_keys(data: Mapping, allowed: tuple[str, ...], source, parent: str):
    for key in data:
        if not isinstance(key, str):
            _fail(source, parent, f"keys must be strings, got {key!r}")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            path = f"{parent}.{key}" if parent else key
            _fail(source, path, f"unknown key{hint} (allowed: {', '.join(allowed)})")


def _mapping(value, source, keypath: str, example: str) -> Mapping:
    if not isinstance(value, Mapping):
        _fail(source, keypath, f"must be a mapping such as {example}, got {_describe(value)}")
    return value


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _get_int(data: Mapping, key: str, default, source, keypath: str):
    value = data.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(source, keypath, f"must be an integer, got {_describe(value)}")
    return value


def _get_float(data: Mapping, key: str, default, source, keypath: str):
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, keypath, f"must be a number, got {_describe(value)}")
    return float(value)


def _get_choice(data: Mapping, key: str, default, choices, source, keypath: str):
    value = data.get(key, default)
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6) if isinstance(value, str) else []
        hint = f"; did you mean `{close[0]}`?" if close else ""
        _fail(source, keypath, f"must be one of {', '.join(choices)}, got {_describe(value)}{hint}")
    return value


def _from_mapping(data, source: str | None) -> PruneConfig:
    data = _mapping(data, source, "", "{policy: snapkv, budget: {keep_ratio: 0.25}}")
    _check_keys(data, _ALL_KEYS, source, "")
    if "policy" not in data:
        _fail(source, "policy", f"missing; choose one of {', '.join(POLICIES)}")
    policy = _get_choice(data, "policy", None, POLICIES, source, "policy")
    for key in data:
        if key not in _COMMON_KEYS and key not in _POLICY_KEYS[policy]:
            users = [p for p in POLICIES if key in _POLICY_KEYS[p]]
            _fail(source, key, f"is not used by policy {policy} (only by: {', '.join(users)}); remove it")

    if "budget" not in data:
        _fail(source, "budget", "missing; give {keep_ratio: R} with 0 < R <= 1 or {keep_tokens: T}")
    b = _mapping(data["budget"], source, "budget", "{keep_ratio: 0.25} or {keep_tokens: 2048}")
    _check_keys(b, ("keep_ratio", "keep_tokens", "min_tokens", "max_tokens"), source, "budget")
    if ("keep_ratio" in b) == ("keep_tokens" in b):
        _fail(source, "budget", "give exactly one of keep_ratio (0 < R <= 1) or keep_tokens (integer)")
    if "keep_tokens" in b:
        for key in ("min_tokens", "max_tokens"):
            if key in b:
                _fail(source, f"budget.{key}", "applies only with keep_ratio; keep_tokens is already a fixed count")
        budget = Budget(keep_tokens=_get_int(b, "keep_tokens", None, source, "budget.keep_tokens"))
    else:
        budget = Budget(keep_ratio=_get_float(b, "keep_ratio", None, source, "budget.keep_ratio"),
                        min_tokens=_get_int(b, "min_tokens", 0, source, "budget.min_tokens"),
                        max_tokens=_get_int(b, "max_tokens", None, source, "budget.max_tokens"))

    kw: dict[str, Any] = {"policy": policy, "budget": budget}
    for key in ("window", "sink_tokens", "min_prompt_tokens", "seed"):
        if key in data:
            kw[key] = _get_int(data, key, None, source, key)
    if "per_head" in data:
        if not isinstance(data["per_head"], bool):
            _fail(source, "per_head", f"must be true or false, got {_describe(data['per_head'])}")
        kw["per_head"] = data["per_head"]
    for key in ("reduction", "group_reduce"):
        if key in data:
            kw[key] = _get_choice(data, key, None, REDUCTIONS, source, key)
    if "pooling" in data:
        p = _mapping(data["pooling"], source, "pooling", "{kind: max, kernel: 7}")
        _check_keys(p, ("kind", "kernel"), source, "pooling")
        kw["pooling"] = Pooling(kind=_get_choice(p, "kind", Pooling.kind, POOLING_KINDS, source, "pooling.kind"),
                                kernel=_get_int(p, "kernel", Pooling.kernel, source, "pooling.kernel"))
    if "pyramid" in data:
        p = _mapping(data["pyramid"], source, "pyramid", "{beta: 20}")
        _check_keys(p, ("beta",), source, "pyramid")
        kw["pyramid"] = PyramidOptions(beta=_get_float(p, "beta", PyramidOptions.beta, source, "pyramid.beta"))
    if "adakv" in data:
        p = _mapping(data["adakv"], source, "adakv", "{alpha: 0.2}")
        _check_keys(p, ("alpha",), source, "adakv")
        kw["adakv"] = AdaKVOptions(alpha=_get_float(p, "alpha", AdaKVOptions.alpha, source, "adakv.alpha"))

    try:
        return PruneConfig(**kw)
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Validation of values (shared by load_config and direct construction)


def _validate(cfg: PruneConfig, source: str | None):
    if cfg.policy not in POLICIES:
        _fail(source, "policy", f"must be one of {', '.join(POLICIES)}, got {cfg.policy!r}")
    b = cfg.budget
    if not isinstance(b, Budget):
        _fail(source, "budget", f"must be a Budget, got {type(b).__name__}")
    for name, value in (("window", cfg.window), ("sink_tokens", cfg.sink_tokens),
                        ("min_prompt_tokens", cfg.min_prompt_tokens), ("budget.min_tokens", b.min_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(source, name, f"must be an integer, got {_describe(value)}")
        if value < 0:
            _fail(source, name, f"must be >= 0, got {value}")
    if (b.keep_ratio is None) == (b.keep_tokens is None):
        _fail(source, "budget", "give exactly one of keep_ratio (0 < R <= 1) or keep_tokens (integer)")
    protected = cfg.sink_tokens + cfg.window
    if b.keep_ratio is not None:
        if not (0.0 < b.keep_ratio <= 1.0):
            _fail(source, "budget.keep_ratio", f"must be in (0, 1], got {b.keep_ratio}")
        if b.max_tokens is not None:
            if b.max_tokens < 1:
                _fail(source, "budget.max_tokens", f"must be >= 1, got {b.max_tokens}")
            if b.max_tokens < b.min_tokens:
                _fail(source, "budget.max_tokens", f"must be >= budget.min_tokens ({b.min_tokens}), got {b.max_tokens}")
            if b.max_tokens <= protected:
                _fail(source, "budget.max_tokens", f"must exceed sink_tokens + window ({protected}), "
                      f"else no scored token is ever kept; got {b.max_tokens}")
    else:
        if b.keep_tokens < 1:
            _fail(source, "budget.keep_tokens", f"must be >= 1, got {b.keep_tokens}")
        if b.keep_tokens <= protected:
            _fail(source, "budget.keep_tokens", f"must exceed sink_tokens + window ({cfg.sink_tokens} + "
                  f"{cfg.window} = {protected}), else no scored token is ever kept; got {b.keep_tokens}")
    if cfg.policy in POOLING_POLICIES:
        if cfg.window < 1:
            _fail(source, "window", f"policy {cfg.policy} scores with the last `window` queries: must be >= 1")
        if cfg.pooling.kind not in POOLING_KINDS:
            _fail(source, "pooling.kind", f"must be one of {', '.join(POOLING_KINDS)}, got {cfg.pooling.kind!r}")
        k = cfg.pooling.kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            _fail(source, "pooling.kernel", f"must be an odd integer >= 1 (1 = no pooling), got {k!r}")
    for name in ("reduction", "group_reduce"):
        if getattr(cfg, name) not in REDUCTIONS:
            _fail(source, name, f"must be one of {', '.join(REDUCTIONS)}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.per_head, bool):
        _fail(source, "per_head", f"must be true or false, got {_describe(cfg.per_head)}")
    if not (cfg.pyramid.beta >= 1.0):
        _fail(source, "pyramid.beta", f"must be >= 1 (1 = all layers equal), got {cfg.pyramid.beta}")
    if not (0.0 <= cfg.adakv.alpha <= 1.0):
        _fail(source, "adakv.alpha", f"must be in [0, 1], got {cfg.adakv.alpha}")
    for key in _ALL_KEYS:
        if key not in _COMMON_KEYS and key not in _POLICY_KEYS[cfg.policy] and getattr(cfg, key) != _DEFAULTS[key]:
            users = [p for p in POLICIES if key in _POLICY_KEYS[p]]
            _fail(source, key, f"is not used by policy {cfg.policy} (only by: {', '.join(users)}); leave it default")
    if cfg.policy == "adakv" and not cfg.per_head:
        _fail(source, "per_head", "policy adakv spreads the budget over heads: per_head must be true")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        _fail(source, "seed", f"must be an integer >= 0, got {_describe(cfg.seed)}")


_DEFAULTS = {"pooling": Pooling(), "reduction": "sum", "group_reduce": "mean", "pyramid": PyramidOptions(),
             "adakv": AdaKVOptions(), "seed": 0}


def ratio_count(keep_ratio: float, num_tokens: int) -> int:
    """ceil(keep_ratio · num_tokens) in exact decimal arithmetic (0.07 · 100 = 7, not 8 from float rounding)."""
    return -((-Fraction(repr(float(keep_ratio))) * num_tokens) // 1)
