"""Pruning policies: per-token scores → which prompt tokens each (layer, kv head) keeps.

    policy = get_policy(config)
    req = policy.score_request(N)                       # which queries / reduction the scores need
    s = policy.scores(q_window, keys, layer=l)          # (Hkv, N) float32, higher = more worth keeping
    idx = policy.select(s, layer=l, num_layers=L)       # (Hkv, keep) int64, ascending, unique, in range

All policies share one selection rule (`_top_k`): the first `sink_tokens` and the last `window` tokens are always
kept; the other slots go to the highest scores, ties to the lowest index (a stable sort by (-score, index)).
The kept count `keep_count(config, N, layer, num_layers)` is a pure function, so a scheduler can compute it without
seeing any scores.

| policy       | scores                                                          | per-head counts | per-layer counts |
|--------------|-----------------------------------------------------------------|-----------------|------------------|
| snapkv       | last `window` queries, causal column reduce, pooled (prefix)   | equal           | equal            |
| pyramidkv    | as snapkv                                                       | equal           | linear in depth  |
| adakv        | as snapkv                                                       | differ          | equal            |
| h2o          | all prompt queries, causal column sum (accumulated attention)   | equal           | equal            |
| tova         | the last query's attention                                      | equal           | equal            |
| streamingllm | recency (sinks + most recent tokens)                            | equal           | equal            |
| knorm        | −‖k‖₂ (keys of lowest norm kept)                                | equal           | equal            |
| random       | seeded uniform, a pure function of (seed, layer, N, head)       | equal           | equal            |
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from fractions import Fraction
import torch
import torch.nn.functional as F

from .config import ConfigError, PruneConfig, load_config, ratio_count

ENGINES = ("transformers", "vllm", "sglang")


@dataclass(frozen=True)
class ScoreRequest:
    """What a policy needs to score a prompt of N tokens.

    kind: "attention" — colreduce of the last `num_queries` queries against all N keys, causal (bottom-right),
          with `reduction` over queries and `group_reduce` over the query heads of a kv group;
          "key_norm" — the keys; "random" / "none" — nothing but the shape (Hkv, N) ("none": scores of the
          position alone, the same at every layer, a prompt's being the first N of a longer prompt's: an engine
          makes them once per step).
    """
    kind: str
    num_queries: int
    reduction: str | None = None
    group_reduce: str | None = None


# --------------------------------------------------------------------------------------------------------------
# Budgets


def keep_count(config: PruneConfig, num_tokens: int, layer: int = 0, num_layers: int | None = None) -> int:
    """Tokens kept per kv head at `layer` for a prompt of `num_tokens` (pure function of its arguments).

    Equals num_tokens when the prompt is untouched (num_tokens < min_prompt_tokens, or budget >= num_tokens).
    Budget: keep_tokens, or ceil(keep_ratio · N) clamped to [min_tokens, max_tokens]; never below
    sink_tokens + window, never above N. PyramidKV (needs num_layers): the per-layer counts of
    `layer_budgets`, whose mean is exactly this uniform count. Ada-KV: the mean count per head.
    """
    config = load_config(config)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
    if config.policy == "pyramidkv":
        if num_layers is None:
            raise ValueError("policy pyramidkv gives each layer its own budget: pass num_layers")
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
        return layer_budgets(config, num_tokens, num_layers)[layer]
    return _uniform_keep(config, num_tokens)


def _uniform_keep(config: PruneConfig, n: int) -> int:
    if n < config.min_prompt_tokens:
        return n
    b = config.budget
    if b.keep_tokens is not None:
        k = b.keep_tokens
    else:
        k = max(ratio_count(b.keep_ratio, n), b.min_tokens)
        if b.max_tokens is not None:
            k = min(k, b.max_tokens)
    return min(max(k, config.protected_tokens), n)


@functools.lru_cache(maxsize=4096)
def layer_budgets(config: PruneConfig, num_tokens: int, num_layers: int) -> tuple[int, ...]:
    """PyramidKV's per-layer kept counts for a prompt of num_tokens: sum == num_layers · uniform keep (exactly).

    With P = sinks + window (always kept) and F = uniform keep − P, layer l gets P plus a share of the free budget
    L·F following PyramidKV's linear profile, weight w_l from 2 − 1/beta (layer 0) down to 1/beta (last layer)
    (mean 1). A layer never gets more than N − P free slots; what a capped layer cannot take goes to the others in
    proportion to their weights; integer rounding by largest remainder (ties: lower layer), all in exact arithmetic.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    k = _uniform_keep(config, num_tokens)
    if k >= num_tokens:
        return (num_tokens,) * num_layers
    p = min(config.protected_tokens, num_tokens)
    free, cap = k - p, num_tokens - p
    inv_beta = 1 / Fraction(repr(config.pyramid.beta))
    top = 2 - inv_beta
    if num_layers == 1:
        weights = [Fraction(1)]
    else:
        weights = [top - (top - inv_beta) * Fraction(l, num_layers - 1) for l in range(num_layers)]
    total = free * num_layers
    capped: set[int] = set()
    while True:                                   # water-filling: cap at N − P, share the excess
        open_layers = [l for l in range(num_layers) if l not in capped]
        wsum = sum(weights[l] for l in open_layers)
        rest = total - cap * len(capped)
        shares = {l: rest * weights[l] / wsum for l in open_layers}
        over = [l for l in open_layers if shares[l] > cap]
        if not over:
            break
        capped.update(over)
    exact = [Fraction(cap) if l in capped else shares[l] for l in range(num_layers)]
    counts = [int(x) for x in exact]              # floor (all >= 0)
    missing = total - sum(counts)
    by_remainder = sorted(range(num_layers), key=lambda l: (-(exact[l] - counts[l]), l))
    for l in by_remainder[:missing]:
        counts[l] += 1
    return tuple(p + c for c in counts)


