"""Host ops of the vLLM plugin's per-layer prune path: how many aten ops (each one a kernel launch, or a view's
dispatch, and ~10–15 µs of host time on the H200 machine) `compaction.select_kept` + `compaction.gather_kept` run
per layer, the way the engine's layers call them (the plan's device tensors, NaN flags left on the device:
nan_flags=[]). CPU only, no timing: a layer's host time on a GPU machine is about (ops × per-op host cost).

What is counted: every aten op dispatched while select_kept and gather_kept run (a TorchDispatchMode), EXCEPT the
ops inside the one colreduce_varlen call (wrapped: its own op count depends on the backend — on CPU the torch
reference runs, on a GPU one Triton launch path — and is not what this measures). Views (aten ops that launch no
kernel: view, slice, expand, permute, ...) are counted too and also shown on their own. The plan is built by
`compaction.plan_prefills` once per step (its ops are not counted: once per step, not per layer), as
benchmarks/prune_path.py does on CUDA, and one layer runs uncounted first (it makes the per-step tensors that need
the kv head count). The same calls on a GPU dispatch the same ops, bar the colreduce call.

    PYTHONPATH=. python benchmarks/prune_ops.py      # this checkout's package (an editable install elsewhere
                                                     # would win without PYTHONPATH); it prints which one ran
    PYTHONPATH=/tmp/old python benchmarks/prune_ops.py --json before.json   # e.g. `git archive 98e48be` there
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HQ, HKV, D = 32, 8, 64
BLOCK = 16
LENGTHS = {1: [777], 4: [777, 301, 612, 450], 16: [777, 301, 612, 450] * 4}
POLICIES = [  # (label, config)
    ("snapkv", dict(policy="snapkv", budget={"keep_ratio": 0.25}, window=32, sink_tokens=4,
                    pooling={"kind": "max", "kernel": 7})),
    ("snapkv avg per_head=false", dict(policy="snapkv", budget={"keep_ratio": 0.25}, window=32, sink_tokens=4,
                                       pooling={"kind": "avg", "kernel": 7}, per_head=False)),
    ("h2o", dict(policy="h2o", budget={"keep_ratio": 0.25}, window=8, sink_tokens=4)),
    ("tova", dict(policy="tova", budget={"keep_ratio": 0.25}, window=8, sink_tokens=4)),
    ("knorm", dict(policy="knorm", budget={"keep_ratio": 0.25}, window=8, sink_tokens=4)),
    ("streamingllm", dict(policy="streamingllm", budget={"keep_ratio": 0.25}, window=8, sink_tokens=4)),
]


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name; `paused` > 0 stops counting (the colreduce_varlen call)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[func.overloadpacket.__name__] += 1
            if func.is_view:
                self.ops["(views)"] += 1
        return func(*args, **(kwargs or {}))


def count(policy_cfg, lengths, seed=0):
    import colreduce_kvprune
    from colreduce_kvprune.config import load_config
    from colreduce_kvprune.policies import get_policy
    from colreduce_kvprune.vllm import compaction

    config = load_config(policy_cfg)
    policy = get_policy(config)
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    query = torch.randn(T, HQ, D, generator=g)
    key = torch.randn(T, HKV, D, generator=g)
    value = torch.randn(T, HKV, D, generator=g)
    blocks = [-(-n // BLOCK) for n in lengths]
    table = torch.zeros(len(lengths), max(blocks), dtype=torch.int32)
    nxt = 0
    for r, nb in enumerate(blocks):
        table[r, :nb] = torch.arange(nxt, nxt + nb)
        nxt += nb
    starts = [sum(lengths[:r]) for r in range(len(lengths))]
    steps = [(r, s, 0, n, n) for r, (s, n) in enumerate(zip(starts, lengths))]
    plan = compaction.plan_prefills(config, policy, steps, table, BLOCK)[2]
    scale = D ** -0.5

    counter = OpCounter()
    original = colreduce_kvprune.colreduce_varlen
    calls = []

    def wrapped(*args, **kwargs):
        counter.paused += 1
        try:
            calls.append(1)
            return original(*args, **kwargs)
        finally:
            counter.paused -= 1

    def layer():
        idx = compaction.select_kept(policy, plan, query, key, layer=0, scale=scale, backend="torch",
                                     nan_flags=[])
        return idx, compaction.gather_kept(plan, idx, key, value)

    layer()                                          # first call: lazily made per-step tensors, if any
    colreduce_kvprune.colreduce_varlen = wrapped
    try:
        with counter:
            idx = compaction.select_kept(policy, plan, query, key, layer=0, scale=scale, backend="torch",
                                            nan_flags=[])
        select_ops = Counter(counter.ops)
        counter.ops.clear()
        with counter:
            compaction.gather_kept(plan, idx, key, value)
        gather_ops = Counter(counter.ops)
    finally:
        colreduce_kvprune.colreduce_varlen = original
    total = select_ops + gather_ops
    return dict(select=sum(v for k, v in select_ops.items() if k != "(views)"),
                gather=sum(v for k, v in gather_ops.items() if k != "(views)"),
                total=sum(v for k, v in total.items() if k != "(views)"), views=total["(views)"],
                colreduce_calls=len(calls), ops=dict(total))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the rows (with every op's name and count) here")
    ap.add_argument("--verbose", action="store_true", help="print each row's ops by name")
    args = ap.parse_args(argv)
    import colreduce_kvprune
    print(f"package: {colreduce_kvprune.__file__}; torch {torch.__version__}; Hq/Hkv {HQ}/{HKV}, D {D}",
          file=sys.stderr)
    rows = []
    print("| policy | requests | select_kept ops | gather_kept ops | total (of which views) |")
    print("|---|---|---|---|---|")
    for label, cfg in POLICIES:
        for b, lengths in LENGTHS.items():
            r = count(cfg, lengths)
            rows.append(dict(policy=label, requests=b, lengths=lengths, **r))
            print(f"| {label} | {b} | {r['select']} | {r['gather']} | {r['total']} ({r['views']}) |", flush=True)
            if args.verbose:
                print("   ", sorted(r["ops"].items(), key=lambda kv: -kv[1]))
    if args.json:
        json.dump(dict(package=colreduce_kvprune.__file__, torch=torch.__version__, rows=rows),
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
