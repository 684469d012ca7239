"""The row pass of long causal prompts on sm_90 (kernels/colreduce_ws.py, Gluon) and the REDO launch of the Triton row
kernel after it.

- CPU (interpreter) and GPU: the REDO launch recomputes, with the running max, exactly the row blocks that hold a
  NaN (the Gluon pass's overflow signal) and leaves the others as they were; with every row NaN the whole result
  matches float64. The Gluon launch is replaced by a stand-in that writes the NaNs (it has no interpreter).
- GPU (sm_90 only): the Gluon pass inside colreduce / colreduce_varlen against float64, with its query threshold
  lowered so that small ragged shapes take it, including rows whose fixed offset overflows (REDO).
tests/test_colreduce_compile.py compiles the Gluon kernel for sm_90 on the CPU."""
import math

import pytest
import torch

import colreduce_kvprune.kernels.colreduce as kmod
from colreduce_kvprune import colreduce, colreduce_varlen
from test_colreduce import DEVICE, _poison_empty, reference, rel_err

SENTINEL = 12345.0


def _lse2_reference(q, k):
    """(B, Hq, M) causal row log-sum-exp in log2 units, float64 (+inf for a row that sees no key)."""
    B, Hq, M, D = q.shape
    G = Hq // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(D)
    N = k.shape[2]
    visible = torch.arange(N, device=q.device)[None, :] <= torch.arange(M, device=q.device)[:, None] + (N - M)
    lse = torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1) / math.log(2)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def _fake_gluon(monkeypatch, nan_rows):
    """_ws_row on and the Gluon launch replaced: it fills the lse buffer with SENTINEL and NaN at nan_rows (flat
    (b·Hq + h)·max_m + m indices, or "all"). Returns (captured buffers, the row kernel launches' kwargs)."""
    got, kws = [], []
    monkeypatch.setattr(kmod, "_ws_row", lambda *a: True)

    def fake(q, k, lse2, cu_q, cu_k, max_m, max_n, B, qk_scale, varlen):
        lse2.fill_(float("nan") if nan_rows == "all" else SENTINEL)
        if nan_rows != "all":
            lse2[nan_rows] = float("nan")
        got.append(lse2)
        return True
    monkeypatch.setattr(kmod, "_ws_launch", fake)
    real = kmod._launch

    def launch(fn, grid, args, kw):
        if fn is kmod._row_stats_kernel:
            kws.append(dict(kw))
        return real(fn, grid, args, kw)
    monkeypatch.setattr(kmod, "_launch", launch)
    monkeypatch.setattr(kmod, "_direct_launchers", {})
    return got, kws


@pytest.mark.parametrize("shape", [(2, 4, 2, 300, 300, 32), (1, 4, 1, 150, 300, 16)], ids=["B2-g2", "g4-M<N"])
def test_redo_recomputes_exactly_the_blocks_with_nan(shape, monkeypatch):
    B, Hq, Hkv, M, N, D = shape
    G = Hq // Hkv
    q = torch.randn(B, Hq, M, D, dtype=torch.float32, device=DEVICE)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float32, device=DEVICE)
    nan = torch.tensor([(0 * Hq + 1) * M + 3, (B * Hq - 1) * M + M - 1], device=DEVICE)   # head 1 row 3; last row
    got, kws = _fake_gluon(monkeypatch, nan)
    colreduce(q, k, "sum", is_causal=True, backend="triton")
    assert [kw["REDO"] for kw in kws] == [True] and not kws[0]["K_TMA"], kws
    lse2 = got[0].view(-1)
    # the REDO program of flat row i = (b·Hq + h)·M + m: (b, kv head h // G, block of its group row h % G · M + m)
    block = kws[0]["BLOCK_R"]
    i = torch.arange(B * Hq * M, device=DEVICE)
    b, h, m = i // (Hq * M), i // M % Hq, i % M
    program = (b * Hkv + h // G) * (G * M) + (h % G * M + m) // block * block
    redone = torch.isin(program, program[nan])
    assert 0 < redone.sum() < B * Hq * M, "the shape must have blocks with and without a NaN"
    ref = _lse2_reference(q, k).view(-1)
    err = ((lse2[redone].double() - ref[redone]).abs() / ref[redone].abs().clamp(min=1.0)).max().item()
    assert err < 1e-5, err
    assert (lse2[~redone] == SENTINEL).all(), "a block without NaN was rewritten"


def test_redo_of_every_row_matches_float64(monkeypatch):
    """Every row NaN: the REDO launch computes all of them, and the column pass after it gives the float64 result
    (dense and varlen)."""
    _poison_empty(monkeypatch)
    got, kws = _fake_gluon(monkeypatch, "all")
    q = torch.randn(2, 4, 50, 32, dtype=torch.float32, device=DEVICE)
    k = torch.randn(2, 2, 60, 32, dtype=torch.float32, device=DEVICE)
    out = colreduce(q, k, "sum", is_causal=True, group_reduce="mean", backend="triton")
    assert rel_err(out, reference(q, k, "sum", True, "mean")) < 1e-5
    lens_q, lens_k = [50, 17], [60, 40]
    qv = torch.cat([q[0].transpose(0, 1), q[1, :, :17].transpose(0, 1)])
    kv = torch.cat([k[0].transpose(0, 1), k[1, :, :40].transpose(0, 1)])
    cu = [torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=DEVICE) for lens in (lens_q, lens_k)]
    out = colreduce_varlen(qv, kv, *cu, "sum", max_seqlen_q=50, max_seqlen_k=60, is_causal=True,
                           backend="triton")
    ref = torch.cat([reference(q[:1], k[:1], "sum", True)[0].T,
                     reference(q[1:, :, :17], k[1:, :, :40], "sum", True)[0].T])
    assert rel_err(out, ref) < 1e-5
    assert [kw["REDO"] for kw in kws] == [True, True]


