"""The launch path of issue 19: both launch variants ("new": cached plan, Triton combine of the row statistics or a
row pass that writes the lse itself, lse converted in the column kernel, tiles fitted to the shape; "old": the path
before) against the float64 reference, with the tiles the "new" variant picks on a GPU forced through `config`."""
import inspect
import math
import os
import re
import sys

import pytest
import torch

import colreduce_kvprune.kernels.colreduce as kmod
from colreduce_kvprune import colreduce, colreduce_paged, colreduce_varlen
from colreduce_kvprune.kernels.colreduce import _fit_config, _pick_config, colreduce_triton
from test_colreduce import (DEVICE, TOL, _poison_empty, fused_windows,  # noqa: F401 (a fixture)
                             masked_logits, rand_qk, reference, rel_err)

# (B, Hq, Hkv, M, N, D): windows of 1 and 16 queries, a window over two key splits, M = N
SHAPES = {"M1-N90-g4": (1, 4, 1, 1, 90, 32), "M16-N200-g2": (1, 4, 2, 16, 200, 16),
          "M24-N24-g1-B2": (2, 2, 2, 24, 24, 16)}


def _gpu_like_config(m, n, d, g, programs, sms=132, ragged=False, mid=True):
    """What the "new" variant picks on an H200-sized GPU (computed as if not interpreting)."""
    real = kmod._interpreting
    kmod._interpreting = lambda: False
    try:
        return _fit_config(_pick_config(m, d, g, True), m, n, g, programs, sms, d, ragged, mid)
    finally:
        kmod._interpreting = real


def test_fit_config_rules():
    mha = _gpu_like_config(64, 8192, 128, 1, 32)                                 # persistent (rows fit a tile)
    assert mha["BLOCK_R"] == 64 and mha["BLOCK_M"] == 64 and mha["PERSISTENT"] == 8
    g8 = _gpu_like_config(64, 8192, 128, 8, 8)                                   # 8 × 64 rows: per-tile programs
    assert g8["BLOCK_M"] == 32 and g8["BLOCK_N"] == 128 and not g8.get("PERSISTENT")
    w1 = _gpu_like_config(1, 2048, 128, 4, 8)
    assert w1["BLOCK_R"] == 16 and w1["BLOCK_M"] == 16 and w1["BLOCK_N"] == 64   # 16 key tiles × 8 heads < 264
    gqa = _gpu_like_config(2048, 2048, 128, 4, 8, mid=False)
    assert gqa["HEAD_SPLIT"] == 4 and gqa["BLOCK_N"] == 128        # 16 key tiles × 8 kv heads × 4 head splits
    assert _gpu_like_config(2048, 2048, 128, 7, 4)["HEAD_SPLIT"] == 7
    few = _gpu_like_config(2048, 2048, 128, 1, 8, mid=False)
    assert few["HEAD_SPLIT"] == 1 and few["BLOCK_N"] == 64                       # MHA 8 heads: 128 programs
    full = _gpu_like_config(2048, 2048, 128, 1, 32, mid=False)
    assert full["BLOCK_R"] == 128 and full["BLOCK_N"] == 128                     # 512 programs: unchanged
    # prompts of fewer than 8192 keys at D 128: 64-key column tiles at 3 stages; 64-row row tiles from 1024 queries
    for m, g, programs in ((2048, 4, 8), (2048, 1, 32), (1024, 4, 8)):
        short = _gpu_like_config(m, m, 128, g, programs)
        assert (short["BLOCK_N"], short["stages"], short["BLOCK_R"], short["warps1"], short["stages1"]) == \
            (64, 3, 64, 4, 3), (m, g)
    assert _gpu_like_config(2048, 2048, 128, 4, 8)["HEAD_SPLIT"] == 4            # the split of 128-key tiles kept
    tiny = _gpu_like_config(512, 512, 128, 4, 8)
    assert (tiny["BLOCK_N"], tiny["BLOCK_R"], tiny["warps1"]) == (64, 128, 8)    # below 1024 queries: row tiles kept
    # a chunk of a long prompt, D 64, 8k, and D 256 (its own tiles: more stages could pass the shared memory)
    for m, n, d in ((2048, 16384, 128), (2048, 2048, 64), (8192, 8192, 128), (2048, 2048, 256)):
        assert _gpu_like_config(m, n, d, 4, 8) == _gpu_like_config(m, n, d, 4, 8, mid=False), (m, n, d)
    long = _gpu_like_config(16384, 16384, 128, 4, 8)                             # 128-row tiles for M ≥ 8192
    assert long["BLOCK_R"] == 128 and long["warps1"] == 4 and long["HEAD_SPLIT"] == 2  # 1,024 tiles < 8 × 132
    assert long["stages1"] == 4                                                  # TMA key tiles: 4 stages
    real = kmod._interpreting
    kmod._interpreting = lambda: False
    try:                                                                         # its own loads: 3
        assert _pick_config(16384, 128, 4, True, tma=False)["stages1"] == 3
        assert kmod._plan(16384, 16384, 128, 4, 1, 8, True, "new", 132, None, False, False)[0]["stages1"] == 3
    finally:
        kmod._interpreting = real
    mid = _gpu_like_config(4096, 4096, 128, 4, 8)                                # 64-row tiles for 4096 ≤ M < 8192
    assert (mid["BLOCK_R"], mid["warps1"], mid["stages1"], mid["BLOCK_N"]) == (64, 4, 3, 64)
    assert _gpu_like_config(8192, 8192, 128, 4, 8)["BLOCK_R"] == 128
    assert _gpu_like_config(32768, 32768, 128, 4, 8)["HEAD_SPLIT"] == 1          # 2,048 programs without a split


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
    configs = [None, cfg]
    if Hq // Hkv % 2 == 0:        # the long kernel with its heads split over two programs per kv head
        configs.append(dict(cfg, WINDOW=False, BLOCK_M=16, BLOCK_N=32, HEAD_SPLIT=2))
    # the persistent window kernel: 2 programs per sequence × kv head over the 32-key tiles
    configs.append(dict(cfg, WINDOW=True, PERSISTENT=2, BLOCK_M=max(16, 1 << (M - 1).bit_length()), BLOCK_N=32))
    for reduction, group in (("sum", "mean"), ("max", None), ("mean", "max"), ("max", "max"), ("sum", "sum")):
        ref = reference(q, k, reduction, True, group)
        for c in configs:
            out = colreduce_triton(q, k, reduction, is_causal=True, scale=scale, group_reduce=group, config=c,
                                   variant=variant)
            assert rel_err(out, ref) < TOL[torch.float32], (reduction, group, c)


