"""Triton kernels: column reductions of softmax(q·kᵀ·scale) over the query axis, without the attention matrix.

Two passes over K, each program owning its outputs (no atomics: bitwise deterministic):
1. ``_row_stats_kernel`` (skipped when the caller passes the row log-sum-exp): the key axis is split across
   programs so that a short query window still fills the GPU; the rows of all query heads of a kv group are one
   tile, so each K tile is loaded once per group. Each program writes a partial row max and sum of exponentials;
   ``_combine_row_stats`` merges the splits in a fixed order into the row log-sum-exp.
2. ``_column_kernel``: each program owns BLOCK_N key columns of one kv head, loads that K tile once, and loops over
   the query heads of the group and their query blocks, reducing exp2(s − lse) over rows (sum or max).

Dense (B, H, L, D) and packed varlen (total, H, D) tensors share the kernels through strides: a varlen call passes
batch stride 0 and cumulative sequence starts. Causal masking is bottom-right aligned per sequence: query i sees
key j iff j ≤ i + (N − M). Under TRITON_INTERPRET=1 a single config is used and bf16 is upcast (the interpreter's
bf16 dot is wrong).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_REDUCTIONS = {"sum": 0, "mean": 1, "max": 2}
_GROUP_REDUCE = {None: 0, "sum": 1, "mean": 2, "max": 3}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN: tl.constexpr):
    """(first query token, query count, first key token, key count) of sequence b."""
    if IS_VARLEN:
        q0 = tl.load(cu_q + b)
        k0 = tl.load(cu_k + b)
        return q0, tl.load(cu_q + b + 1) - q0, k0, tl.load(cu_k + b + 1) - k0
    else:
        return 0, max_m, 0, max_n


@triton.jit
def _row_stats_kernel(Q, K, cu_q, cu_k, M_part, L_part,
                      sqb, sqh, sqm, skb, skh, skn,
                      spp, sph, max_m, max_n, split_len, qk_scale,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial (max, sum of exp2) of each query row over one split of the keys, rows of all G heads together.

    Writes M_part/L_part[split, b·Hq + h, m] (log2 domain) for the rows this program covers.
    """
    split = tl.program_id(0)
    rb = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    q0, Mb, k0, Nb = _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN)
    R = G * Mb
    if rb * BLOCK_R >= R:
        return
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    g = r // Mb
    m = r % Mb
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + (hk * G + g)[:, None] * sqh + (q0 + m)[:, None] * sqm + d[None, :],
                mask=r_ok[:, None] & (d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, Nb)
    if IS_CAUSAL:
        # the last row of this block (by query index) bounds the visible keys
        r_last = tl.minimum(rb * BLOCK_R + BLOCK_R, R) - 1
        m_last = tl.where(r_last // Mb > (rb * BLOCK_R) // Mb, Mb - 1, r_last % Mb)
        hi = tl.minimum(hi, m_last + Nb - Mb + 1)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(K + b * skb + hk * skh + (k0 + n)[None, :] * skn + d[:, None],
                     mask=(n[None, :] < hi) & (d[:, None] < D), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        visible = n[None, :] < hi
        if IS_CAUSAL:
            visible = visible & (n[None, :] <= m[:, None] + (Nb - Mb))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    out = split * spp + (b * HKV * G + hk * G + g) * sph + m
    tl.store(M_part + out, m_i, mask=r_ok)
    tl.store(L_part + out, l_i, mask=r_ok)


@triton.jit
def _column_kernel(Q, K, LSE2, Out, cu_q, cu_k,
                   sqb, sqh, sqm, skb, skh, skn, slb, slh, slm, lse_q0, sob, soh, son,
                   max_m, max_n, qk_scale,
                   HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                   REDUCTION: tl.constexpr, GROUP_REDUCE: tl.constexpr,
                   IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Reduce exp2(s − lse2) over the query rows of BLOCK_N key columns, for the G query heads of one kv head.

    LSE2: row log-sum-exp in log2 units, +inf for rows that see no key. Writes Out[b, head, n] (head = query head,
    or kv head when GROUP_REDUCE combines the group).
    """
    nb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    q0, Mb, k0, Nb = _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN)
    if nb * BLOCK_N >= Nb:
        return
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Nb
    d = tl.arange(0, BLOCK_D)
    kt = tl.load(K + b * skb + hk * skh + (k0 + n)[None, :] * skn + d[:, None],
                 mask=n_ok[None, :] & (d[:, None] < D), other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    shift = Nb - Mb                                  # query i sees key j iff j <= i + shift
    m_start = 0
    if IS_CAUSAL:
        m_start = tl.maximum(nb * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
    if REDUCTION == 1:
        if IS_CAUSAL:
            count = tl.minimum(tl.maximum(Mb - tl.maximum(n - shift, 0), 0), Mb)
        else:
            count = tl.zeros([BLOCK_N], tl.int32) + Mb
    group = tl.zeros([BLOCK_N], tl.float32)
    for g in range(G):
        h = hk * G + g
        acc = tl.zeros([BLOCK_N], tl.float32)
        for ms in range(m_start, Mb, BLOCK_M):
            m = ms + tl.arange(0, BLOCK_M)
            m_ok = m < Mb
            q = tl.load(Q + b * sqb + h * sqh + (q0 + m)[:, None] * sqm + d[None, :],
                        mask=m_ok[:, None] & (d[None, :] < D), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse2 = tl.load(LSE2 + b * slb + h * slh + (q0 * lse_q0 + m) * slm, mask=m_ok, other=float("inf"))
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            if IS_CAUSAL:
                if ms + shift < nb * BLOCK_N + BLOCK_N - 1:   # this tile crosses the diagonal
                    p = tl.where(n[None, :] <= m[:, None] + shift, p, 0.0)
            if REDUCTION == 2:
                acc = tl.maximum(acc, tl.max(p, 0))
            else:
                acc += tl.sum(p, 0)
        if REDUCTION == 1:
            acc = tl.where(count > 0, acc / tl.maximum(count, 1).to(tl.float32), 0.0)
        if GROUP_REDUCE == 0:
            tl.store(Out + b * sob + h * soh + (k0 + n) * son, acc, mask=n_ok)
        elif GROUP_REDUCE == 3:
            group = tl.maximum(group, acc)
        else:
            group += acc
    if GROUP_REDUCE != 0:
        if GROUP_REDUCE == 2:
            group = group / G
        tl.store(Out + b * sob + hk * soh + (k0 + n) * son, group, mask=n_ok)


def _pick_config(m: int, d: int, g: int, is_causal: bool) -> dict:
    """Tile sizes and launch settings, a fixed function of the shape (so results never depend on tuning order)."""
    if _interpreting():
        return dict(BLOCK_R=32, BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    block_d = triton.next_power_of_2(d)
    big_d = block_d > 128
    return dict(BLOCK_R=64 if big_d else 128, BLOCK_M=64 if not big_d else 32,
                BLOCK_N=64 if big_d else 128, num_warps=8 if not big_d else 4, num_stages=2)


def _num_splits(rows_programs: int, n: int, block_n: int) -> int:
    """Key-axis splits for the row pass: enough programs to fill the GPU, at least 4 key tiles per split."""
    if _interpreting():
        return max(1, min(2, triton.cdiv(n, 4 * block_n)))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = triton.cdiv(4 * sms, max(1, rows_programs))
    return max(1, min(want, triton.cdiv(n, 4 * block_n)))


def _combine_row_stats(m_part: torch.Tensor, l_part: torch.Tensor) -> torch.Tensor:
    """(S, …) partial row max and sum of exp2 → log2-domain row log-sum-exp, +inf where a row sees no key.

    Reduces the split axis in a fixed order (deterministic)."""
    m_max = m_part.amax(0)
    m_safe = torch.where(torch.isneginf(m_max), torch.zeros_like(m_max), m_max)
    total = (l_part * torch.exp2(m_part - m_safe)).sum(0)
    # total == 0 only where a row sees no key; NaN inputs give NaN totals and stay NaN
    return torch.where(total == 0, torch.full_like(total, float("inf")), m_safe + torch.log2(total))


def colreduce_triton(q: torch.Tensor, k: torch.Tensor, reduction: str, *, is_causal: bool, scale: float,
                     group_reduce: str | None, lse: torch.Tensor | None = None,
                     cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None) -> torch.Tensor:
    """Launch the two passes. Inputs are validated by the caller (colreduce_kvprune.ops).

    Dense: q (B, Hq, M, D), k (B, Hkv, N, D), lse (B, Hq, M) → (B, Hq|Hkv, N).
    Varlen (cu_seqlens given): q (total_q, Hq, D), k (total_k, Hkv, D), lse (Hq, total_q) → (total_k, Hq|Hkv).
    The last dimension of q and k must have stride 1.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        B = cu_seqlens_q.numel() - 1
        _, Hq, D = q.shape
        Hkv = k.shape[1]
        max_m, max_n = int(max_seqlen_q), int(max_seqlen_k)
        sqb, sqh, sqm = 0, q.stride(1), q.stride(0)
        skb, skh, skn = 0, k.stride(1), k.stride(0)
        heads = Hq if group_reduce is None else Hkv
        out = torch.empty(k.shape[0], heads, dtype=torch.float32, device=q.device)
        sob, soh, son = 0, out.stride(1), out.stride(0)
    else:
        B, Hq, max_m, D = q.shape
        Hkv, max_n = k.shape[1], k.shape[2]
        sqb, sqh, sqm = q.stride(0), q.stride(1), q.stride(2)
        skb, skh, skn = k.stride(0), k.stride(1), k.stride(2)
        heads = Hq if group_reduce is None else Hkv
        out = torch.empty(B, heads, max_n, dtype=torch.float32, device=q.device)
        sob, soh, son = out.stride(0), out.stride(1), out.stride(2)
        cu_seqlens_q = cu_seqlens_k = out  # unused placeholders (IS_VARLEN is False)
    G = Hq // Hkv
    if out.numel() == 0 or max_n == 0:
        return out.zero_()
    cfg = _pick_config(max_m, D, G, is_causal)
    block_d = max(16, triton.next_power_of_2(D))
    upcast = _interpreting() and q.dtype == torch.bfloat16
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    qk_scale = scale * LOG2E
    common = dict(HKV=Hkv, G=G, D=D, IS_VARLEN=varlen, IS_CAUSAL=is_causal, UPCAST=upcast,
                  DOT_PRECISION=precision, BLOCK_D=block_d, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    if lse is None:
        row_blocks = triton.cdiv(G * max_m, cfg["BLOCK_R"])
        splits = _num_splits(row_blocks * B * Hkv, max_n, cfg["BLOCK_N"])
        split_len = triton.cdiv(triton.cdiv(max_n, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        splits = triton.cdiv(max_n, split_len)
        m_part = torch.empty(splits, B, Hq, max_m, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        if max_m:
            _row_stats_kernel[(splits, row_blocks, B * Hkv)](
                q, k, cu_seqlens_q, cu_seqlens_k, m_part, l_part,
                sqb, sqh, sqm, skb, skh, skn, m_part.stride(0), m_part.stride(2), max_m, max_n, split_len,
                qk_scale, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], **common)
        lse2 = _combine_row_stats(m_part, l_part)                  # (B, Hq, max_m), rows local per sequence
        slb, slh, slm, lse_q0 = lse2.stride(0), lse2.stride(1), lse2.stride(2), 0
    else:
        lse2 = lse.float() * LOG2E
        lse2 = torch.where(torch.isneginf(lse2), torch.full_like(lse2, float("inf")), lse2)
        if varlen:                                                 # (Hq, total_q), rows global
            slb, slh, slm, lse_q0 = 0, lse2.stride(0), lse2.stride(1), 1
        else:
            slb, slh, slm, lse_q0 = lse2.stride(0), lse2.stride(1), lse2.stride(2), 0
    _column_kernel[(triton.cdiv(max_n, cfg["BLOCK_N"]), B * Hkv)](
        q, k, lse2, out, cu_seqlens_q, cu_seqlens_k,
        sqb, sqh, sqm, skb, skh, skn, slb, slh, slm, lse_q0, sob, soh, son, max_m, max_n, qk_scale,
        REDUCTION=_REDUCTIONS[reduction], GROUP_REDUCE=_GROUP_REDUCE[group_reduce],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common)
    return out


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
