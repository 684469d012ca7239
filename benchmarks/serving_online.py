"""Online serving benchmark: requests arrive as a Poisson process at several rates; TTFT and TPOT percentiles.

    python benchmarks/serving_online.py --rates 1,2 --out online.json                 # on the GPU (8B shape)
    python benchmarks/serving_online.py --shape tiny --workload smoke --rates 4,8 --out smoke.json   # CPU build

Each run (vanilla vLLM with the package disabled, VLLM_PLUGINS=none; the plugin with configs/snapkv.yaml at a keep
ratio) is one engine in its own process: vLLM's AsyncLLM at its defaults (the engine core in its own process, as
`vllm serve` runs it), fed token-id prompts of the workload (benchmarks/serving_gpu.py: same shapes, prompts and
seeds) at each rate in turn, with exponential inter-arrival times (seeded). Per rate: TTFT p50/p99 (submission to
the first output token), TPOT p50/p99 ((last − first token time) / (tokens − 1)), end-to-end latency p50/p99,
output tokens/s over the rate's span. The HTTP layer of vLLM's OpenAI server is not included (same for both runs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))      # the source tree only when the package is not installed

from serving_gpu import SHAPES, WORKLOADS, engine_settings, model_folder, percentile, prompts, prune_config  # noqa


async def _one(engine, i: int, prompt: list[int], params, t_submit: float) -> dict:
    first = None
    n = 0
    async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id=f"r{i}"):
        n = len(out.outputs[0].token_ids)
        if first is None and n:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": None if first is None else first - t_submit, "e2e_s": end - t_submit, "tokens": n,
            "tpot_s": (end - first) / (n - 1) if first is not None and n > 1 else None, "end": end}


async def _run_rates(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    t = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**spec["engine"]))
    start_s = time.perf_counter() - t
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
    out = {"engine_start_s": start_s, "rates": {}}
    try:
        for rate in spec["rates"]:
            rng = random.Random(spec["seed"])
            t0 = time.perf_counter()
            arrival, tasks = 0.0, []
            for i, prompt in enumerate(spec["prompts"]):
                arrival += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
                tasks.append(asyncio.create_task(_one(engine, len(tasks) + 1000 * len(out["rates"]), prompt,
                                                      params, time.perf_counter())))
            res = await asyncio.gather(*tasks)
            span = max(r["end"] for r in res) - t0
            col = {k: [r[k] for r in res] for k in ("ttft_s", "tpot_s", "e2e_s")}
            out["rates"][str(rate)] = {
                "requests": len(res), "span_s": span, "output_tokens_per_s": sum(r["tokens"] for r in res) / span,
                **{f"{k[:-2]}_p{q}_s": percentile(v, q) for k, v in col.items() for q in (50, 99)}}
    finally:
        engine.shutdown()
    return out


def _child(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
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
    p.add_argument("--out")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return _child(*a.child)
    if not a.out:
        p.error("--out is required")

    from colreduce_kvprune.serving import child_env

    model = model_folder(a.shape, a.model_root)
    ids, max_tokens = prompts(a.workload, SHAPES[a.shape]["vocab_size"], a.seed, a.num)
    rates = [float(r) for r in a.rates.split(",")]
    report = {"workload": a.workload, "shape": a.shape, "dtype": a.dtype, "requests_per_rate": len(ids),
              "max_tokens": max_tokens, "rates": rates, "runs": {}}
    for run in a.runs.split(","):
        engine = engine_settings(run, model, max(map(len, ids)), max_tokens, a.dtype, a.gpu_mem)
        engine.pop("disable_log_stats", None)
        prune = prune_config(run, a.min_prompt_tokens)
        if prune is not None:
            engine["additional_config"] = {"kv_prune": prune}
        with tempfile.TemporaryDirectory() as tmp:
            spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
            with open(spec_path, "w") as f:
                json.dump({"engine": engine, "prompts": ids, "max_tokens": max_tokens, "rates": rates,
                           "seed": a.seed}, f)
            env = child_env(prune is not None)
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)      # the engine core in its own process, as served
            try:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec_path, out_path],
                                      env=env, capture_output=True, text=True, timeout=a.timeout)
                if proc.returncode != 0 or not os.path.exists(out_path):
                    report["runs"][run] = {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
                else:
                    with open(out_path) as f:
                        report["runs"][run] = json.load(f)
            except subprocess.TimeoutExpired:
                report["runs"][run] = {"error": f"timed out after {a.timeout} s"}
        r = report["runs"][run]
        if "error" in r:
            print(f"{run:12s} failed: {r['error'][-300:]}", flush=True)
        else:
            for rate, x in r["rates"].items():
                print(f"{run:12s} rate {rate:>5s}/s  TTFT p50 {x['ttft_p50_s']:.3f} s p99 {x['ttft_p99_s']:.3f} s  "
                      f"TPOT p50 {x['tpot_p50_s']:.4f} s p99 {x['tpot_p99_s']:.4f} s  "
                      f"{x['output_tokens_per_s']:.1f} tok/s", flush=True)
        with open(a.out, "w") as f:
            json.dump(report, f)
    return 0 if all("error" not in r for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
