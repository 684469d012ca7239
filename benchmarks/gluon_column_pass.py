"""Experiment (issue 19, item 2): the column pass in Gluon, with gluon_row_pass.py's schedule — each query tile's
wgmma issued before the previous tile's exp2, so that the tensor cores and the MUFU work at the same time.

The column pass (the second of the product's two passes, and the only one when vLLM's attention gives the row
log-sum-exp) sums softmax probabilities over the queries for each key: out[b, hkv, n] = mean over the GQA group of
Σ_m exp2(q_m·k_n·scale − lse2_m) over the queries m that see key n (causal, bottom-right). Here one program holds a
block of BLOCK_N keys in shared memory and walks the (group head, query tile) pairs that see it, computing the
transposed scores Sᵀ = K·Qᵀ (keys along the wgmma's M, queries along its N) so that a key's sum is a row sum of a
2-D accumulator, reduced once at the end — as the fixed-offset row pass, with the row's lse in place of its offset.

    prologue: the key block → shared memory; query tiles 0 … STAGES−3 by cp.async into a ring of STAGES slots
    step t:   wait for tile t's copy, fence + barrier; copy tile t+STAGES−2; issue wgmma(K, Q_tᵀ); load tile t's
              lse; exp2 of tile t − 1 while wgmma t runs; wait(0)

Every tile is masked (n ≤ m + shift, an integer compare and a select per score): the (head, tile) walk is one loop,
and a runtime branch between a wgmma's issue and its wait makes ptxas wait early (gluon_row_pass.py, NOTES). Query
rows ≥ M take lse = +inf, so their terms are 0. Scope: dense (B, H, M, D) fp16/bf16, causal (bottom-right), D 64 or
128, reduction "sum" over the queries and "mean" over the group, sm_90 only (no interpreter: the CPU check compiles
for sm_90 and reads the SASS). Not in the product.

    python benchmarks/gluon_column_pass.py --check     # CPU: compiled for sm_90, exp2 inside the wgmma windows of
                                                       # the SASS; GPU: against float64
    python benchmarks/gluon_column_pass.py --out DIR   # GPU: timed against the product's column pass (lse given)
"""
from __future__ import annotations

import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gluon_row_pass  # noqa: E402
import row_pass  # noqa: E402

_cta_barrier = gluon_row_pass._cta_barrier


@gluon.jit
def _tile_rows(t, n_mt, m_first, BLOCK_M: gl.constexpr):
    """Step t's group head g and its query tile's first row."""
    g = t // n_mt
    return g, (m_first + t % n_mt) * BLOCK_M


@gluon.jit
def _copy_q_tile(q_smem, Q_head0, t, n_steps, n_mt, m_first, M, sqh, sqm, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                 D: gl.constexpr, LOAD: gl.constexpr):
    """cp.async of step t's query tile into ring slot t % STAGES (rows ≥ M zero-filled, steps past the end empty);
    one commit group per call."""
    g, m0 = _tile_rows(t, n_mt, m_first, BLOCK_M)
    m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LOAD))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    cp.async_copy_global_to_shared(q_smem.index(t % STAGES), Q_head0 + g * sqh + m[:, None] * sqm + d[None, :],
                                   mask=((m < M) & (t < n_steps))[:, None])
    cp.commit_group()


@gluon.jit
def _load_lse(LSE_head0, t, n_steps, n_mt, m_first, M, slh, BLOCK_M: gl.constexpr, MMA: gl.constexpr):
    """Step t's lse (log2 units) along the score tile's columns; +inf past M and past the last step (terms 0)."""
    g, m0 = _tile_rows(t, n_mt, m_first, BLOCK_M)
    m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    return gl.load(LSE_head0 + g * slh + m, mask=(m < M) & (t < n_steps), other=float("inf"))


@gluon.jit
def _terms(s, lse, t, n_mt, m_first, keys, shift, qk_scale, BLOCK_M: gl.constexpr, MMA: gl.constexpr):
    """exp2(s·scale − lse) of step t's tile, 0 where query m does not see key n (n > m + shift)."""
    _, m0 = _tile_rows(t, n_mt, m_first, BLOCK_M)
    m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    x = gl.where(keys[:, None] <= m[None, :] + shift, s * qk_scale - lse[None, :], float("-inf"))
    return gl.exp2(x)


