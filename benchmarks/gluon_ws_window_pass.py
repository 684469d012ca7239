"""Experiment (issue 19, twenty-fourth session; not in the product): the window column pass on Hopper (sm_90),
warp-specialised, in Gluon: a query window's column sums given its lse.

Result on the H200 (image torch 2.11 / Triton 3.6; benchmarks/ws_window.py, results/h200_kernels/
ws_window_visit26.json; Nsight Compute: ncu_ws_window_visit26.json): correct against float64 at every config (worst
relative error 2.1e-6), and slower than the product's persistent Triton window kernel at every shape timed. Window 64,
GQA 32/8, N = 128k, fp16, lse given, medians of 3 alternations: product 0.172 ms; here 0.187 at best (128-key tiles,
one program per SM), 0.208 with 64-key tiles at two programs per SM, 0.23 at one; transposed (keys on the wgmma's
rows, the row sums inside a quad: no shared memory, but 16 lse values per thread and chunk) 0.33. Window 32: product
0.115, here 0.125 at best; N = 8k: 0.020 vs 0.025. Nsight Compute at 128k: the product's kernel 168 µs, tensor pipe
46%, 213 registers (likely its group's rows held in registers as the dot's operand; not checked in its SASS), stalls
led by `wait`; here 188–225 µs, tensor pipe 34–41%, led by `barrier` stalls (2–3.5 per issue): every tile's column sum
crosses the consumer's four warps through shared memory (gl.sum over the rows: a named barrier and bank conflicts),
and every mbarrier arrive takes a partition barrier first. Not pursued further; what might close the gap: the group's
rows as the wgmma's register operand, or the transposed layout with its lse in shared memory.

Twenty-fifth session: **the fold** (configs *_tf; FOLD): in the transposed layout each thread's 64-row chunk spans 16
query rows, so the per-step lse loads were most of its cost. Instead the wgmma subtracts the lse itself: one more
k-step per chunk, ones[key, j] · (−part_j[row]) with lse2 / scale split into four values of the operands' dtype
(their sum equals it to float32 precision; _fold_lse writes them to shared memory once per program, half per
consumer), so x = (q·kᵀ − lse2 / scale)·scale and no thread holds a row's lse. On the H200 (image torch 2.11 /
Triton 3.6, results/h200_kernels/ws_window_visit27_fold*.json, 3 alternations, window 64, GQA 32/8, N = 128k, fp16,
lse given): **2cta_tf 0.164–0.166 ms against the product's 0.170–0.171** in the same run, 1cta_tf128 0.166–0.167 vs
0.170–0.172, 1cta_tf 0.177–0.180: the first Gluon window pass faster than the product (−3%), far from the goal's
0.12. Checked against float64 in the first case of ws_window.py's check only (1.07e-6, WS_WINDOW_CASES=1: the device
time ran out); the other six cases and varlen have not run with the fold. The first fold run hung: a consumer with
no tiles never arrived on the lse parts' barrier (fixed: both consumers write their half before looking at their
tiles; the runs above are after the fix).

Two compiler facts found on the way: (1) ptxas moves the exp2 of straight-line (statically unrolled) chunks past the
next wgmma's wait, so all four chunks' accumulators stay live (spills, no overlap); one runtime loop step per chunk,
issue → exp2 → wait in one basic block, keeps each chunk's 32 exp2 inside its wgmma window. (2) Gluon passes a
worker partition's constexpr arguments as runtime values (an `if` on them branches at run time and cannot change a
value's type); the flags here travel as the length of a shared-memory array (`mode`).

colreduce.py's persistent window kernel (_window_column_kernel, PERSISTENT) runs one warp group per program, two
programs per SM: it waits for a key tile, runs the q·kᵀ of the group's rows, then their exp2, and the tensor pipe
idles during the exp2 unless the other program happens to be in its matmul (Nsight Compute on the H200, twenty-first
session: 46% tensor-pipe use at window 64, GQA 32/8, N = 128k with the lse given, 0.167 ms; a read of K takes 0.079).
Here each program (a run of consecutive key tiles of one sequence × kv head, as the persistent kernel's) has
- a producer warp that loads the group's query rows once (NCHUNK chunks of 64 rows), then the run's key tiles into
  a ring of NSLOT shared-memory slots by TMA (`ready` / `empty` mbarriers);
- two consumer warp groups that take the run's tiles in turn (consumer c the tiles c, c + 2, …); per tile each
  runs one wgmma per 64-row chunk and issues the next chunk's (or its next tile's first) before this chunk's exp2,
  so a warp group's own exp2 overlaps its own wgmma, and the two warp groups overlap each other.
Per chunk: p = exp2(q·kᵀ·scale − lse2) (keys on columns, query rows on rows), summed over the tile's chunks
elementwise; at the tile's end the sum over its 64 rows gives the tile's column values (sum; mean over the queries
that see each key; the group's mean or sum over its heads: the fused cases of colreduce.py's _fuse_heads).

Rows: dense contiguous (B, Hq, M, D) is read as (B·Hq·M, D), where a kv group's G·M rows are consecutive, so the
chunks cover them with no padding (row r of the group: head r // M, query r % M); varlen (total, Hq, D) with adjacent
heads as (total, Hq·D): CPH = cdiv(max_m, 64) chunks per head. Rows past the group's (the next head's, the next
sequence's, TMA's zeros) get lse2 = +inf: p = 0. Keys: dense (B·Hkv·N, D), varlen (total_k, Hkv·D); a tile's keys
past the sequence are masked (only the run's last tile can hold them, and the causal diagonal), and not stored.
Gluon has no interpreter: benchmarks/ws_window.py checks it against float64 on sm_90, then times it.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from colreduce_kvprune.kernels.colreduce_ws import _descriptor, _matrix

HALF = gl.constexpr(64)       # query rows per chunk (one wgmma M)
CONFIGS = {    # name -> (keys per tile, slots, maxnreg, consumer registers, programs per SM, transposed: keys on rows,
               #          fold: the lse subtracted by the wgmma, _fold_lse)
    "2cta": (64, 2, 80, 104, 2, False, False),  # two programs per SM: 12 warps × 80 registers (as colreduce_ws.py's)
    "2cta_n32": (32, 4, 80, 104, 2, False, False),
    "1cta": (64, 4, 160, 200, 1, False, False),
    "1cta_r232": (64, 4, 168, 232, 1, False, False),
    "1cta_n128": (128, 3, 168, 232, 1, False, False),
    "2cta_t": (64, 2, 80, 104, 2, True, False),
    "1cta_t": (64, 4, 160, 200, 1, True, False),
    "2cta_tf": (64, 2, 80, 104, 2, True, True),
    "1cta_tf": (64, 4, 160, 200, 1, True, True),
    "1cta_tf128": (128, 3, 168, 232, 1, True, True),
}
FOLD_K = gl.constexpr(16)     # the fold's extra k columns (one k-step of a 16-bit wgmma): 4 parts of the lse, 12 zeros
FOLD_PARTS = gl.constexpr(4)
CONFIG = "2cta_tf"      # the fastest on the H200 (twenty-fifth session); check() runs it and 1cta_n128


@gluon.constexpr_function
def _score_layout(t, block):
    """The wgmma result of a chunk: [keys (64), rows (64)] (t, transposed) or [rows (64), keys (block)]."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64 if t else block, 16])


