"""Experiment (issue 19, twenty-seventh session; not in the product): the column pass of long prompts (full causal
16k is the goal's shape: both passes ≤ SDPA's forward) on Hopper (sm_90), warp-specialised in Gluon, with the keys
on the wgmma's rows and the queries streamed past them.

Why: the product's long column pass (_long_column_kernel, Triton) takes 2.30 ms at full causal 32/8 16k against the
Gluon row pass's 2.02 (twenty-sixth session); both passes 4.39 ms against SDPA's 3.93. Its q·kᵀ tiles put the keys
on the columns, so each tile's column sums cross the warps; the twenty-second session's Gluon column pass in that
orientation (benchmarks/gluon_ws_column_pass.py) paid a shared-memory barrier per tile and ran 4.1–4.5 ms. Here a
key's scores lie along the rows of the accumulator: the sum over the queries stays inside a thread and its quad, as
the row sums of the row pass do, and no two warps ever exchange anything until the end.

Each program (CTA) owns 2·KC consecutive keys of one sequence × kv head (KC = 64, or 128 in the `k128` configs:
one wgmma result of 128 rows per consumer, two M = 64 instructions):
- a producer warp loads the two 64-key tiles and a tile of ones once, then streams the query chunks that see any of
  the block's keys — QN rows of one query head of the group, with their lse — into a ring of NSLOT slots by TMA
  (`ready` / `empty` mbarriers, two arrivals on `empty`: both consumers read every chunk);
- two consumer warp groups, one per 64-key tile (the wgmma's A operand, read from shared memory for the whole run),
  that take every chunk: k·qᵀ (64 × QN) by wgmma, the chunk's lse subtracted by one more k-step (the fold of
  benchmarks/gluon_ws_window_pass.py: ones[key, j] · (−part_j[row]), lse2 / scale split into four values of the
  inputs' dtype that sum to it to float32 precision, written by fold_parts() next to the queries, one row per
  query), then exp2 and the sum over the chunk's rows into one value per key. The next chunk's wgmma is issued
  before this chunk's exp2, so a consumer's exp2 overlaps its own wgmma (and the other consumer's).
Chunks that need a mask (the causal diagonal of the block, the ragged last chunk of a head) come first, head by
head, then the rest: two loops with the mask as a constant, no branch between an issue and its wait. The keys'
results are written once, by the one consumer that owns them (deterministic, no atomics).

Dense contiguous (B, Hq, M, D) queries and (B, Hkv, N, D) keys only; query m sees key n iff n ≤ m + N − M (causal)
or always; reductions: sum or mean over the queries that see each key, then the group's sum or mean over its heads
(colreduce.py's fused cases). Gluon has no interpreter: main() checks it against float64 on sm_90, then times it.

    python benchmarks/gluon_ws_causal_column.py --out DIR [--configs 1cta_q128,2cta_q64] [--check-only]
    (on the device: WS_CAUSAL_CONFIGS=a,b SCRIPT_LIMIT=400 bash benchmarks/gpu_sweep.sh script gluon_ws_causal_column)

H200, twenty-seventh session (image torch 2.11 / Triton 3.6; results/h200_kernels/ws_causal_column_visit29*.json,
two runs, medians of 3 alternations, full causal GQA 32/8, D 128, fp16, lse given): every config passed the float64
check (worst 1.1e-6). The fold configs against the product's column pass: 4k 0.164–0.166 ms vs 0.195 (−16%), 8k
0.563–0.573 vs 0.617 (−8%), 16k 2.075–2.233 vs 2.207–2.336 (no gain at the goal's shape). The lse loaded per thread
is slower everywhere (16k 2.60–2.78). Not in the product.

Twenty-eighth session (`*_visit30*.json`): the k128 configs (256 keys a program, each query chunk read from L2 once
for twice the keys) halve the L2 throughput (Nsight Compute: 20% of peak against 46%) and run slower (16k
2.41–2.50 ms against 2.24–2.25 for 2cta_q64_s2): L2 is not the bound. The fenced configs (`*f`: each chunk's exp2
after the next chunk's k-steps, _step's fence) are 3–8% faster at one program per SM (1cta_q128f: 4k 0.158, 8k
0.557, 16k 2.36 ms against 1cta_q128's 0.172, 0.601, 2.43) and 8–16% slower at two (2cta_q64_s2f).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from colreduce_kvprune.kernels.colreduce_ws import _descriptor, _ring  # noqa: E402
from gluon_ws_window_pass import _flag, _mode, column_values  # noqa: E402  (flags to worker partitions as the
# length of a shared-memory array `mode`: Gluon passes a worker's constexpr arguments as runtime values; here
# IS_CAUSAL, MEAN, GROUP_MEAN, FOLD)
from gluon_row_pass import _cta_barrier  # noqa: E402  (gl.barrier in Triton 3.7, gl.thread_barrier in 3.6)
from ws_window import check_dense_case  # noqa: E402  (random inputs, float64 reference, record, assert)

FOLD_K = 16                   # the fold's k columns: FOLD_PARTS parts of the lse, zeros after
FOLD_PARTS = 4
LOG2E = 1.4426950408889634
CONFIGS = {    # name -> (query rows per chunk (the wgmma's N), ring slots, maxnreg, consumer registers, fold: the lse
               #          subtracted by the wgmma, else each thread loads its columns' lse2 one chunk ahead; keys per
               #          consumer KC; fence: each chunk's exp2 kept after the next chunk's k-steps by shared-memory
               #          accesses between barriers, _step's fence)
    "1cta_q128": (128, 3, 168, 232, True, 64, False),    # 12 warps × 168 registers: one program per SM
    "1cta_q128_s4": (128, 4, 168, 232, True, 64, False),
    "2cta_q64": (64, 3, 80, 104, True, 64, False),       # 12 warps × 80 registers: two programs per SM
    "2cta_q64_s2": (64, 2, 80, 104, True, 64, False),
    "1cta_q128_lse": (128, 4, 168, 232, False, 64, False),
    "2cta_q64_lse": (64, 2, 80, 104, False, 64, False),
    "1cta_q64_lse": (64, 4, 168, 232, False, 64, False),
    # 256 keys a program: each query chunk read from L2 once for twice the keys (slower: twenty-eighth session)
    "1cta_k128_q64": (64, 4, 168, 232, True, 128, False),
    "1cta_k128_q64_s3": (64, 3, 168, 232, True, 128, False),
    # fenced, fold configs only (twenty-eighth session: faster at one program per SM, slower at two)
    "2cta_q64_s2f": (64, 2, 80, 104, True, 64, True),
    "1cta_q128f": (128, 3, 168, 232, True, 64, True),
    "1cta_k128_q64f": (64, 4, 168, 232, True, 128, True),
}
CONFIG = "1cta_q128"


@gluon.constexpr_function
def _mma_layout(qn):
    """A chunk's wgmma result: [keys (KC), query rows (qn)] of one warp group (KC = 128: the layout repeats)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, qn, 16])


