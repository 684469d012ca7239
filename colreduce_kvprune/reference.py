"""Pure-torch reference of the column reductions: exact, chunked over query rows, CPU or GPU.

Never materialises more than ``chunk`` query rows of the attention matrix at once (O(chunk·N) memory) and never
repeats K across the query heads of a kv group. It is the contract the Triton kernels are tested against, and the
backend used on CPU.
"""
from __future__ import annotations

import math

import torch

_CHUNK_ELEMENTS = 1 << 25  # attention-matrix elements materialised per chunk (128 MiB in float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_query_counts(m: int, n: int, is_causal: bool, device=None) -> torch.Tensor:
    """(n,) int64: how many of the m queries see each key column (bottom-right causal alignment)."""
    if not is_causal:
        return torch.full((n,), m, dtype=torch.int64, device=device)
    j = torch.arange(n, device=device)
    return (m - (j - (n - m)).clamp(min=0)).clamp(0, m)


def _reduce_heads(x: torch.Tensor, group_reduce: str | None) -> torch.Tensor:
    """x (B, Hkv, G, N) → (B, Hkv·G, N) or, combined over the group axis, (B, Hkv, N)."""
    if group_reduce is None:
        return x.flatten(1, 2)
    if group_reduce == "sum":
        return x.sum(2)
    if group_reduce == "mean":
        return x.mean(2)
    return x.amax(2)


def colreduce_torch(q: torch.Tensor, k: torch.Tensor, reduction: str = "sum", *, is_causal: bool = False,
                    scale: float | None = None, group_reduce: str | None = None,
                    lse: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Column reduction of softmax(q·kᵀ·scale) over the query axis, in pure torch.

    q (B, Hq, M, D), k (B, Hkv, N, D) with Hq % Hkv == 0; query head h uses kv head h // (Hq // Hkv).
    lse (B, Hq, M), optional: natural-log row log-sum-exp of the scaled logits; when given, rows are normalised
    with it instead of being recomputed.
    Returns (B, Hq, N), or (B, Hkv, N) when group_reduce is "sum" | "mean" | "max"; float32 (float64 for float64
    inputs). No argument checking: use :func:`colreduce_kvprune.colreduce` for validated calls.
    """
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hkv, G, N, dtype=acc, device=q.device)
    if M and N:
        qg = q.reshape(B, Hkv, G, M, D)
        kt = k.to(acc).transpose(-1, -2).unsqueeze(2)            # (B, Hkv, 1, D, N): one upcast copy of K
        lse_g = None if lse is None else lse.to(acc).reshape(B, Hkv, G, M)
        step = chunk or max(1, _CHUNK_ELEMENTS // max(1, B * Hq * N))
        cols = torch.arange(N, device=q.device)
        for m0 in range(0, M, step):
            m1 = min(M, m0 + step)
            s = torch.matmul(qg[:, :, :, m0:m1].to(acc), kt) * scale          # (B, Hkv, G, c, N)
            if is_causal:
                rows = torch.arange(m0, m1, device=q.device)
                s = s.masked_fill(cols[None, :] > rows[:, None] + (N - M), float("-inf"))
            if lse_g is None:
                p = _softmax_rows(s)
            else:
                p = torch.exp(s - lse_g[:, :, :, m0:m1, None])
            if reduction == "max":
                out = torch.maximum(out, p.amax(3))
            else:
                out += p.sum(3)
    if reduction == "mean":
        cnt = visible_query_counts(M, N, is_causal, q.device).to(acc)
        out = torch.where(cnt > 0, out / cnt.clamp(min=1), torch.zeros((), dtype=acc, device=q.device))
    return _reduce_heads(out, group_reduce)


def _softmax_rows(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where rows with no visible key (all -inf) give zeros, not NaN."""
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    total = e.sum(-1, keepdim=True)
    return torch.where(total == 0, torch.zeros_like(e), e / total)   # NaN inputs stay NaN


def colreduce_varlen_torch(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, reduction: str = "sum", *, is_causal: bool = False,
                           scale: float | None = None, group_reduce: str | None = None,
                           lse: torch.Tensor | None = None) -> torch.Tensor:
    """Packed-batch form of :func:`colreduce_torch`, one sequence at a time.

    q (total_q, Hq, D), k (total_k, Hkv, D), cu_seqlens_q / cu_seqlens_k (B + 1,) cumulative lengths;
    lse (Hq, total_q), optional (flash-attention's varlen layout). Returns (total_k, Hq) or (total_k, Hkv).
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    heads = Hq if group_reduce is None else Hkv
    out = torch.empty(k.shape[0], heads, dtype=_acc_dtype(q.dtype), device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q_b = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)               # (1, Hq, M_b, D)
        k_b = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)               # (1, Hkv, N_b, D)
        lse_b = None if lse is None else lse[:, cq[b]:cq[b + 1]].unsqueeze(0)
        r = colreduce_torch(q_b, k_b, reduction, is_causal=is_causal, scale=scale,
                            group_reduce=group_reduce, lse=lse_b)
        out[ck[b]:ck[b + 1]] = r[0].transpose(0, 1)
    return out


def gather_paged_keys(key_cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` keys of one sequence from a paged cache → (length, Hkv, D).

    key_cache (num_blocks, block_size, Hkv, D) (any strides); block_table_row (max_blocks,) cache block ids."""
    pos = torch.arange(length, device=key_cache.device)
    page = key_cache.shape[1]
    return key_cache[block_table_row[pos // page].long(), pos % page]


def colreduce_paged_torch(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seqlens_k: torch.Tensor, reduction: str = "sum", *,
                          max_seqlen_k: int | None = None, is_causal: bool = False, scale: float | None = None,
                          group_reduce: str | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`colreduce_varlen_torch` with each sequence's keys read through a block table.

    q (total_q, Hq, D); key_cache (num_blocks, block_size, Hkv, D); block_table (B, max_blocks);
    seqlens_k (B,) keys per sequence; lse (Hq, total_q), optional. Returns (B, Hq|Hkv, max_seqlen_k), zero past
    each sequence's keys.
    """
    lengths = seqlens_k.tolist()
    max_n = max(lengths, default=0) if max_seqlen_k is None else max_seqlen_k
    heads = q.shape[1] if group_reduce is None else key_cache.shape[2]
    out = torch.zeros(len(lengths), heads, max_n, dtype=_acc_dtype(q.dtype), device=q.device)
    cq = cu_seqlens_q.tolist()
    for b, n in enumerate(lengths):
        k_b = gather_paged_keys(key_cache, block_table[b], n).transpose(0, 1).unsqueeze(0)   # (1, Hkv, n, D)
        q_b = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        lse_b = None if lse is None else lse[:, cq[b]:cq[b + 1]].unsqueeze(0)
        out[b, :, :n] = colreduce_torch(q_b, k_b, reduction, is_causal=is_causal, scale=scale,
                                        group_reduce=group_reduce, lse=lse_b)[0]
    return out
