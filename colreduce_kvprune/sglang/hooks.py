"""The SGLang hooks (installed through SGLang's own HookRegistry by `register`; no fork, no subclass).

H0 BEFORE/AFTER `ServerArgs.resolve_once` (launching process): settings.prepare_server_args / check_resolved.
H1 AROUND `RadixAttention.forward`: after the real attention of a prefill (extend) step, record the request's last
   queries (post-RoPE, as the attention saw them) for scoring; chunk by chunk.
H2 AROUND `SchedulerBatchResultProcessor.process_batch_result_prefill`: for each request whose prefill has just
   finished (last chunk) and goes on decoding: score every layer (recorded queries vs keys read from the KV pool
   through req_to_token), select per the policy, compact (index rewrite or K/V moves), free the pruned slots, and
   shorten the request's KV lengths and the batch's seq_lens by the pruned count.
H3 AFTER `ForwardBatch.init_new`: decode positions are seq_lens − 1; add each request's pruned count so positions
   (RoPE) stay logical.
H1–H3 run in the scheduler process (which owns the model worker for a single-device engine).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from ..policies import Policy, get_policy, keep_count
from . import pruning, settings

logger = logging.getLogger("colreduce_kvprune.sglang")
OFFSET_ATTR = "_kvprune_offset"        # on SGLang's Req: prompt tokens pruned (logical position − KV position)
ROWS_ATTR = "_kvprune_rows"           # on a ForwardBatch: its requests' (row, chunk start, length, first chunk)


@dataclass
class _State:
    config: object
    policy: Policy
    recorder: pruning.QueryRecorder


_state: _State | None = None


def state() -> _State | None:
    """This process's pruning state (config, policy, query recorder), or None when pruning is not configured."""
    global _state
    config = settings.current_config()
    if config is None:
        return None
    if _state is None or _state.config != config:
        policy = get_policy(config)
        _state = _State(config, policy, pruning.QueryRecorder(pruning.query_capacity(policy)))
    return _state


# ----------------------------------------------------------------------------------------------------- H0

def before_resolve(server_args, *args, **kwargs):
    settings.prepare_server_args(server_args)
    return None                          # keep the arguments


def after_resolve(result, server_args, *args, **kwargs):
    settings.check_resolved(server_args)
    return result


# ----------------------------------------------------------------------------------------------------- H1

def _rows(forward_batch):
    """[(req_to_token row, first token in the step, extend length, first chunk?)] of an extend step (cached)."""
    rows = getattr(forward_batch, ROWS_ATTR, None)
    if rows is None:
        pool_rows = forward_batch.req_pool_indices.tolist()
        lens, prefix = forward_batch.extend_seq_lens_cpu, forward_batch.extend_prefix_lens_cpu
        if lens is None or prefix is None:       # SGLang's device-only extend path leaves the host copies unset
            lens, prefix = forward_batch.extend_seq_lens.tolist(), forward_batch.extend_prefix_lens.tolist()
        lens, prefix = list(lens), list(prefix)
        starts = [sum(lens[:i]) for i in range(len(lens))]
        rows = list(zip(pool_rows, starts, lens, [p == 0 for p in prefix]))
        setattr(forward_batch, ROWS_ATTR, rows)
    return rows


def radix_attention_forward(original, layer, q, k, v, forward_batch, *args, **kwargs):
    out = original(layer, q, k, v, forward_batch, *args, **kwargs)
    st = state()
    if st is None or st.recorder.capacity == 0 or forward_batch.forward_mode.name != "EXTEND":
        return out
    queries = q.reshape(q.shape[0], layer.tp_q_head_num, layer.qk_head_dim)
    for row, start, length, first in _rows(forward_batch):
        st.recorder.record(row, layer.layer_id, queries[start:start + length], first, layer.scaling)
    return out


# ----------------------------------------------------------------------------------------------------- H2

def process_prefill_result(original, processor, batch, result, *args, **kwargs):
    st = state()
    if st is None:
        return original(processor, batch, result, *args, **kwargs)
    decoding = batch.decoding_reqs or ()
    finishing = [(i, req, req.kv.req_pool_idx) for i, req in enumerate(batch.reqs)
                 if req.inflight_middle_chunks <= 0 and not req.finished() and not req.is_retracted
                 and req not in decoding]
    ret = original(processor, batch, result, *args, **kwargs)
    for i, req, row in finishing:
        setattr(req, OFFSET_ATTR, 0)
        if req.finished() or req.is_retracted or row is None:
            st.recorder.drop(row)
            continue
        _prune_request(st, processor, batch, i, req, row)
    return ret


