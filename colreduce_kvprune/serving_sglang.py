"""Offline SGLang serving runs for `colreduce-kvprune run --engine sglang` (the vLLM runs live in serving.py).

    job = make_sglang_job(model, prompts, max_tokens=32, kv_tokens=16384)
    base = run_in_subprocess(job, None, engine="sglang")                 # SGLANG_PLUGINS=none: plain SGLang
    pruned = run_in_subprocess(job, config, engine="sglang")             # KVPRUNE_CONFIG=<config YAML>

Each run is its own Python process that starts one `sglang.Engine` (page size 1, radix cache and overlap scheduling
off — what the plugin needs — in both runs), submits every prompt at once, and reports like the vLLM child.
Per-step numbers come from SGLang's own scheduler log, which runs in SGLang's scheduler process: the child sets
`log_level="info"` and `decode_log_interval=1`, so every decode step logs `#running-req` and `#token` (KV slots in
use) and every prefill batch logs `#running-req` / `#queue-req`; retractions are logged as `Retract requests.
#retracted_reqs: N`. The parent reads these lines from the child's output (`StepSampler`). KV numbers are sampled
at decode steps only (a prefill's transient peak, before pruning frees its slots, is not in them). The plugin's
per-request events (KVPRUNE_SGLANG_EVENTS) give the pruned prefills, their prompt and kept tokens, slots freed.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .serving import InputError, checked_prompt_ids, child_main, has_weights, read_model_config

PLUGIN_NAME = "colreduce_kvprune"
DECODE_RE = re.compile(r"Decode batch(?: \[\d+\])?, #running-req: (\d+), #token: (\d+)(?:.*#queue-req: (\d+))?")
PREFILL_RE = re.compile(r"Prefill batch(?: \[\d+\])?, .*#running-req: (\d+), #queue-req: (\d+)")
RETRACT_RE = re.compile(r"Retract requests\. #retracted_reqs: (\d+)")


def make_sglang_job(model: str, prompts: list[dict], *, max_tokens: int = 32, kv_tokens: int | None = None,
                    max_running_requests: int = 128, chunked_prefill_size: int | None = None, dtype: str = "auto",
                    seed: int = 0, engine_args: dict | None = None) -> dict:
    """Everything an SGLang run needs, checked before any engine starts (the model folder, token ids in the
    vocabulary, sizes). kv_tokens fixes the KV pool (SGLang's max_total_tokens; page size 1, so slots = tokens).
    engine_args adds/overrides sglang.Engine keyword arguments."""
    ids, longest, max_pos = checked_prompt_ids(model, read_model_config(model), prompts, max_tokens)
    if kv_tokens is not None and kv_tokens < longest + max_tokens:
        raise InputError(f"the KV pool of {kv_tokens} tokens is too small: the longest request needs "
                         f"{longest} + {max_tokens} tokens")
    engine = dict(model_path=str(Path(model).resolve()), skip_tokenizer_init=True, dtype=dtype, random_seed=seed,
                  context_length=max_pos or longest + max_tokens + 16, max_running_requests=max_running_requests, page_size=1,
                  disable_radix_cache=True, disable_overlap_schedule=True,
                  load_format="auto" if has_weights(model) else "dummy",
                  log_level="info", decode_log_interval=1)
    if chunked_prefill_size is not None:
        engine["chunked_prefill_size"] = chunked_prefill_size
    if kv_tokens is not None:
        engine["max_total_tokens"] = kv_tokens
    engine.update(engine_args or {})
    return {"engine": engine, "prompts": ids, "max_tokens": max_tokens, "engine_name": "sglang"}


def _device_kwargs() -> dict:
    """SGLang's CPU path where there is no CUDA device (what the CPU tests run), else SGLang's defaults."""
    import torch

    if torch.cuda.is_available() and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return {}
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    return dict(device="cpu", attention_backend="torch_native", disable_cuda_graph=True)


# ------------------------------------------------------------------------------------------- one run (child)

def run_engine(job: dict, prune: str | None, emit: Callable[[dict], None]) -> dict:
    """Run every prompt of `job` through one fresh sglang.Engine in this process; its measurements (without the
    per-step ones, which the parent reads from SGLang's log: see StepSampler). prune: the config YAML path
    (set as $KVPRUNE_CONFIG by child_env), or None."""
    import sglang as sgl

    kw = dict(_device_kwargs(), **job["engine"])
    events_path = os.environ.get("KVPRUNE_SGLANG_EVENTS")
    t_start = time.perf_counter()
    llm = sgl.Engine(**kw)
    engine_start_s = time.perf_counter() - t_start
    try:
        info = llm.get_server_info()
        pool = int(info["max_total_num_tokens"])
        emit({"event": "started", "engine_start_s": engine_start_s, "num_blocks": pool})
        prompts = job["prompts"]
        params = {"max_new_tokens": job["max_tokens"], "temperature": 0.0, "ignore_eos": True}
        outputs: list[list[int] | None] = [None] * len(prompts)

        async def one(i: int) -> None:
            out = await llm.async_generate(input_ids=prompts[i], sampling_params=params)
            outputs[i] = list(out["output_ids"])

        async def all_requests() -> None:
            done = 0
            for fut in asyncio.as_completed([one(i) for i in range(len(prompts))]):
                await fut
                done += 1
                emit({"event": "progress", "done": done, "total": len(prompts)})

        emit({"event": "generating"})
        t0 = time.perf_counter()
        llm.loop.run_until_complete(all_requests())
        wall_s = time.perf_counter() - t0
    finally:
        llm.shutdown()
    prune_stats = None
    if prune is not None:
        events = []
        if events_path and os.path.exists(events_path):
            with open(events_path) as f:
                events = [json.loads(line) for line in f if line.strip()]
        prune_stats = {"requests_pruned": len(events),
                       "prompt_tokens": sum(e["prompt_tokens"] for e in events),
                       "kept_tokens": sum(e["kept_tokens"] for e in events),
                       "blocks_freed": sum(e["free_after"] - e["free_before"] for e in events)}
    output_tokens = sum(len(o) for o in outputs)
    return {
        "engine": "sglang",
        "kv_unit": "tokens",
        "requests": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": output_tokens,
        "num_blocks": pool,
        "block_size": 1,
        "engine_start_s": engine_start_s,
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else 0.0,
        "prune_stats": prune_stats,
        "outputs": outputs,
    }


def _child_main() -> int:
    """`python -m colreduce_kvprune.serving_sglang`: as serving's run processes, with SGLang's engine."""
    return child_main(run_engine)


# ------------------------------------------------------------------------------------------ one run (parent)

def child_env(prune_path: str | None, events_path: str | None, base: dict | None = None) -> dict:
    """The environment of an SGLang run's process: SGLANG_PLUGINS=none for the baseline; for the pruned run
    KVPRUNE_CONFIG=<prune_path>, our plugin allowed, and the plugin's events file."""
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("KVPRUNE_CONFIG", None)
    env.pop("KVPRUNE_SGLANG_EVENTS", None)
    if prune_path is None:
        env["SGLANG_PLUGINS"] = "none"
        return env
    env["KVPRUNE_CONFIG"] = prune_path
    if events_path is not None:
        env["KVPRUNE_SGLANG_EVENTS"] = events_path
    if env.get("SGLANG_PLUGINS") is not None:
        names = [n for n in env["SGLANG_PLUGINS"].split(",") if n and n != "none"]
        env["SGLANG_PLUGINS"] = ",".join(names + [PLUGIN_NAME] * (PLUGIN_NAME not in names))
    return env


class StepSampler:
    """Per-step samples from SGLang's scheduler log lines, timed when the parent reads them (after the child's
    "generating" event: `start()`). Decode lines give (requests decoding, KV tokens in use, requests waiting);
    prefill lines are counted as steps; retraction lines add to `retracted`. SGLang logs a decode step after
    freeing the requests it finished, so its KV count can be lower than its request count suggests; steps that
    leave the pool empty (#token 0) are left out of the per-request mean."""

    def __init__(self):
        self.t0: float | None = None
        self.decode: list[tuple[float, int, int, int | None]] = []   # (t, running, KV tokens in use, waiting)
        self.prefill: list[tuple[float, int, int]] = []       # (t, running, waiting)
        self.retracted = 0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        if self.t0 is None:
            return
        t = time.perf_counter() - self.t0
        if m := DECODE_RE.search(line):
            self.decode.append((t, int(m[1]), int(m[2]), None if m[3] is None else int(m[3])))
        elif m := PREFILL_RE.search(line):
            self.prefill.append((t, int(m[1]), int(m[2])))
        elif m := RETRACT_RE.search(line):
            self.retracted += int(m[1])

    def stats(self) -> dict:
        """The per-step fields of a run result (as serving.run_engine's; `preemptions` = SGLang's retractions)."""
        d = self.decode
        per_request = [tokens / running for _, running, tokens, _ in d if running > 0 and tokens > 0]
        return {
            "peak_kv_blocks": max((s[2] for s in d), default=0),
            "mean_blocks_per_running_request": sum(per_request) / len(per_request) if per_request else 0.0,
            "peak_running": max((s[1] for s in d), default=0),
            "preemptions": self.retracted,
            "steps": len(d) + len(self.prefill),
            "timeline": {"t": [s[0] for s in d], "kv_blocks": [s[2] for s in d], "running": [s[1] for s in d],
                         "waiting": [s[3] for s in d]},
        }


if __name__ == "__main__":
    sys.exit(_child_main())
