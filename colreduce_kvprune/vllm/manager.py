"""Scheduler side: a KV cache manager that frees a pruned request's tail blocks once its prefill is computed.

The worker compacts a request's kept tokens into the first blocks of its block table right after the prefill (see
`compaction.py`). The scheduler never hears back from the worker: the kept count is `keep_count(config, P)`, a pure
function of the prompt length P and the config (which reaches this process inside the KV cache spec), so both sides
agree by construction. Rule shared with the worker: a request is pruned at the step that completes its prompt, the
one after which L >= P tokens are computed: a whole prompt in one step (L = P), the last chunk of a chunked prefill
(CPU build), or, for a request recomputed after preemption (prompt + its g outputs prefilled again from position 0),
the step whose tokens reach past the prompt (L = P + g' with g' <= g outputs in it). It is pruned exactly as the first
time: keep(P) prompt tokens, then the g' outputs, so the request holds cdiv(keep + g', block_size) blocks; the rest
of a recompute then follows in the compacted layout, and the request continues as if never preempted.

Prefix caching: a request that is pruned (keep_count(P) < P, known when it is scheduled) neither reads cached blocks
(its prefill must start at position 0 to be scored, and its compaction writes into its first blocks, which a cache
hit would share with other requests) nor publishes its own (after compaction their contents no longer match their
hashes). Requests that are not pruned read and publish as usual, so shared prompts shorter than min_prompt_tokens, or
within the budget, keep using the prefix cache.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..policies import keep_count
from .settings import config_from_json
from .stats import PruneStats, track

logger = init_logger("vllm.colreduce_kvprune")


@dataclass(frozen=True, kw_only=True)
class PrunableFullAttentionSpec(FullAttentionSpec):
    """FullAttentionSpec of layers whose KV is pruned; `prune_config` is the pruning config as JSON."""
    prune_config: str = ""

    @classmethod
    def merge(cls, specs):
        configs = {s.prune_config for s in specs}
        if len(configs) != 1:
            raise ValueError("colreduce_kvprune: layers of one KV cache group carry different pruning configs")
        return dataclasses.replace(super().merge(specs), prune_config=configs.pop())

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        """Worker block-table width: one entry more than vLLM's. The worker's row keeps the ids of the blocks freed
        after pruning (it only ever appends), so a request pruned at a prefill of L tokens (offset off = P − keep)
        holds at logical length N cdiv(L) + cdiv(N − off) − cdiv(L − off) <= cdiv(L) + cdiv(N − L) <= cdiv(N) + 1
        entries."""
        return super().max_num_blocks_per_req(vllm_config, max_len) + 1


class PruneManager(FullAttentionManager):
    """FullAttentionManager that counts a pruned request's blocks in compacted tokens.

    offsets[request_id] = P − keep(P) once the request's prefill (of its prompt, or of prompt + outputs after a
    preemption) is computed (0 when not pruned); logical token counts from the scheduler are shifted by it before the
    base class sizes allocations.
    """

    def __init__(self, kv_cache_spec: PrunableFullAttentionSpec, **kwargs):
        super().__init__(kv_cache_spec, **kwargs)
        if self.enable_caching and kwargs.get("kv_cache_group_id", 0) != 0:
            raise ValueError("colreduce_kvprune: prefix caching with pruned layers in more than one KV cache group "
                             "is not supported (the cache lookup of a pruned request would not be refused)")
        self.prune_config = config_from_json(kv_cache_spec.prune_config)
        self.offsets: dict[str, int] = {}
        self.prune_stats = PruneStats(num_blocks=self.block_pool.num_gpu_blocks - 1)
        track(self)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, *args,
                               **kwargs):
        """No cache hit for a request that will be pruned. vLLM looks up a request with max_length = its token count
        − 1 (P, or P + g when it resumes after a preemption; the lookup runs before any per-request call reaches this
        manager; vLLM 0.33 passes a lower bound when its aux output connector is on, a combination versions.py
        refuses). keep_count(P) < P implies keep_count(P + g) < P + g, so every pruned request is refused; a resumed
        request that is not pruned may be refused too, and is then recomputed in full (correct, only slower)."""
        n = max_length + 1
        if keep_count(_spec_config(kv_cache_spec.prune_config), n) < n:
            return tuple([] for _ in kv_cache_group_ids), 0
        return super().find_longest_cache_hit(block_hashes, max_length, kv_cache_group_ids, block_pool,
                                              kv_cache_spec, *args, **kwargs)

    def cache_blocks(self, request, num_tokens, *args, **kwargs):
        """A pruned request never publishes its blocks (compacted contents under the prompt's hashes)."""
        if keep_count(self.prune_config, request.num_prompt_tokens) < request.num_prompt_tokens:
            return None
        return super().cache_blocks(request, num_tokens, *args, **kwargs)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None):
        if (request_id not in self.offsets and num_prompt_tokens is not None
                and processed_computed_tokens >= num_prompt_tokens and self.req_to_blocks.get(request_id)):
            self._prune(request_id, processed_computed_tokens, num_prompt_tokens)
        return super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)

    def _prune(self, request_id: str, prefill_len: int, prompt_len: int) -> None:
        keep = keep_count(self.prune_config, prompt_len)
        self.offsets[request_id] = prompt_len - keep
        if keep >= prompt_len:
            return
        outputs = prefill_len - prompt_len              # > 0: recomputed after preemption, the outputs stay
        blocks = self.req_to_blocks[request_id]
        kept_blocks, prefill_blocks = cdiv(keep + outputs, self.block_size), cdiv(prefill_len, self.block_size)
        tail = blocks[kept_blocks:prefill_blocks]       # blocks after the prefill's (if any) stay, shifted down
        del blocks[kept_blocks:prefill_blocks]
        self.block_pool.free_blocks(reversed(tail))
        s = self.prune_stats
        s.requests_pruned += 1
        s.requests_recomputed += int(outputs > 0)
        s.prompt_tokens += prompt_len
        s.kept_tokens += keep
        s.blocks_freed += len(tail)
        logger.debug("kv prune: request %s prefill %d tokens -> kept %d per kv head, freed %d of %d blocks "
                     "(pool free %d)%s", request_id, prompt_len, keep, len(tail), prefill_blocks,
                     self.block_pool.get_num_free_blocks(),
                     f"; recomputed after preemption with {outputs} outputs, all kept" if outputs else "")

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0):
        off = self.offsets.get(request_id, 0)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - off, new_computed_blocks, total_computed_tokens - off,
            num_local_computed_tokens - off, num_tokens_main_model - off, apply_admission_cap, prefill_end)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        off = self.offsets.get(request_id, 0)
        new = super().allocate_new_blocks(request_id, num_tokens - off, num_tokens_main_model - off)
        s = self.prune_stats
        s.peak_blocks_in_use = max(s.peak_blocks_in_use, s.num_blocks - self.block_pool.get_num_free_blocks())
        return new

    def free(self, request_id):
        self.offsets.pop(request_id, None)
        return super().free(request_id)

    def pop_blocks_for_free(self, request_id):
        self.offsets.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


@functools.lru_cache(maxsize=16)
def _spec_config(text: str):
    """The pruning config carried by a PrunableFullAttentionSpec (parsed once per distinct JSON)."""
    return config_from_json(text)
