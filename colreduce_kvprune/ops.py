"""Public column-reduction API: argument checks, then the Triton kernels or the pure-torch reference."""
from __future__ import annotations

import importlib
import math
import os

import torch

from colreduce_kvprune.reference import colreduce_paged_torch, colreduce_torch, colreduce_varlen_torch

REDUCTIONS = ("sum", "mean", "max")
GROUP_REDUCTIONS = (None, "sum", "mean", "max")
BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = (16, 256)


def _check_common(q, k, reduction, scale, group_reduce, backend, q_name="q", k_name="k") -> str:
    """Checks shared by every entry point; returns the backend to use ("triton" | "torch")."""
    for name, t in ((q_name, q), (k_name, k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if group_reduce not in GROUP_REDUCTIONS:
        raise ValueError(f"unknown group_reduce {group_reduce!r}; expected None, 'sum', 'mean' or 'max'")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if q.dtype != k.dtype:
        raise TypeError(f"{q_name} and {k_name} must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.dtype not in _FLOAT_DTYPES and not (q.dtype == torch.float64 and backend == "torch"):
        raise TypeError(f"{q_name} has dtype {q.dtype}; expected float16, bfloat16 or float32"
                        " (float64 only with backend='torch')")
    if q.device != k.device:
        raise ValueError(f"{q_name} and {k_name} are on different devices: {q.device} and {k.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and q.dtype != torch.float64 else "torch"
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (got device {q.device}); use backend='torch' "
                             "or 'auto' on CPU (or set TRITON_INTERPRET=1 before importing triton, for testing)")
        d = q.shape[-1]
        if not _TRITON_HEAD_DIMS[0] <= d <= _TRITON_HEAD_DIMS[1]:
            raise ValueError(f"backend='triton' supports head dim 16..256, got {d}; use backend='torch'")
    return backend


def _check_heads(hq: int, hkv: int, q_name="q", k_name="k") -> None:
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{q_name} has {hq} heads and {k_name} {hkv}: the query heads must be a multiple of the "
                         "kv heads (GQA)")


_launcher = None


def kernels_module(name: str):
    """colreduce_kvprune.kernels.<name>, or an error that says why the subpackage is missing.

    It exists only in an installed copy: packaging maps the repository's kernels/ into it. `python -m` and
    `python -c` put the working directory first on sys.path, so from the repository root they import the source
    tree's colreduce_kvprune, which has no kernels (an editable install still resolves it; a regular one does not)."""
    try:
        return importlib.import_module(f"colreduce_kvprune.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name != "colreduce_kvprune.kernels":
            raise
        here = os.path.dirname(os.path.abspath(__file__))
        raise ModuleNotFoundError(
            f"colreduce_kvprune.kernels is missing: colreduce_kvprune was imported from {here}, a source checkout "
            "(the working directory comes first on sys.path under `python -m` and `python -c`), not from an "
            "installed copy. Install the checkout (`pip install -e .`), or start Python from another directory "
            "or with -P.", name=e.name) from e


def _triton_launcher():
    """kernels.colreduce.colreduce_triton, imported once (lazily: importing triton is slow and CPU users need not)."""
    global _launcher
    if _launcher is None:
        _launcher = kernels_module("colreduce").colreduce_triton
    return _launcher


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dimension with unit stride; copy only inputs that lack it (rare)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def colreduce(q: torch.Tensor, k: torch.Tensor, reduction: str = "sum", *, is_causal: bool = False,
              scale: float | None = None, group_reduce: str | None = None, lse: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Reduce softmax(q·kᵀ·scale) over its query axis, without materialising the attention matrix.

    Args:
        q: (B, Hq, M, D) queries; float16, bfloat16 or float32.
        k: (B, Hkv, N, D) keys, same dtype and device; Hq % Hkv == 0 (query head h reads kv head h // (Hq/Hkv)).
        reduction: "sum", "mean" or "max" over the query axis. "mean" divides by the number of queries that see
            each key (0 where none does).
        is_causal: bottom-right aligned causal mask: query i sees key j iff j <= i + (N - M). With M > N the first
            M - N queries see nothing and contribute nothing.
        scale: softmax scale, default 1/sqrt(D).
        group_reduce: None, or "sum" | "mean" | "max" to combine the query heads of each kv group.
        lse: optional (B, Hq, M) natural-log row log-sum-exp of the scaled logits (what flash-attention returns);
            when given, the row-statistics pass is skipped (one pass over K).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        float32 (B, Hq, N), or (B, Hkv, N) when group_reduce is set. Deterministic: bitwise equal on repeated calls.
    """
    backend = _check_common(q, k, reduction, scale, group_reduce, backend)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D); got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dims differ: q {q.shape[3]}, k {k.shape[3]}")
    _check_heads(q.shape[1], k.shape[1])
    if lse is not None and (tuple(lse.shape) != tuple(q.shape[:3]) or lse.device != q.device):
        raise ValueError(f"lse must be (B, Hq, M) = {tuple(q.shape[:3])} on {q.device}, got {tuple(lse.shape)} "
                         f"on {lse.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "torch":
        out = colreduce_torch(q, k, reduction, is_causal=is_causal, scale=scale, group_reduce=group_reduce, lse=lse)
        return out if q.dtype == torch.float64 else out.float()
    return _triton_launcher()(_unit_stride_last(q), _unit_stride_last(k), reduction, is_causal=is_causal,
                            scale=scale, group_reduce=group_reduce, lse=lse)


def _check_cu_seqlens(cu: torch.Tensor, total: int, name: str, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of B + 1 cumulative lengths")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, the tensors on {device}")
    if not cu.is_cuda and int(cu[-1]) != total:   # on the GPU this check would cost a host sync
        raise ValueError(f"{name} ends at {int(cu[-1])} but the packed tensor has {total} tokens")


def colreduce_varlen(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     reduction: str = "sum", *, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                     is_causal: bool = False, scale: float | None = None, group_reduce: str | None = None,
                     lse: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """:func:`colreduce` over a packed batch (flash-attention's varlen layout), each sequence on its own.

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32/int64 cumulative sequence starts (0 first, totals last).
            A sequence's query window may be shorter than its keys; causal masking is right-aligned per sequence.
            Zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: longest query / key sequence (computed, with a host sync, when omitted).
        lse: optional (Hq, total_q) natural-log row log-sum-exp (flash-attention's varlen layout).
        Other arguments as in :func:`colreduce`.

    Returns:
        float32 (total_k, Hq), or (total_k, Hkv) when group_reduce is set.
    """
    backend = _check_common(q, k, reduction, scale, group_reduce, backend)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be 3-D (total, H, D); got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dims differ: q {q.shape[2]}, k {k.shape[2]}")
    _check_heads(q.shape[1], k.shape[1])
    _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q", q.device)
    _check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different batch sizes: "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if lse is not None and (tuple(lse.shape) != (q.shape[1], q.shape[0]) or lse.device != q.device):
        raise ValueError(f"lse must be (Hq, total_q) = {(q.shape[1], q.shape[0])} on {q.device}, "
                         f"got {tuple(lse.shape)} on {lse.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "torch":
        out = colreduce_varlen_torch(q, k, cu_seqlens_q, cu_seqlens_k, reduction, is_causal=is_causal,
                                     scale=scale, group_reduce=group_reduce, lse=lse)
        return out if q.dtype == torch.float64 else out.float()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
    return _triton_launcher()(_unit_stride_last(q), _unit_stride_last(k), reduction, is_causal=is_causal,
                            scale=scale, group_reduce=group_reduce, lse=lse, cu_seqlens_q=cu_seqlens_q,
                            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def colreduce_paged(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seqlens_k: torch.Tensor, reduction: str = "sum", *,
                    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, is_causal: bool = False,
                    scale: float | None = None, group_reduce: str | None = None, lse: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """:func:`colreduce_varlen` with the keys read through a block table from a paged KV cache.

    Lets a chunked prefill score its window against keys that earlier chunks wrote to the cache.

    Args:
        q: (total_q, Hq, D) packed queries with cu_seqlens_q (B + 1,).
        key_cache: the key cache viewed as (num_blocks, block_size, Hkv, D), any strides but a unit last one.
            vLLM 0.32's FlashAttention/Triton backends: ``kv_cache[0]`` (already this shape); its CPU backend
            (blocks of (Hkv, block_size, D)): ``key_cache.transpose(1, 2)``. No copy is made.
        block_table: (B, max_blocks) int32/int64 cache block ids; key j of sequence b sits in block
            ``block_table[b, j // block_size]`` at slot ``j % block_size``.
        seqlens_k: (B,) int32/int64 keys per sequence; queries are its last tokens (causal right-aligned).
        max_seqlen_q, max_seqlen_k: longest query / key sequence (computed, with a host sync, when omitted);
            max_seqlen_k at most max_blocks · block_size (the table's entries are read up to it).
        lse: optional (Hq, total_q) natural-log row log-sum-exp.
        Other arguments as in :func:`colreduce`.

    Returns:
        float32 (B, Hq, max_seqlen_k), or (B, Hkv, max_seqlen_k) with group_reduce; zero past each sequence's keys.
    """
    backend = _check_common(q, key_cache, reduction, scale, group_reduce, backend, k_name="key_cache")
    if q.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(f"q must be (total_q, Hq, D) and key_cache (num_blocks, block_size, Hkv, D); got "
                         f"{tuple(q.shape)} and {tuple(key_cache.shape)}")
    if q.shape[2] != key_cache.shape[3]:
        raise ValueError(f"head dims differ: q {q.shape[2]}, key_cache {key_cache.shape[3]}")
    _check_heads(q.shape[1], key_cache.shape[2], k_name="key_cache")
    _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q", q.device)
    batch = cu_seqlens_q.numel() - 1
    for name, t, dims in (("block_table", block_table, 2), ("seqlens_k", seqlens_k, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[0] != batch:
            raise ValueError(f"{name} must be a {dims}-D tensor with one row per sequence ({batch})")
        if t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise TypeError(f"{name} must be int32 or int64 on {q.device}, got {t.dtype} on {t.device}")
    if not block_table.is_cuda and seqlens_k.numel() and int(seqlens_k.max()) > block_table.shape[1] * key_cache.shape[1]:
        raise ValueError("seqlens_k exceeds what block_table addresses (max_blocks · block_size)")
    if lse is not None and (tuple(lse.shape) != (q.shape[1], q.shape[0]) or lse.device != q.device):
        raise ValueError(f"lse must be (Hq, total_q) = {(q.shape[1], q.shape[0])} on {q.device}, "
                         f"got {tuple(lse.shape)} on {lse.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if max_seqlen_k is None:
        max_seqlen_k = int(seqlens_k.max()) if seqlens_k.numel() else 0
    if max_seqlen_k > block_table.shape[1] * key_cache.shape[1]:       # the kernels read the table up to it
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) exceeds what block_table addresses "
                         f"({block_table.shape[1]} blocks of {key_cache.shape[1]} keys)")
    if backend == "torch":
        out = colreduce_paged_torch(q, key_cache, block_table, cu_seqlens_q, seqlens_k, reduction,
                                    max_seqlen_k=max_seqlen_k, is_causal=is_causal, scale=scale,
                                    group_reduce=group_reduce, lse=lse)
        return out if q.dtype == torch.float64 else out.float()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
    return _triton_launcher()(_unit_stride_last(q), key_cache, reduction, is_causal=is_causal, scale=scale,
                            group_reduce=group_reduce, lse=lse, cu_seqlens_q=cu_seqlens_q,
                            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, block_table=block_table,
                            seqlens_k=seqlens_k)
