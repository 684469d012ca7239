"""The one-sort selection (policies._top_k), the padded scoring of a whole step (compaction.padded_scores,
Policy.postprocess_padded) and the per-step gather against plain references: per request, per head, Python sorts
by (group, −score, index); per-request pooling (pool_prefix); the per-request scoring (compaction.row_scores); and the
previous vectorised implementation (three stable sorts), kept here as it was. Bitwise equality everywhere, on fresh
random inputs full of ties, ±0.0, ±inf and extreme values. Also: the engine's per-layer call makes no host sync
(no op that reads the device back) and its op count does not grow with the number of requests."""
import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from colreduce_kvprune.config import load_config
from colreduce_kvprune import policies as P
from colreduce_kvprune.policies import get_policy, pool_prefix
from colreduce_kvprune.vllm import compaction

SPECIAL = [float("-inf"), float("inf"), -0.0, 0.0, 1.0, -1.0, 0.5, 0.5, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38,
           1e-38, 2.0]


def make(policy="snapkv", **kw):
    return load_config({"policy": policy, **kw})


def tie_scores(rng: random.Random, h: int, n: int, nan: bool = False) -> torch.Tensor:
    """(h, n) float32: values from a small set (ties, ±0.0, ±inf, float32 extremes, denormals) mixed with random."""
    vals = [rng.choice(SPECIAL) if rng.random() < 0.6 else rng.choice([rng.gauss(0, 1), float(rng.randint(-3, 3))])
            for _ in range(h * n)]
    if nan and vals:
        vals[rng.randrange(len(vals))] = float("nan")
    return torch.tensor(vals, dtype=torch.float32).view(h, n)


def random_config(rng: random.Random, policy="snapkv"):
    window, sinks = rng.randint(0 if policy != "snapkv" else 1, 6), rng.randint(0, 5)
    budget = ({"keep_tokens": rng.randint(window + sinks + 1, 30)} if rng.random() < 0.5
              else {"keep_ratio": rng.choice([0.1, 0.25, 0.5, 0.9]), "min_tokens": rng.randint(0, 4)})
    return make(policy, budget=budget, window=window, sink_tokens=sinks, per_head=rng.random() < 0.6,
                min_prompt_tokens=rng.choice([0, 0, 8]))


# --------------------------------------------------------------------------------------------------------------
# References


def slow_select(scores: torch.Tensor, keep: int, sinks: int, window: int, per_head: bool) -> list[list[int]]:
    """One request: (H, n) scores → per head the kept indices, ascending. Plain Python: rank every token by
    (group, −score, index), group 0 = sinks and window, 1 = the others; keep the first `keep`. A NaN score (the
    per_head=false mean of +inf and −inf: not flagged) ranks first in its group, as a descending float sort has it."""
    h, n = scores.shape
    rows = scores.tolist() if per_head else [scores.float().mean(0).tolist()] * h
    out = []
    for row in rows:
        group = [0 if (i < sinks or i >= n - window) else 1 for i in range(n)]
        ranked = sorted(range(n), key=lambda i: (group[i], not math.isnan(row[i]),
                                                 0.0 if math.isnan(row[i]) else -row[i], i))
        out.append(sorted(ranked[:keep]))
    return out


