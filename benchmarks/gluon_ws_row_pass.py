"""Experiment (issue 19, item 2: full causal 16k ≤ 1.0× SDPA): a warp-specialised row pass in Gluon.

What the earlier row passes measured (benchmarks/NOTES.md): Nsight Compute puts the product's row kernel at ~58% of
the tensor pipe with 8 warps per SM (168 registers a thread: one CTA of two warp groups), its warps stalled on CTA
barriers and fixed-latency waits; the two warp groups of a CTA meet at a barrier on every key tile, so they take
their wgmma and their exp2 at the same time and the tensor pipe idles during the exp2. Software pipelining inside a
warp group (gluon_row_pass.py: the next tile's wgmma issued before this tile's exp2) did not help (2.41 vs 2.32 ms).

This kernel is FlashAttention-3's layout of the work, without its named-barrier ping-pong:
- a producer partition (1 warp, 24 registers) loads the block's two 64-row halves of Q and then the key tiles into a
  ring of STAGES slots by TMA, each slot with a `ready` mbarrier (the copy's bytes) and an `empty` one (2 arrivals:
  one per consumer);
- two consumer partitions (one warp group each: the default partition and a 4-warp worker), one per 64-row half of
  the 128-row block, each running the fixed-offset arithmetic of the product's row pass on its half (its first key
  tile's max + 8 as the offset, exp2(s·scale − c) summed into a 2-D accumulator), with the next tile's wgmma issued
  before this tile's exp2 as in gluon_row_pass.py.
Nothing makes the two consumers meet: each waits only for its tile's copy, so one can take its exp2 while the other's
wgmma runs (the warp schedulers interleave them), which the CTA barrier of the Triton kernel prevents.

Q and K are read as 2-D matrices (B·Hq·M, D) and (B·Hkv·N, D): a tile's rows past the head's end are the next
head's (or TMA's zeros past the tensor's end); such keys are masked as keys ≥ N, such query rows are never stored.
Scope here: dense contiguous (B, H, M, D) fp16/bf16, causal (bottom-right), D 64 or 128; sm_90 only (Gluon has no
interpreter: the CPU check compiles it for sm_90). Output as row_pass.row_lse2 (log2 units, +inf for a row that
sees no key); NaN rows (the fixed offset overflowed) recomputed on the host with fallback=True.

Since b066c3b the kernel is the product's (kernels/colreduce_ws.py, at n64s3r80; it adds varlen inputs), and this
script times it at other tiles and register budgets (CONFIGS). The twenty-second session's figures
(`gluon_ws_row_pass_visit24.json`) come from this script's own copy of the same kernel (280c0de).

    python benchmarks/gluon_ws_row_pass.py --check   # CPU: compiles for sm_90 at each timed config; GPU: vs float64
    python benchmarks/gluon_ws_row_pass.py --out DIR # GPU: configs at full causal 32/8 16k/8k/4k against row_pass.py's
                                                     # fixed offset (+ TMA), SDPA's forward and the product
"""
from __future__ import annotations

import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gluon_row_pass as grp  # noqa: E402
import row_pass  # noqa: E402

HALF = 64                 # rows per consumer warp group (one wgmma M; colreduce_ws.HALF)
# (BLOCK_N, STAGES, maxnreg, consumer registers): the kernel's register limit and what each consumer warp group gets
# by register reallocation (the producer keeps 24, the default partition what is left). A CTA has 12 warps (the
# producer's warp takes a warp group), so two CTAs per SM need maxnreg ≤ 85: r80 runs two, r168 one.
CONFIGS = {"n64s4r80": (64, 4, 80, 104), "n64s3r80": (64, 3, 80, 104), "n64s4r168": (64, 4, 168, 240),
           "n128s3r168": (128, 3, 168, 240)}


def _kernel():
    """The product's kernel (kernels/colreduce_ws.py), which this experiment's first version (280c0de, the
    twenty-second session's `gluon_ws_row_pass_visit24.json`) became: the same schedule and arithmetic."""
    from colreduce_kvprune.kernels import colreduce_ws
    return colreduce_ws