# --------------------------------------------------------------------------------------------------------------
# The shared selection


def _check_scores(scores: torch.Tensor, what: str = "scores", nan: bool = True) -> None:
    """Type checks, and (nan=True) no NaN: reading that back is a host sync, so batched callers check once."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {type(scores).__name__}"
                         + (f" of {scores.dtype}" if isinstance(scores, torch.Tensor) else ""))
    if nan and torch.isnan(scores).any():
        raise ValueError(f"{what} contain NaN")


def _priority_order(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Permutation of the last axis sorted by (group ascending, score descending, index ascending).

    scores (..., N) float, group (..., N) int (broadcastable) → (..., N) int64."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    g = torch.gather(group.expand_as(scores), -1, order)
    return torch.gather(order, -1, torch.sort(g, dim=-1, stable=True).indices)


def pad_scores(scores: list) -> torch.Tensor:
    """Per-request scores [(Hkv, N_b)] → (B, Hkv, max N_b), −inf past each request's length."""
    padded = scores[0].new_full((len(scores), scores[0].shape[0], max(s.shape[1] for s in scores)), float("-inf"))
    for i, s in enumerate(scores):
        padded[i, :, : s.shape[1]] = s
    return padded


def _token_groups(n_valid: torch.Tensor, n_max: int, sinks: int, window: int) -> torch.Tensor:
    """(B, 1, n_max) int: 0 = always kept (sink or window), 1 = scored candidate, 2 = padding past the length."""
    idx = torch.arange(n_max, device=n_valid.device)
    n = n_valid.view(-1, 1, 1)
    protected = (idx < sinks) | (idx >= n - window)
    return torch.where(idx >= n, 2, torch.where(protected, 0, 1))


_F64_MAX = torch.finfo(torch.float64).max
_F64_BELOW_MAX = float(torch.nextafter(torch.tensor(_F64_MAX, dtype=torch.float64),
                                      torch.tensor(0.0, dtype=torch.float64)))


@dataclass(frozen=True)
class SelectionLayout:
    """What the shared top-k of a batch needs besides the scores: device tensors made once per batch (an engine:
    once per step, then reused by every layer; see Policy.selection_layout). B requests, N = n_max columns.

    lo, hi, cap (B, 1, N) float64: the token groups as the sort key sees them (see _top_k) — protected (sinks,
    window) +inf, +inf, +inf; scored −M, M, float64 max (M: the float64 just below the max); padding past the
    length −inf, −inf, −inf. dropped (B, 1, kmax) bool: rank ≥ keeps[b] (kmax = max keeps, a host int). prefix
    (B, 1, N) bool or None: the columns a SnapKV-family policy pools (before each request's window), None when
    nothing is pooled; not_prefix its negation."""
    n_max: int
    kmax: int
    lo: torch.Tensor
    hi: torch.Tensor
    cap: torch.Tensor
    dropped: torch.Tensor
    prefix: torch.Tensor | None = None
    not_prefix: torch.Tensor | None = None


