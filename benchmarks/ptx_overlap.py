"""Does Triton let a pass overlap its q·kᵀ (wgmma) with its exp2? Read from the PTX, on the CPU (issue 19, item 2).

Both of issue 19's unmet big-shape goals (full causal 16k ≤ 1.0× SDPA, window 128k ≤ 0.20 ms) need each pass to
run its MMA and its exp2 at the same time: each pass of full causal 16k costs ~2.3 ms on the H200, the sum of its MMA
(~1.1 ms) and MUFU (~1.1 ms) floors. On Hopper an overlap needs an asynchronous wgmma still in flight while the
exp2 of an earlier tile runs: in the PTX, `wgmma.wait_group.sync.aligned N` with N ≥ 1 in the loop. This script
compiles for sm_90 with the installed Triton (no GPU, no driver: PTX and the bundled ptxas) and counts, per kernel:
wgmma instructions, the pending counts of their waits, and ex2 instructions. Kernels:

- the product's row and column kernels at the launches of tests/test_colreduce_compile.py (the H200's tiles);
- benchmarks/row_pass.py's variants written for an overlap (lookahead: the next tile's dot before this tile's exp2;
  pair: two half-blocks' dots before either's exp2) beside the fixed offset;
- two controls: an attention-like loop (s = q·kᵀ, p = exp2(s), acc = p·v + acc) and a matmul loop (acc = a·b +
  acc), to see what Triton keeps in flight at all.

Result with Triton 3.7.1 (vLLM 0.32's pin) on the CPU and 3.6 on the H200, twentieth session (the same counts;
benchmarks/results/h200_kernels/ptx_overlap_triton3.7.1_cpu.json, ptx_overlap_triton3.6_h200.json): every wait in
every kernel, ours and the controls, is wait_group 0. A dot that accumulates into a loop-carried accumulator is left
in flight without a wait inside its loop (the matmul control has one wait, after its loop); any other dot is waited
for completely before its result's first use. So within one warp group a tile's exp2 always follows its own q·kᵀ
and no other wgmma is in flight: lookahead and pair only reorder the issue, and the SASS (ptxas -v, nvdisasm) of
the fixed offset shows per tile: WARPGROUP.ARRIVE, 16 HGMMA.64x64x16, WARPGROUP.DEPBAR, 64 MUFU.EX2 per thread (168
registers). Overlap is left to other CTAs on the same SM. benchmarks/gluon_row_pass.py states the overlap by hand.

    python benchmarks/ptx_overlap.py [--out DIR]     # ptx_overlap.json in DIR; ~10 s on 2 cores
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


@triton.jit
def _attention_like_kernel(Q, K, V, Out, N, qk_scale, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """The control: one row block of an attention forward without the running max (only the loop's shape matters)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    q = tl.load(Q + r[:, None] * D + d[None, :])
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        s = tl.dot(q, tl.load(K + n[None, :] * D + d[:, None]))
        p = tl.exp2(s * qk_scale)
        acc = tl.dot(p.to(tl.float16), tl.load(V + n[:, None] * D + d[None, :]), acc)
    tl.store(Out + r[:, None] * D + d[None, :], acc)


@triton.jit
def _gemm_kernel(A, B, Out, K_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The second control: a plain matmul loop (acc = a·b + acc, both operands from memory)."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K_dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.dot(tl.load(A + r[:, None] * K_dim + k[None, :]), tl.load(B + k[:, None] * BLOCK_N + c[None, :]),
                     acc)
    tl.store(Out + r[:, None] * BLOCK_N + c[None, :], acc)


def _count(ptx: str) -> dict:
    waits = collections.Counter(int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))
    return dict(wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), wait_group_pending={str(k): v for k, v in
                sorted(waits.items())}, ex2=len(re.findall(r"ex2\.approx", ptx)),
                overlap_possible=any(k >= 1 for k in waits))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    assert not os.environ.get("TRITON_INTERPRET"), "compiles for sm_90: run without TRITON_INTERPRET"
    import row_pass
    import test_colreduce_compile as tcc

    rows = [dict(kernel=f"product {fn.__name__}", launch=name, **_count(compiled.asm["ptx"]))
            for name, fn, _, compiled in tcc.product_launches()]
    for variant in ("fixed_offset", "fixed_offset+lookahead", "fixed_offset+pair", "lookahead"):
        rows.append(dict(kernel=f"row_pass.py {variant}", launch="128x64, 4 warps, 3 stages",
                         **_count(tcc.compile_row_pass_variant(row_pass, variant).asm["ptx"])))
    compiled = tcc._compile_sm90(_attention_like_kernel, dict(D=128, BLOCK_R=128, BLOCK_N=64),
                                 dict(Q="*fp16", K="*fp16", V="*fp16", Out="*fp32"), 4, 3)
    rows.append(dict(kernel="control: attention-like loop (acc = p·v + acc)", launch="128x64, 4 warps, 3 stages",
                     **_count(compiled.asm["ptx"])))
    compiled = tcc._compile_sm90(_gemm_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
                                 dict(A="*fp16", B="*fp16", Out="*fp32"), 4, 3)
    rows.append(dict(kernel="control: matmul loop (acc = a·b + acc)", launch="128x128x64, 4 warps, 3 stages",
                     **_count(compiled.asm["ptx"])))
    print(f"Triton {triton.__version__}, sm_90")
    for r in rows:
        print(f"{r['kernel']:55s} {r['launch'][:48]:48s} wgmma {r['wgmma']:4d} waits {r['wait_group_pending']} "
              f"ex2 {r['ex2']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ptx_overlap.json"), "w") as f:
            json.dump(dict(triton=triton.__version__, target="sm_90", rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