def slow_batched(policy, scores: list, layer=0, num_layers=None) -> torch.Tensor:
    """(B, H, K_max) int64 padded with −1, from slow_select per request."""
    cfg = policy.config
    keeps = [policy.keep_count(s.shape[1], layer, num_layers) for s in scores]
    out = torch.full((len(scores), scores[0].shape[0], max(keeps, default=0)), -1, dtype=torch.int64)
    for b, (s, k) in enumerate(zip(scores, keeps)):
        for h, row in enumerate(slow_select(s, k, cfg.sink_tokens, cfg.window, cfg.per_head)):
            out[b, h, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


def old_select_batched(policy, padded: torch.Tensor, lengths: list[int], layer=0) -> torch.Tensor:
    """The previous vectorised selection (three stable sorts, a scatter), as it was before the one-sort rewrite."""
    cfg = policy.config
    counts = torch.tensor([policy.keep_count(n, layer) for n in lengths])
    lens = torch.tensor(lengths)
    n_max = padded.shape[-1]
    if not cfg.per_head:
        valid = torch.arange(n_max) < lens.view(-1, 1, 1)
        shared = torch.where(valid, padded, 0).float().mean(dim=-2, keepdim=True).expand_as(padded)
        padded = torch.where(valid, shared, padded)
    idx = torch.arange(n_max)
    order = P._priority_order(padded, P._token_groups(lens, n_max, cfg.sink_tokens, cfg.window))
    rank_kept = torch.arange(n_max) < counts.view(-1, 1, 1)
    mask = torch.zeros_like(padded, dtype=torch.bool).scatter_(-1, order, rank_kept.expand_as(order))
    kmax = max(counts.tolist(), default=0)
    pos = torch.sort(torch.where(mask, idx, n_max), dim=-1).values[..., :kmax]
    return torch.where(pos >= n_max, -1, pos)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN of the same payload, −0.0 != +0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


# --------------------------------------------------------------------------------------------------------------
# The one-sort selection


@pytest.mark.parametrize("seed", range(40))
def test_select_batched_equals_slow_reference(seed):
    rng = random.Random(seed)
    policy = get_policy(random_config(rng, rng.choice(["snapkv", "h2o", "knorm"])))
    h = rng.randint(1, 4)
    lengths = [rng.choice([0, 1, 2, 3, rng.randint(1, 12), rng.randint(1, 40)]) for _ in range(rng.randint(1, 6))]
    scores = [tie_scores(rng, h, n) for n in lengths]
    want = slow_batched(policy, scores)
    idx, counts = policy.select_batched(scores)
    assert torch.equal(idx, want)
    assert counts.tolist() == [policy.keep_count(n) for n in lengths]
    # padded input: garbage (ties, ±inf) past each length must not matter; engines' device tensors, NaN flagged
    n_max = max(lengths) + rng.randint(0, 3)
    padded = tie_scores(rng, len(lengths) * h, n_max).view(len(lengths), h, n_max)
    for b, s in enumerate(scores):
        padded[b, :, : s.shape[1]] = s
    idx2, _ = policy.select_batched(padded, lengths)
    assert torch.equal(idx2[..., : want.shape[-1]], want)
    assert torch.equal(old_select_batched(policy, padded, lengths), idx2)
    flags = []
    idx3, _ = policy.select_batched(padded, lengths, device_lengths=torch.tensor(lengths),
                                    device_counts=counts, nan_flags=flags)
    assert torch.equal(idx3, idx2) and not flags[0]
    # one request at a time: select and select_mask
    for b, s in enumerate(scores):
        if s.shape[1] == 0:
            continue
        one = policy.select(s)
        assert torch.equal(one, want[b, :, : counts[b]])
        assert torch.equal(policy.select_mask(s), torch.zeros(s.shape, dtype=torch.bool).scatter_(1, one, True))


@pytest.mark.parametrize("per_head", [True, False])
def test_select_many_rows_equals_old_vectorised(per_head):
    """Larger batches against the previous implementation (fast), with heavy ties."""
    rng = random.Random(int(per_head))
    for _ in range(20):
        policy = get_policy(make("snapkv", budget={"keep_ratio": rng.choice([0.05, 0.3, 0.7])},
                                 window=rng.randint(1, 8), sink_tokens=rng.randint(0, 8), per_head=per_head))
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
        h, n_max = rng.randint(1, 8), max(lengths)
        padded = torch.randint(-3, 4, (len(lengths), h, n_max)).float() / 2          # many equal scores
        padded[torch.rand(padded.shape) < 0.05] = -0.0
        padded[torch.rand(padded.shape) < 0.02] = float("inf")
        padded[torch.rand(padded.shape) < 0.02] = float("-inf")
        idx, _ = policy.select_batched(padded, lengths)
        assert torch.equal(idx, old_select_batched(policy, padded, lengths))


def test_half_precision_and_float64_scores():
    """bf16 / fp16 / fp64 scores rank as before (the sort key is float64: exact for every narrower float)."""
    rng = random.Random(5)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for per_head in (True, False):
            policy = get_policy(make("h2o", budget={"keep_ratio": 0.3}, window=2, sink_tokens=1, per_head=per_head))
            lengths = [17, 40, 5]
            padded = tie_scores(rng, 3 * 2, 40).view(3, 2, 40).clamp(-60000, 60000).to(dtype)
            idx, _ = policy.select_batched(padded, lengths)
            assert torch.equal(idx, old_select_batched(policy, padded, lengths))


def test_nan_scores_stay_in_their_group():
    """NaN scores (flagged for the engine, never selected on) still give well-formed selections: sinks and window
    kept, indices unique and inside each request, even with NaN in the padding; and the same as before (a NaN
    ranks first among the scored tokens, as in a descending float sort)."""
    rng = random.Random(11)
    for _ in range(30):
        cfg = random_config(rng)
        policy = get_policy(cfg)
        lengths = [rng.randint(1, 30) for _ in range(3)]
        n_max = max(lengths) + 2
        padded = tie_scores(rng, 3 * 2, n_max, nan=True).view(3, 2, n_max)
        padded[torch.rand(padded.shape) < 0.1] = float("nan")
        flags = []
        idx, counts = policy.select_batched(padded, lengths, nan_flags=flags)
        assert bool(flags[0])
        assert torch.equal(idx, old_select_batched(policy, padded, lengths))
        for b, n in enumerate(lengths):
            k = int(counts[b])
            kept = idx[b, :, :k]
            assert ((kept >= 0) & (kept < n)).all() and (kept[:, 1:] > kept[:, :-1]).all()
            assert (idx[b, :, k:] == -1).all()
            protected = set(range(min(cfg.sink_tokens, n))) | set(range(max(n - cfg.window, 0), n))
            for row in kept.tolist():
                assert protected <= set(row)


def test_empty_and_full():
    policy = get_policy(make("h2o", budget={"keep_tokens": 4}, window=2, sink_tokens=1))
    idx, counts = policy.select_batched(torch.rand(2, 3, 0), [0, 0])
    assert idx.shape == (2, 3, 0) and counts.tolist() == [0, 0]
    idx, counts = policy.select_batched([torch.rand(2, 3), torch.rand(2, 9)])     # keep >= length: everything
    assert idx[0, :, :3].tolist() == [[0, 1, 2]] * 2 and (idx[0, :, 3:] == -1).all()


# --------------------------------------------------------------------------------------------------------------
# Pooling a padded batch == pooling each request


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9])
def test_postprocess_padded_equals_per_request(kind, kernel):
    rng = random.Random(kernel * 2 + (kind == "max"))
    for _ in range(12):
        window = rng.randint(1, 10)
        policy = get_policy(make("snapkv", budget={"keep_ratio": 0.5}, window=window, pooling={"kind": kind,
                                                                                              "kernel": kernel}))
        lengths = [rng.choice([1, 2, window, window + 1, window + 2, rng.randint(1, 60)]) for _ in range(5)]
        h, n_max = rng.randint(1, 4), max(lengths) + rng.randint(0, 4)
        raw = [tie_scores(rng, h, n, nan=rng.random() < 0.2) for n in lengths]
        if rng.random() < 0.5:                           # attention-like: non-negative, many zeros
            raw = [r.abs().nan_to_num(0.0, 1.0, 0.0) * (torch.rand(r.shape) < 0.7) for r in raw]
        padded = tie_scores(rng, len(lengths) * h, n_max).view(len(lengths), h, n_max)
        for b, r in enumerate(raw):
            padded[b, :, : r.shape[1]] = r
        lens = torch.tensor(lengths)
        layout = policy.selection_layout(lens, torch.tensor([policy.keep_count(n) for n in lengths]), n_max,
                                         max(policy.keep_count(n) for n in lengths))
        out = policy.postprocess_padded(padded, layout)
        for b, r in enumerate(raw):
            want = policy.postprocess_scores(r)
            assert same_bits(out[b, :, : r.shape[1]], want), (lengths[b], window, kernel)
            assert same_bits(want, pool_prefix(r, min(window, r.shape[1]), kind, kernel))


