"""Experiment (issue 19, item 2: full causal 16k ≤ 1.0× SDPA): the fixed-offset row pass written in Gluon, so that
the next key tile's q·kᵀ (an asynchronous wgmma) runs while this tile's exp2 does.

benchmarks/ptx_overlap.py shows why the Triton row pass cannot do that: Triton waits for every dot's result with
`wgmma.wait_group 0` before its first use, so each pass costs its MMA time plus its exp2 time (~1.1 + ~1.1 ms per
pass at full causal 32/8 16k on the H200; each pass must reach ≤ 2.0 ms for the goal). Gluon (Triton's
lower-level language: explicit layouts, shared memory, async copies and wgmma) states the schedule by hand:

    prologue: q → shared memory; K tiles 0 … STAGES−3 by cp.async into a ring of STAGES slots
    tile 0:   wait for its copy, barrier; copy tile STAGES−2; wgmma(q, k0ᵀ) issued, not waited for
    tile j≥1: wait for tile j's copy, fence + barrier; copy tile j+STAGES−2 into tile j−2's slot (free: every warp
              group waited for wgmma j−2 before the barrier); issue wgmma(q, kjᵀ); wgmma_wait(1) → tile j−1's
              scores, whose exp2 now runs while wgmma j is in flight
    after:    wgmma_wait(0) → the last tile's scores

The arithmetic is row_pass.py's FIXED variant (the product's row pass since 598c792): one offset per row, its first
key tile's max + 8, exp2(s·scale − c) summed into a 2-D accumulator. A row whose sum overflowed (a key > 135 log2
units above the first tile's max) gets NaN from the kernel; `row_lse2_gluon` recomputes those rows with row_pass.py's
running max when `fallback=True` (a host sync: the timed runs call it with fallback=False, check() with True).

Scope: dense (B, H, M, D) fp16/bf16, causal (bottom-right), one split of the keys, D 64 or 128, M ≥ 1; sm_90 only
(Gluon has no interpreter: the CPU check compiles for sm_90 and reads the SASS). Not in the product.

    python benchmarks/gluon_row_pass.py --check     # CPU: compiled for sm_90, exp2 inside the wgmma windows of the
                                                    # SASS; GPU: against float64
    python benchmarks/gluon_row_pass.py --out DIR   # GPU: timed against row_pass.py's fixed offset, SDPA, the product
"""
from __future__ import annotations

import math
import os
import re
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from colreduce_kvprune.kernels.colreduce_ws import _masked  # s·scale of a key tile, -inf where a row does not see it

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import row_pass  # noqa: E402

LOG2E = 1.4426950408889634
# The CTA barrier is gl.barrier in Triton 3.7 (vLLM 0.32's pin) and gl.thread_barrier in 3.6 (the GPU image's).
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier


@gluon.constexpr_function
def wgmma_layout(num_warps, n):
    """The register layout of a wgmma result [M, n]: the warps along M (4 per 64 rows), one n-wide instruction."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def load_layout(num_warps):
    """Global loads of [rows, D] fp16/bf16 tiles: 16 bytes per thread (cp.async's widest), 64 columns per warp row."""
    return gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])


@gluon.jit
def _copy_k_tile(k_smem, K_head, t, hi, skn, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                 LOAD: gl.constexpr):
    """cp.async of key tile t (rows t·BLOCK_N …) into ring slot t % STAGES, keys ≥ hi (seen by no row of the block)
    zero-filled; one commit group per call, empty past the end, so that the group counts stay fixed."""
    n = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    cp.async_copy_global_to_shared(k_smem.index(t % STAGES), K_head + n[:, None] * skn + d[None, :],
                                   mask=(n < hi)[:, None])
    cp.commit_group()


@gluon.jit
def _first_tile(s, rows, shift, N, qk_scale, BLOCK_N: gl.constexpr, MMA: gl.constexpr):
    """Key tile 0: the rows' offsets c (its max + 8; 8 for a row that sees none of it) and its exp2 terms."""
    x = _masked(s, 0, rows, shift, N, qk_scale, BLOCK_N, MMA)
    first = gl.max(x, 1)
    c = gl.where(first == float("-inf"), 0.0, first) + 8.0
    return gl.exp2(x - c[:, None]), c