def test_config_splits_replace_the_planned_ones(monkeypatch):
    """A given config's SPLITS (benchmarks/kernels.py --goal-tiles) sets the row pass's key splits: two counts other
    than the plan's own (1, where the row pass writes the lse with no combine, unless that is the plan's), all
    against float64."""
    _poison_empty(monkeypatch)
    B, Hq, Hkv, M, N, D = 1, 4, 2, 24, 1000, 16    # N: 3 splits survive the rounding to key tiles of 32, 64 or 128
    q, k = rand_qk((B, Hq, Hkv, M, N, D), torch.float32, seed=5)
    cfg = _pick_config(M, D, Hq // Hkv, True)
    planned = kmod._plan(M, N, D, Hq // Hkv, B, Hkv, True, "new", 132, cfg)[2]
    ref = reference(q, k, "sum", True, "mean")
    # two counts other than the plan's own (the interpreter's single config plans 2 here, a GPU's tiles 1)
    for s in [s for s in (1, 3, 2) if s != planned][:2]:
        assert kmod._plan(M, N, D, Hq // Hkv, B, Hkv, True, "new", 132, dict(cfg, SPLITS=s))[2] == s != planned
        out = colreduce_triton(q, k, "sum", is_causal=True, scale=1 / math.sqrt(D), group_reduce="mean",
                               config=dict(cfg, SPLITS=s), variant="new")
        assert rel_err(out, ref) < TOL[torch.float32], s


@pytest.mark.parametrize("variant", ["new", "old"])
def test_lse_given_and_no_key_rows(variant, monkeypatch):
    """lse given (natural log, -inf for rows that see no key when M > N): converted in the kernel or by torch."""
    _poison_empty(monkeypatch)
    q, k = rand_qk((1, 2, 1, 20, 12, 16), torch.float32, seed=2)
    lse = masked_logits(q, k, True, 0.25)[0].logsumexp(-1).float()
    assert torch.isneginf(lse).any()
    out = colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce=None, lse=lse, variant=variant)
    assert rel_err(out, reference(q, k, "sum", True, None, scale=0.25)) < TOL[torch.float32]


@pytest.mark.parametrize("m, n, save", [(64, 131072, False), (64, 2048, False), (1, 8192, False), (1, 8192, True),
                                        (2048, 2048, False), (16384, 16384, False)])
def test_recipe_binds_every_constexpr(m, n, save):
    """The direct launch binds each kernel's constexprs from the recipe's kwargs (_build_direct, GPU only): a
    constexpr the recipe leaves out would silently keep that kernel on Triton's slower dispatch."""
    cfg = dict(_gpu_like_config(m, n, 128, 4, 8), SAVE=save)
    for reduction in ("sum", "mean", "max"):
        for group in (None, "sum", "mean", "max"):
            for lse_given in (False, True):
                got, _, _, _, _, row_kw, col_kw, _, _ = kmod._recipe(m, n, 128, 4, 1, 8, True, "new", 132,
                                                                      reduction, group, True, False, 1,
                                                                      torch.float16, False, lse_given, config=cfg)
                assert got.get("SAVE", False) == (save and not lse_given)
                col_fn = kmod._saved_column_kernel if got.get("SAVE") else \
                    kmod._window_column_kernel if got["WINDOW"] else kmod._long_column_kernel
                for fn, kw in ((kmod._row_stats_kernel, row_kw), (col_fn, col_kw)):
                    params = inspect.signature(fn.fn).parameters.values()     # JIT or interpreted alike
                    missing = [p.name for p in params if "constexpr" in str(p.annotation) and p.name not in kw]
                    assert not missing, (fn.__name__, missing, reduction, group)


def test_paged_row_pass_stages(monkeypatch):
    """A paged K's row pass takes 2·stages − 1 stages (_paged_stages): Triton's pipeliner gives the block-table load
    that each key tile's addresses come from its own stages (tests/test_colreduce_compile.py counts the key-tile
    buffers). Packed and dense K keep theirs; a given config is taken as it is; the old launch path is unchanged."""
    monkeypatch.setattr(kmod, "_interpreting", lambda: False)
    for m, n, d in ((64, 32768, 128), (1, 8192, 128), (2048, 16384, 128), (64, 4096, 256)):
        packed = kmod._plan(m, n, d, 4, 4, 8, True, "new", 132, None, True, False)[0]
        paged = kmod._plan(m, n, d, 4, 4, 8, True, "new", 132, None, True, False, paged=True)[0]
        assert paged == dict(packed, stages1=2 * packed["stages1"] - 1) and paged["stages1"] > 1, (m, n, d)
        assert kmod._plan(m, n, d, 4, 4, 8, True, "new", 132, packed, True, False, paged=True)[0] == packed
        assert kmod._plan(m, n, d, 4, 4, 8, True, "old", 132, None, True, False, paged=True)[0] == \
            kmod._plan(m, n, d, 4, 4, 8, True, "old", 132, None, True, False)[0]
    rec = kmod._recipe(64, 32768, 128, 4, 4, 8, True, "direct", 132, "sum", "mean", True, True, 16, torch.float16,
                       False, False)
    assert rec[5]["num_stages"] == 5                                              # the row kernel's launch


def test_plan_is_cached():
    q, k = rand_qk((1, 2, 1, 4, 40, 16), torch.float32)
    colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce=None, variant="new")
    hits = kmod._cached_recipe.cache_info().hits
    colreduce_triton(q, k, "sum", is_causal=True, scale=0.25, group_reduce=None, variant="new")
    assert kmod._cached_recipe.cache_info().hits == hits + 1


def test_set_launch_variant_checks():
    with pytest.raises(ValueError, match="launch variant"):
        kmod.set_launch_variant("fast")


def test_launch_variant_default_and_environment(tmp_path):
    """The default is "direct" only under the Triton versions its launcher was checked against on a GPU; a bad
    COLREDUCE_KVPRUNE_LAUNCH fails the import with a message naming it."""
    import subprocess
    import sys

    import triton
    checked = triton.__version__.startswith(("3.6.", "3.7.", "3.8."))
    assert kmod.DEFAULT_VARIANT == ("direct" if checked else "new")
    code = "import colreduce_kvprune.kernels.colreduce as m; print(m._VARIANT)"
    env = dict(os.environ, COLREDUCE_KVPRUNE_LAUNCH="fast")
    # run outside the checkout: its colreduce_kvprune/ (no kernels/ inside) would shadow the installed package
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "COLREDUCE_KVPRUNE_LAUNCH must be" in bad.stderr
    env["COLREDUCE_KVPRUNE_LAUNCH"] = "old"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                          check=True).stdout.strip() == "old"


def test_fit_config_persistent_window():
    """The persistent window kernel where the group's rows fit one tile and each program gets a run of ≥ 3 key
    tiles (≥ 8 with fewer than 128 group rows); not for packed and paged batches by default (their runs at 8
    programs per SM are what the sweep times beside ours)."""
    win = _gpu_like_config(64, 131072, 128, 4, 8)
    assert win["PERSISTENT"] == 33 and win["BLOCK_M"] == 64 and win["BLOCK_N"] == 64 and win["warps"] == 4
    assert _gpu_like_config(64, 8192, 128, 4, 8)["PERSISTENT"] == 33              # runs of 4 tiles (128 / 33)
    assert not _gpu_like_config(64, 8192, 64, 1, 8).get("PERSISTENT")           # 64 rows, runs of 4 < 8
    assert not _gpu_like_config(64, 2048, 128, 1, 32).get("PERSISTENT")         # 64 rows, runs of 4 < 8
    ragged = _gpu_like_config(64, 32768, 128, 4, 32, ragged=True)
    assert not ragged.get("PERSISTENT")
    assert kmod._persistent_config(ragged, 64, 32768, 4, 32, 132, 128, 8)["PERSISTENT"] == 33  # 4 prompts: runs of 16
    assert kmod._persistent_config(ragged, 64, 4096, 4, 64, 132, 128, 8)["PERSISTENT"] == 16   # 8 prompts: runs of 4
    assert kmod._persistent_config(ragged, 64, 2048, 4, 64, 132, 128, 8) is None               # runs of 2
    assert not _gpu_like_config(64, 2048, 128, 4, 8).get("PERSISTENT")          # 32 tiles: per-tile programs
    assert not _gpu_like_config(64, 131072, 128, 8, 8).get("PERSISTENT")        # 8 heads × 64 rows > 256
    assert _gpu_like_config(32, 131072, 128, 8, 8)["PERSISTENT"] == 33           # 8 × 32 = 256 rows
    assert not _gpu_like_config(2048, 131072, 128, 4, 8).get("PERSISTENT")      # not a window


