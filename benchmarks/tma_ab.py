"""A/B in one run (issue 19): the product with the row pass's key tiles through a tensor descriptor (K_TMA, TMA)
against its pointer loads, same process, same inputs, alternated three times per shape so the spread shows.

benchmarks/row_pass.py measured TMA key tiles in its own row pass (2.12–2.16 vs 2.32 ms at full causal 32/8 16k);
the product's row kernel differs (key splits, all heads of a group in one tile, its combine), and its sweep
cannot resolve a few percent of the row pass (ours − ours with lse, two noisy numbers). This times ours (the
default launch path) both ways where the product uses the descriptor — full causal 4k/8k/16k dense and a varlen
batch of two full causal prompts (4k, 8k) — with gpu ms, e2e ms and host µs (benchmarks/kernels.py time3). Windows
(≤ 128 queries) never use it (_row_tma_shape), so they are not timed here; each case checks that the descriptor
is really taken (_k_tma), so the A/B cannot quietly compare the pointer loads with themselves.

    python benchmarks/tma_ab.py --out DIR     # GPU: DIR/tma_ab.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_path import _bench_kernels  # noqa: E402


def _cases(lengths=(4096, 8192, 16384)):
    """(name, k, max_m, fn) per shape: colreduce over dense inputs (full causal at each length) and a varlen batch,
    causal, sum, group mean, fp16, D 128."""
    from colreduce_kvprune import colreduce, colreduce_varlen
    dev, f16 = "cuda", torch.float16
    for N in lengths:
        torch.manual_seed(0)
        q = torch.randn(1, 32, N, 128, device=dev, dtype=f16)
        k = torch.randn(1, 8, N, 128, device=dev, dtype=f16)
        yield f"full 32/8 N={N}", k, N, lambda q=q, k=k: colreduce(q, k, "sum", is_causal=True, group_reduce="mean")
    lens = [4096, 8192]
    cu = torch.tensor([0, 4096, 12288], device=dev, dtype=torch.int32)
    q = torch.randn(sum(lens), 32, 128, device=dev, dtype=f16)
    k = torch.randn(sum(lens), 8, 128, device=dev, dtype=f16)
    yield "varlen full causal 4k + 8k 32/8", k, max(lens), lambda: colreduce_varlen(
        q, k, cu, cu, "sum", max_seqlen_q=max(lens), max_seqlen_k=max(lens), is_causal=True, group_reduce="mean")


def _setup(doc, name, argv):
    """An A/B script's command line (--out DIR): benchmarks/kernels.py, the product's kernel module, the L2 flush
    buffer and record (experiment_rows into DIR/name)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    bk = _bench_kernels()
    from colreduce_kvprune.kernels import colreduce as kmod
    return bk, kmod, bk._flush_buffer(), bk.experiment_rows(args.out, name, None)


def main(argv=None):
    bk, kmod, flush, record = _setup(__doc__, "tma_ab.json", argv)
    before = kmod.K_TMA
    for name, k, max_m, fn in _cases():
        kmod.K_TMA = True
        assert kmod._k_tma(k, False, k.get_device(), max_m), (name, "the product does not use the descriptor here")
        outs = {}
        for rep in range(3):
            for tma in (True, False):
                kmod.K_TMA = tma
                outs[tma] = fn()
                t = bk.time3(fn, flush)
                record(dict(shape=name, tma=tma, rep=rep, gpu_ms=t["gpu_ms"], e2e_ms=t["e2e_ms"],
                            host_us=t["host_us"]))
        record(dict(shape=name, rel_diff_tma_vs_pointer=((outs[True] - outs[False]).norm()
                                                         / outs[False].norm()).item()))
    kmod.K_TMA = before


if __name__ == "__main__":
    main()
