"""Offline vLLM serving runs, unpruned and pruned, on the same prompts, and their comparison.

    job = make_job(model, prompts, max_tokens=32, kv_blocks=512)          # validated before any engine starts
    base = run_in_subprocess(job, None)                                   # VLLM_PLUGINS=none: vanilla vLLM
    pruned = run_in_subprocess(job, load_config("configs/snapkv.yaml"))   # the plugin, additional_config
    report = compare(job, base, pruned)                                   # the numbers `colreduce-kvprune run` prints

Each run gets its own Python process (a fresh engine, a clean plugin state, and `VLLM_PLUGINS=none` for the
baseline). The child builds an `LLMEngine` in-process, adds every request, steps it to the end, and samples vLLM's
own scheduler stats after every step through a stat logger: KV blocks in use (`kv_cache_usage` × pool),
requests running and waiting, preemptions. It reports on its stdout in lines that start with `EVENT_PREFIX`
(progress, then the result); everything else there is vLLM's log.
Greedy decoding with ignore_eos, so both runs produce the same number of tokens and the outputs can be compared.
SGLang runs (`--engine sglang`): serving_sglang.make_sglang_job builds the job; run_in_subprocess and compare take
it as they take a vLLM job.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

EVENT_PREFIX = "@@colreduce-kvprune "
_DECODER = json.JSONDecoder()
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class InputError(ValueError):
    """Bad user input (model folder, prompts, engine sizes), found before any engine starts."""


class RunError(RuntimeError):
    """A serving run failed inside vLLM; the message carries its last error line and where its full log is."""


# ---------------------------------------------------------------------------------------------------- inputs

def read_model_config(model: str | os.PathLike) -> dict:
    """config.json of a local model folder; InputError when the folder or the file is missing or unreadable."""
    path = Path(model)
    if not path.is_dir():
        raise InputError(f"model folder {str(model)!r} does not exist (--model takes a local folder with "
                         "config.json; models are not downloaded)")
    cfg = path / "config.json"
    try:
        return json.loads(cfg.read_text())
    except FileNotFoundError:
        raise InputError(f"model folder {str(model)!r} has no config.json") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {cfg}: {e}") from None


def has_weights(model: str | os.PathLike) -> bool:
    """True when the folder holds weight files (else vLLM loads it with load_format="dummy": random weights)."""
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in Path(model).iterdir())


def model_limits(model_config: dict) -> tuple[int, int | None]:
    """(vocab_size, max positions or None) of a model config.json (multimodal configs: their text_config)."""
    text = model_config.get("text_config") or model_config
    vocab = text.get("vocab_size") or model_config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 8:
        raise InputError("model config.json has no usable vocab_size")
    return vocab, text.get("max_position_embeddings")


def load_prompts(path: str | os.PathLike) -> list[dict]:
    """A JSONL file, one request a line: {"prompt": str} or {"prompt_token_ids": [int, ...]}; blank lines skipped.

    Returns the requests as dicts with exactly one of those keys. InputError names the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts file {str(path)!r}: {e.strerror if isinstance(e, OSError) else e}"
                         ) from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompts file {str(path)!r} line {lineno}"
        try:
            item = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where}: not JSON ({e})") from None
        prompts.append(_check_prompt(item, where))
    if not prompts:
        raise InputError(f"prompts file {str(path)!r} has no prompts")
    return prompts


def _check_prompt(item, where: str) -> dict:
    if not isinstance(item, dict) or len({"prompt", "prompt_token_ids"} & set(item)) != 1:
        raise InputError(f'{where}: expected an object with "prompt" (a string) or "prompt_token_ids" '
                         "(a list of token ids)")
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"]:
            raise InputError(f'{where}: "prompt" must be a non-empty string')
        return {"prompt": item["prompt"]}
    ids = item["prompt_token_ids"]
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise InputError(f'{where}: "prompt_token_ids" must be a non-empty list of non-negative integers')
    return {"prompt_token_ids": ids}