@pytest.mark.parametrize("layout", ["varlen", "paged"])
def test_persistent_window_varlen_and_paged(layout, monkeypatch):
    """The persistent window kernel over packed and paged keys: every reduction and group reduction against the
    float64 reference, repeated calls bitwise equal, the paged padding written (outputs poisoned), a sequence
    without queries or keys, and more programs than a short sequence has key tiles."""
    from test_colreduce_paged import paged_case
    from test_colreduce_varlen import per_sequence_reference
    _poison_empty(monkeypatch)
    q_lens, k_lens = [8, 3, 0, 5, 0], [70, 30, 12, 5, 0]
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 1, 16, "NHD", seed=9)
    cfg = dict(_pick_config(max(q_lens), 16, 4, True), WINDOW=True, PERSISTENT=3, BLOCK_M=16, BLOCK_N=16)
    for reduction, group in (("sum", "mean"), ("max", "max"), ("mean", "sum"), ("sum", None), ("max", "mean"),
                             ("mean", None)):
        ref = per_sequence_reference(q, k, cu_q, cu_k, reduction, True, group)
        kw = dict(is_causal=True, scale=0.25, group_reduce=group, cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens),
                  max_seqlen_k=max(k_lens), config=cfg)
        if layout == "varlen":
            out = colreduce_triton(q, k, reduction, cu_seqlens_k=cu_k, **kw)
            assert rel_err(out, ref) < TOL[torch.float32], (reduction, group)
            assert torch.equal(out, colreduce_triton(q, k, reduction, cu_seqlens_k=cu_k, **kw)), (reduction, group)
            continue
        paged = colreduce_triton(q, cache, reduction, block_table=table, seqlens_k=seqlens, **kw)
        assert torch.equal(paged, colreduce_triton(q, cache, reduction, block_table=table, seqlens_k=seqlens, **kw))
        start = 0
        for b, n in enumerate(k_lens):
            assert not torch.isnan(paged[b]).any() and (paged[b, :, n:] == 0).all(), (reduction, group, b)
            if n and q_lens[b]:
                assert rel_err(paged[b, :, :n].T, ref[start:start + n]) < TOL[torch.float32], (reduction, group, b)
            start += n


@pytest.mark.parametrize("hs", [2, 4])
@pytest.mark.parametrize("layout", ["varlen", "paged"])
def test_head_split_varlen_and_paged(layout, hs, monkeypatch):
    """The long column kernel with each kv head's group split over hs programs: the last program of a key tile to
    finish combines the partials in the kernel. Run twice: its counters are back at zero after a call (the second
    call's bits equal the first's), and nothing past each sequence's keys is left unwritten (outputs poisoned)."""
    from test_colreduce_paged import paged_case
    from test_colreduce_varlen import per_sequence_reference
    _poison_empty(monkeypatch)
    q_lens, k_lens = [8, 30, 0, 5], [70, 30, 12, 5]
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 1, 16, "NHD", seed=7)
    cfg = dict(_pick_config(max(q_lens), 16, 4, True), WINDOW=False, BLOCK_M=16, BLOCK_N=32, HEAD_SPLIT=hs)
    for reduction, group in (("sum", "mean"), ("max", "max"), ("mean", "sum"), ("sum", None)):
        ref = per_sequence_reference(q, k, cu_q, cu_k, reduction, True, group)
        if layout == "varlen":
            out = colreduce_triton(q, k, reduction, is_causal=True, scale=0.25, group_reduce=group,
                                   cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_lens),
                                   max_seqlen_k=max(k_lens), config=cfg)
            assert rel_err(out, ref) < TOL[torch.float32], (reduction, group)
            again = colreduce_triton(q, k, reduction, is_causal=True, scale=0.25, group_reduce=group,
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_lens),
                                     max_seqlen_k=max(k_lens), config=cfg)
            assert torch.equal(out, again), (reduction, group)
            continue
        paged = colreduce_triton(q, cache, reduction, is_causal=True, scale=0.25, group_reduce=group,
                                 cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
                                 block_table=table, seqlens_k=seqlens, config=cfg)
        again = colreduce_triton(q, cache, reduction, is_causal=True, scale=0.25, group_reduce=group,
                                 cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
                                 block_table=table, seqlens_k=seqlens, config=cfg)
        assert torch.equal(paged, again), (reduction, group)
        start = 0
        for b, n in enumerate(k_lens):
            assert not torch.isnan(paged[b]).any() and (paged[b, :, n:] == 0).all()
            if n and q_lens[b]:
                assert rel_err(paged[b, :, :n].T, ref[start:start + n]) < TOL[torch.float32], (reduction, group, b)
            start += n


def test_scratch_is_shared_by_calls_and_grows(monkeypatch):
    """Calls on one stream share one scratch buffer for the row statistics (a call allocates only its output); a
    larger call replaces it. Every call matches the float64 reference, and repeating the first call after the larger
    one gives the same bits (nothing depends on what the scratch held before)."""
    _poison_empty(monkeypatch)
    small, big = (1, 4, 2, 16, 200, 16), (2, 4, 2, 40, 300, 16)
    q1, k1 = rand_qk(small, torch.float32, seed=1)
    q2, k2 = rand_qk(big, torch.float32, seed=2)
    kw = dict(is_causal=True, scale=0.25, group_reduce="mean")
    first = colreduce_triton(q1, k1, "sum", **kw)
    assert rel_err(first, reference(q1, k1, "sum", True, "mean", scale=0.25)) < TOL[torch.float32]
    (bufs,) = kmod._scratch_bufs.values()
    held = bufs[0].numel()
    second = colreduce_triton(q2, k2, "sum", **kw)
    assert rel_err(second, reference(q2, k2, "sum", True, "mean", scale=0.25)) < TOL[torch.float32]
    assert len(kmod._scratch_bufs) == 1 and bufs[0].numel() > held
    assert torch.equal(colreduce_triton(q1, k1, "sum", **kw), first)