def _top_k(scores: torch.Tensor, layout: SelectionLayout) -> torch.Tensor:
    """The shared top-k in one stable sort. scores (B or 1, H, N) float → (B, H, kmax) int64 kept indices per row,
    ascending, padded with −1 beyond keeps[b]: sinks and window first, then the highest scores, ties to the lower
    index — the order (group, −score, index) of _priority_order (tests/test_select_fast.py compares the two).

    The sort key is float64, fmin(clamp(score, lo, hi), cap), and its descending stable sort is that order:
    protected tokens +inf whatever the score (clamp to [+inf, +inf]; a NaN, which clamp keeps, is taken out by
    fmin, which returns the non-NaN operand); padding −inf likewise; a scored token keeps its exact value (every
    float32, bf16, fp16 score is a float64), ±inf become ±M, inside the protected/padding bounds, and NaN becomes
    the float64 max, above +inf: where a float sort puts NaN (descending: first). So each group keeps its place
    whatever the scores hold, and within a group the order is the float sort's, as before (−0.0 and +0.0 equal).
    (float64 scores: M and the max stand for +inf and NaN, so finite scores that large would tie with them.)
    The first kmax positions of the sort are the priority order; ranks ≥ keeps[b] are moved past the end, sorted
    away, and written as −1."""
    key = torch.fmin(torch.clamp(scores, layout.lo, layout.hi), layout.cap)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., : layout.kmax]
    pos = torch.sort(order.masked_fill(layout.dropped, scores.shape[-1]), dim=-1).values
    return pos.masked_fill_(layout.dropped, -1)


# --------------------------------------------------------------------------------------------------------------
# Policies