# ---- sm_90 only: the Gluon kernel itself -------------------------------------------------------------------
def _sm90():
    return DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0) and kmod._ws_device(
        torch.cuda.current_device())


@pytest.fixture
def gluon_calls(monkeypatch):
    """The Gluon pass taken from 129 queries on; counts its launches."""
    if not _sm90():
        pytest.skip("the Gluon row pass runs on sm_90 only (no interpreter); the CPU compiles it")
    monkeypatch.setattr(kmod, "_WS_MIN_M", 129)
    monkeypatch.setattr(kmod, "_direct_launchers", {})
    calls = []
    real = kmod._ws_launch

    def counted(*a):
        calls.append(real(*a))
        return calls[-1]
    monkeypatch.setattr(kmod, "_ws_launch", counted)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 32, 8, 300, 300, 128), (2, 4, 4, 200, 520, 64), (1, 2, 2, 260, 100, 128),
                                   (1, 8, 1, 1000, 1000, 128)], ids=["gqa-300", "mha-d64-M<N", "M>N", "g8-1000"])
def test_gluon_row_pass_matches_float64(shape, dtype, gluon_calls, monkeypatch):
    _poison_empty(monkeypatch)
    B, Hq, Hkv, M, N, D = shape
    torch.manual_seed(0)
    q = torch.randn(B, Hq, M, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, device=DEVICE, dtype=dtype)
    for reduction, group in (("sum", None), ("mean", "mean")):
        out = colreduce(q, k, reduction, is_causal=True, group_reduce=group)
        assert rel_err(out, reference(q, k, reduction, True, group)) < 1e-3, (reduction, group)
        assert torch.equal(out, colreduce(q, k, reduction, is_causal=True, group_reduce=group))   # direct launch
    assert gluon_calls and all(gluon_calls), gluon_calls


@pytest.mark.gpu
def test_gluon_row_pass_varlen_and_overflow(gluon_calls, monkeypatch):
    """Varlen (ragged sequences, one with fewer keys than queries' window) and a key ~460 log2 units above its rows'
    first tile (the fixed offset overflows there: those rows come from the REDO launch)."""
    _poison_empty(monkeypatch)
    torch.manual_seed(1)
    lens_q, lens_k = [333, 0, 150, 700], [333, 64, 400, 700]
    Hq, Hkv, D = 8, 2, 128
    q = torch.randn(sum(lens_q), Hq, D, device=DEVICE, dtype=torch.float16)
    k = torch.randn(sum(lens_k), Hkv, D, device=DEVICE, dtype=torch.float16)
    q[-700:, :, 0] += 60.0
    k[-80, :, 0] = 60.0
    cu = [torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
          for lens in (lens_q, lens_k)]
    out = colreduce_varlen(q, k, *cu, "sum", max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), is_causal=True)
    for offsets in (cu, [c.long() for c in cu]):       # again (the direct launch), and with int64 offsets
        again = colreduce_varlen(q, k, *offsets, "sum", max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
                                 is_causal=True)
        assert torch.equal(again, out), offsets[0].dtype
    refs = []
    for i in range(4):
        qi = q[cu[0][i]:cu[0][i + 1]].transpose(0, 1)[None]
        ki = k[cu[1][i]:cu[1][i + 1]].transpose(0, 1)[None]
        refs.append(reference(qi, ki, "sum", True)[0].T if lens_q[i] else torch.zeros(lens_k[i], Hq,
                                                                                        device=DEVICE).double())
    assert rel_err(out, torch.cat(refs)) < 1e-3
    assert gluon_calls and all(gluon_calls), gluon_calls


