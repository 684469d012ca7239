"""Worker side: the prompt length P of every row of the persistent batch, for the attention builder.

Why this exists: after a preemption vLLM recomputes a request by prefilling prompt + outputs (L = P + g tokens) from
position 0, and the plugin must prune it exactly as the first time (score the prompt alone, keep keep_count(P)). The
attention builder sees only CommonAttentionMetadata, which in vLLM 0.32 carries no prompt length (its
`rswa_prefix_lens` is filled only for R-SWA models, gpu_model_runner.py `_build_attention_metadata`); the builder is
never handed the runner or its InputBatch. The one supported worker-side extension point that is told each row's
prompt is a logits processor: vLLM loads installed classes from the `vllm.logits_processors` entry point group
(vllm/v1/sample/logits_processor/__init__.py) into every InputBatch, and calls `update_state(BatchUpdate)` after the
batch is condensed and reordered and before the step's attention metadata is built (gpu_model_runner.py
`_update_states` → `input_batch.refresh_metadata()`), with (row, params, prompt_token_ids, output_ids) for each
added or resumed request and the row moves. Its row indices are the persistent batch's, which are the rows of the
step's attention metadata. This class tracks P per row that way and never touches the logits.

Assumptions, guarded: the tracker is installed (entry point) and shares the runner's VllmConfig object with the
builder — `tracker_for` returns None otherwise and the builder refuses to start; the tracked rows are the attention
rows — checked every step against vLLM's own per-row `is_prefilling` (num_computed < num_prompt_tokens) and, for
fresh prefills, P <= L; a mismatch raises instead of pruning with a wrong length. Not available with speculative
decoding or pooling models (vLLM builds no custom logits processors there; the builder then refuses to start).
"""
from __future__ import annotations

import weakref

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .settings import config_source

_TRACKERS: "weakref.WeakValueDictionary[int, PromptLengthTracker]" = weakref.WeakValueDictionary()


class PromptLengthTracker(LogitsProcessor):
    """Logits processor (argmax invariant, logits untouched) holding {batch row: prompt length} of an engine that
    prunes; inert for an engine without a pruning config."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.lengths: dict[int, int] = {}
        self.active = config_source(vllm_config)[0] is not None
        if self.active:
            self._vllm_config = vllm_config        # keeps id(vllm_config) from being reused while registered
            _TRACKERS[id(vllm_config)] = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.active:
            process_dict_updates(self.lengths, batch_update, _prompt_length)

    def prompt_length(self, row: int) -> int | None:
        """P of the request in batch row `row`, or None when the row holds no tracked request (dummy runs)."""
        return self.lengths.get(row)


def _prompt_length(params, prompt_token_ids, output_token_ids) -> int | None:
    if prompt_token_ids is None:
        raise RuntimeError("colreduce_kvprune: a request without prompt token ids (prompt embeddings) reached a "
                           "pruning engine; its prompt length is unknown to the plugin")
    return len(prompt_token_ids)


def tracker_for(vllm_config) -> PromptLengthTracker | None:
    """The tracker of the InputBatch built from this VllmConfig in this process, or None."""
    return _TRACKERS.get(id(vllm_config))