@pytest.mark.skipif(DEVICE == "cpu", reason="direct launches exist only for compiled kernels (GPU)")
def test_direct_launch_matches_jit_dispatch():
    """The "direct" variant launches the compiled kernels without Triton's dispatch after their first call:
    bitwise the results of "new" (the same kernels), on the first call and on the cached ones."""
    from colreduce_kvprune import colreduce_varlen
    # (1, 4, 4, 1, 1000, 128) and (1, 32, 8, 2, 8192, 128): the saved scores' column pass
    cases = [((1, 32, 8, 64, 4096, 128), "mean"), ((1, 8, 2, 300, 300, 64), "mean"), ((1, 4, 4, 1, 1000, 128), None),
             ((1, 32, 8, 2, 8192, 128), "mean")]
    for shape, group in cases:
        q, k = rand_qk(shape, torch.float16, seed=4)
        kw = dict(is_causal=True, scale=shape[-1] ** -0.5, group_reduce=group)
        ref = colreduce_triton(q, k, "sum", variant="new", **kw)
        # (1, 8, 2, 300, 300, 64): the long kernel with each group split over programs, combined in the kernel
        assert rel_err(ref, reference(q, k, "sum", True, group)) < TOL[torch.float16], shape
        for _ in range(3):
            assert torch.equal(colreduce_triton(q, k, "sum", variant="direct", **kw), ref), shape
    lens = [700, 64, 2000]
    k = torch.randn(sum(lens), 2, 128, device=DEVICE, dtype=torch.float16)
    q = torch.randn(3 * 16, 8, 128, device=DEVICE, dtype=torch.float16)
    cu_k = torch.tensor([0, 700, 764, 2764], device=DEVICE, dtype=torch.int32)
    cu_q = torch.arange(0, 64, 16, device=DEVICE, dtype=torch.int32)
    before = kmod._VARIANT
    try:
        for window in (16, 2):                       # the window kernel; the saved scores (8 heads / 2 kv heads)
            kw = dict(max_seqlen_q=window, max_seqlen_k=2000, is_causal=True, group_reduce="max")
            qw = q.view(3, 16, 8, 128)[:, -window:].reshape(3 * window, 8, 128)
            cu_qw = torch.arange(0, 4 * window, window, device=DEVICE, dtype=torch.int32)
            kmod.set_launch_variant("new")
            ref = colreduce_varlen(qw, k, cu_qw, cu_k, "sum", **kw)
            kmod.set_launch_variant("direct")
            for _ in range(3):
                assert torch.equal(colreduce_varlen(qw, k, cu_qw, cu_k, "sum", **kw), ref), window
    finally:
        kmod.set_launch_variant(before)
    assert any(kmod._direct_launchers.values()), "no direct launcher was built"


def _direct_path_on_cpu(monkeypatch) -> list:
    """The direct path run on CPU tensors: the device queries of a CUDA call answered with constants, Triton's JIT
    dispatch (_launch) and the launchers _build_direct makes replaced by recorders. Returns the record: (kernel name,
    "jit" | "direct", pointer arguments)."""
    record = []
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench)
    try:
        from host_python import stub_device     # the device queries, as benchmarks/host_python.py answers them
    finally:
        sys.path.remove(bench)
    stub_device(kmod, lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))
    monkeypatch.setattr(kmod, "_interpreting", lambda: False)
    monkeypatch.setattr(kmod, "_direct_launchers", {})
    monkeypatch.setattr(kmod, "_scratch_bufs", {})
    monkeypatch.setattr(kmod, "_VARIANT", "direct")

    def jit(fn, grid, args, kw):
        record.append((fn.fn.__name__, "jit", args))
        return fn

    def build(fn, compiled, kw, grid, ints):
        def launch(stream, pointers, qk_scale):
            record.append((fn.fn.__name__, "direct", pointers))
        return launch
    monkeypatch.setattr(kmod, "_launch", jit)
    monkeypatch.setattr(kmod, "_build_direct", build)
    return record


def test_direct_path_passes_the_jit_launch_pointers_as_addresses(monkeypatch, fused_windows):
    """A signature's later calls launch with the pointer arguments of its first (JIT) launch, each tensor as its
    address (Triton's launcher then skips data_ptr() and the driver's pointer query per tensor): dense window, full
    causal, lse given, saved scores, varlen, paged, and the one-launch window kernel. CPU tensors and recorded
    launches (no kernel runs), on any machine; on the GPU, test_direct_launch_matches_jit_dispatch (and for the
    one-launch kernel test_colreduce_fused.py) compares the results bitwise."""
    from colreduce_kvprune import colreduce_paged, colreduce_varlen
    record = _direct_path_on_cpu(monkeypatch)
    # ops' check that backend='triton' has CUDA tensors or the interpreter; the kernels read the variable once at
    # import, so on a GPU machine this lets the CPU tensors through ops and changes nothing else
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h = dict(dtype=torch.float16)
    q64, k8k = torch.randn(1, 8, 64, 128, **h), torch.randn(1, 2, 700, 128, **h)
    q2 = torch.randn(1, 8, 2, 128, **h)
    qf, kf = torch.randn(1, 8, 300, 64, **h), torch.randn(1, 2, 300, 64, **h)
    lse = torch.randn(1, 8, 64)
    cu_q, cu_k = torch.tensor([0, 16, 32], dtype=torch.int32), torch.tensor([0, 300, 700], dtype=torch.int32)
    qv, kv = torch.randn(32, 8, 128, **h), torch.randn(700, 2, 128, **h)
    args, pkw = _paged_batch(16)
    pargs = [a.cpu() for a in args]          # once: on a GPU machine each .cpu() would be a new copy at a new address
    cases = {
        "window": lambda: colreduce_triton(q64, k8k, "sum", is_causal=True, scale=0.1, group_reduce="mean"),
        "saved scores": lambda: colreduce_triton(q2, k8k, "sum", is_causal=True, scale=0.1, group_reduce="mean"),
        "full causal": lambda: colreduce_triton(qf, kf, "sum", is_causal=True, scale=0.1, group_reduce="mean"),
        "lse given": lambda: colreduce_triton(q64, k8k, "max", is_causal=True, scale=0.1, group_reduce=None, lse=lse),
        "varlen": lambda: colreduce_varlen(qv, kv, cu_q, cu_k, "sum", max_seqlen_q=16, max_seqlen_k=400,
                                           is_causal=True, group_reduce="max", backend="triton"),
        "paged": lambda: colreduce_paged(*pargs, "sum", **pkw, backend="triton"),
    }
    kernels_seen = set()

    def fused_window():            # the one-launch window kernel, switched on from this call on (set_fused_windows)
        if not kmod.FUSED_WINDOWS:
            fused_windows(True)
        return colreduce_triton(q64, k8k, "mean", is_causal=True, scale=0.1, group_reduce=None)
    cases["fused window"] = fused_window
    fused_windows(False)           # the other cases' two passes (on a GPU the short windows would otherwise fuse)
    _check_direct_pointers(cases, record, kernels_seen)
    assert {"_row_stats_kernel", "_window_column_kernel", "_long_column_kernel", "_saved_column_kernel",
            "_fused_window_kernel"} <= kernels_seen, kernels_seen