# --------------------------------------------------------------------------------------------------------------
# The engine's per-layer path: select_kept / gather_kept with a plan from plan_prefills

ENGINE_CASES = {
    "snapkv-max": dict(policy="snapkv", budget={"keep_ratio": 0.3}, window=4, sink_tokens=2),
    "snapkv-avg-shared": dict(policy="snapkv", budget={"keep_tokens": 9}, window=3, sink_tokens=1,
                              pooling={"kind": "avg", "kernel": 5}, per_head=False, reduction="max",
                              group_reduce="max"),
    "snapkv-window-longer-than-some": dict(policy="snapkv", budget={"keep_ratio": 0.5}, window=24, sink_tokens=0,
                                           min_prompt_tokens=0),
    "h2o": dict(policy="h2o", budget={"keep_ratio": 0.3}, window=2, sink_tokens=1),
    "h2o-shared": dict(policy="h2o", budget={"keep_ratio": 0.2, "min_tokens": 5}, window=0, sink_tokens=0,
                       reduction="mean", group_reduce="sum", per_head=False),
    "tova": dict(policy="tova", budget={"keep_tokens": 7}, window=3, sink_tokens=2, per_head=False),
    "knorm": dict(policy="knorm", budget={"keep_ratio": 0.4}, window=2, sink_tokens=2),
    "streamingllm": dict(policy="streamingllm", budget={"keep_ratio": 0.3}, window=3, sink_tokens=2),
    "streamingllm-shared": dict(policy="streamingllm", budget={"keep_tokens": 6}, window=0, sink_tokens=3,
                                per_head=False),
    "random": dict(policy="random", budget={"keep_ratio": 0.5}, window=1, sink_tokens=1, seed=3),
}


