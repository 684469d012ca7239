"""KV-cache pruning after prefill in transformers (5.x): the reference path.

    from colreduce_kvprune.hf import generate
    res = generate(model, input_ids, "configs/snapkv.yaml", max_new_tokens=64)
    res.sequences            # generated token ids per prompt
    print(res.summary())     # cache tokens per layer before/after pruning

What happens, per group of prompts of equal length (left padding is stripped and prompts are grouped by their true
length, so each prompt is computed exactly as it would be alone, with no padding in any forward pass):
1. Prefill with the model's normal attention (sdpa or eager). The attention is run through a wrapper registered with
   transformers' `AttentionInterface` (names `colreduce_sdpa` / `colreduce_eager`, set with the public
   `model.set_attn_implementation` for the duration of the call and restored afterwards). The wrapper receives the
   query states exactly as the attention saw them (after projection, q-norm and RoPE); when the forward call carries
   the keyword `colreduce_state` it records the last W queries of every layer (W from the policy's score request)
   and the attention's own `scaling`, then calls the normal attention function unchanged. Nothing in transformers
   is patched; a forward without `colreduce_state` runs exactly the base attention.
2. For every layer, the prompt keys are read from the `DynamicCache` (after RoPE), `policy.scores(window_queries,
   keys)` scores them, `policy.select` picks the kept tokens per kv head, and the cache's key/value tensors are
   gathered to those tokens (each layer may keep a different count: PyramidKV). Policies with per-head counts
   (Ada-KV, `policy.uniform_heads == False`) are realised by masking instead: the cache keeps every token and
   decoding masks the dropped ones per head, so Ada-KV here changes outputs but saves no memory.
3. Decode token by token with logical positions: position ids continue from the original prompt length, while the
   cache (and with it the attention's key length) is the compacted one. During decoding there is no padding and a
   single query sees every cached token, so the wrapper drops the model-built mask (which would be sized by layer 0's
   length) — or replaces it by the Ada-KV per-head mask.
Supported: model types llama, mistral, qwen2, qwen3 with full attention (no active sliding window), attention
implementation sdpa or eager, greedy or sampling (temperature, top-k, top-p); tested with transformers 5.17 and 5.24.
Costs: H2O scores with every prompt query, so its prefill records (B, Hq, L, D) queries per layer until scored;
prompts of different lengths run as separate groups (sampling draws depend on that grouping, greedy does not).
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .config import PruneConfig, load_config
from .policies import check_engine, get_policy, keep_count

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ATTENTION = ("sdpa", "eager")
_WRAPPED_PREFIX = "colreduce_"


# --------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class GenerateResult:
    """What `generate` returns; lists are indexed [prompt] (input order), then [layer], then [kv head].

    sequences: generated token ids (prompt excluded), ending with the eos token when one was produced.
    prompt_lengths: true prompt lengths (padding excluded).
    cache_tokens_before: tokens per kv head in each layer's cache after prefill (= the prompt length).
    cache_tokens_after: tokens per kv head stored in each layer's cache after pruning (for masking policies
        such as Ada-KV, the cache is not shrunk: equal to before).
    attended_tokens: tokens each kv head of each layer can attend to after pruning (differs per head for Ada-KV).
    kept: per layer, the kept prompt positions — LongTensor (Hkv, keep) sorted ascending, or for masking policies
        a BoolTensor (Hkv, prompt_length); None where the layer was not pruned (prompt within budget).
    """
    sequences: list[list[int]]
    prompt_lengths: list[int]
    cache_tokens_before: list[list[int]]
    cache_tokens_after: list[list[int]]
    attended_tokens: list[list[list[int]]]
    kept: list[list[torch.Tensor | None]] = field(repr=False)

    @property
    def saved_fraction(self) -> float:
        """Fraction of the prompts' cache tokens (all prompts, all layers) that pruning freed."""
        before = sum(map(sum, self.cache_tokens_before))
        return 1.0 - sum(map(sum, self.cache_tokens_after)) / before

    def summary(self) -> str:
        """One line per prompt: cache tokens per layer before → after, and the total saving."""
        lines = []
        masked = False
        for i, (b, a, seen) in enumerate(zip(self.cache_tokens_before, self.cache_tokens_after, self.attended_tokens)):
            parts = []
            for x, y, heads in zip(b, a, seen):
                parts.append(f"{x}→{y}" + (f" (attends {'/'.join(map(str, heads))} per kv head)"
                                           if any(h != y for h in heads) else ""))
                masked |= any(h != y for h in heads)
            lines.append(f"prompt {i}: {self.prompt_lengths[i]} tokens; cache tokens per kv head by layer: "
                         + ", ".join(parts))
        lines.append(f"cache saved: {100 * self.saved_fraction:.1f}% of prompt KV tokens"
                     + (" (per-head masking hides tokens from attention but frees no memory)" if masked else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The attention wrapper


@dataclass
class _AttentionState:
    """Per-forward instructions to the attention wrapper, passed as the `colreduce_state` keyword of model(...).

    num_queries: during prefill, record the last this-many query states of each layer (0: record nothing).
    queries: layer → (B, Hq, num_queries, D) recorded queries; scaling: layer → the attention's softmax scale.
    decoding: the forward is a one-token decode step on an unpadded batch: every cached token is visible.
    keep_masks: layer → BoolTensor (B, Hkv, prompt_length) of visible prompt tokens (masking policies only).
    """
    num_queries: int = 0
    queries: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=dict)
    decoding: bool = False
    keep_masks: dict = field(default_factory=dict)

    def decode_mask(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """Additive mask (B, Hq, 1, N) hiding the dropped prompt tokens of `layer`, or None (all visible)."""
        keep = self.keep_masks.get(layer)
        if keep is None:
            return None
        b, hkv, prompt = keep.shape
        visible = torch.ones(b, hkv, key.shape[2], dtype=torch.bool, device=key.device)
        visible[:, :, :prompt] = keep
        visible = visible.repeat_interleave(query.shape[1] // hkv, dim=1)[:, :, None, :]
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(visible, zero, torch.finfo(query.dtype).min)


def _base_attention(name: str, module):
    if name == "eager":   # each model file defines its own eager function; the one its attention would call
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def _make_wrapper(base_name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state = kwargs.pop("colreduce_state", None)
        if state is not None:
            if state.decoding:
                if query.shape[2] != 1:
                    raise RuntimeError("colreduce_kvprune: decode steps must have exactly one query per sequence")
                attention_mask = state.decode_mask(module.layer_idx, query, key)
            elif state.num_queries:
                state.queries[module.layer_idx] = query[:, :, -state.num_queries:].detach().clone()
                state.scaling[module.layer_idx] = kwargs.get("scaling")
        return _base_attention(base_name, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{_WRAPPED_PREFIX}{base_name}"
    return attention


def _register_wrappers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in SUPPORTED_ATTENTION:
        name = _WRAPPED_PREFIX + base
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _make_wrapper(base))
            # masks are built exactly as for the base implementation
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


class _wrapped_attention:
    """Context manager: switch `model` to the wrapping attention implementation, restore the original on exit."""

    def __init__(self, model):
        self.model = model
        self.original = model.config._attn_implementation

    def __enter__(self):
        _register_wrappers()
        self.model.set_attn_implementation(_WRAPPED_PREFIX + self.original)
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.original)
        return False


# --------------------------------------------------------------------------------------------------------------
# Public API


def generate(model, input_ids, config: PruneConfig | str | Mapping, *, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, backend: str = "auto") -> GenerateResult:
    """Generate with the KV cache pruned after prefill by the policy of `config` (see the module docstring).

    model: a transformers CausalLM of a supported type (llama, mistral, qwen2, qwen3) with sdpa or eager attention.
    input_ids: LongTensor (B, L) — left-padded when `attention_mask` (B, L) has zeros — or a list of token-id lists.
    config: PruneConfig, or a YAML path / mapping for `load_config`.
    do_sample=False: greedy. Otherwise sampling with `temperature`, `top_k`, `top_p`, drawn from `generator`
        (or a new one seeded with `seed`; with neither, torch's global RNG).
    eos_token_id: stop a sequence after this token (int or several); None → model.generation_config.eos_token_id;
        [] → never stop early.
    backend: passed to `policy.scores` (the colreduce backend: "auto" | "triton" | "torch").
    Returns a GenerateResult. Greedy outputs are those of each prompt run alone.
    """
    config = load_config(config)
    check_engine(config, "transformers")
    _check_model(model)
    prompts = _prompts(input_ids, attention_mask)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    _check_sliding_window(model, max(map(len, prompts)) + max_new_tokens)
    eos = _eos_ids(model, eos_token_id)
    sampler = _Sampler(do_sample, temperature, top_k, top_p, generator, seed)
    policy = get_policy(config)

    results: list = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    with torch.no_grad(), _wrapped_attention(model):
        for length, rows in by_length.items():
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=model.device)
            group = _generate_group(model, ids, config, policy, max_new_tokens, sampler, eos, backend)
            for j, i in enumerate(rows):
                results[i] = [part[j] for part in group]
    seqs, before, after, attended, kept = zip(*results)
    return GenerateResult(sequences=list(seqs), prompt_lengths=[len(p) for p in prompts],
                          cache_tokens_before=list(before), cache_tokens_after=list(after),
                          attended_tokens=list(attended), kept=list(kept))


# --------------------------------------------------------------------------------------------------------------
# Prefill, prune, decode


def _generate_group(model, ids, config, policy, max_new_tokens, sampler, eos, backend):
    """Prompts of equal length L, no padding: ids (B, L). Returns per-row lists
    (sequence, before, after, attended, kept), each a list over rows."""
    batch, length = ids.shape
    num_layers = model.config.num_hidden_layers
    keeps = [keep_count(config, length, layer=li, num_layers=num_layers) for li in range(num_layers)]
    pruned_layers = [li for li in range(num_layers) if keeps[li] < length]
    request = policy.score_request(length)
    wants_queries = bool(pruned_layers) and request.kind == "attention"
    state = _AttentionState(num_queries=min(request.num_queries, length) if wants_queries else 0)

    cache = DynamicCache(config=model.config)    # filled in place by every forward
    cache_kw = {_cache_keyword(model): cache}
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, colreduce_state=state, **cache_kw).logits[:, -1]

    kept = [[None] * num_layers for _ in range(batch)]
    attended = [[[length] * model.config.num_key_value_heads for _ in range(num_layers)] for _ in range(batch)]
    stored = [[length] * num_layers for _ in range(batch)]
    decode_state = _AttentionState(decoding=True)
    for li in pruned_layers:
        layer = _cache_layer(cache, li)
        rows = []
        for b in range(batch):
            window = state.queries[li][b] if wants_queries else None
            scores = policy.scores(window, layer.keys[b], layer=li, scale=state.scaling.get(li), backend=backend)
            if policy.uniform_heads:
                rows.append(policy.select(scores, layer=li, num_layers=num_layers))
            else:
                rows.append(policy.select_mask(scores, layer=li, num_layers=num_layers))
        for b, row in enumerate(rows):
            kept[b][li] = row.cpu()
            if policy.uniform_heads:
                stored[b][li] = row.shape[1]
                attended[b][li] = [row.shape[1]] * row.shape[0]
            else:
                attended[b][li] = row.sum(dim=1).tolist()
        if policy.uniform_heads:
            index = torch.stack(rows).to(layer.keys.device)                       # (B, Hkv, keep)
            index = index[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = torch.gather(layer.keys, 2, index)
            layer.values = torch.gather(layer.values, 2, index.expand(-1, -1, -1, layer.values.shape[-1]))
        else:
            decode_state.keep_masks[li] = torch.stack(rows).to(layer.keys.device)  # (B, Hkv, L)
    del state

    tokens = [sampler(logits)]
    done = _is_eos(tokens[0], eos)
    for step in range(1, max_new_tokens):
        if bool(done.all()):
            break
        position = torch.full((batch, 1), length + step - 1, dtype=torch.long, device=ids.device)
        logits = model(input_ids=tokens[-1][:, None], position_ids=position, use_cache=True,
                       colreduce_state=decode_state, **cache_kw).logits[:, -1]
        tokens.append(sampler(logits))
        done = done | _is_eos(tokens[-1], eos)
    sequences = [_truncate(row, eos) for row in torch.stack(tokens, dim=1).tolist()]
    before = [[length] * num_layers for _ in range(batch)]
    return sequences, before, stored, attended, kept


def _cache_keyword(model) -> str:
    """The forward keyword of the cache: `cache` (transformers >= 5.24) or `past_key_values` (earlier)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_layer(cache, layer_idx: int):
    """The DynamicLayer of `layer_idx`; other layer kinds (sliding window, static, quantized) are refused."""
    from transformers.cache_utils import DynamicLayer

    layer = cache.layers[layer_idx]
    if type(layer) is not DynamicLayer:
        raise NotImplementedError(f"colreduce_kvprune.hf prunes DynamicLayer caches only; layer {layer_idx} is a "
                                  f"{type(layer).__name__}")
    return layer


# --------------------------------------------------------------------------------------------------------------
# Checks and small helpers


def _check_model(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"colreduce_kvprune.hf.generate does not support model type {model_type!r}; "
                                  f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    impl = model.config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise NotImplementedError(f"colreduce_kvprune.hf.generate supports attn_implementation "
                                  f"{' or '.join(SUPPORTED_ATTENTION)}; the model uses {impl!r} "
                                  f"(call model.set_attn_implementation('sdpa'))")


def _check_sliding_window(model, total_tokens: int) -> None:
    """Refuse an active sliding window: after pruning, cache slots no longer map to positions."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or ()
    uses_window = any(t != "full_attention" for t in layer_types) or (
        window is not None and getattr(cfg, "use_sliding_window", True) is not False)
    if uses_window and (window is None or window < total_tokens):
        raise NotImplementedError(
            f"colreduce_kvprune.hf.generate needs full attention, but this {cfg.model_type} model uses a sliding "
            f"window of {window} tokens (layer types {sorted(set(layer_types)) or 'n/a'}) and the prompt plus new "
            f"tokens reach {total_tokens}")


def _prompts(input_ids, attention_mask) -> list[list[int]]:
    """Token-id lists with left padding removed. input_ids: (B, L) tensor (+ mask (B, L)) or a list of lists."""
    if not isinstance(input_ids, torch.Tensor):
        if attention_mask is not None:
            raise ValueError("attention_mask is only meaningful with a (B, L) input_ids tensor, not token lists")
        prompts = [list(map(int, p)) for p in input_ids]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("input_ids must be a non-empty list of non-empty token-id lists")
        return prompts
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int32) or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty integer tensor of shape (B, L), got shape "
                         f"{tuple(input_ids.shape)} dtype {input_ids.dtype}")
    ids = input_ids.cpu()
    if attention_mask is None:
        return ids.tolist()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.cpu().bool()
    prompts = []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        if n == 0 or not bool(mask[b, ids.shape[1] - n:].all()):
            raise ValueError(f"attention_mask row {b} must be left padding (zeros, then at least one 1, no gaps); "
                             f"got {mask[b].int().tolist()}")
        prompts.append(ids[b, ids.shape[1] - n:].tolist())
    return prompts


def _eos_ids(model, eos_token_id) -> torch.Tensor:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = []
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return torch.tensor(list(eos_token_id), dtype=torch.long, device=model.device)


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    return torch.isin(tokens, eos)


def _truncate(row: list[int], eos: torch.Tensor) -> list[int]:
    stops = set(eos.tolist())
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


class _Sampler:
    """Next token from logits (B, V): argmax, or a draw after temperature, top-k and top-p (nucleus) filtering."""

    def __init__(self, do_sample, temperature, top_k, top_p, generator, seed):
        if do_sample:
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
            if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
            if top_p is not None and not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
            if generator is None and seed is not None:
                generator = torch.Generator().manual_seed(seed)
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= self.top_p   # keeps at least the top token
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        gen = self.generator
        if gen is not None and gen.device != probs.device:
            probs = probs.to(gen.device)
        return torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)