def _check_direct_pointers(cases: dict, record: list, kernels_seen: set) -> None:
    """Each case's first call goes through the JIT dispatch, its next two through the direct launchers, with the
    same pointers as ints (the call's own output standing in for its address)."""
    for name, call in cases.items():
        record.clear()
        out = call().data_ptr()                    # each call's own output (also the unused placeholders' address)
        first = [(fn, ["out" if a == out else a for a in
                       (a.data_ptr() if isinstance(a, torch.Tensor) else a for a in pointers)])
                 for fn, how, pointers in record]
        assert first and all(how == "jit" for _, how, _ in record), name
        for _ in range(2):
            record.clear()
            out = call().data_ptr()
            assert all(how == "direct" for _, how, _ in record), name
            assert len(record) == len(first), name
            for (fn, jit_args), (dfn, _, pointers) in zip(first, record):
                assert fn == dfn, name
                assert all(p is None or type(p) is int or type(p).__name__ == "TensorDescriptor" for p in pointers), \
                    (name, fn, [type(p).__name__ for p in pointers])
                assert ["out" if p == out else p for p in pointers] == jit_args[:len(pointers)], (name, fn)
                kernels_seen.add(fn)


@pytest.mark.skipif(DEVICE == "cpu" or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch: compute capability 9 and later")
def test_pdl_config_gives_the_same_bits():
    """A config's PDL (the column kernel launched before the row pass ends, waiting on it in the kernel) changes
    when the column pass starts, not what it computes: bitwise the results without it, on repeated calls (a missing
    wait would read a row lse mid-write and show as a changed or varying result), and within the float16 tolerance
    of float64. Dense window (persistent), saved scores, full causal (head split; at 4096 queries on sm_90 the
    Gluon row pass and the REDO launch precede the column pass), varlen and paged windows; the lse given (no row
    pass: PDL off)."""
    sms = kmod._sm_count(torch.cuda.current_device())

    def default(m, n, d, g, programs, ragged=False):
        return kmod._fit_config(kmod._pick_config(m, d, g, True), m, n, g, programs, sms, d, ragged)
    for shape in ((1, 32, 8, 64, 8192, 128), (1, 32, 8, 2, 8192, 128), (1, 32, 8, 2048, 2048, 128),
                  (1, 32, 8, 4096, 4096, 128), (2, 8, 2, 300, 300, 64)):
        B, Hq, Hkv, M, N, D = shape
        q, k = rand_qk(shape, torch.float16, seed=7)
        cfg = default(M, N, D, Hq // Hkv, B * Hkv)
        kw = dict(is_causal=True, scale=D ** -0.5, group_reduce="mean")
        ref = colreduce_triton(q, k, "sum", config=cfg, **kw)
        for _ in range(3):
            assert torch.equal(colreduce_triton(q, k, "sum", config=dict(cfg, PDL=True), **kw), ref), shape
        if M * N <= 2048 * 2048:
            assert rel_err(ref, reference(q, k, "sum", True, "mean", scale=D ** -0.5)) < TOL[torch.float16], shape
    lse = masked_logits(q, k, True, D ** -0.5)[0].logsumexp(-1).float()    # the last shape's
    ref = colreduce_triton(q, k, "sum", lse=lse, config=cfg, **kw)
    assert torch.equal(colreduce_triton(q, k, "sum", lse=lse, config=dict(cfg, PDL=True), **kw), ref)
    (q, cache, table, cu_q, seqlens), _ = _paged_batch(16)
    cfg = default(16, 700, 128, 4, 3 * 2, ragged=True)
    kw = dict(kw, scale=128 ** -0.5)

    def paged(config):
        return colreduce_triton(q, cache, "sum", block_table=table, cu_seqlens_q=cu_q, seqlens_k=seqlens,
                                max_seqlen_q=16, max_seqlen_k=700, config=config, **kw)
    ref = paged(cfg)
    for _ in range(3):
        assert torch.equal(paged(dict(cfg, PDL=True)), ref)


def _paged_batch(window=16):
    """A paged batch of three sequences (one without queries), padded to 700 keys: the window kernel (window 16), the
    saved scores' column pass (window 1)."""
    from test_colreduce_paged import paged_case
    q, _, cache, table, cu_q, _, seqlens = paged_case([window, min(5, window), 0], [700, 64, 300], 8, 2, 128, "NHD",
                                                      torch.float16, seed=3)
    return (q, cache, table, cu_q, seqlens), dict(max_seqlen_q=window, max_seqlen_k=700, is_causal=True,
                                                   group_reduce="mean")


@pytest.mark.skipif(DEVICE == "cpu", reason="direct launches and CUDA graphs need the GPU")
@pytest.mark.parametrize("window", [16, 1])
def test_direct_paged_launch_and_cuda_graph_capture(window):
    """Paged: "direct" gives the bits of "new", with the padding past each sequence's keys written as zeros by the
    kernel (the output is not cleared first). Captured in a CUDA graph, a call takes its own scratch: a replay gives
    the same bits, also after eager calls of other shapes ran on the stream (and replaced its shared scratch)."""
    from colreduce_kvprune import colreduce_paged
    args, kw = _paged_batch(window)
    before = kmod._VARIANT
    try:
        kmod.set_launch_variant("new")
        ref = colreduce_paged(*args, "sum", **kw)
        kmod.set_launch_variant("direct")
        for _ in range(3):
            assert torch.equal(colreduce_paged(*args, "sum", **kw), ref)
        assert not torch.isnan(ref).any() and (ref[1, :, 64:] == 0).all() and (ref[2] == 0).all()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                  # warm up off the default stream, as torch's docs advise
            colreduce_paged(*args, "sum", **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = colreduce_paged(*args, "sum", **kw)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, ref)
        q, k = rand_qk((1, 32, 8, 2048, 2048, 128), torch.float16, seed=6)     # a larger scratch on this stream
        colreduce_triton(q, k, "sum", is_causal=True, scale=128 ** -0.5, group_reduce="mean")
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, ref)
    finally:
        kmod.set_launch_variant(before)


@pytest.mark.parametrize("splits", [2, 5])
def test_row_pass_combines_its_splits(splits, monkeypatch):
    """With the key axis split, the last row-pass program of each (row block, sequence × kv head) combines the
    splits' partials into the lse (an atomic count per row block; no combine launch): several row blocks, kv heads,
    sequences and splits, equal to the float64 reference and to the "old" variant's torch combine; a second call
    gives the same bits (the counters are back at zero, as the test then checks)."""
    _poison_empty(monkeypatch)
    monkeypatch.setattr(kmod, "_num_splits", lambda *a, **k: splits)
    shape = (2, 4, 2, 24, 150, 16)                   # G·M = 48 rows per kv head: 3 row blocks of 16
    q, k = rand_qk(shape, torch.float32, seed=5)
    cfg = dict(_gpu_like_config(24, 150, 16, 2, 4), BLOCK_R=16, BLOCK_N1=16, BLOCK_N=32, stages1=1, stages=1)
    assert kmod._plan(24, 150, 16, 2, 2, 2, True, "new", 1, cfg)[2] == splits
    kw = dict(is_causal=True, scale=0.25, group_reduce="mean", config=cfg)
    ref = reference(q, k, "sum", True, "mean")
    first = colreduce_triton(q, k, "sum", variant="new", **kw)
    assert rel_err(first, ref) < TOL[torch.float32]
    assert rel_err(first, colreduce_triton(q, k, "sum", variant="old", **kw)) < 1e-6
    assert torch.equal(colreduce_triton(q, k, "sum", variant="new", **kw), first)
    counters = [bufs[1] for bufs in kmod._scratch_bufs.values() if bufs[1] is not None]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_row_pass_far_logit(splits, is_causal, monkeypatch):
    """The row pass sums exp2(s − c) with one offset c per row, taken from the row's first key tile of its split
    (+8), and falls back to a running max for a row block where that sum overflows. Here the even query rows score
    key 100 (past the first tile of every split) ~300 log2 units above the rest of their keys: their sums overflow,
    and their row blocks, odd rows with ordinary scores among them, must still match the float64 reference, with
    and without the key axis split, causal and not."""
    _poison_empty(monkeypatch)
    monkeypatch.setattr(kmod, "_num_splits", lambda *a, **k: splits)
    B, Hq, Hkv, M, N, D = 1, 4, 2, 160, 160, 16
    q, k = rand_qk((B, Hq, Hkv, M, N, D), torch.float32, device="cpu", seed=11)
    scale = 0.25
    q[:, :, 0::2, 0] = 1.0
    q[:, :, 1::2, 0] = 0.0
    k[:, :, 100, :] = 0.0
    k[:, :, 100, 0] = 300 / (scale * math.log2(math.e))     # 300 in log2 units for the even rows, 0 for the odd
    q, k = q.to(DEVICE), k.to(DEVICE)
    cfg = dict(_gpu_like_config(M, N, D, 2, 2), BLOCK_R=32, BLOCK_N1=32, BLOCK_N=32, stages1=1, stages=1)
    plan = kmod._plan(M, N, D, 2, B, Hkv, is_causal, "new", 1, cfg)
    assert plan[2] == splits and all(not s0 <= 100 < s0 + 32 for s0 in range(0, N, plan[3]))  # never a first tile
    ref = reference(q, k, "sum", is_causal, "mean", scale=scale)
    out = colreduce_triton(q, k, "sum", is_causal=is_causal, scale=scale, group_reduce="mean", config=cfg,
                           variant="new")
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_row_pass_k_descriptor(dtype, monkeypatch):
    """The row pass of long prompts (more than 128 queries) reads K through a tensor descriptor (TMA on sm_90+, and
    under the interpreter) where K is dense or varlen, row-major and 16-byte aligned, else with its own loads: both
    equal the float64 reference and each other. Cases: D 80 (the box is 128 wide: zeros past D), N not a multiple
    of the key tile (zeros past N), varlen tiles that run into the next sequence's keys (masked), K transposed
    from (B, N, Hkv, D) and K at an odd element offset (no descriptor), windows and paged K (never)."""
    _poison_empty(monkeypatch)
    from colreduce_kvprune import colreduce_varlen
    tma_here = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    dev = -1 if DEVICE == "cpu" else torch.cuda.current_device()

    def both(call, k, max_m):
        monkeypatch.setattr(kmod, "K_TMA", True)
        assert kmod._k_tma(k, False, dev, max_m) == tma_here
        on = call()
        monkeypatch.setattr(kmod, "K_TMA", False)
        off = call()
        return on, off

    q, k = rand_qk((2, 2, 2, 130, 140, 80), dtype, seed=7)
    kw = dict(is_causal=True, scale=80 ** -0.5, group_reduce="mean", variant="new")
    ref = reference(q, k, "sum", True, "mean")
    on, off = both(lambda: colreduce_triton(q, k, "sum", **kw), k, 130)
    assert rel_err(on, ref) < TOL[dtype] and rel_err(off, ref) < TOL[dtype] and rel_err(on, off) < 1e-6

    lens, qlens = [140, 9, 45], [130, 9, 5]
    torch.manual_seed(8)
    kv = torch.randn(sum(lens), 2, 32, device=DEVICE, dtype=dtype)
    qv = torch.randn(sum(qlens), 4, 32, device=DEVICE, dtype=dtype)
    cu_k = torch.tensor([0, 140, 149, 194], device=DEVICE, dtype=torch.int32)
    cu_q = torch.tensor([0, 130, 139, 144], device=DEVICE, dtype=torch.int32)
    vkw = dict(max_seqlen_q=130, max_seqlen_k=140, is_causal=True, group_reduce=None, backend="triton")
    on, off = both(lambda: colreduce_varlen(qv, kv, cu_q, cu_k, "sum", **vkw), kv, 130)
    for i in range(3):
        qs, ks = qv[cu_q[i]:cu_q[i + 1]], kv[cu_k[i]:cu_k[i + 1]]
        want = reference(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], "sum", True, None)[0].T
        for got in (on, off):
            assert rel_err(got[cu_k[i]:cu_k[i + 1]], want) < TOL[dtype], i

    monkeypatch.setattr(kmod, "K_TMA", True)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)              # (B, Hkv, N, D) with the strides of (B, N, Hkv, D)
    flat = torch.empty(k.numel() + 1, device=DEVICE, dtype=dtype)
    ko = flat[1:].view(k.shape).copy_(k)                             # one element off 16-byte alignment
    for other in (kt, ko):
        assert not kmod._k_tma(other, False, dev, 130)
    if dtype == torch.float16:                                       # (the pointer path computes; once is enough)
        assert rel_err(colreduce_triton(q, ko, "sum", **kw), ref) < TOL[dtype]
    assert not kmod._k_tma(k, True, dev, 130)                        # paged: never
    assert not kmod._k_tma(k, False, dev, 128)                       # a window: never


