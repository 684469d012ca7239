"""Experiment (issue 19, item 2: full causal 16k ≤ 1.0× SDPA): the column pass (lse given) warp-specialised in
Gluon, as kernels/colreduce_ws.py does the row pass.

Per CTA: one kv head's block of 128 keys, held in shared memory as two 64-key halves, one per consumer warp group;
a producer warp streams the group's query tiles (head by head, from the first query that sees the block) into a
ring of STAGES slots by TMA. Each consumer computes Sᵀ = K_half · Qᵀ ([64 keys, BLOCK_M queries], keys on the
wgmma's M), p = exp2(Sᵀ·scale − lse2) with the causal mask, summed into a 2-D accumulator whose row sums are its keys'
column sums (over the group's heads: group_reduce "sum"). The two consumers wait only for their tile's copy, never
for each other. Unlike the row pass, a consumer does not issue the next tile's wgmma before this tile's exp2 (that
spilled at the two-CTAs-per-SM register budget, the per-query lse being extra): the overlap is across warp groups
only. The query tiles on the diagonal come first in each head: a masked loop, then a whole-tile loop.

Scope: dense contiguous (B, H, M, D) fp16/bf16, causal (bottom-right), D 64 or 128, lse given (natural log, (B, Hq,
M), as colreduce's `lse`); output (B, Hkv, N) float32, the sum over the group's heads and queries. sm_90 only.
Not in the product.

    python benchmarks/gluon_ws_column_pass.py --check   # CPU: compiles for sm_90; GPU: against float64
    python benchmarks/gluon_ws_column_pass.py --out DIR # GPU: against the product's column pass (lse given)
"""
from __future__ import annotations

import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from colreduce_kvprune.kernels.colreduce_ws import _descriptor, _done, _issue, _mma_layout, _ring  # held A, B ring

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gluon_row_pass as grp  # noqa: E402
import row_pass  # noqa: E402

HALF = gl.constexpr(64)       # keys per consumer warp group
PRODUCER_REGS = gl.constexpr(24)
# (BLOCK_M, STAGES, maxnreg, consumer registers)
CONFIGS = {"m64s3r80": (64, 3, 80, 104), "m64s4r80": (64, 4, 80, 104), "m128s3r168": (128, 3, 168, 240)}


@gluon.jit
def _probs(s, LSE_head, i0, keys, shift, M, qk_scale, MASKED: gl.constexpr, BLOCK_M: gl.constexpr,
           MMA: gl.constexpr):
    """exp2(sᵀ·scale − lse2) of the query tile from i0 (0 past M, and where MASKED, where a query does not see the
    key)."""
    rows = i0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    lse = gl.load(LSE_head + rows, mask=rows < M, other=float("inf"))
    x = s * qk_scale - lse[None, :]
    if MASKED:
        x = gl.where(keys[:, None] <= rows[None, :] + shift, x, float("-inf"))
    return gl.exp2(x)


@gluon.jit
def _consume(k_smem, q_smem, k_bar, ready, empty, LSE, Out, b, hk, j0, M, N, G, qk_scale, i_first, n_q,
             C: gl.constexpr):
    NSLOT: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    MMA: gl.constexpr = _mma_layout(BLOCK_M)
    shift = N - M
    lo = j0 + C * HALF
    keys = lo + gl.arange(0, HALF, layout=gl.SliceLayout(1, MMA))
    # query tiles that every key of this half sees whole: i0 ≥ lo + HALF − 1 − shift
    n_masked = gl.minimum(gl.maximum(gl.cdiv(lo + HALF - 1 - shift - i_first, BLOCK_M), 0), n_q)
    zero = gl.zeros([HALF, BLOCK_M], gl.float32, layout=MMA)
    acc = gl.zeros([HALF, BLOCK_M], gl.float32, layout=MMA)
    ks = k_smem.index(C)
    mbarrier.wait(k_bar, 0)
    for g in range(G):
        LSE_head = LSE + ((b * gl.num_programs(1) + hk) * G + g) * M     # (B, Hkv·G, M)
        base = g * n_q
        # Not pipelined inside the warp group (the next tile's wgmma before this tile's exp2 needs a third [64,
        # BLOCK_M] register tile and spilled at 80 registers): the other consumer and the other CTA on the SM fill
        # the tensor pipe while this one takes its exp2.
        for t in range(0, n_masked):                                   # query tiles on the diagonal
            s = _done(_issue(ks, q_smem, ready, base + t, zero, NSLOT), empty, base + t, NSLOT)
            acc += _probs(s, LSE_head, i_first + t * BLOCK_M, keys, shift, M, qk_scale, True, BLOCK_M, MMA)
        for t in range(n_masked, n_q):                                 # seen whole by every key of the half
            s = _done(_issue(ks, q_smem, ready, base + t, zero, NSLOT), empty, base + t, NSLOT)
            acc += _probs(s, LSE_head, i_first + t * BLOCK_M, keys, shift, M, qk_scale, False, BLOCK_M, MMA)
    gl.store(Out + (b * gl.num_programs(1) + hk) * N + keys, gl.sum(acc, 1), mask=keys < N)