def synthetic_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """`num_prompts` random token-id prompts of `prompt_len` tokens: token 1 (BOS of the tiny models) then ids
    drawn uniformly from [3, vocab_size) (0–2 are pad/bos/eos there)."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, vocab_size) for _ in range(prompt_len - 1)]}
            for _ in range(num_prompts)]


def tokenize_prompts(model: str, prompts: list[dict]) -> list[list[int]]:
    """Token ids of every request (text prompts through the model folder's tokenizer, no special handling)."""
    if all("prompt_token_ids" in p for p in prompts):
        return [p["prompt_token_ids"] for p in prompts]
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - any loader failure is an input problem here
        raise InputError(f"text prompts need a tokenizer, and the model folder {model!r} has none that loads "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass "
                         '"prompt_token_ids" instead') from None
    return [p["prompt_token_ids"] if "prompt_token_ids" in p else tok(p["prompt"])["input_ids"] for p in prompts]


def checked_prompt_ids(model: str, model_config: dict, prompts: list[dict],
                       max_tokens: int) -> tuple[list[list[int]], int, int | None]:
    """(token ids of every request, longest prompt, the model's positions or None), after checking that every id
    is in the vocabulary and that the longest request fits the model's positions."""
    vocab, max_pos = model_limits(model_config)
    ids = tokenize_prompts(model, prompts)
    for i, p in enumerate(ids):
        bad = [t for t in p if t >= vocab]
        if bad:
            raise InputError(f"prompt {i}: token id {bad[0]} is outside the model's vocabulary (size {vocab})")
    longest = max(len(p) for p in ids)
    if max_pos is not None and longest + max_tokens > max_pos:
        raise InputError(f"the longest prompt ({longest} tokens) + --max-tokens {max_tokens} exceeds the model's "
                         f"{max_pos} positions")
    return ids, longest, max_pos


def make_job(model: str, prompts: list[dict], *, max_tokens: int = 32, kv_blocks: int | None = None,
             block_size: int = 32, max_num_seqs: int = 128, dtype: str = "auto", seed: int = 0,
             engine_args: dict | None = None) -> dict:
    """Everything a run needs, checked: the model folder, the prompts as token ids, engine settings.

    Engine settings both runs share: vLLM's defaults (CUDA graphs / torch.compile, chunked prefill, prefix caching,
    async scheduling where the platform has it), max_model_len = longest prompt + max_tokens (rounded up to a
    block), greedy sampling. `kv_blocks` fixes the KV pool
    (num_gpu_blocks_override; one block is vLLM's null block). `engine_args` adds/overrides EngineArgs fields."""
    model_config = read_model_config(model)
    if max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {max_tokens}")
    if block_size < 1 or block_size % 16:
        raise InputError(f"--block-size must be a positive multiple of 16 (32 on CPU), got {block_size}")
    ids, longest, max_pos = checked_prompt_ids(model, model_config, prompts, max_tokens)
    max_model_len = -(-(longest + max_tokens) // block_size) * block_size
    if max_pos is not None:
        max_model_len = min(max_model_len, max_pos)
    if kv_blocks is not None:
        need = -(-(longest + max_tokens) // block_size) + 1
        if kv_blocks < need:
            raise InputError(f"--kv-blocks {kv_blocks} is too small: the longest request ({longest} + {max_tokens} "
                             f"tokens) needs {need - 1} blocks of {block_size} tokens, plus vLLM's null block")
    engine = dict(model=str(Path(model).resolve()), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                  max_model_len=max_model_len, max_num_seqs=max_num_seqs, block_size=block_size,
                  load_format="auto" if has_weights(model) else "dummy", disable_log_stats=False)
    if kv_blocks is not None:
        engine["num_gpu_blocks_override"] = kv_blocks
    engine.update(engine_args or {})
    return {"engine": engine, "prompts": ids, "max_tokens": max_tokens}


# ------------------------------------------------------------------------------------------- one run (child)

class TritonCompiles:
    """Records the Triton JIT compiles of this process while installed (Triton's jit_cache_hook, called before a
    kernel specialisation's compile, and jit_post_compile_hook, after it; both chain to any hook already set):
    (perf_counter at its start, seconds taken, kernel name). A compile in the middle of a run shows as one long
    engine step; this says whose kernel it was. Inductor's generated kernels (vLLM's compiled graphs) do not pass
    through these hooks. A Triton without the hooks records nothing (`available` False). run_engine installs it
    for its whole process (a run's own child), engine start included."""

    def __init__(self):
        self.events, self._open = [], {}
        try:
            from triton import knobs
            self._knobs = knobs.runtime
            self.available = hasattr(self._knobs, "jit_cache_hook")
        except Exception:          # noqa: BLE001 - no Triton, or one without knobs: nothing to record
            self._knobs, self.available = None, False

    def since(self, t0: float) -> list[dict] | None:
        """The events with start times in seconds since t0 (None where nothing could be recorded)."""
        if not self.available:
            return None
        return [{"t": start - t0, "s": took, "kernel": name} for start, took, name in self.events]

    def __enter__(self):
        if self.available:
            self._saved = (self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook)
            before, after = self._saved

            def cache_hook(*args, **kw):
                self._open[id(kw.get("compile", {}).get("key"))] = time.perf_counter()
                return before(*args, **kw) if before else None

            def post_hook(*args, **kw):
                end = time.perf_counter()
                start = self._open.pop(id(kw.get("compile", {}).get("key")), end)
                fn = kw.get("fn")
                self.events.append((start, end - start, getattr(fn, "name", str(fn))))
                return after(*args, **kw) if after else None

            self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = cache_hook, post_hook
        return self

    def __exit__(self, *exc):
        if self.available:
            self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._saved
        return False


def run_engine(job: dict, prune: dict | None, emit: Callable[[dict], None]) -> dict:
    """Run every prompt of `job` through one fresh in-process LLMEngine; return the run's measurements.

    prune: the pruning config as a mapping (passed as additional_config={"kv_prune": prune}), or None.
    emit receives {"event": "started", "engine_start_s"} and {"event": "progress", "done", "total"}."""
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.metrics.loggers import StatLoggerBase

    from .vllm.settings import resolved_settings

    samples: list[tuple[float, float, int, int, int, int]] = []   # (t, kv usage, running, waiting, preempted,
    clock = {"t0": time.perf_counter()}                              # tokens generated)

    class Sampler(StatLoggerBase):
        """Records vLLM's scheduler stats after every engine step."""

        def __init__(self, vllm_config, engine_index=0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                samples.append((time.perf_counter() - clock["t0"], scheduler_stats.kv_cache_usage,
                                scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                iteration_stats.num_preempted_reqs if iteration_stats is not None else 0,
                                iteration_stats.num_generation_tokens if iteration_stats is not None else 0))

        def log_engine_initialized(self):
            pass

    kw = dict(job["engine"])
    if prune is not None:
        kw["additional_config"] = {"kv_prune": prune}
    t_start = time.perf_counter()
    compiles = TritonCompiles().__enter__()      # engine start's compiles too (negative times in the result)
    engine = LLMEngine.from_engine_args(EngineArgs(**kw), stat_loggers=[Sampler])
    engine_start_s = time.perf_counter() - t_start
    num_blocks = engine.vllm_config.cache_config.num_gpu_blocks - 1          # without the null block
    emit({"event": "started", "engine_start_s": engine_start_s, "num_blocks": num_blocks})

    prompts = job["prompts"]
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
    outputs: list[list[int] | None] = [None] * len(prompts)
    first_token_s: list[float | None] = [None] * len(prompts)     # since all requests were added
    finish_s: list[float | None] = [None] * len(prompts)
    samples.clear()
    clock["t0"] = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"req-{i}", {"prompt_token_ids": p}, params)
    done = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(out.request_id.removeprefix("req-"))
            now = time.perf_counter() - clock["t0"]
            if first_token_s[i] is None and out.outputs and out.outputs[0].token_ids:
                first_token_s[i] = now
            if out.finished:
                outputs[i] = list(out.outputs[0].token_ids)
                finish_s[i] = now
                done += 1
                emit({"event": "progress", "done": done, "total": len(prompts)})
    wall_s = time.perf_counter() - clock["t0"]
    compiles.__exit__(None, None, None)

    prune_stats = None
    if prune is not None:
        from colreduce_kvprune.vllm import get_stats, timing

        prune_stats = get_stats().as_dict()
        prune_stats["timing"] = timing.summary()          # KVPRUNE_TIMING=1: the pruning work's share of prefill
    blocks = [round(u * num_blocks) for _, u, *_ in samples]
    per_request = [b / s[2] for b, s in zip(blocks, samples) if s[2] > 0]
    output_tokens = sum(len(o) for o in outputs)
    return {
        "requests": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": output_tokens,
        "num_blocks": num_blocks,
        "block_size": engine.vllm_config.cache_config.block_size,
        "peak_kv_blocks": max(blocks, default=0),
        "mean_blocks_per_running_request": sum(per_request) / len(per_request) if per_request else 0.0,
        "peak_running": max((s[2] for s in samples), default=0),
        "preemptions": sum(s[4] for s in samples),
        "steps": len(samples),
        "engine_start_s": engine_start_s,
        "engine_settings": resolved_settings(engine.vllm_config),
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(prompts) / wall_s if wall_s > 0 else 0.0,
        "ttft_s": first_token_s,
        "tpot_s": [(f - t) / (len(o) - 1) if len(o) > 1 else None
                   for t, f, o in zip(first_token_s, finish_s, outputs)],
        "timeline": {"t": [s[0] for s in samples], "kv_blocks": blocks, "running": [s[2] for s in samples],
                     "waiting": [s[3] for s in samples], "generated": [s[5] for s in samples]},
        "triton_compiles": compiles.since(clock["t0"]),
        "prune_stats": prune_stats,
        "outputs": outputs,
    }


def emit_event(event: dict) -> None:
    """One event line on stdout in a single write: an engine's own processes may log to the same pipe."""
    sys.stdout.flush()
    data = (EVENT_PREFIX + json.dumps(event) + "\n").encode()
    while data:
        data = data[os.write(sys.stdout.fileno(), data):]


def child_main(run: Callable) -> int:
    """A run's process: job JSON on stdin → `run(job, prune, emit)`; events (then the result) on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        result = run(request["job"], request["prune"], emit_event)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which prints one line
        emit_event({"event": "error", "message": f"{type(e).__name__}: {e}"})
        raise
    emit_event({"event": "result", "result": result})
    return 0


def _child_main() -> int:
    """`python -m colreduce_kvprune.serving` (used by run_in_subprocess)."""
    return child_main(run_engine)


# ------------------------------------------------------------------------------------------ one run (parent)

def child_env(prune: bool, base: dict | None = None) -> dict:
    """The environment of a run's process: vLLM's CPU defaults when unset, the scheduler in-process (so the plugin
    summary can be read), KVPRUNE_CONFIG removed (the config goes in additional_config), and VLLM_PLUGINS=none
    for the baseline / our plugin allowed for the pruned run."""
    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.pop("KVPRUNE_CONFIG", None)
    if not prune:
        env["VLLM_PLUGINS"] = "none"
    elif env.get("VLLM_PLUGINS") is not None:
        names = [n for n in env["VLLM_PLUGINS"].split(",") if n and n != "none"]
        env["VLLM_PLUGINS"] = ",".join(names + ["colreduce_kvprune"] * ("colreduce_kvprune" not in names))
    return env


def child_command(module: str) -> list[str]:
    """The command of a run's process: `module` run as __main__, importing this very copy of the package.

    Not `python -m module`: that puts the working directory first on sys.path, and from a source checkout the child
    would import the source tree instead of the installed package the parent runs (the source tree has no
    `colreduce_kvprune.kernels`, which installation maps from kernels/)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    boot = f"import runpy, sys; sys.path[0] = {root!r}; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", boot]


class _Watchdog:
    """Kills a run's process when its engine start or, once the engine is up, its run passes the limit (None: no
    limit), from a thread: a child that stops printing is stopped too. `expired` then says which limit passed.
    The process leads its own process group when limited (`limited`): the group is killed, so the workers of a
    tensor-parallel engine go with it and release the output pipe."""

    @staticmethod
    def limited(timeout: float | None, start_timeout: float | None) -> bool:
        return timeout is not None or start_timeout is not None

    def __init__(self, proc: subprocess.Popen, timeout: float | None, start_timeout: float | None):
        self.proc, self.timeout, self.start_timeout = proc, timeout, start_timeout
        self.group = self.limited(timeout, start_timeout)     # the process leads its own group (see Popen)
        self.t0 = time.monotonic()
        self.deadline = None if start_timeout is None else self.t0 + start_timeout
        self.up_at: float | None = None
        self.expired: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def engine_up(self) -> None:
        if self.up_at is None:
            self.up_at = time.monotonic()
            self.deadline = None if self.timeout is None else self.up_at + self.timeout

    def _watch(self) -> None:
        while not self._done.wait(0.25):
            deadline = self.deadline
            if deadline is None or time.monotonic() <= deadline or self.proc.poll() is not None:
                continue
            if self.up_at is None:
                self.expired = f"the engine did not start within {self.start_timeout:.0f} s"
            else:
                self.expired = (f"timed out after {self.timeout:.0f} s of the run (the engine started in "
                                f"{self.up_at - self.t0:.0f} s)")
            self.kill()
            return

    def kill(self) -> None:
        if self.group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            self.proc.kill()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _read_child(proc, job, payload, watchdog, sampler, on_event, log, logf, tail) -> tuple:
    """Send the child its job, then read its output to the end: events to (result, error), the watchdog and
    on_event; every other line to the log file, the sampler, tail and log."""
    result, error = None, None
    proc.stdin.write(json.dumps({"job": job, "prune": payload}))
    proc.stdin.close()
    for line in proc.stdout:
        if line.startswith(EVENT_PREFIX):
            # raw_decode: another process writing to the same pipe (SGLang's scheduler) may have put its own
            # line right after the event, before the event's newline; that rest is log output
            event, end = _DECODER.raw_decode(line, len(EVENT_PREFIX))
            line = line[end:]
            if event["event"] in ("started", "generating"):
                watchdog.engine_up()
            if event["event"] == "result":
                result = event["result"]
            elif event["event"] == "error":
                error = event["message"]
            elif event["event"] == "generating":
                if sampler is not None:
                    sampler.start()
            elif on_event is not None:
                on_event(event)
            if not line.strip():
                continue
        logf.write(line)
        if sampler is not None:
            sampler(line)
        tail.append(line.rstrip())
        if log is not None:
            log(line.rstrip())
    return result, error


def run_in_subprocess(job: dict, prune: dict | None, on_event: Callable[[dict], None] | None = None, *,
                      log: Callable[[str], None] | None = None, log_dir: str | None = None,
                      timeout: float | None = None, start_timeout: float | None = None) -> dict:
    """Run `job` in a fresh Python process (see `run_engine`); return its result.

    timeout: seconds for the run once its engine is up (the child's "started" event, SGLang's "generating");
    start_timeout: seconds from the process's start to that point (a cold engine start compiles for a minute or
    more, which a run's limit should not have to cover). Past either, the process is killed, whether it prints or
    not, and RunError says which limit it was.

    on_event gets the child's "started" / "progress" events; log gets every other output line (vLLM's log). The
    full log is kept in `log_dir` (a temp folder by default); RunError carries the failing line and that path.
    A job of make_sglang_job (engine_name "sglang") runs serving_sglang's child instead: the config is written next
    to the log as YAML for $KVPRUNE_CONFIG, and the per-step numbers are read from SGLang's log lines."""
    label = "pruned" if prune is not None else "baseline"
    folder = Path(log_dir or tempfile.mkdtemp(prefix="colreduce-kvprune-"))
    log_path = folder / f"{label}.log"
    sglang = job.get("engine_name") == "sglang"
    if sglang:
        from . import serving_sglang

        sampler = serving_sglang.StepSampler()
        payload, events_path = None, None
        if prune is not None:
            from .config import dump_config, load_config

            payload, events_path = str(folder / "pruned-config.yaml"), folder / "pruned-events.jsonl"
            Path(payload).write_text(dump_config(load_config(prune)))
            events_path.unlink(missing_ok=True)
        env = serving_sglang.child_env(payload, None if events_path is None else str(events_path))
        cmd = child_command("colreduce_kvprune.serving_sglang")
    else:
        sampler, payload, env = None, prune, child_env(prune is not None)
        cmd = child_command("colreduce_kvprune.serving")
    tail: deque[str] = deque(maxlen=40)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, bufsize=1,
                                start_new_session=_Watchdog.limited(timeout, start_timeout))
        watchdog = _Watchdog(proc, timeout, start_timeout)
        try:
            result, error = _read_child(proc, job, payload, watchdog, sampler, on_event, log, logf, tail)
        except BaseException:              # Ctrl-C or an error here: its own process group would outlive us
            watchdog.kill()
            raise
        finally:
            watchdog.stop()
        rc = proc.wait()
    if watchdog.expired is not None:
        error = watchdog.expired
    if result is not None and rc == 0:
        return result if sampler is None else dict(result, **sampler.stats())
    if error is None:
        errors = [t for t in tail if "Error" in t or "error" in t]
        error = (errors or list(tail) or [f"exit status {rc}"])[-1]
    raise RunError(f"{label} run failed: {error} (full log: {log_path})")


# ---------------------------------------------------------------------------------------------- comparison

def agreement(base: Sequence[Sequence[int]], pruned: Sequence[Sequence[int]]) -> dict:
    """How far the pruned outputs follow the unpruned ones, prompt by prompt.

    first_token_equal / identical: prompts whose first output token / whole output is equal; tokens_equal: output
    positions with the same token (of tokens_total); common_prefix: per prompt, how many leading tokens agree."""
    if len(base) != len(pruned):
        raise ValueError(f"{len(base)} baseline outputs vs {len(pruned)} pruned outputs")
    prefixes = []
    for a, b in zip(base, pruned):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    return {
        "requests": len(base),
        "first_token_equal": sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(base, pruned)),
        "identical": sum(list(a) == list(b) for a, b in zip(base, pruned)),
        "tokens_equal": sum(x == y for a, b in zip(base, pruned) for x, y in zip(a, b)),
        "tokens_total": sum(max(len(a), len(b)) for a, b in zip(base, pruned)),
        "common_prefix": prefixes,
    }