def test_launch_lengths_of_whole_prompts(monkeypatch):
    """launch_lengths(..., whole=True), the engine-start warm-up's lengths for policies scoring with every query
    (H2O: vllm/warmup.py score_whole_prompts): the query length is the key length, so the tiles change with both.
    Planned as on the H200 (132 SMs): every prompt length in the range launches as one of the returned lengths does
    (its launch key with max_m = n), the returned ones all differently, the tile changes at 4096 and 8192 queries
    among them; with whole=False the same range at a 32-query window gives other lengths."""
    monkeypatch.setattr(kmod, "_interpreting", lambda: False)
    shape = (128, 4, 1, 8, True, kmod._VARIANT, 132, "sum", "mean", True, False, 1, torch.bfloat16, False)
    kw = dict(is_causal=True, reduction="sum", group_reduce="mean", dtype=torch.bfloat16, device="cuda", sms=132)
    got = kmod.launch_lengths(0, 300, 20000, 128, 4, 1, 8, whole=True, **kw)
    keys = [kmod._launch_key(n, n, *shape) for n in got]
    assert got[0] == 304 and len(set(keys)) == len(keys) > 4     # candidates from the first multiple of 16
    assert kmod._launch_key(4096, 4096, *shape) != kmod._launch_key(4095, 4095, *shape)
    assert kmod._launch_key(8192, 8192, *shape) != kmod._launch_key(8191, 8191, *shape)
    rng = __import__("random").Random(0)
    for n in [4095, 4096, 8191, 8192, 20000] + [rng.randrange(300, 20001) for _ in range(300)]:
        assert kmod._launch_key(n, n, *shape) in keys, n
    assert got != kmod.launch_lengths(32, 300, 20000, 128, 4, 1, 8, **kw)


def _column_kernels(monkeypatch) -> list:
    """The column kernels launched from now on (their names), every call through Triton's dispatch."""
    from test_colreduce_fused import _launches
    return _launches(monkeypatch, lambda fn, grid, kw: None if fn is kmod._row_stats_kernel else fn.__name__,
                     jit_only=True)


