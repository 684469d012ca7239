"""Pruning policies: budgets, the shared top-k, and each policy against a direct implementation of its definition."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from colreduce_kvprune import policies as P
from colreduce_kvprune.config import ConfigError, load_config
from colreduce_kvprune.policies import (check_engine, get_policy, keep_count, layer_budgets, select_tokens,
                                        select_tokens_batched, supported_engines)

# policy → [easy kwargs, hard kwargs] (kvpress style): every parametrised test runs both.
POLICY_CASES = {
    "snapkv": [dict(budget={"keep_ratio": 0.5}, window=4, sink_tokens=2),
               dict(budget={"keep_tokens": 9}, window=1, sink_tokens=0, pooling={"kind": "avg", "kernel": 5},
                    reduction="max", group_reduce="max")],
    "pyramidkv": [dict(budget={"keep_ratio": 0.4}, window=4, sink_tokens=2),
                  dict(budget={"keep_tokens": 12}, window=2, sink_tokens=1, pyramid={"beta": 2.5},
                       pooling={"kind": "max", "kernel": 1})],
    "adakv": [dict(budget={"keep_ratio": 0.5}, window=4, sink_tokens=2),
              dict(budget={"keep_tokens": 10}, window=1, sink_tokens=0, adakv={"alpha": 0.0}, reduction="mean")],
    "h2o": [dict(budget={"keep_ratio": 0.5}, window=4, sink_tokens=2),
            dict(budget={"keep_ratio": 0.1, "min_tokens": 7}, window=0, sink_tokens=0, reduction="mean",
                 group_reduce="sum", per_head=False)],
    "tova": [dict(budget={"keep_ratio": 0.5}, window=4, sink_tokens=2, per_head=False),
             dict(budget={"keep_tokens": 5}, window=0, sink_tokens=1)],
    "streamingllm": [dict(budget={"keep_tokens": 16}, window=0, sink_tokens=4),
                     dict(budget={"keep_ratio": 0.3, "max_tokens": 11}, window=3, sink_tokens=0)],
    "knorm": [dict(budget={"keep_ratio": 0.5}, window=4, sink_tokens=2),
              dict(budget={"keep_tokens": 6}, window=0, sink_tokens=0, per_head=False)],
    "random": [dict(budget={"keep_ratio": 0.5}, window=4, sink_tokens=2, seed=7),
               dict(budget={"keep_tokens": 3}, window=1, sink_tokens=1, per_head=False)],
}
CASES = [(p, i) for p in POLICY_CASES for i in range(2)]
CASE_IDS = [f"{p}-{'easy' if i == 0 else 'hard'}" for p, i in CASES]
NUM_LAYERS = 4


def make(policy, **kw):
    return load_config({"policy": policy, **kw})


# --------------------------------------------------------------------------------------------------------------
# Independent float64 reference of the causal column reductions the attention policies ask for.


def ref_column_reduce(q, k, reduction, group_reduce, scale=None):
    """q (Hq, M, D), k (Hkv, N, D) → (Hkv, N) float64; causal bottom-right; explicit loops over heads."""
    hq, m, d = q.shape
    hkv, n, _ = k.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = []
    for h in range(hq):
        logits = (q[h].double() @ k[h // (hq // hkv)].double().T) * scale              # (M, N)
        i = torch.arange(m)[:, None]
        j = torch.arange(n)[None, :]
        visible = j <= i + (n - m)
        p = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1).nan_to_num(0.0)
        if reduction == "sum":
            col = p.sum(0)
        elif reduction == "max":
            col = p.max(0).values
        else:
            seen = visible.sum(0)
            col = torch.where(seen > 0, p.sum(0) / seen.clamp(min=1), 0.0)
        out.append(col)
    out = torch.stack(out).view(hkv, hq // hkv, n)
    return {"sum": out.sum(1), "mean": out.mean(1), "max": out.max(1).values}[group_reduce]


@pytest.fixture(autouse=True)
def _colreduce_or_reference(monkeypatch):
    """Policies score with colreduce; until it is importable, stand in the float64 reference."""
    try:
        from colreduce_kvprune import colreduce  # noqa: F401
    except ImportError:
        def fake(q, k, reduction, group_reduce, scale, backend):
            return ref_column_reduce(q[0], k[0], reduction, group_reduce, scale).float()[None]
        monkeypatch.setattr(P, "_attention_scores", fake)


def random_qk(seed, hq=4, hkv=2, n=40, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, d, generator=g) * 1.5
    k = torch.randn(hkv, n, d, generator=g) * 1.5
    return q, k


def policy_scores(policy, q, k, layer=0):
    w = policy.score_request(k.shape[1]).num_queries
    return policy.scores(q[:, q.shape[1] - w:] if w else None, k, layer=layer)


def check_selection(cfg, idx, n, keep):
    """Shape, sorted, unique, in range, sinks and window present."""
    assert idx.dtype == torch.int64 and idx.shape[1] == keep
    assert ((idx >= 0) & (idx < n)).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()                     # strictly ascending → unique
    protected = set(range(min(cfg.sink_tokens, n))) | set(range(max(n - cfg.window, 0), n))
    for row in idx.tolist():
        assert protected <= set(row)


# --------------------------------------------------------------------------------------------------------------
# Every policy, easy and hard settings


@pytest.mark.parametrize("name,case", CASES, ids=CASE_IDS)
def test_scores_and_selection(name, case):
    cfg = make(name, **POLICY_CASES[name][case])
    policy = get_policy(cfg)
    q, k = random_qk(case)
    n = k.shape[1]
    for layer in range(NUM_LAYERS):
        s = policy_scores(policy, q, k, layer)
        assert s.shape == (k.shape[0], n) and s.dtype == torch.float32 and torch.isfinite(s).all()
        keep = keep_count(cfg, n, layer, NUM_LAYERS)
        mask = policy.select_mask(s, layer=layer, num_layers=NUM_LAYERS)
        assert mask.shape == (k.shape[0], n) and mask.dtype == torch.bool
        if not policy.uniform_heads:
            assert mask.sum() == keep * k.shape[0]
            with pytest.raises(ValueError, match="different counts.*select_mask"):
                policy.select(s, layer=layer, num_layers=NUM_LAYERS)
            continue
        idx = policy.select(s, layer=layer, num_layers=NUM_LAYERS)
        check_selection(cfg, idx, n, keep)
        assert keep < n                                           # these settings really prune
        assert torch.equal(idx, select_tokens(cfg, s, layer, NUM_LAYERS))
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, idx, True))
        if not cfg.per_head:
            assert (idx == idx[0]).all()


@pytest.mark.parametrize("name,case", CASES, ids=CASE_IDS)
def test_batched_equals_one_by_one(name, case):
    cfg = make(name, **POLICY_CASES[name][case])
    policy = get_policy(cfg)
    if not policy.uniform_heads:
        with pytest.raises(ValueError, match="different counts"):
            policy.select_batched([torch.rand(2, 20)])
        return
    g = torch.Generator().manual_seed(3)
    lengths = [37, 5, 22, 1, 30]
    scores = [torch.randn(3, n, generator=g) for n in lengths]
    idx, counts = select_tokens_batched(cfg, scores, layer=1, num_layers=NUM_LAYERS)
    padded = torch.full((5, 3, 40), 123.0)                   # padding values must not matter
    for b, s in enumerate(scores):
        padded[b, :, : s.shape[1]] = s
    idx2, counts2 = select_tokens_batched(cfg, padded, lengths, layer=1, num_layers=NUM_LAYERS)
    assert torch.equal(idx, idx2[..., : idx.shape[-1]]) and torch.equal(counts, counts2)
    # the engines' entry (per-step device tensors, the NaN check left on the device) selects the same
    flags = []
    keeps = torch.tensor([policy.keep_count(n, 1, NUM_LAYERS) for n in lengths])
    idx3, counts3 = policy.select_batched(scores, layer=1, num_layers=NUM_LAYERS, device_lengths=torch.tensor(lengths),
                                          device_counts=keeps, nan_flags=flags)
    assert torch.equal(idx3, idx) and torch.equal(counts3, counts)
    assert len(flags) == 1 and flags[0].dim() == 0 and not flags[0]
    for b, s in enumerate(scores):
        one = policy.select(s, layer=1, num_layers=NUM_LAYERS)
        assert counts[b] == one.shape[1]
        assert torch.equal(idx[b, :, : counts[b]], one)
        assert (idx[b, :, counts[b]:] == -1).all()


@pytest.mark.parametrize("name", list(POLICY_CASES))
def test_score_request(name):
    policy = get_policy(make(name, **POLICY_CASES[name][0]))
    req = policy.score_request(100)
    expected = {"snapkv": ("attention", 4), "pyramidkv": ("attention", 4), "adakv": ("attention", 4),
                "h2o": ("attention", 100), "tova": ("attention", 1), "streamingllm": ("none", 0),
                "knorm": ("key_norm", 0), "random": ("random", 0)}[name]
    assert (req.kind, req.num_queries) == expected
    if req.kind == "attention":
        assert (req.reduction, req.group_reduce) == (policy.config.reduction, policy.config.group_reduce)
        assert policy.score_request(3).num_queries == min(expected[1], 3)


# --------------------------------------------------------------------------------------------------------------
# Each policy equals a direct implementation of its definition


def eager_topk(scores, keep, sinks, window):
    """Per row: protected tokens + the best others by (-score, index), via Python sorting. → list of sorted lists."""
    n = scores.shape[1]
    protected = set(range(min(sinks, n))) | set(range(max(n - window, 0), n))
    rows = []
    for row in scores.tolist():
        others = sorted((i for i in range(n) if i not in protected), key=lambda i: (-row[i], i))
        rows.append(sorted(protected | set(others[: keep - len(protected)])))
    return rows


def eager_pool(x, kind, kernel):
    """1-D pooling over the last axis by explicit windows: stride 1, zero padding kernel // 2 (counted by avg,
    ignored by max)."""
    n, r = x.shape[-1], kernel // 2
    out = torch.empty_like(x)
    for j in range(n):
        lo, hi = max(j - r, 0), min(j + r + 1, n)
        win = x[..., lo:hi]
        out[..., j] = win.max(-1).values if kind == "max" else win.sum(-1) / kernel
    return out


@pytest.mark.parametrize("kind,kernel,reduction,group_reduce", [
    ("max", 7, "sum", "mean"), ("avg", 5, "sum", "mean"), ("avg", 3, "mean", "max"), ("max", 1, "max", "sum")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapkv_equals_eager(kind, kernel, reduction, group_reduce, seed):
    window, sinks, n = 6, 2, 57
    cfg = make("snapkv", budget={"keep_tokens": 21}, window=window, sink_tokens=sinks,
               pooling={"kind": kind, "kernel": kernel}, reduction=reduction, group_reduce=group_reduce)
    q, k = random_qk(10 + seed, hq=6, hkv=2, n=n, d=16)
    # eager: softmax of the window's scores (float64, causal), reduce, pool the prefix, top-k
    col = ref_column_reduce(q[:, -window:], k, reduction, group_reduce)
    prefix = eager_pool(col[:, : n - window], kind, kernel)
    expected = eager_topk(torch.cat([prefix, col[:, n - window:]], 1), 21, sinks, window)
    policy = get_policy(cfg)
    s = policy.scores(q[:, -window:], k)
    assert torch.allclose(s[:, : n - window].double(), prefix, atol=1e-5)
    assert policy.select(s).tolist() == expected


def test_h2o_is_the_accumulated_causal_attention():
    cfg = make("h2o", budget={"keep_tokens": 15}, window=3, sink_tokens=1)
    q, k = random_qk(5, hq=4, hkv=4, n=33)
    s = get_policy(cfg).scores(q, k)
    logits = torch.einsum("hmd,hnd->hmn", q.double(), k.double()) / 4.0
    causal = torch.ones(33, 33, dtype=torch.bool).tril()
    attn = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
    accumulated = attn.sum(1)                          # (H, N): column sums over all prompt queries
    assert torch.allclose(s.double(), accumulated, atol=1e-5)
    assert select_tokens(cfg, s).tolist() == eager_topk(accumulated, 15, 1, 3)


def test_tova_is_the_last_query_attention():
    cfg = make("tova", budget={"keep_tokens": 9}, window=2, sink_tokens=0, per_head=False)
    q, k = random_qk(6, hq=4, hkv=2, n=30)
    policy = get_policy(cfg)
    s = policy.scores(q[:, -1:], k)
    logits = torch.einsum("hd,hnd->hn", q[:, -1].double(), k.double().repeat_interleave(2, 0)) / 4.0
    last = torch.softmax(logits, -1).view(2, 2, 30).mean(1)          # group mean → (Hkv, N)
    assert torch.allclose(s.double(), last, atol=1e-6)
    expected = eager_topk(last.mean(0, keepdim=True), 9, 0, 2)[0]     # per_head false: mean over kv heads
    assert policy.select(s).tolist() == [expected, expected]


def test_streamingllm_keeps_sinks_and_most_recent():
    cfg = make("streamingllm", budget={"keep_tokens": 10}, window=0, sink_tokens=3)
    k = torch.randn(2, 50, 8)
    idx = select_tokens(cfg, get_policy(cfg).scores(None, k))
    assert idx.tolist() == [[0, 1, 2] + list(range(43, 50))] * 2


def test_knorm_keeps_the_lowest_norms():
    cfg = make("knorm", budget={"keep_tokens": 12}, window=2, sink_tokens=1)
    k = torch.randn(3, 40, 8)
    s = get_policy(cfg).scores(None, k)
    norms = k.double().norm(dim=-1)
    assert torch.allclose(s.double(), -norms, atol=1e-5)
    assert select_tokens(cfg, s).tolist() == eager_topk(-norms, 12, 1, 2)


def test_random_is_a_pure_function_of_seed_layer_length_head():
    cfg = make("random", budget={"keep_tokens": 10}, window=1, sink_tokens=1, seed=11)
    policy = get_policy(cfg)
    k = torch.randn(4, 64, 8)
    a = policy.scores(None, k, layer=2)
    assert torch.equal(a, get_policy(load_config(cfg.to_dict())).scores(None, torch.zeros(4, 64, 2), layer=2))
    assert torch.equal(a[2:], policy.scores(None, k[2:], layer=2, head_offset=2))   # a tensor-parallel rank's heads
    assert not torch.equal(a, policy.scores(None, k, layer=3))
    assert not torch.equal(a, get_policy(load_config({**cfg.to_dict(), "seed": 12})).scores(None, k, layer=2))
    assert not torch.equal(a[0], a[1])
    assert ((a >= 0) & (a < 1)).all()


def test_ties_break_to_the_lowest_index():
    cfg = make("h2o", budget={"keep_tokens": 5}, window=1, sink_tokens=1)
    s = torch.tensor([[0.0, 1.0, 2.0, 2.0, 1.0, 2.0, 1.0, 0.0, 2.0, 0.5]])
    assert select_tokens(cfg, s).tolist() == [[0, 2, 3, 5, 9]]
    s = torch.zeros(2, 20)                                    # all tied → the earliest
    assert select_tokens(cfg, s).tolist() == [[0, 1, 2, 3, 19]] * 2


# --------------------------------------------------------------------------------------------------------------
# Budgets


def test_keep_count_rules():
    cfg = make("snapkv", budget={"keep_ratio": 0.25, "min_tokens": 20, "max_tokens": 100}, window=8, sink_tokens=4,
               min_prompt_tokens=50)
    assert keep_count(cfg, 49) == 49                           # shorter than min_prompt_tokens: untouched
    assert keep_count(cfg, 50) == 20                           # ceil(12.5) = 13 → min_tokens 20
    assert keep_count(cfg, 201) == 51                          # ceil(50.25)
    assert keep_count(cfg, 1000) == 100                        # max_tokens
    small = make("snapkv", budget={"keep_ratio": 0.1}, window=8, sink_tokens=4)
    assert keep_count(small, 30) == 12                         # ceil(3) = 3 → never below sinks + window
    assert keep_count(small, 10) == 10 and keep_count(small, 0) == 0   # never above N
    fixed = make("h2o", budget={"keep_tokens": 64})
    assert keep_count(fixed, 63) == 63 and keep_count(fixed, 64) == 64 and keep_count(fixed, 1000) == 64
    with pytest.raises(ValueError, match="num_tokens"):
        keep_count(fixed, -1)


def _uniform_cfgs():
    return st.builds(
        lambda policy, window, sinks, ratio, tokens, use_ratio, per_head, min_prompt: load_config({
            "policy": policy, "window": window, "sink_tokens": sinks, "per_head": per_head,
            "min_prompt_tokens": min_prompt,
            "budget": {"keep_ratio": ratio} if use_ratio else {"keep_tokens": window + sinks + tokens}}),
        st.sampled_from(["snapkv", "h2o", "tova", "streamingllm", "knorm", "random"]),
        st.integers(1, 8), st.integers(0, 5), st.floats(0.01, 1.0), st.integers(1, 40), st.booleans(),
        st.booleans(), st.sampled_from([0, 0, 10, 60]))


@settings(max_examples=200, deadline=None)
@given(_uniform_cfgs(), st.integers(0, 80), st.integers(1, 4), st.integers(0, 2**31), st.booleans())
def test_selection_properties(cfg, n, hkv, seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (hkv, n), generator=g).float() if ties else torch.randn(hkv, n, generator=g)
    idx = select_tokens(cfg, scores)
    keep = keep_count(cfg, n)
    check_selection(cfg, idx, n, keep)
    assert idx.shape[0] == hkv
    if n < cfg.min_prompt_tokens or keep >= n or cfg.protected_tokens >= n:
        assert keep == n and idx.tolist() == [list(range(n))] * hkv
    if not cfg.per_head:
        assert (idx == idx[:1]).all()
    # top-k: each kept scored token beats (or ties with a higher index) each dropped one
    rows = scores.mean(0, keepdim=True).expand_as(scores) if not cfg.per_head else scores
    protected = set(range(min(cfg.sink_tokens, n))) | set(range(max(n - cfg.window, 0), n))
    for h in range(hkv):
        kept = set(idx[h].tolist())
        chosen = [(-rows[h, i].item(), i) for i in kept - protected]
        dropped = [(-rows[h, i].item(), i) for i in set(range(n)) - kept]
        if chosen and dropped:
            assert max(chosen) < min(dropped)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 40), st.floats(0.01, 1.0), st.floats(1.0, 50.0), st.integers(0, 40),
       st.integers(0, 8))
def test_pyramid_budgets_average_to_the_budget(n, layers, ratio, beta, window, sinks):
    cfg = make("pyramidkv", budget={"keep_ratio": ratio}, window=max(window, 1), sink_tokens=sinks,
               pyramid={"beta": beta})
    snapkv = {k: v for k, v in cfg.to_dict().items() if k != "pyramid"} | {"policy": "snapkv"}
    uniform = keep_count(load_config(snapkv), n)
    budgets = [keep_count(cfg, n, layer, layers) for layer in range(layers)]
    assert sum(budgets) == uniform * layers                                # the average is exactly the budget
    assert all(min(n, cfg.protected_tokens) <= b <= n for b in budgets)
    assert all(a >= b - 1 for a, b in zip(budgets, budgets[1:]))           # non-increasing with depth (± rounding)
    assert tuple(budgets) == layer_budgets(cfg, n, layers)


def test_pyramid_profile_is_linear():
    cfg = make("pyramidkv", budget={"keep_tokens": 110}, window=8, sink_tokens=2, pyramid={"beta": 4})
    budgets = layer_budgets(cfg, 10_000, 5)            # free budget F = 100: weights 1.75 … 0.25
    assert budgets == (185, 148, 110, 72, 35)          # 10 + 175, 137.5, 100, 62.5, 25: one unit left, it
    #                                                    goes to the lower of the two equal remainders (layer 1)
    assert sum(budgets) == 5 * 110
    capped = layer_budgets(cfg, 150, 5)                # layer 0 would want 185 > 150: capped, excess shared
    assert capped[0] == 150 and sum(capped) == 5 * 110
    with pytest.raises(ValueError, match="num_layers"):
        keep_count(cfg, 500, 0)
    with pytest.raises(ValueError, match="layer must be in"):
        keep_count(cfg, 500, 5, 5)


def test_adakv_spreads_the_layer_budget_over_heads():
    cfg = make("adakv", budget={"keep_tokens": 16}, window=3, sink_tokens=1, adakv={"alpha": 0.25})
    policy = get_policy(cfg)
    g = torch.Generator().manual_seed(0)
    n, hkv = 80, 4
    scores = torch.rand(hkv, n, generator=g) * 0.01
    scores[0, 10:40] += 1.0                    # head 0 attends broadly, head 3 to almost nothing
    scores[1, 10:20] += 1.0
    mask = policy.select_mask(scores)
    counts = mask.sum(1)
    assert counts.sum() == hkv * 16                          # the layer total is fixed
    assert len(set(counts.tolist())) > 1 and counts[0] > 16 > counts[3]
    floor = int(0.25 * (16 - 4))
    assert (counts >= 4 + floor).all()                       # sinks + window + the guaranteed floor
    assert mask[:, :1].all() and mask[:, -3:].all()
    # the non-floor part is a global top-k over (head, token)
    order = P._priority_order(scores, P._token_groups(torch.tensor([n]), n, 1, 3)[0])
    floor_mask = torch.zeros_like(mask).scatter_(1, order[:, : 4 + floor], True)
    extra = mask & ~floor_mask
    rest_scores = scores[~floor_mask]
    assert extra.sum() == hkv * (16 - 4 - floor)
    assert scores[extra].min() >= rest_scores[~extra[~floor_mask]].max()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 4), st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**31))
def test_adakv_total_property(n, hkv, ratio, alpha, seed):
    cfg = make("adakv", budget={"keep_ratio": ratio}, window=2, sink_tokens=1, adakv={"alpha": alpha})
    scores = torch.rand(hkv, n, generator=torch.Generator().manual_seed(seed))
    mask = get_policy(cfg).select_mask(scores)
    keep = keep_count(cfg, n)
    assert mask.sum() == hkv * keep
    assert mask[:, : min(1, n)].all() and mask[:, max(n - 2, 0):].all()


# --------------------------------------------------------------------------------------------------------------
# Engines and errors


def test_check_engine():
    for name in POLICY_CASES:
        cfg = make(name, **POLICY_CASES[name][0])
        check_engine(cfg, "transformers")
        if name in ("pyramidkv", "adakv"):
            assert supported_engines(cfg) == ("transformers",)
            for engine in ("vllm", "sglang"):
                with pytest.raises(ConfigError, match=f"policy: {name} gives .* different kept counts; {engine}.*"
                                                      "Engines that can: transformers"):
                    check_engine(cfg, engine)
        else:
            check_engine(cfg, "vllm")
            check_engine(cfg, "sglang")
    with pytest.raises(ConfigError, match="engine must be one of transformers, vllm, sglang"):
        check_engine(make("h2o", budget={"keep_ratio": 0.5}), "tgi")


def test_nan_scores_raise_or_are_flagged():
    """select_batched raises on NaN scores at once; the engines' entry (nan_flags) flags them on the device instead,
    for the engine to report without a host sync (colreduce_kvprune.vllm.compaction.NanWatch)."""
    policy = get_policy(make("snapkv", budget={"keep_ratio": 0.5}, window=4))
    scores = [torch.rand(2, 20), torch.rand(2, 30)]
    scores[1][1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1\] contain NaN"):
        policy.select_batched(scores)
    with pytest.raises(ValueError, match="scores contain NaN"):
        policy.select_batched(torch.stack([scores[1], scores[1]]))
    flags = []
    for batch in (scores, torch.stack([scores[1], scores[1]])):
        policy.select_batched(batch, nan_flags=flags)
    policy.select_batched(scores[:1], nan_flags=flags)
    assert [bool(f) for f in flags] == [True, True, False]


def test_bad_inputs_are_reported():
    cfg = make("snapkv", budget={"keep_ratio": 0.5}, window=4)
    policy = get_policy(cfg)
    with pytest.raises(ValueError, match="NaN"):
        policy.select(torch.tensor([[0.0, float("nan"), 1.0] * 5]))
    with pytest.raises(ValueError, match=r"\(Hkv, N\)"):
        policy.select(torch.rand(1, 2, 20))
    with pytest.raises(ValueError, match="floating-point"):
        policy.select(torch.ones(2, 20, dtype=torch.long))
    q, k = random_qk(0)
    with pytest.raises(ValueError, match="needs query_window .* last 4 queries"):
        policy.scores(q[:, -2:], k)
    with pytest.raises(ValueError, match="keys must be"):
        get_policy(make("knorm", budget={"keep_ratio": 0.5})).scores(None, torch.rand(5, 4))
    with pytest.raises(ValueError, match="lengths must be"):
        select_tokens_batched(cfg, torch.rand(2, 2, 10), [10, 11])
