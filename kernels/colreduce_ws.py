"""The row pass of long causal prompts on Hopper (sm_90), warp-specialised, in Gluon (Triton's lower-level language).

colreduce.py's row pass (Triton) keeps two warp groups per SM that meet at a CTA barrier on every key tile, so both
take their wgmma and then their exp2 at the same time and the tensor pipe idles during the exp2 (Nsight Compute on
the H200: 58% tensor-pipe use at full causal 32/8 16k). Here each CTA (one query head, 128 rows) has
- a producer warp that loads the two 64-row halves of Q, then the key tiles into a ring of STAGES shared-memory
  slots by TMA, each slot with a `ready` mbarrier (the copy's bytes) and an `empty` one (one arrival per consumer);
- two consumer warp groups, one per half, that wait only for their tile's copy (never for each other), so one takes
  its exp2 while the other's wgmma runs; each issues the next tile's wgmma before this tile's exp2.
The arithmetic is colreduce.py's fixed offset (_fixed_offset_row_stats): one offset per row (its first key tile's
max + 8), exp2(s·scale − c) summed into a 2-D accumulator, the row's lse (log2 units; +inf for a row that sees no
key) written as the one-split row pass writes it. A row whose sum overflowed (a score > 135 above its first tile's
max) gets NaN, and colreduce.py recomputes those rows with the running max (_row_stats_kernel's REDO launch).

H200, twenty-second session (benchmarks/gluon_ws_row_pass.py, the same kernel on dense inputs, full causal 32/8
fp16 in one run): 2.02 ms at 16k against 2.27 for benchmarks/row_pass.py's Triton replica of the row pass with TMA
key tiles and 2.39 without; 0.52 vs 0.60 ms at 8k, 0.161 vs 0.190 at 4k. In the product's whole call the gain is
smaller (colreduce.py's K_WS comment: benchmarks/ws_ab.py).

Q and K are read through 2-D descriptors: dense contiguous (B, H, M, D) as (B·H·M, D), a head's rows from
(b·H + h)·M; varlen (total, H, D) with adjacent heads as (total, H·D), a head's rows from its sequence's first token
at column h·D. A tile's rows past a sequence are the next one's (or TMA's zeros past the end): such keys are masked
as keys ≥ N, such query rows are never stored. Gluon has no interpreter: the CPU tests compile this for sm_90
(tests/test_colreduce_compile.py); the GPU tests run it against float64 (tests/test_colreduce_ws.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .launch import compiled_launch

HALF = gl.constexpr(64)       # query rows per consumer warp group (one wgmma M); a CTA takes 2 · HALF
BLOCK_N = 64                  # keys per tile
STAGES = 3                    # ring slots
MAXNREG = 80                  # 12 warps (the producer's warp takes a warp group) · 80 registers: two CTAs per SM
CONSUMER_REGS = 104           # the worker consumer's registers after reallocation (the producer keeps 24, the
                              # default partition gets the rest: 112)


@gluon.constexpr_function
def _mma_layout(n):
    """A wgmma result [HALF, n] of one warp group."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _ring(NSLOT: gl.constexpr, CONSUMERS: gl.constexpr):
    """The mbarriers of a producer's TMA ring, initialised: one for the operands loaded once (one arrival: the
    copies' bytes), and NSLOT `ready` (the slot's copy landed) and `empty` (one arrival per consumer: the slot may
    be refilled) ones."""
    once = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
    mbarrier.init(once, count=1)
    for i in gl.static_range(NSLOT):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)
    return once, ready, empty


@gluon.jit
def _masked(s, t, rows, shift, N, qk_scale, BLOCK: gl.constexpr, MMA: gl.constexpr):
    """s·scale of key tile t, -inf where a row does not see the key (the diagonal, the ragged end, keys ≥ N)."""
    cols = t * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, MMA))
    visible = (cols[None, :] < N) & (cols[None, :] <= rows[:, None] + shift)
    return gl.where(visible, s * qk_scale, float("-inf"))


