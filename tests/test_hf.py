"""The transformers path (colreduce_kvprune.hf) against plain `model.generate` and against an independent eager
implementation written here: attention probabilities from eager attention (output_attentions), window reduction,
pooling, top-k with sinks + window, per-head gather of the cache, and a manual decode loop with explicit positions.
Tiny random float32 models (tests/tiny_models.py), CPU."""
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import KINDS, make_tiny_model  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from colreduce_kvprune.hf import SUPPORTED_MODEL_TYPES, GenerateResult, generate  # noqa: E402
from colreduce_kvprune.policies import get_policy, keep_count  # noqa: E402

PROMPT_LEN = 96
NEW = 10


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module", params=KINDS)
def any_model(request, tmp_path_factory):
    return _load(make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _load(make_tiny_model("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _load(make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"), seed=3))


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


def _cfg(policy, keep=40, **extra):
    cfg = {"policy": policy, "budget": {"keep_tokens": keep}, "window": 8, "sink_tokens": 2, "min_prompt_tokens": 0}
    cfg.update(extra)
    return cfg


def _hf_generate(model, prompt, new=NEW):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=[],
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------------------------------
# The independent reference


def _window_scores(probs, cfg, length, hkv):
    """probs (Hq, L, L) eager attention probabilities of one layer → (Hkv, L) policy scores, written from the papers'
    definitions: reduce the last W query rows, combine the query heads of a group, SnapKV-pool the prefix."""
    policy = cfg["policy"]
    w = {"h2o": length, "tova": 1}.get(policy, cfg["window"])
    rows = probs[:, length - w:, :].double()                          # (Hq, W, L); masked entries are exactly 0
    reduction = cfg.get("reduction", "sum")
    if reduction == "sum":
        col = rows.sum(1)
    elif reduction == "max":
        col = rows.max(1).values
    else:
        seen = torch.tensor([min(w, length - j) for j in range(length)], dtype=torch.float64)
        col = rows.sum(1) / seen
    grouped = col.view(hkv, -1, length)
    col = {"sum": grouped.sum(1), "mean": grouped.mean(1), "max": grouped.max(1).values}[cfg.get("group_reduce",
                                                                                              "mean")]
    if policy in ("snapkv", "pyramidkv", "adakv"):
        kind, kernel = cfg.get("pooling", {}).get("kind", "max"), cfg.get("pooling", {}).get("kernel", 7)
        n_prefix, r = length - w, kernel // 2
        pooled = col.clone()
        for j in range(n_prefix):
            span = col[:, max(0, j - r): min(n_prefix, j + r + 1)]
            pooled[:, j] = span.max(1).values if kind == "max" else span.sum(1) / kernel
        col = pooled
    if not cfg.get("per_head", True):
        col = col.mean(0, keepdim=True).expand_as(col)
    return col


def _top_tokens(scores_row, length, keep, sinks, window):
    protected = [j for j in range(length) if j < sinks or j >= length - window]
    rest = sorted((j for j in range(length) if j not in protected), key=lambda j: (-float(scores_row[j]), j))
    return sorted(protected + rest[: keep - len(protected)])


def reference_generate(model, prompt, cfg, new=NEW):
    """Greedy tokens and per-layer kept indices (Hkv lists) or Ada-KV masks, computed without hf.py."""
    length, num_layers = len(prompt), model.config.num_hidden_layers
    hkv = model.config.num_key_value_heads
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            probs = model(ids, output_attentions=True).attentions         # per layer (1, Hq, L, L)
        finally:
            model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        cache_kw = {_cache_keyword(model): cache}
        logits = model(ids, use_cache=True, **cache_kw).logits[0, -1]
        kept, masks = [], {}
        for li, layer in enumerate(cache.layers):
            keep = keep_count(cfg, length, layer=li, num_layers=num_layers)
            if cfg["policy"] == "streamingllm":
                rows = [list(range(cfg["sink_tokens"])) + list(range(length - (keep - cfg["sink_tokens"]), length))
                        ] * hkv
            else:
                scores = _window_scores(probs[li][0], cfg, length, hkv)
                if cfg["policy"] == "adakv":
                    mask = get_policy(cfg).select_mask(scores.float(), layer=li)
                    masks[li] = mask
                    kept.append(mask)
                    continue
                rows = [_top_tokens(scores[h], length, keep, cfg["sink_tokens"], cfg["window"])
                        for h in range(hkv)]
            kept.append(rows)
            index = torch.tensor(rows)[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        tokens = [int(logits.argmax())]
        hooks = [attn.register_forward_pre_hook(_per_head_mask_hook(masks[li], length), with_kwargs=True)
                 for li, attn in enumerate(_attention_modules(model)) if li in masks]
        try:
            for step in range(1, new):
                logits = model(torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[length + step - 1]]),
                               use_cache=True, **cache_kw).logits[0, -1]
                tokens.append(int(logits.argmax()))
        finally:
            for h in hooks:
                h.remove()
    return tokens, kept


