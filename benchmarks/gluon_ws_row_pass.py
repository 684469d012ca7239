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
Scope: dense contiguous (B, H, M, D) fp16/bf16, causal (bottom-right), one split of the keys, D 64 or 128; sm_90 only
(Gluon has no interpreter: the CPU check compiles it for sm_90). Output as row_pass.row_lse2 (log2 units, +inf for
a row that sees no key); NaN rows (the fixed offset overflowed) recomputed on the host with fallback=True. Not in
the product.

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
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gluon_row_pass as grp  # noqa: E402
import row_pass  # noqa: E402

HALF = gl.constexpr(64)   # rows per consumer warp group (one wgmma M)
# (BLOCK_N, STAGES, maxnreg, consumer registers): the kernel's register limit and what each consumer warp group gets
# by register reallocation (the producer keeps 24, the default partition what is left). A CTA has 12 warps (the
# producer's warp takes a warp group), so two CTAs per SM need maxnreg ≤ 85: r80 runs two, r168 one.
CONFIGS = {"n64s4r80": (64, 4, 80, 104), "n64s3r80": (64, 3, 80, 104), "n64s4r168": (64, 4, 168, 240),
           "n128s3r168": (128, 3, 168, 240)}


@gluon.jit
def _issue(qs, k_smem, ready, j, zero, STAGES: gl.constexpr):
    """Key tile j's wgmma, issued once its copy landed, not waited for."""
    mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
    return warpgroup_mma(qs, k_smem.index(j % STAGES).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _done(token, empty, j, STAGES: gl.constexpr):
    """Tile j's scores; its slot handed back to the producer (this consumer's one arrival)."""
    s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
    mbarrier.arrive(empty.index(j % STAGES), count=1)
    return s


@gluon.jit
def _consume(q_smem, k_smem, q_bar, ready, empty, Out, sob, soh, b, h, r0, M, N, qk_scale, C: gl.constexpr,
             D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Consumer C: rows r0 + C·HALF … of the block, the fixed-offset row sums over their keys."""
    MMA: gl.constexpr = grp.wgmma_layout(4, BLOCK_N)
    shift = N - M
    lo = r0 + C * HALF
    r_last = gl.minimum(lo + HALF, M) - 1
    hi = gl.minimum(N, r_last + shift + 1)
    full_hi = gl.minimum(hi, lo + shift + 1)
    n_tiles = gl.maximum(gl.cdiv(hi, BLOCK_N), 1)
    n_full = gl.maximum(full_hi, 0) // BLOCK_N
    rows = lo + gl.arange(0, HALF, layout=gl.SliceLayout(1, MMA))
    zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=MMA)
    qs = q_smem.index(C)

    mbarrier.wait(q_bar, 0)
    s = _done(_issue(qs, k_smem, ready, 0, zero, STAGES), empty, 0, STAGES)
    if n_tiles > 1:                                      # tile 0's offsets and exp2 while wgmma 1 runs
        token = _issue(qs, k_smem, ready, 1, zero, STAGES)
        acc, c = grp._first_tile(s, rows, shift, N, qk_scale, BLOCK_N, MMA)
        s = _done(token, empty, 1, STAGES)
    else:
        acc, c = grp._first_tile(s, rows, shift, N, qk_scale, BLOCK_N, MMA)
    for j in range(2, gl.minimum(n_full + 1, n_tiles)):          # tile j − 1 seen whole by every row
        token = _issue(qs, k_smem, ready, j, zero, STAGES)
        acc += gl.exp2(s * qk_scale - c[:, None])
        s = _done(token, empty, j, STAGES)
    for j in range(gl.maximum(n_full + 1, 2), n_tiles):          # tile j − 1 on the diagonal or the ragged end
        token = _issue(qs, k_smem, ready, j, zero, STAGES)
        acc += gl.exp2(grp._masked(s, j - 1, rows, shift, N, qk_scale, BLOCK_N, MMA) - c[:, None])
        s = _done(token, empty, j, STAGES)
    if n_tiles > 1:
        acc += gl.exp2(grp._masked(s, n_tiles - 1, rows, shift, N, qk_scale, BLOCK_N, MMA) - c[:, None])

    total = gl.sum(acc, 1)
    lse2 = gl.where(total == 0, float("inf"), c + gl.log2(total))
    lse2 = gl.where(total == float("inf"), float("nan"), lse2)         # overflowed: the caller's fallback
    gl.store(Out + b * sob + h * soh + rows, lse2, mask=rows < M)


@gluon.jit
def _produce(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, q_row, k_row, n_tiles,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The block's two Q halves, then key tiles 0 … n_tiles − 1 into the ring (slot t % STAGES once both consumers
    handed back tile t − STAGES; a fresh mbarrier passes the wait for phase 1, so the first STAGES go at once)."""
    mbarrier.expect(q_bar, 2 * Q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(Q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(Q_desc, [q_row + HALF, 0], q_bar, q_smem.index(1))
    for t in range(n_tiles):
        slot = t % STAGES
        mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), K_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(K_desc, [k_row + t * BLOCK_N, 0], ready.index(slot), k_smem.index(slot))


@gluon.jit
def _consumer0(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out, sob, soh, b, h, r0, M, N, q_row, k_row,
               n_tiles, qk_scale):
    """The partitions take one argument list (Gluon's rule for workers; no constexprs in it: the tiles come from
    the shared-memory ring's shape)."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    _consume(q_smem, k_smem, q_bar, ready, empty, Out, sob, soh, b, h, r0, M, N, qk_scale, 0, k_smem.type.shape[2],
             k_smem.type.shape[1], STAGES)


@gluon.jit
def _consumer1(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out, sob, soh, b, h, r0, M, N, q_row, k_row,
               n_tiles, qk_scale):
    STAGES: gl.constexpr = k_smem.type.shape[0]
    _consume(q_smem, k_smem, q_bar, ready, empty, Out, sob, soh, b, h, r0, M, N, qk_scale, 1, k_smem.type.shape[2],
             k_smem.type.shape[1], STAGES)


@gluon.jit
def _producer(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out, sob, soh, b, h, r0, M, N, q_row, k_row,
              n_tiles, qk_scale):
    _produce(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, q_row, k_row, n_tiles, k_smem.type.shape[1],
             k_smem.type.shape[0])


@gluon.jit
def _ws_row_lse_kernel(Q_desc, K_desc, Out, sob, soh, Hq, M, N, qk_scale, G: gl.constexpr, D: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    rb = gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    r0 = rb * (2 * HALF)
    r_last = gl.minimum(r0 + 2 * HALF, M) - 1
    n_tiles = gl.maximum(gl.cdiv(gl.minimum(N, r_last + N - M + 1), BLOCK_N), 1)    # the block's keys, both halves
    q_row = (b * Hq + h) * M + r0
    k_row = (b * (Hq // G) + h // G) * N

    q_smem = gl.allocate_shared_memory(Q_desc.dtype, [2, HALF, D], Q_desc.layout)
    k_smem = gl.allocate_shared_memory(K_desc.dtype, [STAGES, BLOCK_N, D], K_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    args = (Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out, sob, soh, b, h, r0, M, N, q_row, k_row,
            n_tiles, qk_scale)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_producer, args)], [4, 1], [CONSUMER_REGS, 24])


def _descriptors(q, k, block_n):
    """Q and K as 2-D row-major matrices, with boxes of HALF query rows and block_n key rows."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    B, Hq, M, D = q.shape
    dt = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q2, k2 = q.reshape(-1, D), k.reshape(-1, D)
    return (TensorDescriptor.from_tensor(q2, [HALF.value, D], gl.NVMMASharedLayout.get_default_for([HALF.value, D], dt)),
            TensorDescriptor.from_tensor(k2, [block_n, D], gl.NVMMASharedLayout.get_default_for([block_n, D], dt)))


def row_lse2_ws(q, k, config="n64s4r80", scale=None, out=None, fallback=True):
    """(B, Hq, M) float32 row log-sum-exp in log2 units, causal (bottom-right), as row_pass.row_lse2; fallback as in
    gluon_row_pass.row_lse2_gluon (a host sync)."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and D in (64, 128), "outside the scope"
    assert q.is_contiguous() and k.is_contiguous() and Hq % Hkv == 0
    block_n, stages, maxnreg, regs = CONFIGS[config]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    assert scale > 0
    out = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device) if out is None else out
    q_desc, k_desc = _descriptors(q, k, block_n)
    _ws_row_lse_kernel[(triton.cdiv(M, 2 * HALF), Hq, B)](
        q_desc, k_desc, out, *out.stride()[:2], Hq, M, N, scale * grp.LOG2E, G=Hq // Hkv, D=D, BLOCK_N=block_n,
        STAGES=stages, CONSUMER_REGS=regs, num_warps=4, maxnreg=maxnreg)
    if fallback:
        bad = out.isnan()
        if bad.any():
            out = torch.where(bad, row_pass.row_lse2(q, k, "replica", scale=scale), out)
    return out


def compile_sm90(config="n64s4r80", dtype="fp16", D=128):
    """The kernel compiled for sm_90 with the installed Triton (no GPU): its descriptors' types from CPU tensors."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    block_n, stages, maxnreg, regs = CONFIGS[config]
    tdt = dict(fp16=torch.float16, bf16=torch.bfloat16)[dtype]
    q_desc, k_desc = _descriptors(torch.empty(1, 4, 256, D, dtype=tdt), torch.empty(1, 1, 256, D, dtype=tdt), block_n)
    fn = _ws_row_lse_kernel
    const = dict(G=4, D=D, BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=regs)
    sig = {a: "constexpr" if a in const else dict(Q_desc=mangle_type(q_desc), K_desc=mangle_type(k_desc),
                                                   Out="*fp32", qk_scale="fp32").get(a, "i32")
           for a in fn.arg_names}
    aligned = ["Out", "sob", "soh"]
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                         attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


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
