"""Experiment (issue 19, twenty-ninth session; not in the product): both passes of a short causal prompt in one launch.

The sweep's same-work reference (benchmarks/same_work.py) found NVIDIA's kernels doing our work faster than ours at
full causal 512–4096 (2048: 0.117 ms against cuDNN's 0.105; 512: 0.026 against 0.019), where ours is two launches
(row pass, column pass) over grids of short causal programs. Here one kernel does both for a program's rows:
- grid (G · cdiv(M, BLOCK_R), B · Hkv): a program takes BLOCK_R queries of one query head of the kv group;
- phase 1: those rows' lse over every key they see (online max, log2 units), keys in BLOCK_N tiles;
- phase 2: the same key tiles again, pᵀ = exp2(k·qᵀ·scale − lse2) as [keys, rows] (a key's sum over the rows stays
  inside a thread and its quad), summed over the rows into Part[b·Hkv + hk, program, key] (fp32);
- phase 3: the program that finishes last for its sequence × kv head (an acq_rel counter, reset by it) sums the
  partials in program order (deterministic) for every key, only the programs whose rows see the key, and writes the
  group's mean of the query sums.
Keys are read twice from L2 by the same program (a prompt of ≤ 4096 keys: 1 MiB a kv head at D 128), the lse never
leaves the program, and there is one launch. Scope: dense (B, H, L, D), causal (bottom-right) with M ≤ N, sum over
the queries, mean over the group (the serving path's fused case), fp16/bf16/fp32.

On the H200 (twenty-ninth session, image torch 2.11 / Triton 3.6, `SHORT_FUSED_CONFIGS=r64n64w4,r128n64w8
SHORT_FUSED_N=512,1024,2048 SCRIPT_LIMIT=75 bash benchmarks/gpu_sweep.sh script short_fused`,
results/h200_kernels/short_fused_visit31.json, one timing each): exact (1e-7 from the product's result) and
**slower than the product**: full causal 32/8 512 0.041 ms against 0.027, 1024 0.116 against 0.053, 2048 0.345
against 0.118; MHA 32 2048 0.210 against 0.116. Phase 3 is one program per sequence × kv head reading every
partial (at 2048, 32/8: 128 programs' × 2048 keys, 1 MiB) after all the others: the likely tail, not profiled. A
combine spread over key tiles (a counter per key tile, the last writer of a tile sums it) is the untried next step.
Under the image's Triton 3.6 the interpreter rejects the key loop's bound (`range(0, hi, BLOCK_N)`, a 1-element
array there): `--check` needs Triton ≥ 3.7 (CI's 3.7.1); on a GPU tests/test_experiments.py runs check() compiled.

    python benchmarks/short_fused.py --check     # CPU: TRITON_INTERPRET=1, small shapes against float64
    python benchmarks/short_fused.py --out DIR   # GPU: full causal 32/8 512–4096 against the product and the same
                                                 # work (SDPA at D/2, twice the heads), short_fused.json
"""
from __future__ import annotations

import math
import os
import sys

if __name__ == "__main__" and "--check" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before Triton is imported
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from colreduce_kvprune.reference import colreduce_torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_path import _bench_kernels  # noqa: E402

LOG2E = 1.4426950408889634
CONFIGS = {"r64n64w4": (64, 64, 4, 3), "r64n64w8": (64, 64, 8, 2), "r128n64w8": (128, 64, 8, 2),
           "r64n32w4": (64, 32, 4, 3), "r32n64w4": (32, 64, 4, 3)}      # BLOCK_R, BLOCK_N, warps, stages


