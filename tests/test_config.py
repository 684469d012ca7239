"""The YAML pruning config: every shipped config loads, configs round-trip, and every kind of mistake is reported
with the file, the key path and the allowed values."""
import math
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from colreduce_kvprune.config import (POLICIES, Budget, ConfigError, Pooling, PruneConfig, dump_config, load_config,
                                      ratio_count)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_is_a_config_per_policy():
    assert sorted(p.stem for p in CONFIGS) == sorted(POLICIES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.policy == path.stem
    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg
    assert load_config(cfg.to_dict()) == cfg
    assert load_config(str(path)) == cfg


def test_defaults_and_values():
    cfg = load_config({"policy": "snapkv", "budget": {"keep_ratio": 1}})
    assert cfg.budget == Budget(keep_ratio=1.0)
    assert (cfg.window, cfg.sink_tokens, cfg.per_head, cfg.min_prompt_tokens) == (32, 4, True, 0)
    assert cfg.pooling == Pooling("max", 7) and (cfg.reduction, cfg.group_reduce) == ("sum", "mean")
    cfg = load_config({"policy": "snapkv", "budget": {"keep_tokens": 100}, "pooling": {"kind": "avg"}, "window": 8})
    assert cfg.pooling == Pooling("avg", 7) and cfg.budget.keep_tokens == 100 and cfg.window == 8


MINIMAL = {"policy": "snapkv", "budget": {"keep_ratio": 0.5}}


def _with(**changes):
    d = {**MINIMAL}
    d.update(changes)
    return d


# (mapping, substrings the message must contain)
BAD_MAPPINGS = {
    "unknown_key": (_with(windw=8), ["windw", "unknown key", "did you mean `window`", "allowed:", "sink_tokens"]),
    "unknown_nested_key": (_with(budget={"keep_ratoi": 0.5}), ["budget.keep_ratoi", "did you mean `keep_ratio`"]),
    "unknown_policy": (_with(policy="snapk"), ["policy", "snapkv, h2o, tova", "did you mean `snapkv`"]),
    "missing_policy": ({"budget": {"keep_ratio": 0.5}}, ["policy", "missing", "snapkv"]),
    "missing_budget": ({"policy": "h2o"}, ["budget", "missing", "keep_ratio", "keep_tokens"]),
    "both_budgets": (_with(budget={"keep_ratio": 0.5, "keep_tokens": 64}), ["budget", "exactly one"]),
    "no_budget_kind": (_with(budget={"min_tokens": 4}), ["budget", "exactly one"]),
    "ratio_zero": (_with(budget={"keep_ratio": 0}), ["budget.keep_ratio", "(0, 1]", "got 0"]),
    "ratio_above_one": (_with(budget={"keep_ratio": 1.5}), ["budget.keep_ratio", "(0, 1]", "1.5"]),
    "ratio_nan": (_with(budget={"keep_ratio": float("nan")}), ["budget.keep_ratio", "(0, 1]"]),
    "ratio_string": (_with(budget={"keep_ratio": "0.5"}), ["budget.keep_ratio", "must be a number", "str"]),
    "ratio_bool": (_with(budget={"keep_ratio": True}), ["budget.keep_ratio", "must be a number", "bool"]),
    "tokens_float": (_with(budget={"keep_tokens": 64.0}), ["budget.keep_tokens", "integer", "float"]),
    "tokens_zero": (_with(budget={"keep_tokens": 0}), ["budget.keep_tokens", ">= 1"]),
    "window_ge_budget": (_with(budget={"keep_tokens": 36}), ["budget.keep_tokens", "exceed sink_tokens + window",
                                                             "4 + 32 = 36"]),
    "min_with_tokens": (_with(budget={"keep_tokens": 64, "min_tokens": 8}), ["budget.min_tokens", "keep_ratio"]),
    "negative_min": (_with(budget={"keep_ratio": 0.5, "min_tokens": -1}), ["budget.min_tokens", ">= 0", "-1"]),
    "max_below_min": (_with(budget={"keep_ratio": 0.5, "min_tokens": 100, "max_tokens": 50}),
                      ["budget.max_tokens", ">= budget.min_tokens"]),
    "max_below_window": (_with(budget={"keep_ratio": 0.5, "max_tokens": 30}), ["budget.max_tokens", "exceed"]),
    "negative_window": (_with(window=-1), ["window", ">= 0", "-1"]),
    "negative_sinks": (_with(sink_tokens=-2), ["sink_tokens", ">= 0"]),
    "negative_min_prompt": (_with(min_prompt_tokens=-5), ["min_prompt_tokens", ">= 0"]),
    "window_string": (_with(window="32"), ["window", "must be an integer", "str '32'"]),
    "window_bool": (_with(window=True), ["window", "must be an integer", "bool"]),
    "snapkv_zero_window": (_with(window=0), ["window", "snapkv", ">= 1"]),
    "per_head_string": (_with(per_head="yes"), ["per_head", "true or false"]),
    "bad_reduction": (_with(reduction="avg"), ["reduction", "sum, mean, max", "'avg'"]),
    "bad_group_reduce": (_with(group_reduce="meen"), ["group_reduce", "did you mean `mean`"]),
    "bad_pool_kind": (_with(pooling={"kind": "min"}), ["pooling.kind", "max, avg"]),
    "even_kernel": (_with(pooling={"kernel": 4}), ["pooling.kernel", "odd"]),
    "pooling_not_mapping": (_with(pooling="max"), ["pooling", "mapping", "{kind: max, kernel: 7}"]),
    "budget_not_mapping": (_with(budget=0.5), ["budget", "mapping"]),
    "pooling_for_h2o": (_with(policy="h2o", pooling={"kind": "max"}),
                        ["pooling", "not used by policy h2o", "snapkv, pyramidkv, adakv"]),
    "seed_for_snapkv": (_with(seed=3), ["seed", "not used by policy snapkv", "random"]),
    "reduction_for_knorm": (_with(policy="knorm", reduction="sum"), ["reduction", "not used by policy knorm"]),
    "negative_seed": (_with(policy="random", seed=-1), ["seed", ">= 0"]),
    "beta_below_one": (_with(policy="pyramidkv", pyramid={"beta": 0.5}), ["pyramid.beta", ">= 1"]),
    "alpha_above_one": (_with(policy="adakv", adakv={"alpha": 1.5}), ["adakv.alpha", "[0, 1]"]),
    "adakv_shared_heads": (_with(policy="adakv", per_head=False), ["per_head", "adakv", "must be true"]),
    "top_level_list": ([1, 2], ["mapping"]),
}


@pytest.mark.parametrize("case", list(BAD_MAPPINGS), ids=str)
def test_bad_mapping_is_reported(case):
    data, needles = BAD_MAPPINGS[case]
    with pytest.raises(ConfigError) as e:
        load_config(data)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert isinstance(e.value, ValueError)


def test_errors_name_the_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("policy: snapkv\nbudget: {keep_ratio: 2}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: budget\.keep_ratio: must be in \(0, 1\]"):
        load_config(p)
    p.write_text("policy: snapkv\nbudget: {keep_ratio: 0.5}\nsink_token: 4\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: sink_token: unknown key; did you mean `sink_tokens`"):
        load_config(p)
    p.write_text("policy: snapkv\nbudget: {keep_tokens: 10}\n")      # range check done at construction
    with pytest.raises(ConfigError, match=r"mine\.yaml: budget\.keep_tokens: must exceed"):
        load_config(p)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("policy: snapkv\nbudget: {keep_ratio: 0.5\nwindow: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "broken.yaml" in msg and "YAML syntax error" in msg
    line = int(msg.split(" line ")[1].split(",")[0])
    assert line in (2, 3), msg          # the flow mapping opened on line 2 is never closed; PyYAML notices on 3
    p.write_text("policy: snapkv\n  budget: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line 2, column \d+: YAML syntax error"):
        load_config(p)


def test_duplicate_key_is_an_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("policy: snapkv\nbudget: {keep_ratio: 0.5}\nwindow: 8\nwindow: 16\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 4.*duplicate key 'window'"):
        load_config(p)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="file path or a mapping"):
        load_config(42)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="policy: must be one of"):
        PruneConfig(policy="lru", budget=Budget(keep_ratio=0.5))
    with pytest.raises(ConfigError, match="budget.keep_ratio"):
        PruneConfig(policy="h2o", budget=Budget(keep_ratio=0.0))
    with pytest.raises(ConfigError, match="pooling: is not used by policy h2o"):
        PruneConfig(policy="h2o", budget=Budget(keep_ratio=0.5), pooling=Pooling("avg", 3))
    with pytest.raises(AttributeError):
        PruneConfig(policy="h2o", budget=Budget(keep_ratio=0.5)).window = 3      # frozen


