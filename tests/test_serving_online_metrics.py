"""benchmarks/serving_online.py's reading of vLLM's Prometheus metrics (parse_metrics, MetricsSampler): what the
online benchmark reports as running requests, KV cache usage and preemptions over a rate's span."""
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def online():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import serving_online
    finally:
        sys.path.pop(0)
    return serving_online


def _exposition(running, waiting, usage, preempted, engines=2):
    """Prometheus text as vLLM's server writes it, one label set per engine (values split across them)."""
    lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
             "# TYPE vllm:num_requests_running gauge"]
    for e in range(engines):
        lab = f'{{engine="{e}",model_name="m"}}'
        lines += [f"vllm:num_requests_running{lab} {running / engines}",
                  f"vllm:num_requests_waiting{lab} {waiting / engines}",
                  f"vllm:num_requests_waiting_by_reason{lab} 99.0",            # not one of ours: ignored
                  f"vllm:kv_cache_usage_perc{lab} {usage / engines}",
                  f"vllm:num_preemptions_total{lab} {preempted / engines}",
                  f"vllm:num_preemptions_created{lab} 1.7e9"]
    return "\n".join(lines) + "\n"


def test_parse_metrics_sums_engines_and_skips_other_names(online):
    got = online.parse_metrics(_exposition(6, 2, 0.5, 4))
    assert got == {"running": 6.0, "waiting": 2.0, "kv_usage": 0.5, "preemptions": 4.0}
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