def _prune_request(st: _State, processor, batch, i: int, req, row: int) -> None:
    prompt = req.kv.kv_committed_len
    if prompt != int(batch.seq_lens_cpu[i]):
        raise RuntimeError(f"colreduce_kvprune: request {req.rid} holds {prompt} committed KV tokens but the batch "
                           f"says {int(batch.seq_lens_cpu[i])}")
    keep = keep_count(st.config, prompt)
    kvcache = processor.token_to_kv_pool_allocator.get_kvcache()
    layers = range(kvcache.start_layer, kvcache.start_layer + kvcache.layer_num)
    queries = st.recorder.pop(row, layers)
    if keep >= prompt:
        return
    req_row = processor.req_to_token_pool.req_to_token[row]
    slots = req_row[:prompt].long()
    with torch.no_grad():
        kept = []
        for layer in layers:
            keys = pruning.gather_keys(kvcache.get_key_buffer(layer), slots)
            q = queries.get(layer)
            if st.recorder.capacity != 0 and q is None:
                raise RuntimeError(f"colreduce_kvprune: no recorded queries for layer {layer} of request {req.rid}")
            kept.append(pruning.select_layer(st.policy, keys, q, layer=layer - kvcache.start_layer,
                                             num_layers=kvcache.layer_num,
                                             scale=st.recorder.scales.get(layer)))
        kept = torch.stack(kept)                                           # (L, Hkv, keep)
        shared = pruning.selection_is_shared(kept)
        if shared:
            new_prefix, freed = pruning.compact_shared(slots, kept[0, 0].to(slots.device))
        else:
            buffers = [(kvcache.get_key_buffer(layer), kvcache.get_value_buffer(layer)) for layer in layers]
            new_prefix, freed = pruning.compact_moved(buffers, slots, kept)
        req_row[:keep] = new_prefix.to(req_row.dtype)
    allocator = processor.token_to_kv_pool_allocator
    free_before = allocator.available_size()
    allocator.free(freed)
    free_after = allocator.available_size()
    _shorten(req, batch, i, prompt - keep)
    _report(req, prompt, keep, shared, free_before, free_after)


def _shorten(req, batch, i: int, pruned: int) -> None:
    """The request now holds `pruned` fewer KV tokens: its KV lengths and the batch's seq_lens follow."""
    req.kv.kv_committed_len -= pruned
    req.kv.kv_allocated_len -= pruned
    setattr(req, OFFSET_ATTR, pruned)
    batch.seq_lens = batch.seq_lens.clone()
    batch.seq_lens[i] -= pruned
    batch.seq_lens_cpu = batch.seq_lens_cpu.clone()
    batch.seq_lens_cpu[i] -= pruned
    if getattr(batch, "orig_seq_lens", None) is not None:
        batch.orig_seq_lens = batch.orig_seq_lens.clone()
        batch.orig_seq_lens[i] -= pruned
    batch.seq_lens_sum = None


def _report(req, prompt: int, keep: int, shared: bool, free_before: int, free_after: int) -> None:
    logger.info("colreduce_kvprune: request %s: kept %d of %d prompt tokens (%s), freed %d KV slots",
                req.rid, keep, prompt, "index rewrite" if shared else "K/V moved", prompt - keep)
    path = os.environ.get(settings.EVENTS_ENV_VAR)
    if path:
        event = dict(rid=req.rid, prompt_tokens=prompt, kept_tokens=keep, index_rewrite=shared,
                     free_before=free_before, free_after=free_after)
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


# ----------------------------------------------------------------------------------------------------- H3

def forward_batch_init_new(result, cls, batch, *args, **kwargs):
    if result.forward_mode.is_decode() and result.positions is not None:
        offsets = [getattr(req, OFFSET_ATTR, 0) for req in batch.reqs]
        if any(offsets):
            result.positions = result.positions + torch.tensor(offsets, dtype=result.positions.dtype).to(
                result.positions.device, non_blocking=True)
    return result


# ------------------------------------------------------------------------------------------------ install

TARGETS = {
    "resolve_before": "sglang.srt.server_args.ServerArgs.resolve_once",
    "attention": "sglang.srt.layers.radix_attention.RadixAttention.forward",
    "prefill_result": ("sglang.srt.managers.scheduler_components.batch_result_processor."
                       "SchedulerBatchResultProcessor.process_batch_result_prefill"),
    "init_new": "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
}


def install(version_ok: bool) -> None:
    """Register the hooks with SGLang's HookRegistry (applied by SGLang's load_plugins). With an unsupported
    SGLang version only H0 is installed: it refuses the engine with the version message."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGETS["resolve_before"], before_resolve, HookType.BEFORE)
    if not version_ok:
        return
    HookRegistry.register(TARGETS["resolve_before"], after_resolve, HookType.AFTER)
    HookRegistry.register(TARGETS["attention"], radix_attention_forward, HookType.AROUND)
    HookRegistry.register(TARGETS["prefill_result"], process_prefill_result, HookType.AROUND)
    HookRegistry.register(TARGETS["init_new"], forward_batch_init_new, HookType.AFTER)