def engine_batch(seed, lengths, outputs=None, hq=4, hkv=2, d=8, bs=4, gap=0):
    """Packed step tensors and the steps (row, start, c0, qlen, P) of whole prompts (P + g tokens: g recomputed
    outputs), `gap` unrelated tokens between rows."""
    g = torch.Generator().manual_seed(seed)
    outputs = outputs or [0] * len(lengths)
    steps, start = [], 0
    for r, (n, o) in enumerate(zip(lengths, outputs)):
        steps.append((r, start, 0, n + o, n))
        start += n + o + gap
    q = torch.randn(start, hq, d, generator=g)
    k = torch.randn(start, hkv, d, generator=g)
    v = torch.randn(start, hkv, d, generator=g)
    width = max(compaction.cdiv(n + o, bs) for n, o in zip(lengths, outputs))
    table = (torch.randperm(len(lengths) * width + 5, generator=g)[: len(lengths) * width]
             .view(len(lengths), width).int())
    return q, k, v, steps, table, bs


def old_gather(plan, idx, key, value):
    """gather_kept as it was (every index made per call)."""
    pos = plan.kept_pos.clamp(max=idx.shape[2] - 1)
    tok = plan.gather_base + idx[plan.kept_row, :, pos]             # the row's first token, per kept entry
    if plan.out_tok is not None:                                    # −1 for every entry without outputs
        tok = torch.where(plan.out_tok >= 0, plan.out_tok, tok)
    heads = torch.arange(key.shape[1])
    return key[tok, heads], value[tok, heads]


@pytest.mark.parametrize("name", list(ENGINE_CASES))
@pytest.mark.parametrize("shape", ["one", "four", "gaps-and-outputs"])
def test_select_kept_equals_per_request_path(name, shape):
    cfg = load_config({"min_prompt_tokens": 4, **ENGINE_CASES[name]})
    policy = get_policy(cfg)
    lengths = {"one": [37], "four": [37, 12, 26, 5], "gaps-and-outputs": [30, 19, 8]}[shape]
    outputs = [0, 3, 0] if shape == "gaps-and-outputs" else None
    q, k, v, steps, table, bs = engine_batch(len(lengths), lengths, outputs, gap=2 if outputs else 0)
    _, _, plan, _ = compaction.plan_prefills(cfg, policy, steps, table, bs)
    assert plan is not None and plan.layout is not None
    args = dict(layer=1, scale=8 ** -0.5, backend="torch")
    scores = compaction.row_scores(policy, plan, q, k, **args)
    padded = compaction.padded_scores(policy, plan, q, k, **args)
    for b, s in enumerate(scores):                                  # the padded layout of the per-request scores
        assert same_bits(padded[min(b, padded.shape[0] - 1), :, : s.shape[1]], s)
    want, _ = policy.select_batched(scores, layer=1)                # the per-request path, as before
    assert torch.equal(want, slow_batched(policy, scores, layer=1))
    flags = []
    idx = compaction.select_kept(policy, plan, q, k, nan_flags=flags, **args)
    assert torch.equal(idx, want) and len(flags) == 1 and not flags[0]
    assert torch.equal(compaction.select_kept(policy, plan, q, k, **args), want)     # NaN checked on the host
    ks, vs = compaction.gather_kept(plan, idx, k, v)
    ks0, vs0 = old_gather(plan, want, k, v)
    assert torch.equal(ks, ks0) and torch.equal(vs, vs0)
    assert ks.shape[0] == plan.slots.shape[0]


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_select_padded_over_stacked_layers_equals_each_layer(name):
    """select_padded broadcasts the step's layout over leading dimensions: the scores of several layers stacked,
    (L, B, Hkv, N), select exactly what each layer's (B, Hkv, N) does (benchmarks/prune_path.py's one-selection-
    per-step experiment relies on it)."""
    cfg = load_config({"min_prompt_tokens": 4, **ENGINE_CASES[name]})
    policy = get_policy(cfg)
    q, k, v, steps, table, bs = engine_batch(7, [37, 12, 26, 5])
    _, _, plan, _ = compaction.plan_prefills(cfg, policy, steps, table, bs)
    g = torch.Generator().manual_seed(1)
    per_layer = [compaction.padded_scores(policy, plan, torch.randn(q.shape, generator=g), k, layer=layer,
                                          scale=8 ** -0.5, backend="torch") for layer in range(3)]
    shape = torch.broadcast_shapes(*(s.shape for s in per_layer))
    stacked = policy.select_padded(torch.stack([s.expand(shape) for s in per_layer]), plan.layout)
    assert stacked.shape[0] == 3
    for layer, s in enumerate(per_layer):
        want = policy.select_padded(s, plan.layout)
        assert torch.equal(stacked[layer], want.expand_as(stacked[layer]))


