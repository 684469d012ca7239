"""Online serving benchmark: requests arrive as a Poisson process at several rates; TTFT and TPOT percentiles.

    python benchmarks/serving_online.py --rates 1,2 --out online.json                 # on the GPU (8B shape)
    python benchmarks/serving_online.py --shape tiny --workload smoke --rates 4,8 --out smoke.json   # CPU build

Each run (vanilla vLLM with the package disabled, VLLM_PLUGINS=none; the plugin with configs/snapkv.yaml at a keep
ratio) is one engine, fed token-id prompts of the workload (benchmarks/serving_gpu.py: same shapes and prompt
generator) at each rate in turn, with exponential inter-arrival times (seeded). Each rate gets prompts of its own
(seed + 1000 × the rate's index): replaying one rate's prompts at the next would hit vLLM's prefix cache (the
twelfth session's H200 visit measured a TTFT p50 of 34 ms for 16k prompts at the second rate that way). Between
runs every process the run started (server, engine core) is waited for, so the next engine finds the GPU's memory
free. `--frontend server` (the default): vLLM's OpenAI-compatible server (`python -m
vllm.entrypoints.openai.api_server`, what `vllm serve` runs) at its defaults, started with the run's engine arguments
as its command-line flags (the plugin's config through `--additional-config`), and streamed /v1/completions requests
over HTTP, one thread each. `--frontend engine`:
vLLM's AsyncLLM in a child process (the engine core in its own process, as the server runs it), without the HTTP
layer. Per rate: TTFT p50/p99 (submission to the first output token), TPOT p50/p99 ((last − first token time) /
(tokens − 1)), end-to-end latency p50/p99, output tokens/s over the rate's span; and from vLLM's own Prometheus
metrics, sampled every 0.25 s over the rate's span (the server's /metrics; in-process for AsyncLLM): requests
running and waiting and the KV cache usage over time, their peaks and means, and the preemptions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))      # the source tree only when the package is not installed

from serving_gpu import SHAPES, WORKLOADS, engine_settings, model_folder, percentile, prompts, prune_config  # noqa


def _timings(t_submit: float, first: float | None, end: float, n: int) -> dict:
    """One request's timings: submitted at t_submit, first output token at `first` (None: none came), done at end
    with n output tokens."""
    return {"ttft_s": None if first is None else first - t_submit, "e2e_s": end - t_submit, "tokens": n,
            "tpot_s": (end - first) / (n - 1) if first is not None and n > 1 else None, "end": end}


async def _one(engine, i: int, prompt: list[int], params, t_submit: float) -> dict:
    first = None
    n = 0
    async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id=f"r{i}"):
        n = len(out.outputs[0].token_ids)
        if first is None and n:
            first = time.perf_counter()
    return _timings(t_submit, first, time.perf_counter(), n)


def _one_http(port: int, model: str, prompt: list[int], max_tokens: int, t_submit: float) -> dict:
    """One streamed /v1/completions request of token ids; its timings as _one's."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    first, n = None, 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                n += len(choice.get("token_ids") or [])
            if first is None and n:
                first = time.perf_counter()
    return _timings(t_submit, first, time.perf_counter(), n)


# vLLM's Prometheus metrics sampled during a rate (one label set per engine: counts summed, the KV cache usage, a
# fraction of each engine's pool, averaged)
METRICS = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_usage", "vllm:num_preemptions_total": "preemptions"}
_AVERAGED = ("kv_usage",)