@gluon.jit
def _issue(q_smem, k_smem, K_head, j, hi, skn, zero, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
           LOAD: gl.constexpr):
    """Key tile j's wgmma, issued and not waited for, after its copy landed; the copy of tile j + STAGES − 2 goes
    into tile j − 2's slot (free: every warp group waited for wgmma j − 1, hence j − 2, before this barrier)."""
    cp.wait_group(STAGES - 3)
    fence_async_shared()
    _cta_barrier()
    _copy_k_tile(k_smem, K_head, j + STAGES - 2, hi, skn, STAGES, BLOCK_N, D, LOAD)
    return warpgroup_mma(q_smem, k_smem.index(j % STAGES).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _gluon_row_lse_kernel(Q, K, Out, sqb, sqh, sqm, skb, skh, skn, sob, soh, M, N, qk_scale,
                          G: gl.constexpr, D: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    gl.static_assert(STAGES >= 3, "the ring needs a slot for the tile in flight, its successor and one free")
    dtype: gl.constexpr = Q.dtype.element_ty
    MMA: gl.constexpr = wgmma_layout(NUM_WARPS, BLOCK_N)
    LOAD: gl.constexpr = load_layout(NUM_WARPS)
    Q_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_R, D], dtype)
    K_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)

    rb = gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    r0 = rb * BLOCK_R
    shift = N - M                                        # query m sees key j iff j <= m + shift
    r_last = gl.minimum(r0 + BLOCK_R, M) - 1
    hi = gl.minimum(N, r_last + shift + 1)               # the block's keys: [0, hi)
    full_hi = gl.minimum(hi, r0 + shift + 1)             # keys every row of the block sees
    n_tiles = gl.maximum(gl.cdiv(hi, BLOCK_N), 1)        # at least one (masked) tile: rows that see no key get +inf
    K_head = K + b * skb + (h // G) * skh

    q_rows = r0 + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, LOAD))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    q = gl.load(Q + b * sqb + h * sqh + q_rows[:, None] * sqm + d[None, :], mask=(q_rows < M)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_R, D], Q_SHARED, q)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], K_SHARED)

    rows = r0 + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, MMA))
    zero = gl.zeros([BLOCK_R, BLOCK_N], gl.float32, layout=MMA)
    n_full = gl.maximum(full_hi, 0) // BLOCK_N          # tiles every row of the block sees whole

    for t in gl.static_range(STAGES - 2):
        _copy_k_tile(k_smem, K_head, t, hi, skn, STAGES, BLOCK_N, D, LOAD)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_issue(q_smem, k_smem, K_head, 0, hi, skn, zero, STAGES, BLOCK_N,
                                                           D, LOAD), ))
    if n_tiles > 1:                                      # tile 0's offsets and exp2 while wgmma 1 runs
        token = _issue(q_smem, k_smem, K_head, 1, hi, skn, zero, STAGES, BLOCK_N, D, LOAD)
        acc, c = _first_tile(s, rows, shift, N, qk_scale, BLOCK_N, MMA)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
    else:
        acc, c = _first_tile(s, rows, shift, N, qk_scale, BLOCK_N, MMA)
    # From here each step issues wgmma j and, while it runs, takes the exp2 of tile j − 1. No branch between the
    # issue and the wait (ptxas waits early across one), so the unmasked and the masked tiles have loops of their own.
    for j in range(2, gl.minimum(n_full + 1, n_tiles)):          # tile j − 1 seen whole by every row
        token = _issue(q_smem, k_smem, K_head, j, hi, skn, zero, STAGES, BLOCK_N, D, LOAD)
        acc += gl.exp2(s * qk_scale - c[:, None])
        s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
    for j in range(gl.maximum(n_full + 1, 2), n_tiles):          # tile j − 1 on the diagonal or the ragged end
        token = _issue(q_smem, k_smem, K_head, j, hi, skn, zero, STAGES, BLOCK_N, D, LOAD)
        acc += gl.exp2(_masked(s, j - 1, rows, shift, N, qk_scale, BLOCK_N, MMA) - c[:, None])
        s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
    if n_tiles > 1:                                      # the last tile (tile 0 was taken above)
        acc += gl.exp2(_masked(s, n_tiles - 1, rows, shift, N, qk_scale, BLOCK_N, MMA) - c[:, None])
    cp.wait_group(0)

    total = gl.sum(acc, 1)
    lse2 = gl.where(total == 0, float("inf"), c + gl.log2(total))
    lse2 = gl.where(total == float("inf"), float("nan"), lse2)         # overflowed: the caller's fallback
    gl.store(Out + b * sob + h * soh + rows, lse2, mask=rows < M)