@gluon.constexpr_function
def _lse_dim(t):
    """The dimension a chunk's lse2 slices off the score tile: its keys (t: columns hold the rows), else columns."""
    return 0 if t else 1


@gluon.constexpr_function
def _mode(*flags):
    """The flags as one number (1 + their bits): the length of the `mode` array the partitions receive."""
    return 1 + sum(int(bool(f)) << i for i, f in enumerate(flags))


@gluon.constexpr_function
def _flag(mode_len, i):
    """Flag i of a `mode` array's length (_mode): FLAT, IS_CAUSAL, LSE_NATURAL, MEAN, GROUP_MEAN, T, FOLD."""
    return bool((mode_len - 1) >> i & 1)


@gluon.jit
def _chunk_rows(c, Mb, G: gl.constexpr, FLAT: gl.constexpr, CPH: gl.constexpr, LAYOUT: gl.constexpr):
    """(head in the group, query index, in range) of the 64 rows of chunk c."""
    a = gl.arange(0, HALF, layout=LAYOUT)
    if FLAT:                                             # dense: the group's G·M rows, consecutive
        r = c * HALF + a
        g = r // gl.maximum(Mb, 1)
        return g, r - g * Mb, r < G * Mb
    else:                                                # varlen: CPH chunks per head
        m = (c % CPH) * HALF + a
        return gl.zeros_like(m) + c // CPH, m, m < Mb


