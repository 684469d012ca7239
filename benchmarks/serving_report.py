"""Table (markdown) and chart (PNG) of serving benchmark results: benchmarks/serving_gpu.py (offline workloads) and
benchmarks/serving_online.py (Poisson arrivals) JSON files.

    python benchmarks/serving_report.py long.json short.json online.json --md h200_serving.md --png h200_serving.png

The chart has one column per offline workload: KV blocks in use (top) and requests running (bottom) against time,
one line per run. Ratios are against the file's vanilla run.
"""
from __future__ import annotations

import argparse
import json
import sys


def _failed(error: str, width: int = 160) -> str:
    """A failed run's error as one table cell: its lines joined (the root cause first, as the benchmarks write it),
    pipes escaped, cut at width characters."""
    return "failed: " + " ".join(error.split()).replace("|", "\\|")[:width]


def _fmt(x, digits=2):
    return "–" if x is None else (f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}")


def offline_table(report: dict) -> list[str]:
    runs = report["runs"]
    base = runs.get("vanilla", {})
    v = report.get("versions", {})
    lines = [f"### Workload {report['workload']}: {report.get('requests', '?')} requests, {report['shape']}, "
             f"{report['dtype']}, TP {report.get('tensor_parallel_size', 1)} ({v.get('gpu', '?')}, vLLM "
             f"{v.get('vllm', '?')}, torch {v.get('torch', '?')})", "",
             "| run | output tok/s | × vanilla | requests/s | peak running | mean running | preemptions | peak KV "
             "blocks | TTFT p50 / p99 (s) | TPOT p50 / p99 (s) | pruning work / attention | pruning share of "
             "decoder layers |", "|" + "---|" * 12]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | {_failed(r['error'])} |" + " |" * 11)
            continue
        t = (r.get("prune_stats") or {}).get("timing") or {}
        ratio = (r["output_tokens_per_s"] / base["output_tokens_per_s"]
                 if base.get("output_tokens_per_s") else None)
        lines.append(
            f"| {name} | {_fmt(r['output_tokens_per_s'], 1)} | {_fmt(ratio)} | {_fmt(r['requests_per_s'])} | "
            f"{r['peak_running']} | {_fmt(r['mean_running'], 1)} | {r['preemptions']} | "
            f"{_fmt(r['peak_kv_blocks'])} of {_fmt(r['num_blocks'])} | {_fmt(r['ttft_p50_s'])} / "
            f"{_fmt(r['ttft_p99_s'])} | {_fmt(r['tpot_p50_s'], 4)} / {_fmt(r['tpot_p99_s'], 4)} | "
            f"{_pct(t.get('pruning_per_attention'))} | {_pct(t.get('pruning_share_of_decoder_span'))} |")
    return lines


def online_table(report: dict) -> list[str]:
    via = {"server": ", through vLLM's OpenAI server (streamed /v1/completions)",
           "engine": ", through AsyncLLM (no HTTP layer)"}.get(report.get("frontend", "engine"), "")
    lines = [f"### Online: Poisson arrivals, {report['requests_per_rate']} requests per rate, workload "
             f"{report['workload']}, {report['shape']}, {report['dtype']}{via}", "",
             "| run | rate (req/s) | TTFT p50 / p99 (s) | TPOT p50 / p99 (s) | latency p50 / p99 (s) | output tok/s "
             "| peak / mean running | peak / mean KV cache usage | preemptions |",
             "|" + "---|" * 9]
    for name, r in report["runs"].items():
        if "error" in r:
            lines.append(f"| {name} | {_failed(r['error'])} |" + " |" * 7)
            continue
        for rate, x in r["rates"].items():       # the last three from vLLM's metrics (absent in older JSON: –)
            lines.append(f"| {name} | {rate} | {_fmt(x['ttft_p50_s'])} / {_fmt(x['ttft_p99_s'])} | "
                         f"{_fmt(x['tpot_p50_s'], 4)} / {_fmt(x['tpot_p99_s'], 4)} | {_fmt(x['e2e_p50_s'])} / "
                         f"{_fmt(x['e2e_p99_s'])} | {_fmt(x['output_tokens_per_s'], 1)} | "
                         f"{_fmt(_int(x.get('peak_running')))} / {_fmt(x.get('mean_running'), 1)} | "
                         f"{_pct(x.get('peak_kv_usage'))} / {_pct(x.get('mean_kv_usage'))} | "
                         f"{_fmt(_int(x.get('preemptions')))} |")
    return lines


def _int(x):
    return None if x is None else int(round(x))


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def _panels(reports: list[dict]) -> list[tuple[str, str, list[tuple[str, list, list, list]], float | None]]:
    """The chart's columns: (title, KV axis label, [(run, t, kv, running)], KV capacity line or None). An offline
    workload is one column (KV blocks in use); an online report one column per rate whose runs recorded vLLM's
    metrics (KV cache usage in %)."""
    out = []
    for rep in reports:
        if "rates" not in rep:
            lines = [(name, r["timeline"]["t"], r["timeline"]["kv_blocks"], r["timeline"]["running"])
                     for name, r in rep["runs"].items() if "error" not in r]
            cap = next((r["num_blocks"] for r in rep["runs"].values() if "error" not in r), None)
            out.append((rep["workload"], "KV blocks in use", lines, cap))
            continue
        for rate in rep["rates"]:
            lines = []
            for name, r in rep["runs"].items():
                tl = r.get("rates", {}).get(str(float(rate)), {}).get("timeline") if "error" not in r else None
                if tl and tl["t"]:
                    lines.append((name, tl["t"], [None if u is None else 100 * u for u in tl["kv_usage"]],
                                  tl["running"]))
            if lines:
                out.append((f"online {rate} req/s", "KV cache usage (%)", lines, 100.0))
    return out


def chart(reports: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(reports)
    fig, axes = plt.subplots(2, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 7), squeeze=False)
    for col, (title, kv_label, lines, cap) in enumerate(panels):
        for name, t, kv, running in lines:
            axes[0][col].plot(t, kv, label=name)
            axes[1][col].plot(t, running, label=name)
        if cap is not None:
            axes[0][col].axhline(cap, linestyle="--", linewidth=0.8, color="grey")
        axes[0][col].set_title(f"{title}: {kv_label}")
        axes[1][col].set_title(f"{title}: requests running")
        axes[1][col].set_xlabel("seconds")
        axes[0][col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--md")
    p.add_argument("--png")
    a = p.parse_args(argv)
    reports = [json.load(open(f)) for f in a.results]
    lines = []
    for rep in reports:
        lines += (online_table(rep) if "rates" in rep else offline_table(rep)) + [""]
    text = "\n".join(lines)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    print(text)
    if a.png:
        chart(reports, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