def row_lse2_gluon(q, k, block_r=128, block_n=64, stages=4, warps=8, scale=None, out=None, fallback=True):
    """(B, Hq, M) float32 row log-sum-exp in log2 units, causal (bottom-right), +inf for a row that sees no key; as
    row_pass.row_lse2. fallback: rows whose fixed-offset sum overflowed (NaN from the kernel) recomputed with the
    running max (reads the output on the host: a sync)."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and D in (64, 128), "outside the scope"
    assert q.stride(3) == 1 and k.stride(3) == 1 and Hq % Hkv == 0
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    assert scale > 0
    out = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device) if out is None else out
    _gluon_row_lse_kernel[(triton.cdiv(M, block_r), Hq, B)](
        q, k, out, *q.stride()[:3], *k.stride()[:3], *out.stride()[:2], M, N, scale * LOG2E,
        G=Hq // Hkv, D=D, BLOCK_R=block_r, BLOCK_N=block_n, STAGES=stages, NUM_WARPS=warps, num_warps=warps)
    if fallback:
        bad = out.isnan()
        if bad.any():
            out = torch.where(bad, row_pass.row_lse2(q, k, "replica", scale=scale), out)
    return out


def compile_gluon_sm90(fn, const: dict, pointers: dict, warps: int, maxnreg: int | None = None):
    """A Gluon kernel compiled for sm_90 with the installed Triton (no GPU needed): pointers (name → "*fp16", …,
    or a descriptor's type: descriptor_type) and the strides (integer arguments named s…) 16-divisible, as the JIT
    specializes them for real tensors; qk_scale float32, other arguments int32. maxnreg: the register limit."""
    from triton.experimental.gluon._runtime import GluonASTSource

    return compile_for_sm90(GluonASTSource, fn, const, pointers,
                            dict(num_warps=warps, **({} if maxnreg is None else dict(maxnreg=maxnreg))))


def compile_for_sm90(source, fn, const: dict, pointers: dict, options: dict):
    """fn compiled for sm_90 from its AST source class (Gluon's for Gluon kernels, triton.compiler.ASTSource for
    @triton.jit ones) with the signature compile_gluon_sm90 describes and these compile options."""
    from triton.backends.compiler import GPUTarget

    sig = {a: "constexpr" if a in const else pointers.get(a, "fp32" if a == "qk_scale" else "i32")
           for a in fn.arg_names}
    aligned = [a for a in fn.arg_names if sig[a].startswith("*") or (a.startswith("s") and sig[a] == "i32")]
    src = source(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                 attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def descriptor_type(x2: torch.Tensor, rows: int, D: int) -> str:
    """The JIT's type of kernels/colreduce_ws.py's descriptor of a 2-D (CPU) tensor with a box of rows × D."""
    from triton.runtime.jit import mangle_type

    from colreduce_kvprune.kernels.colreduce_ws import _descriptor
    return mangle_type(_descriptor(x2, rows, D))


def compile_sm90(block_r=128, block_n=64, stages=4, warps=8, dtype="fp16", D=128):
    """This experiment's kernel compiled for sm_90 at the given tiles."""
    return compile_gluon_sm90(_gluon_row_lse_kernel, dict(G=4, D=D, BLOCK_R=block_r, BLOCK_N=block_n, STAGES=stages,
                                                          NUM_WARPS=warps),
                              dict(Q="*" + dtype, K="*" + dtype, Out="*fp32"), warps)


def sass_overlap(compiled) -> dict:
    """What ptxas made of the schedule, from Triton's bundled ptxas and nvdisasm: its register count and spilled
    bytes, whether it serialized wgmma (its C7514/C7517 notes), and per wgmma window (WARPGROUP.ARRIVE …
    WARPGROUP.DEPBAR) how many MUFU.EX2 it holds, and how many of them come after the window's last HGMMA (all of a
    tile's where its k-steps are issued together, as gluon_ws_causal_column.py's fenced configs keep them). The
    loops' windows hold a tile's exp2: the overlap this experiment is for."""
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    bin_dir = os.path.join(os.path.dirname(nv.__file__), "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    windows, after_ksteps, inside, after = [], [], None, 0
    for line in sass.splitlines():
        if "WARPGROUP.ARRIVE" in line:
            inside = 0 if inside is None else inside     # (a fold's extra k-step re-arrives inside a window)
            after = 0
        elif "WARPGROUP.DEPBAR" in line and inside is not None:
            windows.append(inside)
            after_ksteps.append(after)
            inside = None
        elif "HGMMA" in line:
            after = 0
        elif "MUFU.EX2" in line and inside is not None:
            inside += 1
            after += 1
    regs = re.search(r"Used (\d+) registers", log)
    return dict(registers=int(regs.group(1)) if regs else None, serialized="C7514" in log or "C7517" in log,
                spill_bytes=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log)),
                exp2_per_wgmma_window=windows, exp2_after_ksteps=after_ksteps, loop_instructions=sass_loops(sass))


