"""The one-launch window kernel (kernels/colreduce.py _fused_window_kernel, a config's FUSED) against float64:
dense, packed varlen and paged inputs, every reduction and group combine, outputs and scratch pre-filled with NaN.
On the CPU the interpreter runs its two phases as two launches (it runs programs one after another, so a program
cannot wait for another); on a GPU it is one cooperative launch whose programs wait for each other, and the GPU
tests below also check that repeated calls give the same bits and leave the wait's counters at zero."""
import math
import warnings

import pytest
import torch

from colreduce_kvprune.kernels import colreduce as kmod
from test_colreduce import (DEVICE, GROUP, REDUCTIONS, TOL, _poison_empty, fused_windows,  # noqa: F401 (a fixture)
                             rand_qk, reference, rel_err)
from test_colreduce_kernels import SHAPES
from test_colreduce_paged import paged_case, unpack
from test_colreduce_varlen import per_sequence_reference

CUDA = DEVICE == "cuda"


def fused(m: int, d: int, g: int, **extra) -> dict:
    return dict(kmod._pick_config(m, d, g, True), FUSED=True, **extra)


def _launches(monkeypatch, what=lambda fn, grid, kw: (fn.__name__, kw.get("PHASE")), jit_only=False) -> list:
    """what(kernel, grid, keywords) of every launch from now on — (kernel name, PHASE) unless asked otherwise; a
    launch left out where it is None — recorded as they go through Triton's dispatch. jit_only: the direct
    launchers forgotten first, so that every call goes through the dispatch (on a GPU a signature's later calls
    launch its compiled kernels directly)."""
    seen = []
    real = kmod._launch

    def launch(fn, grid, args, kw):
        got = what(fn, grid, kw)
        if got is not None:
            seen.append(got)
        return real(fn, grid, args, kw)
    monkeypatch.setattr(kmod, "_launch", launch)
    if jit_only:
        monkeypatch.setattr(kmod, "_direct_launchers", {})
    return seen


ONE_LAUNCH = [("_fused_window_kernel", 0)] if CUDA else [("_fused_window_kernel", 1), ("_fused_window_kernel", 2)]
# the inputs of the float64 comparisons: on a GPU _fused_tiles admits 16-bit inputs only (float32 tiles this size
# spill), and float32 would silently take the two passes there; the interpreter takes any dtype
DTYPE = torch.float16 if CUDA else torch.float32


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_fused_dense_matches_float64(shape, is_causal, monkeypatch):
    """A window shorter than its keys, M = N ragged, M > N (rows that see no key), a group of 3; B = 2."""
    _poison_empty(monkeypatch)
    launched = _launches(monkeypatch)
    q, k = rand_qk(shape, DTYPE, seed=11)
    B, Hq, Hkv, M, N, D = shape
    for reduction in REDUCTIONS:
        for group in GROUP if is_causal else (None, "mean"):
            out = kmod.colreduce_triton(q, k, reduction, is_causal=is_causal, scale=1 / math.sqrt(D),
                                        group_reduce=group, config=fused(M, D, Hq // Hkv))
            assert launched == ONE_LAUNCH, launched
            launched.clear()
            ref = reference(q, k, reduction, is_causal, group)
            assert out.shape == ref.shape
            assert rel_err(out, ref) < TOL[DTYPE], (reduction, group)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_half_precision(dtype, monkeypatch):
    """16-bit inputs (the only ones _fused_tiles admits on a GPU; the interpreter upcasts bf16): against float64
    within the 16-bit tolerance."""
    _poison_empty(monkeypatch)
    launched = _launches(monkeypatch)
    q, k = rand_qk((1, 8, 2, 16, 150, 64), dtype, seed=16)
    out = kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=0.125, group_reduce="mean",
                                config=fused(16, 64, 4))
    assert launched == ONE_LAUNCH, launched
    assert rel_err(out, reference(q, k, "sum", True, "mean", scale=0.125)) < TOL[dtype]


@pytest.mark.parametrize("paged", [False, True], ids=["varlen", "paged"])
def test_fused_varlen_and_paged(paged, monkeypatch):
    """A ragged batch: a window, a prefill, an empty window, a short prompt — so some programs lie past their
    sequence's keys and only count (and, paged, store the padding's zeros)."""
    _poison_empty(monkeypatch)
    launched = _launches(monkeypatch)
    q_lens, k_lens = [8, 30, 0, 5], [70, 30, 12, 5]
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 16, "NHD", DTYPE, seed=7)
    cfg = fused(max(q_lens), 16, 2)
    for reduction in REDUCTIONS:
        for group in (None, "max", "mean"):
            ref = per_sequence_reference(q, k, cu_q, cu_k, reduction, True, group)
            common = dict(is_causal=True, scale=0.25, group_reduce=group, cu_seqlens_q=cu_q,
                          max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens), config=cfg)
            if paged:
                out = kmod.colreduce_triton(q, cache, reduction, block_table=table, seqlens_k=seqlens, **common)
                assert not torch.isnan(out).any()
                ref = unpack(ref, k_lens, max(k_lens))               # (B, H, max_n), zeros past each prompt
            else:
                out = kmod.colreduce_triton(q, k, reduction, cu_seqlens_k=cu_k, **common)
            assert launched == ONE_LAUNCH, launched
            launched.clear()
            assert rel_err(out, ref) < TOL[DTYPE], (paged, reduction, group)