def parse_metrics(text: str) -> dict:
    """The METRICS values of a Prometheus text exposition, by their short names (absent ones left out)."""
    out, seen = {}, {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            key = METRICS[name]
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
            seen[key] = seen.get(key, 0) + 1
    for key in _AVERAGED:
        if key in out:
            out[key] /= seen[key]
    return out


class MetricsSampler:
    """Samples `fetch()` (Prometheus text) every `interval` s from a thread, between start() and stop(); stop()
    returns the timeline and its summary: peak and mean running requests (mean over the samples), peak waiting,
    peak and mean KV cache usage (fraction of the pool), preemptions during the span."""

    def __init__(self, fetch, interval: float = 0.25):
        self.fetch, self.interval = fetch, interval
        self.samples: list[dict] = []
        self._done = threading.Event()
        self._thread = None

    def _sample(self, t0: float) -> None:
        try:
            self.samples.append(dict(parse_metrics(self.fetch()), t=time.perf_counter() - t0))
        except Exception as e:        # noqa: BLE001 - a missed sample is reported, not fatal to the run
            self.samples.append({"t": time.perf_counter() - t0, "error": repr(e)[:200]})

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._sample(self._t0)

        def loop():
            while not self._done.wait(self.interval):
                self._sample(self._t0)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        self._sample(self._t0)                    # the state at the end (the last preemptions)
        ok = [x for x in self.samples if "error" not in x]
        col = {k: [x[k] for x in ok if k in x] for k in ("running", "waiting", "kv_usage", "preemptions")}
        return {
            "metrics_samples": len(ok), "metrics_errors": len(self.samples) - len(ok),
            "peak_running": max(col["running"], default=None),
            "mean_running": sum(col["running"]) / len(col["running"]) if col["running"] else None,
            "peak_waiting": max(col["waiting"], default=None),
            "peak_kv_usage": max(col["kv_usage"], default=None),
            "mean_kv_usage": sum(col["kv_usage"]) / len(col["kv_usage"]) if col["kv_usage"] else None,
            "preemptions": col["preemptions"][-1] - col["preemptions"][0] if len(col["preemptions"]) > 1 else None,
            "timeline": {k: [x.get(k) for x in ok] for k in ("t", "running", "waiting", "kv_usage")},
        }


def rate_prompts(workload: str, vocab: int, seed: int, num: int | None, n_rates: int) -> tuple[list, int]:
    """([the prompts of rate 0, of rate 1, ...], max_tokens): each rate its own prompts (seed + 1000 × its index),
    so no rate finds its prompts in vLLM's prefix cache from an earlier rate."""
    per_rate = [prompts(workload, vocab, seed + 1000 * i, num) for i in range(n_rates)]
    return [ids for ids, _ in per_rate], per_rate[0][1]


async def _rates(spec: dict, submit, fetch_metrics=None) -> dict:
    """Each rate in turn: Poisson arrivals of that rate's prompts (spec["prompts"][i] for spec["rates"][i]),
    `submit(index, prompt, t_submit)` an awaitable of _one's result per request; → {rate: summary}.
    fetch_metrics: () → vLLM's Prometheus text, sampled over each rate (MetricsSampler)."""
    out = {}
    for rate, rate_ids in zip(spec["rates"], spec["prompts"], strict=True):
        rng = random.Random(spec["seed"])
        sampler = None if fetch_metrics is None else MetricsSampler(fetch_metrics)
        if sampler is not None:
            sampler.start()
        t0 = time.perf_counter()
        arrival, tasks = 0.0, []
        for prompt in rate_ids:
            arrival += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            tasks.append(asyncio.ensure_future(submit(len(tasks) + 1000 * len(out), prompt, time.perf_counter())))
        res = await asyncio.gather(*tasks)
        span = max(r["end"] for r in res) - t0
        col = {k: [r[k] for r in res] for k in ("ttft_s", "tpot_s", "e2e_s")}
        out[str(rate)] = {
            "requests": len(res), "span_s": span, "output_tokens_per_s": sum(r["tokens"] for r in res) / span,
            **{f"{k[:-2]}_p{q}_s": percentile(v, q) for k, v in col.items() for q in (50, 99)},
            **(sampler.stop() if sampler is not None else {})}
    return out


async def _run_rates(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    t = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**spec["engine"]))
    start_s = time.perf_counter() - t
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
    import prometheus_client           # AsyncLLM's Prometheus stat logger registers its metrics in this process

    try:
        rates = await _rates(spec, lambda i, prompt, t_submit: _one(engine, i, prompt, params, t_submit),
                             lambda: prometheus_client.generate_latest().decode())
    finally:
        engine.shutdown()
    return {"frontend": "engine", "engine_start_s": start_s, "rates": rates}


