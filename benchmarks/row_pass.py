"""Experiment (issue 19, item 2: full causal 16k ≤ 1.0× SDPA): variants of the row pass, against a replica of the
product's.

At full causal 32/8, N = 16k on the H200 the product takes ~2.7 ms for its row pass (the row log-sum-exp) and ~2.2
ms for its column pass, against SDPA's 3.98 ms forward (benchmarks/results/h200_kernels, goal_tiles_visit18/19).
Per 128 × 64 row-pass tile the H200 needs ~490 clocks of MMA and ~510 of MUFU exp2: a loop that waits for each dot
before its exp2 costs their sum. The goal needs the row pass at ≤ 1.8 ms. Variants, each a constexpr of one kernel:

- LOOKAHEAD: the unmasked loop issues the next tile's q·kᵀ before the current tile's exp2 (the dot's result is
  carried to the next iteration), so an asynchronous wgmma can overlap the exp2 — FA3's intra-warpgroup overlap,
  written by hand.
- FUSED_SCALE: the running max in raw q·kᵀ units and exp2(s·scale − max·scale) as one FMA per element, instead of
  a multiply, a max and a subtract (the scale is positive, so the max commutes with it).
- WS: `tl.range(..., warp_specialize=True)` on the unmasked loop (Triton documents it for Blackwell; whether this
  Triton compiles it for Hopper is part of the experiment: an error is recorded, not raised).
- REVERSE: row blocks launched last-first, so the longest causal programs start first and the short ones fill the
  tail.
- FIXED: no running max. Each row takes one offset from the range's first key tile (its max + 8, log2 units) and
  sums exp2(s·scale − offset) into a 2-D accumulator: per element one FMA, one exp2 and one add, as in the column
  pass (~2.2 ms at 16k against the row pass's ~2.7 with the same q·kᵀ and exp2 counts), and no per-tile row
  reductions. Still exact: a causal row that sees any key of a range sees its first, so the row's max is at least
  the first tile's and what underflows is below 2^-118 of the largest term; a key more than 135 above the first
  tile's max overflows the row's sum to +inf, and such a row block is computed again with the running max (the
  check covers that case). Real prompts' first tokens (attention sinks) tend to hold the largest logits.
- POLY (with FIXED): part of each tile's exp2 on the FMA pipe instead of the MUFU (FA4's software exp2): 2^x =
  2^⌊x⌋ (an add into the float's exponent field) × p(x − ⌊x⌋), p a degree-5 polynomial (relative error 1.6e-7 in
  float32, about the MUFU ex2.approx's 2 ulp), x clamped to [-127, 128] so that x ≥ 128 still gives +inf (the
  fallback's signal), -inf (masked) gives 0 and what underflows stays below 2^-118 of the row's sum. POLY = 2:
  half of the columns (tl.split of column pairs), 1: a quarter. The MUFU does 16 exp2 per clock per SM, the FMA
  pipe 128 FP32 ops: at ~10 ops per software exp2 the two pipes balance near a third on the FMA pipe, if nothing
  else fills it.
- PAIR (with FIXED): each program's row block as two halves of BLOCK_R / 2 rows that share each key tile's load,
  with both halves' q·kᵀ issued before either half's exp2 — so that the second half's asynchronous wgmma can run
  while the first half's exp2 does (FA3's ping-pong of two tiles, within one warpgroup and without warp
  specialisation). Same registers as one BLOCK_R tile; whether Triton waits for both dots before the first exp2
  shows in the PTX (wgmma.wait_group 1 between them) and in the timing.
- POLY = 3 (with FIXED, "f16exp"): every exp2 at half precision on the MUFU, two per instruction
  (ex2.approx.f16x2, twice the f32 rate): x rounded to f16, 2^x in f16, widened to f32 and summed in f32. Not exact
  to float32: about 1e-3 relative per term (the fp16/bf16 tolerance of the product's tests, and about what a
  same-dtype torch softmax gives); the offset is the first tile's max without the + 8 (terms up to 2^16 fit in
  f16, so a key 16 above it overflows to +inf and takes the fallback), which keeps the typical x in [-8, 0] where
  f16 has 8–11 bits after the point. Whether halving the MUFU time moves the pass is what it measures.
- TMA (with FIXED): the key tiles through a tensor descriptor (the Hopper TMA unit, mbarrier-tracked copies into
  shared memory) instead of per-thread pointer loads: Nsight Compute showed the fixed-offset pass with its tensor
  pipe 55% active and warps stalled mostly at CTA barriers and fixed-latency waits (ncu_passes.py). K is read as
  one (B·Hkv·N, D) matrix: a ragged tile's rows past N are the next head's keys (or TMA's zeros past the end),
  which the causal mask drops as it drops keys ≥ N. Needs K contiguous.

Scope: dense (B, H, M, D) inputs, causal (bottom-right), one split of the keys, D a power of two. Output: the row
log-sum-exp in log2 units, (B, Hq, M), +inf for a row that sees no key (as the product's row pass). Not in the
product.

    python benchmarks/row_pass.py --check          # CPU: TRITON_INTERPRET=1, small shapes vs float64, every variant
    python benchmarks/row_pass.py --out DIR        # GPU: the variants at full causal 32/8 16k, 8k and 4k fp16, against
                                                   # the replica, SDPA's forward and the product's two passes
"""
from __future__ import annotations

