"""Measure (issue 19, item 2): what bounds each pass at the two big goal shapes, read from the H200's hardware counters
(Nsight Compute), beside SDPA's forward at the same shape.

Timing alone cannot say why the full causal passes take ~2.3 ms each at 16k against a matmul floor near 1.55 ms:
halving the MUFU's exp2 work (row_pass.py's f16exp) and overlapping the exp2 with an asynchronous wgmma
(gluon_row_pass.py) both left the time where it was. This profiles, once each after a warm-up:
- full causal 32/8, N = 16k, fp16, D 128: the product's two passes (`_row_stats_kernel`, `_long_column_kernel`),
  row_pass.py's variants at the product's row tiles (NCU_ROW_VARIANTS, comma-separated; default the fixed
  offset), and SDPA's forward;
- window GQA 32/8, W = 64, N = 128k: the product's two passes (`_row_stats_kernel`, `_window_column_kernel`).
and reports per kernel: duration, the tensor/XU(MUFU)/FMA/ALU pipes' activity, issue-slot use, achieved occupancy,
L2 and DRAM throughput, and the leading warp-stall reasons (Nsight Compute's raw metrics, whatever the pipe names
are on this version: the summary keeps every metric whose name matches a pattern below).

    python benchmarks/ncu_passes.py --out DIR                 # GPU: runs ncu on --workload, then summarizes
    python benchmarks/ncu_passes.py --summarize DIR/ncu_raw.csv   # anywhere: the summary of a raw CSV again

Writes DIR/ncu_raw.csv (ncu --page raw --csv, every metric of its "full" set) and DIR/ncu_passes.json (the
summary, with the GPU, versions and the ncu command). Not in the product; off CI.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

# metric-name patterns kept in the summary (Nsight Compute's raw names; Hopper's wgmma pipe and the XU's names vary
# by version, so patterns rather than a fixed list)
KEEP = [r"^gpu__time_duration\.sum$", r"^sm__throughput\.avg\.pct_of_peak_sustained_elapsed$",
        r"^sm__pipe_.*tensor.*cycles_active\.avg\.pct_of_peak_sustained_active$",
        r"^sm__inst_executed_pipe_(xu|fma|alu|fmaheavy|fmalite|lsu|uniform)\.avg\.pct_of_peak_sustained_active$",
        r"^sm__pipe_(xu|fma|alu|fmaheavy|shared)_cycles_active\.avg\.pct_of_peak_sustained_active$",
        r"^smsp__issue_active\.avg\.pct_of_peak_sustained_active$",
        r"^sm__warps_active\.avg\.pct_of_peak_sustained_active$", r"^launch__registers_per_thread$",
        r"^launch__occupancy_limit_.*$", r"^launch__shared_mem_per_block.*$", r"^launch__grid_size$",
        r"^lts__throughput\.avg\.pct_of_peak_sustained_elapsed$",
        r"^dram__throughput\.avg\.pct_of_peak_sustained_elapsed$",
        r"^l1tex__throughput\.avg\.pct_of_peak_sustained_active$",
        r"^l1tex__data_bank_conflicts_pipe_lsu_mem_shared.*\.sum$", r"^smsp__inst_executed\.sum$"]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(.+)_per_issue_active\.ratio$")


def _window_ws_runs(torch):
    """NCU_WORKLOAD=window_ws: window 64, GQA 32/8, N = 128k, fp16, lse given: the product's window column kernel
    and benchmarks/gluon_ws_window_pass.py's configs (NCU_WS_CONFIGS, comma-separated; default 2cta_tf,2cta)."""
    import gluon_ws_window_pass as ww
    import ws_window

    from colreduce_kvprune import colreduce
    torch.manual_seed(0)
    q = torch.randn(1, 32, 64, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 8, 131072, 128, device="cuda", dtype=torch.float16)
    lse = torch.randn(1, 32, 64, device="cuda") + math.log(131072)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    runs = [("window 128k lse: product", lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean",
                                                           lse=lse))]
    for config in os.environ.get("NCU_WS_CONFIGS", "2cta_tf,2cta").split(","):
        runs.append((f"window 128k lse: gluon {config}", lambda c=config: ws_window.gluon_dense(
            ww, q, k, lse, "sum", "mean", True, c, sms)))
    return runs