def cli_args(engine: dict) -> list[str]:
    """EngineArgs fields as vLLM's command-line flags (what `vllm serve` and the api_server module take)."""
    out = []
    for key, value in engine.items():
        flag = key.replace("_", "-")
        if value is True:
            out.append(f"--{flag}")
        elif value is False:
            out.append(f"--no-{flag}")
        elif isinstance(value, dict):
            out += [f"--{flag}", json.dumps(value)]
        else:
            out += [f"--{flag}", str(value)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port: int, log_path: str, timeout: float = 900) -> None:
    """Until the server started as proc answers /health on port; RuntimeError with the end of its log if it exits
    first or is not ready within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                raise RuntimeError(f"the server exited with {proc.returncode} at start:\n{f.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout} s")


def _get_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def stop_server(proc) -> None:
    """Terminate a server process, killing it if it has not exited after 60 s."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# an exception's own line in a log, also behind vLLM's process prefix: "(EngineCore_DP0 pid=7) ValueError: ..."
_EXCEPTION_LINE = re.compile(
    r"^(?:\([^)]*\)\s*)?(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt)(?::|$)")


def exception_lines(text: str, limit: int = 8) -> list[str]:
    """The distinct exception lines of a log, in order (at most `limit`): the first is usually the root cause
    (an engine core's error), the last the wrapper that ended the process ("Engine core initialization failed")."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if _EXCEPTION_LINE.match(line) and line not in out:
            out.append(line)
    return out[:limit - 1] + out[-1:] if len(out) > limit else out


def reap_group(pgid: int, grace: float = 30.0, hard: float = 30.0) -> float | None:
    """Waits until no process is left in process group pgid (a run's server and engine core can outlive its child
    process: the server exits before its engine core has let go of the GPU): SIGTERM, SIGKILL after grace s,
    RuntimeError after grace + hard s. Returns the seconds waited, None when the group was already empty. The next
    engine's start checks the GPU's free memory against its gpu_memory_utilization, so a run must not start while
    the last one still holds its pool."""
    def signal_group(sig) -> bool:            # False: no process left in the group
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False

    if not signal_group(signal.SIGTERM):
        return None
    t0, killed = time.monotonic(), False
    while signal_group(0):
        waited = time.monotonic() - t0
        if waited > grace + hard:
            raise RuntimeError(f"process group {pgid} still has processes {waited:.0f} s after SIGTERM and SIGKILL")
        if waited > grace and not killed:
            killed = True
            signal_group(signal.SIGKILL)
        time.sleep(0.1)
    return time.monotonic() - t0


def server_python() -> list[str]:
    """The interpreter that runs the server, with -P: `python -m` would otherwise put the working directory first on
    sys.path, and from the repository root that is the source tree's colreduce_kvprune, which has no `kernels`
    subpackage (packaging maps kernels/ into it). On the device machine, where the package is installed as a copy, the
    plugin's server died at start of exactly that (ModuleNotFoundError: colreduce_kvprune.kernels, found in the
    thirteenth session's server log). An editable install (CPU CI) hides it."""
    return [sys.executable, "-P"]


async def _run_rates_server(spec: dict, log_path: str) -> dict:
    port = free_port()
    cmd = [*server_python(), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           *cli_args(spec["engine"])]
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    pool = ThreadPoolExecutor(max_workers=max(1, *map(len, spec["prompts"])))   # every request in flight at once
    try:
        wait_ready(proc, port, log_path)
        start_s = time.perf_counter() - t
        loop = asyncio.get_running_loop()
        model = spec["engine"]["model"]
        rates = await _rates(spec, lambda i, prompt, t_submit: loop.run_in_executor(
            pool, _one_http, port, model, prompt, spec["max_tokens"], t_submit), lambda: _get_metrics(port))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_server(proc)
    return {"frontend": "server", "engine_start_s": start_s, "rates": rates}


