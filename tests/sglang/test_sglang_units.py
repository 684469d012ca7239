"""Engine-free tests of the SGLang plugin: the tensor work of pruning.py against direct definitions on random
inputs (runs in any venv), and with SGLang installed: register() (no config → no hooks, idempotent) and the
engine-start checks on fake argument / model-config objects."""
import importlib.util
import types

import pytest
import torch

from colreduce_kvprune.config import ConfigError
from colreduce_kvprune.policies import get_policy
from colreduce_kvprune.sglang import pruning, settings

HAS_SGLANG = (importlib.util.find_spec("sglang") is not None
              and importlib.util.find_spec("sglang").origin not in (None, "namespace"))
needs_sglang = pytest.mark.skipif(not HAS_SGLANG, reason="SGLang is not installed (run scripts/ci_sglang.sh)")
SNAPKV = dict(policy="snapkv", budget={"keep_tokens": 24}, window=8, sink_tokens=2, min_prompt_tokens=16)


# ------------------------------------------------------------------------------------------- pruning.py

def test_query_capacity_per_policy():
    cap = {p: pruning.query_capacity(get_policy(dict(SNAPKV, policy=p))) for p in ("snapkv", "tova", "h2o")}
    assert cap == {"snapkv": 8, "tova": 1, "h2o": None}
    assert pruning.query_capacity(get_policy(dict(SNAPKV, policy="streamingllm"))) == 0


@pytest.mark.parametrize("capacity", [8, 1, None])
def test_query_recorder_across_chunks_keeps_the_last_queries(capacity):
    torch.manual_seed(0)
    full = {row: torch.randn(n, 4, 16) for row, n in ((3, 45), (5, 7))}
    rec = pruning.QueryRecorder(capacity)
    rec.record(3, 0, torch.randn(9, 4, 16), True, 0.25)          # a previous request on row 3: must be reset
    bounds = {3: [0, 20, 21, 45], 5: [0, 7]}                        # chunks of 20, 1, 24 tokens; one chunk of 7
    for row, b in bounds.items():
        for i, (a, z) in enumerate(zip(b[:-1], b[1:])):
            rec.record(row, 0, full[row][a:z], i == 0, 0.25)
    for row, q in full.items():
        got = rec.pop(row, [0])[0]
        want = q if capacity is None else q[-capacity:]
        assert torch.equal(got, want)
    assert rec.queries == {} and rec.scales == {0: 0.25}


def _buffers(num_layers, slots_total, hkv, d):
    return [(torch.randn(slots_total, hkv, d), torch.randn(slots_total, hkv, d + 2)) for _ in range(num_layers)]


def test_compact_moved_matches_a_per_layer_per_head_gather():
    torch.manual_seed(1)
    L, H, P, keep, S = 3, 2, 20, 7, 64
    buffers = _buffers(L, S, H, 8)
    before = [(k.clone(), v.clone()) for k, v in buffers]
    slots = torch.randperm(S)[:P]                                   # the request's slots, scattered in the pool
    kept = torch.stack([torch.stack([torch.randperm(P)[:keep].sort().values for _ in range(H)]) for _ in range(L)])
    new_prefix, freed = pruning.compact_moved(buffers, slots, kept)
    assert torch.equal(new_prefix, slots[:keep]) and torch.equal(freed, slots[keep:])
    others = torch.ones(S, dtype=torch.bool)
    others[slots] = False
    for layer in range(L):
        for t in range(2):
            buf, old = buffers[layer][t], before[layer][t]
            for h in range(H):
                assert torch.equal(buf[slots[:keep], h], old[slots[kept[layer, h]], h])
            assert torch.equal(buf[others], old[others])             # no other request's slot touched


def test_compact_shared_rewrites_the_row_only():
    slots = torch.tensor([40, 41, 7, 8, 9, 60, 61, 3])
    kept_row = torch.tensor([0, 2, 5, 7])
    new_prefix, freed = pruning.compact_shared(slots, kept_row)
    assert new_prefix.tolist() == [40, 7, 60, 3]
    assert sorted(freed.tolist()) == [8, 9, 41, 61]


def test_selection_is_shared():
    same = torch.tensor([[0, 3, 5], [0, 3, 5]]).expand(4, 2, 3)
    assert pruning.selection_is_shared(same)
    other = same.clone()
    other[2, 1, 1] = 4
    assert not pruning.selection_is_shared(other)


def test_select_layer_is_the_policy_on_the_recorded_window():
    torch.manual_seed(2)
    policy = get_policy(SNAPKV)
    keys, queries = torch.randn(2, 40, 16), torch.randn(8, 4, 16)
    got = pruning.select_layer(policy, keys, queries, layer=0, num_layers=2, scale=0.3)
    want = policy.select(policy.scores(queries.transpose(0, 1), keys, scale=0.3), layer=0)
    assert torch.equal(got, want) and got.shape == (2, 24)


# ------------------------------------------------------------------------------------------- settings.py

