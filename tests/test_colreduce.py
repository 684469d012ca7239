"""colreduce (Triton kernel under the interpreter on CPU, and the torch backend) against a float64 reference."""
import math
import random

import pytest
import torch

from colreduce_kvprune import colreduce, colreduce_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, Hq, Hkv, M, N, D): M=1, M<N, M=N, M>N, N not a multiple of any block, D=64/80/128, groups 1/4/8, B>1
SHAPES = {
    "M1-N77-D64-g1": (1, 2, 2, 1, 77, 64),
    "M16-N100-D64-g4": (1, 4, 1, 16, 100, 64),
    "M40-N40-D80-g2-B2": (2, 4, 2, 40, 40, 80),
    "M70-N50-D128-g1": (1, 2, 2, 70, 50, 128),
    "M33-N130-D32-g8": (1, 8, 1, 33, 130, 32),
    "M5-N3-D16-g1": (1, 1, 1, 5, 3, 16),
}
REDUCTIONS = ["sum", "mean", "max"]
GROUP = [None, "sum", "mean", "max"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def masked_logits(q, k, is_causal=False, scale=None):
    """float64 (B, Hq, M, N) logits q·kᵀ·scale, K repeated over each group, −inf where the key is not visible
    (bottom-right causal), and the (M, N) visibility."""
    Hq, M, D = q.shape[1:]
    Hkv, N = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
    i = torch.arange(M, device=q.device)[:, None]
    j = torch.arange(N, device=q.device)[None, :]
    visible = (j <= i + (N - M)) if is_causal else torch.ones(M, N, dtype=torch.bool, device=q.device)
    return s.masked_fill(~visible, float("-inf")), visible


def reference(q, k, reduction, is_causal=False, group_reduce=None, scale=None):
    """Materialise softmax(q·kᵀ·scale) in float64 and reduce it; rows that see nothing give zeros."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s, visible = masked_logits(q, k, is_causal, scale)
    p = torch.softmax(s, -1)
    p = torch.where(visible, p, torch.zeros((), dtype=p.dtype, device=p.device))  # all-masked rows: NaN → 0
    if reduction == "sum":
        r = p.sum(2)
    elif reduction == "max":
        r = p.amax(2)
    else:
        cnt = visible.sum(0).double()
        r = torch.where(cnt > 0, p.sum(2) / cnt.clamp(min=1), torch.zeros((), dtype=p.dtype, device=p.device))
    if group_reduce is not None:
        r = r.view(B, Hkv, G, N)
        r = {"sum": r.sum(2), "mean": r.mean(2), "max": r.amax(2)}[group_reduce]
    return r


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def rand_qk(shape, dtype, device=DEVICE, seed=0):
    B, Hq, Hkv, M, N, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(B, Hq, M, D, generator=g) * 1.5).to(device=device, dtype=dtype)
    k = (torch.randn(B, Hkv, N, D, generator=g) * 1.5).to(device=device, dtype=dtype)
    return q, k


def _poison_empty(monkeypatch):
    """Make every torch.empty in the kernel launcher NaN-filled, so an unwritten output column or a scratch value read
    before it is written fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    import colreduce_kvprune.kernels.colreduce as kmod
    monkeypatch.setattr(kmod.torch, "empty", nan_empty)
    monkeypatch.setattr(kmod, "_scratch_bufs", {})    # the per-stream scratch too, allocated afresh (NaN)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_matches_float64(shape, is_causal, reduction, monkeypatch):
    _poison_empty(monkeypatch)
    q, k = rand_qk(shape, torch.float32)
    out = colreduce(q, k, reduction, is_causal=is_causal, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[1], shape[4])
    assert rel_err(out, reference(q, k, reduction, is_causal)) < TOL[torch.float32]


@pytest.mark.parametrize("group_reduce", GROUP[1:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_group_reduce(group_reduce, reduction, backend, monkeypatch):
    _poison_empty(monkeypatch)
    shape = SHAPES["M33-N130-D32-g8"]
    q, k = rand_qk(shape, torch.float32, seed=1)
    out = colreduce(q, k, reduction, is_causal=True, group_reduce=group_reduce, backend=backend)
    assert out.shape == (1, 1, 130)
    assert rel_err(out, reference(q, k, reduction, True, group_reduce)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_half_precision_inputs(dtype, backend):
    shape = SHAPES["M16-N100-D64-g4"]
    q, k = rand_qk(shape, dtype, seed=2)
    for reduction in REDUCTIONS:
        out = colreduce(q, k, reduction, is_causal=True, backend=backend)
        assert out.dtype == torch.float32
        assert rel_err(out, reference(q, k, reduction, True)) < TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_torch_backend_matches_float64(shape, is_causal):
    q, k = rand_qk(shape, torch.float32, seed=3)
    for reduction in REDUCTIONS:
        out = colreduce(q, k, reduction, is_causal=is_causal, backend="torch")
        assert rel_err(out, reference(q, k, reduction, is_causal)) < TOL[torch.float32]


def test_torch_reference_chunking_is_exact():
    q, k = rand_qk((1, 4, 2, 37, 90, 32), torch.float64, seed=4)
    whole = colreduce_torch(q, k, "sum", is_causal=True)
    for chunk in (1, 5, 16):
        assert torch.allclose(colreduce_torch(q, k, "sum", is_causal=True, chunk=chunk), whole, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 24, 4, 64, generator=g).to(DEVICE).transpose(1, 2)       # (1, 4, 24, 64), strided
    kbig = torch.randn(1, 40, 2, 128, generator=g).to(DEVICE)
    k = kbig[..., :64].transpose(1, 2)                                            # (1, 2, 40, 64), strided
    assert not q.is_contiguous() and not k.is_contiguous()
    out = colreduce(q, k, "sum", is_causal=True, backend=backend)
    assert rel_err(out, reference(q, k, "sum", True)) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lse_argument_matches_recomputed(backend):
    q, k = rand_qk((1, 4, 2, 20, 70, 64), torch.float32, seed=6)
    scale = 0.07
    lse = masked_logits(q, k, True, scale)[0].logsumexp(-1).float()
    for reduction in REDUCTIONS:
        out = colreduce(q, k, reduction, is_causal=True, scale=scale, lse=lse, backend=backend)
        assert rel_err(out, reference(q, k, reduction, True, scale=scale)) < 1e-5


def test_custom_scale():
    q, k = rand_qk((1, 2, 2, 8, 40, 32), torch.float32, seed=7)
    for backend in ("triton", "torch"):
        out = colreduce(q, k, "sum", scale=0.3, backend=backend)
        assert rel_err(out, reference(q, k, "sum", scale=0.3)) < 1e-5


def test_rows_that_see_nothing_contribute_nothing():
    """M > N causal: the first M − N queries see no key; no NaN, and they add nothing."""
    q, k = rand_qk((1, 2, 2, 12, 4, 16), torch.float32, seed=8)
    for backend in ("triton", "torch"):
        full = colreduce(q, k, "sum", is_causal=True, backend=backend)
        tail = colreduce(q[:, :, 8:], k, "sum", is_causal=True, backend=backend)
        assert torch.allclose(full, tail, atol=1e-6)
        mean = colreduce(q, k, "mean", is_causal=True, backend=backend)
        # key j is seen by the queries i >= j + 8 of 12: 4 - j of them
        assert torch.allclose(mean, full / torch.tensor([4.0, 3.0, 2.0, 1.0], device=q.device), atol=1e-6)


def test_empty_axes():
    q, k = rand_qk((1, 2, 1, 0, 9, 16), torch.float32)
    for backend in ("triton", "torch"):
        assert torch.equal(colreduce(q, k, "mean", backend=backend), torch.zeros(1, 2, 9, device=q.device))
        assert colreduce(q[:, :, :0], k[:, :, :0], backend=backend).shape == (1, 2, 0)


def test_nan_input_is_not_hidden():
    q, k = rand_qk((1, 2, 2, 8, 40, 32), torch.float32)
    q[0, 0, 3, 5] = float("nan")
    for backend in ("triton", "torch"):
        assert torch.isnan(colreduce(q, k, "sum", backend=backend)[0, 0]).any()


def test_deterministic_repeat():
    q, k = rand_qk((2, 8, 2, 48, 300, 64), torch.float16, seed=9)
    first = colreduce(q, k, "sum", is_causal=True, group_reduce="mean", backend="triton")
    for _ in range(2):
        assert torch.equal(first, colreduce(q, k, "sum", is_causal=True, group_reduce="mean", backend="triton"))


# ---- errors -------------------------------------------------------------------------------------------------
def _qk(B=1, Hq=4, Hkv=2, M=8, N=16, D=32, dtype=torch.float32):
    return torch.randn(B, Hq, M, D, dtype=dtype), torch.randn(B, Hkv, N, D, dtype=dtype)


ERRORS = {
    "rank": (lambda: (torch.randn(4, 8, 32), _qk()[1]), {}, ValueError, "must be 4-D"),
    "batch": (lambda: (_qk(B=2)[0], _qk(B=3)[1]), {}, ValueError, "batch sizes differ"),
    "head-dim": (lambda: (_qk(D=32)[0], _qk(D=64)[1]), {}, ValueError, "head dims differ"),
    "gqa": (lambda: (_qk(Hq=3)[0], _qk(Hkv=2)[1]), {}, ValueError, "multiple of the kv heads"),
    "mixed-dtype": (lambda: (_qk()[0], _qk(dtype=torch.float16)[1]), {}, TypeError, "same dtype"),
    "int-dtype": (lambda: (torch.ones(1, 2, 4, 16, dtype=torch.int32),) * 2, {}, TypeError, "expected float16"),
    "reduction": (_qk, {"reduction": "median"}, ValueError, "unknown reduction 'median'"),
    "group": (_qk, {"group_reduce": "min"}, ValueError, "unknown group_reduce"),
    "backend": (_qk, {"backend": "cuda"}, ValueError, "unknown backend"),
    "scale": (_qk, {"scale": -1.0}, ValueError, "scale must be a positive"),
    "lse-shape": (_qk, {"lse": torch.zeros(1, 4, 7)}, ValueError, "lse must be (B, Hq, M)"),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_errors(case):
    make, kwargs, exc, message = case
    q, k = make()
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        colreduce(q, k, **kwargs)


def test_mixed_devices_error():
    q, k = _qk()
    with pytest.raises(ValueError, match="different devices"):
        colreduce(q, k.to("meta"))


def test_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k = _qk()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        colreduce(q, k, backend="triton")


# ---- GPU only ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 32, 8, 64, 40000, 128), (2, 16, 16, 700, 900, 80),
                                   (1, 8, 2, 2000, 2000, 96), (1, 4, 4, 300, 3000, 256)],
                         ids=["window-gqa", "mha-d80", "causal-d96", "d256"])
def test_gpu_big_shapes(shape, dtype, monkeypatch):
    _poison_empty(monkeypatch)
    q, k = rand_qk(shape, dtype, seed=10)
    for reduction, group in (("sum", None), ("mean", "mean"), ("max", "max")):
        out = colreduce(q, k, reduction, is_causal=True, group_reduce=group)
        ref = reference(q, k, reduction, True, group)
        assert rel_err(out, ref) < TOL[dtype], (reduction, group)
        assert torch.equal(out, colreduce(q, k, reduction, is_causal=True, group_reduce=group))


def test_large_negative_logits_do_not_underflow():
    """Rows whose logits are all far below 0 must still normalise (the running max is the row's own)."""
    q, k = rand_qk((1, 2, 2, 20, 90, 32), torch.float32, seed=11)
    q, k = q.abs(), -20.0 * k.abs()                     # every logit below -250: exp2 of it underflows
    # fp32 logits near a row's max m carry an absolute rounding error of a few ulp(|m|), so the probabilities a
    # relative one of that size: 4 eps |m| (about 1e-4 here; 1e-5 passed or failed with the CPU's dot order).
    # An underflow makes the error 1 or NaN.
    m = torch.einsum("hmd,hnd->hmn", q[0].double(), k[0].double()).amax(-1).abs().max().item()
    tol = 4 * torch.finfo(torch.float32).eps * m
    for backend in ("triton", "torch"):
        for is_causal in (False, True):
            out = colreduce(q, k, "sum", is_causal=is_causal, scale=1.0, backend=backend)
            assert rel_err(out, reference(q, k, "sum", is_causal, scale=1.0)) < tol, (backend, is_causal, tol)


@pytest.fixture
def fused_windows():
    """The kernels' FUSED_WINDOWS switch (set_fused_windows, which drops the cached recipes) for one test; the value
    before it is restored afterwards (on GPUs it is on by default, under the interpreter off)."""
    from colreduce_kvprune.kernels import colreduce as C
    before = C.FUSED_WINDOWS
    yield C.set_fused_windows
    C.set_fused_windows(before)


@pytest.mark.parametrize("mode", ["varlen", "paged", "whole", "saved", "saved-paged", "saved-cap", "fused",
                                  "fused-paged"])
def test_warmup_lengths_compile_every_specialisation_a_prompt_launches(mode, monkeypatch, fused_windows):
    """launch_lengths gives the vLLM warm-up one key length per distinct compiled launch, so that no prompt compiles
    a kernel mid-serving (the twelfth session's H200 visit: two 1 s window-kernel compiles during the mixed workload, at
    lengths whose output strides 8·N were multiples of 16 and N was not). Checked against what colreduce_triton
    really launches, as the H200 plans it (132 SMs): each launch's kernel, constexprs and Triton's specialisation
    of every argument, recorded instead of run, for lengths of every residue mod 16 and random ones. "whole":
    whole prompts (H2O: every query scored, launch_lengths(..., whole=True)), whose query length moves the
    integers that follow it too (the lse's strides Hq·M and M); the H200's vLLM suite found their launch key
    without them (an H2O engine compiled both kernels at its first 4500-token prompt). The Gluon row pass of
    sm_90 is not modelled here (no device): tests/test_colreduce_ws.py covers its warm-up. "saved": a window of one
    query, whose row pass saves its scores for _saved_column_kernel; "saved-cap": with the scores' scratch cap
    lowered to 20,000 key positions' worth, so that longer prompts launch the window kernel instead. "fused": with
    the one-launch window kernel on (FUSED_WINDOWS, a GPU's default), which short prompts launch instead of both
    passes; the other modes with it off."""
    paged, whole, saved = mode.endswith("paged"), mode == "whole", mode.startswith("saved")
    from colreduce_kvprune.kernels import colreduce as C
    fused_windows(mode.startswith("fused"))

    launched = []
    if mode == "saved-cap":
        monkeypatch.setattr(C, "_SAVE_MAX_BYTES", 20000 * 8 * 4 * 4)      # positions × kv heads × G·M rows × 4 bytes
    monkeypatch.setattr(C, "_interpreting", lambda: False)
    monkeypatch.setattr(C, "_sm_count", lambda dev: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: -1)      # CPU tensors: no device, no stream
    monkeypatch.setattr(C, "_launch", lambda fn, grid, args, kw: launched.append(
        (getattr(fn, "__name__", None) or fn.fn.__name__, tuple(sorted(kw.items())), C._spec(args))))
    m, hq, hkv, d, page, hi = (1 if saved else 32), 32, 8, 128, 16, 40000
    if whole:               # the failing engine's heads: Hq·M is a multiple of 16 only where M is one of 4
        hq, hkv, d, hi = 4, 2, 64, 9000
    gen = torch.Generator().manual_seed(0)
    q_all = torch.randn(hi if whole else m, hq, d, generator=gen).to(torch.bfloat16)
    k_all = torch.randn(1 if paged else hi, *((page,) if paged else ()), hkv, d, generator=gen).to(torch.bfloat16)
    cu_q = torch.tensor([0, m], dtype=torch.int32)

    def launches(n):
        del launched[:]
        q = q_all[:n] if whole else q_all
        kw = dict(is_causal=True, scale=d ** -0.5, group_reduce="mean", max_seqlen_k=n,
                  cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32) if whole else cu_q,
                  max_seqlen_q=n if whole else m)
        if paged:
            table = torch.zeros(1, -(-n // (16 * page)) * 16, dtype=torch.int32)      # as compaction's tables
            C.colreduce_triton(q, k_all, "sum", block_table=table, seqlens_k=torch.tensor([n], dtype=torch.int32),
                               **kw)
        else:
            C.colreduce_triton(q, k_all[:n], "sum", cu_seqlens_k=torch.tensor([0, n], dtype=torch.int32), **kw)
        return tuple(launched)

    lengths = C.launch_lengths(m, 1024, hi, d, hq // hkv, 1, hkv, is_causal=True, reduction="sum",
                               group_reduce="mean", dtype=torch.bfloat16, device="cpu", paged=paged,
                               page=page if paged else 1, sms=132, whole=whole)
    warmed = {launches(n) for n in lengths}
    assert len(warmed) == len(lengths)                 # each warm-up length compiles something the others do not
    kinds = {launch[-1][0] for launch in warmed}
    assert kinds == ({"_saved_column_kernel", "_window_column_kernel"} if mode == "saved-cap" else
                     {"_fused_window_kernel", "_window_column_kernel"} if mode.startswith("fused") else
                     {"_saved_column_kernel"} if saved else kinds - {"_saved_column_kernel", "_fused_window_kernel"}), \
        kinds
    rng = random.Random(1)
    edge = range(4080, 4112) if whole else range(16384, 16416)      # where the tiles change, every residue mod 16
    for n in list(edge) + [1024, hi] + [rng.randrange(1024, hi + 1) for _ in range(150)]:
        assert launches(n) in warmed, n
