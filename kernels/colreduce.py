"""Triton kernels: column reductions of softmax(q·kᵀ·scale) over the query axis, without the attention matrix.

Two passes over K, each program owning its outputs (bitwise deterministic):
1. ``_row_stats_kernel`` (skipped when the caller passes the row log-sum-exp): the key axis is split across
   programs so that a short query window still fills the GPU; the rows of all query heads of a kv group are one
   tile, so each K tile is loaded once per group. Each program writes a partial row max and sum of exponentials;
   the last program of a row block to finish (an atomic count per row block, the only atomic) merges the splits
   in a fixed order into the row log-sum-exp (``_combine_splits``; with one split the row pass writes it itself).
2. the column pass: each program owns BLOCK_N key columns of one kv head, loads that K tile once, and loops over
   the query heads of the group and their query blocks, reducing exp2(s − lse) over rows (sum or max).
   ``_window_column_kernel`` (query windows ≤ 128 rows) keeps the K tile in registers and reduces each k·qᵀ tile at
   once; ``_long_column_kernel`` (longer queries) keeps it in shared memory and accumulates q·kᵀ tiles in 2-D.
   Where a window's group rows fit one tile (next_pow2(G)·next_pow2(M) ≤ 256), ``_window_column_kernel``'s
   PERSISTENT mode turns this around: each program loads the group's queries once and loops over a run of key tiles.
   Windows whose group rows are few against the head dimension (_save_scores) skip the second read of K: the row
   pass also stores its scores, and ``_saved_column_kernel`` reduces exp2(x − lse) over them.
   Where a short window's key tiles fit one program per SM (_fused_tiles), both passes run in one cooperative
   launch, each score computed once: ``_fused_window_kernel`` (FUSED_WINDOWS: on by default on GPUs, off under the
   interpreter; COLREDUCE_KVPRUNE_FUSED=0/1; a config's FUSED).

Dense (B, H, L, D) and packed varlen (total, H, D) tensors share the kernels through strides: a varlen call passes
batch stride 0 and cumulative sequence starts. Causal masking is bottom-right aligned per sequence: query i sees
key j iff j ≤ i + (N − M). Under TRITON_INTERPRET=1 a single config is used and bf16 is upcast (the interpreter's
bf16 dot is wrong).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import DIRECT_CHECKED, compiled_launch

try:                        # grid dependency control (programmatic dependent launch): 3.6 and 3.7 have it
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:         # an older Triton: a config's PDL is ignored, these stand-ins are never reached
    _HAS_GDC = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_REDUCTIONS = {"sum": 0, "mean": 1, "max": 2}
_GROUP_REDUCE = {None: 0, "sum": 1, "mean": 2, "max": 3}

# Launch path. "new": launch plan (tiles, splits, grids) cached per shape, row statistics combined by the row
# pass itself (its last program per row block combines the splits; with one split it writes the lse directly), a
# given natural-log lse converted inside the column kernel, tile sizes fitted to short windows and small grids;
# every launch through Triton's dispatch.
# "direct": "new" with each compiled kernel launched through its cached launcher after its first dispatch (below;
# bitwise the same kernels, ~50 µs less host time per call on the H200). The default is "direct" under the Triton
# versions whose launcher call it was checked against on a GPU (test_direct_launch_matches_jit_dispatch passed on
# the H200 under 3.6, 3.7.1 and 3.8.0), "new" under any other. "old": the path before issue 19 (torch ops for the
# combine and the lse conversion, _pick_config's tiles) — kept so that one GPU run can compare (benchmarks/
# kernels.py --serving-sweep). Set with COLREDUCE_KVPRUNE_LAUNCH=new|direct|old or set_launch_variant().
DEFAULT_VARIANT = "direct" if triton.__version__.startswith(DIRECT_CHECKED) else "new"    # (launch.py)
_VARIANTS = ("new", "old", "direct")
_VARIANT = os.environ.get("COLREDUCE_KVPRUNE_LAUNCH") or DEFAULT_VARIANT
if _VARIANT not in _VARIANTS:
    raise ValueError(f"COLREDUCE_KVPRUNE_LAUNCH must be 'new', 'old' or 'direct', got {_VARIANT!r}")


def set_launch_variant(variant: str) -> None:
    """"new", "old" or "direct" (see _VARIANT). For benchmarks and tests; results agree to rounding either way
    ("direct" is "new" with the compiled kernels launched directly: bitwise the same results)."""
    global _VARIANT
    if variant not in _VARIANTS:
        raise ValueError(f"launch variant must be 'new', 'old' or 'direct', got {variant!r}")
    _VARIANT = variant


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"   # read once, as Triton reads it when it decorates kernels


def _interpreting() -> bool:
    """Whether Triton runs this module's kernels in its interpreter (TRITON_INTERPRET=1 at import). A constant read
    at import: os.environ.get costs about a microsecond per call, and every launch asks."""
    return _INTERPRET


# The row pass of long prompts (more than _WINDOW_M queries) reads its key tiles through a tensor descriptor
# (Hopper's TMA copies, tracked by mbarriers, instead of per-thread loads) where that is possible: dense or varlen K
# (not paged) in row-major order with 16-byte aligned base and strides, on a GPU of compute capability ≥ 9 (and
# under the interpreter, so CPU tests cover it). H200, twenty-first session: benchmarks/row_pass.py's fixed-offset
# row pass 2.12–2.16 vs 2.32 ms at full causal 32/8 16k (same run); the product's row kernel under Nsight Compute
# (separate runs) 0.58× SDPA's forward there vs 0.60–0.61× with pointer loads, but at a 64-query window over 128k
# keys 0.95× vs 0.90× of the window column kernel (158 vs 151 µs) — so windows keep the pointer loads.
# Off by default since the twenty-second session: the product with and without it, alternated in one run on the
# H200 (benchmarks/tma_ab.py, ws_ab.py; two runs), took the same GPU time within ±1% at full causal 2k–8k and
# 1–2% more on a varlen batch (4k + 8k), with 30–40 µs more host time per call (the descriptor's construction);
# only 16k was sometimes faster, within that shape's ±8% spread, and on sm_90 colreduce_ws.py's row pass takes the
# long causal prompts now. COLREDUCE_KVPRUNE_TMA=1 turns it on (tests cover both).
K_TMA = os.environ.get("COLREDUCE_KVPRUNE_TMA", "0") == "1"
_WINDOW_M = 128               # query windows up to this many rows: the window column kernel, the row pass's own loads


# The row pass of long causal prompts on sm_90: colreduce_ws.py's warp-specialised Gluon kernel (a TMA producer warp,
# two consumer warp groups), where the launch allows it (_ws_row) and q and k have a layout its descriptors read
# (colreduce_ws._matrix); rows whose fixed offset overflowed there are recomputed by _row_stats_kernel's REDO launch.
# COLREDUCE_KVPRUNE_WS=0 turns it off. H200, twenty-second session: the row pass alone 2.02 / 0.52 / 0.16 ms at full
# causal 32/8 16k / 8k / 4k against 2.27 / 0.61 / 0.19 for row_pass.py's Triton replica with TMA; the product's
# whole call (benchmarks/ws_ab.py, same run) 3% less at 8k, 1% at 4k, 8% on a varlen batch of 4k + 8k, 16k within
# its ±8% spread, with 40–70 µs more host time per call. _WS_MIN_M: 2k was 9% faster on the GPU there but its
# host time (146 µs) passed its GPU time (124 µs).
K_WS = os.environ.get("COLREDUCE_KVPRUNE_WS", "1") != "0"
_WS_MIN_M = 4096
_WS_TRITON = ("3.6.", "3.7.")     # the Triton releases it was compiled (CPU) and run (3.6, the H200's image) with

# Windows whose kv group has few query rows against the head dimension: the row pass also stores its scores (fp32),
# and the column values come from them (_saved_column_kernel) instead of a second read of K — one read of K plus
# the scores written and read once, where the scores' bytes per key (G·M·4) are at most 1/_SAVE_RATIO of K's
# (D · its element size): windows of 1–4 queries at GQA 4, D 128, fp16/bf16. The scores of a call take at most
# _SAVE_MAX_BYTES of scratch, counted over B · max_seqlen_k key positions (a paged batch's are padded to its longest
# prompt, so a ragged batch's scores could pass a quarter of its real keys' bytes): one 128k prompt at window 1–4,
# GQA 32/8, fits. COLREDUCE_KVPRUNE_SAVED=0 turns it off (set_saved_scores for benchmarks).
SAVE_SCORES = os.environ.get("COLREDUCE_KVPRUNE_SAVED", "1") != "0"
_SAVE_RATIO = 4
_SAVE_MAX_BYTES = 64 << 20


def _save_scores(G: int, max_m: int, D: int, dtype: torch.dtype, positions: int) -> bool:
    """Whether a window's row pass saves its scores for the column pass (SAVE_SCORES, the bounds above): positions =
    B · max_seqlen_k key positions, each with the scores of G·max_m rows per kv head (× Hkv: pass positions · Hkv)."""
    return (SAVE_SCORES and G * max_m * 4 * _SAVE_RATIO <= D * dtype.itemsize
            and positions * G * max_m * 4 <= _SAVE_MAX_BYTES)


# Both passes of a short window in one cooperative launch (_fused_window_kernel) wherever _fused_tiles allows it: on
# by default on GPUs since the thirty-second session's H200 run (benchmarks/fused_ab.py: faster in GPU time than the
# two passes at all 12 shapes where it applies, 7–41%). Off under the interpreter unless asked for: there it runs as
# two launches anyway, and the CPU tests of the default path keep covering the two passes, which GPUs still run for
# float32 and longer prompts. COLREDUCE_KVPRUNE_FUSED=0/1 overrides; set_fused_windows for benchmarks; a config's
# FUSED asks for it in one call.
FUSED_WINDOWS = os.environ.get("COLREDUCE_KVPRUNE_FUSED", "0" if _INTERPRET else "1") == "1"


def set_fused_windows(on: bool) -> None:
    """FUSED_WINDOWS on or off for later calls; cached recipes and launchers dropped."""
    global FUSED_WINDOWS
    FUSED_WINDOWS = bool(on)
    _cached_recipe.cache_clear()
    _direct_launchers.clear()


def _fused_refused(device: torch.device, err: RuntimeError) -> None:
    """The driver refused the one-launch window kernel's cooperative grid: FUSED_WINDOWS off from now on, said once."""
    warnings.warn(f"colreduce_kvprune: the one-launch window kernel's cooperative launch was refused on {device} "
                  f"({err}); short windows take the two passes from now on (COLREDUCE_KVPRUNE_FUSED=0 skips the "
                  "attempt)", RuntimeWarning, stacklevel=3)
    set_fused_windows(False)


def set_saved_scores(on: bool) -> None:
    """SAVE_SCORES on or off for later calls (benchmarks: both in one run); cached recipes and launchers dropped."""
    global SAVE_SCORES
    SAVE_SCORES = bool(on)
    _cached_recipe.cache_clear()
    _direct_launchers.clear()


@functools.lru_cache(maxsize=None)
def _ws_device(device_index: int) -> bool:
    """Hopper (wgmma and setmaxnreg: sm_90 only, not Blackwell's sm_100) and a Triton whose Gluon it was built on."""
    if torch.cuda.get_device_capability(device_index) != (9, 0) or not triton.__version__.startswith(_WS_TRITON):
        return False
    try:
        from . import colreduce_ws  # noqa: F401
    except Exception:  # noqa: BLE001 (no Gluon in this Triton: the Triton row pass)
        return False
    return True


def _ws_row(paged: bool, is_causal: bool, max_m: int, dtype: torch.dtype, D: int, dev: int) -> bool:
    """Whether the row pass of a launch with no lse given can be colreduce_ws.py's: causal, at least _WS_MIN_M
    queries, K not paged, fp16/bf16, D 64 or 128, on sm_90 (dev -1: the interpreter). It is where the recipe also
    has one split (the row pass writes the lse itself) and q and k's layout allows the descriptors."""
    return (K_WS and is_causal and not paged and max_m >= _WS_MIN_M and D in (64, 128)
            and dtype in (torch.float16, torch.bfloat16) and dev >= 0 and _ws_device(dev))


def _ws_launch(q, k, lse2, cu_q, cu_k, max_m: int, max_n: int, B: int, qk_scale: float, varlen: bool) -> bool:
    """colreduce_ws.launch: the row lse2 into lse2, False (nothing launched) where the layout does not allow it."""
    from . import colreduce_ws
    return colreduce_ws.launch(q, k, lse2, cu_q, cu_k, max_m, max_n, B, qk_scale, varlen)


def _ws_direct(q, k, lse2, cu_q, cu_k, varlen: bool):
    """colreduce_ws.direct_launcher: the Gluon row pass's launcher for the direct path, or None."""
    from . import colreduce_ws
    return colreduce_ws.direct_launcher(q, k, lse2, cu_q, cu_k, varlen)


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _row_tma_shape(paged: bool, max_m: int, lse_given: bool) -> bool:
    """The launch's side of _k_tma: K_TMA on, a row pass (no lse given) over more than _WINDOW_M queries, K not
    paged."""
    return K_TMA and not lse_given and not paged and max_m > _WINDOW_M


def _k_tma(k: torch.Tensor, paged: bool, dev: int, max_m: int, lse_given: bool = False) -> bool:
    """Whether the row pass reads k through a tensor descriptor (see K_TMA): _row_tma_shape, a GPU with TMA, and k
    row-major with 16-byte aligned base and strides. dev: -1 under the interpreter."""
    if not _row_tma_shape(paged, max_m, lse_given) or (dev >= 0 and not _has_tma(dev)):
        return False
    st, es = k.stride(), k.element_size()
    return (k.data_ptr() % 16 == 0 and st[-1] == 1 and all(x * es % 16 == 0 for x in st[:-1])
            and all(st[i] >= st[i + 1] * k.shape[i + 1] for i in range(k.dim() - 1)))


def _k_box(row_kw: dict, varlen: bool) -> list:
    """The box (one key tile) of the row pass's descriptor of k: [BLOCK_N, 1, BLOCK_D] of varlen (total_k, Hkv, D),
    [1, 1, BLOCK_N, BLOCK_D] of dense (B, Hkv, N, D)."""
    if varlen:
        return [row_kw["BLOCK_N"], 1, row_kw["BLOCK_D"]]
    return [1, 1, row_kw["BLOCK_N"], row_kw["BLOCK_D"]]