def test_save_scores_rule():
    """Saved scores where the group rows' fp32 scores per key (G·M·4 bytes) are at most a quarter of K's (D · its
    element size): windows of 1–4 queries at GQA 4, D 128, 16-bit inputs; and where the call's scores over B ·
    max_seqlen_k positions fit 64 MiB (a paged batch's positions are padded to its longest prompt); never with the
    switch off."""
    n = 8 * 131072                                                                # one 128k prompt, 8 kv heads
    assert kmod._save_scores(4, 1, 128, torch.float16, n) and kmod._save_scores(4, 4, 128, torch.bfloat16, n)
    assert kmod._save_scores(8, 2, 128, torch.float16, n) and kmod._save_scores(4, 8, 128, torch.float32, n // 2)
    assert not kmod._save_scores(4, 5, 128, torch.float16, 1) and not kmod._save_scores(4, 16, 128, torch.float16, 1)
    assert not kmod._save_scores(4, 4, 64, torch.float16, 1) and kmod._save_scores(2, 4, 64, torch.float16, 1)
    assert not kmod._save_scores(4, 4, 128, torch.float16, n + 1)                 # 64 MiB and 16 bytes of scores
    try:
        kmod.set_saved_scores(False)
        assert not kmod._save_scores(4, 1, 128, torch.float16, 1)
    finally:
        kmod.set_saved_scores(True)
    recipe = kmod._recipe(1, 131072, 128, 4, 1, 8, True, "new", 132, "sum", "mean", False, False, 1, torch.float16,
                          False, False)
    assert recipe[0]["SAVE"] and recipe[5]["SAVE"] and recipe[4] == (1024, 8)   # 128-key tiles × 8 kv heads
    # a paged batch of 16 prompts padded to 128k at window 4: 16 × 128k positions × 8 kv heads × 16 rows × 4 bytes
    assert not kmod._recipe(4, 131072, 128, 4, 16, 8, True, "new", 132, "sum", "mean", True, True, 16,
                            torch.float16, False, False)[0].get("SAVE")
    for lse_given, variant in ((True, "new"), (False, "old")):                  # no row pass / the old path
        assert not kmod._recipe(1, 8192, 128, 4, 1, 8, True, variant, 132, "sum", "mean", False, False, 1,
                                torch.float16, False, lse_given)[0].get("SAVE")


# (B, Hq, Hkv, M, N, D), float32: two key splits combined (N > 128 under the interpreter) and one; rows that see no
# key (M > N, causal)
SAVED_SHAPES = {"M1-N150-g4": (2, 8, 2, 1, 150, 32), "M3-N90-g2": (1, 4, 2, 3, 90, 32),
                "M4-N2-g1": (1, 2, 2, 4, 2, 16), "M2-N200-g3": (1, 6, 2, 2, 200, 32)}


@pytest.mark.parametrize("shape", SAVED_SHAPES.values(), ids=SAVED_SHAPES.keys())
def test_saved_scores_match_float64(shape, monkeypatch, fused_windows):
    """The saved-scores column pass (the row pass stores its scores, _saved_column_kernel reduces them) against
    float64, every reduction and group combine, causal and not; outputs pre-filled with NaN."""
    fused_windows(False)      # the two passes whatever the default (the interpreter would fuse any dtype)
    _poison_empty(monkeypatch)
    launched = _column_kernels(monkeypatch)
    q, k = rand_qk(shape, torch.float32, seed=5)
    scale = 1 / math.sqrt(shape[-1])
    for causal in (True, False):
        for reduction, group in (("sum", "mean"), ("max", None), ("mean", "max"), ("max", "max"), ("sum", "sum"),
                                 ("mean", None)):
            out = colreduce_triton(q, k, reduction, is_causal=causal, scale=scale, group_reduce=group)
            assert launched.pop() == "_saved_column_kernel"
            ref = reference(q, k, reduction, causal, group)
            assert rel_err(out, ref) < TOL[torch.float32], (causal, reduction, group)


def test_saved_scores_off_gives_the_same_columns(monkeypatch, fused_windows):
    """set_saved_scores(False): the window kernel reads K again, to the same values up to rounding."""
    fused_windows(False)      # the two passes whatever the default (the interpreter would fuse any dtype)
    launched = _column_kernels(monkeypatch)
    q, k = rand_qk((1, 8, 2, 2, 150, 32), torch.float32, seed=6)
    saved = colreduce_triton(q, k, "sum", is_causal=True, scale=0.2, group_reduce="mean")
    try:
        kmod.set_saved_scores(False)
        again = colreduce_triton(q, k, "sum", is_causal=True, scale=0.2, group_reduce="mean")
    finally:
        kmod.set_saved_scores(True)
    assert launched == ["_saved_column_kernel", "_window_column_kernel"]
    assert rel_err(saved, again.double()) < TOL[torch.float32]


@pytest.mark.parametrize("paged", [False, True], ids=["varlen", "paged"])
def test_saved_scores_varlen_and_paged(paged, monkeypatch, fused_windows):
    """Packed and paged prompts (a ragged batch with an empty window and a window longer than its keys): the saved
    scores of each sequence at its own key positions, against the torch backend in float64."""
    fused_windows(False)      # the two passes whatever the default (the interpreter would fuse any dtype)
    from test_colreduce_paged import paged_case

    from colreduce_kvprune import colreduce_paged, colreduce_varlen
    _poison_empty(monkeypatch)
    launched = _column_kernels(monkeypatch)
    q_lens, k_lens = [2, 0, 1, 2], [150, 20, 33, 1]
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 8, 2, 32, "NHD", seed=3)
    for reduction, group in (("sum", "mean"), ("max", None), ("mean", "sum")):
        ref = colreduce_varlen(q.double(), k.double(), cu_q, cu_k, reduction, is_causal=True, group_reduce=group,
                               backend="torch")
        if paged:
            out = colreduce_paged(q, cache, table, cu_q, seqlens, reduction, is_causal=True, group_reduce=group,
                                  backend="triton")
            from test_colreduce_paged import unpack
            ref = unpack(ref, k_lens, max(k_lens))
        else:
            out = colreduce_varlen(q, k, cu_q, cu_k, reduction, is_causal=True, group_reduce=group, backend="triton")
        assert launched.pop() == "_saved_column_kernel"
        assert rel_err(out, ref) < TOL[torch.float32], (reduction, group)