def test_nan_in_select_kept_names_the_request():
    cfg = load_config(ENGINE_CASES["snapkv-max"] | {"min_prompt_tokens": 4})
    policy = get_policy(cfg)
    q, k, v, steps, table, bs = engine_batch(0, [20, 30])
    _, _, plan, _ = compaction.plan_prefills(cfg, policy, steps, table, bs)
    k = k.clone()
    k[25, 1, 0] = float("nan")                                       # a key of request 1
    with pytest.raises(ValueError, match=r"scores\[1\] contain NaN"):
        compaction.select_kept(policy, plan, q, k, layer=0, scale=1.0, backend="torch")
    flags = []
    idx = compaction.select_kept(policy, plan, q, k, layer=0, scale=1.0, backend="torch", nan_flags=flags)
    assert bool(flags[0])
    for b, n in enumerate([20, 30]):
        kept = idx[b, :, : plan.keeps[b]]
        assert ((kept >= 0) & (kept < n)).all()


class _Ops(TorchDispatchMode):
    """Counts aten ops; fails on ops that read a device back (a host sync on a GPU) or make data-dependent
    shapes. paused: inside the colreduce call (not what this checks: the kernel launch on a GPU)."""
    SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "equal", "is_nonzero",
            "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            assert name not in self.SYNC, f"{name} reads the device back"
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["snapkv-max", "snapkv-avg-shared", "h2o", "tova", "knorm", "streamingllm",
                                  "streamingllm-shared"])
def test_layer_ops_do_not_grow_with_rows_and_never_sync(name):
    """The per-layer path (select_kept with NaN flags + gather_kept) reads nothing back and runs as many aten ops
    for 1 request as for 6 (the plan's per-step tensors are made at plan time or at the first layer); the ops of
    the colreduce call itself (on CPU the torch reference, which loops over the requests) are not counted."""
    import colreduce_kvprune

    cfg = load_config({"min_prompt_tokens": 4, **ENGINE_CASES[name]})
    policy = get_policy(cfg)
    counts = []
    for lengths in ([40], [40, 13, 27, 9, 33, 20]):
        q, k, v, steps, table, bs = engine_batch(1, lengths)
        _, _, plan, _ = compaction.plan_prefills(cfg, policy, steps, table, bs)
        args = dict(layer=0, scale=1.0, backend="torch", nan_flags=[])
        compaction.gather_kept(plan, compaction.select_kept(policy, plan, q, k, **args), k, v)   # first layer
        mode = _Ops()
        original = colreduce_kvprune.colreduce_varlen

        def paused(*a, **kw):
            mode.paused = True
            try:
                return original(*a, **kw)
            finally:
                mode.paused = False
        colreduce_kvprune.colreduce_varlen = paused
        try:
            with mode:
                idx = compaction.select_kept(policy, plan, q, k, **args)
                compaction.gather_kept(plan, idx, k, v)
        finally:
            colreduce_kvprune.colreduce_varlen = original
        counts.append(mode.count)
    assert counts[0] == counts[1], counts
