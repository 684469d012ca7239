"""Opt-in timing of the pruning work inside prefill steps: set KVPRUNE_TIMING=1 in the worker's environment.

For every step that prunes or stashes a chunk, each attention layer records three marks: before vLLM's attention,
after it, and after the plugin's work for that layer (scores, selection, gather of the kept K/V, cache write; or the
stash of a chunk). CUDA events on a GPU (no host sync while the engine runs), the wall clock on CPU. `summary()`
(in the worker's process: with VLLM_ENABLE_V1_MULTIPROCESSING=0, the caller's) gives the totals: the plugin's time
against vLLM's attention of the same layers, and against the span from the first layer's attention to the last
layer's pruning of each step (every decoder layer of the prefill: attention, MLP, norms; not the embedding, the
logits or sampling). Off (the default), the attention path does one attribute read per layer.

Each mark also reads the host clock, so the summary gives the same spans in host time (`*_host_ms`): where the
host time of the plugin's work is as long as its device time, the device waited for the host's launches (a
host-bound step); where it is much shorter, the device time is the kernels' own. Steps that only stash a chunk
(no row at its last chunk) are counted apart (`stash_*`), since their work is different.

Opt-in profile (KVPRUNE_PROFILE_STEPS=N, independent of KVPRUNE_TIMING): torch.profiler over the decoder layers of
N steps that prune with one selection per step (the default path), after skipping the first
KVPRUNE_PROFILE_SKIP (default 2) such steps, from the first layer's attention to the last layer's pruning. Written
to KVPRUNE_PROFILE_OUT (default kvprune_profile.txt, appended, one section per step and worker process): the
step's rows and prompt lengths, its host span, on a GPU the device's busy time in that span (the union of its
kernels' intervals, so idle gaps show), and the ops by self device time and by self host time. Profiling slows
the step; read the shares, not the absolute times.
"""
from __future__ import annotations

import os
import time

ENABLED = os.environ.get("KVPRUNE_TIMING") == "1"
PROFILE_STEPS = int(os.environ.get("KVPRUNE_PROFILE_STEPS") or 0)
PROFILE_SKIP = int(os.environ.get("KVPRUNE_PROFILE_SKIP") or 2)
PROFILE_OUT = os.environ.get("KVPRUNE_PROFILE_OUT") or "kvprune_profile.txt"
_profile = {"active": None, "step": None, "seen": 0, "done": 0, "t0": 0.0}
MAX_STEPS = 10000                           # steps kept (the first ones); a long run stops recording after them
_steps: dict[int, list] = {}                # id(StepPlan) -> [(start, after attention, after pruning)] per layer
_order: list[int] = []
_keep: list = []                            # the StepPlan objects, so that their ids stay unique


def mark(device):
    """(device mark, host clock): a recorded CUDA event on a GPU, else the wall clock, and time.perf_counter()."""
    import torch

    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event, time.perf_counter()
    now = time.perf_counter()
    return now, now


def record(step, start, after_attention, after_pruning) -> None:
    key = id(step)
    if key not in _steps:
        if len(_order) >= MAX_STEPS:
            return
        _steps[key] = []
        _order.append(key)
        _keep.append(step)
    _steps[key].append((start, after_attention, after_pruning))


def _ms(a, b) -> float:
    a, b = a[0], b[0]
    return a.elapsed_time(b) if hasattr(a, "elapsed_time") else (b - a) * 1e3


def _host_ms(a, b) -> float:
    return (b[1] - a[1]) * 1e3