@gluon.jit
def _issue(k_smem, q_smem, Q_head0, t, n_steps, n_mt, m_first, M, sqh, sqm, zero, STAGES: gl.constexpr,
           BLOCK_M: gl.constexpr, D: gl.constexpr, LOAD: gl.constexpr):
    """Step t's wgmma (Sᵀ = K·Q_tᵀ), issued and not waited for, once its query tile landed; the copy of step
    t + STAGES − 2 goes into step t − 2's slot (every warp group waited for wgmma t − 1 before this barrier)."""
    cp.wait_group(STAGES - 3)
    fence_async_shared()
    _cta_barrier()
    _copy_q_tile(q_smem, Q_head0, t + STAGES - 2, n_steps, n_mt, m_first, M, sqh, sqm, STAGES, BLOCK_M, D, LOAD)
    return warpgroup_mma(k_smem, q_smem.index(t % STAGES).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _gluon_column_kernel(Q, K, LSE2, Out, sqb, sqh, sqm, skb, skh, skn, slb, slh, sob, soh, M, N, qk_scale,
                         G: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                         STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    gl.static_assert(STAGES >= 3, "the ring needs a slot for the tile in flight, its successor and one free")
    dtype: gl.constexpr = Q.dtype.element_ty
    MMA: gl.constexpr = gluon_row_pass.wgmma_layout(NUM_WARPS, BLOCK_M)
    LOAD: gl.constexpr = gluon_row_pass.load_layout(NUM_WARPS)
    K_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    Q_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)

    nb = gl.program_id(0)
    hkv = gl.program_id(1)
    b = gl.program_id(2)
    n0 = nb * BLOCK_N
    shift = N - M                                        # query m sees key n iff n <= m + shift
    m_first = gl.maximum(n0 - shift, 0) // BLOCK_M       # the first query tile that sees a key of the block
    n_mt = gl.maximum(gl.cdiv(M, BLOCK_M) - m_first, 1)  # query tiles per group head (≥ 1: a masked tile)
    n_steps = G * n_mt
    Q_head0 = Q + b * sqb + hkv * G * sqh
    LSE_head0 = LSE2 + b * slb + hkv * G * slh

    kn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    k = gl.load(K + b * skb + hkv * skh + kn[:, None] * skn + d[None, :], mask=(kn < N)[:, None], other=0.0)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], K_SHARED, k)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], Q_SHARED)

    keys = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)

    for t in gl.static_range(STAGES - 2):
        _copy_q_tile(q_smem, Q_head0, t, n_steps, n_mt, m_first, M, sqh, sqm, STAGES, BLOCK_M, D, LOAD)
    lse = _load_lse(LSE_head0, 0, n_steps, n_mt, m_first, M, slh, BLOCK_M, MMA)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_issue(k_smem, q_smem, Q_head0, 0, n_steps, n_mt, m_first, M,
                                                           sqh, sqm, zero, STAGES, BLOCK_M, D, LOAD), ))
    for t in range(1, n_steps):                          # step t's wgmma runs during step t − 1's exp2
        token = _issue(k_smem, q_smem, Q_head0, t, n_steps, n_mt, m_first, M, sqh, sqm, zero, STAGES, BLOCK_M, D,
                       LOAD)
        lse_next = _load_lse(LSE_head0, t, n_steps, n_mt, m_first, M, slh, BLOCK_M, MMA)
        acc += _terms(s, lse, t - 1, n_mt, m_first, keys, shift, qk_scale, BLOCK_M, MMA)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
        lse = lse_next
    acc += _terms(s, lse, n_steps - 1, n_mt, m_first, keys, shift, qk_scale, BLOCK_M, MMA)
    cp.wait_group(0)
    gl.store(Out + b * sob + hkv * soh + keys, gl.sum(acc, 1) / G, mask=keys < N)


