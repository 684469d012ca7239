"""Experiment (issue 19, item 2): a persistent column pass for query windows, against the product's.

The product's window column pass (`_window_column_kernel`) runs one program per (128-key tile, kv head) and loads
the group's query tiles again in every program: at window 64, GQA 32/8, N = 128k that is 8,192 programs × 64 KB of
queries read from L2, twice the bytes of K itself (256 MiB) — a plausible reason why it takes 2.1× its own floor
(0.223 ms with the lse given; floor 0.105). Here each program loads the group's G·M query rows once (one
[G·M, D] operand, rows r = g·M + m) with their lse, then loops over key tiles t = pid, pid + P, … (tl.range,
software-pipelined K loads): per tile one q·kᵀ dot [G·M, BLOCK_N], exp2, the causal mask, and a sum over all G·M
rows — the group's sum of column sums, divided by G for the group mean. Queries are read P × 64 KB in all.

Scope of the experiment: dense (B, H, M, D) inputs, causal, reduction "sum", group_reduce "mean", the lse given
(the column pass alone: the product's row pass would give it), G·M ≤ 256, D a power of two. Not in the product:
the result differs from the product's in summation order only (checked against float64 here and against the
product on the GPU).

    python benchmarks/window_persistent.py --check          # CPU: TRITON_INTERPRET=1, small shapes vs float64
    python benchmarks/window_persistent.py --out DIR        # GPU: variants at 32/8, W=64, N=128k, then 8k–128k,
                                                            # bf16 and MHA, each against the product's pass
"""
from __future__ import annotations

import math
import os

import sys

import torch
import triton
import triton.language as tl

from colreduce_kvprune.reference import colreduce_torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_path import _bench_kernels  # noqa: E402 (benchmarks/kernels.py loaded once, as prune_path loads it)

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)          # what a jit function may read from the module


@triton.jit
def _persistent_window_column(Q, K, LSE, Out, sqb, sqh, sqm, skb, skh, skn, slb, slh, slm, sob, soh, son,
                              M, N, qk_scale, n_prog,
                              G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                              STAGES: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    r = tl.arange(0, BLOCK_R)                  # the group's rows: query m of head hk·G + g at r = g·M + m
    g = r // M
    m = r % M
    r_ok = r < G * M
    d = tl.arange(0, D)
    h = hk * G + g
    q = tl.load(Q + b * sqb + h[:, None] * sqh + m[:, None] * sqm + d[None, :], mask=r_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + m * slm, mask=r_ok, other=float("inf")).to(tl.float32) * _LOG2E
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)     # a row that sees no key contributes nothing
    shift = N - M
    for t in tl.range(pid, tl.cdiv(N, BLOCK_N), n_prog, num_stages=STAGES):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kt = tl.load(K + b * skb + hk * skh + n[None, :] * skn + d[:, None], mask=n_ok[None, :], other=0.0)
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse2[:, None])
        p = tl.where(n[None, :] <= m[:, None] + shift, p, 0.0)
        tl.store(Out + b * sob + hk * soh + n * son, tl.sum(p, 0) / G, mask=n_ok)