@triton.jit
def _short_fused_kernel(Q, K, Part, Counter, Out, M, N, qk_scale, G: tl.constexpr, HKV: tl.constexpr,
                        D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    nb = tl.cdiv(M, BLOCK_R)
    pid = tl.program_id(0)                      # g · nb + row block
    bh = tl.program_id(1)                       # b · HKV + hk
    g = pid // nb
    m0 = (pid % nb) * BLOCK_R
    shift = N - M                               # query m sees key j iff j <= m + shift
    rows = m0 + tl.arange(0, BLOCK_R)
    r_ok = rows < M
    d = tl.arange(0, BLOCK_D)
    q_head = Q + ((bh // HKV) * HKV * G + (bh % HKV) * G + g) * M * D
    k_head = K + bh * N * D
    q = tl.load(q_head + rows[:, None] * D + d[None, :], mask=r_ok[:, None] & (d[None, :] < D), other=0.0)
    hi = tl.minimum(N, tl.minimum(m0 + BLOCK_R, M) + shift)          # keys [0, hi) seen by some row
    # phase 1: the rows' lse (log2 units)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_head + cols[:, None] * D + d[None, :], mask=(cols[:, None] < N) & (d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((cols[None, :] <= rows[:, None] + shift) & (cols[None, :] < N), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse2 = tl.where(r_ok & (l_i > 0), m_i + tl.log2(l_i), float("inf"))  # rows past M: p = 0
    # phase 2: the rows' column sums, [keys, rows] so a key's sum stays in its thread and quad
    part = Part + (bh * tl.num_programs(0) + pid) * N
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_head + cols[:, None] * D + d[None, :], mask=(cols[:, None] < N) & (d[None, :] < D), other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p = tl.exp2(st - lse2[None, :])
        p = tl.where(cols[:, None] <= rows[None, :] + shift, p, 0.0)
        tl.store(part + cols, tl.sum(p, 1), mask=cols < N)
    # phase 3: the last program of this sequence × kv head sums the partials in program order
    if tl.atomic_add(Counter + bh, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            acc = tl.zeros([BLOCK_N], tl.float32)
            for r in range(0, tl.num_programs(0)):
                r_hi = tl.minimum(N, tl.minimum((r % nb) * BLOCK_R + BLOCK_R, M) + shift)
                acc += tl.load(Part + (bh * tl.num_programs(0) + r) * N + cols, mask=cols < r_hi, other=0.0)
            tl.store(Out + bh * N + cols, acc / G, mask=cols < N)
        tl.atomic_xchg(Counter + bh, 0, sem="relaxed", scope="gpu")   # ready for the next launch


_scratch = {}


def short_fused(q, k, config="r64n64w4", out=None, poison=False):
    """(B, Hkv, N) float32: the sum over each query head's rows of softmax(q·kᵀ/√D) (causal, bottom-right), mean
    over the kv group. q (B, Hq, M, D), k (B, Hkv, N, D), contiguous, M ≤ N. poison (check()): the partials start
    as NaN, so a partial read where no program wrote it fails."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert q.is_contiguous() and k.is_contiguous() and M <= N and Hq % Hkv == 0
    G = Hq // Hkv
    block_r, block_n, warps, stages = CONFIGS[config]
    programs = G * triton.cdiv(M, block_r)
    key = (q.device, B * Hkv)
    if key not in _scratch:                      # counters start at zero and are left at zero by each launch
        _scratch[key] = torch.zeros(B * Hkv, dtype=torch.int32, device=q.device)
    part = torch.empty(B * Hkv * programs * N, dtype=torch.float32, device=q.device)
    if poison:
        part.fill_(float("nan"))
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=q.device) if out is None else out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _short_fused_kernel[(programs, B * Hkv)](
        q, k, part, _scratch[key], out, M, N, LOG2E / math.sqrt(D), G=G, HKV=Hkv, D=D, BLOCK_R=block_r,
        BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=precision, num_warps=warps,
        num_stages=stages)
    return out


def check(device="cpu"):
    """Small shapes against float64, the output pre-filled with NaN (every column must be written), each shape
    twice (the counters must come back to zero): on the CPU under TRITON_INTERPRET=1, or on a GPU."""
    worst = 0.0
    cases = [((1, 4, 2, 40, 40, 16), "r32n64w4"), ((2, 6, 2, 37, 70, 32), "r32n64w4"),
             ((1, 2, 2, 64, 64, 16), "r64n32w4"), ((1, 8, 2, 20, 90, 16), "r32n64w4"),
             ((1, 4, 2, 100, 130, 16), "r32n64w4"), ((1, 2, 2, 96, 96, 16), "r32n64w4")]   # partials ending early
    if device == "cuda":
        cases += [((1, 32, 8, 512, 512, 128), c) for c in CONFIGS] + [((2, 28, 4, 700, 1000, 64), "r64n64w4")]
    for dtype in (torch.float32, torch.float16):
        for (B, Hq, Hkv, M, N, D), config in cases:
            g = torch.Generator(device="cpu").manual_seed(B * 1000 + M)
            q = (torch.randn(B, Hq, M, D, generator=g) * 1.5).to(device=device, dtype=dtype)
            k = (torch.randn(B, Hkv, N, D, generator=g) * 1.5).to(device=device, dtype=dtype)
            ref = colreduce_torch(q.double(), k.double(), "sum", is_causal=True, group_reduce="mean")
            for _ in range(2):
                got = short_fused(q, k, config, out=torch.full((B, Hkv, N), float("nan"), device=device),
                                  poison=True)
                assert not got.isnan().any(), "a column was not written"
                err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
                worst = max(worst, err)
                assert err < (1e-5 if dtype == torch.float32 else 2e-3), (B, Hq, Hkv, M, N, D, dtype, err)
    print(f"short fused passes match float64 (largest relative error {worst:.1e})")


def gpu(out_dir):
    """Full causal 32/8, D 128, fp16 at 512–4096 (and MHA 32 at 2048): every config against the product's call and
    the same work (benchmarks/kernels.py _same_work_fns), relative difference to the product. short_fused.json."""
    bk = _bench_kernels()
    from colreduce_kvprune import colreduce
    flush = bk._flush_buffer()
    bk.warm_up_clocks()
    record = bk.experiment_rows(out_dir, "short_fused.json", flush)
    configs = os.environ.get("SHORT_FUSED_CONFIGS", ",".join(CONFIGS)).split(",")
    sizes = [int(n) for n in os.environ.get("SHORT_FUSED_N", "512,1024,2048,4096").split(",")]
    for Hq, Hkv, N in [(32, 8, n) for n in sizes] + ([(32, 32, 2048)] if 2048 in sizes else []):
        torch.manual_seed(0)
        q = torch.randn(1, Hq, N, 128, device="cuda", dtype=torch.float16)
        k = torch.randn(1, Hkv, N, 128, device="cuda", dtype=torch.float16)
        shape = f"full {Hq}/{Hkv} N={N}"

        def product():
            return colreduce(q, k, "sum", is_causal=True, group_reduce="mean")
        ref = product()
        record(dict(shape=shape, name="product"), product)
        for name, fn in bk._same_work_fns([(q, k)]).items():
            record(dict(shape=shape, name=name), fn)
        for config in configs:
            record(dict(shape=shape, name=f"fused {config}"), lambda: short_fused(q, k, config),
                   lambda got: {"rel_err_vs_product": ((got - ref).norm() / ref.norm()).item()})
        del q, k, ref
        torch.cuda.empty_cache()


def main(argv=None):
    _bench_kernels().experiment_main(__doc__, check, gpu, argv)


if __name__ == "__main__":
    main()