def sass_loops(sass: str) -> list[int]:
    """The instruction count of each loop in nvdisasm's listing, in order: from a label to a later branch back to
    it (a loop's body, as issued once per iteration)."""
    labels, count, loops = {}, 0, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
        elif re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", line):
            count += 1
            back = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", line)
            if back and back.group(1) in labels:
                loops.append(count - labels[back.group(1)])
    return loops


def check_sass(compile_fn, name):
    """The CPU half of a Gluon experiment's check: at two tile configs, ptxas keeps at least half a tile's exp2
    (a score's MUFU.EX2 per thread) inside a wgmma window, without serializing (ptxas hoists the rest above the
    wgmma's issue: 20 of 32 in the row pass's first window, 22 of 32 in the column pass's, Triton 3.7.1)."""
    for tiles in ((128, 64, 4, 8), (128, 128, 3, 8)):
        got = sass_overlap(compile_fn(*tiles))
        assert not got["serialized"], (tiles, "ptxas serialized the wgmma", got)
        assert max(got["exp2_per_wgmma_window"]) >= tiles[0] * tiles[1] // (64 * tiles[3]), (tiles, got)
        print("tiles", tiles, got)
    print(f"the Gluon {name} pass compiles for sm_90 with half a tile's exp2 or more inside a wgmma window")


def check_cases(device):
    """(q, k, tiles) of the GPU checks: full tiles before the diagonal, ragged ends, more queries than keys (rows
    that see no key), GQA, bf16, D 64, and a key ~460 log2 units above its rows' first tile (60·60/√128·log2 e: the
    row pass's fixed offset overflows there and those rows take its fallback)."""
    torch.manual_seed(0)
    for B, Hq, Hkv, M, N, D, dtype, tiles in [(1, 4, 2, 300, 300, 128, torch.float16, (128, 64, 4, 8)),
                                              (2, 2, 1, 200, 520, 64, torch.bfloat16, (128, 64, 3, 4)),
                                              (1, 2, 2, 260, 100, 128, torch.float16, (128, 128, 3, 8)),
                                              (1, 4, 1, 130, 700, 128, torch.float16, (128, 64, 5, 8))]:
        q = torch.randn(B, Hq, M, D, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)
        if N == 700:
            q[..., 0] += 60.0
            k[:, :, N - 80, 0] = 60.0
        yield q, k, tiles


def check(device="cpu"):
    """CPU: check_sass. GPU: against float64 on check_cases (with the fallback), the output pre-filled with NaN."""
    if device == "cpu":
        check_sass(compile_sm90, "row")
        return
    worst = 0.0
    for q, k, tiles in check_cases(device):
        ref = row_pass._reference_lse2(q, k, 1 / math.sqrt(q.shape[-1]))
        got = row_lse2_gluon(q, k, *tiles, out=torch.full(q.shape[:3], float("nan"), device=device))
        assert not got.isnan().any(), "a row was not written"
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), "rows that see no key"
        fin = torch.isfinite(ref)
        err = ((got.double()[fin] - ref[fin]).abs() / ref[fin].abs().clamp(min=1.0)).max().item()
        worst = max(worst, err)
        assert err < 2e-6, (q.shape, k.shape, q.dtype, tiles, err)
    print(f"Gluon row pass matches float64 (largest error of the log2 lse, relative to max(1, |lse|): {worst:.1e})")


def gpu(out_dir):
    """Full causal 32/8 fp16 D 128 at 16k, 8k and 4k: the Gluon row pass at several tiles against row_pass.py's
    fixed offset (Triton, the product's arithmetic at its tiles), the product's two passes, its column pass with the
    lse given, and SDPA's forward, all timed in one run (gluon_row_pass.json in out_dir, rewritten after each row)."""
    tiles_list = [tuple(int(x) for x in t.split("x")) for t in
                  os.environ.get("GLUON_TILES", "128x64x4x8,128x128x3x8,128x64x4x4,128x64x3x8").split(",")]
    fixed = ("row_pass.py fixed_offset 128x64x4w", lambda q, k: row_pass.row_lse2(q, k, "fixed_offset"))
    for q, k, shape, record in row_pass.full_causal_runs(out_dir, "gluon_row_pass.json", (fixed, )):
        ref = row_pass.row_lse2(q, k, "fixed_offset")
        for tiles in tiles_list:
            record(dict(shape=shape, name="gluon", tiles=tiles),
                   lambda: row_lse2_gluon(q, k, *tiles, fallback=False),
                   lambda got: {"max_abs_diff_vs_fixed_offset": (got - ref).abs().max().item()})


def main(argv=None):
    row_pass._bench_kernels().experiment_main(__doc__, check, gpu, argv)


if __name__ == "__main__":
    main()