@gluon.jit
def _chunk_lse(LSE, b, hk, q0, Mb, slb, slh, slm, lse_q0, c, G: gl.constexpr, FLAT: gl.constexpr,
               CPH: gl.constexpr, LSE_NATURAL: gl.constexpr, LAYOUT: gl.constexpr):
    """lse2 (log2 units) of chunk c's rows, +inf for rows out of range and rows that see no key."""
    g, m, ok = _chunk_rows(c, Mb, G, FLAT, CPH, LAYOUT)
    ptrs = LSE + b * slb + (hk * G + g) * slh + (q0 * lse_q0 + m) * slm
    if LSE_NATURAL:                                      # the caller's natural-log lse, -inf for a row seeing nothing
        lse2 = gl.load(ptrs, mask=ok, other=float("inf")).to(gl.float32) * 1.4426950408889634
        return gl.where(lse2 == float("-inf"), float("inf"), lse2)
    else:
        return gl.load(ptrs, mask=ok, other=float("inf"))


@gluon.constexpr_function
def _fold_chunks(fold, nchunk):
    """Chunks of the fold's lse parts held in shared memory (one, unused, without the fold)."""
    return nchunk if fold else 1


@gluon.jit
def _fold_lse(LSE, l_smem, ones_smem, l_bar, b, hk, q0, Mb, slb, slh, slm, lse_q0, qk_scale, G: gl.constexpr,
              FLAT: gl.constexpr, CPH: gl.constexpr, LSE_NATURAL: gl.constexpr, C: gl.constexpr):
    """The fold (T only): x = (q·kᵀ − lse2 / scale)·scale, the subtraction done by the chunk's wgmma as one more
    k-step, ones[key, j] · (−part_j[row]), so no thread holds its columns' lse. lse2 / scale (fp32) is split into
    FOLD_PARTS values of the operands' dtype, each the rounding of what the previous ones left, so their sum equals
    it to the float32's precision (4 × 8 bits for bf16, 4 × 11 for fp16); rows out of range or seeing no key get
    30000 (p = 0). Consumer C writes chunks C, C + 2, … (and consumer 0 the ones tile), then both wait for l_bar."""
    NCHUNK: gl.constexpr = l_smem.type.shape[0]
    DT: gl.constexpr = l_smem.dtype
    BL: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
    j = gl.arange(0, FOLD_K, layout=gl.SliceLayout(0, BL))[None, :]
    for c in gl.static_range(C, NCHUNK, 2):
        lse2 = _chunk_lse(LSE, b, hk, q0, Mb, slb, slh, slm, lse_q0, c, G, FLAT, CPH, LSE_NATURAL,
                          gl.SliceLayout(1, BL))
        rest = gl.where(lse2 == float("inf"), 30000.0, lse2 / qk_scale)
        tile = gl.zeros([HALF, FOLD_K], gl.float32, layout=BL)
        for part in gl.static_range(FOLD_PARTS):
            h = rest.to(DT).to(gl.float32)
            tile = gl.where(j == part, -h[:, None], tile)
            rest = rest - h
        l_smem.index(c).store(tile.to(DT))
    if C == 0:
        BLOCK: gl.constexpr = ones_smem.type.shape[0]
        ones = gl.where(gl.arange(0, FOLD_K, layout=gl.SliceLayout(0, BL))[None, :] < FOLD_PARTS, 1.0, 0.0)
        ones_smem.store((ones + gl.zeros([BLOCK, FOLD_K], gl.float32, layout=BL)).to(DT))
    fence_async_shared()
    mbarrier.arrive(l_bar, count=1)
    mbarrier.wait(l_bar, 0)


@gluon.jit
def _issue(q_smem, k_smem, l_smem, ones_smem, c, i, zero, T: gl.constexpr, FOLD: gl.constexpr):
    """Chunk c of run-local key tile i: its wgmma (T: keys on rows, k·qᵀ; FOLD: then − the rows' lse2 / scale),
    issued, not waited for."""
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    if T:
        s = warpgroup_mma(k_smem.index(i % NSLOT), q_smem.index(c).permute((1, 0)), zero, use_acc=False,
                          is_async=True)
        if FOLD:
            s = warpgroup_mma(ones_smem, l_smem.index(c).permute((1, 0)), s, use_acc=True, is_async=True)
        return s
    else:
        return warpgroup_mma(q_smem.index(c), k_smem.index(i % NSLOT).permute((1, 0)), zero, use_acc=False,
                             is_async=True)