def persistent_column(q, k, lse, n_prog, block_n=64, warps=8, stages=3, scale=None, out=None):
    """(B, Hkv, N) float32: Σ over the group's heads and the window's queries of softmax(q·kᵀ) (causal,
    bottom-right), divided by G. q (B, Hq, M, D), k (B, Hkv, N, D), lse (B, Hq, M) natural log."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    assert G * M <= 256 and D == triton.next_power_of_2(D), "outside the experiment's scope"
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=q.device) if out is None else out
    n_prog = max(1, min(n_prog, triton.cdiv(N, block_n)))
    _persistent_window_column[(n_prog, Hkv, B)](
        q, k, lse, out, *q.stride()[:3], *k.stride()[:3], *lse.stride(), *out.stride(), M, N, scale * LOG2E, n_prog,
        G=G, BLOCK_R=max(16, triton.next_power_of_2(G * M)), BLOCK_N=block_n, D=D, STAGES=stages,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out


def check(device="cpu"):
    """Small shapes against float64, the output pre-filled with NaN (every column must be written): on the CPU
    under TRITON_INTERPRET=1, or on a GPU (tests/test_experiments.py runs it)."""
    torch.manual_seed(0)
    worst = 0.0
    for B, Hq, Hkv, M, N, D, block_n, n_prog in [(1, 4, 2, 8, 100, 16, 16, 3), (2, 6, 2, 5, 37, 32, 16, 2),
                                                   (1, 8, 2, 16, 64, 16, 32, 5), (1, 2, 2, 12, 12, 16, 16, 1)]:
        q = torch.randn(B, Hq, M, D, device=device)
        k = torch.randn(B, Hkv, N, D, device=device)
        lse = _bench_kernels().row_lse(q, k, 1 / math.sqrt(D), True)
        ref = colreduce_torch(q.double(), k.double(), "sum", is_causal=True, group_reduce="mean")
        got = persistent_column(q, k, lse, n_prog, block_n=block_n, warps=4, stages=1,
                                out=torch.full((B, Hkv, N), float("nan"), device=device))
        assert not got.isnan().any(), "a column was not written"
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        assert err < 1e-5, (B, Hq, Hkv, M, N, D, err)
    print(f"persistent window column pass matches float64 (largest relative error {worst:.1e})")


def gpu(out_dir):
    """The product's window column pass (lse given) and the persistent one, timed in one run: a grid of tiles at
    32/8, W=64, N=128k fp16, then the best tiles of the sixteenth session's run (64 keys, 4 warps, 3 stages) at 1
    and 2 programs per SM on other window shapes. window_persistent.json in out_dir, rewritten after each row."""
    bk = _bench_kernels()
    from colreduce_kvprune.kernels import colreduce as kmod
    flush = bk._flush_buffer()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = [(bn, w, st, per_sm) for bn, w in ((64, 8), (128, 8), (64, 4))   # 128 keys at 4 warps: ~256 registers
            for st in (2, 3) for per_sm in (1, 2, 4)]                       # of q and p a thread
    best = [(64, 4, 3, 1), (64, 4, 3, 2)]
    shapes = [(32, 8, 131072, torch.float16, grid), (32, 8, 8192, torch.float16, best),
              (32, 8, 32768, torch.float16, best), (32, 8, 131072, torch.bfloat16, best),
              (32, 32, 131072, torch.float16, best)]
    record = bk.experiment_rows(out_dir, "window_persistent.json", flush)
    for Hq, Hkv, N, dtype, variants in shapes:
        B, M, D = 1, 64, 128
        torch.manual_seed(0)
        q = torch.randn(B, Hq, M, D, device="cuda", dtype=dtype)
        k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype)
        lse = bk.row_lse(q, k, 1 / math.sqrt(D), True)
        shape = f"win{M} {Hq}/{Hkv} N={N} {str(dtype).replace('torch.', '')}"

        def product():
            return kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(D), group_reduce="mean",
                                         lse=lse)
        ref = product()
        record(dict(shape=shape, name="product window column pass (lse given)"), product)
        for block_n, warps, stages, per_sm in variants:
            n_prog = max(1, sms * per_sm // (B * Hkv))
            record(dict(shape=shape, name="persistent", block_n=block_n, warps=warps, stages=stages, n_prog=n_prog),
                   lambda: persistent_column(q, k, lse, n_prog, block_n, warps, stages),
                   lambda got: {"rel_err_vs_product": ((got - ref).norm() / ref.norm()).item()})
        del q, k, lse, ref
        torch.cuda.empty_cache()

def main(argv=None):
    _bench_kernels().experiment_main(__doc__, check, gpu, argv)


if __name__ == "__main__":
    main()
