"""Opt-in timing of the pruning work inside prefill steps: set KVPRUNE_TIMING=1 in the worker's environment.

For every step that prunes or stashes a chunk, each attention layer records three marks: before vLLM's attention,
after it, and after the plugin's work for that layer (scores, selection, gather of the kept K/V, cache write; or the
stash of a chunk). CUDA events on a GPU (no host sync while the engine runs), the wall clock on CPU. `summary()`
(in the worker's process: with VLLM_ENABLE_V1_MULTIPROCESSING=0, the caller's) gives the totals: the plugin's time
against vLLM's attention of the same layers, and against the span from the first layer's attention to the last
layer's pruning of each step (every decoder layer of the prefill: attention, MLP, norms; not the embedding, the
logits or sampling). Off (the default), the attention path does one attribute read per layer.
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
    import torch

    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


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
    return a.elapsed_time(b) if hasattr(a, "elapsed_time") else (b - a) * 1e3


def summary() -> dict | None:
    """Totals over the recorded steps (None when timing is off or nothing was recorded)."""
    if not ENABLED or not _order:
        return None
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    attention = pruning = span = 0.0
    layers = 0
    for key in _order:
        marks = _steps[key]
        layers += len(marks)
        attention += sum(_ms(a, b) for a, b, _ in marks)
        pruning += sum(_ms(b, c) for _, b, c in marks)
        span += _ms(marks[0][0], marks[-1][2])
    return {"steps": len(_order), "layer_calls": layers, "attention_ms": attention, "pruning_ms": pruning,
            "decoder_span_ms": span, "pruning_per_attention": pruning / attention if attention else None,
            "pruning_share_of_decoder_span": pruning / span if span else None}


def reset() -> None:
    _steps.clear()
    _order.clear()
    _keep.clear()
