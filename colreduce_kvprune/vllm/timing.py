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
"""
from __future__ import annotations

import os
import time

ENABLED = os.environ.get("KVPRUNE_TIMING") == "1"
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