@pytest.mark.parametrize("coop_pdl", [(False, False), (True, False), (False, True)])
def test_compiled_launch_passes_what_triton_launcher_would(coop_pdl):
    """kernels/launch.py calls Triton's C launch function itself, skipping CudaLauncher.__call__'s Python: with
    the arguments that __call__ would pass it, exactly, for the installed Triton (a recording C function stands in;
    no GPU). For a release whose form it does not know, and for a launcher that needs scratch, it calls the
    launcher as CompiledKernel.run is called."""
    import triton
    from triton import knobs
    from triton.backends.nvidia.driver import CudaLauncher

    from colreduce_kvprune.kernels import launch as lmod
    c_calls, wrapper_calls = [], []

    class Spy(CudaLauncher):                    # the launcher, its __call__ recorded; its fields set by hand
        def __call__(self, *a):
            wrapper_calls.append(a)
            if not self.global_scratch_size:
                super().__call__(*a)
    launcher = Spy.__new__(Spy)
    launcher.__dict__.update(launch=lambda *a: c_calls.append(a), global_scratch_size=0, global_scratch_align=1,
                             profile_scratch_size=0, profile_scratch_align=1, num_ctas=1,
                             launch_cooperative_grid=coop_pdl[0], launch_pdl=coop_pdl[1],
                             arg_annotations=("annotations",), kernel_signature=b"signature")

    class Compiled:
        run, function, packed_metadata = launcher, 0xF00, (4, 1, 1024)
    args = (0x7000, 0x8000, 3, 1 << 40, 0.125, True, 64)   # pointers, ints, the scale, constexprs
    as_run = (2, 3, 4, 99, 0xF00, (4, 1, 1024), None, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook,
              *args)                                        # what CompiledKernel.run is given
    launcher(*as_run)
    through_wrapper = c_calls.pop()
    wrapper_calls.clear()
    assert lmod._form(triton.__version__) is not None, f"Triton {triton.__version__}: no raw form (launch.py)"
    raw = lmod.compiled_launch(Compiled)
    raw(2, 3, 4, 99, *args)
    # the same, but the hooks: both chains empty, so None (the C function then calls neither)
    hooks = [i for i, a in enumerate(through_wrapper)
             if a is knobs.runtime.launch_enter_hook or a is knobs.runtime.launch_exit_hook]
    assert len(hooks) == 2 and not knobs.runtime.launch_enter_hook.calls and not knobs.runtime.launch_exit_hook.calls
    assert c_calls == [tuple(None if i in hooks else a for i, a in enumerate(through_wrapper))] and not wrapper_calls
    c_calls.clear()
    profiler = object()                                   # a hook registered after the launch was built
    knobs.runtime.launch_enter_hook.add(profiler)
    try:
        raw(2, 3, 4, 99, *args)
    finally:
        knobs.runtime.launch_enter_hook.remove(profiler)
    assert c_calls == [tuple(None if i == hooks[1] else a for i, a in enumerate(through_wrapper))]
    c_calls.clear()
    lmod.compiled_launch(Compiled, "9.9.0")(2, 3, 4, 99, *args)          # a release it does not know
    assert wrapper_calls == [as_run] and c_calls == [through_wrapper]
    wrapper_calls.clear()
    launcher.global_scratch_size = 16                                     # a kernel that needs scratch
    lmod.compiled_launch(Compiled)(2, 3, 4, 99, *args)
    assert wrapper_calls == [as_run]


def test_offsets_past_32_bits_are_refused(monkeypatch):
    """The kernels' element offsets within q, k, the lse and the output are 32-bit: a tensor whose last element is
    2**31 or more past its first is refused with an error that names it, before any launch (a dense K of 3 batches
    2**30 elements apart crashed the interpreter: batch 2's offset wrapped around). The storage is allocated but
    never touched."""
    def launch(*args):
        raise AssertionError("launched past the check")
    monkeypatch.setattr(kmod, "_launch", launch)
    big = torch.empty(2**31 + 4096, dtype=torch.float16, device=DEVICE)
    q = torch.randn(3, 2, 4, 16, dtype=torch.float16, device=DEVICE)
    k = big.as_strided((3, 1, 16, 16), (2**30, 256, 16, 1))
    with pytest.raises(ValueError, match=r"^k \(3, 1, 16, 16\) with strides \(1073741824, 256, 16, 1\) has elements 2\*\*31"):
        colreduce(q, k, "sum", is_causal=True, backend="triton")
    with pytest.raises(ValueError, match=r"q \(3, 2, 4, 16\).*32-bit"):
        colreduce(big.as_strided((3, 2, 4, 16), (2**30, 64, 16, 1)), k[:, :, :8], "sum", is_causal=True,
                  backend="triton")


def test_offset_limit_edges(monkeypatch):
    """What _check_extents measures, at a lowered limit: the offset of each tensor's last element from its first
    (through its strides: a strided view's is past its numel), refused at the limit and taken one below it; the
    output's element count. Wired into the call: a paged cache is not measured (its blocks are addressed with
    64-bit offsets), the output is."""
    from test_colreduce_paged import paged_case
    one = torch.zeros(1, 1, 1, 16, device=DEVICE)
    views = {"q": torch.zeros(2, 3, 5, 16, device=DEVICE),                  # last element at 479
             "k": torch.zeros(40, 1, 2, 16, device=DEVICE)[::3],            # (14, 1, 2, 16): 13·96 + 16 + 15 = 1279
             "lse": torch.zeros(9, 2, device=DEVICE).T}                     # (2, 9) strides (1, 2): 1 + 16 = 17
    last = {"q": 479, "k": 1279, "lse": 17}
    for name, t in views.items():
        args = dict(q=one, k=one, lse=None)
        args[name] = t
        for limit, refused in ((last[name], True), (last[name] + 1, False)):
            monkeypatch.setattr(kmod, "_OFFSET_LIMIT", limit)
            call = lambda: kmod._check_extents(args["q"], args["q"].stride(), (args["k"], args["k"].stride()),  # noqa: E731
                                               args["lse"], 1)
            if refused:
                with pytest.raises(ValueError, match="^" + re.escape(f"{name} {tuple(t.shape)}")):
                    call()
            else:
                call()
    monkeypatch.setattr(kmod, "_OFFSET_LIMIT", 100)
    kmod._check_extents(one, one.stride(), None, None, 100)
    with pytest.raises(ValueError, match="^the output would hold 101 elements"):
        kmod._check_extents(one, one.stride(), None, None, 101)
    q, k = torch.randn(1, 2, 4, 16, device=DEVICE), torch.randn(1, 1, 8, 16, device=DEVICE)
    lse = torch.zeros(1, 2, 400, device=DEVICE)[:, :, :4]                  # last element at 400 + 3
    monkeypatch.setattr(kmod, "_OFFSET_LIMIT", 200)
    with pytest.raises(ValueError, match=r"^lse \(1, 2, 4\) with strides \(800, 400, 1\)"):
        colreduce(q, k, "sum", is_causal=True, lse=lse, backend="triton")
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case([3, 1], [40, 20], 2, 1, 16, "NHD", seed=2)
    monkeypatch.setattr(kmod, "_OFFSET_LIMIT", 2 * 2 * 40)                 # the cache is larger, q and the output not
    assert cache.numel() > kmod._OFFSET_LIMIT >= q.numel()
    out = colreduce_paged(q, cache, table, cu_q, seqlens, "sum", is_causal=True, backend="triton")
    ref = colreduce_varlen(q.double(), k.double(), cu_q, cu_k, "sum", is_causal=True, backend="torch")
    assert rel_err(out[0, :, :40].T, ref[:40]) < TOL[torch.float32]
    monkeypatch.setattr(kmod, "_OFFSET_LIMIT", 2 * 2 * 40 - 1)
    with pytest.raises(ValueError, match="^the output would hold 160 elements"):
        colreduce_paged(q, cache, table, cu_q, seqlens, "sum", is_causal=True, backend="triton")
