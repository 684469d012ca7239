"""A/B in one run (issue 19): the product with the row pass's key tiles through a tensor descriptor (K_TMA, TMA)
against its pointer loads, same process, same inputs, alternated three times per shape so the spread shows.

benchmarks/row_pass.py measured TMA key tiles in its own row pass (2.12–2.16 vs 2.32 ms at full causal 32/8 16k);
the product's row kernel differs (key splits, all heads of a group in one tile, its combine), and its sweep
cannot resolve a few percent of the row pass (ours − ours with lse, two noisy numbers). This times ours (the
default launch path) both ways at full causal 4k/8k/16k, windows of 64 queries at 32k and 128k, one query at 8k,
and a varlen batch, with gpu ms, e2e ms and host µs (benchmarks/kernels.py time3).

    python benchmarks/tma_ab.py --out DIR     # GPU: DIR/tma_ab.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_path import _bench_kernels  # noqa: E402


def _cases():
    """(name, fn) per shape: colreduce over dense or varlen inputs, causal, sum, group mean, fp16, D 128."""
    from colreduce_kvprune import colreduce, colreduce_varlen
    dev, f16 = "cuda", torch.float16
    for name, M, N in (("full 32/8 N=4096", 4096, 4096), ("full 32/8 N=8192", 8192, 8192),
                       ("full 32/8 N=16384", 16384, 16384), ("win64 32/8 N=32768", 64, 32768),
                       ("win64 32/8 N=131072", 64, 131072), ("win1 32/8 N=8192", 1, 8192)):
        torch.manual_seed(0)
        q = torch.randn(1, 32, M, 128, device=dev, dtype=f16)
        k = torch.randn(1, 8, N, 128, device=dev, dtype=f16)
        yield name, lambda q=q, k=k: colreduce(q, k, "sum", is_causal=True, group_reduce="mean")
    lens = [8192, 16384, 24576, 32768]
    cu_k = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)
    cu_q = torch.arange(0, 64 * 5, 64, device=dev, dtype=torch.int32)
    q = torch.randn(64 * 4, 32, 128, device=dev, dtype=f16)
    k = torch.randn(sum(lens), 8, 128, device=dev, dtype=f16)
    yield "varlen 4 prompts 8k-32k win64 32/8", lambda: colreduce_varlen(
        q, k, cu_q, cu_k, "sum", max_seqlen_q=64, max_seqlen_k=max(lens), is_causal=True, group_reduce="mean")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    bk = _bench_kernels()
    from colreduce_kvprune.kernels import colreduce as kmod
    flush = bk._flush_buffer()
    record = bk.experiment_rows(args.out, "tma_ab.json", None)
    for name, fn in _cases():
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
    kmod.K_TMA = True


if __name__ == "__main__":
    main()