class Policy:
    """Base policy: the shared budget and selection; subclasses say which scores they need and compute them."""
    name = ""
    uniform_heads = True    # every kv head keeps the same count (False: Ada-KV)
    uniform_layers = True   # every layer keeps the same count (False: PyramidKV)

    def __init__(self, config: PruneConfig):
        self.config = config

    def __repr__(self):
        return f"{type(self).__name__}({self.config!r})"

    def keep_count(self, num_tokens: int, layer: int = 0, num_layers: int | None = None) -> int:
        return keep_count(self.config, num_tokens, layer, num_layers)

    def score_request(self, num_tokens: int) -> ScoreRequest:
        raise NotImplementedError

    def scores(self, query_window, keys, *, layer: int = 0, scale=None, backend: str = "auto") -> torch.Tensor:
        """query_window (Hq, W, D) after RoPE (None if unused), keys (Hkv, N, D) after RoPE → (Hkv, N) float32."""
        raise NotImplementedError

    def postprocess_scores(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw column-reduced scores (Hkv, N) as asked by score_request → the policy's scores (identity here;
        SnapKV-family pooling). For engines that score many requests with one colreduce_varlen call."""
        return raw

    # selection --------------------------------------------------------------------------------------------
    def select_mask(self, scores: torch.Tensor, *, layer: int = 0, num_layers: int | None = None) -> torch.Tensor:
        """scores (Hkv, N) → (Hkv, N) bool, keep_count(...) True per row."""
        idx = self.select(scores, layer=layer, num_layers=num_layers)
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)

    def select(self, scores: torch.Tensor, *, layer: int = 0, num_layers: int | None = None) -> torch.Tensor:
        """scores (Hkv, N) → (Hkv, keep) int64 kept token indices, ascending, unique, in [0, N)."""
        _check_scores(scores)
        if scores.dim() != 2:
            raise ValueError(f"scores must be (Hkv, N), got shape {tuple(scores.shape)}")
        n = scores.shape[1]
        k = self.keep_count(n, layer, num_layers)
        dev = scores.device
        layout = self.selection_layout(torch.tensor([n], device=dev), torch.tensor([k], device=dev), n, k)
        return self.select_padded(scores[None], layout)[0]

    def selection_layout(self, lengths: torch.Tensor, keeps: torch.Tensor, n_max: int, kmax: int) -> SelectionLayout:
        """The SelectionLayout of a batch: lengths and keeps (B,) int64 on the scores' device (not read back: no
        host sync), n_max the padded width, kmax = max(keeps) as a host int. An engine makes it once per step."""
        dev = lengths.device
        group = _token_groups(lengths, n_max, self.config.sink_tokens, self.config.window)   # (B, 1, N) 0 / 1 / 2
        # protected +inf, padding −inf (device fills only: nothing copied from the host, no sync)
        ends = torch.full(group.shape, float("-inf"), dtype=torch.float64, device=dev).masked_fill_(group == 0,
                                                                                                   float("inf"))
        scored_cols = group == 1

        def bound(scored):              # the scored tokens' bound `scored`, the others' ends: (B, 1, N) float64
            return ends.masked_fill(scored_cols, scored)
        dropped = torch.arange(kmax, device=dev) >= keeps.view(-1, 1, 1)
        prefix = self._pooled_columns(torch.arange(n_max, device=dev), lengths.view(-1, 1, 1))
        return SelectionLayout(n_max, kmax, bound(-_F64_BELOW_MAX), bound(_F64_BELOW_MAX), bound(_F64_MAX),
                               dropped, prefix, None if prefix is None else ~prefix)

    def _pooled_columns(self, j: torch.Tensor, n: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, N) bool: the columns postprocess_padded pools (None: none)."""
        return None

    def postprocess_padded(self, scores: torch.Tensor, layout: SelectionLayout) -> torch.Tensor:
        """postprocess_scores of a whole padded batch at once: scores (B, Hkv, N_max) float32, each request's raw
        scores in its first lengths[b] columns → the same, row b's first lengths[b] columns equal (bitwise) to
        postprocess_scores of them; the other columns are padding, never selected."""
        return scores

    def select_padded(self, scores: torch.Tensor, layout: SelectionLayout) -> torch.Tensor:
        """The selection of a padded batch given its layout, no checks and no host sync (the engines' per-layer
        call). scores (..., B or 1, Hkv, N_max) (B = 1 broadcasts over the layout's requests; leading dims, e.g.
        layers, broadcast too); values past each length are ignored, NaN is not checked. → (..., B, Hkv, kmax)
        int64 ascending, padded with −1 (per_head=false: one row, expanded over the heads)."""
        if self.config.per_head:
            return _top_k(scores, layout)
        # per_head=false: one row, the mean over kv heads (columns past a length are padding: whatever they hold)
        idx = _top_k(scores.float().mean(dim=-2, keepdim=True), layout)
        return idx.expand(*idx.shape[:-2], scores.shape[-2], idx.shape[-1])

    def select_batched(self, scores, lengths=None, *, layer: int = 0, num_layers: int | None = None,
                       device_lengths: torch.Tensor | None = None, device_counts: torch.Tensor | None = None,
                       nan_flags: list | None = None):
        """Many requests at once. scores: a list of (Hkv, N_b) tensors, or a padded (B, Hkv, N_max) tensor with
        lengths (B,). → (indices (B, Hkv, K_max) int64 ascending, padded with -1; counts (B,) int64);
        row b equals select(scores_b).

        For engines, which select at every layer and must not wait for the device (each of these is a host sync
        otherwise): device_lengths / device_counts, the lengths and keep_count(...) of each request as int64
        tensors on the scores' device, made once per step (not checked against the host values); nan_flags, a
        list to which a 0-d bool device tensor (True: the scores hold NaN) is appended instead of raising."""
        if isinstance(scores, (list, tuple)):
            if lengths is not None:
                raise ValueError("lengths is given by the list of score tensors; pass lengths only with a padded tensor")
            if not scores:
                raise ValueError("select_batched needs at least one request")
            for i, s in enumerate(scores):
                _check_scores(s, f"scores[{i}]", nan=False)
                if s.dim() != 2 or s.shape[0] != scores[0].shape[0]:
                    raise ValueError(f"scores[{i}] must be (Hkv, N) with Hkv = {scores[0].shape[0]}, "
                                     f"got {tuple(s.shape)}")
            lengths = [s.shape[1] for s in scores]
            padded = pad_scores(scores)
            if nan_flags is None and torch.isnan(padded).any():   # one host sync for the batch, not per request
                for i, s in enumerate(scores):
                    _check_scores(s, f"scores[{i}]")
        else:
            padded = scores
            _check_scores(padded, nan=nan_flags is None)
            if padded.dim() != 3:
                raise ValueError(f"padded scores must be (B, Hkv, N_max), got shape {tuple(padded.shape)}")
            if lengths is None:
                lengths = [padded.shape[2]] * padded.shape[0]
            lengths = [int(x) for x in lengths]
            if len(lengths) != padded.shape[0] or any(not 0 <= x <= padded.shape[2] for x in lengths):
                raise ValueError(f"lengths must be {padded.shape[0]} values in [0, {padded.shape[2]}], got {lengths}")
        if not self.uniform_heads:
            raise ValueError(f"policy {self.name} gives kv heads different counts: use select_mask per request")
        if nan_flags is not None:
            nan_flags.append(torch.isnan(padded).any())
        dev = padded.device
        host_counts = [self.keep_count(n, layer, num_layers) for n in lengths]
        counts = torch.tensor(host_counts, device=dev) if device_counts is None else device_counts
        lens = torch.tensor(lengths, device=dev) if device_lengths is None else device_lengths
        layout = self.selection_layout(lens, counts, padded.shape[2], max(host_counts, default=0))
        return self.select_padded(padded, layout), counts