def _child(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("frontend") == "server":
        result = asyncio.run(_run_rates_server(spec, spec["server_log"]))
    else:
        result = asyncio.run(_run_rates(spec))
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=list(WORKLOADS), default="long")
    p.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    p.add_argument("--num", type=int, default=64, help="requests per rate")
    p.add_argument("--rates", default="1,2", help="arrival rates, requests/s, comma-separated")
    p.add_argument("--runs", default="vanilla,snapkv-0.1")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-mem", type=float, default=None)
    p.add_argument("--min-prompt-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "colreduce-serving-models"))
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (all its rates)")
    p.add_argument("--frontend", choices=("server", "engine"), default="server",
                   help="vLLM's OpenAI server over HTTP (default), or AsyncLLM without the HTTP layer")
    p.add_argument("--out")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return _child(*a.child)
    if not a.out:
        p.error("--out is required")

    from colreduce_kvprune.serving import child_env

    model = model_folder(a.shape, a.model_root)
    rates = [float(r) for r in a.rates.split(",")]
    ids, max_tokens = rate_prompts(a.workload, SHAPES[a.shape]["vocab_size"], a.seed, a.num, len(rates))
    report = {"workload": a.workload, "shape": a.shape, "dtype": a.dtype, "frontend": a.frontend,
              "requests_per_rate": len(ids[0]),
              "max_tokens": max_tokens, "rates": rates, "runs": {}}
    for run in a.runs.split(","):
        engine = engine_settings(run, model, max(len(x) for r in ids for x in r), max_tokens, a.dtype, a.gpu_mem)
        engine.pop("disable_log_stats", None)
        prune = prune_config(run, a.min_prompt_tokens)
        if prune is not None:
            engine["additional_config"] = {"kv_prune": prune}
        server_log = f"{os.path.splitext(a.out)[0]}.{run}.server.log"      # kept beside the report, whole
        with tempfile.TemporaryDirectory() as tmp:
            spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
            with open(spec_path, "w") as f:
                json.dump({"engine": engine, "prompts": ids, "max_tokens": max_tokens, "rates": rates,
                           "seed": a.seed, "frontend": a.frontend, "server_log": server_log}, f)
            env = child_env(prune is not None)
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)      # the engine core in its own process, as served
            # its own process group: a run that times out is killed with the server and engine it started
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec_path, out_path],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                _, err = proc.communicate(timeout=a.timeout)
                if proc.returncode != 0 or not os.path.exists(out_path):
                    log = ""
                    if os.path.exists(server_log):
                        with open(server_log) as f:
                            log = f.read()
                    causes = exception_lines(err + "\n" + log)
                    report["runs"][run] = {
                        "error": f"exit {proc.returncode}: " + ("\n".join(causes) if causes else err[-3000:]),
                        "stderr_tail": err[-3000:], "server_log": server_log if log else None}
                else:
                    with open(out_path) as f:
                        report["runs"][run] = json.load(f)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                report["runs"][run] = {"error": f"timed out after {a.timeout} s"}
            reaped = reap_group(proc.pid)
            if reaped is not None:
                report["runs"][run]["reaped_s"] = reaped
                print(f"{run:12s} waited {reaped:.1f} s for the processes it left (server, engine core)", flush=True)
        r = report["runs"][run]
        if "error" in r:
            print(f"{run:12s} failed: {r['error'][-1500:]}", flush=True)
        else:
            for rate, x in r["rates"].items():
                print(f"{run:12s} rate {rate:>5s}/s  TTFT p50 {x['ttft_p50_s']:.3f} s p99 {x['ttft_p99_s']:.3f} s  "
                      f"TPOT p50 {x['tpot_p50_s']:.4f} s p99 {x['tpot_p99_s']:.4f} s  "
                      f"{x['output_tokens_per_s']:.1f} tok/s  peak running {x.get('peak_running')}  "
                      f"peak KV usage {x.get('peak_kv_usage')}  preemptions {x.get('preemptions')}", flush=True)
        with open(a.out, "w") as f:
            json.dump(report, f)
    return 0 if all("error" not in r for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
