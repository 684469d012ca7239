"""Experiment (issue 19, twenty-fifth session; not in the product): the window column pass (lse given) in Triton with
the keys on the dot's rows and the lse folded into the dot — the layout that made benchmarks/gluon_ws_window_pass.py's
FOLD configs the first Gluon window pass faster than the product on the H200 (0.164–0.166 ms against 0.170 at
window 64, GQA 32/8, N = 128k, fp16), written as a plain Triton kernel so that the interpreter checks it on the CPU
and the product's kernel could take it over.

The product's persistent window kernel (kernels/colreduce.py _window_column_kernel, PERSISTENT) computes
p = exp2(q·kᵀ·scale − lse2) as [group rows, keys] and sums over the rows: a reduction across the warps (through
shared memory, a barrier per key tile). Here each program (the same runs of consecutive key tiles of one sequence ×
kv head) computes pᵀ as [keys, group rows] = k·qᵀ, whose row sums stay inside a thread and its quad. The lse of the
rows would then be per column, a register per column and thread; instead (FOLD) the dot subtracts it: one more
k-step, ones[key, j] · (−part_j[row]) with lse2 / scale split into four values of the inputs' dtype (their sum equals
it to float32's precision), so x = (q·kᵀ − lse2 / scale)·scale. Rows out of range or seeing no key get 30000 (p = 0).
Sum/mean over the queries with the group's sum/mean (the fused cases), dense or varlen, not paged.

    python benchmarks/window_fold.py --check    # CPU: TRITON_INTERPRET=1, small fp16 shapes against float64
    WS_WINDOW_MODULE=window_fold python benchmarks/ws_window.py --out DIR   # GPU: float64 check, timed vs product

On the H200 (twenty-sixth session, image torch 2.11 / Triton 3.6, results/h200_kernels/ws_window_visit28.json): every
config tried (tf, tf_s2, tf_w8) passes ws_window.py's 7 float64 cases (worst 1.6e-6), and is slower than the product
except at window 32, 128k (tf 0.101 vs 0.116 ms); window 64, 32/8, 128k: tf_s2 0.198, tf_w8 0.206, tf 0.216 against
the product's 0.174. Not taken into the product. Compiled for sm_90 on the CPU
(`python benchmarks/window_fold.py --compile`, Triton 3.6 and 3.7.1, fp16 D 128 / bf16 D 64, no spills): "t" 237–240
registers (the rows' lse per column), the fold's 183–188; shared memory 125 KB at 3 stages (fp16, D 128: qᵀ 64 KB
+ the key ring), so only "tf_s2" (109 KB) keeps two programs per SM resident as the product's kernel does (whose
group rows sit in registers as the dot's A operand). ptxas puts no exp2 inside a wgmma window (Triton waits for
each dot), as in the product's kernel.
"""
from __future__ import annotations

import math
import os
import sys

if __name__ == "__main__" and "--check" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before Triton and the product's kernels are imported
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from colreduce_kvprune.kernels.colreduce import (_column_counts, _group_rows, _load_lse2, _mean_by_count,  # noqa: E402
                                                 _seq_bounds)

PARTS = tl.constexpr(4)       # the lse's parts in the inputs' dtype
FOLD_K = tl.constexpr(16)     # the fold's k-step: the parts, then zeros
CONFIGS = {    # name -> (keys per tile, warps, stages, programs per SM, fold)
    "t": (64, 4, 3, 2, False),     # transposed, the lse per column in registers
    "tf": (64, 4, 3, 2, True),     # transposed with the fold (fp16, D 128: 125 KB of shared memory, one per SM fits)
    "tf_s2": (64, 4, 2, 2, True),  # two stages: 109 KB, two programs per SM fit
    "tf_1": (64, 4, 3, 1, True),
    "tf_w8": (128, 8, 3, 1, True),
}


