"""Mixins that add pruning to a vLLM attention backend (builder + impl; 0.32 and 0.33, whose differences live in
versions.py); the CPU and CUDA backends are these mixins over vLLM's own classes. With no pruning config every method
is the base class's, unchanged.

Builder.build: for the fresh prefills of the step, plan the pruning (host ints from the CPU copies of
query_start_loc / seq_lens and each row's prompt length from prompt_lengths.py, then device index tensors); for
every row, look up the request's pruned layout (RowState) and rewrite seq_lens, the block table and, in place, the
slot mapping (vectorised, no host sync). A step in which no row's request is pruned (known on the host from each
row's prompt length: keep_count(P) >= P) skips all of that: the block table and seq_lens are only copied into the
builder's buffers.
Impl.forward: the base attention over the full prefill, then the layer's scores. Normally one selection serves
every layer of the step (compaction.StepSelection): each layer adds its scores to a stacked buffer, and after the
step's last layer one top-k selects for all of them, then each layer's kept K/V are gathered (from the paged cache
where the backend can read its layout, else from a copy of the layer's step K/V, held until then) and written to
the compacted slots with the layer's own `do_kv_cache_update`. A step with a request recomputed after preemption
selects, gathers and writes per layer instead, since the attention rows of its outputs are then recomputed over
the kept tokens (compaction.recompute_outputs) and the next layer reads them; so it continues exactly as if it had
not been preempted. So do steps whose stacked scores would exceed StepSelection.MAX_BYTES, and policies without a
selection layout. Either way every read is made into new tensors before the first write, so no slot is read
after it is written; at a chunked prompt's last chunk the earlier chunks' K/V come from the paged cache
(compaction.assemble).
A prompt step of one token over earlier chunks (which vLLM may run inside a full decode graph, where none of the
above runs) is never planned in its own step: every layer's forward copies its rows, the next build stashes them
and, when that token ended the prompt, prunes the request through the same per-layer path before the step's forward
(compaction.LateRows).
The per-layer work reads nothing back from the device: the plan's device tensors are made once per step by the
builder, and NaN scores leave a device flag that a later build reads once its copy has landed (compaction.NanWatch).
"""
from __future__ import annotations

import dataclasses

import torch

from ..policies import get_policy
from ..config import ConfigError
from . import compaction, timing, warmup
from .prompt_lengths import tracker_for
from .settings import config_to_json, cudagraph_support, resolve

_last_config_json: str | None = None   # config resolved by this process's last engine (for customize_spec)


def _current_config():
    """(PruneConfig | None) of the engine being built in this process."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    return resolve(vllm_config) if vllm_config is not None else None


def _engine_lengths() -> tuple[int, int]:
    """(max_model_len, KV block size) of the engine being built in this process, for the warm-up ((0, 16) when
    unknown: it then compiles for its dummies only)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return 0, 16
    return vllm_config.model_config.max_model_len, vllm_config.cache_config.block_size or 16


def _late_rows(vllm_config=None) -> int:
    """compaction.late_rows for this engine (the builder's index and every layer's capture buffers agree)."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return compaction.LATE_ROWS
    sched = vllm_config.scheduler_config
    return compaction.late_rows(sched.max_num_seqs, getattr(sched, "long_prefill_token_threshold", 0) or 0)


def _remember(config) -> None:
    global _last_config_json
    _last_config_json = None if config is None else config_to_json(config)


def prunable_spec(spec):
    """customize_spec hook: FullAttentionSpec → PrunableFullAttentionSpec carrying the config (scheduler side)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from .manager import PrunableFullAttentionSpec

    if _last_config_json is None or isinstance(spec, PrunableFullAttentionSpec):
        return spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window is not None or spec.attention_chunk_size:
        raise ConfigError(f"colreduce_kvprune: cannot prune layers with KV cache spec {type(spec).__name__} "
                          f"(sliding_window={getattr(spec, 'sliding_window', None)}); only full attention")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    return PrunableFullAttentionSpec(**fields, prune_config=_last_config_json)


