"""Worker side: the prompt length P of every row of a step, for the attention builder — the one place where vLLM's two
model runners (V1: vllm/v1/worker/gpu_model_runner.py and the CPU runner; V2: vllm/v1/worker/gpu/, the CUDA default
in 0.32) differ for the plugin.

Why this exists: after a preemption vLLM recomputes a request by prefilling prompt + outputs (L = P + g tokens) from
position 0, and the plugin must prune it exactly as the first time (score the prompt alone, keep keep_count(P)). The
attention builder sees only CommonAttentionMetadata, which carries no prompt length (its `rswa_prefix_lens` is
filled only for R-SWA models), and is never handed the runner. The one supported worker-side extension point that is
told each request's prompt is a logits processor, loaded from the `vllm.logits_processors` entry point group by
both runners, each with its own interface:

- V1 (vllm/v1/sample/logits_processor): the class is built as `cls(vllm_config, device, is_pin_memory)` into every
  InputBatch, and `update_state(BatchUpdate)` is called after the batch is condensed and reordered and before the
  step's attention metadata is built, with (row, params, prompt_token_ids, output_ids) for each added or resumed
  request and the row moves. Its rows are the attention rows. The tracker keeps {row: P}.
- V2 (vllm/v1/worker/gpu/sample/logits_processor): the loader accepts only subclasses of the V2 `LogitsProcessor`;
  the class is built as `cls(vllm_config, LogitsProcRequestState)`, whose `prompt_len` holds P per persistent
  request slot (host array `.np`, written when a request is added or resumed); the runner passes each attention
  row's slot as `CommonAttentionMetadata.req_idx`. The tracker reads `prompt_len.np[req_idx]`.

`PromptLengthTracker` subclasses both interfaces, so one entry point serves either runner; it never changes logits
(V1: argmax invariant, `apply` returns its input; V2: `add_request` returns False, so the sampler never calls
`apply` for it). It is inert (tracks nothing) for an engine without a pruning config.

Assumptions, guarded: the tracker is installed (entry point) and shares the runner's VllmConfig object with the
builder — `tracker_for` returns None otherwise and the builder refuses to start; the tracked rows are the attention
rows — checked every step against vLLM's own per-row `is_prefilling` flag (`prefill_targets`: the token count below
which the runner calls a row prefilling, P on V1, P + g on V2) and, for fresh prefills, P <= L; a mismatch raises
instead of pruning with a wrong length. Not available with speculative decoding or pooling models (V1 builds no
custom logits processors there; the builder then refuses to start).
"""
from __future__ import annotations

import weakref

import torch
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from .settings import config_source

_TRACKERS: "weakref.WeakValueDictionary[int, PromptLengthTracker]" = weakref.WeakValueDictionary()


class PromptLengthTracker(V2LogitsProcessor, V1LogitsProcessor):
    """Logits processor of either model runner (logits untouched) that knows the prompt length of each batch row of
    an engine that prunes; inert for an engine without a pruning config.

    V1: PromptLengthTracker(vllm_config, device, is_pin_memory); V2: PromptLengthTracker(vllm_config, req_states)."""

    def __init__(self, vllm_config, *args):
        if len(args) == 2:                                  # V1: (device, is_pin_memory)
            self.runner = "v1"
            self.req_states = None
        elif len(args) == 1:                                # V2: (LogitsProcRequestState)
            self.runner = "v2"
            self.req_states = args[0]
        else:
            raise TypeError("PromptLengthTracker(vllm_config, device, is_pin_memory) (V1 model runner) or "
                            f"PromptLengthTracker(vllm_config, req_states) (V2), got {1 + len(args)} arguments")
        self.rows: dict[int, _Row] = {}                     # V1: {batch row: its request's prompt length, carry}
        self.slots: dict[int, dict] = {}                    # V2: {request slot: carry}
        source, where = config_source(vllm_config)
        self.active = source is not None
        if self.active:
            _check_release(where)
            self._vllm_config = vllm_config        # keeps id(vllm_config) from being reused while registered
            _TRACKERS[id(vllm_config)] = self

    # ---- both interfaces: logits pass through --------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits

    # ---- V1 interface ---------------------------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.active:
            process_dict_updates(self.rows, batch_update, _new_row)

    # ---- V2 interface ---------------------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        if self.active:
            self.slots[req_idx] = {}                        # a new (or resumed) request: a fresh carry
        return False                                        # never modifies a request's logits

    # ---- the builder's view ---------------------------------------------------------------------------------
    def row_lengths(self, common_attn_metadata, num_rows: int):
        """(prompts, prefill_targets) for batch rows 0..num_rows-1 of this step, lists of int or None (a row of no
        tracked request: padding, dummy runs). prompts[r] = P; prefill_targets[r] = the token count below which the
        runner's `is_prefilling` flag calls the row prefilling (V1: P; V2: the tokens fed at the latest (re)fill,
        P + g after a preemption)."""
        if self.runner == "v1":
            prompts = [self.rows[r].prompt if r in self.rows else None for r in range(num_rows)]
            return prompts, prompts
        slots = common_attn_metadata.req_idx
        if slots is None:
            raise RuntimeError("colreduce_kvprune: vLLM's V2 model runner built attention metadata without req_idx "
                               "(the persistent slot of each row): the plugin cannot tell each row's prompt length")
        n = min(num_rows, len(slots))
        prompt = self.req_states.prompt_len.np[slots[:n]].tolist()
        prefill = self.req_states.prefill_len.np[slots[:n]].tolist()
        pad = [None] * (num_rows - n)
        return [p or None for p in prompt] + pad, [p or None for p in prefill] + pad


    def row_carries(self, common_attn_metadata, num_rows: int) -> list[dict | None]:
        """Per batch row, the dict its request carries between the steps of a chunked prefill (compaction
        .plan_prefills: the stashed chunks of a prompt being pruned), or None for a row of no tracked request. A
        request gets a fresh one when it enters the batch (or resumes after a preemption)."""
        if self.runner == "v1":
            return [self.rows[r].carry if r in self.rows else None for r in range(num_rows)]
        slots = common_attn_metadata.req_idx
        return [self.slots.setdefault(int(slot), {}) for slot in slots[:num_rows]] + \
            [None] * max(0, num_rows - len(slots))


class _Row:
    """A V1 batch row's request: prompt length P and its chunked-prefill carry (moves with the row)."""
    __slots__ = ("prompt", "carry")

    def __init__(self, prompt: int):
        self.prompt = prompt
        self.carry: dict = {}


def _new_row(params, prompt_token_ids, output_token_ids) -> _Row:
    if prompt_token_ids is None:
        raise RuntimeError("colreduce_kvprune: a request without prompt token ids (prompt embeddings) reached a "
                           "pruning engine; its prompt length is unknown to the plugin")
    return _Row(len(prompt_token_ids))


def _check_release(where: str) -> None:
    """A pruning config on a vLLM release the plugin does not support stops the engine here: register() installed
    nothing on that release (so no backend of ours would refuse it), but this entry point still loads."""
    from . import versions

    version = versions.installed()
    if not versions.supported(version):
        from ..config import ConfigError

        raise ConfigError(f"{versions.unsupported_message(version)}; pruning config from {where}")


def tracker_for(vllm_config) -> PromptLengthTracker | None:
    """The tracker built from this VllmConfig in this process (by either model runner), or None."""
    return _TRACKERS.get(id(vllm_config))