@triton.jit
def _fold_window_kernel(Q, K, LSE, Out, cu_q, cu_k, sqb, sqh, sqm, skb, skh, skn, slb, slh, slm, lse_q0, sob, soh,
                        son, max_m, max_n, qk_scale, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                        MEAN: tl.constexpr, GROUP_MEAN: tl.constexpr, IS_VARLEN: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, LSE_NATURAL: tl.constexpr, FOLD: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (P, B·Hkv): program p takes the key tiles p·T … p·T + T − 1 (T = cdiv(cdiv(max_n, BLOCK_N), P)) of one
    sequence × kv head. The group's rows r = g·BLOCK_M + m (G heads × BLOCK_M ≥ the window's queries) are loaded
    once, as qᵀ [D, rows]; each key tile's [BLOCK_N, rows] scores are summed over the rows."""
    GP: tl.constexpr = triton.next_power_of_2(G)
    b = tl.program_id(1) // HKV
    hk = tl.program_id(1) % HKV
    q0, Mb, k0, Nb = _seq_bounds(cu_q, cu_k, b, max_m, max_n, IS_VARLEN, False)
    shift = Nb - Mb
    run = tl.cdiv(tl.cdiv(max_n, BLOCK_N), tl.num_programs(0))
    t0 = tl.program_id(0) * run
    t_keys = tl.minimum(tl.minimum(t0 + run, tl.cdiv(max_n, BLOCK_N)), tl.cdiv(Nb, BLOCK_N))
    if t0 < t_keys:
        g, m, r_ok = _group_rows(Mb, G, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        h = hk * G + g
        qt = tl.load(Q + b * sqb + h[None, :] * sqh + (q0 + m)[None, :] * sqm + d[:, None],
                     mask=r_ok[None, :] & (d[:, None] < D), other=0.0)
        lse2 = _load_lse2(LSE + b * slb + h * slh + q0 * lse_q0 * slm, m, r_ok, slm, LSE_NATURAL)  # absent: +inf
        if FOLD:
            j = tl.arange(0, FOLD_K)
            rest = tl.where(lse2 == float("inf"), 30000.0, lse2 / qk_scale)
            parts = tl.zeros([FOLD_K, GP * BLOCK_M], tl.float32)
            for i in tl.static_range(PARTS):
                part = rest.to(qt.dtype).to(tl.float32)
                parts = tl.where(j[:, None] == i, -part[None, :], parts)
                rest = rest - part
            parts = parts.to(qt.dtype)
            ones = (tl.where(j[None, :] < PARTS, 1.0, 0.0) + tl.zeros([BLOCK_N, FOLD_K], tl.float32)).to(qt.dtype)
        for t in tl.range(t0, t_keys):
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < Nb
            k = tl.load(K + b * skb + hk * skh + (k0 + n)[:, None] * skn + d[None, :],
                        mask=n_ok[:, None] & (d[None, :] < D), other=0.0)
            s = tl.dot(k, qt)
            if FOLD:
                x = tl.dot(ones, parts, s) * qk_scale
            else:
                x = s * qk_scale - lse2[None, :]
            p = tl.exp2(x)
            if IS_CAUSAL:
                p = tl.where(n[:, None] <= m[None, :] + shift, p, 0.0)
            col = tl.sum(p, 1)
            if MEAN:
                col = _mean_by_count(col, _column_counts(n, shift, Mb, IS_CAUSAL))
            if GROUP_MEAN:
                col = col / G
            tl.store(Out + b * sob + hk * soh + (k0 + n) * son, col, mask=n_ok)


def launch(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, lse_strides: tuple, lse_q0: int, out: torch.Tensor,
           out_strides: tuple, cu_q, cu_k, max_m: int, max_n: int, B: int, qk_scale: float, *, varlen: bool,
           is_causal: bool, lse_natural: bool, mean: bool, group_mean: bool, sms: int, config: str | None = None
           ) -> bool:
    """benchmarks/gluon_ws_window_pass.py's launch (benchmarks/ws_window.py calls either): the column values of the
    call into out (colreduce.py's strides), given its lse (lse_natural: natural-log units; else log2)."""
    block_n, warps, stages, per_sm, fold = CONFIGS[config or "tf"]
    D, Hq, Hkv = q.shape[-1], q.shape[1], k.shape[1]
    if varlen:
        sqb, sqh, sqm = 0, q.stride(1), q.stride(0)
        skb, skh, skn = 0, k.stride(1), k.stride(0)
    else:
        sqb, sqh, sqm = q.stride(0), q.stride(1), q.stride(2)
        skb, skh, skn = k.stride(0), k.stride(1), k.stride(2)
        cu_q = cu_k = out                                # unused placeholders (IS_VARLEN is False)
    programs = max(1, per_sm * sms // (B * Hkv))
    grid = (min(programs, triton.cdiv(max_n, block_n)), B * Hkv)
    _fold_window_kernel[grid](q, k, lse, out, cu_q, cu_k, sqb, sqh, sqm, skb, skh, skn, *lse_strides, lse_q0,
                              *out_strides, max_m, max_n, qk_scale, HKV=Hkv, G=Hq // Hkv, D=D, MEAN=mean,
                              GROUP_MEAN=group_mean, IS_VARLEN=varlen, IS_CAUSAL=is_causal, LSE_NATURAL=lse_natural,
                              FOLD=fold, BLOCK_M=max(16, triton.next_power_of_2(max(1, max_m))), BLOCK_N=block_n,
                              BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=warps, num_stages=stages)
    return True


def check(device="cpu"):
    """Small shapes against float64, outputs pre-filled with NaN: on the CPU under TRITON_INTERPRET=1 (fp16 only:
    the interpreter has no bfloat16), on a GPU benchmarks/ws_window.py's full check (fp16/bf16, D 64/128, varlen)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import types

    import ws_window
    from colreduce_kvprune.reference import colreduce_torch
    ns = types.SimpleNamespace(launch=launch, CONFIGS=CONFIGS)
    if device != "cpu":
        ws_window.check(ns, torch.cuda.get_device_properties(device).multi_processor_count, lambda row: None,
                        configs=("t", "tf"))
        return
    torch.manual_seed(0)
    worst = 0.0
    for config in ("t", "tf"):
        for B, Hq, Hkv, M, N, D, causal, red, gr, sms in [(1, 8, 2, 8, 300, 32, True, "sum", "mean", 3),
                                                          (2, 4, 2, 5, 77, 16, True, "mean", "sum", 2),
                                                          (1, 2, 1, 12, 40, 16, False, "mean", "mean", 1)]:
            q = torch.randn(B, Hq, M, D, dtype=torch.float16)
            k = (torch.randn(B, Hkv, N, D) * 1.5).to(torch.float16)
            lse = ws_window._dense_lse(q, k, 1 / math.sqrt(D), causal).float()
            got = ws_window.gluon_dense(ns, q, k, lse, red, gr, causal, config, sms)
            ref = colreduce_torch(q.double(), k.double(), red, is_causal=causal, scale=1 / math.sqrt(D),
                                  group_reduce=gr)
            assert not got.isnan().any(), "a column was not written"
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            assert err < 2e-5, (config, B, Hq, Hkv, M, N, D, causal, red, gr, err)
    print(f"the transposed window pass matches float64 (largest relative error {worst:.1e})")


def compile_sm90(config: str = "tf", dtype: str = "fp16", D: int = 128, G: int = 4, M: int = 64):
    """The kernel compiled for sm_90 with the installed Triton (no GPU needed): window 64, GQA 4, dense, causal,
    sum / group mean, natural lse, strides 16-divisible as the JIT specialises real tensors."""
    from triton.compiler import ASTSource
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gluon_row_pass     # its sm_90 compile helper (the same signature rules for Triton and Gluon kernels)

    block_n, warps, stages, _, fold = CONFIGS[config]
    const = dict(HKV=8, G=G, D=D, MEAN=False, GROUP_MEAN=True, IS_VARLEN=False, IS_CAUSAL=True, LSE_NATURAL=True,
                 FOLD=fold, BLOCK_M=M, BLOCK_N=block_n, BLOCK_D=D)
    ptrs = dict(Q="*" + dtype, K="*" + dtype, LSE="*fp32", Out="*fp32", cu_q="*fp32", cu_k="*fp32")
    return gluon_row_pass.compile_for_sm90(ASTSource, _fold_window_kernel, const, ptrs,
                                           dict(num_warps=warps, num_stages=stages))


if __name__ == "__main__":
    if "--check" in sys.argv:
        check("cpu")
    elif "--compile" in sys.argv:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gluon_row_pass
        for name in CONFIGS:
            print(name, gluon_row_pass.sass_overlap(compile_sm90(name)))