class _AttentionPolicy(Policy):
    """Policies scored by a causal column reduction of softmax attention (colreduce)."""

    def _num_queries(self, num_tokens: int) -> int:
        raise NotImplementedError

    def score_request(self, num_tokens: int) -> ScoreRequest:
        return ScoreRequest("attention", self._num_queries(num_tokens), self.config.reduction,
                            self.config.group_reduce)

    def scores(self, query_window, keys, *, layer: int = 0, scale=None, backend: str = "auto") -> torch.Tensor:
        if keys is None or keys.dim() != 3:
            raise ValueError(f"keys must be (Hkv, N, D), got {None if keys is None else tuple(keys.shape)}")
        m = self._num_queries(keys.shape[1])
        if query_window is None or query_window.dim() != 3 or query_window.shape[1] < m:
            got = None if query_window is None else tuple(query_window.shape)
            raise ValueError(f"policy {self.name} needs query_window (Hq, W >= {m}, D) holding the last {m} "
                             f"queries, got {got}")
        raw = _attention_scores(query_window[:, -m:][None], keys[None], self.config.reduction,
                                self.config.group_reduce, scale, backend)[0]
        return self.postprocess_scores(raw)


def _attention_scores(q, k, reduction, group_reduce, scale, backend):
    """colreduce, causal: q (1, Hq, M, D), k (1, Hkv, N, D) → (1, Hkv, N) float32."""
    from . import colreduce
    return colreduce(q, k, reduction, is_causal=True, scale=scale, group_reduce=group_reduce, backend=backend)