def test_fused_tiles_rule():
    """Where FUSED applies on a 132-SM GPU: the group's rows in one tile (next_pow2(G)·next_pow2(M) ≤ 512, M ≤ 128,
    D ≤ 128), at most 32768 scores a program and at most one program per SM, with 64-key tiles where they fit, else
    128; fp16/bf16."""
    rule = kmod._fused_tiles
    assert rule(64, 512, 128, 4, 8, 132, False) == 64                # window 64, 32/8, 512: 8 × 8 programs
    assert rule(64, 2048, 128, 4, 8, 132, False) == 128              # 16 × 8
    assert rule(64, 4096, 128, 4, 8, 132, False) == 0                # 32 × 8 > 132
    assert rule(64, 512, 128, 1, 32, 132, False) == 128              # MHA 32: 4 × 32
    assert rule(1, 1024, 128, 4, 8, 132, False) == 64
    assert rule(128, 512, 128, 4, 8, 132, False) == 64               # 4 × 128 rows: 64-key tiles only
    assert rule(128, 2048, 128, 4, 8, 132, False) == 0               # 32 × 8 programs; 128-key tiles too large
    assert rule(64, 512, 128, 8, 4, 132, False) == 64                # 8 × 64 rows
    assert rule(128, 512, 128, 8, 4, 132, False) == 0                # 8 × 128 rows
    assert rule(129, 256, 64, 1, 1, 132, False) == 0                 # not a window
    assert rule(16, 512, 256, 4, 8, 132, False) == 0                 # D 256
    assert rule(64, 512, 128, 4, 24, 132, False) == 128              # 3 prompts × 8 kv heads: 4 × 24
    assert rule(64, 512, 128, 4, 8, 132, False, 4) == 0              # float32
    assert rule(64, 100_000, 128, 4, 8, 10**6, True, 4) == 32        # the interpreter: any grid and dtype
    # a config's FUSED_N: that tile where the same limits hold
    assert rule(128, 512, 128, 4, 8, 132, False, 2, 32) == 32        # 16 × 8 programs of 512 × 32 scores
    assert rule(64, 1024, 128, 4, 8, 132, False, 2, 32) == 0         # 32 × 8 > 132
    assert rule(128, 512, 128, 4, 8, 132, False, 2, 128) == 0        # 512 × 128 scores
    assert rule(64, 512, 128, 4, 8, 132, False, 4, 32) == 0          # float32
    assert rule(64, 100_000, 128, 4, 8, 1, True, 4, 64) == 64        # the interpreter
    with pytest.raises(ValueError, match="FUSED_N"):
        rule(64, 512, 128, 4, 8, 132, False, 2, 48)