import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_path import _bench_kernels  # noqa: E402 (benchmarks/kernels.py loaded once, as prune_path loads it)
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

LOG2E = 1.4426950408889634
_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")   # inline PTX (the interpreter runs none)


@triton.jit
def _tile(q, K_head, n0, m, shift, N, skn, qk_scale, d, MASKED: tl.constexpr, FUSED_SCALE: tl.constexpr,
          PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, K_desc=None, kd_row=0, TMA: tl.constexpr = False):
    """q·kᵀ of the key tile [n0, n0 + BLOCK_N) (raw units when FUSED_SCALE, else times qk_scale). TMA: the tile from
    K_desc's rows kd_row + n0 … (whatever lies past N is masked below, as keys ≥ N)."""
    n = n0 + tl.arange(0, BLOCK_N)
    if TMA:
        kt = K_desc.load([kd_row + n0, 0]).T
    elif MASKED:
        kt = tl.load(K_head + n[None, :] * skn + d[:, None], mask=n[None, :] < N, other=0.0)
    else:
        kt = tl.load(K_head + n[None, :] * skn + d[:, None])
    s = tl.dot(q, kt, input_precision=PRECISION)
    if not FUSED_SCALE:
        s = s * qk_scale
    if MASKED:
        s = tl.where((n[None, :] < N) & (n[None, :] <= m[:, None] + shift), s, float("-inf"))
    return s


@triton.jit
def _update(s, m_i, l_i, qk_scale, MASKED: tl.constexpr, FUSED_SCALE: tl.constexpr):
    """Online (max, sum of exp2) update of the rows with one tile's s."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)        # rows that have seen nothing yet
    else:
        m_sub = m_new
    if FUSED_SCALE:
        c = m_sub * qk_scale
        l_i = l_i * tl.exp2(m_i * qk_scale - c) + tl.sum(tl.exp2(s * qk_scale - c[:, None]), 1)
    else:
        l_i = l_i * tl.exp2(m_i - m_sub) + tl.sum(tl.exp2(s - m_sub[:, None]), 1)
    return m_new, l_i


@triton.jit
def _online_lse2(q, K_head, m, shift, N, skn, qk_scale, d, full_end, hi, LOOKAHEAD: tl.constexpr,
                 FUSED_SCALE: tl.constexpr, WS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Row lse (log2 units, +inf for a row that sees no key) with a running max, as the product's row pass."""
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    if LOOKAHEAD:
        if full_end > 0:
            s = _tile(q, K_head, 0, m, shift, N, skn, qk_scale, d, False, FUSED_SCALE, PRECISION, BLOCK_N)
            for n0 in range(BLOCK_N, full_end, BLOCK_N):
                s_next = _tile(q, K_head, n0, m, shift, N, skn, qk_scale, d, False, FUSED_SCALE, PRECISION,
                               BLOCK_N)
                m_i, l_i = _update(s, m_i, l_i, qk_scale, False, FUSED_SCALE)
                s = s_next
            m_i, l_i = _update(s, m_i, l_i, qk_scale, False, FUSED_SCALE)
    else:
        for n0 in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
            s = _tile(q, K_head, n0, m, shift, N, skn, qk_scale, d, False, FUSED_SCALE, PRECISION, BLOCK_N)
            m_i, l_i = _update(s, m_i, l_i, qk_scale, False, FUSED_SCALE)
    for n0 in range(full_end, hi, BLOCK_N):              # the diagonal and the ragged end
        s = _tile(q, K_head, n0, m, shift, N, skn, qk_scale, d, True, FUSED_SCALE, PRECISION, BLOCK_N)
        m_i, l_i = _update(s, m_i, l_i, qk_scale, True, FUSED_SCALE)
    if FUSED_SCALE:
        m_i = m_i * qk_scale
    return tl.where(l_i == 0, float("inf"), m_i + tl.log2(l_i))