@gluon.jit
def _consumer0(Q_desc, K_desc, k_smem, q_smem, k_bar, ready, empty, LSE, Out, b, hk, j0, M, N, G, Hq, qk_scale,
               i_first, n_q, k_row):
    _consume(k_smem, q_smem, k_bar, ready, empty, LSE, Out, b, hk, j0, M, N, G, qk_scale, i_first, n_q, 0)


@gluon.jit
def _consumer1(Q_desc, K_desc, k_smem, q_smem, k_bar, ready, empty, LSE, Out, b, hk, j0, M, N, G, Hq, qk_scale,
               i_first, n_q, k_row):
    _consume(k_smem, q_smem, k_bar, ready, empty, LSE, Out, b, hk, j0, M, N, G, qk_scale, i_first, n_q, 1)


@gluon.jit
def _producer(Q_desc, K_desc, k_smem, q_smem, k_bar, ready, empty, LSE, Out, b, hk, j0, M, N, G, Hq, qk_scale,
              i_first, n_q, k_row):
    NSLOT: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    mbarrier.expect(k_bar, 2 * K_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(K_desc, [k_row + j0, 0], k_bar, k_smem.index(0))
    tma.async_copy_global_to_shared(K_desc, [k_row + j0 + HALF, 0], k_bar, k_smem.index(1))
    for g in range(G):
        q_row = (b * Hq + hk * G + g) * M + i_first
        for t in range(n_q):
            step = g * n_q + t
            slot = step % NSLOT
            mbarrier.wait(empty.index(slot), ((step // NSLOT) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), Q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(Q_desc, [q_row + t * BLOCK_M, 0], ready.index(slot), q_smem.index(slot))


@gluon.jit(do_not_specialize=["M", "N", "Hq"])
def _ws_column_kernel(Q_desc, K_desc, LSE, Out, Hq, M, N, qk_scale, G: gl.constexpr, D: gl.constexpr,
                      NSLOT: gl.constexpr, BLOCK_M: gl.constexpr, REGS: gl.constexpr):
    """Grid (key blocks of 2·HALF, Hkv, B). LSE (B, Hq, M) log2 units; Out (B, Hkv, N)."""
    kb = gl.program_id(0)
    hk = gl.program_id(1)
    b = gl.program_id(2)
    j0 = kb * (2 * HALF)
    shift = N - M
    i_first = gl.maximum(j0 - shift, 0)                   # the first query that sees key j0
    n_q = gl.maximum(gl.cdiv(M - i_first, BLOCK_M), 1)   # at least one (masked) tile: keys no query sees get 0
    k_row = (b * (Hq // G) + hk) * N
    k_smem = gl.allocate_shared_memory(K_desc.dtype, [2, HALF, D], K_desc.layout)
    q_smem = gl.allocate_shared_memory(Q_desc.dtype, [NSLOT, BLOCK_M, D], Q_desc.layout)
    k_bar, ready, empty = _ring(NSLOT, 2)
    args = (Q_desc, K_desc, k_smem, q_smem, k_bar, ready, empty, LSE, Out, b, hk, j0, M, N, Hq // gl.num_programs(1),
            Hq, qk_scale, i_first, n_q, k_row)                # (no constexprs in a partition's arguments)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_producer, args)], [4, 1], [REGS, PRODUCER_REGS.value])


def _descriptors(q, k, block_m):
    """Q and K as (B·H·L, D) matrices, with boxes of block_m query rows and HALF key rows."""
    D = q.shape[-1]
    return tuple(_descriptor(x.reshape(-1, D), rows, D) for x, rows in ((q, block_m), (k, HALF.value)))


def column_sums_ws(q, k, lse2, config="m64s3r80", scale=None):
    """(B, Hkv, N) float32: Σ over the group's heads and the queries of softmax(q·kᵀ·scale) (causal), from the row
    lse in log2 units (B, Hq, M) (+inf for a row that sees no key)."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and D in (64, 128)
    assert q.is_contiguous() and k.is_contiguous() and lse2.is_contiguous() and Hq % Hkv == 0
    block_m, stages, maxnreg, regs = CONFIGS[config]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=q.device)
    q_desc, k_desc = _descriptors(q, k, block_m)
    _ws_column_kernel[(triton.cdiv(N, 2 * HALF.value), Hkv, B)](
        q_desc, k_desc, lse2, out, Hq, M, N, scale * grp.LOG2E, G=Hq // Hkv, D=D, NSLOT=stages, BLOCK_M=block_m,
        REGS=regs, num_warps=4, maxnreg=maxnreg)
    return out


def compile_sm90(config="m64s3r80", dtype="fp16", D=128):
    block_m, stages, maxnreg, regs = CONFIGS[config]
    x = torch.empty(1024, D, dtype=dict(fp16=torch.float16, bf16=torch.bfloat16)[dtype])
    types = dict(Q_desc=grp.descriptor_type(x, block_m, D), K_desc=grp.descriptor_type(x, HALF.value, D),
                 LSE="*fp32", Out="*fp32")
    return grp.compile_gluon_sm90(_ws_column_kernel, dict(G=4, D=D, NSLOT=stages, BLOCK_M=block_m, REGS=regs), types,
                                  4, maxnreg)


def _reference(q, k):
    """float64 (B, Hkv, N) group sums of the causal softmax's column sums, and the row lse2 (float32)."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(D)
    vis = torch.arange(N, device=q.device)[None, :] <= torch.arange(M, device=q.device)[:, None] + (N - M)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(vis, torch.exp(s - lse[..., None]), torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.nan_to_num(p)
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse / math.log(2)).float()
    return p.sum(2).view(B, Hkv, G, N).sum(2), lse2.contiguous()


def check(device="cpu"):
    """CPU: compiles for sm_90 at every config. GPU: against float64 (ragged ends, M < N, M > N, GQA, bf16, D 64)."""
    if device == "cpu":
        for config in CONFIGS:
            got = grp.sass_overlap(compile_sm90(config))
            print(config, "registers", got["registers"], "spill bytes", got["spill_bytes"])
        print("the warp-specialised column pass compiles for sm_90 at every config")
        return
    torch.manual_seed(0)
    worst = 0.0
    for B, Hq, Hkv, M, N, D, dtype in [(1, 4, 2, 300, 300, 128, torch.float16), (2, 2, 1, 200, 520, 64, torch.bfloat16),
                                       (1, 2, 2, 260, 100, 128, torch.float16), (1, 8, 2, 700, 700, 128,
                                                                                 torch.float16)]:
        q = torch.randn(B, Hq, M, D, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)
        ref, lse2 = _reference(q, k)
        for config in CONFIGS:
            got = column_sums_ws(q, k, lse2, config)
            assert not got.isnan().any(), config
            err = ((got.double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            assert err < 1e-3, ((B, Hq, Hkv, M, N, D, dtype), config, err)
    print(f"warp-specialised column pass matches float64 at {len(CONFIGS)} configs (largest error {worst:.1e})")


def gpu(out_dir):
    """Full causal 32/8 fp16 D 128 at 16k, 8k, 4k: each config against the product's column pass (lse given, sum,
    group sum), the product's two passes and SDPA (row_pass.full_causal_runs), in one run."""
    bk = row_pass._bench_kernels()
    from colreduce_kvprune.kernels import colreduce as kmod
    for q, k, shape, record in row_pass.full_causal_runs(out_dir, "gluon_ws_column_pass.json"):
        D = q.shape[-1]
        lse = bk.row_lse(q, k, 1 / math.sqrt(D), True)
        lse2 = (lse.float() * grp.LOG2E).contiguous()
        lse2 = torch.where(torch.isneginf(lse2), torch.full_like(lse2, float("inf")), lse2)
        ref = kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(D), group_reduce="sum", lse=lse)
        record(dict(shape=shape, name="product column pass (lse given, group sum)"),
               lambda: kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(D), group_reduce="sum",
                                             lse=lse))
        for config in CONFIGS:
            record(dict(shape=shape, name="gluon ws column", config=config), lambda: column_sums_ws(q, k, lse2, config),
                   lambda got: {"rel_diff_vs_product": ((got - ref).norm() / ref.norm()).item()})


def main(argv=None):
    row_pass._bench_kernels().experiment_main(__doc__, lambda: check("cuda" if torch.cuda.is_available() else "cpu"),
                                              gpu, argv)


if __name__ == "__main__":
    main()