@gluon.jit
def _issue(qs, k_smem, ready, j, zero, NSLOT: gl.constexpr):
    """Key tile j's wgmma, issued once its copy landed, not waited for."""
    mbarrier.wait(ready.index(j % NSLOT), (j // NSLOT) & 1)
    return warpgroup_mma(qs, k_smem.index(j % NSLOT).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _done(token, empty, j, NSLOT: gl.constexpr):
    """Tile j's scores; its slot handed back to the producer (this consumer's one arrival)."""
    s = warpgroup_mma_wait(num_outstanding=0, deps=(token, ))
    mbarrier.arrive(empty.index(j % NSLOT), count=1)
    return s


@gluon.jit
def _consume(q_smem, k_smem, q_bar, ready, empty, Out, r0, Mb, Nb, qk_scale, C: gl.constexpr):
    """Consumer C: rows r0 + C·HALF … of the block; their lse2 (NaN where the fixed offset overflowed)."""
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    BLOCK: gl.constexpr = k_smem.type.shape[1]
    MMA: gl.constexpr = _mma_layout(BLOCK)
    shift = Nb - Mb                                      # query m sees key j iff j <= m + shift
    lo = r0 + C * HALF
    hi = gl.minimum(Nb, gl.minimum(lo + HALF, Mb) - 1 + shift + 1)
    full_hi = gl.minimum(hi, lo + shift + 1)             # keys every row of the half sees
    n_tiles = gl.maximum(gl.cdiv(hi, BLOCK), 1)          # at least one (masked) tile: rows that see no key get +inf
    n_full = gl.maximum(full_hi, 0) // BLOCK
    rows = lo + gl.arange(0, HALF, layout=gl.SliceLayout(1, MMA))
    zero = gl.zeros([HALF, BLOCK], gl.float32, layout=MMA)
    qs = q_smem.index(C)

    mbarrier.wait(q_bar, 0)
    s = _done(_issue(qs, k_smem, ready, 0, zero, NSLOT), empty, 0, NSLOT)
    x = _masked(s, 0, rows, shift, Nb, qk_scale, BLOCK, MMA)          # tile 0: the offsets
    first = gl.max(x, 1)
    c = gl.where(first == float("-inf"), 0.0, first) + 8.0
    if n_tiles > 1:                                      # tile 0's exp2 while wgmma 1 runs
        token = _issue(qs, k_smem, ready, 1, zero, NSLOT)
        acc = gl.exp2(x - c[:, None])
        s = _done(token, empty, 1, NSLOT)
    else:
        acc = gl.exp2(x - c[:, None])
    # No runtime branch between a wgmma's issue and its wait (ptxas would wait early): a loop for whole tiles and
    # one for the diagonal and the ragged end.
    for j in range(2, gl.minimum(n_full + 1, n_tiles)):          # tile j − 1 seen whole by every row
        token = _issue(qs, k_smem, ready, j, zero, NSLOT)
        acc += gl.exp2(s * qk_scale - c[:, None])
        s = _done(token, empty, j, NSLOT)
    for j in range(gl.maximum(n_full + 1, 2), n_tiles):          # tile j − 1 on the diagonal or the ragged end
        token = _issue(qs, k_smem, ready, j, zero, NSLOT)
        acc += gl.exp2(_masked(s, j - 1, rows, shift, Nb, qk_scale, BLOCK, MMA) - c[:, None])
        s = _done(token, empty, j, NSLOT)
    if n_tiles > 1:
        acc += gl.exp2(_masked(s, n_tiles - 1, rows, shift, Nb, qk_scale, BLOCK, MMA) - c[:, None])

    total = gl.sum(acc, 1)
    lse2 = gl.where(total == 0, float("inf"), c + gl.log2(total))
    lse2 = gl.where(total == float("inf"), float("nan"), lse2)         # overflowed: colreduce.py's REDO launch
    gl.store(Out + rows, lse2, mask=rows < Mb)


@gluon.jit
def _consumer0(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out, r0, Mb, Nb, q_row, q_col, k_row, k_col,
               n_tiles, qk_scale):
    """Every partition takes this argument list (Gluon's rule for workers; no constexprs: the tiles come from the
    shared-memory ring's shape)."""
    _consume(q_smem, k_smem, q_bar, ready, empty, Out, r0, Mb, Nb, qk_scale, 0)


@gluon.jit
def _consumer1(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out, r0, Mb, Nb, q_row, q_col, k_row, k_col,
               n_tiles, qk_scale):
    _consume(q_smem, k_smem, q_bar, ready, empty, Out, r0, Mb, Nb, qk_scale, 1)


@gluon.jit
def _producer(Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out, r0, Mb, Nb, q_row, q_col, k_row, k_col,
              n_tiles, qk_scale):
    """The block's two Q halves, then key tiles 0 … n_tiles − 1 into the ring: slot t % NSLOT once both consumers
    handed back tile t − NSLOT (a fresh mbarrier passes the wait for phase 1, so the first NSLOT go at once).
    Consumer 0 takes at most one tile fewer than consumer 1 (its rows end 64 earlier), and never one the producer
    waits for: the tiles it skips are the last ones."""
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    BLOCK: gl.constexpr = k_smem.type.shape[1]
    mbarrier.expect(q_bar, 2 * Q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(Q_desc, [q_row + r0, q_col], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(Q_desc, [q_row + r0 + HALF, q_col], q_bar, q_smem.index(1))
    for t in range(n_tiles):
        slot = t % NSLOT
        mbarrier.wait(empty.index(slot), ((t // NSLOT) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), K_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(K_desc, [k_row + t * BLOCK, k_col], ready.index(slot), k_smem.index(slot))


@gluon.jit(do_not_specialize=["Hq", "max_m", "max_n"])    # one compile per dtype, D, G and layout, any length
def _ws_row_lse_kernel(Q_desc, K_desc, Out, cu_q, cu_k, Hq, max_m, max_n, qk_scale, G: gl.constexpr,
                       D: gl.constexpr, IS_VARLEN: gl.constexpr, NSLOT: gl.constexpr, BLOCK: gl.constexpr,
                       REGS: gl.constexpr):
    """Grid (row blocks of 2·HALF, Hq, B). Out: (B, Hq, max_m) float32, the row lse in log2 units."""
    rb = gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    if IS_VARLEN:
        q0 = gl.load(cu_q + b).to(gl.int32)              # int32 or int64 offsets; TMA takes int32 coordinates
        Mb = gl.load(cu_q + b + 1).to(gl.int32) - q0
        k0 = gl.load(cu_k + b).to(gl.int32)
        Nb = gl.load(cu_k + b + 1).to(gl.int32) - k0
        q_row, q_col, k_row, k_col = q0, h * D, k0, (h // G) * D
    else:
        Mb, Nb = max_m, max_n
        q_row, q_col, k_row, k_col = (b * Hq + h) * max_m, 0, (b * (Hq // G) + h // G) * max_n, 0
    r0 = rb * (2 * HALF)
    if r0 < Mb:
        n_tiles = gl.maximum(gl.cdiv(gl.minimum(Nb, gl.minimum(r0 + 2 * HALF, Mb) + Nb - Mb), BLOCK), 1)
        q_smem = gl.allocate_shared_memory(Q_desc.dtype, [2, HALF, D], Q_desc.layout)
        k_smem = gl.allocate_shared_memory(K_desc.dtype, [NSLOT, BLOCK, D], K_desc.layout)
        q_bar, ready, empty = _ring(NSLOT, 2)
        args = (Q_desc, K_desc, q_smem, k_smem, q_bar, ready, empty, Out + (b * Hq + h) * max_m, r0, Mb, Nb, q_row,
                q_col, k_row, k_col, n_tiles, qk_scale)
        gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_producer, args)], [4, 1], [REGS, 24])


def _matrix(x: torch.Tensor, varlen: bool):
    """x as the 2-D matrix the descriptor reads, or None where its layout does not allow it: dense contiguous
    (B, H, L, D) → (B·H·L, D); varlen (total, H, D) with adjacent heads → (total, H·D)."""
    es = x.element_size()
    if x.data_ptr() % 16 or x.stride(-1) != 1:
        return None
    if varlen:
        total, H, D = x.shape
        if x.stride(1) != D or (x.stride(0) * es) % 16 or (total > 1 and x.stride(0) < H * D):
            return None
        return x.as_strided((total, H * D), (x.stride(0), 1))
    if not x.is_contiguous():
        return None
    return x.view(-1, x.shape[-1])


def _descriptor(x2: torch.Tensor, rows: int, D: int):
    """The host-side descriptor of a _matrix view with a box of rows × D, in the shared layout the wgmma reads."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    dt = gl.float16 if x2.dtype == torch.float16 else gl.bfloat16
    return TensorDescriptor.from_tensor(x2, [rows, D], gl.NVMMASharedLayout.get_default_for([rows, D], dt))


class _Desc(NamedTuple):
    """What the compiled launcher reads of a host-side tensor descriptor (Triton's make_tensordesc_arg: base,
    shape, strides, padding, and since Triton 3.7 round_f32_to_tf32), without the checks of building one: the first
    launch of each signature built and checked a TensorDescriptor of the same block shape, layout and dtype. base:
    any tensor with the matrix's data pointer (q or k itself: _matrix's views start where they do)."""
    base: torch.Tensor
    shape: tuple
    strides: tuple
    padding: str = "zero"
    round_f32_to_tf32: bool = False


_direct: dict = {}    # launch signature -> its launch (launch.compiled_launch), or None: stays on the JIT


def _signature(q, out, cu_q, cu_k, varlen: bool) -> tuple:
    """What the compiled kernel is specialised on besides its constexprs: dtypes and 16-byte alignment of the
    pointers (the descriptors' block shapes and layouts follow from dtype and D)."""
    ptrs = (out, cu_q, cu_k) if varlen else (out, )
    return (q.device.index, q.dtype, q.shape[-1], varlen) + tuple((t.dtype, t.data_ptr() % 16 == 0) for t in ptrs)


def launch(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, cu_q, cu_k, max_m: int, max_n: int, B: int,
           qk_scale: float, varlen: bool) -> bool:
    """The row lse2 of every (sequence, query head, row) into out ((B, Hq, max_m) float32, contiguous), NaN where
    the fixed offset overflowed. False (nothing launched) where q or k's layout has no descriptor (_matrix).
    The first launch of a signature goes through Gluon's JIT dispatch; later ones call its compiled launcher
    directly (as colreduce.py's _build_direct), which saves the dispatch's argument binding and the descriptors'
    construction checks on the host."""
    q2, k2 = _matrix(q, varlen), _matrix(k, varlen)
    if q2 is None or k2 is None:
        return False
    D = q.shape[-1]
    Hq, Hkv = q.shape[1], k.shape[1]
    if not varlen:
        cu_q = cu_k = out                               # unused placeholders (IS_VARLEN is False)
    grid = (-(-max_m // (2 * HALF.value)), Hq, B)
    const = (Hq // Hkv, D, varlen, STAGES, BLOCK_N, CONSUMER_REGS)
    sig = _signature(q, out, cu_q, cu_k, varlen) + const
    fast = _direct.get(sig)
    if fast:
        fast(*grid, torch._C._cuda_getCurrentRawStream(q.device.index), _Desc(q, tuple(q2.shape), q2.stride()),
             _Desc(k, tuple(k2.shape), k2.stride()), out, cu_q, cu_k, Hq, max_m, max_n, qk_scale, *const)
        return True
    compiled = _ws_row_lse_kernel[grid](
        _descriptor(q2, HALF.value, D), _descriptor(k2, BLOCK_N, D), out, cu_q, cu_k, Hq, max_m, max_n, qk_scale,
        G=Hq // Hkv, D=D, IS_VARLEN=varlen, NSLOT=STAGES, BLOCK=BLOCK_N, REGS=CONSUMER_REGS, num_warps=4,
        maxnreg=MAXNREG)
    if sig not in _direct:
        _direct[sig] = compiled_launch(compiled)
    return True


def direct_launcher(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, cu_q, cu_k, varlen: bool):
    """For colreduce.py's direct path, right after launch() took this call: go(q, k, out_ptr, cu_q, cu_k, max_m,
    max_n, B, qk_scale, stream) -> bool, which launches the compiled kernel of this call's signature for a later
    call whose strides, dtypes and alignment colreduce.py's call signature found equal (out as a pointer, 16-byte
    aligned). It builds no views and checks one thing only: a varlen q or k whose rows overlap (stride(0) < H·D,
    which _matrix lets through for a single token) now has several tokens: then False, nothing launched. None where
    this signature has no compiled launcher (launch() stays on the JIT dispatch)."""
    D, Hq, Hkv = q.shape[-1], q.shape[1], k.shape[1]
    const = (Hq // Hkv, D, varlen, STAGES, BLOCK_N, CONSUMER_REGS)
    fast = _direct.get(_signature(q, out, cu_q if varlen else out, cu_k if varlen else out, varlen) + const)
    if not fast:
        return None
    rows = 2 * HALF.value
    if varlen:
        qs0, ks0 = q.stride(0), k.stride(0)
        q_overlap, k_overlap = qs0 < Hq * D, ks0 < Hkv * D

        def go(q, k, out_ptr, cu_q, cu_k, max_m, max_n, B, qk_scale, stream):
            tq, tk = q.shape[0], k.shape[0]
            if (q_overlap and tq > 1) or (k_overlap and tk > 1):
                return False
            fast(-(-max_m // rows), Hq, B, stream, _Desc(q, (tq, Hq * D), (qs0, 1)), _Desc(k, (tk, Hkv * D), (ks0, 1)),
                 out_ptr, cu_q.data_ptr(), cu_k.data_ptr(), Hq, max_m, max_n, qk_scale,
                 *const)                             # addresses: as colreduce.py's direct path
            return True
        return go
    q_shape, k_shape, strides = (q.numel() // D, D), (k.numel() // D, D), (D, 1)

    def go(q, k, out_ptr, cu_q, cu_k, max_m, max_n, B, qk_scale, stream):     # dense: shapes fixed by the signature
        fast(-(-max_m // rows), Hq, B, stream, _Desc(q, q_shape, strides), _Desc(k, k_shape, strides), out_ptr, out_ptr,
             out_ptr, Hq, max_m, max_n, qk_scale, *const)
        return True
    return go