def _k_descriptor(k: torch.Tensor, box: list):
    """The row pass's descriptor of k with this box (_k_box); TMA fills zeros past each dimension's end."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(k, list(k.shape), list(k.stride()), box)


# Programmatic dependent launch (a config's PDL, off unless a config asks for it; sm_90 and later, not under the
# interpreter): the row pass lets the column kernel launch as soon as every row program has started
# (gdc_launch_dependents at its start), and the column kernel, launched with launch_pdl, does what needs no row-pass
# output (its sequence bounds, its key tile) before it waits for the row pass to finish and flush (gdc_wait). So the
# column pass's launch and prologue overlap the row pass's last programs instead of following them. Only where the
# row pass is the launch before the column pass (no lse given).
@triton.jit
def _pdl_trigger(PDL: tl.constexpr):
    """The row pass: its dependents (the column pass) may launch once every program got here."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """The column pass: wait for the row pass to finish, its writes visible, before reading them."""
    if PDL:
        gdc_wait()


@triton.jit
def _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN: tl.constexpr, IS_PAGED: tl.constexpr):
    """(first query token, query count, first key token, key count) of sequence b.

    Paged: cu_k holds each sequence's key count, and keys are addressed by position (first key token 0)."""
    if IS_VARLEN:
        q0 = tl.load(cu_q + b)
        if IS_PAGED:
            return q0, tl.load(cu_q + b + 1) - q0, 0, tl.load(cu_k + b)
        else:
            k0 = tl.load(cu_k + b)
            return q0, tl.load(cu_q + b + 1) - q0, k0, tl.load(cu_k + b + 1) - k0
    else:
        return 0, max_m, 0, max_n


