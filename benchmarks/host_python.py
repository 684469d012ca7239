"""The Python part of a call's host time (issue 19: ≤ 30 µs per call), on any machine, GPU or not.

On the H200 (host_parts.py, twenty-third session) a call's host time was ~8 µs of ops.py's checks, ~13 µs of
colreduce_triton's own Python, ~5 µs for torch.empty of the output, ~2 µs of scratch lookup, and ~11 µs per compiled
launch. All but the launches is Python and torch calls that run the same way on CPU tensors. This script runs the
product's direct launch path (kernels/colreduce.py: a signature's later calls launch its compiled kernels through
their launchers) on CPU tensors with the two launchers replaced by no-ops, so what it times is everything of a call
but the launches themselves (and Triton's Python wrapper around them, which is the launch's cost on a GPU host too).

What it stubs: the device queries a CUDA call makes (current device, SM count, raw stream, graph capture: constants),
Triton's JIT dispatch (_launch: the first call of a signature records its _Direct with no-op launchers, offsets as
computed) and the Gluon row pass (off). Torch's CPU allocator stands in for the CUDA caching allocator. The figures
are this machine's; an A/B between two versions of the code in one run is what they are for (--ref DIR: a checkout
of the other version, timed in alternation).

    python benchmarks/host_python.py [--ref DIR] [--calls N] [--out FILE]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time

import torch


def stub_device(kmod, set_attr=setattr):
    """What a CUDA call of the direct path asks of the device, answered with constants (an H200's SM count; no
    graph capture; the Gluon row pass off), so the path runs on CPU tensors. set_attr(obj, name, value): setattr,
    or a test's monkeypatch (tests/test_colreduce_launch.py)."""
    set_attr(torch.cuda, "current_device", lambda: 0)
    set_attr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 0)       # absent from CPU builds of torch
    set_attr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)
    set_attr(kmod, "_sm_count", lambda dev: 132)
    set_attr(kmod, "_ws_device", lambda dev: False)


def _load(root: str | None):
    """(ops, kernels.colreduce) of the installed package, or of the checkout at root (its sources, fresh modules)."""
    if root is not None:
        for name in [n for n in sys.modules if n == "colreduce_kvprune" or n.startswith("colreduce_kvprune.")]:
            del sys.modules[name]
        for name, folder in (("colreduce_kvprune", "colreduce_kvprune"), ("colreduce_kvprune.kernels", "kernels")):
            spec = importlib.util.spec_from_file_location(name, os.path.join(root, folder, "__init__.py"),
                                                          submodule_search_locations=[os.path.join(root, folder)])
            pkg = importlib.util.module_from_spec(spec)
            sys.modules[name] = pkg                 # packaging maps kernels/ to colreduce_kvprune.kernels
            spec.loader.exec_module(pkg)
    ops = importlib.import_module("colreduce_kvprune.ops")
    kmod = importlib.import_module("colreduce_kvprune.kernels.colreduce")
    ops._launcher = kmod.colreduce_triton          # this version's launcher, whatever sys.modules holds later
    if kmod._interpreting():
        raise SystemExit("run without TRITON_INTERPRET: the direct path is the one a GPU call takes")

    def noop_launch(stream, pointers, qk_scale):
        return None
    kmod._launch = lambda fn, grid, args, kw: object()
    kmod._build_direct = lambda fn, compiled, kw, grid, ints: noop_launch
    stub_device(kmod)
    kmod.set_launch_variant("direct")
    return ops, kmod


def _cases(ops):
    """(name, call) at serving shapes of the sweep, fp16 D 128 GQA 32/8, CPU tensors (never read)."""
    h = dict(dtype=torch.float16)
    out = []
    for m, n in ((64, 8192), (512, 512), (4096, 4096)):
        q, k = torch.empty(1, 32, m, 128, **h), torch.empty(1, 8, n, 128, **h)
        out.append((f"dense {m} x {n}", lambda q=q, k=k, m=m, n=n: ops.colreduce(
            q, k, "sum", is_causal=True, group_reduce="mean", backend="triton")))
    q, k = torch.empty(1, 32, 64, 128, **h), torch.empty(1, 8, 8192, 128, **h)
    lse = torch.empty(1, 32, 64)
    out.append(("dense 64 x 8192, lse given", lambda: ops.colreduce(
        q, k, "sum", is_causal=True, group_reduce="mean", lse=lse, backend="triton")))
    cu_q = torch.tensor([0, 64, 128], dtype=torch.int32)
    cu_k = torch.tensor([0, 4096, 12288], dtype=torch.int32)
    qv, kv = torch.empty(128, 32, 128, **h), torch.empty(12288, 8, 128, **h)
    out.append(("varlen 2 x 64 over 4k + 8k", lambda: ops.colreduce_varlen(
        qv, kv, cu_q, cu_k, "sum", max_seqlen_q=64, max_seqlen_k=8192, is_causal=True, group_reduce="mean",
        backend="triton")))
    cache = torch.empty(1024, 16, 8, 128, **h)
    bt = torch.zeros(1, 512, dtype=torch.int32)
    seq = torch.tensor([8192], dtype=torch.int32)
    qp = torch.empty(64, 32, 128, **h)
    cu1 = torch.tensor([0, 64], dtype=torch.int32)
    out.append(("paged 64 over 8k", lambda: ops.colreduce_paged(
        qp, cache, bt, cu1, seq, "sum", max_seqlen_q=64, max_seqlen_k=8192, is_causal=True, group_reduce="mean",
        backend="triton")))
    return out


def _us(fn, calls: int) -> float:
    """Median µs per call over 7 blocks of `calls` calls."""
    blocks = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(blocks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", help="a checkout of the other version, timed in alternation with this one")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args(argv)
    # backend="triton" on CPU tensors passes ops.py's check only under TRITON_INTERPRET=1; set after the kernels
    # module read it at import (so the direct path runs). The check then pays one os.environ lookup (~1 µs here) that
    # a CUDA call does not.
    versions = {"this": _load(None)}
    if a.ref:
        versions["ref"] = _load(a.ref)
    os.environ["TRITON_INTERPRET"] = "1"
    rows = {}
    for rnd in range(a.rounds):
        for label, (ops, kmod) in versions.items():
            for name, fn in _cases(ops):
                fn()                                   # the first call records the signature's _Direct
                rows.setdefault((name, label), []).append(_us(fn, a.calls))
    table = []
    for (name, label), v in rows.items():
        table.append(dict(shape=name, version=label, us=round(min(v), 2), us_rounds=[round(x, 2) for x in v]))
        print(f"{name:32s} {label:5s} {min(v):7.2f} µs  (rounds {', '.join(f'{x:.2f}' for x in v)})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(torch=torch.__version__, python=sys.version.split()[0], rows=table), f, indent=1)


if __name__ == "__main__":
    main()