@pytest.mark.gpu
def test_gluon_direct_path_falls_back_where_varlen_rows_overlap(gluon_calls, monkeypatch):
    """A varlen q whose tokens share one row (stride 0) has a descriptor only while it holds one token. A later
    call with the same signature (strides, max lengths, batch) and more tokens must not launch the Gluon pass from
    the direct path: it takes the Triton row pass, and the results stay right."""
    _poison_empty(monkeypatch)
    monkeypatch.setattr(kmod, "_WS_MIN_M", 1)
    torch.manual_seed(2)
    Hq, Hkv, D = 4, 2, 64
    row = torch.randn(1, Hq, D, device=DEVICE, dtype=torch.float16)
    k = torch.randn(4, Hkv, D, device=DEVICE, dtype=torch.float16)
    cu_k = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    for lens_q in ([1, 0], [1, 1], [1, 1]):
        q = row.as_strided((sum(lens_q), Hq, D), (0, D, 1))           # every token row 0, one token too
        cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32, device=DEVICE)
        out = colreduce_varlen(q, k, cu_q, cu_k, "sum", max_seqlen_q=1, max_seqlen_k=2, is_causal=True)
        refs = [reference(q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None], k[2 * i:2 * i + 2].transpose(0, 1)[None],
                          "sum", True)[0].T if lens_q[i] else torch.zeros(2, Hq, device=DEVICE).double()
                for i in range(2)]
        assert rel_err(out, torch.cat(refs)) < 1e-3, lens_q
    assert gluon_calls == [True, False, False], gluon_calls


@pytest.mark.gpu
def test_warm_up_compiles_the_gluon_pass_for_whole_prompt_policies(gluon_calls, monkeypatch):
    """H2O scores whole prompts, whose row pass is the Gluon kernel from _WS_MIN_M queries on (here lowered to
    129). The engine-start warm-up (vllm/warmup.py: score_lengths → score_whole_prompts) scores whole dummy prompts,
    so the kernel is compiled there and not at the first such prompt mid-serving: afterwards its compiled launcher
    serves the signature (every length: the lengths are not specialised), and a prompt of another length adds none."""
    from colreduce_kvprune.config import load_config
    from colreduce_kvprune.kernels import colreduce_ws
    from colreduce_kvprune.policies import get_policy
    from colreduce_kvprune.vllm import warmup

    monkeypatch.setattr(colreduce_ws, "_direct", {})
    policy = get_policy(load_config({"policy": "h2o", "budget": {"keep_ratio": 0.25}, "min_prompt_tokens": 300}))
    dev = torch.device("cuda", torch.cuda.current_device())
    scored = warmup.score_lengths(policy, dev, torch.bfloat16, 8, 2, 64, 0.125, 700, 16)
    assert scored and all(not paged and 300 <= n <= 700 for paged, n in scored), scored
    assert gluon_calls and all(gluon_calls), gluon_calls
    compiled = dict(colreduce_ws._direct)
    assert compiled and all(compiled.values()), compiled
    q = torch.randn(650, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(650, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    cu = torch.tensor([0, 650], dtype=torch.int32, device=DEVICE)
    colreduce_varlen(q, k, cu, cu, "sum", max_seqlen_q=650, max_seqlen_k=650, is_causal=True, scale=0.125,
                     group_reduce="mean")
    assert colreduce_ws._direct == compiled and gluon_calls[-1]


def test_descriptor_stand_in_carries_what_triton_reads():
    """colreduce_ws._Desc stands in for Gluon's TensorDescriptor in the direct launches (no construction checks per
    call): it must carry every field of it but the two the compiled kernel fixed (block shape, layout), and
    Triton's per-launch conversion (make_tensordesc_arg) must read it. Triton 3.7 added round_f32_to_tf32 there;
    without it every launch after a signature's first raised AttributeError."""
    import dataclasses

    import triton.backends.nvidia.driver as drv
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from colreduce_kvprune.kernels import colreduce_ws
    fields = {f.name for f in dataclasses.fields(TensorDescriptor)} - {"block_shape", "layout"}
    assert fields <= set(colreduce_ws._Desc._fields), fields - set(colreduce_ws._Desc._fields)
    x = torch.zeros(4, 64, dtype=torch.float16)
    args = drv.make_tensordesc_arg(colreduce_ws._Desc(x, (4, 64), (64, 1)), None)   # the path without a GPU
    assert args[0] is x and args[1:5] == [4, 64, 64, 1]