def row_lse2_ws(q, k, config="n64s4r80", scale=None, out=None, fallback=True):
    """(B, Hq, M) float32 row log-sum-exp in log2 units, causal (bottom-right), as row_pass.row_lse2, from the
    product's kernel at this config's tiles and registers; fallback as in gluon_row_pass.row_lse2_gluon (a host
    sync) instead of the product's REDO launch."""
    ws = _kernel()
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and D in (64, 128), "outside the scope"
    assert q.is_contiguous() and k.is_contiguous() and Hq % Hkv == 0
    block_n, stages, maxnreg, regs = CONFIGS[config]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    assert scale > 0
    out = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device) if out is None else out
    q_desc, k_desc = _descriptors(q, k, block_n)
    ws._ws_row_lse_kernel[(triton.cdiv(M, 2 * HALF), Hq, B)](
        q_desc, k_desc, out, out, out, Hq, M, N, scale * grp.LOG2E, G=Hq // Hkv, D=D, IS_VARLEN=False,
        NSLOT=stages, BLOCK=block_n, REGS=regs, num_warps=4, maxnreg=maxnreg)
    if fallback:
        bad = out.isnan()
        if bad.any():
            out = torch.where(bad, row_pass.row_lse2(q, k, "replica", scale=scale), out)
    return out


def _descriptors(q, k, block_n):
    """Q and K as 2-D row-major matrices, with boxes of HALF query rows and block_n key rows."""
    ws = _kernel()
    D = q.shape[-1]
    return tuple(ws._descriptor(ws._matrix(x, False), rows, D) for x, rows in ((q, HALF), (k, block_n)))


def compile_sm90(config="n64s4r80", dtype="fp16", D=128):
    """The kernel at this config compiled for sm_90 with the installed Triton (no GPU): its descriptors' types from
    CPU tensors."""
    block_n, stages, maxnreg, regs = CONFIGS[config]
    ws = _kernel()
    tdt = dict(fp16=torch.float16, bf16=torch.bfloat16)[dtype]
    x = torch.empty(1024, D, dtype=tdt)
    types = dict(Q_desc=grp.descriptor_type(x, HALF, D), K_desc=grp.descriptor_type(x, block_n, D), Out="*fp32",
                 cu_q="*fp32", cu_k="*fp32")           # dense: the offsets are placeholders (the output)
    return grp.compile_gluon_sm90(ws._ws_row_lse_kernel, dict(G=4, D=D, IS_VARLEN=False, NSLOT=stages, BLOCK=block_n,
                                                             REGS=regs), types, 4, maxnreg)


def check(device="cpu"):
    """CPU: every config compiles for sm_90 (registers and spills from ptxas). GPU: each config against float64 on
    gluon_row_pass.check_cases (with the fallback), the output pre-filled with NaN."""
    if device == "cpu":
        for config in CONFIGS:
            got = grp.sass_overlap(compile_sm90(config))
            print(config, "registers", got["registers"], "wgmma windows", len(got["exp2_per_wgmma_window"]))
        print("the warp-specialised row pass compiles for sm_90 at every config")
        return
    worst = 0.0
    for q, k, _ in grp.check_cases(device):
        ref = row_pass._reference_lse2(q, k, 1 / math.sqrt(q.shape[-1]))
        for config in CONFIGS:
            got = row_lse2_ws(q, k, config, out=torch.full(q.shape[:3], float("nan"), device=device))
            assert not got.isnan().any(), (config, "a row was not written")
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), (config, "rows that see no key")
            fin = torch.isfinite(ref)
            err = ((got.double()[fin] - ref[fin]).abs() / ref[fin].abs().clamp(min=1.0)).max().item()
            worst = max(worst, err)
            assert err < 2e-6, (q.shape, k.shape, q.dtype, config, err)
    print(f"warp-specialised row pass matches float64 at {len(CONFIGS)} configs (largest error {worst:.1e})")


def gpu(out_dir):
    """Full causal 32/8 fp16 D 128 at 16k, 8k and 4k: each config (WS_CONFIGS narrows them) against row_pass.py's
    fixed offset with and without TMA, the product's passes and SDPA's forward, all in one run
    (gluon_ws_row_pass.json in out_dir, rewritten after each row)."""
    configs = os.environ.get("WS_CONFIGS", ",".join(CONFIGS)).split(",")
    extra = (("row_pass.py fixed_offset", lambda q, k: row_pass.row_lse2(q, k, "fixed_offset")),
             ("row_pass.py fixed_offset+tma", lambda q, k: row_pass.row_lse2(q, k, "fixed_offset+tma")))
    for q, k, shape, record in row_pass.full_causal_runs(out_dir, "gluon_ws_row_pass.json", extra):
        ref = row_pass.row_lse2(q, k, "fixed_offset")
        for config in configs:
            record(dict(shape=shape, name="gluon ws", config=config),
                   lambda: row_lse2_ws(q, k, config, fallback=False),
                   lambda got: {"max_abs_diff_vs_fixed_offset": (got - ref).abs().max().item()})


def main(argv=None):
    row_pass._bench_kernels().experiment_main(__doc__, lambda: check("cuda" if torch.cuda.is_available() else "cpu"),
                                              gpu, argv)


if __name__ == "__main__":
    main()