class PruneBuilderMixin:
    """Mixin for an AttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device).

    The attention reads the remapped block table and seq_lens from two buffers the builder owns (allocated once:
    a CUDA graph captured with them reads what each step's build writes there); the runner's own tensors are never
    changed (vLLM's CPU runner's block table tensor is its host source of truth; V2's sampler reads seq_lens)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.prune_config = resolve(vllm_config)
        if self.prune_config is not None:
            self.prune_policy = get_policy(self.prune_config)
            self.prune_block_size = kv_cache_spec.block_size
            self.prune_rows = None            # RowState, sized at the first build once the KV pool exists
            self.prune_cache_config = vllm_config.cache_config
            self.prune_max_rows = vllm_config.scheduler_config.max_num_seqs
            self.prune_bufs = None            # (block table, seq_lens) the attention reads, see _prune_buffers
            self.prune_nan = compaction.NanWatch()   # the layers' NaN flags, read without a host sync
            self.prune_prunes = {}                   # prompt length -> pruned? (compaction.prunable_rows)
            self.prune_num_layers = len(layer_names)  # the layers that read this builder's metadata
            # kv heads in a layer's scores (per_head=false under tensor parallelism: every rank's)
            self.prune_score_heads = kv_cache_spec.num_kv_heads * (
                1 if self.prune_config.per_head else vllm_config.parallel_config.tensor_parallel_size)
            self.prune_selection = None              # the last step's compaction.StepSelection
            self.prune_late = compaction.LateRows(device, _late_rows(vllm_config))   # one-token prompt steps
                                                                                    # (captured by the layers)
            self.prune_layer_names = list(layer_names)
            self.prune_layer_list = None             # _prune_layers
            self.prune_forward_context = vllm_config.compilation_config.static_forward_context
            self.prune_prompts = tracker_for(vllm_config)
            if self.prune_prompts is None:
                raise ConfigError(
                    "colreduce_kvprune: the worker's prompt-length tracker (logits processor "
                    "colreduce_kvprune.vllm.prompt_lengths:PromptLengthTracker, entry point group "
                    "'vllm.logits_processors') is not active in this engine, so a request recomputed after "
                    "preemption could not be pruned as before; reinstall colreduce-kvprune (pip install -e . "
                    "registers the entry point) or pass logits_processors=['colreduce_kvprune.vllm.prompt_lengths:"
                    "PromptLengthTracker'] (this vLLM build may also construct its input batch differently)")

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        return cudagraph_support(super().get_cudagraph_support(vllm_config, kv_cache_spec),
                                 resolve(vllm_config) is not None)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self.prune_config is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self._prune_row_state(common_attn_metadata.block_table_tensor) is None:
            md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        else:
            cm, plan = self._prune_prepare(common_attn_metadata)
            md = super().build(common_prefix_len, cm, fast_build)
            md.kvprune = plan
        md.kvprune_late = self.prune_late.index     # every forward (and every captured graph) copies these rows
        return md

    def _prune_layers(self):
        """[(layer index, attention layer)] of the layers that read this builder's metadata, in model order (each
        layer's impl and bound kv_cache are its attributes), looked up once."""
        if self.prune_layer_list is None:
            from vllm.model_executor.models.utils import extract_layer_index

            ctx = self.prune_forward_context
            self.prune_layer_list = sorted(((extract_layer_index(n), ctx[n]) for n in self.prune_layer_names),
                                           key=lambda t: t[0])
        return self.prune_layer_list

    def _prune_late(self, late_steps, late_carries, bt):
        """Prune now, before this step's forward, the requests whose last prompt token came in a captured one-token
        step (compaction.LateRows): every layer's scores, selection and compaction through the impls' own path, with
        an empty step (the whole prompt is in the cache and the carries). Returns (rows, RowState values)."""
        rows, values, plan, _ = compaction.plan_prefills(self.prune_config, self.prune_policy, late_steps, bt,
                                                         self.prune_block_size, late_carries)
        layers = self._prune_layers()
        selection = None
        if (plan.layout is not None and compaction.StepSelection.fits(
                len(layers), len(plan.lengths), self.prune_score_heads, max(plan.lengths))):
            selection = compaction.StepSelection(len(layers))
        step = compaction.StepPlan(plan, [], bt, self.prune_nan, selection)
        start = timing.mark(bt.device) if timing.ENABLED else None
        with torch.no_grad():
            for layer_idx, layer in layers:
                q, k, v = (t[:0] for t in layer.impl.prune_captured)
                layer.impl._prune_compact(layer, layer_idx, q, k, v, layer.kv_cache, step, None)
        if start is not None:          # counted as a pruning step with no attention of its own
            timing.record(step, start, start, timing.mark(bt.device))
        for carry in late_carries:
            carry.pop("late", None)
        return rows, values

    def _prune_row_state(self, block_table: torch.Tensor):
        """The RowState table, created at the first build after the KV pool is sized; None before that: vLLM's
        memory profiling runs dummy batches (and, with CUDA graphs, a profiling capture) before any KV cache exists,
        and there is nothing to prune then (the batch is left as vLLM built it)."""
        if self.prune_rows is None:
            blocks = self.prune_cache_config.num_gpu_blocks     # set on this config when the pool is allocated
            if not blocks:
                return None
            self.prune_rows = compaction.RowState(blocks, block_table.device)
        return self.prune_rows

    def _prune_buffers(self, block_table: torch.Tensor, seq_lens: torch.Tensor):
        """The builder's persistent (block table, seq_lens) buffers, at least the given shapes."""
        rows = max(block_table.shape[0], seq_lens.shape[0], self.prune_max_rows)
        buf = self.prune_bufs
        if (buf is None or buf[0].shape[0] < rows or buf[0].shape[1] != block_table.shape[1]
                or buf[0].dtype != block_table.dtype or buf[1].dtype != seq_lens.dtype):
            buf = (torch.zeros(rows, block_table.shape[1], dtype=block_table.dtype, device=block_table.device),
                   torch.zeros(rows, dtype=seq_lens.dtype, device=seq_lens.device))
            self.prune_bufs = buf
        return buf

    def _prune_prepare(self, cm):
        self.prune_nan.flush()                # the previous step's layers have been launched: copy their flags
        self.prune_nan.check()
        sel = self.prune_selection
        if sel is not None and sel.finish and not sel.done:
            raise RuntimeError(f"colreduce_kvprune: the previous step's pruning saw {len(sel.finish)} of the "
                               f"{sel.num_layers} attention layers that share its metadata, so its rows were not "
                               "compacted (a model that runs only some of its attention layers per step?)")
        n = cm.num_reqs
        bt = cm.block_table_tensor
        if cm.positions is None:
            raise RuntimeError("colreduce_kvprune needs CommonAttentionMetadata.positions (set by vLLM's model runners)")
        seq_cpu = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        prompts, targets = self.prune_prompts.row_lengths(cm, n)
        is_prefilling = cm.is_prefilling
        if is_prefilling is not None and is_prefilling.device.type != "cpu":
            is_prefilling = None                        # a device tensor: reading it would sync
        prompts, targets = compaction.check_prompt_lengths(prompts, targets, cm.query_start_loc_cpu, seq_cpu,
                                                           is_prefilling, n)
        prunes = compaction.prunable_rows(self.prune_config, prompts, n, self.prune_prunes)
        late = self.prune_late
        if late.pending is not None:          # the last step's one-token prompt steps, before this step's forward
            late.stash_captured(self._prune_layers(), self.prune_policy)
        if all(p is False for p in prunes):   # no row's request is pruned: nothing to plan, stash or remap
            late.split(self.prune_config, self.prune_policy, [], [], bt)
            out_bt, out_seq = self._prune_buffers(bt, cm.seq_lens)
            return self._prune_rows_replaced(cm, *compaction.copy_rows(bt, cm.seq_lens, out_bt, out_seq)), None
        steps = compaction.prompt_steps(cm.query_start_loc_cpu, seq_cpu, n, prompts, is_prefilling)
        carries = self.prune_prompts.row_carries(cm, n)
        now_rows, now_values = [], []
        late_steps, late_carries = late.late_steps(steps, carries, cm.query_start_loc_cpu, seq_cpu, prompts)
        if late_steps:
            now_rows, now_values = self._prune_late(late_steps, late_carries, bt)
        steps, step_carries = late.split(self.prune_config, self.prune_policy, steps, [carries[s[0]] for s in steps],
                                         bt)
        fresh_rows, fresh_values, plan, stash = compaction.plan_prefills(
            self.prune_config, self.prune_policy, steps, bt, self.prune_block_size, step_carries)
        state = self.prune_rows.update_and_lookup(bt[:n, 0], fresh_rows, fresh_values,
                                                  [r for r, p in enumerate(prunes) if p is False],
                                                  now_rows, now_values)
        num_tokens = int(cm.query_start_loc_cpu[n])
        out_bt, out_seq = self._prune_buffers(bt, cm.seq_lens)
        new_bt, new_seq = compaction.remap_rows(state, bt, cm.seq_lens, cm.positions, cm.query_start_loc,
                                                num_tokens, cm.slot_mapping, self.prune_block_size, out_bt, out_seq)
        # one selection for every layer of the step, unless outputs are recomputed (they change each layer's
        # attention output, which the next layer reads) or the policy selects per request (no layout)
        self.prune_selection = None
        if (plan is not None and plan.layout is not None and not any(plan.num_outputs)
                and compaction.StepSelection.fits(self.prune_num_layers, len(plan.lengths), self.prune_score_heads,
                                                  max(plan.lengths))):
            self.prune_selection = compaction.StepSelection(self.prune_num_layers)
        return (self._prune_rows_replaced(cm, new_bt, new_seq),
                compaction.StepPlan(plan, stash, bt, self.prune_nan, self.prune_selection)
                if plan is not None or stash else None)

    @staticmethod
    def _prune_rows_replaced(cm, block_table, seq_lens):
        """cm reading the remapped block table and seq_lens (the builder's buffers)."""
        extra = {}
        if cm.seq_lens_cpu_upper_bound is not None:   # stays an upper bound: pruning only shortens
            extra["seq_lens_cpu_upper_bound"] = cm.seq_lens_cpu_upper_bound
        return dataclasses.replace(cm, seq_lens=seq_lens, block_table_tensor=block_table,
                                   _num_computed_tokens_cache=None, _token_to_req_indices_cache=None, **extra)