@gluon.jit
def _columns(pacc, t, Out, b, hk, k0, Mb, Nb, sob, soh, son, G: gl.constexpr, IS_CAUSAL: gl.constexpr,
             MEAN: gl.constexpr, GROUP_MEAN: gl.constexpr, T: gl.constexpr):
    """Key tile t's column values from the sum of its chunks' p (T: already summed over the rows), stored."""
    if T:
        BLOCK: gl.constexpr = pacc.type.shape[0]
        col = pacc
        n = t * BLOCK + gl.arange(0, BLOCK, layout=pacc.type.layout)
    else:
        BLOCK: gl.constexpr = pacc.type.shape[1]
        OUT: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        col = gl.convert_layout(gl.sum(pacc, 0), OUT)
        n = t * BLOCK + gl.arange(0, BLOCK, layout=OUT)
    col = column_values(col, n, Mb, Nb, G, IS_CAUSAL, MEAN, GROUP_MEAN)
    gl.store(Out + b * sob + hk * soh + (k0 + n) * son, col, mask=n < Nb)


@gluon.jit
def column_values(col, n, Mb, Nb, G, IS_CAUSAL: gl.constexpr, MEAN: gl.constexpr, GROUP_MEAN: gl.constexpr):
    """Keys n's sums over the group's rows as the call's column values: MEAN over the queries that see each key
    (causal: query m sees key n iff n <= m + Nb − Mb), GROUP_MEAN over the group's G heads
    (benchmarks/gluon_ws_causal_column.py uses it too)."""
    if MEAN:
        if IS_CAUSAL:
            count = gl.minimum(gl.maximum(Mb - gl.maximum(n - (Nb - Mb), 0), 0), Mb)
        else:
            count = gl.zeros_like(n) + Mb
        col = gl.where(count > 0, col / gl.maximum(count, 1).to(gl.float32), 0.0)
    if GROUP_MEAN:
        col = col / G
    return col


@gluon.jit
def _p(s, lse2, c, t, Mb, Nb, qk_scale, G: gl.constexpr, FLAT: gl.constexpr, CPH: gl.constexpr,
       IS_CAUSAL: gl.constexpr, MASKED: gl.constexpr):
    """exp2(s·scale − lse2) of chunk c against key tile t; 0 where a row does not see a key (MASKED: the ragged
    end, the causal diagonal; rows out of range have lse2 = +inf)."""
    BLOCK: gl.constexpr = s.type.shape[1]
    MMA: gl.constexpr = s.type.layout
    x = s * qk_scale - lse2[:, None]
    if MASKED:
        n = t * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, MMA))
        if IS_CAUSAL:
            _, m, _ = _chunk_rows(c, Mb, G, FLAT, CPH, gl.SliceLayout(1, MMA))
            x = gl.where((n[None, :] < Nb) & (n[None, :] <= m[:, None] + (Nb - Mb)), x, float("-inf"))
        else:
            x = gl.where(n[None, :] < Nb, x, float("-inf"))
    return gl.exp2(x)


@gluon.jit
def _add(acc, s, lse2, c, t, Mb, Nb, qk_scale, G: gl.constexpr, FLAT: gl.constexpr, CPH: gl.constexpr,
         IS_CAUSAL: gl.constexpr, MASKED: gl.constexpr, T: gl.constexpr, FOLD: gl.constexpr):
    """acc plus chunk c's p: elementwise ([rows, keys]), or T: s is [keys, rows], its p summed over the rows (in
    the thread and its quad: no shared memory), acc [keys]. FOLD: s already holds q·kᵀ − lse2 / scale."""
    if T:
        BLOCK: gl.constexpr = s.type.shape[0]
        MMA: gl.constexpr = s.type.layout
        if FOLD:
            x = s * qk_scale
        else:
            x = s * qk_scale - lse2[None, :]
        if MASKED:
            n = t * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, MMA))
            if IS_CAUSAL:
                _, m, _ = _chunk_rows(c, Mb, G, FLAT, CPH, gl.SliceLayout(0, MMA))
                x = gl.where((n[:, None] < Nb) & (n[:, None] <= m[None, :] + (Nb - Mb)), x, float("-inf"))
            else:
                x = gl.where(n[:, None] < Nb, x, float("-inf"))
        return acc + gl.sum(gl.exp2(x), 1)
    else:
        return acc + _p(s, lse2, c, t, Mb, Nb, qk_scale, G, FLAT, CPH, IS_CAUSAL, MASKED)