def column_sums_gluon(q, k, lse2, block_n=128, block_m=64, stages=4, warps=8, scale=None, out=None):
    """(B, Hkv, N) float32: Σ over the queries that see key n of softmax(q·kᵀ·scale) (causal, bottom-right), mean
    over each GQA group. lse2: (B, Hq, M) float32 row log-sum-exp in log2 units (row_pass.row_lse2's)."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and D in (64, 128), "outside the scope"
    assert q.stride(3) == 1 and k.stride(3) == 1 and Hq % Hkv == 0 and lse2.shape == (B, Hq, M)
    assert lse2.dtype == torch.float32 and lse2.stride(2) == 1
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    assert scale > 0
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=q.device) if out is None else out
    _gluon_column_kernel[(triton.cdiv(N, block_n), Hkv, B)](
        q, k, lse2, out, *q.stride()[:3], *k.stride()[:3], *lse2.stride()[:2], *out.stride()[:2], M, N,
        scale * gluon_row_pass.LOG2E, G=Hq // Hkv, D=D, BLOCK_N=block_n, BLOCK_M=block_m, STAGES=stages,
        NUM_WARPS=warps, num_warps=warps)
    return out


def compile_sm90(block_n=128, block_m=64, stages=4, warps=8, dtype="fp16", D=128):
    """This experiment's kernel compiled for sm_90 at the given tiles."""
    return gluon_row_pass.compile_gluon_sm90(
        _gluon_column_kernel, dict(G=4, D=D, BLOCK_N=block_n, BLOCK_M=block_m, STAGES=stages, NUM_WARPS=warps),
        dict(Q="*" + dtype, K="*" + dtype, LSE2="*fp32", Out="*fp32"), warps)


def _reference(q, k, scale):
    """float64 (B, Hkv, N): column sums of the causal softmax, mean over each GQA group."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    s = q.double() @ k.double().repeat_interleave(Hq // Hkv, dim=1).transpose(-1, -2) * scale
    visible = torch.arange(N, device=q.device)[None, :] <= torch.arange(M, device=q.device)[:, None] + (N - M)
    p = s.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)      # rows that see no key: 0
    return p.sum(2).view(B, Hkv, Hq // Hkv, N).mean(2)


def check(device="cpu"):
    """CPU: gluon_row_pass.check_sass. GPU: against float64 (its lse from float64 too) on gluon_row_pass's
    check_cases, the output pre-filled with NaN."""
    if device == "cpu":
        gluon_row_pass.check_sass(compile_sm90, "column")
        return
    worst = 0.0
    for q, k, tiles in gluon_row_pass.check_cases(device):
        scale = 1 / math.sqrt(q.shape[-1])
        ref = _reference(q, k, scale)
        lse2 = row_pass._reference_lse2(q, k, scale).float()
        got = column_sums_gluon(q, k, lse2, *tiles, out=torch.full(ref.shape, float("nan"), device=device))
        assert not got.isnan().any(), "a column was not written"
        err = ((got.double() - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
        worst = max(worst, err)
        # x = s·scale − lse2 in float32: where logits reach ~460 (the fallback case) the lse, the scaled score and
        # the scale itself each carry about an ulp of 460 (3e-5), which the H200 run showed as 5.9e-5
        big = lse2[torch.isfinite(lse2)].abs().max().item()
        assert err < 1e-5 + 4 * 2.0 ** -23 * big, (q.shape, k.shape, q.dtype, tiles, err)
    print(f"Gluon column pass matches float64 (largest error relative to max(1, |sum|): {worst:.1e})")


def gpu(out_dir):
    """Full causal 32/8 fp16 D 128 at 16k, 8k and 4k: the Gluon column pass at several tiles against the product's
    column pass with the lse given (row_pass.full_causal_runs' baselines), all timed in one run
    (gluon_column_pass.json in out_dir, rewritten after each row)."""
    from colreduce_kvprune.kernels import colreduce as kmod

    tiles_list = [tuple(int(x) for x in t.split("x")) for t in
                  os.environ.get("GLUON_TILES", "128x64x4x8,128x128x3x8,128x64x4x4,128x64x3x8").split(",")]
    for q, k, shape, record in row_pass.full_causal_runs(out_dir, "gluon_column_pass.json"):
        lse2 = row_pass.row_lse2(q, k, "fixed_offset")
        ref = kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(q.shape[-1]), group_reduce="mean",
                                    lse=lse2 / gluon_row_pass.LOG2E)
        for tiles in tiles_list:
            record(dict(shape=shape, name="gluon column pass (lse given)", tiles=tiles),
                   lambda: column_sums_gluon(q, k, lse2, *tiles),
                   lambda got: {"max_rel_diff_vs_product": ((got - ref).abs() / ref.abs().clamp(min=1.0)).max().item()})


def main(argv=None):
    row_pass._bench_kernels().experiment_main(__doc__, check, gpu, argv)


if __name__ == "__main__":
    main()