def _tensor_parallel_heads(num_kv_heads: int):
    """(model-wide index of this rank's first kv head, all-gather over the tensor-parallel group or None, position
    of this rank's heads in the gathered tensor). With more ranks than kv heads vLLM replicates each head over
    size / total ranks."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                                  get_tp_group)

    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return 0, None, 0
    rank = get_tensor_model_parallel_rank()
    total = get_current_vllm_config().model_config.get_total_num_kv_heads()
    first = rank * num_kv_heads if size <= total else rank * total // size
    group = get_tp_group()
    return first, (lambda t: group.all_gather(t, dim=0)), rank * num_kv_heads


class PruneImplMixin:
    """Mixin for an AttentionImpl: prune after the prefill's attention of each layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prune_config = _current_config()
        _remember(self.prune_config)
        self.prune_cold = self.prune_config is not None       # scoring kernels not compiled yet (warmup.py)
        self.prune_captured = None     # (q, k, v) rows of compaction.LateRows' index, copied by every forward
        self.prune_capture_kv = None   # whether k and v are copied too (the cache cannot be read: _prune_capture)
        if self.prune_config is not None:
            self.prune_policy = get_policy(self.prune_config)
            self.prune_lengths = _engine_lengths()
            self.prune_late_rows = _late_rows()
            self.prune_tp = _tensor_parallel_heads(self.num_kv_heads)
            extras = [name for name in ("alibi_slopes", "sinks") if getattr(self, name, None) is not None]
            if getattr(self, "logits_soft_cap", None):
                extras.append("logits_soft_cap")
            if extras:
                raise ConfigError(f"colreduce_kvprune: attention with {', '.join(extras)} is not supported (the "
                                  "exact recompute of preempted requests' outputs is plain softmax attention)")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        step = getattr(attn_metadata, "kvprune", None)
        timed = step is not None and timing.ENABLED
        if timed:
            start = timing.mark(query.device)
        if step is not None and timing.PROFILE_STEPS:
            timing.profile_begin(step, query.device)
        if self.prune_config is not None:
            self._prune_capture(query, key, value, kv_cache, getattr(attn_metadata, "kvprune_late", None))
        if self.prune_cold and step is None:     # vLLM's profiling run, before any prompt: compile the scoring
            self.prune_cold = not warmup.warm_up(self.prune_policy, query.device, query.dtype, self.num_heads,
                                                 self.num_kv_heads, self.head_size, self.scale, *self.prune_lengths)
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if step is not None:
            if timed:
                after_attention = timing.mark(query.device)
            if key is None:      # a model that wrote its K/V to the cache itself and passed none: nothing to score
                # (vLLM 0.33's supports_kv_cache_update_bypass; the pruning backends turn it off: versions.py)
                raise RuntimeError("colreduce_kvprune: the attention layer was called without key/value tensors "
                                   "(a fused KV-cache write bypassing the backend), so the prefill cannot be pruned")
            from vllm.model_executor.models.utils import extract_layer_index

            layer_idx = extract_layer_index(layer.layer_name)
            with torch.no_grad():
                if step.stash:
                    compaction.stash_chunks(step, layer_idx, self.prune_policy, query, key, value,
                                            self.prune_kv_views(kv_cache), self.scale)
                if step.plan is not None:
                    self._prune_compact(layer, layer_idx, query, key, value, kv_cache, step, output)
            if timed:
                timing.record(step, start, after_attention, timing.mark(query.device))
            if timing.PROFILE_STEPS:
                timing.profile_end(step, query.device)
        return out

    def _prune_capture(self, query, key, value, kv_cache, index):
        """Copy the step's rows at `index` (compaction.LateRows: one-token prompt steps, which vLLM may run inside a
        full CUDA graph) into persistent buffers, allocated at the first forward (vLLM's profiling run, before any
        graph is captured); the next build stashes them. One index_select of the queries, captured into full graphs
        (about 2 µs of a decode step per layer); the keys and values too only where the cache's layout cannot be
        read back (prune_kv_views None: the CPU backend), decided at the first forward with a KV cache."""
        if key is None:          # (a fused KV write: nothing to capture; a pruning step raises below)
            return
        if self.prune_captured is None:
            self.prune_captured = tuple(
                t.new_zeros((self.prune_late_rows,) + tuple(t.shape[1:])) for t in (query, key, value))
        if self.prune_capture_kv is None and kv_cache is not None and kv_cache.numel():
            self.prune_capture_kv = self.prune_kv_views(kv_cache) is None
        if index is None:
            return
        sources = (query,) if self.prune_capture_kv is False else (query, key, value)
        for src, dst in zip(sources, self.prune_captured):
            torch.index_select(src, 0, index, out=dst)

    def prune_kv_views(self, kv_cache):
        """(key_cache, value_cache) of this backend's layer cache as (num_blocks, block_size, Hkv, D) views, through
        which the last chunk of a chunked prefill reads the earlier chunks' keys and values; None where the layout
        cannot be read here (then they are kept aside chunk by chunk). Each backend says (backend_*.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to read its KV cache layout")

    def _prune_compact(self, layer, layer_idx, query, key, value, kv_cache, step, output):
        head_offset, gather, rank_heads = self.prune_tp
        plan, partials, step_output, heads = step.plan, None, output, key.shape[1]
        views = self.prune_kv_views(kv_cache)
        # the step path with a readable cache reads the kept values back at the end (no value gather) and, for
        # attention scores of the window, scores the keys where they lie in the cache (no key gather)
        cached = step.selection is not None and views is not None
        paged = (views[0], step.block_table) if cached and compaction.scores_from_cache(self.prune_policy,
                                                                                        plan) else None
        if plan.sources is not None:          # a last chunk among the rows: score the whole prompts
            query, key, value, partials = compaction.assemble(
                plan, layer_idx, query, key, value, views, step.block_table, kv_cache.shape[2],
                values=not cached, keys=paged is None)
            if any(plan.num_outputs):         # the recomputed outputs' rows, scattered back afterwards
                output = output.new_zeros((query.shape[0],) + tuple(output.shape[1:]))
        if step.selection is not None:        # this layer's scores now; selection and writes after the last layer
            scores = compaction.layer_scores(self.prune_policy, plan, query, key, layer=layer_idx, scale=self.scale,
                                             head_offset=head_offset, gather_heads=gather, partials=partials,
                                             paged=paged)
            if views is not None:             # the kept K/V are read back from the paged cache then (no tensor held)
                def finish(kept, i):
                    self._prune_write(layer, kv_cache, plan,
                                      *compaction.gather_kept_cached(kept, i, step.block_table, views))
            else:     # a cache layout not readable here (CPU): a copy of this layer's K/V is held until then (the
                # step's tensors themselves may be buffers that vLLM's compiled graphs reuse for later layers)
                key, value = key.clone(), value.clone()

                def finish(kept, i):
                    self._prune_write(layer, kv_cache, plan, *compaction.gather_kept(plan, kept.idx[i], key, value))
            step.selection.add(self.prune_policy, plan, layer_idx, scores, finish, heads=heads,
                               gathered=gather is not None, rank_heads=rank_heads, nan=step.nan)
            return
        idx = compaction.select_kept(self.prune_policy, plan, query, key, layer=layer_idx, scale=self.scale,
                                     head_offset=head_offset, gather_heads=gather, rank_heads=rank_heads,
                                     partials=partials,
                                     nan_flags=step.nan.flags(layer_idx) if step.nan is not None else None)
        k_sel, v_sel = compaction.gather_kept(plan, idx, key, value)
        self._prune_write(layer, kv_cache, plan, k_sel, v_sel)
        if any(plan.num_outputs):
            compaction.recompute_outputs(plan, query, k_sel, v_sel, output, self.scale)
            if plan.sources is not None:
                compaction.scatter_outputs(plan, output, step_output)

    def _prune_write(self, layer, kv_cache, plan, k_sel, v_sel):
        self.do_kv_cache_update(layer, k_sel.contiguous(), v_sel.contiguous(), kv_cache, plan.slots)
