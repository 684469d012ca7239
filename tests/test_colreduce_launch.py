"""The launch path of issue 19: both launch variants ("new": cached plan, Triton combine of the row statistics or a
row pass that writes the lse itself, lse converted in the column kernel, tiles fitted to the shape; "old": the path
before) against the float64 reference, with the tiles the "new" variant picks on a GPU forced through `config`."""
import math

import pytest
import torch

import colreduce_kvprune.kernels.colreduce as kmod
from colreduce_kvprune.kernels.colreduce import _fit_config, _pick_config, colreduce_triton
from test_colreduce import DEVICE, TOL, _poison_empty, rand_qk, reference, rel_err

# (B, Hq, Hkv, M, N, D): windows of 1 and 16 queries, a window over two key splits, M = N
SHAPES = {"M1-N90-g4": (1, 4, 1, 1, 90, 32), "M16-N200-g2": (1, 4, 2, 16, 200, 16),
          "M24-N24-g1-B2": (2, 2, 2, 24, 24, 16)}


def _gpu_like_config(m, n, d, g, programs, sms=132):
    """What the "new" variant picks on an H200-sized GPU (computed as if not interpreting)."""
    real = kmod._interpreting
    kmod._interpreting = lambda: False
    try:
        return _fit_config(_pick_config(m, d, g, True), m, n, g, programs, sms)
    finally:
        kmod._interpreting = real


def test_fit_config_rules():
    mha = _gpu_like_config(64, 8192, 128, 1, 32)
    assert mha["BLOCK_R"] == 64 and mha["BLOCK_M"] == 32 and mha["BLOCK_N"] == 128
    w1 = _gpu_like_config(1, 2048, 128, 4, 8)
    assert w1["BLOCK_R"] == 16 and w1["BLOCK_M"] == 16 and w1["BLOCK_N"] == 64   # 16 key tiles × 8 heads < 264
    full = _gpu_like_config(2048, 2048, 128, 1, 32)
    assert full["BLOCK_R"] == 128 and full["BLOCK_N"] == 128                     # 512 programs: unchanged


@pytest.mark.parametrize("variant", ["new", "old"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_variants_match_float64(shape, variant, monkeypatch):
    _poison_empty(monkeypatch)
    q, k = rand_qk(shape, torch.float32, seed=11)
    B, Hq, Hkv, M, N, D = shape
    scale = 1 / math.sqrt(D)
    cfg = dict(_gpu_like_config(M, N, D, Hq // Hkv, B * Hkv), BLOCK_N1=32, stages1=1, stages=1)
    if DEVICE == "cpu":           # interpreter time: 128-key column tiles are slow, 64 keep the shape's logic
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)
    for reduction, group in (("sum", "mean"), ("max", None), ("mean", "max")):
        ref = reference(q, k, reduction, True, group)
        for c in (None, cfg):
            out = colreduce_triton(q, k, reduction, is_causal=True, scale=scale, group_reduce=group, config=c,
                                   variant=variant)
            assert rel_err(out, ref) < TOL[torch.float32], (reduction, group, c)


@pytest.mark.parametrize("variant", ["new", "old"])
def test_lse_given_and_no_key_rows(variant, monkeypatch):
    """lse given (natural log, -inf for rows that see no key when M > N): converted in the kernel or by torch."""
    _poison_empty(monkeypatch)
    q, k = rand_qk((1, 2, 1, 20, 12, 16), torch.float32, seed=2)
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    i, j = torch.arange(20)[:, None], torch.arange(12)[None, :]
    lse = s.masked_fill(j.to(s.device) > (i + 12 - 20).to(s.device), float("-inf")).logsumexp(-1).float()
    assert torch.isneginf(lse).any()
    out = colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce=None, lse=lse, variant=variant)
    assert rel_err(out, reference(q, k, "sum", True, None, scale=0.25)) < TOL[torch.float32]


def test_plan_is_cached():
    q, k = rand_qk((1, 2, 1, 4, 40, 16), torch.float32)
    colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce=None, variant="new")
    hits = kmod._cached_plan.cache_info().hits
    colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce=None, variant="new")
    assert kmod._cached_plan.cache_info().hits == hits + 1


def test_set_launch_variant_checks():
    with pytest.raises(ValueError, match="launch variant"):
        kmod.set_launch_variant("fast")
