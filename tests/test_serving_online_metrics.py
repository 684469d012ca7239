"""benchmarks/serving_online.py's reading of vLLM's Prometheus metrics (parse_metrics, MetricsSampler): what the
online benchmark reports as running requests, KV cache usage and preemptions over a rate's span."""
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exposition(running, waiting, usage, preempted, engines=2):
    """Prometheus text as vLLM's server writes it, one label set per engine: counts split across the engines, KV
    usages that average to `usage`."""
    lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
             "# TYPE vllm:num_requests_running gauge"]
    for e in range(engines):
        lab = f'{{engine="{e}",model_name="m"}}'
        lines += [f"vllm:num_requests_running{lab} {running / engines}",
                  f"vllm:num_requests_waiting{lab} {waiting / engines}",
                  f"vllm:num_requests_waiting_by_reason{lab} 99.0",            # not one of ours: ignored
                  f"vllm:kv_cache_usage_perc{lab} {usage * (0.5 + e) / (engines / 2)}",   # mean: usage
                  f"vllm:num_preemptions_total{lab} {preempted / engines}",
                  f"vllm:num_preemptions_created{lab} 1.7e9"]
    return "\n".join(lines) + "\n"


def test_parse_metrics_sums_engines_and_skips_other_names(online):
    got = online.parse_metrics(_exposition(6, 2, 0.5, 4))
    assert got == {"running": 6.0, "waiting": 2.0, "kv_usage": pytest.approx(0.5), "preemptions": 4.0}
    assert online.parse_metrics(_exposition(6, 2, 0.5, 4, engines=1))["kv_usage"] == pytest.approx(0.5)
    assert online.parse_metrics("# only comments\n\nvllm:other 1\n") == {}


def test_sampler_summary_over_a_scripted_span(online):
    states = iter([(0, 0, 0.0, 3), (4, 1, 0.2, 3), (8, 0, 0.6, 5), (2, 0, 0.1, 7)])
    last = [None]

    def fetch():
        try:
            last[0] = next(states)
        except StopIteration:
            pass
        if last[0] is None:
            raise ConnectionError("server gone")
        return _exposition(*last[0])

    s = online.MetricsSampler(fetch, interval=0.05)
    s.start()
    time.sleep(0.3)                       # every state sampled; later samples repeat the last one
    got = s.stop()
    n = got["metrics_samples"]
    assert got["metrics_errors"] == 0 and n >= 5
    assert got["peak_running"] == 8 and got["peak_waiting"] == 1 and got["peak_kv_usage"] == pytest.approx(0.6)
    assert got["preemptions"] == 4                       # the counter's rise over the span: 7 − 3
    run = got["timeline"]["running"]
    assert run[:4] == [0, 4, 8, 2] and set(run[4:]) == {2} and len(run) == n == len(got["timeline"]["t"])
    assert got["mean_running"] == pytest.approx(sum(run) / n)
    assert got["timeline"]["t"] == sorted(got["timeline"]["t"])


def test_sampler_counts_failed_samples(online):
    def fetch():
        raise ConnectionError("refused")

    s = online.MetricsSampler(fetch, interval=0.05)
    s.start()
    time.sleep(0.12)
    got = s.stop()
    assert got["metrics_samples"] == 0 and got["metrics_errors"] >= 2
    assert got["peak_running"] is None and got["preemptions"] is None and got["timeline"]["t"] == []


def test_report_shows_the_online_metrics(tmp_path):
    """serving_report: the online table's metric columns (– where a JSON predates them), and a chart column per
    rate that recorded a timeline, beside the offline workloads'."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import serving_report
    finally:
        sys.path.pop(0)
    tl = {"t": [0.0, 0.5, 1.0], "running": [0.0, 3.0, 1.0], "waiting": [0.0, 1.0, 0.0], "kv_usage": [0.0, 0.25, 0.1]}
    x = {"requests": 4, "span_s": 1.0, "output_tokens_per_s": 10.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2,
         "tpot_p50_s": 0.01, "tpot_p99_s": 0.02, "e2e_p50_s": 0.5, "e2e_p99_s": 0.9}
    online = {"workload": "smoke", "shape": "tiny", "dtype": "float32", "frontend": "server", "requests_per_rate": 4,
              "max_tokens": 8, "rates": [1.0, 2.0],
              "runs": {"vanilla": {"rates": {"1.0": dict(x, peak_running=3.0, mean_running=4 / 3, peak_kv_usage=0.25,
                                                         mean_kv_usage=0.35 / 3, preemptions=2.0, timeline=tl),
                                             "2.0": dict(x)}},
                       "snapkv-0.1": {"error": "exit 1: (EngineCore pid=7) ValueError: no | memory\nRuntimeError: x"}}}
    table = serving_report.online_table(online)
    rows = [r for r in table if r.startswith("| vanilla")]
    assert rows[0].endswith("| 10.0 | 3 / 1.3 | 25.0% / 11.7% | 2 |")
    assert rows[1].endswith("| 10.0 | – / – | – / – | – |")
    # a failed run is one row of the table's width: its error's lines joined, the root cause first, pipes escaped
    failed = [r for r in table if r.startswith("| snapkv-0.1")]
    assert failed == ["| snapkv-0.1 | failed: exit 1: (EngineCore pid=7) ValueError: no \\| memory RuntimeError: x |"
                      + " |" * 7]
    offline = {"workload": "long", "runs": {"vanilla": {"num_blocks": 100, "timeline": {
        "t": [0, 1], "kv_blocks": [5, 7], "running": [1, 2]}}}}
    panels = serving_report._panels([offline, online])
    assert [(p[0], p[1], [name for name, *_ in p[2]], p[3]) for p in panels] == [
        ("long", "KV blocks in use", ["vanilla"], 100), ("online 1.0 req/s", "KV cache usage (%)", ["vanilla"], 100.0)]
    assert panels[1][2][0][2] == [0.0, 25.0, 10.0]
    serving_report.chart([offline, online], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0