class SnapKV(_AttentionPolicy):
    """SnapKV: the last `window` queries' attention, reduced over queries, pooled over the prefix outside the
    window (kernel k, stride 1, padding k // 2; avg counts the padding, as SnapKV's code with F.avg_pool1d)."""
    name = "snapkv"

    def _num_queries(self, num_tokens: int) -> int:
        return min(self.config.window, num_tokens)

    def postprocess_scores(self, raw: torch.Tensor) -> torch.Tensor:
        return pool_prefix(raw, self._num_queries(raw.shape[-1]), self.config.pooling.kind,
                           self.config.pooling.kernel)

    def _pooled_columns(self, j: torch.Tensor, n: torch.Tensor) -> torch.Tensor | None:
        if self.config.pooling.kernel == 1:
            return None
        return j < (n - self.config.window).clamp(min=0)          # the N − min(window, N) prefix columns

    def postprocess_padded(self, scores: torch.Tensor, layout: SelectionLayout) -> torch.Tensor:
        """pool_prefix of every request at once: its prefix columns (layout.prefix) pooled, the others (its window,
        padding) passed through. Outside a request's prefix the pooling input holds what pool_prefix pads with
        (avg: 0, counted in the divisor either way; max: −inf, never the maximum), so each pooled column sees
        exactly pool_prefix's window, in the same order: bitwise the same values."""
        if layout.prefix is None:
            return scores
        scores = scores.float()
        k = self.config.pooling.kernel
        avg = self.config.pooling.kind != "max"
        x = scores.masked_fill(layout.not_prefix, 0.0 if avg else float("-inf"))
        pool = F.avg_pool2d if avg else F.max_pool2d               # (B, H, N) as a (C, H, W) image, (1, k) windows
        return torch.where(layout.prefix, pool(x, (1, k), stride=1, padding=(0, k // 2)), scores)


def pool_prefix(scores: torch.Tensor, window: int, kind: str, kernel: int) -> torch.Tensor:
    """SnapKV pooling of scores (..., N) over its first N − window columns (the window columns pass through).
    → float32, same shape."""
    scores = scores.float()
    n_prefix = scores.shape[-1] - window
    if kernel == 1 or n_prefix <= 0:
        return scores
    lead = scores.shape[:-1]
    x = scores[..., :n_prefix].reshape(1, -1, n_prefix)
    pool = F.max_pool1d if kind == "max" else F.avg_pool1d   # avg_pool1d: count_include_pad=True by default
    pooled = pool(x, kernel_size=kernel, stride=1, padding=kernel // 2).reshape(*lead, n_prefix)
    return torch.cat([pooled, scores[..., n_prefix:]], dim=-1)


class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scores, per-layer budgets shrinking linearly with depth (see layer_budgets)."""
    name = "pyramidkv"
    uniform_layers = False


class AdaKV(SnapKV):
    """Ada-KV: SnapKV scores; a layer keeps Hkv · keep_count tokens in all, spread unevenly over its kv heads.

    Each head keeps its sinks + window and floor(alpha · F) of its best scored tokens (F = keep − sinks − window);
    the remaining Hkv · (F − floor(alpha · F)) slots go to the highest scores over all heads together
    (ties: lower head, then lower index)."""
    name = "adakv"
    uniform_heads = False

    def select(self, scores, *, layer: int = 0, num_layers: int | None = None):
        raise ValueError("policy adakv gives kv heads different counts, so there is no (Hkv, keep) index tensor: "
                         "use select_mask (supported by the transformers engine only)")

    def select_mask(self, scores: torch.Tensor, *, layer: int = 0, num_layers: int | None = None) -> torch.Tensor:
        _check_scores(scores)
        if scores.dim() != 2:
            raise ValueError(f"scores must be (Hkv, N), got shape {tuple(scores.shape)}")
        h, n = scores.shape
        k = self.keep_count(n, layer, num_layers)
        dev = scores.device
        group = _token_groups(torch.tensor([n], device=dev), n, self.config.sink_tokens, self.config.window)[0]
        protected = (group == 0).expand(h, n)
        if k >= n:
            return torch.ones(h, n, dtype=torch.bool, device=dev)
        p = int(protected[0].sum())
        free = k - p
        floor_n = int(free * Fraction(repr(self.config.adakv.alpha)))
        order = _priority_order(scores, group)              # per head: protected first, then best scores
        rank_kept = torch.arange(n, device=dev) < p + floor_n
        mask = torch.zeros(h, n, dtype=torch.bool, device=dev).scatter_(1, order, rank_kept.expand(h, n))
        rest = h * (free - floor_n)
        flat_group = mask.flatten().long()                                       # 1 = already kept
        flat_order = _priority_order(scores.flatten(), flat_group)
        mask.view(-1)[flat_order[:rest]] = True
        return mask


class H2O(_AttentionPolicy):
    """H2O (heavy hitters): attention accumulated over all prompt queries — the full causal column sum."""
    name = "h2o"

    def _num_queries(self, num_tokens: int) -> int:
        return num_tokens


class TOVA(_AttentionPolicy):
    """TOVA: the attention of the last query."""
    name = "tova"

    def _num_queries(self, num_tokens: int) -> int:
        return min(1, num_tokens)


class StreamingLLM(Policy):
    """StreamingLLM: attention sinks + the most recent tokens; scores are the positions (recency)."""
    name = "streamingllm"

    def score_request(self, num_tokens: int) -> ScoreRequest:
        return ScoreRequest("none", 0)

    def scores(self, query_window, keys, *, layer: int = 0, scale=None, backend: str = "auto") -> torch.Tensor:
        h, n = _kv_shape(keys)
        return torch.arange(n, dtype=torch.float32, device=keys.device).expand(h, n).clone()


class KNorm(Policy):
    """KNorm: keep the keys of lowest L2 norm (scores = −‖k‖₂)."""
    name = "knorm"

    def score_request(self, num_tokens: int) -> ScoreRequest:
        return ScoreRequest("key_norm", 0)

    def scores(self, query_window, keys, *, layer: int = 0, scale=None, backend: str = "auto") -> torch.Tensor:
        _kv_shape(keys)
        return self.key_scores(keys)

    @staticmethod
    def key_scores(keys: torch.Tensor) -> torch.Tensor:
        """keys (..., D) → (...) float32, −‖k‖₂ of each key (a packed (T, Hkv, D) batch at once)."""
        return -torch.linalg.vector_norm(keys.float(), dim=-1)


class RandomPolicy(Policy):
    """Random baseline: uniform scores, a pure function of (seed, layer, N, kv head) drawn on the CPU, so every
    engine (and every tensor-parallel rank holding a subset of heads) selects the same tokens."""
    name = "random"

    def score_request(self, num_tokens: int) -> ScoreRequest:
        return ScoreRequest("random", 0)

    def scores(self, query_window, keys, *, layer: int = 0, scale=None, backend: str = "auto",
               head_offset: int = 0) -> torch.Tensor:
        """head_offset: global index of keys' first kv head (tensor parallel ranks)."""
        h, n = _kv_shape(keys)
        return self.random_scores(h, n, layer, head_offset).to(keys.device)

    def random_scores(self, num_kv_heads: int, num_tokens: int, layer: int = 0, head_offset: int = 0):
        """(num_kv_heads, num_tokens) float32 in [0, 1), CPU."""
        rows = []
        for head in range(head_offset, head_offset + num_kv_heads):
            key = f"{self.config.seed}/{layer}/{num_tokens}/{head}".encode()
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
            rows.append(torch.rand(num_tokens, generator=g))
        return torch.stack(rows) if rows else torch.empty(0, num_tokens)


def _kv_shape(keys) -> tuple[int, int]:
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
        raise ValueError(f"keys must be (Hkv, N, D), got {getattr(keys, 'shape', type(keys).__name__)}")
    return keys.shape[0], keys.shape[1]


POLICY_CLASSES = {cls.name: cls for cls in (SnapKV, H2O, TOVA, StreamingLLM, PyramidKV, AdaKV, KNorm, RandomPolicy)}


def get_policy(config) -> Policy:
    """The policy object for a config (a PruneConfig, a YAML path or a mapping)."""
    config = load_config(config)
    return POLICY_CLASSES[config.policy](config)


def select_tokens(config, scores: torch.Tensor, layer: int = 0, num_layers: int | None = None) -> torch.Tensor:
    """scores (Hkv, N) → (Hkv, keep) int64 kept indices; see Policy.select."""
    return get_policy(config).select(scores, layer=layer, num_layers=num_layers)


def select_tokens_batched(config, scores, lengths=None, layer: int = 0, num_layers: int | None = None):
    """Many requests at once; see Policy.select_batched. → (indices (B, Hkv, K_max) padded with -1, counts (B,))."""
    return get_policy(config).select_batched(scores, lengths, layer=layer, num_layers=num_layers)


def supported_engines(config) -> tuple[str, ...]:
    """Engines that can realise this config: vLLM and SGLang need one count for every head and every layer."""
    policy = get_policy(config)
    if policy.uniform_heads and policy.uniform_layers:
        return ENGINES
    return ("transformers",)


def check_engine(config, engine: str) -> None:
    """Raise ConfigError unless `engine` ("transformers" | "vllm" | "sglang") can realise this config."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    config = load_config(config)
    ok = supported_engines(config)
    if engine in ok:
        return
    why = ("gives kv heads different kept counts" if config.policy == "adakv"
           else "gives layers different kept counts")
    raise ConfigError(f"policy: {config.policy} {why}; {engine} keeps one block table per request with the same "
                      f"count for every layer and kv head, so it cannot run it. Engines that can: {', '.join(ok)}")