@gluon.jit
def _chunks(k0, M, N, QN: gl.constexpr, KB: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """The block's chunk plan, the same for every head of the group: (first chunk, first chunk that every key of the
    block sees whole, chunks per head, whether the head's ragged last chunk is masked apart from the diagonal)."""
    n_cq = gl.cdiv(M, QN)
    if IS_CAUSAL:
        shift = N - M                                    # query m sees key n iff n <= m + shift
        c_start = gl.minimum(gl.maximum(k0 - shift, 0) // QN, n_cq)
        c_full = gl.cdiv(gl.maximum(k0 + KB - 1 - shift, 0), QN)
        c_full = gl.minimum(gl.maximum(c_full, c_start), n_cq)
    else:
        c_start = n_cq * 0
        c_full = c_start
    ragged = gl.minimum(M % QN, 1) * gl.minimum(n_cq - c_full, 1)
    return c_start, c_full, n_cq, ragged


@gluon.jit
def _chunk(u, c_start, c_full, n_cq, ragged, G):
    """(head in the group, query chunk) of step u: first the chunks that need the mask (the diagonal, then the ragged
    last one), head by head, then the others, head by head."""
    n_m = c_full - c_start + ragged
    n_u = n_cq - c_full - ragged
    in_m = u < G * n_m
    one_m = gl.maximum(n_m, 1)
    one_u = gl.maximum(n_u, 1)
    im = u % one_m
    cm = gl.where(im < c_full - c_start, c_start + im, n_cq - 1)
    v = gl.maximum(u - G * n_m, 0)
    g = gl.where(in_m, u // one_m, v // one_u)
    c = gl.where(in_m, cm, c_full + v % one_u)
    return g, c


@gluon.jit
def _issue(kt, q_smem, l_smem, o_smem, slot, zero, FOLD: gl.constexpr):
    """The chunk in `slot`: k·qᵀ (FOLD: then minus its rows' lse2 / scale, one more k-step), issued, not waited
    for."""
    s = warpgroup_mma(kt, q_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    if FOLD:
        s = warpgroup_mma(o_smem, l_smem.index(slot).permute((1, 0)), s, use_acc=True, is_async=True)
    return s


@gluon.jit
def _chunk_lse(LSE2, q_row, u, M, c_start, c_full, n_cq, ragged, G, QN: gl.constexpr, LAYOUT: gl.constexpr):
    """Not FOLD: the lse2 (log2 units) of step u's query rows, as the thread's columns; +inf past the head's M."""
    g, c = _chunk(u, c_start, c_full, n_cq, ragged, G)
    m = c * QN + gl.arange(0, QN, layout=LAYOUT)
    return gl.load(LSE2 + q_row + g * M + m, mask=m < M, other=float("inf"))


@gluon.jit
def _add(pacc, s, lse2, u, n, M, N, c_start, c_full, n_cq, ragged, G, qk_scale, IS_CAUSAL: gl.constexpr,
         MASKED: gl.constexpr, FOLD: gl.constexpr, zero_smem=None):
    """pacc plus step u's p summed over its rows (in the thread and its quad). s: q·kᵀ (FOLD: − lse2 / scale).
    zero_smem (FOLD): zeros subtracted from every key's scores, read after a barrier (_step's fence)."""
    if zero_smem is not None:
        gl.static_assert(FOLD, "the fence is for the fold configs (it replaces the fold's s * qk_scale)")
        z = zero_smem.load(n.type.layout)
        x = s * qk_scale - z[:, None]
    elif FOLD:
        x = s * qk_scale
    else:
        x = s * qk_scale - lse2[None, :]
    if MASKED:
        QN: gl.constexpr = s.type.shape[1]
        MMA: gl.constexpr = s.type.layout
        _, c = _chunk(u, c_start, c_full, n_cq, ragged, G)
        m = c * QN + gl.arange(0, QN, layout=gl.SliceLayout(0, MMA))
        vis = (m[None, :] < M) & (n[:, None] >= 0)
        if IS_CAUSAL:
            vis = vis & (n[:, None] <= m[None, :] + (N - M))
        x = gl.where(vis, x, float("-inf"))
    return pacc + gl.sum(gl.exp2(x), 1)


@gluon.jit
def _step(kt, q_smem, l_smem, o_smem, ready, empty, u, s, lse2, pacc, zero, n, LSE2, q_row, M, N, c_start, c_full,
          n_cq, ragged, G, qk_scale, IS_CAUSAL: gl.constexpr, MASKED: gl.constexpr, FOLD: gl.constexpr, fence=None):
    """Step u, entered with s = chunk u's scores (and, not FOLD, lse2 its rows'): issues chunk u + 1's wgmma (and
    the load of its lse2), adds chunk u's p while it runs, waits, hands chunk u + 1's slot back. One basic block
    from the issue to the wait. fence (FOLD): (zeros, sink) in shared memory: the exp2's input read from the one
    after a barrier and the new sums written to the other before one, so that ptxas keeps the exp2 after the
    k-steps and before the wait (ptxas moves the exp2 among the k-steps and past the wait, not a shared-memory
    access across a barrier; the twenty-eighth session's row pass ORDERED, 5653c9e, did the same)."""
    NSLOT: gl.constexpr = q_smem.type.shape[0]
    u1 = u + 1
    mbarrier.wait(ready.index(u1 % NSLOT), (u1 // NSLOT) & 1)
    token = _issue(kt, q_smem, l_smem, o_smem, u1 % NSLOT, zero, FOLD)
    QN: gl.constexpr = s.type.shape[1]
    LSE_LAYOUT: gl.constexpr = lse2.type.layout
    if FOLD:
        lse_next = lse2
    else:
        lse_next = _chunk_lse(LSE2, q_row, u1, M, c_start, c_full, n_cq, ragged, G, QN, LSE_LAYOUT)
    if fence is not None:
        _cta_barrier()
        pacc = _add(pacc, s, lse2, u, n, M, N, c_start, c_full, n_cq, ragged, G, qk_scale, IS_CAUSAL, MASKED, FOLD,
                    fence[0])
        fence[1].store(pacc)
        _cta_barrier()
    else:
        pacc = _add(pacc, s, lse2, u, n, M, N, c_start, c_full, n_cq, ragged, G, qk_scale, IS_CAUSAL, MASKED, FOLD)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
    mbarrier.arrive(empty.index(u1 % NSLOT), count=1)
    return s, lse_next, pacc


@gluon.jit
def _consume(k_smem, o_smem, q_smem, l_smem, z_smem, sink, k_bar, ready, empty, Out, LSE2, b, hk, k0, M, N, G, q_row,
             qk_scale, sob, soh, son, mode, C: gl.constexpr):
    """Consumer C: keys k0 + C·KC … of the block, every chunk of the plan; their column values, stored. The fence
    from z_smem's length (2·KC: a slice of zeros and one of sink per consumer; else 1, unused)."""
    IS_CAUSAL: gl.constexpr = _flag(mode.type.shape[0], 0)
    MEAN: gl.constexpr = _flag(mode.type.shape[0], 1)
    GROUP_MEAN: gl.constexpr = _flag(mode.type.shape[0], 2)
    FOLD: gl.constexpr = _flag(mode.type.shape[0], 3)
    QN: gl.constexpr = q_smem.type.shape[1]
    KC: gl.constexpr = k_smem.type.shape[1]
    MMA: gl.constexpr = _mma_layout(QN)
    LSE_LAYOUT: gl.constexpr = gl.SliceLayout(0, MMA)
    c_start, c_full, n_cq, ragged = _chunks(k0, M, N, QN, 2 * KC, IS_CAUSAL)
    total = G * (n_cq - c_start)
    n_masked = G * (c_full - c_start + ragged)
    kt = k_smem.index(C)
    zero = gl.zeros([KC, QN], gl.float32, layout=MMA)
    pacc = gl.zeros([KC], gl.float32, layout=gl.SliceLayout(1, MMA))
    n = k0 + C * KC + gl.arange(0, KC, layout=gl.SliceLayout(1, MMA))
    FENCE: gl.constexpr = z_smem.type.shape[0] == 2 * KC
    if FENCE:
        fence = (z_smem.slice(C * KC, KC), sink.slice(C * KC, KC))
        fence[0].store(gl.zeros([KC], gl.float32, layout=gl.SliceLayout(1, MMA)))
    else:
        fence = None
    if FOLD:
        lse2 = gl.zeros([QN], gl.float32, layout=LSE_LAYOUT)
    else:
        lse2 = _chunk_lse(LSE2, q_row, 0, M, c_start, c_full, n_cq, ragged, G, QN, LSE_LAYOUT)
    mbarrier.wait(k_bar, 0)
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_issue(kt, q_smem, l_smem, o_smem, 0, zero, FOLD), ))
    mbarrier.arrive(empty.index(0), count=1)
    last = total - 1
    for u in range(0, gl.minimum(n_masked, last)):
        s, lse2, pacc = _step(kt, q_smem, l_smem, o_smem, ready, empty, u, s, lse2, pacc, zero, n, LSE2, q_row, M, N,
                              c_start, c_full, n_cq, ragged, G, qk_scale, IS_CAUSAL, True, FOLD)
    for u in range(gl.minimum(n_masked, last), last):
        s, lse2, pacc = _step(kt, q_smem, l_smem, o_smem, ready, empty, u, s, lse2, pacc, zero, n, LSE2, q_row, M, N,
                              c_start, c_full, n_cq, ragged, G, qk_scale, IS_CAUSAL, False, FOLD, fence)
    pacc = _add(pacc, s, lse2, last, n, M, N, c_start, c_full, n_cq, ragged, G, qk_scale, IS_CAUSAL, True, FOLD)
    col = column_values(pacc, n, M, N, G, IS_CAUSAL, MEAN, GROUP_MEAN)
    gl.store(Out + b * sob + hk * soh + n * son, col, mask=n < N)


@gluon.jit
def _consumer0(Q_desc, K_desc, P_desc, O_desc, k_smem, o_smem, q_smem, l_smem, z_smem, sink, k_bar, ready, empty, Out,
               LSE2, b, hk, k0, M, N, G, q_row, k_row, qk_scale, sob, soh, son, mode):
    """Every partition takes this argument list (Gluon's rule for workers; the flags travel as `mode`'s length)."""
    _consume(k_smem, o_smem, q_smem, l_smem, z_smem, sink, k_bar, ready, empty, Out, LSE2, b, hk, k0, M, N, G, q_row,
             qk_scale, sob, soh, son, mode, 0)


@gluon.jit
def _consumer1(Q_desc, K_desc, P_desc, O_desc, k_smem, o_smem, q_smem, l_smem, z_smem, sink, k_bar, ready, empty, Out,
               LSE2, b, hk, k0, M, N, G, q_row, k_row, qk_scale, sob, soh, son, mode):
    _consume(k_smem, o_smem, q_smem, l_smem, z_smem, sink, k_bar, ready, empty, Out, LSE2, b, hk, k0, M, N, G, q_row,
             qk_scale, sob, soh, son, mode, 1)


@gluon.jit
def _producer(Q_desc, K_desc, P_desc, O_desc, k_smem, o_smem, q_smem, l_smem, z_smem, sink, k_bar, ready, empty, Out,
              LSE2, b, hk, k0, M, N, G, q_row, k_row, qk_scale, sob, soh, son, mode):
    """The block's two key tiles and the ones, then the plan's chunks into the ring: slot u % NSLOT once both
    consumers handed back chunk u − NSLOT (a fresh mbarrier passes the wait for phase 1)."""
    IS_CAUSAL: gl.constexpr = _flag(mode.type.shape[0], 0)
    FOLD: gl.constexpr = _flag(mode.type.shape[0], 3)
    NSLOT: gl.constexpr = q_smem.type.shape[0]
    QN: gl.constexpr = q_smem.type.shape[1]
    KC: gl.constexpr = k_smem.type.shape[1]
    mbarrier.expect(k_bar, 2 * K_desc.block_type.nbytes + O_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(K_desc, [k_row + k0, 0], k_bar, k_smem.index(0))
    tma.async_copy_global_to_shared(K_desc, [k_row + k0 + KC, 0], k_bar, k_smem.index(1))
    tma.async_copy_global_to_shared(O_desc, [0, 0], k_bar, o_smem)
    c_start, c_full, n_cq, ragged = _chunks(k0, M, N, QN, 2 * KC, IS_CAUSAL)
    for u in range(G * (n_cq - c_start)):
        slot = u % NSLOT
        g, c = _chunk(u, c_start, c_full, n_cq, ragged, G)
        row = q_row + g * M + c * QN
        mbarrier.wait(empty.index(slot), ((u // NSLOT) & 1) ^ 1)
        if FOLD:
            mbarrier.expect(ready.index(slot), Q_desc.block_type.nbytes + P_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(Q_desc, [row, 0], ready.index(slot), q_smem.index(slot))
            tma.async_copy_global_to_shared(P_desc, [row, 0], ready.index(slot), l_smem.index(slot))
        else:
            mbarrier.expect(ready.index(slot), Q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(Q_desc, [row, 0], ready.index(slot), q_smem.index(slot))


@gluon.jit(do_not_specialize=["Hq", "M", "N", "sob", "soh", "son"])
def _ws_causal_column_kernel(Q_desc, K_desc, P_desc, O_desc, Out, LSE2, Hq, M, N, sob, soh, son, qk_scale,
                             G: gl.constexpr, D: gl.constexpr, IS_CAUSAL: gl.constexpr, MEAN: gl.constexpr,
                             GROUP_MEAN: gl.constexpr, QN: gl.constexpr, NSLOT: gl.constexpr, REGS: gl.constexpr,
                             FOLD: gl.constexpr, KC: gl.constexpr, FENCE: gl.constexpr):
    """Grid (B·Hkv, cdiv(N, 2·KC)): the key blocks in the slow grid axis, so the longest runs (the first keys of a
    causal prompt) start first. Out[b, hk, n] (strides sob, soh, son), float32."""
    bh = gl.program_id(0)
    k0 = gl.program_id(1) * (2 * KC)
    Hkv = Hq // G
    b = bh // Hkv
    hk = bh % Hkv
    k_smem = gl.allocate_shared_memory(K_desc.dtype, [2, KC, D], K_desc.layout)
    o_smem = gl.allocate_shared_memory(O_desc.dtype, [KC, 16], O_desc.layout)
    q_smem = gl.allocate_shared_memory(Q_desc.dtype, [NSLOT, QN, D], Q_desc.layout)
    l_smem = gl.allocate_shared_memory(P_desc.dtype, [NSLOT, QN, 16], P_desc.layout)
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    z_smem = gl.allocate_shared_memory(gl.float32, [2 * KC if FENCE else 1], flat)
    sink = gl.allocate_shared_memory(gl.float32, [2 * KC if FENCE else 1], flat)
    k_bar, ready, empty = _ring(NSLOT, 2)                # both consumers read every chunk
    MODE: gl.constexpr = _mode(IS_CAUSAL, MEAN, GROUP_MEAN, FOLD)
    mode = gl.allocate_shared_memory(gl.int64, [MODE], mbarrier.MBarrierLayout())
    args = (Q_desc, K_desc, P_desc, O_desc, k_smem, o_smem, q_smem, l_smem, z_smem, sink, k_bar, ready, empty, Out,
            LSE2, b, hk, k0, M, N, G, (b * Hq + hk * G) * M, (b * Hkv + hk) * N, qk_scale, sob, soh, son, mode)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_producer, args)], [4, 1], [REGS, 24])


def fold_parts(lse: torch.Tensor, qk_scale: float, dtype: torch.dtype, natural: bool = True) -> torch.Tensor:
    """(lse.numel(), 16) of dtype: − the FOLD_PARTS parts of lse2 / scale in columns 0–3 (each the rounding of what
    the previous ones left), zeros after; 30000 (p = 0) for rows that see no key (natural lse −inf, log2 lse +inf).
    In a product this would be the row pass's epilogue; here its cost is timed apart (main())."""
    lse2 = lse.float().reshape(-1) * (LOG2E if natural else 1.0)
    rest = torch.where(torch.isinf(lse2), torch.full_like(lse2, 30000.0), lse2 / qk_scale)
    out = torch.zeros(lse2.numel(), FOLD_K, device=lse.device, dtype=dtype)
    for j in range(FOLD_PARTS):
        h = rest.to(dtype)
        out[:, j] = -h
        rest = rest - h.float()
    return out


_ones: dict = {}


def _ones_tile(dtype, device, rows):
    key = (dtype, device, rows)
    if key not in _ones:
        t = torch.zeros(rows, FOLD_K, dtype=dtype, device=device)
        t[:, :FOLD_PARTS] = 1
        _ones[key] = t
    return _ones[key]


def prepare(lse: torch.Tensor, D: int, dtype: torch.dtype, config: str | None = None) -> torch.Tensor:
    """What the config reads of the natural lse (B, Hq, M): fold_parts, or the lse2 (log2 units, float32,
    contiguous; +inf for rows that see no key)."""
    if CONFIGS[config or CONFIG][4]:
        return fold_parts(lse, LOG2E / math.sqrt(D), dtype)
    lse2 = lse.float() * LOG2E
    return torch.where(lse2 == float("-inf"), float("inf"), lse2).contiguous()


def launch(q: torch.Tensor, k: torch.Tensor, prep: torch.Tensor, out: torch.Tensor, *, is_causal: bool, mean: bool,
           group_mean: bool, config: str | None = None):
    """Column values of (B, Hq, M, D) q against (B, Hkv, N, D) k (both contiguous, fp16/bf16, D 64 or 128) into out
    ((B, Hkv, N) float32, any strides), given prepare() of the call's lse."""
    qn, nslot, maxnreg, regs, fold, kc, fence = CONFIGS[config or CONFIG]
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert q.is_contiguous() and k.is_contiguous() and M >= 1 and N >= 1
    q2, k2 = q.view(-1, D), k.view(-1, D)
    ones = _ones_tile(q.dtype, q.device, kc)
    parts = prep if fold else _ones_tile(q.dtype, q.device, qn)      # (the descriptor of an unused operand)
    grid = (B * Hkv, -(-N // (2 * kc)))
    _ws_causal_column_kernel[grid](
        _descriptor(q2, qn, D), _descriptor(k2, kc, D), _descriptor(parts, qn, FOLD_K),
        _descriptor(ones, kc, FOLD_K), out, out if fold else prep, Hq, M, N, *out.stride(),
        LOG2E / math.sqrt(D), G=Hq // Hkv, D=D, IS_CAUSAL=is_causal, MEAN=mean, GROUP_MEAN=group_mean, QN=qn,
        NSLOT=nslot, REGS=regs, FOLD=fold, KC=kc, FENCE=fence, num_warps=4, maxnreg=maxnreg)


def compile_sm90(config: str = CONFIG, dtype: str = "fp16", D: int = 128, G: int = 4):
    """The kernel compiled for sm_90 with the installed Triton (no GPU needed): causal, sum / group mean."""
    import gluon_row_pass     # its Gluon compile helper and descriptor types
    qn, nslot, maxnreg, regs, fold, kc, fence = CONFIGS[config]
    x2 = torch.empty(1024, D, dtype=dict(fp16=torch.float16, bf16=torch.bfloat16)[dtype])
    p2 = torch.empty(1024, FOLD_K, dtype=x2.dtype)
    const = dict(G=G, D=D, IS_CAUSAL=True, MEAN=False, GROUP_MEAN=True, QN=qn, NSLOT=nslot, REGS=regs, FOLD=fold,
                 KC=kc, FENCE=fence)
    ptrs = dict(Q_desc=gluon_row_pass.descriptor_type(x2, qn, D),
                K_desc=gluon_row_pass.descriptor_type(x2, kc, D),
                P_desc=gluon_row_pass.descriptor_type(p2, qn, FOLD_K),
                O_desc=gluon_row_pass.descriptor_type(p2, kc, FOLD_K), Out="*fp32", LSE2="*fp32")
    return gluon_row_pass.compile_gluon_sm90(_ws_causal_column_kernel, const, ptrs, 4, maxnreg)


def check(config, record):
    """Float64 checks (outputs pre-filled with NaN): ragged M and N, M < N, M > N (rows that see no key), D 64,
    GQA 1/4/8, bf16, causal and not, every reduction × group combine; relative error ≤ 2e-5."""
    torch.manual_seed(0)
    cases = [  # B, Hq, Hkv, M, N, D, dtype, causal, reduction, group_reduce
        (1, 32, 8, 1000, 1000, 128, torch.float16, True, "sum", "mean"),
        (2, 8, 2, 300, 700, 128, torch.float16, True, "mean", "sum"),
        (1, 16, 2, 513, 513, 64, torch.bfloat16, True, "sum", "mean"),
        (1, 8, 8, 256, 384, 128, torch.bfloat16, False, "mean", "mean"),
        (1, 4, 2, 700, 200, 128, torch.float16, True, "sum", "sum"),
        (1, 4, 1, 4096, 4096, 128, torch.float16, True, "sum", "mean"),
    ]

    def run(q, k, lse, scale, causal, red, gr):
        got = torch.full((q.shape[0], k.shape[1], k.shape[2]), float("nan"), device="cuda")
        launch(q, k, prepare(lse, q.shape[-1], q.dtype, config), got, is_causal=causal, mean=red == "mean",
               group_mean=gr == "mean", config=config)
        return got

    worst = max(check_dense_case(case, config, record, run) for case in cases)
    print(f"check passed for {config}: worst relative error {worst:.2e}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--configs", default=os.environ.get("WS_CAUSAL_CONFIGS") or ",".join(CONFIGS),
                    help="comma-separated (default: $WS_CAUSAL_CONFIGS, else every config)")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--check-config", help="(internal) check this one config and exit: rc 0 when it passed")
    args = ap.parse_args(argv)
    from tma_ab import _bench_kernels
    bk = _bench_kernels()
    if args.check_config:
        check(args.check_config, bk.experiment_rows(args.out, f"ws_causal_column_check_{args.check_config}.json", None))
        return
    import subprocess
    flush = bk._flush_buffer()
    record = bk.experiment_rows(args.out, "ws_causal_column.json", None)
    passed = []
    for config in args.configs.split(","):    # each check in a process of its own: a hung kernel costs 120 s
        try:
            rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", args.out, "--check-config",
                                 config], timeout=120).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout (hung?)"
        record(dict(check="passed" if rc == 0 else "FAILED", config=config, rc=rc))
        print(f"check {'passed' if rc == 0 else 'FAILED'} for {config} (rc {rc})", flush=True)
        if rc == 0:
            passed.append(config)
    if args.check_only:
        return
    from colreduce_kvprune import colreduce
    for N in (int(x) for x in args.lengths.split(",")):
        Hq, Hkv, D, dt = 32, 8, 128, torch.float16
        q = torch.randn(1, Hq, N, D, device="cuda", dtype=dt)
        k = torch.randn(1, Hkv, N, D, device="cuda", dtype=dt)
        scale = 1 / math.sqrt(D)
        lse = bk.row_lse(q, k, scale, True)
        preps = {c: prepare(lse, D, dt, c) for c in passed}
        out = torch.empty(1, Hkv, N, device="cuda")
        shape = f"full causal {Hq}/{Hkv} N={N} fp16"
        arms = {"product (lse given)": lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean", lse=lse),
                "product (both passes)": lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean"),
                "fold_parts (torch)": lambda: fold_parts(lse, LOG2E * scale, dt),
                "SDPA forward (v = k)": lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, k, is_causal=True, enable_gqa=True)}
        for config in passed:
            arms[config] = (lambda c: lambda: launch(q, k, preps[c], out, is_causal=True, mean=False,
                                                     group_mean=True, config=c) or out)(config)
        ref = arms["product (lse given)"]()
        for config in passed:
            o = arms[config]()
            record(dict(shape=shape, arm=config, rel_diff_vs_product=((o - ref).norm() / ref.norm()).item()))
        for rep in range(3):
            for name, fn in arms.items():
                t = bk.time3(fn, flush)
                record(dict(shape=shape, arm=name, rep=rep, gpu_ms=t["gpu_ms"], host_us=t["host_us"]))
                print(f"{shape} {name} rep {rep}: {t['gpu_ms']:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