def test_fused_config_key_tile(monkeypatch):
    """A config's FUSED_N sets the one-launch kernel's key tile (the sweep's ours_fused32): the launch takes it and
    the result matches float64, on a ragged M = 45 window over 150 keys; a tile it does not take raises."""
    _poison_empty(monkeypatch)
    monkeypatch.setattr(kmod, "_VARIANT", "new")          # every launch through _launch (see the refusal test)
    tiles = _launches(monkeypatch, lambda fn, grid, kw: (fn.__name__, kw.get("BLOCK_N"), grid[0]))
    q, k = rand_qk((1, 4, 2, 45, 150, 32), DTYPE, seed=19)
    ref = reference(q, k, "sum", True, "mean", scale=0.25)
    for block_n in (16, 64):
        tiles.clear()
        out = kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce="mean",
                                    config=fused(45, 32, 2, FUSED_N=block_n))
        assert tiles and all(t == ("_fused_window_kernel", block_n, -(-150 // block_n)) for t in tiles), tiles
        assert rel_err(out, ref) < TOL[DTYPE], block_n
    with pytest.raises(ValueError, match="FUSED_N must be 16, 32, 64 or 128"):
        kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce="mean",
                              config=fused(45, 32, 2, FUSED_N=100))


@pytest.mark.parametrize("case", ["long", "lse", "old"])
def test_fused_where_it_does_not_apply(case, monkeypatch):
    """A config's FUSED where the kernel does not apply (a query range longer than 128; the lse given; the old
    launch variant) takes the two-pass path, to the same float64 values."""
    launched = _launches(monkeypatch)
    shape = (1, 2, 1, 130, 140, 16) if case == "long" else (1, 4, 2, 9, 70, 16)
    q, k = rand_qk(shape, DTYPE, seed=12)
    M, D = shape[3], shape[5]
    lse = None
    if case == "lse":
        lse = torch.logsumexp(reference_logits(q, k), -1).float()
    out = kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(D), group_reduce="mean", lse=lse,
                                config=fused(M, D, 2), variant="old" if case == "old" else None)
    assert launched and all(name != "_fused_window_kernel" for name, _ in launched), launched
    assert rel_err(out, reference(q, k, "sum", True, "mean")) < TOL[DTYPE]


def reference_logits(q, k):
    from test_colreduce import masked_logits
    return masked_logits(q, k, True, 1 / math.sqrt(q.shape[-1]))[0]


GPU_SHAPES = {     # (B, Hq, Hkv, M, N, D, dtype): the sweep's small windows (64- and 128-key tiles), MHA, a batch
    "win64-32/8-N512-fp16": (1, 32, 8, 64, 512, 128, torch.float16),
    "win64-32/8-N2048-bf16": (1, 32, 8, 64, 2048, 128, torch.bfloat16),
    "win1-32/8-N1000-bf16": (1, 32, 8, 1, 1000, 128, torch.bfloat16),
    "win64-MHA32-N512-fp16": (1, 32, 32, 64, 512, 128, torch.float16),
    "win128-32/8-N512-fp16": (1, 32, 8, 128, 512, 128, torch.float16),
    "win16-B2-32/8-N900-D64-fp16": (2, 32, 8, 16, 900, 64, torch.float16),
}


@pytest.mark.skipif(not CUDA, reason="the cooperative launch and its wait run on a GPU only")
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_fused_on_gpu_repeats_bitwise_and_resets_its_counters(shape, monkeypatch, fused_windows):
    """One launch whose programs wait for each other: against float64, the same bits on three calls (a counter
    left non-zero would let the next launch's programs read partials before they are written), and the counters
    back at zero after each call."""
    _poison_empty(monkeypatch)
    launched = _launches(monkeypatch)
    *dims, dtype = shape
    B, Hq, Hkv, M, N, D = dims
    q, k = rand_qk(tuple(dims), dtype, seed=13)
    cfg = fused(M, D, Hq // Hkv)
    assert kmod._fused_tiles(M, N, D, Hq // Hkv, B * Hkv, kmod._sm_count(q.device.index or 0), False, 2)
    ref = reference(q, k, "sum", True, "mean")
    outs = []
    for _ in range(3):
        outs.append(kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(D), group_reduce="mean",
                                          config=cfg))
        torch.cuda.synchronize()
        dev, stream = q.device.index or 0, torch.cuda.current_stream().cuda_stream
        counters = kmod._scratch_bufs[(dev, stream)][1]
        assert int(counters.abs().sum()) == 0
    assert launched == ONE_LAUNCH * 3, launched
    assert rel_err(outs[0], ref) < TOL[dtype]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    launched.clear()
    fused_windows(True)       # the switch (a GPU's default): the default path, its first call through Triton's
    for _ in range(3):        # dispatch, then direct
        out = kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(D), group_reduce="mean")
        torch.cuda.synchronize()
        assert torch.equal(out, outs[0])
        assert int(kmod._scratch_bufs[(dev, stream)][1].abs().sum()) == 0
    built = any(d and d.fused for d in kmod._direct_launchers.values())
    direct = kmod._VARIANT == "direct"                     # then the later two go through the direct launcher
    assert launched == ONE_LAUNCH * (1 if direct else 3), launched
    assert built == direct


def test_fused_switch(monkeypatch, fused_windows):
    """set_fused_windows(True): calls without a config take the one-launch kernel where _fused_tiles allows it (the
    same values as a config's FUSED), and the two passes elsewhere; off again, the two passes."""
    launched = _launches(monkeypatch)
    q, k = rand_qk((1, 4, 2, 9, 70, 16), DTYPE, seed=14)
    qlong, klong = rand_qk((1, 2, 1, 130, 140, 16), DTYPE, seed=15)
    call = dict(is_causal=True, scale=0.25, group_reduce="mean")
    with_config = kmod.colreduce_triton(q, k, "sum", config=fused(9, 16, 2), **call)
    launched.clear()
    fused_windows(True)
    on = kmod.colreduce_triton(q, k, "sum", **call)
    assert launched == ONE_LAUNCH, launched
    launched.clear()
    long = kmod.colreduce_triton(qlong, klong, "sum", **call)
    assert launched and all(name != "_fused_window_kernel" for name, _ in launched), launched
    fused_windows(False)
    launched.clear()
    off = kmod.colreduce_triton(q, k, "sum", **call)
    assert launched and all(name != "_fused_window_kernel" for name, _ in launched), launched
    assert torch.equal(on, with_config)
    assert rel_err(on, reference(q, k, "sum", True, "mean", scale=0.25)) < TOL[DTYPE]
    assert rel_err(off, reference(q, k, "sum", True, "mean", scale=0.25)) < TOL[DTYPE]
    assert rel_err(long, reference(qlong, klong, "sum", True, "mean", scale=0.25)) < TOL[DTYPE]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs: a GPU only")
def test_fused_under_cuda_graph_capture():
    """A cooperative launch captured in a CUDA graph (where vLLM captures the plugin's calls, if this kernel becomes
    the default): replayed twice, the same bits as the eager call. The scratch under capture is fresh, its counters
    zeroed by a captured memset (kernels/colreduce.py _scratch)."""
    q, k = rand_qk((1, 32, 8, 64, 512, 128), torch.float16, seed=17)
    call = dict(is_causal=True, scale=128 ** -0.5, group_reduce="mean", config=fused(64, 128, 4))
    eager = kmod.colreduce_triton(q, k, "sum", **call)           # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kmod.colreduce_triton(q, k, "sum", **call)
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.parametrize("mode", ["dense", "varlen", "paged"])
def test_refused_cooperative_launch_falls_back_to_two_passes(mode, monkeypatch, fused_windows):
    """Where the driver refuses the cooperative grid (Triton raises CUDA's "too many blocks in cooperative launch",
    e.g. in an MPS client limited to part of the GPU), a call without a config warns once, switches FUSED_WINDOWS
    off and returns the two passes' result (against float64); the next call takes the two passes without trying.
    With a config asking for FUSED, or for any other launch error, the error reaches the caller."""
    _poison_empty(monkeypatch)
    monkeypatch.setattr(kmod, "_VARIANT", "new")          # every launch through _launch: "direct" sends a cached
    launched = _launches(monkeypatch)                     # kernel's later calls past the recorder (on a GPU)
    real, refused = kmod._launch, []                     # real: the recorder, which the refusal never reaches

    def refusing(fn, grid, args, kw):
        if fn.__name__ == "_fused_window_kernel":
            refused.append(kw.get("PHASE"))
            raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
        return real(fn, grid, args, kw)
    monkeypatch.setattr(kmod, "_launch", refusing)
    fused_windows(True)
    call = dict(is_causal=True, scale=0.25, group_reduce="mean")
    if mode == "dense":
        q, k = rand_qk((1, 4, 2, 9, 70, 16), DTYPE, seed=17)
        ref = reference(q, k, "sum", True, "mean", scale=0.25)
        run = lambda **cfg: kmod.colreduce_triton(q, k, "sum", **call, **cfg)      # noqa: E731
    else:
        q_lens, k_lens = [8, 5], [70, 30]
        q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 16, "NHD", DTYPE, seed=18)
        ref = per_sequence_reference(q, k, cu_q, cu_k, "sum", True, "mean")
        common = dict(call, cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
        if mode == "paged":
            ref = unpack(ref, k_lens, max(k_lens))
            run = lambda **cfg: kmod.colreduce_triton(q, cache, "sum", block_table=table, seqlens_k=seqlens,  # noqa
                                                      **common, **cfg)
        else:
            run = lambda **cfg: kmod.colreduce_triton(q, k, "sum", cu_seqlens_k=cu_k, **common, **cfg)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="cooperative launch was refused"):
        out = run()
    assert not kmod.FUSED_WINDOWS and len(refused) == 1
    assert launched and all(n != "_fused_window_kernel" for n, _ in launched), launched
    assert rel_err(out, ref) < TOL[DTYPE]
    launched.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = run()                                        # no second try, no warning
    assert len(refused) == 1 and launched, launched
    assert torch.equal(again, out)
    with pytest.raises(RuntimeError, match="cooperative launch"):          # a config asks for it: no fallback
        run(config=fused(9 if mode == "dense" else 8, 16, 2))
    assert len(refused) == 2

    def broken(fn, grid, args, kw):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    monkeypatch.setattr(kmod, "_launch", broken)
    fused_windows(True)
    with pytest.raises(RuntimeError, match="illegal memory access"):    # any other error: not hidden
        run()