@triton.jit
def _key_rows(BT, sbt, b, n0, hi, k0, skb, skn, skblk, IS_PAGED: tl.constexpr, PAGE: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Offsets of the key rows of the tile n0 … n0 + BLOCK_N − 1 of sequence b (to add to K + kv_head · skh); n0 a
    multiple of BLOCK_N (every caller's tiles are). hi: a paged K's table is read below it (the sequence's key count,
    or max_n where the table is known to hold that many: _column_program).

    Dense/varlen: row k0 + n of batch b. Paged: slot n % PAGE of cache block block_table[b, n // PAGE], computed from
    the tile's first page where PAGE divides BLOCK_N (the tile's BLOCK_N / PAGE table entries loaded as one vector
    and broadcast over their pages' keys; key j at slot j % PAGE, a constant per thread) or BLOCK_N divides PAGE (one
    table entry for the tile), each key's own otherwise. Compiled for sm_90 (Triton 3.7.1, paged window 64, 32/8,
    16-key blocks, the JIT's alignment specialisation), the row pass's unmasked loop over key tiles took 456
    instructions per tile with each key's page and slot computed from its position (a table entry loaded from
    shared memory per key and thread), 375 with j // PAGE pages on, 357 this way; a packed K's 311. The broadcast
    is of the block ids, before their product with skblk: reshaping the offsets instead lost their alignment to
    Triton's analysis and with it the vector loads and the pipelining."""
    j = tl.arange(0, BLOCK_N)
    if IS_PAGED:
        if BLOCK_N % PAGE == 0:
            pg = tl.arange(0, BLOCK_N // PAGE)
            blk = tl.load(BT + b * sbt + n0 // PAGE + pg, mask=n0 + pg * PAGE < hi, other=0)
            blk = tl.reshape(tl.broadcast_to(blk[:, None], [BLOCK_N // PAGE, PAGE]), [BLOCK_N])
            return blk.to(tl.int64) * skblk + (j % PAGE) * skn
        elif PAGE % BLOCK_N == 0:
            blk = tl.load(BT + b * sbt + n0 // PAGE, mask=n0 < hi, other=0).to(tl.int64)
            return blk * skblk + (n0 % PAGE + j) * skn
        else:
            n = n0 + j
            blk = tl.load(BT + b * sbt + n // PAGE, mask=n < hi, other=0).to(tl.int64)
            return blk * skblk + (n % PAGE) * skn
    else:
        return b * skb + (k0 + n0 + j) * skn


@triton.jit
def _row_scores(q, K_head, BT, sbt, b, k0, skb, skn, skblk, n0, m, shift, hi, qk_scale, d, D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                IS_PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, K_desc, hk,
                K_TMA: tl.constexpr, IS_VARLEN: tl.constexpr, x_row, x_ok, x_key0, x_kstride, SAVE: tl.constexpr):
    """Scaled scores (log2 units) of BLOCK_R rows against the key tile [n0, n0 + BLOCK_N); MASKED: -inf where a row
    does not see a key (past hi, or causally after the row). K_TMA: the tile through the tensor descriptor K_desc
    (_k_descriptor; not paged), which pads with zeros past the last key and past D; a varlen tile's keys past the
    sequence's are the next sequence's, masked like every key ≥ hi.
    SAVE: the scores are also stored, row r's score of key n at x_row[r] + (x_key0 + n)·x_kstride (rows x_ok, keys
    below hi; _saved_scores), for _saved_column_kernel."""
    n = n0 + tl.arange(0, BLOCK_N)
    if K_TMA:
        if IS_VARLEN:                                 # (total_k, Hkv, D), a box of [BLOCK_N, 1, BLOCK_D]
            box = K_desc.load([k0 + n0, hk, 0])
        else:                                         # (B, Hkv, N, D), a box of [1, 1, BLOCK_N, BLOCK_D]
            box = K_desc.load([b, hk, n0, 0])
        kt = tl.reshape(box, [BLOCK_N, d.shape[0]]).T
    else:
        rows = _key_rows(BT, sbt, b, n0, hi, k0, skb, skn, skblk, IS_PAGED, PAGE, BLOCK_N)
        ok = d[:, None] < D
        if MASKED:
            ok = ok & (n[None, :] < hi)
        kt = tl.load(K_head + rows[None, :] + d[:, None], mask=ok, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = n[None, :] < hi
        if IS_CAUSAL:
            visible = visible & (n[None, :] <= m[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
    if SAVE:
        tl.store(x_row[:, None] + (x_key0 + n).to(tl.int64)[None, :] * x_kstride, s,
                 mask=x_ok[:, None] & (n[None, :] < hi))
    return s


@triton.jit
def _running_max_step(m_i, l_i, s):
    """One key tile of the running-max row statistics: (max, sum of exp2(s − max)) of the rows so far and tile s."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows that have seen nothing yet (masked tiles)
    return m_new, l_i * tl.exp2(m_i - m_sub) + tl.sum(tl.exp2(s - m_sub[:, None]), 1)


@triton.jit
def _online_row_stats(q, K_head, BT, sbt, b, k0, skb, skn, skblk, lo, full_end, m, shift, hi, qk_scale, d,
                      D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      IS_PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                      K_desc, hk, K_TMA: tl.constexpr, IS_VARLEN: tl.constexpr, x_row, x_ok, x_key0, x_kstride,
                      SAVE: tl.constexpr):
    """(max, sum of exp2(s − max)) of BLOCK_R rows over the keys [lo, hi) with a running max, rescaled per tile:
    exact for any scores (-inf and 0 for a row that sees none of them)."""
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for n0 in range(lo, full_end, BLOCK_N):           # tiles every row sees whole: no masks
        s = _row_scores(q, K_head, BT, sbt, b, k0, skb, skn, skblk, n0, m, shift, hi, qk_scale, d, D, UPCAST,
                        DOT_PRECISION, False, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_N, K_desc, hk, K_TMA, IS_VARLEN,
                        x_row, x_ok, x_key0, x_kstride, SAVE)
        m_i, l_i = _running_max_step(m_i, l_i, s)
    for n0 in range(full_end, hi, BLOCK_N):           # the diagonal and the ragged end
        s = _row_scores(q, K_head, BT, sbt, b, k0, skb, skn, skblk, n0, m, shift, hi, qk_scale, d, D, UPCAST,
                        DOT_PRECISION, True, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_N, K_desc, hk, K_TMA, IS_VARLEN,
                        x_row, x_ok, x_key0, x_kstride, SAVE)
        m_i, l_i = _running_max_step(m_i, l_i, s)
    return m_i, l_i


@triton.jit
def _fixed_offset_row_stats(q, K_head, BT, sbt, b, k0, skb, skn, skblk, lo, full_end, m, shift, hi, qk_scale, d,
                            D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            IS_CAUSAL: tl.constexpr, IS_PAGED: tl.constexpr, PAGE: tl.constexpr,
                            BLOCK_N: tl.constexpr, K_desc, hk, K_TMA: tl.constexpr, IS_VARLEN: tl.constexpr,
                            x_row, x_ok, x_key0, x_kstride, SAVE: tl.constexpr):
    """(c, sum of exp2(s − c)) of BLOCK_R rows over the keys [lo, hi) with ONE offset c per row instead of a running
    max: c = the max of the row's scores in the first key tile [lo, lo + BLOCK_N) + 8, and the exp2 terms summed
    into a BLOCK_R × BLOCK_N accumulator, reduced once at the end. Per score one subtraction, one exp2 and one add:
    no per-tile row max, row sum or rescale (the running-max loop's extra work; the H200's row_pass.json,
    nineteenth session: 15% less time at full causal 16k).

    Exact where no term overflows: a row that sees any key of [lo, hi) sees key lo (causal rows see a prefix of the
    keys, others all of them), so c − 8 is one of the row's scores and the row's sum is at least 2^-8; terms that
    underflow to 0 are below 2^-118 of it. A score more than 127 + 8 above c − 8 makes its row's sum +inf: the
    caller checks for that and recomputes the row block with the running max. (-inf and 0 for a row that sees no
    key of [lo, hi).)"""
    s = _row_scores(q, K_head, BT, sbt, b, k0, skb, skn, skblk, lo, m, shift, hi, qk_scale, d, D, UPCAST,
                    DOT_PRECISION, True, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_N, K_desc, hk, K_TMA, IS_VARLEN,
                    x_row, x_ok, x_key0, x_kstride, SAVE)
    first = tl.max(s, 1)
    c = tl.where(first == float("-inf"), 0.0, first) + 8.0
    acc = tl.exp2(s - c[:, None])
    for n0 in range(lo + BLOCK_N, full_end, BLOCK_N):    # tiles every row sees whole: no masks
        s = _row_scores(q, K_head, BT, sbt, b, k0, skb, skn, skblk, n0, m, shift, hi, qk_scale, d, D, UPCAST,
                        DOT_PRECISION, False, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_N, K_desc, hk, K_TMA, IS_VARLEN,
                        x_row, x_ok, x_key0, x_kstride, SAVE)
        acc += tl.exp2(s - c[:, None])
    for n0 in range(tl.maximum(full_end, lo + BLOCK_N), hi, BLOCK_N):    # the diagonal and the ragged end
        s = _row_scores(q, K_head, BT, sbt, b, k0, skb, skn, skblk, n0, m, shift, hi, qk_scale, d, D, UPCAST,
                        DOT_PRECISION, True, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_N, K_desc, hk, K_TMA, IS_VARLEN,
                        x_row, x_ok, x_key0, x_kstride, SAVE)
        acc += tl.exp2(s - c[:, None])
    l_i = tl.sum(acc, 1)
    return tl.where(l_i == 0, float("-inf"), c), l_i


@triton.jit
def _saved_scores(X, b, hk, k0, g, m, max_m, max_n, HKV: tl.constexpr, G: tl.constexpr, IS_VARLEN: tl.constexpr,
                  IS_PAGED: tl.constexpr):
    """Where the saved scores (SAVE) of the rows (g, m) of sequence b × kv head hk lie in X: (row pointers x_row,
    first key position x_key0, key stride x_kstride) — the score of row (g, m) and key n at x_row + (x_key0 + n) ·
    x_kstride. X is [key position, kv head, G·max_m row slots] in float32, the key position b·max_n + n for dense
    and paged keys (B·max_n positions), k0 + n for packed varlen keys (total_k positions); slot g·max_m + m."""
    rp = G * max_m
    if IS_VARLEN and not IS_PAGED:
        x_key0 = k0
    else:
        x_key0 = b.to(tl.int64) * max_n
    return X + hk * rp + g * max_m + m, x_key0, HKV * rp


@triton.jit
def _row_stats_kernel(Q, K, K_desc, BT, cu_q, cu_k, M_part, L_part, LSE2, Counter, X,
                      sqb, sqh, sqm, skb, skh, skn, skblk, sbt,
                      spp, sph, max_m, max_n, split_len, S, qk_scale,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      IS_VARLEN: tl.constexpr, IS_PAGED: tl.constexpr, PAGE: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, FINAL: tl.constexpr, COMBINE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_TMA: tl.constexpr,
                      REDO: tl.constexpr, SAVE: tl.constexpr, PDL: tl.constexpr):
    """Partial (offset, sum of exp2(s − offset)) of each query row over one split of the keys, rows of all G heads
    together: the offset is the row's first-tile max + 8 (_fixed_offset_row_stats), or its max when a term overflowed
    and the row block ran again with a running max (_online_row_stats); combines treat either as a max.

    Writes M_part/L_part[split, b·Hq + h, m] (log2 domain; -inf and 0 for a row that saw no key). FINAL (one split
    only): writes the row log-sum-exp (log2 domain, +inf for a row that saw no key) to M_part instead.
    COMBINE (S > 1 splits): the last of the S programs of a (row block, sequence × kv head) to finish, counted in
    Counter (int32 per such pair, zero before the launch and reset to zero by that program), combines the splits'
    partials of its rows into LSE2[b·Hq + h, m] (_combine_splits), so no separate combine launch is needed.
    REDO (with FINAL, after colreduce_ws.py's row pass wrote M_part): a program whose rows hold a NaN (that pass's
    fixed offset overflowed) recomputes them with the running max; the others load nothing more.
    SAVE (one row block holds the group's rows): every score the program computes is also stored to X
    (_saved_scores), so that the column values come from them (_saved_column_kernel) instead of a second read of K.
    PDL: the column kernel may launch once every program of this one has started (_pdl_trigger).
    """
    _pdl_trigger(PDL)
    split = tl.program_id(0)
    rb = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    q0, Mb, k0, Nb = _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN, IS_PAGED)
    R = G * Mb
    r0 = rb * BLOCK_R
    if r0 >= R:
        return
    r = r0 + tl.arange(0, BLOCK_R)
    r_ok = r < R
    g = r // Mb
    m = r % Mb
    d = tl.arange(0, BLOCK_D)
    K_head = K + hk * skh
    shift = Nb - Mb                                   # query m sees key j iff j <= m + shift
    lo = split * split_len
    hi = tl.minimum(lo + split_len, Nb)
    full_hi = hi
    if IS_CAUSAL:
        r_last = tl.minimum(r0 + BLOCK_R, R) - 1
        spans_heads = r_last // Mb > r0 // Mb
        m_first = tl.where(spans_heads, 0, r0 % Mb)
        m_last = tl.where(spans_heads, Mb - 1, r_last % Mb)
        hi = tl.minimum(hi, m_last + shift + 1)
        full_hi = tl.minimum(hi, m_first + shift + 1)
    full_end = lo + tl.maximum(full_hi - lo, 0) // BLOCK_N * BLOCK_N
    row = (b * HKV * G + hk * G + g) * sph + m
    out = split * spp + row
    x_row, x_key0, x_kstride = _saved_scores(X, b, hk, k0, g, m, max_m, max_n, HKV, G, IS_VARLEN, IS_PAGED)
    q_ptrs = Q + b * sqb + (hk * G + g)[:, None] * sqh + (q0 + m)[:, None] * sqm + d[None, :]
    q_mask = r_ok[:, None] & (d[None, :] < D)
    if REDO:
        prev = tl.load(M_part + out, mask=r_ok, other=0.0)
        if tl.max((prev != prev).to(tl.int32), 0) > 0:
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            m_i, l_i = _online_row_stats(q, K_head, BT, sbt, b, k0, skb, skn, skblk, lo, full_end, m, shift, hi,
                                         qk_scale, d, D, UPCAST, DOT_PRECISION, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_R,
                                         BLOCK_N, K_desc, hk, K_TMA, IS_VARLEN, x_row, r_ok, x_key0, x_kstride,
                                         SAVE)
            tl.store(M_part + out, _row_lse(m_i, l_i), mask=r_ok)
    else:      # (no early return: the compiler rejects one inside a constexpr branch)
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i, l_i = _fixed_offset_row_stats(q, K_head, BT, sbt, b, k0, skb, skn, skblk, lo, full_end, m, shift, hi,
                                           qk_scale, d, D, UPCAST, DOT_PRECISION, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_N,
                                           K_desc, hk, K_TMA, IS_VARLEN, x_row, r_ok, x_key0, x_kstride, SAVE)
        if tl.max(l_i, 0) == float("inf"):                # a term overflowed: this row block again with a running max
            m_i, l_i = _online_row_stats(q, K_head, BT, sbt, b, k0, skb, skn, skblk, lo, full_end, m, shift, hi,
                                         qk_scale, d, D, UPCAST, DOT_PRECISION, IS_CAUSAL, IS_PAGED, PAGE, BLOCK_R,
                                         BLOCK_N, K_desc, hk, K_TMA, IS_VARLEN, x_row, r_ok, x_key0, x_kstride,
                                         SAVE)
        if FINAL:
            tl.store(M_part + out, _row_lse(m_i, l_i), mask=r_ok)
        else:
            tl.store(M_part + out, m_i, mask=r_ok)
            tl.store(L_part + out, l_i, mask=r_ok)
            if COMBINE:
                # every thread's partials written, then one release-acquire count per program: the program that
                # counts last sees the other programs' partials (the threadfence reduction)
                tl.debug_barrier()
                slot = Counter + rb * tl.num_programs(2) + bh
                if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == S - 1:
                    tl.debug_barrier()
                    tl.store(LSE2 + row, _combine_splits(M_part, L_part, row, r_ok, spp, S), mask=r_ok)
                    tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")       # ready for the next launch


@triton.jit
def _row_lse(m_max, total):
    """log2-domain log-sum-exp from a row's max and its sum of exp2(s − max); +inf where the row saw no key."""
    return tl.where(total == 0, float("inf"), m_max + tl.log2(total))


@triton.jit
def _combine_splits(M_part, L_part, i, ok, spp, S):
    """log2-domain log-sum-exp of rows i from their S partials (M_part/L_part[s, i]), the splits combined in a fixed
    order (deterministic); +inf for a row that saw no key; NaN stays NaN. The loads bypass L1 (".cg"): other
    programs wrote these partials during this launch."""
    m_max = tl.full(i.shape, float("-inf"), tl.float32)
    for s in range(S):
        m_max = tl.maximum(m_max, tl.load(M_part + s * spp + i, mask=ok, other=float("-inf"), cache_modifier=".cg"),
                           propagate_nan=tl.PropagateNan.ALL)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.zeros(i.shape, tl.float32)
    for s in range(S):
        mp = tl.load(M_part + s * spp + i, mask=ok, other=float("-inf"), cache_modifier=".cg")
        lp = tl.load(L_part + s * spp + i, mask=ok, other=0.0, cache_modifier=".cg")
        total += lp * tl.exp2(mp - m_max)
    return _row_lse(m_max, total)


@triton.jit
def _column_program(cu_q, cu_k, BT, sbt, skb, skn, skblk, max_m, max_n, HKV: tl.constexpr,
                    IS_VARLEN: tl.constexpr, IS_PAGED: tl.constexpr, PAGE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HS: tl.constexpr = 1):
    """What a column-pass program (key tile program_id(0), sequence × kv head program_id(1)) works on: b, hk, the
    sequence bounds (q0, Mb, k0, Nb), shift = Nb − Mb, m_lo (first query block that sees any of its key columns),
    m_full (first query block that sees all of them; blocks in [m_lo, m_full) need the causal mask; both 0 when not
    causal), its key positions n (BLOCK_N,), which are in range, and their row offsets in K."""
    b = tl.program_id(1) // HS // HKV                 # HS: programs per kv head (head split, long kernel)
    hk = tl.program_id(1) // HS % HKV
    n_first = tl.program_id(0) * BLOCK_N
    q0, Mb, k0, Nb = _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN, IS_PAGED)
    shift = Nb - Mb
    m_lo = 0
    m_full = 0
    if IS_CAUSAL:
        m_lo = tl.maximum(n_first - shift, 0) // BLOCK_M * BLOCK_M
        m_full = tl.maximum(m_lo, tl.minimum(n_first + BLOCK_N - 1 - shift, Mb))
        m_full = tl.minimum((m_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, tl.maximum(Mb, m_lo))
    n = n_first + tl.arange(0, BLOCK_N)
    n_ok = n < Nb
    # a paged K's table entries read up to max_n (colreduce_paged checks that the table holds that many: no wait for
    # the sequence's key count before them); the keys themselves below Nb
    rows = _key_rows(BT, sbt, b, n_first, max_n, k0, skb, skn, skblk, IS_PAGED, PAGE, BLOCK_N)
    return b, hk, q0, Mb, k0, Nb, shift, m_lo, m_full, n, n_ok, rows


@triton.jit
def _column_counts(n, shift, Mb, IS_CAUSAL: tl.constexpr):
    """Number of query rows that see each key column n (the divisor of the mean)."""
    if IS_CAUSAL:
        return tl.minimum(tl.maximum(Mb - tl.maximum(n - shift, 0), 0), Mb)
    else:
        return tl.zeros_like(n) + Mb


@triton.jit
def _load_lse2(LSE_head, m, m_ok, slm, LSE_NATURAL: tl.constexpr):
    """Row log-sum-exp in log2 units of the rows m, +inf for absent rows and rows that see no key.

    LSE_NATURAL: the caller's natural-log lse (-inf for a row that sees no key), converted here as the launcher
    did with torch before (lse·log2(e) in float32, -inf → +inf)."""
    if LSE_NATURAL:
        lse2 = tl.load(LSE_head + m * slm, mask=m_ok, other=float("inf")).to(tl.float32) * _LOG2E
        return tl.where(lse2 == float("-inf"), float("inf"), lse2)
    else:
        return tl.load(LSE_head + m * slm, mask=m_ok, other=float("inf"))


@triton.jit
def _window_tile(k, Q_head, LSE_head, ms, n, shift, sqm, slm, qk_scale, Mb, d, D: tl.constexpr,
                 REDUCTION: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASKED: tl.constexpr, LSE_NATURAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(BLOCK_N,) sum (or max) of exp2(k·qᵀ·scale − lse) over the query rows [ms, ms + BLOCK_M).

    The tile is k·qᵀ (keys on rows), so the reduction over queries stays within each row's warp."""
    m = ms + tl.arange(0, BLOCK_M)
    m_ok = m < Mb
    qt = tl.load(Q_head + m[None, :] * sqm + d[:, None], mask=m_ok[None, :] & (d[:, None] < D), other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
    lse2 = _load_lse2(LSE_head, m, m_ok, slm, LSE_NATURAL)      # absent rows give exp2(-inf) = 0
    p = tl.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
    if MASKED:
        p = tl.where(n[:, None] <= m[None, :] + shift, p, 0.0)
    if REDUCTION == 2:
        return tl.max(p, 1)
    else:
        return tl.sum(p, 1)


@triton.jit
def _live_columns(n, n_ok, Nb, Mb, m_lo, m_full, max_n, IS_PAGED: tl.constexpr, BLOCK_N: tl.constexpr):
    """(Mb, m_lo, m_full, columns to store) of a column-pass program that did not return early.

    Paged outputs are padded to max_n and the launcher does not clear them (no memset launch): every program
    stores its columns below max_n, and a program past its sequence's keys runs no query rows (Mb = 0) and stores
    zeros. Dense and varlen outputs hold only real keys: those programs returned, and the stores are the keys'."""
    if IS_PAGED:
        live = tl.program_id(0) * BLOCK_N < Nb
        return tl.where(live, Mb, 0), tl.where(live, m_lo, 0), tl.where(live, m_full, 0), _stored_columns(
            n, n_ok, max_n, IS_PAGED)
    else:
        return Mb, m_lo, m_full, _stored_columns(n, n_ok, max_n, IS_PAGED)


@triton.jit
def _stored_columns(n, n_ok, max_n, IS_PAGED: tl.constexpr):
    """Which of the columns n a program stores: paged outputs are padded to max_n (the padding gets zeros, see
    _padded), dense and varlen outputs hold only the sequence's keys (n_ok)."""
    if IS_PAGED:
        return n < max_n
    else:
        return n_ok


@triton.jit
def _padded(v, n_ok, IS_PAGED: tl.constexpr):
    """v with 0 in the columns past the sequence's keys (paged: they are stored too, see _live_columns)."""
    if IS_PAGED:
        return tl.where(n_ok, v, 0.0)
    else:
        return v


@triton.jit
def _window_blocks(cols, k, Q_group, LSE_group, m0, nb, gi, n, shift, sqh, slh, sqm, slm, qk_scale, Mb, d,
                   G: tl.constexpr, D: tl.constexpr, REDUCTION: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, LSE_NATURAL: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """cols (BLOCK_N, GP) with the G heads' query blocks m0, m0 + BLOCK_M, … (nb a head) added (or max'ed) in, one
    flat loop over (head, query block) pairs so the compiler can prefetch the next head's queries."""
    for it in range(0, G * nb):
        g = it // nb
        col = _window_tile(k, Q_group + g * sqh, LSE_group + g * slh, m0 + (it % nb) * BLOCK_M, n, shift, sqm, slm,
                           qk_scale, Mb, d, D, REDUCTION, UPCAST, DOT_PRECISION, MASKED, LSE_NATURAL, BLOCK_M)
        if REDUCTION == 2:
            cols = tl.where(gi[None, :] == g, tl.maximum(cols, col[:, None]), cols)
        else:
            cols = tl.where(gi[None, :] == g, cols + col[:, None], cols)
    return cols


@triton.jit
def _mean_by_count(v, count):
    """v divided by the count of queries that see each column (count broadcast to v's shape), 0 where none does."""
    return tl.where(count > 0, v / tl.maximum(count, 1).to(tl.float32), 0.0)


@triton.jit
def _reduce_rows(p, count, REDUCTION: tl.constexpr, AXIS: tl.constexpr = 0):
    """p's query rows (along AXIS) reduced: sum, max, or the mean over the count of queries that see each column
    (count broadcastable to the result; 0 where none does)."""
    if REDUCTION == 2:
        col = tl.max(p, AXIS)
    else:
        col = tl.sum(p, AXIS)
        if REDUCTION == 1:
            col = _mean_by_count(col, count)
    return col


@triton.jit
def _group_of(cols, g_ok, G: tl.constexpr, GROUP_REDUCE: tl.constexpr, AXIS: tl.constexpr):
    """The group's column values from its heads' (cols along AXIS, heads past G masked by g_ok): max, sum or mean."""
    if GROUP_REDUCE == 3:
        group = tl.max(tl.where(g_ok, cols, float("-inf")), AXIS)
    else:
        group = tl.sum(tl.where(g_ok, cols, 0.0), AXIS)
    return _group_mean(group, G, GROUP_REDUCE)


@triton.jit
def _group_mean(group, G: tl.constexpr, GROUP_REDUCE: tl.constexpr):
    """The group's sum divided by its G heads where the group combine is the mean (GROUP_REDUCE 2)."""
    if GROUP_REDUCE == 2:
        group = group / G
    return group


@triton.jit
def _group_rows(Mb, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """A kv group's rows as one tile of next_pow2(G) · BLOCK_M: (head in the group g, query m, in range) of row
    g·BLOCK_M + m (heads past G and queries past the sequence's Mb out of range)."""
    r = tl.arange(0, triton.next_power_of_2(G) * BLOCK_M)
    g = r // BLOCK_M
    m = r % BLOCK_M
    return g, m, (g < G) & (m < Mb)


@triton.jit
def _store_group_rows(p, count, Out, b, hk, k0, n, n_ok, n_out, sob, soh, son, G: tl.constexpr,
                      REDUCTION: tl.constexpr, GROUP_REDUCE: tl.constexpr, FUSE_HEADS: tl.constexpr,
                      IS_PAGED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Store the column values of p [GP·BLOCK_M, BLOCK_N], the rows of a kv group (row g·BLOCK_M + m: head g,
    query m), reduced over its queries (count: the mean's divisor per column) and combined over its heads: at once
    where the group's combine equals the rows' reduction (FUSE_HEADS), else per head over a [GP, BLOCK_M, BLOCK_N]
    view; per query head (GROUP_REDUCE 0) or per kv head."""
    GP: tl.constexpr = p.shape[0] // BLOCK_M
    gi = tl.arange(0, GP)
    if FUSE_HEADS:
        group = _group_mean(_reduce_rows(p, count, REDUCTION), G, GROUP_REDUCE)
        tl.store(Out + b * sob + hk * soh + (k0 + n) * son, _padded(group, n_ok, IS_PAGED), mask=n_out)
    else:
        cols = _reduce_rows(tl.reshape(p, [GP, BLOCK_M, p.shape[1]]), count[None, :], REDUCTION, 1)
        if GROUP_REDUCE == 0:
            tl.store(Out + b * sob + (hk * G + gi)[:, None] * soh + (k0 + n)[None, :] * son,
                     _padded(cols, n_ok[None, :], IS_PAGED), mask=n_out[None, :] & (gi[:, None] < G))
        else:
            group = _group_of(cols, gi[:, None] < G, G, GROUP_REDUCE, 0)
            tl.store(Out + b * sob + hk * soh + (k0 + n) * son, _padded(group, n_ok, IS_PAGED), mask=n_out)


@triton.jit
def _saved_column_kernel(X, LSE2, Out, cu_q, cu_k, sob, soh, son, max_m, max_n, qk_scale,
                         HKV: tl.constexpr, G: tl.constexpr, REDUCTION: tl.constexpr, GROUP_REDUCE: tl.constexpr,
                         FUSE_HEADS: tl.constexpr, IS_VARLEN: tl.constexpr, IS_PAGED: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PDL: tl.constexpr):
    """Column pass from the row pass's saved scores (SAVE; _saved_scores): p = exp2(x − lse2) of the group's rows
    and BLOCK_N key columns, reduced as the window kernels do, with no read of K and no dot. For windows whose
    group rows are few against the head dimension (_save_scores): their scores are written and read once in fp32
    at a fraction of K's bytes, where a second pass would read all of K again. LSE2: the row pass's lse (log2 units,
    (B, Hq, max_m), +inf for rows that see no key). Scores the row pass did not store (keys past a row's diagonal,
    beyond the sequence) are masked here. qk_scale: unused (the launchers pass it to every column kernel).
    Grid (cdiv(max_n, BLOCK_N), B·Hkv); paged outputs are padded to max_n with zeros."""
    b = tl.program_id(1) // HKV
    hk = tl.program_id(1) % HKV
    q0, Mb, k0, Nb = _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN, IS_PAGED)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Nb
    if not IS_PAGED:
        if tl.program_id(0) * BLOCK_N >= Nb:
            return
    n_out = _stored_columns(n, n_ok, max_n, IS_PAGED)
    g, m, r_ok = _group_rows(Mb, G, BLOCK_M)
    shift = Nb - Mb
    x_row, x_key0, x_kstride = _saved_scores(X, b, hk, k0, g, m, max_m, max_n, HKV, G, IS_VARLEN, IS_PAGED)
    seen = r_ok[:, None] & n_ok[None, :]
    if IS_CAUSAL:
        seen = seen & (n[None, :] <= m[:, None] + shift)
    _pdl_wait(PDL)                                    # the scores and lse are the row pass's
    x = tl.load(x_row[:, None] + (x_key0 + n).to(tl.int64)[None, :] * x_kstride, mask=seen, other=float("-inf"))
    lse2 = tl.load(LSE2 + (b * HKV * G + hk * G + g) * max_m + m, mask=r_ok, other=float("inf"))
    p = tl.exp2(x - lse2[:, None])                    # 0 where unseen (-inf) and for rows that see no key (+inf)
    _store_group_rows(p, _column_counts(n, shift, Mb, IS_CAUSAL), Out, b, hk, k0, n, n_ok, n_out, sob, soh, son, G,
                      REDUCTION, GROUP_REDUCE, FUSE_HEADS, IS_PAGED, BLOCK_M)


_MAX_SPINS = tl.constexpr(1 << 22)     # _fused_window_kernel's wait: polls before it gives up (seconds on a GPU)


@triton.jit
def _fused_window_kernel(Q, K, BT, M_part, L_part, Counter, Out, cu_q, cu_k,
                         sqb, sqh, sqm, skb, skh, skn, skblk, sbt, sob, soh, son, spp, max_m, max_n, qk_scale,
                         HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                         REDUCTION: tl.constexpr, GROUP_REDUCE: tl.constexpr, FUSE_HEADS: tl.constexpr,
                         IS_VARLEN: tl.constexpr, IS_PAGED: tl.constexpr, PAGE: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PHASE: tl.constexpr):
    """Both passes of a short window in one launch, one q·kᵀ per (query, key) pair (FUSED; _fused_tiles).

    Program (t, sequence × kv head) holds the group's rows (G heads × BLOCK_M queries, row g·BLOCK_M + m, as the
    persistent window pass) against key tile t and keeps e = exp2(s − o) of that tile in registers, o the tile's
    row max. It writes the tile's partial (o, Σ e) per row to M_part/L_part[t, b·Hq + h, m] (the row pass's
    partials with the key tiles as splits), waits until the T = num_programs(0) programs of its sequence × kv head
    have written theirs, combines them in tile order into the row lse (_combine_splits: deterministic) and reduces
    p = e · exp2(o − lse) over its rows as the saved-scores column pass does (_store_group_rows). So the keys are
    read once, each score is computed once, and there is no second launch: for the shapes where the two passes'
    launches and ramps are most of the time (windows over a few thousand keys).

    The wait: Counter[sequence × kv head] (int32, zero before the launch) counts each program once when its
    partials are written (release) and once when it has read the others' (acquire, spinning until T have
    arrived); the program that counts 2T − 1 sets it back to zero. Every program of the grid must be resident at
    once: the launcher launches it cooperatively (launch_cooperative_grid: the driver refuses a grid that cannot
    be) with at most one program per SM (_fused_tiles); should a program still wait after _MAX_SPINS polls, its
    columns are NaN rather than the GPU hanging. The interpreter runs programs one after another, so there
    PHASE 1 (partials) and PHASE 2 (the rest, the tile computed again) are two launches; PHASE 0 is both with the
    wait. Paged outputs are padded to max_n with zeros; programs past a sequence's keys count and store only that.
    """
    b, hk, q0, Mb, k0, Nb, shift, m_lo, m_full, n, n_ok, rows = _column_program(
        cu_q, cu_k, BT, sbt, skb, skn, skblk, max_m, max_n, HKV, IS_VARLEN, IS_PAGED, PAGE, IS_CAUSAL, BLOCK_M,
        BLOCK_N, 1)
    g, m, r_ok = _group_rows(Mb, G, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    h = hk * G + g
    q = tl.load(Q + b * sqb + h[:, None] * sqh + (q0 + m)[:, None] * sqm + d[None, :],
                mask=r_ok[:, None] & (d[None, :] < D), other=0.0)
    kt = tl.load(K + hk * skh + rows[None, :] + d[:, None], mask=n_ok[None, :] & (d[:, None] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    seen = r_ok[:, None] & n_ok[None, :]
    if IS_CAUSAL:
        seen = seen & (n[None, :] <= m[:, None] + shift)
    s = tl.where(seen, s, float("-inf"))
    o_t = tl.max(s, 1)                                # -inf for a row that sees no key of this tile
    o = tl.where(o_t == float("-inf"), 0.0, o_t)
    e = tl.exp2(s - o[:, None])                       # 0 where unseen
    row = (b * HKV * G + h) * max_m + m
    part = tl.program_id(0) * spp + row
    if PHASE != 2:
        tl.store(M_part + part, o_t, mask=r_ok)
        tl.store(L_part + part, tl.sum(e, 1), mask=r_ok)
    slot = Counter + tl.program_id(1)
    T = tl.num_programs(0)
    if PHASE == 0:
        # every thread's partials written, then one release per program; spin (acquire) until the T programs of
        # this sequence × kv head have counted (the threadfence reduction of the row pass's COMBINE, as a barrier)
        tl.debug_barrier()
        tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu")
        arrived = tl.atomic_add(slot, 0, sem="acquire", scope="gpu")
        spins = 0
        while (arrived < T) & (spins < _MAX_SPINS):
            arrived = tl.atomic_add(slot, 0, sem="acquire", scope="gpu")
            spins += 1
        tl.debug_barrier()
    if PHASE != 1:
        lse2 = _combine_splits(M_part, L_part, row, r_ok, spp, T)   # +inf for rows that see no key: p = 0
        if PHASE == 0:                                # gave up waiting (never, when all are resident): NaN, not a hang
            lse2 = tl.where(arrived < T, float("nan"), lse2)
        p = e * tl.exp2(o - lse2)[:, None]
        _store_group_rows(p, _column_counts(n, shift, Mb, IS_CAUSAL), Out, b, hk, k0, n, n_ok,
                          _stored_columns(n, n_ok, max_n, IS_PAGED), sob, soh, son, G, REDUCTION, GROUP_REDUCE,
                          FUSE_HEADS, IS_PAGED, BLOCK_M)
    if PHASE == 0:                                    # the last of the 2T counts: zero for the next launch
        if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == 2 * T - 1:
            tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")


@triton.jit
def _window_column_kernel(Q, K, BT, LSE2, Out, cu_q, cu_k,
                          sqb, sqh, sqm, skb, skh, skn, skblk, sbt, slb, slh, slm, lse_q0, sob, soh, son,
                          max_m, max_n, qk_scale,
                          HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                          REDUCTION: tl.constexpr, GROUP_REDUCE: tl.constexpr,
                          IS_VARLEN: tl.constexpr, IS_PAGED: tl.constexpr, PAGE: tl.constexpr,
                          IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, LSE_NATURAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          FUSE_HEADS: tl.constexpr, PERSISTENT: tl.constexpr, PDL: tl.constexpr):
    """Column pass for short query windows: reduce exp2(s − lse2) over the query rows of BLOCK_N key columns, for
    the G query heads of one kv head.

    The K tile stays in registers (the dot's A operand); one flat loop over (head, query block) pairs lets the
    compiler prefetch the next head's queries; each tile's rows are reduced at once into a (BLOCK_N, G) accumulator.
    LSE2: row log-sum-exp in log2 units, +inf for rows that see no key. Writes Out[b, head, n] (head = query head,
    or kv head when GROUP_REDUCE combines the group).

    PERSISTENT: the same result, summed in another order (FUSE_HEADS: the group's combine commutes with the rows'
    reduction, _fuse_heads).

    Program_id(0) of num_programs(0) = P takes a run of T = cdiv(cdiv(max_n, BLOCK_N), P) consecutive key tiles,
    pid·T … pid·T + T − 1, of one sequence × kv head (program_id(1)); in a packed or paged batch the runs past a
    sequence's keys are empty, so a long sequence gets more working programs than a short one and the GPU's
    scheduler evens them out (a stride over all P programs per sequence left the longest sequence's programs
    as the tail: +17% at 4 paged prompts of 8k–32k on the H200). It loads the group's rows once — G heads ×
    BLOCK_M queries (BLOCK_M ≥ the window), row r = g·BLOCK_M + m, one [GP·BLOCK_M, D] dot operand with its
    lse — and per key tile computes
    exp2(q·kᵀ·scale − lse) [GP·BLOCK_M, BLOCK_N] with one dot. The sum (or max) over the rows then gives the
    group's column values at once where the group combine commutes with the query reduction (sum/mean over queries
    with a group sum/mean; max with a group max), else per head over a [GP, BLOCK_M, BLOCK_N] view. The window
    kernel reads the group's queries again in every one of its (key tile × kv head) programs; here each program
    reads them once (the H200's serving sweep: 0.170 vs 0.222 ms at 32/8, W=64, N=128k with the lse given;
    benchmarks/results/h200_kernels, seventeenth session). Paged outputs are padded to max_n: a run's tiles
    past the sequence's keys get zeros (a second loop).
    """
    GP: tl.constexpr = triton.next_power_of_2(G)
    gi = tl.arange(0, GP)
    if PERSISTENT:
        b = tl.program_id(1) // HKV
        hk = tl.program_id(1) % HKV
        q0, Mb, k0, Nb = _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN, IS_PAGED)
        shift = Nb - Mb
        run = tl.cdiv(tl.cdiv(max_n, BLOCK_N), tl.num_programs(0))      # T key tiles per program
        t0 = tl.program_id(0) * run
        t_end = tl.minimum(t0 + run, tl.cdiv(max_n, BLOCK_N))
        t_keys = tl.minimum(t_end, tl.cdiv(Nb, BLOCK_N))                # the run's tiles that hold keys
        if IS_PAGED:                                      # the padding past the sequence's keys, up to max_n
            for t in range(tl.maximum(t0, t_keys), t_end):
                n = t * BLOCK_N + tl.arange(0, BLOCK_N)
                if GROUP_REDUCE == 0:
                    tl.store(Out + b * sob + (hk * G + gi)[:, None] * soh + n[None, :] * son,
                             tl.zeros([GP, BLOCK_N], tl.float32), mask=(n[None, :] < max_n) & (gi[:, None] < G))
                else:
                    tl.store(Out + b * sob + hk * soh + n * son, tl.zeros([BLOCK_N], tl.float32), mask=n < max_n)
        if t0 >= t_keys:                                  # no keys in this run: no queries to load
            return
        g, m, r_ok = _group_rows(Mb, G, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        h = hk * G + g
        q = tl.load(Q + b * sqb + h[:, None] * sqh + (q0 + m)[:, None] * sqm + d[None, :],
                    mask=r_ok[:, None] & (d[None, :] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        _pdl_wait(PDL)                                    # the lse is the row pass's
        lse2 = _load_lse2(LSE2 + b * slb + h * slh + q0 * lse_q0 * slm, m, r_ok, slm, LSE_NATURAL)  # absent: +inf
        for t in tl.range(t0, t_keys):
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < Nb
            n_out = _stored_columns(n, n_ok, max_n, IS_PAGED)
            rows = _key_rows(BT, sbt, b, t * BLOCK_N, Nb, k0, skb, skn, skblk, IS_PAGED, PAGE, BLOCK_N)
            kt = tl.load(K + hk * skh + rows[None, :] + d[:, None], mask=n_ok[None, :] & (d[:, None] < D),
                         other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            p = tl.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
            if IS_CAUSAL:
                p = tl.where(n[None, :] <= m[:, None] + shift, p, 0.0)
            _store_group_rows(p, _column_counts(n, shift, Mb, IS_CAUSAL), Out, b, hk, k0, n, n_ok, n_out, sob, soh,
                              son, G, REDUCTION, GROUP_REDUCE, FUSE_HEADS, IS_PAGED, BLOCK_M)
    else:
        b, hk, q0, Mb, k0, Nb, shift, m_lo, m_full, n, n_ok, rows = _column_program(
            cu_q, cu_k, BT, sbt, skb, skn, skblk, max_m, max_n, HKV, IS_VARLEN, IS_PAGED, PAGE, IS_CAUSAL, BLOCK_M,
            BLOCK_N, 1)
        if not IS_PAGED:
            if tl.program_id(0) * BLOCK_N >= Nb:
                return
        Mb, m_lo, m_full, n_out = _live_columns(n, n_ok, Nb, Mb, m_lo, m_full, max_n, IS_PAGED, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        k = tl.load(K + hk * skh + rows[:, None] + d[None, :], mask=n_ok[:, None] & (d[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        _pdl_wait(PDL)                                    # the lse is the row pass's
        cols = tl.zeros([BLOCK_N, GP], tl.float32)
        Q_group = Q + b * sqb + hk * G * sqh + q0 * sqm
        LSE_group = LSE2 + b * slb + hk * G * slh + q0 * lse_q0 * slm
        n_masked = tl.cdiv(m_full - m_lo, BLOCK_M)                    # the diagonal: causal mask
        cols = _window_blocks(cols, k, Q_group, LSE_group, m_lo, n_masked, gi, n, shift, sqh, slh, sqm, slm, qk_scale,
                              Mb, d, G, D, REDUCTION, UPCAST, DOT_PRECISION, True, LSE_NATURAL, BLOCK_M)
        n_full = tl.cdiv(Mb - m_full, BLOCK_M)                        # query blocks that see every column: no mask
        cols = _window_blocks(cols, k, Q_group, LSE_group, m_full, n_full, gi, n, shift, sqh, slh, sqm, slm,
                              qk_scale, Mb, d, G, D, REDUCTION, UPCAST, DOT_PRECISION, False, LSE_NATURAL, BLOCK_M)
        if REDUCTION == 1:
            count = _column_counts(n, shift, Mb, IS_CAUSAL)
            cols = _mean_by_count(cols, count[:, None])
        cols = _padded(cols, n_ok[:, None], IS_PAGED)
        if GROUP_REDUCE == 0:
            tl.store(Out + b * sob + (hk * G + gi)[None, :] * soh + (k0 + n)[:, None] * son, cols,
                     mask=n_out[:, None] & (gi[None, :] < G))
        else:
            tl.store(Out + b * sob + hk * soh + (k0 + n) * son, _group_of(cols, gi[None, :] < G, G, GROUP_REDUCE, 1),
                     mask=n_out)


@triton.jit
def _long_tile(acc, kt, Q_head, LSE_head, ms, n, shift, sqm, slm, qk_scale, Mb, d, D: tl.constexpr,
               REDUCTION: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               MASKED: tl.constexpr, LSE_NATURAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += (or max=) exp2(q·kᵀ·scale − lse) for the query rows [ms, ms + BLOCK_M)."""
    m = ms + tl.arange(0, BLOCK_M)
    m_ok = m < Mb
    q = tl.load(Q_head + m[:, None] * sqm + d[None, :], mask=m_ok[:, None] & (d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse2 = _load_lse2(LSE_head, m, m_ok, slm, LSE_NATURAL)
    p = tl.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(n[None, :] <= m[:, None] + shift, p, 0.0)
    if REDUCTION == 2:
        return tl.maximum(acc, p)
    else:
        return acc + p


@triton.jit
def _long_column_kernel(Q, K, BT, LSE2, Out, cu_q, cu_k, Part, Counter,
                        sqb, sqh, sqm, skb, skh, skn, skblk, sbt, slb, slh, slm, lse_q0, sob, soh, son,
                        spb, sph, spn, max_m, max_n, qk_scale,
                        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                        REDUCTION: tl.constexpr, GROUP_REDUCE: tl.constexpr, FUSE_HEADS: tl.constexpr,
                        HS: tl.constexpr, IS_VARLEN: tl.constexpr, IS_PAGED: tl.constexpr, PAGE: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, LSE_NATURAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Column pass for long query ranges: same result as _window_column_kernel, tiles q·kᵀ (queries on rows).

    The K tile is the dot's B operand (shared memory); a 2-D accumulator is reduced over rows once per head (once
    in all with FUSE_HEADS: the group combine equals the row combine, sum of sums or max of maxes).
    HS > 1 (head split, G % HS == 0): HS programs per kv head and key tile, each over G / HS of the group's heads;
    with GROUP_REDUCE each writes its partial group sum (max) to head hk·HS + hs of Part (strides spb, sph, spn),
    and the last of the HS programs to finish, counted in Counter (int32 per key tile and sequence × kv head, zero
    before the launch and reset to zero by that program), reduces the HS partials in a fixed order (deterministic),
    divides by G for the mean and writes Out: no launch after this one.
    """
    b, hk, q0, Mb, k0, Nb, shift, m_lo, m_full, n, n_ok, rows = _column_program(
        cu_q, cu_k, BT, sbt, skb, skn, skblk, max_m, max_n, HKV, IS_VARLEN, IS_PAGED, PAGE, IS_CAUSAL, BLOCK_M, BLOCK_N,
        HS)
    hs = tl.program_id(1) % HS
    if not IS_PAGED:
        if tl.program_id(0) * BLOCK_N >= Nb:
            return
    Mb, m_lo, m_full, n_out = _live_columns(n, n_ok, Nb, Mb, m_lo, m_full, max_n, IS_PAGED, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    kt = tl.load(K + hk * skh + rows[None, :] + d[:, None], mask=n_ok[None, :] & (d[:, None] < D), other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    _pdl_wait(PDL)                                        # the lse is the row pass's
    count = _column_counts(n, shift, Mb, IS_CAUSAL)       # the mean's divisor (REDUCTION 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    group = tl.zeros([BLOCK_N], tl.float32)
    for gg in range(G // HS):
        h = hk * G + hs * (G // HS) + gg
        Q_head = Q + b * sqb + h * sqh + q0 * sqm
        LSE_head = LSE2 + b * slb + h * slh + q0 * lse_q0 * slm
        for ms in range(m_lo, m_full, BLOCK_M):
            acc = _long_tile(acc, kt, Q_head, LSE_head, ms, n, shift, sqm, slm, qk_scale, Mb, d, D,
                             REDUCTION, UPCAST, DOT_PRECISION, True, LSE_NATURAL, BLOCK_M)
        for ms in range(m_full, Mb, BLOCK_M):
            acc = _long_tile(acc, kt, Q_head, LSE_head, ms, n, shift, sqm, slm, qk_scale, Mb, d, D,
                             REDUCTION, UPCAST, DOT_PRECISION, False, LSE_NATURAL, BLOCK_M)
        if not FUSE_HEADS:
            col = _reduce_rows(acc, count, REDUCTION)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if GROUP_REDUCE == 0:
                tl.store(Out + b * sob + h * soh + (k0 + n) * son, _padded(col, n_ok, IS_PAGED), mask=n_out)
            elif GROUP_REDUCE == 3:
                group = tl.maximum(group, col)
            else:
                group += col
    if FUSE_HEADS:
        group = _reduce_rows(acc, count, REDUCTION)
    if GROUP_REDUCE != 0:
        if HS == 1:
            tl.store(Out + b * sob + hk * soh + (k0 + n) * son,
                     _padded(_group_mean(group, G, GROUP_REDUCE), n_ok, IS_PAGED), mask=n_out)
        else:
            part = Part + b * spb + (k0 + n) * spn
            tl.store(part + (hk * HS + hs) * sph, _padded(group, n_ok, IS_PAGED), mask=n_out)
            tl.debug_barrier()                        # every thread's partial written, then one count per program
            slot = Counter + tl.program_id(0) * (tl.num_programs(1) // HS) + tl.program_id(1) // HS
            if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == HS - 1:
                tl.debug_barrier()
                total = tl.load(part + hk * HS * sph, mask=n_out, other=0.0, cache_modifier=".cg")
                for i in range(1, HS):                # the partials in head order, whoever finished first
                    v = tl.load(part + (hk * HS + i) * sph, mask=n_out, other=0.0, cache_modifier=".cg")
                    if GROUP_REDUCE == 3:
                        total = tl.maximum(total, v, propagate_nan=tl.PropagateNan.ALL)
                    else:
                        total += v
                tl.store(Out + b * sob + hk * soh + (k0 + n) * son, _group_mean(total, G, GROUP_REDUCE),
                         mask=n_out)
                tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")       # ready for the next launch


def _pick_config(m: int, d: int, g: int, is_causal: bool, tma: bool = True) -> dict:
    """Tile sizes and launch settings, a fixed function of the shape (so results never depend on tuning order).

    Keys: BLOCK_R/BLOCK_N1/warps1/stages1 for the row pass; WINDOW (which column kernel: _window_column_kernel for
    query windows of at most 128 rows, else _long_column_kernel) and BLOCK_M/BLOCK_N/warps/stages for the column
    pass. From the sweeps of `benchmarks/kernels.py --sweep` on an H100 (benchmarks/results/h100_sweep.json and
    benchmarks/NOTES.md): short windows want 32-row query blocks and 128-key tiles held in registers; long prompts
    64-row query blocks against 128-key tiles in shared memory. The row pass of long prompts (M ≥ 8192) takes
    128-row tiles at 4 warps: on the H200 (`benchmarks/kernels.py --goal-tiles`, sixteenth session) they beat the
    H100's 64-row choice at full causal 16k (both passes 4.79 vs 5.21 ms with the same column tiles); prompts of
    4096 ≤ M < 8192 keep the 64-row tiles at 4 warps (the H200's serving sweep, eighteenth session, both passes:
    full 32/8 4k 0.397 vs 0.411 ms, 8k 1.402 vs 1.373 ms with 64- vs 128-row tiles). tma: the row pass reads its
    key tiles through a tensor descriptor (_k_tma); then the long prompts' row pass takes 4 stages, else 3
    (benchmarks/row_pass.py's fixed offset at 128 × 64, 4 warps, full causal 32/8 on the H200, twenty-first
    session: with TMA 2.16 ms at 16k at 4 stages vs 2.30 at 3; with its own loads 2.37 vs 2.33, at 8k 0.645 vs
    0.623).
    """
    window = m <= _WINDOW_M
    if _interpreting():
        return dict(BLOCK_R=32, BLOCK_N1=32, warps1=4, stages1=1, WINDOW=window, BLOCK_M=32, BLOCK_N=32, warps=4,
                    stages=1)
    if triton.next_power_of_2(d) > 128:
        return dict(BLOCK_R=64, BLOCK_N1=64, warps1=8, stages1=2, WINDOW=window, BLOCK_M=32 if window else 64,
                    BLOCK_N=64, warps=8 if window else 4, stages=2)
    if window:
        row = (128, 4, 3)                                                          # BLOCK_R, warps1, stages1
    elif m >= 8192:
        row = (128, 4, 4 if tma else 3)
    else:
        row = (64, 4, 3) if m >= 4096 else (128, 8, 2)
    col = (32, 128, 4, 3) if window else (64, 128, 4, 3 if d <= 64 else 2)        # BLOCK_M, BLOCK_N, warps, stages
    return dict(BLOCK_R=row[0], BLOCK_N1=64, warps1=row[1], stages1=row[2], WINDOW=window,
                BLOCK_M=col[0], BLOCK_N=col[1], warps=col[2], stages=col[3])


def _fit_config(cfg: dict, m: int, n: int, g: int, programs: int, sms: int, d: int = 128,
                ragged: bool = False, mid: bool = True) -> dict:
    """The "new" launch variant's tiles: _pick_config's, fitted to the shape (any choice is exact; these only
    change speed, and are compared with _pick_config's in one GPU run by benchmarks/kernels.py --serving-sweep).

    - row pass: BLOCK_R no larger than the rows of a group (G·M, at least 16 for tl.dot): a 64-query MHA window
      ran 128-row tiles, half of every q·kᵀ and exp2 wasted; 1–16-query windows wasted up to 127/128.
    - window column pass: BLOCK_M no larger than the window (at least 16).
    - window column pass: 64-key tiles when 128-key tiles give fewer than two programs per SM (mid-size N, few kv
      heads: e.g. N = 2048, 8 kv heads launched 128 programs for 132 SMs).
    - long prompts of fewer than 8192 keys, D 65–128 (the others keep their tiles: D > 128 has its own, smaller
      ones): 64-key column tiles at 3 stages, and from 1024 to 4095 queries
      64-row row tiles at 4 warps and 3 stages (what 4096 ≤ M < 8192 take). The H200's tile run at full causal
      32/8 (`GOAL_TILE_SHAPES=mid benchmarks/kernels.py --goal-tiles`, twenty-ninth session, one run): both
      passes 0.117 vs 0.135 ms at 2048, 0.053 vs 0.058 at 1024; the column pass alone 0.0141 vs 0.0150 at 512,
      0.0272 vs 0.0263 at 1024, 0.189 vs 0.196 at 4096. The serving sweep times the tiles before (mid=False)
      beside these: both passes 0.117 vs 0.136 ms at 2048 (MHA 32: 0.116 vs 0.137), 0.0262 vs 0.0278 at 512,
      0.0545 vs 0.0565 at 1024, 0.347 vs 0.352 at 4096, 4 × 2048 0.371 vs 0.392 (`serving_sweep_visit31_mid.md`).
    - long column pass (M > 128): HEAD_SPLIT programs per kv head (a divisor of G) until about 8 programs per SM;
      full causal 32/8 at N = 2048 launched 128 programs, each looping over 4 heads × up to 32 query blocks (the
      H200's tile run: at 16k, 1,024 programs of one head split 2.50 ms, 2,048 of two 2.37 ms: causal programs
      differ up to 128× in work, more of them even out the tail); where that still gives fewer than 2 programs
      per SM (MHA with few heads), 64-key tiles.
    - window column pass, persistent (_window_column_kernel's persistent mode) where _persistent_config allows
      it, at 2 programs per SM in all (the H200's best in benchmarks/window_persistent.py: 0.174 vs 0.223 ms at
      32/8, W=64, N=128k, lse given). Not for packed and paged batches (ragged): with P programs striding over
      each sequence's tiles the longest sequence's programs were the tail on the H200 (paged 4 prompts 8k–32k +17%, varlen 8 prompts 0.5k–4k +12%); runs of
      consecutive tiles at 8 programs per SM by the longest sequence (_persistent_config(..., per_sm=8)) let the
      shorter sequences' runs end early: on the H200 1–3% faster at three packed/paged shapes and 10% slower at
      4 paged prompts of 8k–32k (benchmarks/kernels.py --serving-sweep times them beside ours as
      ours_persistent; eighteenth session), so ragged batches keep the per-tile pass."""
    if _interpreting():
        return cfg
    cfg = dict(cfg)
    rows = triton.next_power_of_2(max(1, g * m))
    cfg["BLOCK_R"] = max(16, min(cfg["BLOCK_R"], rows))
    if cfg["WINDOW"]:
        cfg["BLOCK_M"] = max(16, min(cfg["BLOCK_M"], triton.next_power_of_2(max(1, m))))
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * programs
    if cfg["WINDOW"]:
        if cfg["BLOCK_N"] > 64 and tiles < 2 * sms:
            cfg["BLOCK_N"] = 64
        if not ragged:
            cfg = _persistent_config(cfg, m, n, g, programs, sms, d, 2) or cfg
    else:                   # long kernel: split the group's heads over programs until ~8 programs per SM
        hs = 1
        while hs < g and tiles * hs < 8 * sms:
            hs += 1
            while g % hs:
                hs += 1
        cfg["HEAD_SPLIT"] = hs
        if cfg["BLOCK_N"] > 64 and tiles * hs < 2 * sms:    # heads exhausted (MHA, few heads): narrower tiles
            cfg["BLOCK_N"] = 64
        if mid and triton.next_power_of_2(d) == 128 and n < 8192:    # long prompts of fewer than 8192 keys
            cfg.update(BLOCK_N=64, stages=3)
            if 1024 <= m < 4096:
                cfg.update(BLOCK_R=64, warps1=4, stages1=3)
    return cfg


def _persistent_config(cfg: dict, m: int, n: int, g: int, programs: int, sms: int, d: int, per_sm: int):
    """cfg with the persistent window pass at per_sm programs per SM in all (PERSISTENT = programs per sequence ×
    kv head, 64-key tiles, 4 warps, 3 stages), or None where it does not apply: the group's rows must fit one tile
    (next_pow2(G) · next_pow2(M) ≤ 256, D ≤ 128) and each program get a run of at least 3 key tiles (8 where the
    group has fewer than 128 rows: they save less per tile — MHA 8 heads, D 64, W=64, N=8k ran 9% slower at ~4
    tiles a program on the H200, MHA 32 heads 10% faster at 16)."""
    block_m = max(16, triton.next_power_of_2(max(1, m)))
    group_rows = triton.next_power_of_2(g) * block_m
    persistent = max(1, per_sm * sms // programs)
    run = triton.cdiv(triton.cdiv(n, 64), persistent)
    if group_rows <= 256 and triton.next_power_of_2(d) <= 128 and run >= (3 if group_rows >= 128 else 8):
        return dict(cfg, PERSISTENT=persistent, BLOCK_M=block_m, BLOCK_N=64, warps=4, stages=3)
    return None


def _fused_tiles(max_m: int, max_n: int, D: int, G: int, programs: int, sms: int, interpreting: bool,
                 itemsize: int = 2, block_n: int | None = None) -> int:
    """BLOCK_N of the one-launch window kernel (_fused_window_kernel; a config's FUSED) at this shape, or 0 where it
    does not apply: the group's rows must fit one tile (next_pow2(G) · next_pow2(M) ≤ 512, M ≤ 128, D ≤ 128), its
    scores at most 32768 (the rows × BLOCK_N fp32 tile: 128 registers a thread at 8 warps) and the grid — key
    tiles × programs (sequences × kv heads) — at most one program per SM, 64-key tiles where that fits, else 128
    (every program waits for the others of its sequence × kv head, so all must be resident: one per SM always is).
    16-bit inputs only (itemsize): float32 tiles this size spill (26 KB at 256 × 128, ptxas for sm_90; 47 KB with
    the JIT's alignment specialisation). Under the interpreter 32-key tiles, any grid and dtype (it runs the two
    phases as two launches). block_n (a config's FUSED_N: 16, 32, 64 or 128): that tile instead, where it meets the
    same limits (benchmarks/kernels.py's ours_fused32 candidate: twice the programs of 64-key tiles where those
    leave half the SMs idle)."""
    rows = triton.next_power_of_2(G) * max(16, triton.next_power_of_2(max(1, max_m)))
    if max_m > _WINDOW_M or rows > 512 or triton.next_power_of_2(D) > 128:
        return 0
    if block_n is not None and block_n not in (16, 32, 64, 128):
        raise ValueError(f"a config's FUSED_N must be 16, 32, 64 or 128, got {block_n!r}")
    if interpreting:
        return block_n or 32
    if itemsize != 2:
        return 0
    for tile in (block_n,) if block_n else (64, 128):
        if rows * tile <= 32768 and triton.cdiv(max_n, tile) * programs <= sms:
            return tile
    return 0


def _fuse_heads(reduction: str, group_reduce: str | None) -> bool:
    """True where combining the group's heads commutes with reducing rows (sum/mean of sums, max of maxes)."""
    if reduction == "max":
        return group_reduce == "max"
    return group_reduce in ("sum", "mean")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(rows_programs: int, n: int, block_n: int, sms: int | None = None) -> int:
    """Key-axis splits for the row pass: enough programs to fill the GPU, at least 4 key tiles per split."""
    if _interpreting():
        return max(1, min(2, triton.cdiv(n, 4 * block_n)))
    if sms is None:
        sms = _sm_count(torch.cuda.current_device())
    want = triton.cdiv(4 * sms, max(1, rows_programs))
    return max(1, min(want, triton.cdiv(n, 4 * block_n)))


def _paged_stages(cfg: dict) -> dict:
    """cfg with the row pass's stages for a paged K: 2·stages1 − 1, so that its key tiles are prefetched as deep as
    a dense or packed K's at stages1. The row pass loads each key tile's cache blocks from the block table, then
    the keys at the addresses they give: Triton's pipeliner splits a loop's stages between the two loads of that
    chain ((stages − 1) // 2 each, the table one level ahead), so at stages1 = 3 a paged K had two tile buffers (one
    tile loading while one is used) where a packed K had three (two loading). Compiled for sm_90 under Triton
    3.7.1 at paged window 64, 32/8, 32k: two key-tile buffers (128 × 64 fp16) at 3 stages, three at 5, as the
    packed K at 3 (tests/test_colreduce_compile.py reads them; the same under Triton 3.6 on the H200). The H200's
    serving sweep (thirty-third session, Triton 3.6, same run): 4 paged prompts of 8k–32k, window 64, 32/8, 0.334 ms
    against 0.353 at 3 stages (−5%); 8 paged prompts of 0.5k–4k 0.105 against 0.104 (level). Most of the gap to the
    same batch packed stays (0.254 and 0.079 ms), and is not explained yet: with the lse given (the column pass
    alone, whose key tile is loaded once per program) paged 0.153 against packed 0.134."""
    return dict(cfg, stages1=2 * cfg["stages1"] - 1)


def _plan(max_m: int, max_n: int, D: int, G: int, B: int, Hkv: int, is_causal: bool, variant: str, sms: int,
          config: dict | None, ragged: bool = False, tma: bool = True, one_split: bool = False, paged: bool = False):
    """(config, row blocks, splits, split length, column grid) of a launch: a pure function of the shape (and of
    whether the row pass reads K through a descriptor, tma: its stages; one_split: the row pass is colreduce_ws.py's,
    which takes every key of a row, and the REDO launch after it one split too; paged: K in a paged cache, the row
    pass's stages per _paged_stages). A given config is taken as it is: its stages are the launch's, paged or not
    (benchmarks time the stages before _paged_stages that way). A given config's SPLITS, where it has one, replaces
    _num_splits (benchmarks/kernels.py --goal-tiles)."""
    if config is not None:
        cfg = config
    else:
        cfg = _pick_config(max_m, D, G, is_causal, tma)
        if variant != "old":
            cfg = _fit_config(cfg, max_m, max_n, G, B * Hkv, sms, D, ragged)
            if paged:
                cfg = _paged_stages(cfg)
    row_blocks = triton.cdiv(G * max_m, cfg["BLOCK_R"])
    splits = 1 if one_split else cfg.get("SPLITS") or _num_splits(row_blocks * B * Hkv, max_n, cfg["BLOCK_N1"], sms)
    split_len = triton.cdiv(triton.cdiv(max_n, splits), cfg["BLOCK_N1"]) * cfg["BLOCK_N1"]
    splits = triton.cdiv(max_n, split_len)
    col_programs = cfg["PERSISTENT"] if cfg.get("PERSISTENT") else triton.cdiv(max_n, cfg["BLOCK_N"])
    return cfg, row_blocks, splits, split_len, (col_programs, B * Hkv)


def _recipe(max_m, max_n, D, G, B, Hkv, is_causal, variant, sms, reduction, group_reduce, varlen, paged, page,
            dtype, interpreting, lse_given, k_tma=False, one_split=False, config=None):
    """Everything a launch needs that is a function of the shape and flags (no tensors): the plan, the kwargs of
    the row and column kernels, whether the row pass writes the lse itself (final), the head split. k_tma: the row
    pass reads K through a descriptor (_k_tma, _k_box); one_split: the row pass is colreduce_ws.py's (_ws_row)."""
    cfg, row_blocks, splits, split_len, grid = _plan(max_m, max_n, D, G, B, Hkv, is_causal, variant, sms, config,
                                                     varlen or paged, k_tma, one_split, paged)
    upcast = interpreting and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"
    # the saved-scores column pass (SAVE_SCORES): the window's group rows in one row block of a Triton row pass
    save = (variant != "old" and not lse_given and not one_split and cfg["WINDOW"] and row_blocks == 1
            and (cfg.get("SAVE", False) if config is not None
                 else _save_scores(G, max_m, D, dtype, B * max_n * Hkv)))
    if save:
        block_n = 32 if interpreting else 128
        cfg = dict(cfg, SAVE=True, PERSISTENT=0, BLOCK_M=triton.next_power_of_2(max(1, max_m)), BLOCK_N=block_n,
                   warps=4, stages=1)
        grid = (triton.cdiv(max_n, block_n), B * Hkv)
    elif cfg.get("SAVE"):                             # a config asking for it where it does not apply
        cfg = dict(cfg, SAVE=False)
    common = dict(HKV=Hkv, G=G, D=D, IS_VARLEN=varlen, IS_PAGED=paged, PAGE=page, IS_CAUSAL=is_causal,
                  UPCAST=upcast, DOT_PRECISION=precision, BLOCK_D=max(16, triton.next_power_of_2(D)))
    # the one-launch window kernel (_fused_window_kernel): a config's FUSED (without one: FUSED_WINDOWS), where
    # _fused_tiles allows it
    wants = cfg.get("FUSED") if config is not None else FUSED_WINDOWS
    fused_n = _fused_tiles(max_m, max_n, D, G, B * Hkv, sms, interpreting, dtype.itemsize,
                           cfg.get("FUSED_N") if config is not None else None) if (
        wants and variant != "old" and not lse_given and not one_split) else 0
    if fused_n:
        block_m = max(16, triton.next_power_of_2(max(1, max_m)))
        warps = 8 if triton.next_power_of_2(G) * block_m * fused_n >= 16384 else 4     # ≤ 64 score registers
        cfg = dict(cfg, FUSED=True, SAVE=False, PERSISTENT=0, BLOCK_M=block_m, BLOCK_N=fused_n, warps=warps, stages=1)
        grid = (triton.cdiv(max_n, fused_n), B * Hkv)
        col_kw = dict(REDUCTION=_REDUCTIONS[reduction], GROUP_REDUCE=_GROUP_REDUCE[group_reduce],
                      FUSE_HEADS=_fuse_heads(reduction, group_reduce), BLOCK_M=block_m, BLOCK_N=fused_n,
                      PHASE=0, num_warps=warps, num_stages=1, **common,
                      **({} if interpreting else dict(launch_cooperative_grid=True)))
        return cfg, 1, grid[0], fused_n, grid, {}, col_kw, False, 1
    if cfg.get("FUSED"):                              # a config asking for it where it does not apply
        cfg = dict(cfg, FUSED=False)
    final = variant != "old" and splits == 1 and not lse_given
    combine = variant != "old" and splits > 1 and not lse_given
    # programmatic dependent launch (_pdl_trigger): a config's choice, where the row pass precedes the column pass
    pdl = bool(cfg.get("PDL")) and _HAS_GDC and not lse_given and not interpreting and variant != "old"
    launch = dict(launch_pdl=True) if pdl else {}
    row_kw = dict(FINAL=final, COMBINE=combine, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N1"], num_warps=cfg["warps1"],
                  num_stages=cfg["stages1"], K_TMA=k_tma, REDO=False, SAVE=save, PDL=pdl, **common)
    if save:
        col_kw = dict(HKV=Hkv, G=G, REDUCTION=_REDUCTIONS[reduction], GROUP_REDUCE=_GROUP_REDUCE[group_reduce],
                      FUSE_HEADS=_fuse_heads(reduction, group_reduce), IS_VARLEN=varlen, IS_PAGED=paged,
                      IS_CAUSAL=is_causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["warps"],
                      num_stages=cfg["stages"], PDL=pdl, **launch)
        return cfg, row_blocks, splits, split_len, grid, row_kw, col_kw, final, 1
    col_kw = dict(REDUCTION=_REDUCTIONS[reduction], GROUP_REDUCE=_GROUP_REDUCE[group_reduce], BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["warps"], num_stages=cfg["stages"],
                  LSE_NATURAL=lse_given and variant != "old", PDL=pdl, **launch, **common)
    hs = 1 if cfg["WINDOW"] else cfg.get("HEAD_SPLIT", 1)
    if cfg["WINDOW"]:                 # every constexpr bound (the direct launch reads them from here)
        col_kw["PERSISTENT"] = bool(cfg.get("PERSISTENT"))
        col_kw["FUSE_HEADS"] = _fuse_heads(reduction, group_reduce)   # the persistent pass: a fused group at once
    else:
        col_kw["HS"] = hs
        col_kw["FUSE_HEADS"] = _fuse_heads(reduction, group_reduce) if (hs == 1 or group_reduce is not None) \
            else False
    return cfg, row_blocks, splits, split_len, grid, row_kw, col_kw, final, hs


_cached_recipe = functools.lru_cache(maxsize=4096)(_recipe)


def _out_strides(varlen: bool, paged: bool, heads: int, max_n: int) -> tuple[int, int, int]:
    """(batch, head, key) strides of the column pass's output, (B, heads, max_n) padded and paged, (ΣN, heads)
    varlen. The padded ones are integer launch arguments that change with the key length, so Triton specialises
    the column kernel on them (heads · max_n % 16 == 0 for an even max_n when heads is 8)."""
    if varlen and not paged:
        return 0, 1, heads
    return heads * max_n, max_n, 1


def _launch_key(max_m, max_n, *shape, one_split=False):
    """What decides which compiled kernels a launch of this shape runs (launch_lengths): the recipe's constexprs and
    Triton's specialisation classes of the integers that follow the key and query lengths: max_n, the split length
    and count (not the one-launch window kernel's: it takes neither), the column pass's output strides (of the
    head-split partials too), and max_m with the strides of the row statistics it sets (Hq·max_m, B·Hq·max_m:
    colreduce_triton's row_ints and col_ints). A window's max_m is fixed; a whole prompt's is its length
    (launch_lengths(..., whole=True)), and without them an H2O engine on the H200 compiled both kernels at its first
    4500-token prompt (Hq = 4: Hq·4500 is a multiple of 16, Hq·4497 is not)."""
    D, G, B, Hkv, is_causal, variant, sms, reduction, group_reduce, varlen, paged = shape[:11]
    cfg, _, splits, split_len, _, row_kw, col_kw, final, hs = _recipe(max_m, max_n, *shape, False, False, one_split)
    # the one-launch window kernel takes neither the split length nor the count (its tile count is the grid's)
    lengths = (max_n,) if cfg.get("FUSED") else (max_n, split_len, splits)
    strides = _out_strides(varlen, paged, G * Hkv if group_reduce is None else Hkv, max_n)
    if hs > 1 and group_reduce is not None:           # the head split's partials (the long column kernel's)
        strides += _out_strides(varlen, paged, Hkv * hs, max_n)
    rows = (max_m, G * Hkv * max_m, B * G * Hkv * max_m)
    return (tuple(sorted(row_kw.items())), tuple(sorted(col_kw.items())), final, hs,
            _spec(lengths + strides + rows))


def launch_lengths(max_m: int, n_lo: int, n_hi: int, D: int, G: int, B: int, Hkv: int, *, is_causal: bool,
                   reduction: str, group_reduce: str | None, dtype: torch.dtype, device, varlen: bool = True,
                   paged: bool = False, page: int = 1, sms: int | None = None, whole: bool = False) -> list[int]:
    """Key lengths for a warm-up: the smallest max_seqlen_k in [n_lo, n_hi] of each distinct compiled launch
    colreduce_triton makes for this shape over that range: the recipe's constexprs (the tiles change with the key
    length: mid-size windows take 64-key tiles, short ones take one split and skip the combine) and Triton's
    specialisation of the integer arguments that follow the length (max_seqlen_k, the split length and count, the
    column pass's output strides: == 1, % 16 == 0). The output strides are multiples of the length (8·N for 8 kv
    heads), so lengths ≡ 2, 4, 8 (mod 16) can launch differently from ≡ 0 and 1: the twelfth session's H200 mixed
    workload compiled the paged window kernel twice mid-run (1.0-1.1 s stalls) before these were warmed too.
    An engine that compiled its kernels on short dummies otherwise still compiled at its first long prompt (the
    H200's eleventh visit: a 2.1 s stall at the first 16k prompt). The other integer arguments (strides, the block
    table's row stride) are the caller's to match. sms: the device's SM count (None: as colreduce_triton asks).
    whole: whole prompts, every key's query scored (max_seqlen_q = the key length n; max_m is ignored): the tiles
    change with the query length too, and from _WS_MIN_M queries on sm_90 the row pass is colreduce_ws.py's (one
    compile for every length) followed by the REDO launch."""
    interpreting = _interpreting()
    dev = torch.device(device)
    if sms is None:
        sms = 1 if interpreting else _sm_count(torch.cuda.current_device() if dev.index is None else dev.index)
    cuda = not interpreting and dev.type == "cuda" and torch.cuda.is_available()
    dev_index = (torch.cuda.current_device() if dev.index is None else dev.index) if cuda else -1

    def ws(m):                  # the Gluon row pass's one split (colreduce_triton's _ws_row), on a CUDA device only
        return cuda and _ws_row(paged, is_causal, m, dtype, D, dev_index)
    seen, out = set(), []
    for base in range(-(-max(n_lo, 1) // 16) * 16, n_hi + 16, 16):
        # one length per class of n mod 16 that an integer argument a·n (a ≤ 64, a power of 2 times an odd number)
        # can tell apart: 16 | a·n depends on the 2-adic valuation of n, capped at 4
        for n in (base, base + 1, base + 2, base + 4, base + 8):
            if not n_lo <= n <= n_hi:
                continue
            m = n if whole else max_m
            key = _launch_key(m, n, D, G, B, Hkv, is_causal, _VARIANT, sms, reduction, group_reduce, varlen, paged,
                              page, dtype, interpreting, one_split=ws(m))
            if key not in seen:
                seen.add(key)
                out.append(n)
    return out


def _combine_row_stats(m_part: torch.Tensor, l_part: torch.Tensor) -> torch.Tensor:
    """(S, …) partial row max and sum of exp2 → log2-domain row log-sum-exp, +inf where a row sees no key.

    Reduces the split axis in a fixed order (deterministic). The "old" launch variant's combine (torch ops);
    the others combine in the row pass's last program per row block (_combine_splits)."""
    m_max = m_part.amax(0)
    m_max = torch.where(torch.isneginf(m_max), torch.zeros_like(m_max), m_max)
    total = (l_part * torch.exp2(m_part - m_max)).sum(0)
    # total == 0 only where a row sees no key; NaN inputs give NaN totals and stay NaN
    return torch.where(total == 0, torch.full_like(total, float("inf")), m_max + torch.log2(total))


# Scratch and the "direct" launch variant.
#
# Scratch: the row pass's partials and row log-sum-exp, and the head split's partials, live in one float32 buffer per
# (device, stream), reused by every call on that stream (a later call's writes are ordered after this call's reads
# by the stream); the split counters in an int32 buffer beside it, zero between launches. A call therefore
# allocates only its output.
#
# "direct": a call's signature (_call_key: the recipe's key, the inputs' strides, the dtypes and 16-byte alignment of
# its tensors) fixes every integer argument of both launches and everything Triton specialises on (ints: == 1,
# % 16 == 0, beyond int32; tensors: dtype and alignment; the constexprs and options of the recipe). After the first
# JIT dispatch of a signature, its later calls launch the compiled kernels through their own launcher
# (CompiledKernel.run, the call JITFunction.run ends with), with the integers bound once and the scratch passed as
# addresses: no argument binding, no cache-key computation, no view of the scratch. Any failure while building a
# launcher keeps that signature on the JIT dispatch.


class _Direct(NamedTuple):
    """A signature's direct launch: its two launchers and where its arguments lie in the scratch."""
    row: object              # the row pass's launcher, None without a row pass (lse given)
    col: object              # the column kernel's launcher
    off_m: int               # float32 scratch offsets: row partials (max, sum), the lse, the head split's partials
    off_l: int
    off_lse: int
    off_part: int
    n_scratch: int           # float32 scratch elements
    n_count: int             # int32 counters (row combine, then head split)
    off_cc: int              # the head split's first counter, -1 without a head split
    off_x: int               # the saved scores (SAVE), -1 where the column pass reads K
    long: bool               # the long column kernel (it takes the head split's partials and counters)
    combine: bool            # the row pass combines its splits (it takes the counters)
    k_box: list | None       # the box of the row pass's descriptor of K (_k_box), None where it loads K itself
    ws: object               # where the row pass is colreduce_ws.py's: its launcher (colreduce_ws.direct_launcher),
                             # and `row` is the REDO launch after it; else None
    fused: bool = False      # `col` is the one-launch window kernel's (off_m, off_l: its partials; no row pass)


_direct_launchers: dict = {}   # call signature -> _Direct, or False (that signature stays on the JIT dispatch)
_scratch_bufs: dict = {}       # (device index, stream) -> [float32 scratch or None, int32 zero counters or None]
_SCRATCH_ALIGN = 32            # each scratch region starts at a multiple of 32 floats (128 bytes: 16-byte aligned)


def _regions(*sizes: int) -> tuple[list[int], int]:
    """Offsets of consecutive scratch regions of these sizes (elements), each aligned, and the total."""
    offs, total = [], 0
    for n in sizes:
        offs.append(total)
        total += -(-n // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    return offs, total


def _scratch(n_float: int, n_count: int, device: torch.device, dev: int, stream: int) -> list:
    """[float32 scratch of at least n_float elements, int32 counters (at least n_count, zero; None if
    0)] for a call on `stream` (the current raw stream of device dev; 0 under the interpreter). While a CUDA graph is
    captured: fresh buffers (a graph keeps the addresses it captured, and a later call could replace a shared
    buffer)."""
    if dev >= 0 and torch._C._cuda_isCurrentStreamCapturing():
        return [torch.empty(n_float, dtype=torch.float32, device=device),
                torch.zeros(n_count, dtype=torch.int32, device=device) if n_count else None]
    bufs = _scratch_bufs.get((dev, stream))
    if bufs is None:
        bufs = _scratch_bufs[(dev, stream)] = [None, None]
    if bufs[0] is None or bufs[0].numel() < n_float:
        bufs[0] = None                                  # released first: the allocator may reuse it
        bufs[0] = torch.empty(n_float, dtype=torch.float32, device=device)
    if n_count and (bufs[1] is None or bufs[1].numel() < n_count):
        bufs[1] = torch.zeros(max(n_count, 4096), dtype=torch.int32, device=device)
    return bufs


def _spec(args) -> tuple:
    """What Triton specialises a launch on, per argument (tests compare launches with it)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            out.append(type(a))
        else:
            out.append((a == 1, a % 16 == 0, not -2**31 <= a < 2**31))
    return tuple(out)


def _tensor_sig(ptrs: int, q, k, block_table, cu_q, cu_k, lse) -> tuple:
    """The dtypes and 16-byte alignment of a call's tensors (q and k's dtype is in the recipe's key); ptrs: their
    addresses or'ed together."""
    if lse is not None:
        ptrs |= lse.data_ptr()
    if ptrs % 16:                                          # some input misaligned: which ones
        return tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in (q, k, block_table, cu_q, cu_k, lse)
                      if t is not None])
    return block_table.dtype, cu_q.dtype, cu_k.dtype, None if lse is None else lse.dtype


def _launch(fn, grid, args, kw):
    """fn[grid](*args, **kw), Triton's JIT dispatch: the compiled kernel (the one place launches go through it)."""
    return fn[grid](*args, **kw)


def _build_direct(fn, compiled, kw, grid, ints):
    """launch(stream, pointers, qk_scale) for this compiled kernel with its integer arguments bound, or None."""
    try:
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return None
        params = list(fn.params)
        first_constexpr = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        if any(not p.is_constexpr for p in params[first_constexpr:]):
            return None                                # constexprs must close the signature
        constexprs = tuple(kw[p.name] for p in params[first_constexpr:])
        go = compiled_launch(compiled)                 # Triton's C launch, called as its release's launcher does
        if go is None:
            return None
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]

        def launch(stream, pointers, qk_scale):
            go(g0, g1, g2, stream, *pointers, *ints, qk_scale, *constexprs)
        return launch
    except Exception:  # noqa: BLE001 (an unknown Triton version: stay on the JIT dispatch)
        return None


_OFFSET_LIMIT = 2**31     # the kernels' element offsets within q, k, the lse and the output are 32-bit integers


def _check_extents(q, qs, k_ks, lse, out_numel: int) -> None:
    """ValueError where an element of q, k (k_ks: (k, its strides); None for a paged cache, whose blocks are
    addressed with 64-bit offsets) or the lse lies _OFFSET_LIMIT or more elements past the tensor's first, or where
    the output would hold more than _OFFSET_LIMIT: the kernels' offsets would wrap around and read or write
    elsewhere (a dense K of 3 batches 2**30 elements apart crashed the interpreter). colreduce_triton calls it where
    its own sums of the same offsets found one too large."""
    tensors = [("q", q, qs)] + ([("k", *k_ks)] if k_ks is not None else []) + (
        [("lse", lse, lse.stride())] if lse is not None else [])
    for name, t, st in tensors:
        if t.numel() and sum((n - 1) * s for n, s in zip(t.shape, st)) >= _OFFSET_LIMIT:
            raise ValueError(f"{name} {tuple(t.shape)} with strides {tuple(st)} has elements 2**31 or more past its "
                             "first; the Triton kernels address it with 32-bit offsets: split the batch, or use "
                             "backend='torch'")
    if out_numel > _OFFSET_LIMIT:
        raise ValueError(f"the output would hold {out_numel} elements, more than 2**31; the Triton kernels address "
                         "it with 32-bit offsets: split the batch, or use backend='torch'")


def colreduce_triton(q: torch.Tensor, k: torch.Tensor, reduction: str, *, is_causal: bool, scale: float,
                     group_reduce: str | None, lse: torch.Tensor | None = None,
                     cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                     block_table: torch.Tensor | None = None, seqlens_k: torch.Tensor | None = None,
                     config: dict | None = None, variant: str | None = None) -> torch.Tensor:
    """Launch the two passes. Inputs are validated by the caller (colreduce_kvprune.ops).

    Dense: q (B, Hq, M, D), k (B, Hkv, N, D), lse (B, Hq, M) → (B, Hq|Hkv, N).
    Varlen (cu_seqlens given): q (total_q, Hq, D), k (total_k, Hkv, D), lse (Hq, total_q) → (total_k, Hq|Hkv).
    Paged (block_table given): q (total_q, Hq, D) with cu_seqlens_q, k the key cache viewed as
    (num_blocks, block_size, Hkv, D), block_table (B, max_blocks), seqlens_k (B,) → (B, Hq|Hkv, max_seqlen_k),
    zero past each sequence's keys.
    The last dimension of q and k must have stride 1. ``config`` replaces the tile choice: a full dict of
    _pick_config's keys (benchmark sweeps, tests), optionally SPLITS (the row pass's key splits), PDL
    (programmatic dependent launch between the passes, _pdl_trigger; ignored below compute capability 9), FUSED
    (both passes of a short window in one launch, _fused_window_kernel, where _fused_tiles allows it) and FUSED_N
    (that launch's key tile, 16–128).
    ``variant`` "new" | "old" overrides the module's launch variant (see _VARIANT). No host sync: everything the launch
    needs comes from shapes and the given max lengths.
    """
    variant = variant or _VARIANT
    varlen = cu_seqlens_q is not None
    paged = block_table is not None
    skblk, sbt, page = 0, 0, 1
    qs, ks = q.stride(), k.stride()
    ls = None if lse is None else lse.stride()
    if paged:
        B = cu_seqlens_q.shape[0] - 1
        rows_q, Hq, D = q.shape
        Hkv = k.shape[2]
        max_m, max_n = int(max_seqlen_q), int(max_seqlen_k)
        sqb, sqh, sqm = 0, qs[1], qs[0]
        skb, skh, skn, skblk, page = 0, ks[2], ks[1], ks[0], k.shape[1]
        sbt = block_table.stride(0)
        heads = Hq if group_reduce is None else Hkv
        out_shape = (B, heads, max_n)                  # the kernel writes the padding
        sob, soh, son = _out_strides(varlen, paged, heads, max_n)
        cu_seqlens_k = seqlens_k
        numel = B * heads * max_n
    elif varlen:
        B = cu_seqlens_q.shape[0] - 1
        rows_q, Hq, D = q.shape
        rows_k, Hkv = k.shape[0], k.shape[1]
        max_m, max_n = int(max_seqlen_q), int(max_seqlen_k)
        sqb, sqh, sqm = 0, qs[1], qs[0]
        skb, skh, skn = 0, ks[1], ks[0]
        heads = Hq if group_reduce is None else Hkv
        out_shape = (rows_k, heads)
        sob, soh, son = _out_strides(varlen, paged, heads, max_n)
        numel = rows_k * heads
    else:
        B, Hq, max_m, D = q.shape
        Hkv, max_n = k.shape[1], k.shape[2]
        rows_q, rows_k = max_m, max_n
        sqb, sqh, sqm = qs[0], qs[1], qs[2]
        skb, skh, skn = ks[0], ks[1], ks[2]
        heads = Hq if group_reduce is None else Hkv
        out_shape = (B, heads, max_n)
        sob, soh, son = _out_strides(varlen, paged, heads, max_n)
        numel = B * heads * max_n
    # how far past its first element the last element of q, k (not a paged cache: its blocks take 64-bit offsets)
    # and the lse lie; the kernels' offsets are 32-bit. Rows: a dense q's and k's per batch, a packed one's in all
    # (then sqb = skb = 0); the lse is (B, Hq, M) dense, (Hq, total_q) packed.
    last = (B - 1) * sqb + (Hq - 1) * sqh + (rows_q - 1) * sqm + (D - 1) * qs[-1]
    if not paged:
        last = max(last, (B - 1) * skb + (Hkv - 1) * skh + (rows_k - 1) * skn + (D - 1) * ks[-1])
    if ls is not None:
        last = max(last, (Hq - 1) * ls[0] + (rows_q - 1) * ls[1] if varlen else
                   (B - 1) * ls[0] + (Hq - 1) * ls[1] + (max_m - 1) * ls[2])
    if last >= _OFFSET_LIMIT or numel > _OFFSET_LIMIT:
        _check_extents(q, qs, None if paged else (k, ks), lse, numel)
    out = torch.empty(*out_shape, dtype=torch.float32, device=q.device)
    if not varlen:
        cu_seqlens_q = cu_seqlens_k = out  # unused placeholders (IS_VARLEN is False)
    if block_table is None:
        block_table = out                  # unused placeholder (IS_PAGED is False)
    G = Hq // Hkv
    if numel == 0 or max_n == 0:
        return out.zero_()
    interpreting = _interpreting()
    dev, stream = -1, 0
    if interpreting:
        sms = 1
    else:
        dev = q.get_device()
        if dev < 0:
            dev = torch.cuda.current_device()
        sms = _sm_count(dev)
        stream = torch._C._cuda_getCurrentRawStream(dev) if dev >= 0 else 0
    k_tma = K_TMA and _k_tma(k, paged, dev, max_m, lse is not None)
    ws_row = lse is None and variant != "old" and _ws_row(paged, is_causal, max_m, q.dtype, D, dev)
    key = (max_m, max_n, D, G, B, Hkv, is_causal, variant, sms, reduction, group_reduce, varlen, paged, page,
           q.dtype, interpreting, lse is not None, k_tma, ws_row)
    qk_scale = scale * LOG2E
    ck = None
    if variant == "direct" and config is None and not interpreting:
        # the addresses, read once: the signature's alignment and the direct launch's pointer arguments
        a_q, a_k, a_bt, a_cq, a_ck = (q.data_ptr(), k.data_ptr(), block_table.data_ptr(), cu_seqlens_q.data_ptr(),
                                      cu_seqlens_k.data_ptr())
        ck = (key, qs, ks, sbt, ls,
              _tensor_sig(a_q | a_k | a_bt | a_cq | a_ck, q, k, block_table, cu_seqlens_q, cu_seqlens_k, lse))
        fast = _direct_launchers.get(ck)
        if fast:                                           # the compiled kernels, launched directly
            ws, counters = _scratch(fast.n_scratch, fast.n_count, q.device, dev, stream)
            base = ws.data_ptr()
            if fast.fused:                                 # one launch, the JIT launch's pointers as addresses
                fast.col(stream, (a_q, a_k, a_bt, base + 4 * fast.off_m, base + 4 * fast.off_l, counters.data_ptr(),
                                  out.data_ptr(), a_cq, a_ck), qk_scale)
                return out
            # the Gluon row pass (colreduce_ws.direct_launcher), or False where this call's q or k has a layout its
            # descriptors cannot read that the call signature does not show: then the JIT path below
            if fast.ws is None or fast.ws(q, k, base + 4 * fast.off_m, cu_seqlens_q, cu_seqlens_k, max_m, max_n, B,
                                          qk_scale, stream):
                # the same arguments as the JIT launch below, every tensor as its address: Triton's launcher takes
                # an int as it is, where for a tensor it calls data_ptr() and asks the driver about the pointer
                # (cuPointerGetAttribute), once per tensor argument and launch
                a_o = out.data_ptr()
                if fast.row is not None:
                    k_desc = _k_descriptor(k, fast.k_box) if fast.k_box is not None else None
                    x = base + 4 * fast.off_x if fast.off_x >= 0 else a_o
                    fast.row(stream, (a_q, a_k, k_desc, a_bt, a_cq, a_ck, base + 4 * fast.off_m, base + 4 * fast.off_l,
                                      base + 4 * fast.off_lse, counters.data_ptr() if fast.combine else a_o, x),
                             qk_scale)
                if fast.off_x >= 0:                        # the saved scores' column pass
                    col_ptrs = (base + 4 * fast.off_x, base + 4 * fast.off_lse, a_o, a_cq, a_ck)
                else:
                    col_ptrs = (a_q, a_k, a_bt, base + 4 * fast.off_lse if lse is None else lse.data_ptr(), a_o, a_cq,
                                a_ck)
                if fast.long:                              # the head split's partials and counters (placeholders)
                    col_ptrs += ((base + 4 * fast.off_part, counters.data_ptr() + 4 * fast.off_cc)
                                 if fast.off_cc >= 0 else (a_o, a_o))
                fast.col(stream, col_ptrs, qk_scale)
                return out
    if config is None:
        cfg, row_blocks, splits, split_len, grid, row_kw, col_kw, final, hs = _cached_recipe(*key)
    else:
        if config.get("PDL") and not interpreting and not _has_tma(dev):     # PDL: compute capability 9 and later
            config = dict(config, PDL=False)
        cfg, row_blocks, splits, split_len, grid, row_kw, col_kw, final, hs = _recipe(*key, config=config)
    rows = B * Hq * max_m
    if cfg.get("FUSED"):      # one launch (_fused_window_kernel): partials per key tile, a counter per sequence × kv
        (off_m, off_l), n_scratch = _regions(grid[0] * rows, grid[0] * rows)
        n_scratch = max(n_scratch, 1)
        ws, counters = _scratch(n_scratch, grid[1], q.device, dev, stream)
        ints = (sqb, sqh, sqm, skb, skh, skn, skblk, sbt, sob, soh, son, rows, max_m, max_n)
        args = (q, k, block_table, ws[off_m:off_m + grid[0] * rows], ws[off_l:off_l + grid[0] * rows], counters, out,
                cu_seqlens_q, cu_seqlens_k, *ints, qk_scale)
        try:
            for phase in (1, 2) if interpreting else (0,):   # the interpreter runs programs in turn: no waiting in it
                compiled = _launch(_fused_window_kernel, grid, args, dict(col_kw, PHASE=phase))
        except RuntimeError as err:
            # The driver refuses a cooperative grid that cannot be resident at once (an MPS client limited to part
            # of the GPU, say). Without a config asking for the kernel: switched off, and this call's two passes.
            if config is not None or "cooperative launch" not in str(err):
                raise
            _fused_refused(q.device, err)
            return colreduce_triton(q, k, reduction, is_causal=is_causal, scale=scale, group_reduce=group_reduce,
                                    cu_seqlens_q=cu_seqlens_q if varlen else None,
                                    cu_seqlens_k=cu_seqlens_k if varlen and not paged else None,
                                    max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                    block_table=block_table if paged else None, seqlens_k=seqlens_k, variant=variant)
        if ck is not None and ck not in _direct_launchers:
            fused_l = _build_direct(_fused_window_kernel, compiled, col_kw, grid, ints)
            _direct_launchers[ck] = _Direct(
                row=None, col=fused_l, off_m=off_m, off_l=off_l, off_lse=-1, off_part=-1, n_scratch=n_scratch,
                n_count=grid[1], off_cc=-1, off_x=-1, long=False, combine=False, k_box=None, ws=None,
                fused=True) if fused_l is not None else False
        return out
    # scratch (float32): row partials (max, sum: splits each; the lse itself when final), the combined lse, the
    # head split's partials, the saved scores (_saved_scores: key positions × Hq·max_m)
    saved = cfg.get("SAVE", False)
    positions = k.shape[0] if varlen and not paged else B * max_n       # key positions (packed or padded)
    n_x = positions * Hq * max_m if saved else 0
    row_pass = lse is None and max_m > 0
    combine = lse is None and row_kw["COMBINE"]
    head_split = not cfg["WINDOW"] and hs > 1 and group_reduce is not None
    n_part = positions * Hkv * hs if head_split else 0
    n_rows = 0 if lse is not None else rows if final else splits * rows
    (off_m, off_l, off_lse, off_part, off_x), n_scratch = _regions(n_rows, n_rows if not final else 0,
                                                                   rows if combine else 0, n_part, n_x)
    n_scratch = max(n_scratch, 1)
    if final:
        off_l = off_lse = off_m                            # one split: the row pass writes the lse itself
    elif not combine:
        off_lse = off_m                                    # unused by the row pass (old variant: torch combine)
    # counters (int32, zero between launches): the row pass's, one per (row block, sequence × kv head) when it
    # combines its splits; then the head split's, one per (key tile, sequence × kv head)
    (_, off_cc), n_count = _regions(row_blocks * B * Hkv if combine else 0, grid[0] * grid[1] if head_split else 0)
    if not head_split:
        off_cc = -1
    ws, counters = _scratch(n_scratch, n_count, q.device, dev, stream)
    counter = counters if combine else out                 # unused placeholder when the row pass does not combine
    if lse is None:
        slb, slh, slm, lse_q0 = Hq * max_m, max_m, 1, 0    # (B, Hq, max_m), rows local per sequence
    else:
        ls = lse.stride()
        if varlen:                                         # (Hq, total_q), rows global
            slb, slh, slm, lse_q0 = 0, ls[0], ls[1], 1
        else:
            slb, slh, slm, lse_q0 = ls[0], ls[1], ls[2], 0
    spp = Hq * max_m if final else rows
    row_ints = (sqb, sqh, sqm, skb, skh, skn, skblk, sbt, spp, max_m, max_m, max_n, split_len, splits)
    long = not cfg["WINDOW"]
    col_ptrs, part_strides = (), ()
    if long:               # the head split's partials (heads hk·HS + hs) and counters, else unused placeholders
        part_strides = _out_strides(varlen, paged, Hkv * hs, max_n) if head_split else (sob, soh, son)
        col_ptrs = (ws[off_part:off_part + n_part], counters[off_cc:n_count]) if head_split else (out, out)
    col_ints = (sqb, sqh, sqm, skb, skh, skn, skblk, sbt, slb, slh, slm, lse_q0, sob, soh, son, *part_strides,
                max_m, max_n)
    col_fn = _long_column_kernel if long else _window_column_kernel
    col_grid = (grid[0], grid[1] * hs) if long else grid
    x_scores = ws[off_x:off_x + n_x] if saved else out      # unused placeholder without SAVE
    if saved:                                          # its column pass reads the scores, not q and K
        col_fn, col_ints = _saved_column_kernel, (sob, soh, son, max_m, max_n)
    row_compiled = None
    k_box = _k_box(row_kw, varlen) if k_tma else None
    use_ws = False
    if lse is None:
        m_part = ws[off_m:off_m + n_rows]
        l_part = ws[off_l:off_l + n_rows]
        lse2 = ws[off_lse:off_lse + rows]
        if row_pass:
            use_ws = ws_row and final and \
                _ws_launch(q, k, lse2, cu_seqlens_q, cu_seqlens_k, max_m, max_n, B, qk_scale, varlen)
            if use_ws:                                     # then the rows it left NaN, with the running max
                row_kw, k_box = dict(row_kw, REDO=True, K_TMA=False), None
            k_desc = _k_descriptor(k, k_box) if k_box is not None else None
            row_compiled = _launch(_row_stats_kernel, (splits, row_blocks, B * Hkv),
                                   (q, k, k_desc, block_table, cu_seqlens_q, cu_seqlens_k, m_part, l_part, lse2,
                                    counter, x_scores, *row_ints, qk_scale), row_kw)
        if not final and not combine:                      # the old variant: the splits combined with torch ops
            lse2 = _combine_row_stats(m_part.view(splits, B, Hq, max_m), l_part.view(splits, B, Hq, max_m))
    elif variant != "old":
        lse2 = lse                                         # converted to log2 units in the column kernel
    else:
        lse2 = lse.float() * LOG2E
        lse2 = torch.where(torch.isneginf(lse2), torch.full_like(lse2, float("inf")), lse2)
    if saved:
        col_args = (x_scores, lse2, out, cu_seqlens_q, cu_seqlens_k, *col_ints, qk_scale)
    else:
        col_args = (q, k, block_table, lse2, out, cu_seqlens_q, cu_seqlens_k, *col_ptrs, *col_ints, qk_scale)
    col_compiled = _launch(col_fn, col_grid, col_args, col_kw)
    if ck is not None and ck not in _direct_launchers:
        row_l = _build_direct(_row_stats_kernel, row_compiled, row_kw, (splits, row_blocks, B * Hkv), row_ints) \
            if row_pass else None
        col_l = _build_direct(col_fn, col_compiled, col_kw, col_grid, col_ints)
        ws_l = _ws_direct(q, k, lse2, cu_seqlens_q, cu_seqlens_k, varlen) if use_ws else None
        ok = col_l is not None and (row_l is not None or not row_pass) and (ws_l is not None or not use_ws)
        _direct_launchers[ck] = _Direct(row_l, col_l, off_m, off_l, off_lse, off_part, n_scratch, n_count, off_cc,
                                        off_x if saved else -1, long, combine, k_box, ws_l) if ok else False
    return out


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
