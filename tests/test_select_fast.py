"""The one-sort selection (policies._top_k) and the pooling of a padded batch (Policy.postprocess_padded) against
plain references: per request, per head, Python sorts by (group, −score, index); per-request pooling (pool_prefix);
and the previous vectorised implementation (three stable sorts), kept here as it was. Bitwise equality everywhere,
on fresh random inputs full of ties, ±0.0, ±inf and extreme values."""
import math
import random

import pytest
import torch

from colreduce_kvprune import policies as P
from colreduce_kvprune.config import load_config
from colreduce_kvprune.policies import get_policy, keep_count, pool_prefix

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
    n = lens.view(-1, 1, 1)
    protected = (idx < cfg.sink_tokens) | (idx >= n - cfg.window)
    group = torch.where(idx >= n, 2, torch.where(protected, 0, 1))
    order = torch.sort(padded, dim=-1, descending=True, stable=True).indices
    g = torch.gather(group.expand_as(padded), -1, order)
    order = torch.gather(order, -1, torch.sort(g, dim=-1, stable=True).indices)
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
        policy = get_policy(make("snapkv", budget={"keep_ratio": rng.choice([0.05, 0.3, 0.7])}, window=rng.randint(1, 8),
                                 sink_tokens=rng.randint(0, 8), per_head=per_head))
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