def _cache_keyword(model):
    """transformers >= 5.24 names the forward's cache argument `cache`, earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def _per_head_mask_hook(mask, length):
    """Replace a decode step's attention mask by a boolean (1, Hq, 1, N) one hiding the dropped prompt tokens of
    each kv head (mask (Hkv, L), True = kept)."""
    def hook(module, args, kwargs):
        cache = kwargs["cache"] if "cache" in kwargs else kwargs["past_key_values"]
        n = cache.layers[module.layer_idx].keys.shape[2] + 1                # cached tokens + the new one
        visible = torch.ones(mask.shape[0], n, dtype=torch.bool)
        visible[:, :length] = mask
        groups = module.config.num_attention_heads // mask.shape[0]
        kwargs["attention_mask"] = visible.repeat_interleave(groups, 0)[None, :, None, :]
        return args, kwargs
    return hook



# ------------------------------------------------------------------------------------------------------------
# Tests


def test_untouched_budget_equals_plain_generate(any_model):
    """Budget >= prompt: no layer is pruned and the greedy tokens are exactly those of model.generate."""
    prompts = _prompts([PROMPT_LEN, PROMPT_LEN], seed=1)
    res = generate(any_model, torch.tensor(prompts), _cfg("snapkv", keep=PROMPT_LEN + 50), max_new_tokens=NEW,
                   eos_token_id=[])
    assert res.sequences == [_hf_generate(any_model, p) for p in prompts]
    assert res.cache_tokens_after == res.cache_tokens_before == [[PROMPT_LEN] * 2] * 2
    assert res.kept == [[None, None]] * 2 and res.saved_fraction == 0.0
    assert any_model.config._attn_implementation == "sdpa"          # restored after the call


@pytest.mark.parametrize("policy,extra", [
    ("snapkv", {}),
    ("snapkv", {"pooling": {"kind": "avg", "kernel": 5}, "reduction": "mean", "group_reduce": "max",
                "per_head": False}),
    ("h2o", {}),
    ("tova", {"per_head": False}),
    ("streamingllm", {}),
    ("pyramidkv", {"pooling": {"kind": "avg", "kernel": 7}}),
], ids=["snapkv", "snapkv-avg-mean-max-shared", "h2o", "tova", "streamingllm", "pyramidkv"])
def test_pruned_equals_eager_reference(llama, policy, extra):
    cfg = _cfg(policy, **extra)
    prompt = _prompts([PROMPT_LEN], seed=2)[0]
    res = generate(llama, [prompt], cfg, max_new_tokens=NEW, eos_token_id=[])
    tokens, kept = reference_generate(llama, prompt, cfg)
    assert [k.tolist() for k in res.kept[0]] == kept
    assert res.sequences[0] == tokens
    assert res.sequences[0] != _hf_generate(llama, prompt)              # pruning changed the output


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_snapkv_equals_reference_on_other_architectures(kind, tmp_path):
    model = _load(make_tiny_model(kind, tmp_path, seed=5))
    cfg = _cfg("snapkv", keep=32)
    prompt = _prompts([PROMPT_LEN], seed=3)[0]
    res = generate(model, [prompt], cfg, max_new_tokens=NEW, eos_token_id=[])
    tokens, kept = reference_generate(model, prompt, cfg)
    assert [k.tolist() for k in res.kept[0]] == kept
    assert res.sequences[0] == tokens != _hf_generate(model, prompt)


def test_pyramidkv_per_layer_counts(tmp_path):
    model = _load(make_tiny_model("llama", tmp_path, num_hidden_layers=4))
    cfg = _cfg("pyramidkv", keep=40)
    res = generate(model, _prompts([PROMPT_LEN], seed=4), cfg, max_new_tokens=3, eos_token_id=[])
    expected = [keep_count(cfg, PROMPT_LEN, layer=li, num_layers=4) for li in range(4)]
    assert len(set(expected)) > 1 and sum(expected) == 4 * 40
    assert res.cache_tokens_after == [expected]
    assert [k.shape for k in res.kept[0]] == [(2, e) for e in expected]
    assert res.attended_tokens == [[[e, e] for e in expected]]


def test_adakv_masks_match_and_decode_matches_reference(llama):
    cfg = _cfg("adakv", pooling={"kind": "max", "kernel": 5}, adakv={"alpha": 0.2})
    prompt = _prompts([PROMPT_LEN], seed=6)[0]
    res = generate(llama, [prompt], cfg, max_new_tokens=NEW, eos_token_id=[])
    tokens, masks = reference_generate(llama, prompt, cfg)
    for li, (got, want) in enumerate(zip(res.kept[0], masks)):
        assert got.dtype == torch.bool and torch.equal(got, want)
        assert int(got.sum()) == 2 * keep_count(cfg, PROMPT_LEN, layer=li)
        assert res.attended_tokens[0][li] == got.sum(1).tolist()
    assert any(len(set(a)) > 1 for a in res.attended_tokens[0])        # heads got different counts
    assert res.cache_tokens_after == res.cache_tokens_before == [[PROMPT_LEN] * 2]   # masking saves no memory
    assert res.saved_fraction == 0.0 and "frees no memory" in res.summary()
    assert res.sequences[0] == tokens != _hf_generate(llama, prompt)


def test_padded_batch_equals_each_prompt_alone(qwen3):
    lengths = [PROMPT_LEN, 70, PROMPT_LEN, 30]      # the 30-token prompt is below the budget: untouched
    prompts = _prompts(lengths, seed=7)
    ids = torch.zeros(len(prompts), PROMPT_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, PROMPT_LEN - len(p):] = torch.tensor(p)
        mask[i, PROMPT_LEN - len(p):] = 1
    cfg = _cfg("snapkv", keep=40)
    res = generate(qwen3, ids, cfg, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    alone = [generate(qwen3, [p], cfg, max_new_tokens=NEW, eos_token_id=[]) for p in prompts]
    assert res.sequences == [a.sequences[0] for a in alone]
    assert res.prompt_lengths == lengths
    assert res.cache_tokens_after == [[40, 40], [40, 40], [40, 40], [30, 30]]
    assert res.kept[3] == [None, None]
    assert res.sequences[3] == _hf_generate(qwen3, prompts[3])


def test_saving_report(llama):
    cfg = _cfg("snapkv", keep=40, min_prompt_tokens=50)
    res = generate(llama, _prompts([PROMPT_LEN, 45], seed=8), cfg, max_new_tokens=2, eos_token_id=[])
    assert isinstance(res, GenerateResult)
    assert res.cache_tokens_before == [[PROMPT_LEN] * 2, [45] * 2]
    assert res.cache_tokens_after == [[40, 40], [45, 45]]              # the short prompt is below min_prompt_tokens
    assert res.saved_fraction == pytest.approx(1 - (80 + 90) / (2 * PROMPT_LEN + 90))
    text = res.summary()
    assert f"{PROMPT_LEN}→40" in text and "45→45" in text and f"{100 * res.saved_fraction:.1f}%" in text


def test_sampling(llama):
    prompts = _prompts([PROMPT_LEN], seed=9)
    cfg = _cfg("snapkv")
    greedy = generate(llama, prompts, cfg, max_new_tokens=NEW, eos_token_id=[]).sequences
    one = generate(llama, prompts, cfg, max_new_tokens=NEW, eos_token_id=[], do_sample=True, top_k=1, seed=1)
    tiny_p = generate(llama, prompts, cfg, max_new_tokens=NEW, eos_token_id=[], do_sample=True, top_p=1e-6, seed=2)
    assert one.sequences == tiny_p.sequences == greedy
    runs = [generate(llama, prompts, cfg, max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=2.0,
                     seed=s).sequences for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_eos_stops_a_sequence(llama):
    prompt = _prompts([PROMPT_LEN], seed=10)[0]
    full = generate(llama, [prompt], _cfg("snapkv"), max_new_tokens=NEW, eos_token_id=[]).sequences[0]
    stop = full[3]
    res = generate(llama, [prompt], _cfg("snapkv"), max_new_tokens=NEW, eos_token_id=stop)
    assert res.sequences[0] == full[: full.index(stop) + 1]


def test_unsupported_model_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(NotImplementedError, match="model type 'gpt2'") as err:
        generate(model, [[1, 2, 3]], _cfg("snapkv"))
    assert all(t in str(err.value) for t in SUPPORTED_MODEL_TYPES)


def test_refusals(tmp_path, llama):
    windowed = _load(make_tiny_model("mistral", tmp_path, sliding_window=64))
    with pytest.raises(NotImplementedError, match="sliding window of 64"):
        generate(windowed, [[5] * PROMPT_LEN], _cfg("snapkv"))
    with pytest.raises(ValueError, match="left padding"):
        generate(llama, torch.ones(1, 4, dtype=torch.long), _cfg("snapkv"),
                 attention_mask=torch.tensor([[1, 1, 0, 1]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(llama, [[5, 6]], _cfg("snapkv"), max_new_tokens=0)


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv"])
def test_eager_attention_model(tmp_path, policy):
    """With attn_implementation="eager" the model builds materialised masks (sized by layer 0's cache): decoding
    must still see every kept token of each layer (PyramidKV: layers of different lengths; Ada-KV: additive mask)."""
    path = make_tiny_model("llama", tmp_path, num_hidden_layers=3)
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = _cfg(policy)
    prompt = _prompts([PROMPT_LEN], seed=11)[0]
    res = generate(eager, [prompt], cfg, max_new_tokens=NEW, eos_token_id=[])
    tokens, kept = reference_generate(_load(path), prompt, cfg)
    assert res.sequences[0] == tokens
    assert eager.config._attn_implementation == "eager"