def test_version_check():
    ok = ["0.5.23", "0.5.23.1", "0.5.23.post2", "0.5.23rc1", "0.5.23+cpu"]
    bad = ["0.5.22", "0.5.24", "0.5.230", "0.6.0"]
    assert all(settings.sglang_version_supported(v) for v in ok)
    assert not any(settings.sglang_version_supported(v) for v in bad)


def test_unsupported_args_are_each_named():
    good = types.SimpleNamespace(speculative_algorithm=None, enable_mixed_chunk=False, page_size=1, tp_size=1)
    assert settings.unsupported_args(good) == []
    bad = types.SimpleNamespace(speculative_algorithm="EAGLE", enable_mixed_chunk=True, page_size=16, tp_size=2,
                                disaggregation_mode="prefill", enable_lora=True)
    text = "\n".join(settings.unsupported_args(bad))
    for words in ("speculative decoding", "enable_mixed_chunk", "page_size=16", "tp_size=2", "disaggregation",
                  "LoRA"):
        assert words in text


def test_unsupported_models_are_named():
    arch = types.SimpleNamespace
    assert settings.unsupported_model(arch(attention_arch=arch(name="MHA"), linear_attn_registry_result=None)) == []
    mla = settings.unsupported_model(arch(attention_arch=arch(name="MLA"), linear_attn_registry_result=None))
    assert len(mla) == 1 and "MLA" in mla[0]
    hybrid = settings.unsupported_model(arch(attention_arch=arch(name="MHA"), linear_attn_registry_result=object(),
                                             is_hybrid_swa=True))
    assert len(hybrid) == 2 and "sliding-window" in hybrid[0] and "linear-attention" in hybrid[1]


@needs_sglang
def test_prepare_server_args_refuses_another_version(monkeypatch, tmp_path):
    import sglang

    cfg = tmp_path / "snapkv.yaml"
    cfg.write_text("policy: snapkv\nbudget: {keep_tokens: 64}\n")
    monkeypatch.setenv(settings.ENV_VAR, str(cfg))
    monkeypatch.setattr(sglang, "__version__", "0.5.24")
    args = types.SimpleNamespace(disable_overlap_schedule=False, disable_radix_cache=False)
    with pytest.raises(ConfigError, match=r"SGLang 0\.5\.24 is not supported.*0\.5\.23"):
        settings.prepare_server_args(args)
    assert args.disable_overlap_schedule is False                  # nothing changed on a refusal


@needs_sglang
def test_prepare_server_args_forces_what_pruning_needs(monkeypatch, tmp_path, caplog):
    cfg = tmp_path / "snapkv.yaml"
    cfg.write_text("policy: snapkv\nbudget: {keep_tokens: 64}\n")
    monkeypatch.setenv(settings.ENV_VAR, str(cfg))
    args = types.SimpleNamespace(disable_overlap_schedule=False, disable_radix_cache=False, page_size=1)
    with caplog.at_level("WARNING", logger="colreduce_kvprune.sglang"):
        settings.prepare_server_args(args)
    assert args.disable_overlap_schedule is True and args.disable_radix_cache is True
    assert "disable_overlap_schedule=True because" in caplog.text and "disable_radix_cache=True because" in caplog.text
    monkeypatch.delenv(settings.ENV_VAR)
    untouched = types.SimpleNamespace(disable_overlap_schedule=False, disable_radix_cache=False)
    settings.prepare_server_args(untouched)                          # no config: SGLang's settings stay
    assert untouched.disable_overlap_schedule is False and untouched.disable_radix_cache is False


@needs_sglang
def test_register_installs_hooks_only_with_a_config_and_once(monkeypatch, tmp_path):
    import colreduce_kvprune.sglang as plugin
    from colreduce_kvprune.sglang import hooks
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved = {k: list(v) for k, v in HookRegistry._hooks.items()}
    monkeypatch.setattr(plugin, "_registered", False)
    try:
        HookRegistry._hooks.clear()
        monkeypatch.delenv(settings.ENV_VAR, raising=False)
        plugin.register()
        assert not any(HookRegistry._hooks.values())                # no config: SGLang unchanged
        cfg = tmp_path / "c.yaml"
        cfg.write_text("policy: snapkv\nbudget: {keep_tokens: 64}\n")
        monkeypatch.setenv(settings.ENV_VAR, str(cfg))
        plugin.register()
        plugin.register()                                            # idempotent
        installed = {t: [h for _, h, _ in HookRegistry._hooks[t]] for t in set(hooks.TARGETS.values())}
        assert installed == {
            hooks.TARGETS["resolve_before"]: [hooks.before_resolve, hooks.after_resolve],
            hooks.TARGETS["attention"]: [hooks.radix_attention_forward],
            hooks.TARGETS["prefill_result"]: [hooks.process_prefill_result],
            hooks.TARGETS["init_new"]: [hooks.forward_batch_init_new],
        }
    finally:
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved)