def summary() -> dict | None:
    """Totals over the recorded steps (None when timing is off or nothing was recorded)."""
    if not ENABLED or not _order:
        return None
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tot = dict.fromkeys(("attention", "pruning", "span", "pruning_host", "span_host", "stash", "stash_host"), 0.0)
    layers = stash_steps = 0
    for key, step in zip(_order, _keep):
        marks = _steps[key]
        layers += len(marks)
        pruning = sum(_ms(b, c) for _, b, c in marks)
        pruning_host = sum(_host_ms(b, c) for _, b, c in marks)
        if step.plan is None:                              # only stashes chunks: no row at its last chunk
            stash_steps += 1
            tot["stash"] += pruning
            tot["stash_host"] += pruning_host
        tot["attention"] += sum(_ms(a, b) for a, b, _ in marks)
        tot["pruning"] += pruning
        tot["pruning_host"] += pruning_host
        tot["span"] += _ms(marks[0][0], marks[-1][2])
        tot["span_host"] += _host_ms(marks[0][0], marks[-1][2])
    attention, pruning, span = tot["attention"], tot["pruning"], tot["span"]
    return {"steps": len(_order), "layer_calls": layers, "attention_ms": attention, "pruning_ms": pruning,
            "decoder_span_ms": span, "pruning_per_attention": pruning / attention if attention else None,
            "pruning_share_of_decoder_span": pruning / span if span else None,
            "pruning_host_ms": tot["pruning_host"], "decoder_span_host_ms": tot["span_host"],
            "stash_steps": stash_steps, "stash_ms": tot["stash"], "stash_host_ms": tot["stash_host"]}


def reset() -> None:
    _steps.clear()
    _order.clear()
    _keep.clear()


def profile_begin(step, device) -> None:
    """At each layer of a step with a row pruned now: start the profiler at the first layer of a step that selects
    once per step, past the skipped ones, while fewer than PROFILE_STEPS have been written."""
    if _profile["active"] is not None or step.plan is None or step.selection is None or step.selection.finish:
        return                                   # profiling, not a pruning step, per-layer path, or not layer 0
    if _profile["done"] >= PROFILE_STEPS:
        return
    _profile["seen"] += 1
    if _profile["seen"] <= PROFILE_SKIP:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.__enter__()
    _profile.update(active=prof, step=id(step), t0=time.perf_counter())


def profile_end(step, device) -> None:
    """After each layer's pruning: when the profiled step's selection has run (its last layer), stop and write."""
    if _profile["active"] is None or _profile["step"] != id(step) or not step.selection.done:
        return
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    span_ms = (time.perf_counter() - _profile["t0"]) * 1e3
    prof = _profile["active"]
    prof.__exit__(None, None, None)
    _profile.update(active=None, step=None, done=_profile["done"] + 1)
    lines = [f"== pruning step {_profile['seen']} (pid {os.getpid()}, {device}): rows {len(step.plan.lengths)}, "
             f"prompt lengths {step.plan.lengths}, keep {step.plan.keeps}, last chunk: {step.plan.sources is not None}",
             f"host span (first layer's attention to the last layer's pruning, synchronized): {span_ms:.2f} ms"]
    busy = device_busy(prof.events())
    if busy is not None:
        lines.append(f"device: busy {busy[0]:.2f} ms of a {busy[1]:.2f} ms span from its first kernel to its last "
                     f"({100 * busy[0] / busy[1]:.1f}% busy; the rest waited for the host)" if busy[1] else
                     "device: no kernel recorded")
    averages = prof.key_averages()
    if device.type == "cuda":
        lines += ["-- by self device time", averages.table(sort_by="self_cuda_time_total", row_limit=40)]
    lines += ["-- by self host time", averages.table(sort_by="self_cpu_time_total", row_limit=40), ""]
    with open(PROFILE_OUT, "a") as f:
        f.write("\n".join(lines) + "\n")


def device_busy(events):
    """(busy ms, span ms) of the device kernels among profiler events (None without device events): busy is the
    length of the union of their intervals."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start)
    if not spans:
        return None
    busy, start, end = 0.0, spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > end:
            busy += end - start
            start, end = a, b
        else:
            end = max(end, b)
    busy += end - start
    return busy / 1e3, (max(b for _, b in spans) - spans[0][0]) / 1e3