@triton.jit
def _poly_exp2(x):
    """2^x on the FMA pipe: p(f)·2^⌊x⌋ with f = x − ⌊x⌋ and the power of two added into the exponent field. x is
    clamped to [-127, 128], where p(0) = 1 exactly: 128 gives the exponent field all ones, +inf (an overflow stays
    visible), -127 gives 0 (so do masked scores, -inf); between -127 and -126 a value below 2^-126."""
    x = tl.minimum(tl.maximum(x, -127.0), 128.0)
    xi = tl.floor(x)
    f = x - xi
    p = 0.0018671179423108697 * f + 0.009017059579491615
    p = p * f + 0.05579989030957222
    p = p * f + 0.24016445875167847
    p = p * f + 0.6931512951850891
    p = p * f + 1.0
    return (p.to(tl.int32, bitcast=True) + (xi.to(tl.int32) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _exp2_f16(x):
    """2^x (float32 in and out) at half precision: x rounded to f16, ex2.approx.f16x2 (two exp2 per MUFU
    instruction), the result widened. Under the interpreter the same two roundings around an exact exp2."""
    h = x.to(tl.float16)
    if _ASM:
        h = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [h], dtype=tl.float16, is_pure=True,
                                      pack=2)
    else:
        h = tl.exp2(h.to(tl.float32)).to(tl.float16)
    return h.to(tl.float32)


@triton.jit
def _split_exp2_sum(acc, x, POLY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + exp2(x), elementwise. POLY 0: acc and x (BLOCK_R, BLOCK_N), every exp2 on the MUFU. POLY 1 or 2: acc is
    (BLOCK_R, BLOCK_N // 2, 2), the column pairs of x; POLY 2 takes the second of each pair in software (half),
    POLY 1 the second of every other pair (a quarter). Only the final row sum reads acc. POLY 3: acc and x
    (BLOCK_R, BLOCK_N), every exp2 at half precision (_exp2_f16)."""
    if POLY == 0:
        return acc + tl.exp2(x)
    elif POLY == 3:
        return acc + _exp2_f16(x)
    else:
        a, b = tl.split(tl.reshape(x, [BLOCK_R, BLOCK_N // 2, 2]))
        a = tl.exp2(a)
        if POLY == 2:
            b = _poly_exp2(b)
        else:
            b1, b2 = tl.split(tl.reshape(b, [BLOCK_R, BLOCK_N // 4, 2]))
            b = tl.reshape(tl.join(tl.exp2(b1), _poly_exp2(b2)), [BLOCK_R, BLOCK_N // 2])
        return acc + tl.join(a, b)


@triton.jit
def _fixed_offset_sums(q, K_head, m, shift, N, skn, qk_scale, d, full_end, hi, LOOKAHEAD: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, POLY: tl.constexpr = 0,
                       BLOCK_R: tl.constexpr = 16, K_desc=None, kd_row=0, TMA: tl.constexpr = False):
    """(c, l): per row one offset c (log2 units: the max of the range's first key tile, + 8) and l = Σ exp2(s − c)
    over the row's keys, summed into a 2-D accumulator — per element one FMA, one exp2 and one add, no per-tile
    row reductions and no rescaling. Exact where it does not overflow: in causal (and full) rows every key range
    that holds a visible key holds its first one, so the row's max is at least its first tile's and terms that
    underflow are below 2^-118 of the largest; a key more than 127 + 8 above the first tile's max overflows l to
    +inf, which the caller detects (and falls back to the running max)."""
    s0 = _tile(q, K_head, 0, m, shift, N, skn, qk_scale, d, True, True, PRECISION, BLOCK_N, K_desc, kd_row, TMA)   # raw units, masked
    m0 = tl.max(s0, 1) * qk_scale
    if POLY == 3:                                    # f16 terms: no headroom beyond 2^16, precision near 0
        c = tl.where(m0 == float("-inf"), 0.0, m0)
    else:
        c = tl.where(m0 == float("-inf"), 0.0, m0) + 8.0
    if POLY == 0 or POLY == 3:
        acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_N // 2, 2], tl.float32)
    acc = _split_exp2_sum(acc, s0 * qk_scale - c[:, None], POLY, BLOCK_R, BLOCK_N)
    if LOOKAHEAD:
        if full_end > BLOCK_N:
            s = _tile(q, K_head, BLOCK_N, m, shift, N, skn, qk_scale, d, False, True, PRECISION, BLOCK_N, K_desc, kd_row, TMA)
            for n0 in range(2 * BLOCK_N, full_end, BLOCK_N):
                s_next = _tile(q, K_head, n0, m, shift, N, skn, qk_scale, d, False, True, PRECISION, BLOCK_N, K_desc, kd_row, TMA)
                acc = _split_exp2_sum(acc, s * qk_scale - c[:, None], POLY, BLOCK_R, BLOCK_N)
                s = s_next
            acc = _split_exp2_sum(acc, s * qk_scale - c[:, None], POLY, BLOCK_R, BLOCK_N)
    else:
        for n0 in range(BLOCK_N, full_end, BLOCK_N):
            s = _tile(q, K_head, n0, m, shift, N, skn, qk_scale, d, False, True, PRECISION, BLOCK_N, K_desc, kd_row, TMA)
            acc = _split_exp2_sum(acc, s * qk_scale - c[:, None], POLY, BLOCK_R, BLOCK_N)
    for n0 in range(tl.maximum(full_end, BLOCK_N), hi, BLOCK_N):      # the diagonal and the ragged end
        s = _tile(q, K_head, n0, m, shift, N, skn, qk_scale, d, True, True, PRECISION, BLOCK_N, K_desc, kd_row, TMA)
        acc = _split_exp2_sum(acc, s * qk_scale - c[:, None], POLY, BLOCK_R, BLOCK_N)
    if POLY == 0 or POLY == 3:
        return c, tl.sum(acc, 1)
    else:
        return c, tl.sum(tl.sum(acc, 2), 1)


@triton.jit
def _pair_scores(q, kt, n, m, shift, N, qk_scale, c, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """s·scale − c of one half's rows against a loaded key tile (masked: -inf where a row does not see key n)."""
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale - c[:, None]
    if MASKED:
        s = tl.where((n[None, :] < N) & (n[None, :] <= m[:, None] + shift), s, float("-inf"))
    return s


@triton.jit
def _fixed_offset_pair(qa, qb, K_head, ma, mb, shift, N, skn, qk_scale, d, full_end, hi, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """_fixed_offset_sums for two halves of a row block at once (PAIR): each key tile loaded once, both halves'
    dots before either half's exp2. Returns (ca, la, cb, lb)."""
    n = tl.arange(0, BLOCK_N)
    kt = tl.load(K_head + n[None, :] * skn + d[:, None], mask=n[None, :] < N, other=0.0)
    sa = _pair_scores(qa, kt, n, ma, shift, N, qk_scale, ma * 0.0, True, PRECISION)
    sb = _pair_scores(qb, kt, n, mb, shift, N, qk_scale, mb * 0.0, True, PRECISION)
    fa = tl.max(sa, 1)
    fb = tl.max(sb, 1)
    ca = tl.where(fa == float("-inf"), 0.0, fa) + 8.0
    cb = tl.where(fb == float("-inf"), 0.0, fb) + 8.0
    acca = tl.exp2(sa - ca[:, None])
    accb = tl.exp2(sb - cb[:, None])
    for n0 in range(BLOCK_N, full_end, BLOCK_N):          # tiles both halves see whole
        n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(K_head + n[None, :] * skn + d[:, None])
        sa = _pair_scores(qa, kt, n, ma, shift, N, qk_scale, ca, False, PRECISION)
        sb = _pair_scores(qb, kt, n, mb, shift, N, qk_scale, cb, False, PRECISION)
        acca += tl.exp2(sa)
        accb += tl.exp2(sb)
    for n0 in range(tl.maximum(full_end, BLOCK_N), hi, BLOCK_N):      # the diagonal and the ragged end
        n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(K_head + n[None, :] * skn + d[:, None], mask=n[None, :] < N, other=0.0)
        sa = _pair_scores(qa, kt, n, ma, shift, N, qk_scale, ca, True, PRECISION)
        sb = _pair_scores(qb, kt, n, mb, shift, N, qk_scale, cb, True, PRECISION)
        acca += tl.exp2(sa)
        accb += tl.exp2(sb)
    return ca, tl.sum(acca, 1), cb, tl.sum(accb, 1)


@triton.jit
def _fixed_lse2_store(c, l_i, q, K_head, Out_row, m, shift, M, N, skn, qk_scale, d, full_end, hi,
                      PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores c + log2(l) (+inf where l is 0) for the rows m, or their running-max lse where a term overflowed."""
    lse2 = tl.where(l_i == 0, float("inf"), c + tl.log2(l_i))
    if tl.max(l_i, 0) == float("inf"):              # a term overflowed: this block again with a running max
        lse2 = _online_lse2(q, K_head, m, shift, N, skn, qk_scale, d, full_end, hi, False, False, False,
                            PRECISION, BLOCK_R, BLOCK_N)
    tl.store(Out_row + m, lse2, mask=m < M)


@triton.jit
def _row_lse_kernel(Q, K, K_desc, Out, sqb, sqh, sqm, skb, skh, skn, sob, soh, M, N, qk_scale,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    LOOKAHEAD: tl.constexpr, FUSED_SCALE: tl.constexpr, WS: tl.constexpr, REVERSE: tl.constexpr,
                    FIXED: tl.constexpr, PRECISION: tl.constexpr, POLY: tl.constexpr = 0, PAIR: tl.constexpr = False,
                    TMA: tl.constexpr = False):
    if REVERSE:
        rb = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        rb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    d = tl.arange(0, D)
    K_head = K + b * skb + (h // G) * skh
    shift = N - M                                        # query m sees key j iff j <= m + shift
    r_last = tl.minimum(rb * BLOCK_R + BLOCK_R, M) - 1
    hi = tl.minimum(N, r_last + shift + 1)
    full_hi = tl.minimum(hi, rb * BLOCK_R + shift + 1)
    full_end = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    if PAIR:
        ma = rb * BLOCK_R + tl.arange(0, BLOCK_R // 2)
        mb = ma + BLOCK_R // 2
        qa = tl.load(Q + b * sqb + h * sqh + ma[:, None] * sqm + d[None, :], mask=ma[:, None] < M, other=0.0)
        qb = tl.load(Q + b * sqb + h * sqh + mb[:, None] * sqm + d[None, :], mask=mb[:, None] < M, other=0.0)
        ca, la, cb, lb = _fixed_offset_pair(qa, qb, K_head, ma, mb, shift, N, skn, qk_scale, d, full_end, hi,
                                            PRECISION, BLOCK_N)
        Out_row = Out + b * sob + h * soh
        _fixed_lse2_store(ca, la, qa, K_head, Out_row, ma, shift, M, N, skn, qk_scale, d, full_end, hi, PRECISION,
                          BLOCK_R // 2, BLOCK_N)
        _fixed_lse2_store(cb, lb, qb, K_head, Out_row, mb, shift, M, N, skn, qk_scale, d, full_end, hi, PRECISION,
                          BLOCK_R // 2, BLOCK_N)
        return
    m = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    q = tl.load(Q + b * sqb + h * sqh + m[:, None] * sqm + d[None, :], mask=m[:, None] < M, other=0.0)
    if FIXED:
        c, l_i = _fixed_offset_sums(q, K_head, m, shift, N, skn, qk_scale, d, full_end, hi, LOOKAHEAD, PRECISION,
                                    BLOCK_N, POLY, BLOCK_R, K_desc, (b * skb + (h // G) * skh) // skn, TMA)
        _fixed_lse2_store(c, l_i, q, K_head, Out + b * sob + h * soh, m, shift, M, N, skn, qk_scale, d, full_end, hi,
                          PRECISION, BLOCK_R, BLOCK_N)
    else:
        lse2 = _online_lse2(q, K_head, m, shift, N, skn, qk_scale, d, full_end, hi, LOOKAHEAD, FUSED_SCALE, WS,
                            PRECISION, BLOCK_R, BLOCK_N)
        tl.store(Out + b * sob + h * soh + m, lse2, mask=m < M)


# name → (LOOKAHEAD, FUSED_SCALE, WS, REVERSE, FIXED, POLY, PAIR, TMA); "replica": the product's old loop
VARIANTS = {
    "replica": (False, False, False, False, False, 0, False, False),
    "lookahead": (True, False, False, False, False, 0, False, False),
    "fused_scale": (False, True, False, False, False, 0, False, False),
    "lookahead+fused": (True, True, False, False, False, 0, False, False),
    "reverse": (False, False, False, True, False, 0, False, False),
    "lookahead+fused+reverse": (True, True, False, True, False, 0, False, False),
    "warp_specialize": (False, False, True, False, False, 0, False, False),
    "fixed_offset": (False, False, False, False, True, 0, False, False),
    "fixed_offset+lookahead": (True, False, False, False, True, 0, False, False),
    "fixed_offset+reverse": (False, False, False, True, True, 0, False, False),
    "fixed_offset+poly_half": (False, False, False, False, True, 2, False, False),
    "fixed_offset+poly_quarter": (False, False, False, False, True, 1, False, False),
    "fixed_offset+pair": (False, False, False, False, True, 0, True, False),
    "fixed_offset+f16exp": (False, False, False, False, True, 3, False, False),
    "fixed_offset+tma": (False, False, False, False, True, 0, False, True),
}


def row_lse2(q, k, variant="replica", block_r=128, block_n=64, warps=4, stages=3, scale=None, out=None):
    """(B, Hq, M) float32 row log-sum-exp in log2 units of softmax(q·kᵀ·scale), causal (bottom-right); +inf for a
    row that sees no key. q (B, Hq, M, D), k (B, Hkv, N, D), the last dimension contiguous."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert D == triton.next_power_of_2(D) and q.stride(3) == 1 and k.stride(3) == 1, "outside the experiment's scope"
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    assert scale > 0
    out = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device) if out is None else out
    lookahead, fused, ws, reverse, fixed, poly, pair, tma = VARIANTS[variant]
    k_desc = None
    if tma:                   # the keys as one (B·Hkv·N, D) matrix, one key tile a box
        assert k.is_contiguous(), "TMA: K contiguous"
        k_desc = TensorDescriptor.from_tensor(k.view(-1, D), [block_n, D])
    _row_lse_kernel[(triton.cdiv(M, block_r), Hq, B)](
        q, k, k_desc, out, *q.stride()[:3], *k.stride()[:3], *out.stride()[:2], M, N, scale * LOG2E,
        G=Hq // Hkv, D=D, BLOCK_R=block_r, BLOCK_N=block_n, LOOKAHEAD=lookahead, FUSED_SCALE=fused, WS=ws,
        REVERSE=reverse, FIXED=fixed, POLY=poly, PAIR=pair, TMA=tma, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    return out


def _reference_lse2(q, k, scale):
    """float64 row log-sum-exp in log2 units, causal bottom-right, +inf where a row sees no key."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    visible = torch.arange(N, device=q.device)[None, :] <= torch.arange(M, device=q.device)[:, None] + (N - M)
    lse = torch.logsumexp(s.masked_fill(~visible, float("-inf")), dim=-1) / math.log(2)
    return torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)


def check(device="cpu"):
    """Every variant on small shapes against float64, the output pre-filled with NaN: on the CPU under
    TRITON_INTERPRET=1, or on a GPU (tests/test_experiments.py runs it). Shapes cover full tiles before the
    diagonal, a ragged end, more queries than keys (rows that see nothing), GQA, and a key whose logit overflows the
    fixed-offset variants' sums (their fallback)."""
    torch.manual_seed(0)
    worst = {False: 0.0, True: 0.0}
    for B, Hq, Hkv, M, N, D, block_r, block_n in [(1, 4, 2, 40, 100, 16, 16, 16), (2, 2, 1, 33, 33, 32, 16, 16),
                                                   (1, 2, 2, 24, 10, 16, 16, 16), (1, 4, 1, 16, 130, 16, 16, 32),
                                                   (1, 4, 1, 16, 131, 16, 16, 32)]:
        q = torch.randn(B, Hq, M, D, device=device)
        k = torch.randn(B, Hkv, N, D, device=device)
        if N in (130, 131):     # one key ~300 log2 units above the first tile's max: the fixed offset overflows
            q[..., 0] += 30.0   # there, and those blocks fall back to the running max. Key 50 is a column whose
            k[:, :, N - 80, 0] = 30.0   # exp2 the MUFU takes, key 51 one that POLY 1 and 2 take in software
        ref = _reference_lse2(q, k, 1 / math.sqrt(D))
        for variant in VARIANTS:
            rows = 2 * block_r if VARIANTS[variant][6] else block_r     # PAIR: halves of ≥ 16 rows (tl.dot)
            got = row_lse2(q, k, variant, rows, block_n, warps=4, stages=1,
                           out=torch.full((B, Hq, M), float("nan"), device=device))
            assert not got.isnan().any(), (variant, "a row was not written")
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), (variant, "rows that see no key")
            fin = torch.isfinite(ref)
            err = ((got.double()[fin] - ref[fin]).abs() / ref[fin].abs().clamp(min=1.0)).max().item()
            half = VARIANTS[variant][5] == 3             # f16 exp2: about 1e-3 per term
            worst[half] = max(worst[half], err)
            assert err < (2e-3 if half else 2e-6), (variant, B, Hq, Hkv, M, N, D, err)
    print(f"row pass variants match float64 (largest error of the log2 lse, relative to max(1, |lse|): "
          f"{worst[False]:.1e}; f16 exp2: {worst[True]:.1e})")


def full_causal_runs(out_dir, name, extra=()):
    """Yields (q, k, shape, record) at full causal 32/8 fp16 D 128 for N = 16k, 8k and 4k, after timing there the
    baselines of a row-pass experiment: the product's two passes, its column pass with the lse given (the
    difference is its row pass), SDPA's forward, and `extra` ((name, fn(q, k)), …). record (experiment_rows) writes
    out_dir/name after each row."""
    bk = _bench_kernels()
    from colreduce_kvprune.kernels import colreduce as kmod
    record = bk.experiment_rows(out_dir, name, bk._flush_buffer())
    for N in (16384, 8192, 4096):
        B, Hq, Hkv, D = 1, 32, 8, 128
        torch.manual_seed(0)
        q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        shape = f"full {Hq}/{Hkv} N={N} fp16"
        kw = dict(is_causal=True, scale=1 / math.sqrt(D), group_reduce="mean")
        lse = bk.row_lse(q, k, 1 / math.sqrt(D), True)
        for label, fn in (("product both passes", lambda: kmod.colreduce_triton(q, k, "sum", **kw)),
                          ("product column pass (lse given)",
                           lambda: kmod.colreduce_triton(q, k, "sum", lse=lse, **kw)),
                          ("SDPA forward", lambda: torch.nn.functional.scaled_dot_product_attention(
                              q, k, v, is_causal=True, enable_gqa=True)),
                          *((label, lambda fn=fn: fn(q, k)) for label, fn in extra)):
            record(dict(shape=shape, name=label), fn)
        yield q, k, shape, record
        del q, k, v, lse
        torch.cuda.empty_cache()


def gpu(out_dir):
    """The variants at full causal 32/8 (fp16, D 128) 16k, 8k and 4k, each at the product's row tiles (128 rows,
    64 keys, 4 warps, 3 stages) and 128 × 128 at 8 warps, against the replica at the product's tiles, SDPA's forward
    and the product's two passes (with and without the lse given: the difference is its row pass), all timed in
    one run. row_pass.json in out_dir, rewritten after each row. ROW_PASS_VARIANTS (comma-separated names) and
    ROW_PASS_TILES ("128x64x4x3,…") narrow the run."""
    variants = os.environ.get("ROW_PASS_VARIANTS", ",".join(VARIANTS)).split(",")
    unknown = set(variants) - set(VARIANTS)
    assert not unknown, f"ROW_PASS_VARIANTS: unknown {sorted(unknown)}; known: {list(VARIANTS)}"
    tile_list = [tuple(int(x) for x in t.split("x")) for t in
                 os.environ.get("ROW_PASS_TILES", "128x64x4x3,128x128x8x2,128x64x8x3").split(",")]
    for q, k, shape, record in full_causal_runs(out_dir, "row_pass.json"):
        ref = row_lse2(q, k, "replica")
        for tiles in tile_list:
            for variant in variants:
                record(dict(shape=shape, name=variant, tiles=tiles), lambda: row_lse2(q, k, variant, *tiles),
                       lambda got: {"max_abs_diff_vs_replica": (got - ref).abs().max().item()})


def main(argv=None):
    _bench_kernels().experiment_main(__doc__, check, gpu, argv)


if __name__ == "__main__":
    main()
