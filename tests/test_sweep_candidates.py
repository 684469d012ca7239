"""benchmarks/kernels.py's candidate defaults (_candidate_fns), which the serving sweep times beside ours: the
persistent window pass on packed and paged keys against the float64 reference, so a candidate that a later session
makes the default was exact when it was timed (interpreter on CPU, the GPU where there is one); and the full causal
64-row candidate's config (its shapes are beyond the interpreter)."""
import os
import sys

import pytest
import torch

from test_colreduce import TOL, fused_windows, rel_err  # noqa: F401 (a fixture)
from test_colreduce_launch import _gpu_like_config
from test_colreduce_paged import paged_case
from test_colreduce_varlen import per_sequence_reference


def _kernels_bench():
    """benchmarks/kernels.py through prune_path's loader (benchmarks/ is not a package: imported from its folder)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from prune_path import _bench_kernels
    finally:
        sys.path.pop(0)
    return _bench_kernels()


@pytest.mark.parametrize("mode", ["varlen", "paged"])
def test_ragged_persistent_candidate_matches_float64(mode):
    kb = _kernels_bench()
    q_lens, k_lens = [16, 16, 16], [1200, 530, 40]
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 16, "NHD", seed=3)
    case = dict(q=q, k=k, cache=cache, table=table, cu_q=cu_q, cu_k=cu_k, seqlens=seqlens)
    sh = dict(B=1, M=16, N=max(k_lens), D=16, Hq=q.shape[1], Hkv=k.shape[1], lens=k_lens, mode=mode)
    fns = kb._candidate_fns(sh, case, 2)      # 2 "SMs": 2 programs per sequence × kv head, runs of 10 key tiles
    assert list(fns) == ["ours_persistent", "ours_pdl"]
    ref = per_sequence_reference(q, k, cu_q, cu_k, "sum", True, "mean", scale=16 ** -0.5)
    for name in fns:                          # ours_pdl: PDL (a GPU launch option) is off under the interpreter
        out = fns[name]()
        if mode == "paged":
            assert all((out[b, :, n:] == 0).all() for b, n in enumerate(k_lens))      # padding written
            out = torch.cat([out[b, :, :n].T for b, n in enumerate(k_lens)])
        assert rel_err(out, ref) < TOL[torch.float32], name
    assert list(kb._candidate_fns(dict(sh, M=2048, N=2048, mode="dense", lens=None), {}, 2)) == ["ours_pdl"]


def test_row_candidate_configs(monkeypatch, fused_windows):
    """Full causal M ≥ 8192: the candidate is the default config (as an H200 gets it) with the row pass at 3 stages
    (the default before the TMA key tiles), nothing else changed; 4096 ≤ M < 8192: 128-row tiles at 4 warps and
    4 stages instead of the default's 64-row tiles. Below 8192 keys at D 128 also ours_mid_before: the tiles before
    _fit_config's short-prompt rule (mid=False); below 4k ours_one_split where the plan splits the keys (1024), and for
    windows of 16–128 queries at N ≤ 2048 ours_win_tiles64; nothing else for a chunk of a long prompt, a longer window
    or one query. At every shape ours_pdl: the default's tiles with PDL on; where _fused_tiles takes the window, the
    other way than ours: ours_fused (the one-launch window kernel) with FUSED_WINDOWS off, ours_two_passes with it on
    (a GPU's default), and ours_fused32 where its 64-key tiles leave half the SMs idle (N = 512). (Not run here: these prompts are beyond the
    interpreter; the sweep records each one's difference to the old launch path beside its time.)"""
    kb = _kernels_bench()
    import colreduce_kvprune.kernels.colreduce as kmod
    monkeypatch.setattr(kmod, "_interpreting", lambda: False)
    fused_windows(False)
    sh = dict(B=1, D=128, Hq=32, Hkv=8, mode="dense", lens=None)
    for m in (8192, 16384):
        fns = kb._candidate_fns(dict(sh, M=m, N=m), {}, 132)
        default = _gpu_like_config(m, m, 128, 4, 8)
        assert list(fns) == ["ours_row_s3", "ours_pdl"] and default["stages1"] == 4
        assert fns["ours_pdl"].config == dict(default, PDL=True)
        assert fns["ours_row_s3"].config == dict(default, stages1=3)
    fns = kb._candidate_fns(dict(sh, M=4096, N=4096), {}, 132)
    default = _gpu_like_config(4096, 4096, 128, 4, 8)
    assert list(fns) == ["ours_row128", "ours_mid_before", "ours_pdl"] and default["BLOCK_R"] == 64
    assert fns["ours_row128"].config == dict(default, BLOCK_R=128, warps1=4, stages1=4)
    before = _gpu_like_config(4096, 4096, 128, 4, 8, mid=False)
    assert fns["ours_mid_before"].config == before == dict(default, BLOCK_N=128, stages=2)
    fns = kb._candidate_fns(dict(sh, M=2048, N=2048), {}, 132)
    assert list(fns) == ["ours_mid_before", "ours_pdl"]     # one key split planned already
    assert fns["ours_mid_before"].config == _gpu_like_config(2048, 2048, 128, 4, 8, mid=False)
    fns = kb._candidate_fns(dict(sh, M=1024, N=1024), {}, 132)
    default = _gpu_like_config(1024, 1024, 128, 4, 8)
    assert list(fns) == ["ours_mid_before", "ours_one_split", "ours_pdl"]
    assert kmod._plan(1024, 1024, 128, 4, 1, 8, True, "new", 132, default)[2] == 2
    assert fns["ours_one_split"].config == dict(default, SPLITS=1)
    fns = kb._candidate_fns(dict(sh, M=64, N=512), {}, 132)  # a short window: 64-key tiles of its rows
    default = _gpu_like_config(64, 512, 128, 4, 8)
    assert list(fns) == ["ours_win_tiles64", "ours_pdl", "ours_fused", "ours_fused32"]
    assert fns["ours_fused"].config == dict(default, FUSED=True)
    assert fns["ours_fused32"].config == dict(default, FUSED=True, FUSED_N=32)     # 64 programs of 64 keys: 128
    assert fns["ours_win_tiles64"].config == dict({k: v for k, v in default.items() if k != "PERSISTENT"},
                                                  BLOCK_M=64, BLOCK_N=64, warps=4, stages=3, BLOCK_R=64, warps1=4,
                                                  stages1=3)
    for m, n in ((2048, 16384), (64, 8192), (1, 512)):  # a chunk of a long prompt, a longer window, one query
        fns = kb._candidate_fns(dict(sh, M=m, N=n), {}, 132)
        # PDL, every shape: the default's tiles with PDL on; the one-launch kernel where it fits one wave (one query)
        assert list(fns) == ["ours_pdl"] + (["ours_fused", "ours_fused32"] if m == 1 else []), (m, n)
        assert fns["ours_pdl"].config == dict(_gpu_like_config(m, n, 128, 4, 8), PDL=True)
    fused_windows(True)                                      # ours takes the one launch: the candidate, two passes
    fns = kb._candidate_fns(dict(sh, M=64, N=512), {}, 132)
    assert list(fns) == ["ours_win_tiles64", "ours_pdl", "ours_two_passes", "ours_fused32"]
    assert fns["ours_two_passes"].config == dict(default, FUSED=False)
    assert "ours_fused32" not in kb._candidate_fns(dict(sh, M=64, N=1024), {}, 132)   # 128 programs already


def test_paged_candidate_is_the_row_stages_before(monkeypatch):
    """Paged sweep shapes: ours_paged_before is ours' config with the row pass at the packed K's stages (before
    _paged_stages), and the other candidates build on ours' paged stages; packed shapes have no such candidate.
    (Configs only: these prompts are beyond the interpreter.)"""
    kb = _kernels_bench()
    import colreduce_kvprune.kernels.colreduce as kmod
    monkeypatch.setattr(kmod, "_interpreting", lambda: False)
    sh = dict(B=1, M=64, N=32768, D=128, Hq=32, Hkv=8, lens=[8192, 32768, 16384, 12288], mode="paged")
    case = dict(q=None, k=None, cache=None, table=None, cu_q=None, cu_k=None, seqlens=None)
    fns = kb._candidate_fns(sh, case, 132)
    ours = kmod._plan(64, 32768, 128, 4, 4, 8, True, "new", 132, None, True, True, paged=True)[0]
    assert ours["stages1"] == 5 and fns["ours_pdl"].config == dict(ours, PDL=True)
    assert fns["ours_paged_before"].config == dict(ours, stages1=3)
    assert "ours_paged_before" not in kb._candidate_fns(dict(sh, mode="varlen"), case, 132)


def test_paged_layout_orders_hold_the_same_keys():
    """benchmarks/paged_layout.py's consecutive cache holds the case's keys, each prompt's blocks in order, and the
    product scores it bitwise like the shuffled cache of the same keys (what the GPU run checks before its timings
    can say anything about where the blocks lie); its unpacking of the padded output equals the packed result."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import paged_layout
    finally:
        sys.path.pop(0)
    from colreduce_kvprune import colreduce_paged, colreduce_varlen
    q_lens, k_lens = [8, 8, 8], [70, 33, 16]
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 16, "NHD", seed=5)
    block = cache.shape[1]
    cons, cons_table = paged_layout.consecutive_cache(dict(k=k), k_lens, block)
    assert cons_table[:, 0].tolist() == [0, 5, 8] and cons.shape[0] == sum(-(-n // block) for n in k_lens)
    kw = dict(max_seqlen_q=8, max_seqlen_k=max(k_lens), is_causal=True, group_reduce="mean")
    shuffled = colreduce_paged(q, cache, table, cu_q, seqlens, "sum", **kw)
    ordered = colreduce_paged(q, cons, cons_table, cu_q, seqlens, "sum", **kw)
    assert torch.equal(shuffled, ordered)
    packed = colreduce_varlen(q, k, cu_q, cu_k, "sum", **kw)
    assert rel_err(paged_layout._unpack(ordered, k_lens), packed) < TOL[torch.float32]