@gluon.jit
def _step(q_smem, k_smem, l_smem, ones_smem, ready, empty, u, s, pacc, lse2, t0, LSE, Out, b, hk, q0, k0, Mb, Nb,
          slb, slh, slm, lse_q0, sob, soh, son, qk_scale, G: gl.constexpr, FLAT: gl.constexpr, CPH: gl.constexpr,
          IS_CAUSAL: gl.constexpr, LSE_NATURAL: gl.constexpr, MEAN: gl.constexpr, GROUP_MEAN: gl.constexpr,
          C: gl.constexpr, MASKED: gl.constexpr, T: gl.constexpr, FOLD: gl.constexpr):
    """Step u of consumer C (chunk u % NCHUNK of its tile u // NCHUNK), entered with s = that chunk's scores and
    lse2 its rows': issues step u + 1's wgmma, adds this chunk's p while it runs, waits for it. One basic block
    from the issue to the wait (a branch in between makes ptxas wait at once; and in straight-line code over the
    chunks ptxas moved the exp2 past the wait, ahead of the next issue). Returns step u + 1's (s, pacc, lse2)."""
    NCHUNK: gl.constexpr = q_smem.type.shape[0]
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    c = u % NCHUNK
    i = C + 2 * (u // NCHUNK)
    u1 = u + 1
    c1 = u1 % NCHUNK
    i1 = C + 2 * (u1 // NCHUNK)
    if c1 == 0:                                          # the next tile's copy
        mbarrier.wait(ready.index(i1 % NSLOT), (i1 // NSLOT) & 1)
    token = _issue(q_smem, k_smem, l_smem, ones_smem, c1, i1, gl.zeros_like(s), T, FOLD)
    LSE_LAYOUT: gl.constexpr = lse2.type.layout
    if FOLD:
        lse_next = lse2
    else:
        lse_next = _chunk_lse(LSE, b, hk, q0, Mb, slb, slh, slm, lse_q0, c1, G, FLAT, CPH, LSE_NATURAL, LSE_LAYOUT)
    pacc = _add(pacc, s, lse2, c, t0 + i, Mb, Nb, qk_scale, G, FLAT, CPH, IS_CAUSAL, MASKED, T, FOLD)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
    if c1 == NCHUNK - 1:                                 # tile i1's last wgmma done: its slot goes back
        mbarrier.arrive(empty.index(i1 % NSLOT), count=1)
    if c == NCHUNK - 1:                                  # tile i's columns
        _columns(pacc, t0 + i, Out, b, hk, k0, Mb, Nb, sob, soh, son, G, IS_CAUSAL, MEAN, GROUP_MEAN, T)
        pacc = gl.zeros_like(pacc)
    return s, pacc, lse_next


@gluon.jit
def _consume(q_smem, k_smem, l_smem, ones_smem, q_bar, l_bar, ready, empty, LSE, Out, b, hk, q0, k0, Mb, Nb, t0, n_local, n_full, slb, slh,
             slm, lse_q0, sob, soh, son, qk_scale, G, CPH, mode, C: gl.constexpr):
    """Consumer C: run-local tiles C, C + 2, … of n_local, chunk by chunk; the first n_full tiles of the run need
    no mask (the consumer's last tile takes the mask in any case)."""
    FLAT: gl.constexpr = _flag(mode.type.shape[0], 0)
    IS_CAUSAL: gl.constexpr = _flag(mode.type.shape[0], 1)
    LSE_NATURAL: gl.constexpr = _flag(mode.type.shape[0], 2)
    MEAN: gl.constexpr = _flag(mode.type.shape[0], 3)
    GROUP_MEAN: gl.constexpr = _flag(mode.type.shape[0], 4)
    T: gl.constexpr = _flag(mode.type.shape[0], 5)
    FOLD: gl.constexpr = _flag(mode.type.shape[0], 6)
    NCHUNK: gl.constexpr = q_smem.type.shape[0]
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    BLOCK: gl.constexpr = k_smem.type.shape[1]
    MMA: gl.constexpr = _score_layout(T, BLOCK)
    LSE_LAYOUT: gl.constexpr = gl.SliceLayout(_lse_dim(T), MMA)
    n_mine = gl.maximum(n_local - C + 1, 0) // 2
    if FOLD:    # both consumers, tiles or not: each writes half the lse parts and the other waits for them
        _fold_lse(LSE, l_smem, ones_smem, l_bar, b, hk, q0, Mb, slb, slh, slm, lse_q0, qk_scale, G, FLAT, CPH,
                  LSE_NATURAL, C)
    if n_mine > 0:
        n_unmasked = gl.minimum(gl.maximum(n_full - C + 1, 0) // 2, n_mine - 1)
        last = n_mine * NCHUNK - 1
        if T:
            zero = gl.zeros([BLOCK, HALF], gl.float32, layout=MMA)
            pacc = gl.zeros([BLOCK], gl.float32, layout=gl.SliceLayout(1, MMA))
        else:
            zero = gl.zeros([HALF, BLOCK], gl.float32, layout=MMA)
            pacc = zero
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(ready.index(C % NSLOT), (C // NSLOT) & 1)
        token = _issue(q_smem, k_smem, l_smem, ones_smem, 0, C, zero, T, FOLD)
        if FOLD:
            lse2 = gl.zeros([HALF], gl.float32, layout=LSE_LAYOUT)
        else:
            lse2 = _chunk_lse(LSE, b, hk, q0, Mb, slb, slh, slm, lse_q0, 0, G, FLAT, CPH, LSE_NATURAL, LSE_LAYOUT)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
        if NCHUNK == 1:
            mbarrier.arrive(empty.index(C % NSLOT), count=1)
        for u in range(0, n_unmasked * NCHUNK):
            s, pacc, lse2 = _step(q_smem, k_smem, l_smem, ones_smem, ready, empty, u, s, pacc, lse2, t0, LSE, Out, b,
                                  hk, q0, k0, Mb, Nb, slb, slh, slm, lse_q0, sob, soh, son, qk_scale, G, FLAT, CPH,
                                  IS_CAUSAL, LSE_NATURAL, MEAN, GROUP_MEAN, C, False, T, FOLD)
        for u in range(n_unmasked * NCHUNK, last):
            s, pacc, lse2 = _step(q_smem, k_smem, l_smem, ones_smem, ready, empty, u, s, pacc, lse2, t0, LSE, Out, b,
                                  hk, q0, k0, Mb, Nb, slb, slh, slm, lse_q0, sob, soh, son, qk_scale, G, FLAT, CPH,
                                  IS_CAUSAL, LSE_NATURAL, MEAN, GROUP_MEAN, C, True, T, FOLD)
        i = C + 2 * (n_mine - 1)                         # the last step: chunk NCHUNK − 1 of the last tile
        pacc = _add(pacc, s, lse2, NCHUNK - 1, t0 + i, Mb, Nb, qk_scale, G, FLAT, CPH, IS_CAUSAL, True, T, FOLD)
        _columns(pacc, t0 + i, Out, b, hk, k0, Mb, Nb, sob, soh, son, G, IS_CAUSAL, MEAN, GROUP_MEAN, T)


@gluon.jit
def _consumer0(Q_desc, K_desc, q_smem, k_smem, l_smem, ones_smem, q_bar, l_bar, ready, empty, LSE, Out, b, hk, q0,
               k0, Mb, Nb, q_row, q_col, k_row, k_col, t0, n_local, n_full, slb, slh, slm, lse_q0, sob, soh, son,
               qk_scale, G, CPH, mode):
    """Every partition takes this argument list. Gluon passes a worker's constexpr arguments as runtime values (its
    `if` on them would branch at run time, and could not change a value's type): the flags travel as the shape of
    `mode`, a shared-memory array nothing reads (_mode, _flag)."""
    _consume(q_smem, k_smem, l_smem, ones_smem, q_bar, l_bar, ready, empty, LSE, Out, b, hk, q0, k0, Mb, Nb, t0,
             n_local, n_full, slb, slh, slm, lse_q0, sob, soh, son, qk_scale, G, CPH, mode, 0)


@gluon.jit
def _consumer1(Q_desc, K_desc, q_smem, k_smem, l_smem, ones_smem, q_bar, l_bar, ready, empty, LSE, Out, b, hk, q0,
               k0, Mb, Nb, q_row, q_col, k_row, k_col, t0, n_local, n_full, slb, slh, slm, lse_q0, sob, soh, son,
               qk_scale, G, CPH, mode):
    _consume(q_smem, k_smem, l_smem, ones_smem, q_bar, l_bar, ready, empty, LSE, Out, b, hk, q0, k0, Mb, Nb, t0,
             n_local, n_full, slb, slh, slm, lse_q0, sob, soh, son, qk_scale, G, CPH, mode, 1)


@gluon.jit
def _producer(Q_desc, K_desc, q_smem, k_smem, l_smem, ones_smem, q_bar, l_bar, ready, empty, LSE, Out, b, hk, q0,
              k0, Mb, Nb, q_row, q_col, k_row, k_col, t0, n_local, n_full, slb, slh, slm, lse_q0, sob, soh, son,
              qk_scale, G, CPH, mode):
    """The group's row chunks, then the run's key tiles into the ring: slot i % NSLOT once tile i − NSLOT's consumer
    handed it back (a fresh mbarrier passes the wait for phase 1, so the first NSLOT go at once)."""
    FLAT: gl.constexpr = _flag(mode.type.shape[0], 0)
    NCHUNK: gl.constexpr = q_smem.type.shape[0]
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    BLOCK: gl.constexpr = k_smem.type.shape[1]
    D: gl.constexpr = q_smem.type.shape[2]
    mbarrier.expect(q_bar, NCHUNK * Q_desc.block_type.nbytes)
    for c in gl.static_range(NCHUNK):
        if FLAT:
            tma.async_copy_global_to_shared(Q_desc, [q_row + c * HALF, q_col], q_bar, q_smem.index(c))
        else:
            tma.async_copy_global_to_shared(Q_desc, [q_row + (c % CPH) * HALF, q_col + (c // CPH) * D], q_bar,
                                            q_smem.index(c))
    for i in range(n_local):
        slot = i % NSLOT
        mbarrier.wait(empty.index(slot), ((i // NSLOT) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), K_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(K_desc, [k_row + (t0 + i) * BLOCK, k_col], ready.index(slot),
                                        k_smem.index(slot))


@gluon.jit(do_not_specialize=["Hq", "max_m", "max_n", "slb", "slh", "slm", "sob", "soh", "son"])
def _ws_window_kernel(Q_desc, K_desc, LSE, Out, cu_q, cu_k, Hq, max_m, max_n, slb, slh, slm, lse_q0, sob, soh, son,
                      qk_scale, G: gl.constexpr, D: gl.constexpr, IS_VARLEN: gl.constexpr, IS_CAUSAL: gl.constexpr,
                      LSE_NATURAL: gl.constexpr, MEAN: gl.constexpr, GROUP_MEAN: gl.constexpr,
                      NCHUNK: gl.constexpr, CPH: gl.constexpr, NSLOT: gl.constexpr, BLOCK: gl.constexpr,
                      REGS: gl.constexpr, T: gl.constexpr, FOLD: gl.constexpr):
    """Grid (P, B·Hkv): program p takes the key tiles p·T … p·T + T − 1 (T = cdiv(cdiv(max_n, BLOCK), P)) of one
    sequence × kv head. Out[b, hk, n] (dense, strides sob, soh, son) or Out[k0 + n, hk] (varlen)."""
    bh = gl.program_id(1)
    Hkv = Hq // G
    b = bh // Hkv
    hk = bh % Hkv
    if IS_VARLEN:
        q0 = gl.load(cu_q + b).to(gl.int32)              # int32 or int64 offsets; TMA takes int32 coordinates
        Mb = gl.load(cu_q + b + 1).to(gl.int32) - q0
        k0 = gl.load(cu_k + b).to(gl.int32)
        Nb = gl.load(cu_k + b + 1).to(gl.int32) - k0
        q_row, q_col, k_row, k_col = q0, hk * G * D, k0, hk * D
    else:
        q0, k0, Mb, Nb = 0, 0, max_m, max_n
        q_row, q_col, k_row, k_col = (b * Hq + hk * G) * max_m, 0, (b * Hkv + hk) * max_n, 0
    run = gl.cdiv(gl.cdiv(max_n, BLOCK), gl.num_programs(0))
    t0 = gl.program_id(0) * run
    n_local = gl.minimum(t0 + run, gl.cdiv(Nb, BLOCK)) - t0
    if n_local > 0:
        full = Nb
        if IS_CAUSAL:                                    # keys every row sees: up to the first row's diagonal
            full = gl.minimum(gl.maximum(Nb - Mb + 1, 0), Nb)
        n_full = gl.minimum(gl.maximum(full // BLOCK - t0, 0), n_local)
        q_smem = gl.allocate_shared_memory(Q_desc.dtype, [NCHUNK, HALF, D], Q_desc.layout)
        k_smem = gl.allocate_shared_memory(K_desc.dtype, [NSLOT, BLOCK, D], K_desc.layout)
        FOLD_LAYOUT: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, FOLD_K], Q_desc.dtype)
        l_smem = gl.allocate_shared_memory(Q_desc.dtype, [_fold_chunks(FOLD, NCHUNK), HALF, FOLD_K], FOLD_LAYOUT)
        ones_smem = gl.allocate_shared_memory(Q_desc.dtype, [BLOCK, FOLD_K], FOLD_LAYOUT)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        l_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(l_bar, count=2)                    # one arrival per consumer (the fold's lse parts written)
        for i in gl.static_range(NSLOT):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        MODE: gl.constexpr = _mode(not IS_VARLEN, IS_CAUSAL, LSE_NATURAL, MEAN, GROUP_MEAN, T, FOLD)
        mode = gl.allocate_shared_memory(gl.int64, [MODE], mbarrier.MBarrierLayout())
        args = (Q_desc, K_desc, q_smem, k_smem, l_smem, ones_smem, q_bar, l_bar, ready, empty, LSE, Out, b, hk, q0,
                k0, Mb, Nb, q_row, q_col, k_row, k_col, t0, n_local, n_full, slb, slh, slm, lse_q0, sob, soh, son,
                qk_scale, G, CPH, mode)
        gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_producer, args)], [4, 1], [REGS, 24])


def chunks(G: int, max_m: int, varlen: bool) -> tuple[int, int]:
    """(chunks of 64 rows holding a kv group's query rows, chunks per head: 0 for dense, whose rows are flat)."""
    if varlen:
        cph = -(-max_m // HALF.value)
        return G * cph, cph
    return -(-G * max_m // HALF.value), 0


def launch(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, lse_strides: tuple, lse_q0: int, out: torch.Tensor,
           out_strides: tuple, cu_q, cu_k, max_m: int, max_n: int, B: int, qk_scale: float, *, varlen: bool,
           is_causal: bool, lse_natural: bool, mean: bool, group_mean: bool, sms: int, config: str | None = None
           ) -> bool:
    """The column values of the call into out (colreduce.py's strides), given its lse (lse_natural: the caller's, in
    natural-log units; else colreduce.py's log2 scratch). False (nothing launched) where q or k's layout has no
    descriptor (_matrix)."""
    q2, k2 = _matrix(q, varlen), _matrix(k, varlen)
    if q2 is None or k2 is None:
        return False
    block_n, nslot, maxnreg, regs, per_sm, transposed, fold = CONFIGS[config or CONFIG]
    D, Hq, Hkv = q.shape[-1], q.shape[1], k.shape[1]
    G = Hq // Hkv
    nchunk, cph = chunks(G, max_m, varlen)
    if not varlen:
        cu_q = cu_k = out                               # unused placeholders (IS_VARLEN is False)
    programs = max(1, per_sm * sms // (B * Hkv))
    grid = (min(programs, -(-max_n // block_n)), B * Hkv)
    const = dict(G=G, D=D, IS_VARLEN=varlen, IS_CAUSAL=is_causal, LSE_NATURAL=lse_natural, MEAN=mean,
                 GROUP_MEAN=group_mean, NCHUNK=nchunk, CPH=cph, NSLOT=nslot, BLOCK=block_n, REGS=regs, T=transposed,
                 FOLD=fold)
    _ws_window_kernel[grid](_descriptor(q2, HALF.value, D), _descriptor(k2, block_n, D), lse, out, cu_q, cu_k, Hq,
                            max_m, max_n, *lse_strides, lse_q0, *out_strides, qk_scale, **const, num_warps=4,
                            maxnreg=maxnreg)
    return True


def compile_sm90(config: str = CONFIG, dtype: str = "fp16", D: int = 128, G: int = 4, M: int = 64,
                 varlen: bool = False):
    """The kernel compiled for sm_90 with the installed Triton (no GPU needed; tests/test_colreduce_compile.py):
    window M, GQA G, causal, sum / group mean, natural lse."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gluon_row_pass     # its Gluon compile helper and descriptor types
    block_n, nslot, maxnreg, regs, _, transposed, fold = CONFIGS[config]
    x2 = torch.empty(1024, D, dtype=dict(fp16=torch.float16, bf16=torch.bfloat16)[dtype])
    nchunk, cph = chunks(G, M, varlen)
    const = dict(G=G, D=D, IS_VARLEN=varlen, IS_CAUSAL=True, LSE_NATURAL=True, MEAN=False, GROUP_MEAN=True,
                 NCHUNK=nchunk, CPH=cph, NSLOT=nslot, BLOCK=block_n, REGS=regs, T=transposed, FOLD=fold)
    ptrs = dict(Q_desc=gluon_row_pass.descriptor_type(x2, HALF.value, D),
                K_desc=gluon_row_pass.descriptor_type(x2, block_n, D), LSE="*fp32", Out="*fp32", cu_q="*i32",
                cu_k="*i32")
    return gluon_row_pass.compile_gluon_sm90(_ws_window_kernel, const, ptrs, 4, maxnreg)


def check(device):
    """tests/test_experiments.py: benchmarks/ws_window.py's float64 check at the default config and the fastest one
    (sm_90 only)."""
    import os
    import sys
    import types
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ws_window          # (this module may be loaded under another name: its functions passed as a namespace)
    ws_window.check(types.SimpleNamespace(launch=launch, CONFIGS=CONFIGS),
                    torch.cuda.get_device_properties(device).multi_processor_count, lambda row: None,
                    configs=(CONFIG, "1cta_n128"))