def _causal_column_runs(torch):
    """NCU_WORKLOAD=causal_column: full causal 32/8, N = 16k, fp16, lse given: the product's column pass and
    benchmarks/gluon_ws_causal_column.py's configs (NCU_CC_CONFIGS, comma-separated; default 2cta_q64_s2 and
    1cta_k128_q64: does reading each query chunk for twice the keys lower the L2 throughput and the time?)."""
    import gluon_ws_causal_column as cc
    from prune_path import _bench_kernels

    from colreduce_kvprune import colreduce
    torch.manual_seed(0)
    q = torch.randn(1, 32, 16384, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 8, 16384, 128, device="cuda", dtype=torch.float16)
    lse = _bench_kernels().row_lse(q, k, 1 / math.sqrt(128), True)
    out = torch.empty(1, 8, 16384, device="cuda")
    runs = [("full 16k lse: product column pass", lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean",
                                                                    lse=lse))]
    for config in os.environ.get("NCU_CC_CONFIGS", "2cta_q64_s2,1cta_k128_q64").split(","):
        prep = cc.prepare(lse, 128, torch.float16, config)
        runs.append((f"full 16k lse: gluon {config}", lambda c=config, p=prep: cc.launch(
            q, k, p, out, is_causal=True, mean=False, group_mean=True, config=c)))
    return runs


def _workload():
    """The kernels to profile, each run once inside cudaProfilerStart/Stop after a warm-up call (compiles, tunes)."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import row_pass
    from colreduce_kvprune.kernels import colreduce as kmod

    def shape(Hq, Hkv, M, N, D=128):
        torch.manual_seed(0)
        return (torch.randn(1, Hq, M, D, device="cuda", dtype=torch.float16),
                torch.randn(1, Hkv, N, D, device="cuda", dtype=torch.float16))

    if os.environ.get("NCU_WORKLOAD") == "window_ws":
        return _profile(torch, _window_ws_runs(torch))
    if os.environ.get("NCU_WORKLOAD") == "causal_column":
        return _profile(torch, _causal_column_runs(torch))
    q, k = shape(32, 8, 16384, 16384)
    v = torch.randn_like(k)
    kw = dict(is_causal=True, scale=1 / math.sqrt(128), group_reduce="mean")
    runs = [("full 16k: product both passes", lambda: kmod.colreduce_triton(q, k, "sum", **kw))]
    for variant in os.environ.get("NCU_ROW_VARIANTS", "fixed_offset").split(","):
        runs.append((f"full 16k: row_pass.py {variant} 128x64x4w", lambda v=variant: row_pass.row_lse2(q, k, v)))
    runs.append(("full 16k: SDPA forward", lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True)))
    qw, kw_ = shape(32, 8, 64, 131072)
    runs.append(("window 128k: product both passes", lambda: kmod.colreduce_triton(qw, kw_, "sum", **kw)))
    _profile(torch, runs)


def _profile(torch, runs):
    """Each run once after a warm-up of all, between cudaProfilerStart and Stop."""
    for _, fn in runs:
        fn()
    torch.cuda.synchronize()
    for name, fn in runs:
        print("== profiling:", name, flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def summarize(raw_csv: str) -> list[dict]:
    """Per profiled kernel: its name, the KEEP metrics and the five largest stall reasons (warps stalled per issue)."""
    text = open(raw_csv).read()
    text = text[text.index('"ID"'):] if '"ID"' in text else text       # ncu's own lines before the table
    rows = list(csv.reader(io.StringIO(text)))
    header, units, data = rows[0], rows[1], rows[2:]
    keep = [re.compile(p) for p in KEEP]
    out = []
    for row in data:
        rec = dict(zip(header, row))
        item = {"kernel": rec.get("Kernel Name", "")[:80], "id": rec.get("ID")}
        for name, unit in zip(header, units):
            if any(p.match(name) for p in keep) and rec.get(name, "") not in ("", "n/a"):
                item[name] = rec[name] + (f" {unit}" if unit else "")
        stalls = {}
        for name in header:
            m = STALL.match(name)
            if m and rec.get(name, "") not in ("", "n/a"):
                try:
                    stalls[m.group(1)] = float(rec[name].replace(",", ""))
                except ValueError:
                    pass
        item["stalls_per_issue_top5"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:5])
        out.append(item)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--workload", action="store_true", help="(what ncu runs)")
    ap.add_argument("--summarize", metavar="RAW_CSV")
    args = ap.parse_args(argv)
    if args.workload:
        return _workload()
    if args.summarize:
        print(json.dumps(summarize(args.summarize), indent=1))
        return
    import torch
    import triton
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "ncu_raw.csv")
    ncu = shutil.which("ncu") or (sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")) or ["ncu"])[-1]
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--set", "full", "--page", "raw",
           "--csv", "--log-file", raw, sys.executable, os.path.abspath(__file__), "--workload"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(cmd), rc=proc.returncode, kernels=summarize(raw) if os.path.exists(raw) else [])
    with open(os.path.join(args.out, "ncu_passes.json"), "w") as f:
        json.dump(result, f, indent=1)
    for k in result["kernels"]:
        print(json.dumps(k))


if __name__ == "__main__":
    main()