@st.composite
def configs(draw):
    policy = draw(st.sampled_from(POLICIES))
    window = draw(st.integers(1, 64))
    sinks = draw(st.integers(0, 8))
    if draw(st.booleans()):
        budget = {"keep_tokens": draw(st.integers(window + sinks + 1, 10_000))}
    else:
        budget = {"keep_ratio": draw(st.floats(1e-3, 1.0, exclude_min=True))}
        if draw(st.booleans()):
            budget["min_tokens"] = draw(st.integers(0, 100))
        if draw(st.booleans()):
            budget["max_tokens"] = draw(st.integers(max(budget.get("min_tokens", 0), window + sinks + 1), 5000))
    d = {"policy": policy, "budget": budget, "window": window, "sink_tokens": sinks,
         "per_head": policy == "adakv" or draw(st.booleans()), "min_prompt_tokens": draw(st.integers(0, 4096))}
    if policy in ("snapkv", "pyramidkv", "adakv", "h2o", "tova"):
        d["reduction"] = draw(st.sampled_from(["sum", "mean", "max"]))
        d["group_reduce"] = draw(st.sampled_from(["sum", "mean", "max"]))
    if policy in ("snapkv", "pyramidkv", "adakv"):
        d["pooling"] = {"kind": draw(st.sampled_from(["max", "avg"])), "kernel": draw(st.sampled_from([1, 3, 5, 7]))}
    if policy == "pyramidkv":
        d["pyramid"] = {"beta": draw(st.floats(1.0, 100.0))}
    if policy == "adakv":
        d["adakv"] = {"alpha": draw(st.floats(0.0, 1.0))}
    if policy == "random":
        d["seed"] = draw(st.integers(0, 2**31))
    return d