RATIO_KEYS = ("peak_kv_blocks", "mean_blocks_per_running_request", "peak_running", "wall_s", "output_tokens_per_s")


def compare(job: dict, base: dict, pruned: dict, *, config=None, config_source: str | None = None,
            model_label: str | None = None) -> dict:
    """The report of a baseline and a pruned run of `job`: both runs' measurements (outputs dropped), their
    ratios pruned / baseline, output agreement, and the settings."""
    ratios = {k: (pruned[k] / base[k] if base[k] else None) for k in RATIO_KEYS}
    lengths = [len(p) for p in job["prompts"]]
    engine = job["engine"]
    sglang = job.get("engine_name") == "sglang"
    return {
        "settings": {
            "engine": "sglang" if sglang else "vllm",
            "model": model_label or engine["model_path" if sglang else "model"],
            "load_format": engine["load_format"],
            "requests": len(lengths),
            "prompt_len_min": min(lengths), "prompt_len_max": max(lengths),
            "max_tokens": job["max_tokens"],
            "block_size": 1 if sglang else engine["block_size"],            # SGLang: page size 1, KV in tokens
            "kv_blocks": engine.get("max_total_tokens" if sglang else "num_gpu_blocks_override"),
            "max_num_seqs": engine["max_running_requests" if sglang else "max_num_seqs"],
        },
        "config": config.to_dict() if config is not None else None,
        "config_source": config_source,
        "runs": {"baseline": {k: v for k, v in base.items() if k != "outputs"},
                 "pruned": {k: v for k, v in pruned.items() if k != "outputs"}},
        "ratios": ratios,
        "agreement": agreement(base["outputs"], pruned["outputs"]),
    }


if __name__ == "__main__":
    sys.exit(_child_main())