@settings(max_examples=150, deadline=None)
@given(configs())
def test_round_trip(d):
    cfg = load_config(d)
    text = dump_config(cfg)
    assert load_config(yaml.safe_load(text)) == cfg
    assert load_config(cfg.to_dict()) == cfg
    # every key the user wrote survives with its value
    out = cfg.to_dict()
    for key, value in d.items():
        if isinstance(value, dict):
            for k2, v2 in value.items():
                assert out[key].get(k2, 0) == v2, (key, k2)
        else:
            assert out[key] == value, key


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-6, 1.0), st.integers(0, 10**7))
def test_ratio_count_is_the_exact_decimal_ceiling(ratio, n):
    assert ratio_count(ratio, n) == math.ceil(Decimal(repr(ratio)) * n)


def test_ratio_count_no_float_rounding_up():
    assert 0.07 * 100 > 7                    # the float product rounds up ...
    assert ratio_count(0.07, 100) == 7       # ... the count does not
    assert ratio_count(0.25, 10) == 3 and ratio_count(1.0, 7) == 7 and ratio_count(0.5, 0) == 0


def test_bare_name_finds_shipped_config(tmp_path, monkeypatch):
    """`{"kv_prune": "snapkv.yaml"}` works from any directory: a bare file name that is not in the working
    directory is one of the configs shipped with the package; a file of that name in the working directory wins."""
    import os

    from colreduce_kvprune.config import shipped_configs

    here = os.path.dirname(os.path.abspath(__file__))
    shipped = load_config(os.path.join(here, "..", "configs", "snapkv.yaml"))
    monkeypatch.chdir(tmp_path)
    assert "snapkv.yaml" in shipped_configs() and "h2o.yaml" in shipped_configs()
    assert load_config("snapkv.yaml") == shipped
    (tmp_path / "snapkv.yaml").write_text("policy: h2o\nbudget: {keep_tokens: 64}\n")
    assert load_config("snapkv.yaml").policy == "h2o"
    with pytest.raises(ConfigError, match=r"snapkv_typo\.yaml: config file not found .*snapkv\.yaml"):
        load_config("snapkv_typo.yaml")
