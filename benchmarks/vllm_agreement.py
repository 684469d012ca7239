"""vLLM plugin vs the transformers path on one device: greedy tokens, kept indices per (layer, kv head), and the
compacted cache contents. The GPU evidence of the "vLLM on CUDA" issue; runs on the CPU build too.

    python benchmarks/vllm_agreement.py --dtype float32 --out agree_fp32.json          # TRITON_ATTN on CUDA
(tiny random Llama: hidden 256, 4 layers, 8 query / 2 kv heads of dim 64, built on first use; prompts of 1k-8k)
    python benchmarks/vllm_agreement.py --dtype bfloat16 --backend FLASH_ATTN --out agree_bf16.json

For each policy: one vLLM engine (in-process, so the worker's calls can be observed) prunes the prompts; every
layer's selection is recorded together with the selection that float64 scores of the same query/key tensors give
(vLLM's own tensors, scored by the pure-torch reference), and after each layer's compaction the cache rows at the
kept slots are compared bitwise with the step's K/V rows of the kept tokens. The transformers path
(colreduce_kvprune.hf.generate, same device, same dtype) gives the reference tokens and selections. Printed and
written as JSON: per policy and prompt, the first generated token where vLLM and transformers differ (None = equal),
the number of (layer, head) selections that differ, how many kept indices differ, and for each differing selection
the float64 score margin between the tokens swapped (a near-tie when it is tiny against the score scale).
Prompt lengths must be distinct (they identify the prompt inside the worker).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # the worker in this process: observable
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLICIES = {
    "snapkv": dict(policy="snapkv", window=32, pooling={"kind": "max", "kernel": 7}),
    "h2o": dict(policy="h2o", window=32),
    "tova": dict(policy="tova", window=32),
    "streamingllm": dict(policy="streamingllm", window=32),
    "knorm": dict(policy="knorm", window=32),
}


def build_model(path: str, max_len: int) -> str:
    from colreduce_kvprune.tiny_model import make_tiny_model

    if not os.path.isfile(os.path.join(path, "config.json")):
        # Built beside its place and renamed into it: two runs started at once (scripts/gpu_vllm_suite.sh runs two)
        # must not load a folder the other is still writing (config.json is saved before the weights).
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
        try:
            make_tiny_model("llama", tmp, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                            max_position_embeddings=max(4096, max_len))
            os.rename(tmp, path)        # atomic; fails when another run has put its (identical, seed 0) model there
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


class Recorder:
    """Observes the worker: selections per (prompt length, layer), float64 selections, cache checks."""

    def __init__(self):
        self.selections: dict[tuple[int, int], list] = {}     # (P, layer) -> [idx (Hkv, keep), idx64, scores64]
        self.cache_checks = {"layers_checked": 0, "mismatched_layers": 0, "rows_checked": 0}
        self._installed = False

    def install(self):
        import torch

        from colreduce_kvprune.vllm import backend_common, compaction

        if self._installed:
            return
        self._installed = True
        rec = self
        original_select = compaction.select_kept
        original_layer_scores = compaction.layer_scores
        original_add = compaction.StepSelection.add
        original_compact = backend_common.PruneImplMixin._prune_compact
        pending64 = {}          # (P, layer) -> (idx64, scores64), from the layer's float64 selection
        pending_checks = []     # cache checks of a step selected once for every layer, run after its writes

        busy = []               # inside the float64 selection (select_kept calls layer_scores)

        def layer_scores(policy, plan, query, key, *, layer, scale, backend="auto", **kw):
            # every scoring (per layer or once per step) passes here: the float64 selection of vLLM's own Q/K
            if busy:
                return original_layer_scores(policy, plan, query, key, layer=layer, scale=scale, backend=backend,
                                             **kw)
            tp = {k: v for k, v in kw.items() if k in ("head_offset", "gather_heads", "partials")}
            # a last chunk scored in the paged cache (compaction.scores_from_cache) comes without its keys: the
            # float64 path reads them there
            keys = key if key is not None else _paged_keys(compaction, plan, *kw["paged"])
            busy.append(True)
            try:
                idx64 = original_select(policy, plan, query.double(), keys.double(), layer=layer, scale=scale,
                                        backend="torch", **tp)
            finally:
                busy.clear()
            scores64 = _scores64(policy, plan, query, keys, layer, scale, kw.get("partials"))
            for b, (length, keep) in enumerate(zip(plan.lengths, plan.keeps)):
                pending64[(length, layer)] = (idx64[b, :, :keep].cpu(), scores64[b].cpu())
            return original_layer_scores(policy, plan, query, key, layer=layer, scale=scale, backend=backend, **kw)

        def record(plan, layer, idx):
            for b, (length, keep) in enumerate(zip(plan.lengths, plan.keeps)):
                rec.selections[(length, layer)] = [idx[b, :, :keep].cpu(), *pending64.pop((length, layer))]

        def select_kept(policy, plan, query, key, *, layer, scale, backend="auto", **tp):    # per-layer path
            idx = original_select(policy, plan, query, key, layer=layer, scale=scale, backend=backend, **tp)
            record(plan, layer, idx)
            return idx

        def add(self, policy, plan, layer, scores, finish, **kw):                          # once per step
            def finish_recorded(kept, i):
                record(plan, layer, kept.idx[i])
                finish(kept, i)
            return original_add(self, policy, plan, layer, scores, finish_recorded, **kw)

        def prune_compact(self, layer, layer_idx, query, key, value, kv_cache, step, output):
            original_compact(self, layer, layer_idx, query, key, value, kv_cache, step, output)
            if step.plan.sources is None:      # the K/V rows of the kept tokens are the step's (no chunks)
                # copies: under compiled graphs the step's K/V tensors may be buffers reused by later layers
                pending_checks.append((self, layer, key.clone(), value.clone(), kv_cache, step.plan))
            else:                              # a last chunk: kept rows come from the cache too (not checked here)
                rec.cache_checks["chunked_layers_not_checked"] = rec.cache_checks.get(
                    "chunked_layers_not_checked", 0) + 1
            if step.selection is None or step.selection.done:    # this layer's (or every layer's) writes are done
                with torch.no_grad():
                    for args in pending_checks:
                        rec._check_cache(*args)
                pending_checks.clear()

        compaction.select_kept = select_kept
        compaction.layer_scores = layer_scores
        compaction.StepSelection.add = add
        backend_common.PruneImplMixin._prune_compact = prune_compact

    def _check_cache(self, impl, layer, key, value, kv_cache, plan):
        """The cache rows at the kept slots == the step's K/V rows of the kept tokens, bitwise."""
        import torch

        from vllm.model_executor.models.utils import extract_layer_index

        li = extract_layer_index(layer.layer_name)
        hkv = key.shape[1]
        views = impl.prune_kv_views(kv_cache)   # the backend's own reading of its cache layout
        if views is None:                       # the CPU cache's layout is ISA-specific (packed tiles): not read
            self.cache_checks["layers_checked"] = None
            return
        key_cache, value_cache = views          # (blocks, block_size, Hkv, D) each
        bs = key_cache.shape[1]
        bad = 0
        for b, (start, length, keep) in enumerate(zip(plan.starts, plan.lengths, plan.keeps)):
            idx = self.selections[(length, li)][0].to(key.device)                      # (Hkv, keep)
            e0 = plan.kept_starts[b]
            slots = plan.slots[e0: e0 + keep]
            if int(slots.max()) >= key_cache.shape[0] * bs or int(slots.min()) < 0:
                bad += 1
                continue
            heads = torch.arange(hkv, device=key.device)
            want_k = key[start + idx.t(), heads]                                       # (keep, Hkv, D)
            want_v = value[start + idx.t(), heads]
            got_k, got_v = key_cache[slots // bs, slots % bs], value_cache[slots // bs, slots % bs]
            bad += int(not (torch.equal(got_k, want_k) and torch.equal(got_v, want_v)))
            self.cache_checks["rows_checked"] += keep
        self.cache_checks["layers_checked"] += 1
        self.cache_checks["mismatched_layers"] += int(bad > 0)


def _paged_keys(compaction, plan, key_cache, block_table):
    """The keys of every row of an assembled plan (tokens 0..L-1, back to back) read from the paged cache, as
    compaction.assemble would gather them: (sum L, Hkv, D)."""
    blocks, slots = compaction._cache_positions(plan, block_table, key_cache.shape[1])
    return key_cache[blocks, slots]


def _scores64(policy, plan, query, key, layer, scale, partials=None):
    """float64 scores (B, Hkv, P_max) of every pruned row, padded with nan (what the policy ranks)."""
    import torch

    from colreduce_kvprune.vllm import compaction

    out = torch.full((len(plan.lengths), key.shape[1], max(plan.lengths)), float("nan"), dtype=torch.float64,
                     device=key.device)
    scores = compaction.row_scores(policy, plan, query.double(), key.double(), layer=layer, scale=scale,
                                   backend="torch", partials=partials)
    for b, s in enumerate(scores):
        out[b, :, :plan.lengths[b]] = s
    return out


def compare_selection(vidx, hidx, scores64):
    """(differing kept indices, worst margin): for one (layer, head), the tokens only vLLM kept vs only the
    reference kept, and the float64 score gap between them relative to the score scale."""
    a, b = set(vidx.tolist()), set(hidx.tolist())
    only_v, only_h = sorted(a - b), sorted(b - a)
    if not only_v:
        return 0, 0.0
    s = scores64
    scale = float(s[~s.isnan()].abs().max()) or 1.0
    gap = abs(float(s[only_v].min()) - float(s[only_h].max())) / scale
    return len(only_v), gap


def _write(report: dict, path: str | None) -> None:
    """The report so far (after every policy: a run stopped by a time limit keeps what it measured)."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from colreduce_kvprune.hf import generate
    from colreduce_kvprune.policies import keep_count
    from colreduce_kvprune.vllm.settings import resolved_settings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [int(x) for x in args.lengths.split(",")]
    assert len(set(lengths)) == len(lengths), "prompt lengths must be distinct"
    rng = random.Random(args.seed)
    prompts = [[1] + [rng.randrange(3, 512) for _ in range(n - 1)] for n in lengths]
    model_dir = build_model(args.model, max(lengths) + args.max_tokens)
    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=args.hf_attn).to(device)
    hf.eval()
    rec = Recorder()
    rec.install()
    max_len = max(lengths) + args.max_tokens
    engine_kw = dict(model=model_dir, skip_tokenizer_init=True, dtype=args.dtype, max_model_len=max_len,
                     max_num_batched_tokens=max(max_len, 8192), seed=0)
    if device == "cuda":
        engine_kw["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
        engine_kw["gpu_memory_utilization"] = 0.15    # the pool is fixed: this only gates vLLM's free-memory check
    if args.backend:
        engine_kw["attention_backend"] = args.backend
    for kv in args.engine_arg:
        k, v = kv.split("=", 1)
        engine_kw[k] = json.loads(v)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": args.dtype,
              "backend": args.backend, "lengths": lengths, "max_tokens": args.max_tokens,
              "v2_model_runner": os.environ.get("VLLM_USE_V2_MODEL_RUNNER"), "engine_kw": {
                  k: v for k, v in engine_kw.items() if k != "model"}, "policies": {}}
    import vllm
    report["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}

    def engine_tokens(prune):
        kw = dict(engine_kw)
        if prune is not None:
            kw["additional_config"] = {"kv_prune": prune}
        llm = LLM(**kw)
        try:
            runner = _runner_name(llm)
            # what vLLM resolved its defaults to, per engine (a pruning backend changes the cudagraph mode)
            name = "vanilla" if prune is None else _cfg(prune).policy
            report.setdefault("engine_settings", {})[name] = resolved_settings(llm.llm_engine.vllm_config)
            t = time.time()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs], runner, time.time() - t
        finally:
            _shutdown(llm)

    if not args.skip_vanilla:
        got, runner, secs = engine_tokens(None)
        want = generate(hf, prompts, dict(policy="streamingllm", budget={"keep_ratio": 1.0}),
                        max_new_tokens=args.max_tokens, eos_token_id=[]).sequences
        report["vanilla"] = {"runner": runner, "first_diff": [_first_diff(g, w) for g, w in zip(got, want)],
                             "vllm_tokens": got, "hf_tokens": want}
        print(f"vanilla vLLM ({runner}) vs transformers unpruned: first differing token per prompt "
              f"{report['vanilla']['first_diff']}", flush=True)
        _write(report, args.out)
    for name in args.policies.split(","):
        config = dict(POLICIES[name], budget={"keep_ratio": args.keep_ratio}, sink_tokens=4, min_prompt_tokens=64)
        rec.selections.clear()
        got, runner, secs = engine_tokens(config)
        res = generate(hf, prompts, config, max_new_tokens=args.max_tokens, eos_token_id=[])
        per_prompt = []
        for i, n in enumerate(lengths):
            keep = keep_count(_cfg(config), n)
            diff_sel = diff_idx = diff_sel64 = 0
            margins = []
            for li in range(hf.config.num_hidden_layers):
                if (n, li) not in rec.selections:
                    continue
                vidx, vidx64, s64 = rec.selections[(n, li)]
                hidx = res.kept[i][li]
                for h in range(vidx.shape[0]):
                    d, gap = compare_selection(vidx[h], hidx[h], s64[h])
                    if d:
                        diff_sel += 1
                        diff_idx += d
                        margins.append(gap)
                    diff_sel64 += int(not torch.equal(vidx[h], vidx64[h]))
            recorded = sum((n, li) in rec.selections for li in range(hf.config.num_hidden_layers))
            per_prompt.append({"prompt_len": n, "keep": keep, "layers_recorded": recorded,
                               "first_diff": _first_diff(got[i], res.sequences[i]),
                               "selections_differing_from_hf": diff_sel, "kept_indices_differing": diff_idx,
                               "max_relative_margin": max(margins) if margins else None,
                               "selections_differing_from_own_fp64": diff_sel64})
        equal = sum(p["first_diff"] is None for p in per_prompt)
        report["policies"][name] = {"runner": runner, "generate_s": secs, "prompts_equal": equal,
                                    "prompts": per_prompt, "cache_checks": dict(rec.cache_checks),
                                    "vllm_tokens": got, "hf_tokens": res.sequences}
        print(f"{name} ({runner}): tokens equal on {equal}/{len(lengths)}; "
              + "; ".join(f"P={p['prompt_len']} diff@{p['first_diff']} sel!={p['selections_differing_from_hf']}"
                          f"/{p['kept_indices_differing']} margin={p['max_relative_margin']}"
                          f" own64!={p['selections_differing_from_own_fp64']}" for p in per_prompt)
              + f"; cache {rec.cache_checks}", flush=True)
        rec.cache_checks = {"layers_checked": 0, "mismatched_layers": 0, "rows_checked": 0}
        _write(report, args.out)
    return report


def _cfg(config):
    from colreduce_kvprune.config import load_config

    return load_config(config)


def _first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _runner_name(llm) -> str:
    try:
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
        return type(worker.model_runner).__module__ + "." + type(worker.model_runner).__name__
    except AttributeError:
        return "unknown"


def _shutdown(llm):
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def compare_runs(paths: list[str]) -> dict:
    """Pairs (reference run, other run) of this script's JSON reports, e.g. eager vs CUDA graphs: per pair, how many
    prompts got the same vLLM tokens, for vanilla vLLM and for each policy both ran."""
    out = {}
    for ref_path, other_path in zip(paths[::2], paths[1::2]):
        ref, other = (json.load(open(p)) for p in (ref_path, other_path))
        pair = {"reference": ref_path, "other": other_path, "reference_engine": ref.get("engine_kw"),
                "other_engine": other.get("engine_kw"), "runs": {}}
        runs = [("vanilla", ref.get("vanilla"), other.get("vanilla"))]
        runs += [(k, v, other["policies"].get(k)) for k, v in ref["policies"].items()]
        for name, a, b in runs:
            if a is None or b is None:
                continue
            firsts = [_first_diff(x, y) for x, y in zip(a["vllm_tokens"], b["vllm_tokens"])]
            pair["runs"][name] = {"prompts_equal": sum(f is None for f in firsts), "prompts": len(firsts),
                                  "first_diff": firsts}
            print(f"{os.path.basename(ref_path)} vs {os.path.basename(other_path)}: {name}: "
                  f"{pair['runs'][name]['prompts_equal']}/{len(firsts)} prompts with equal tokens "
                  f"(first differing token per prompt {firsts})", flush=True)
        out[f"{os.path.basename(ref_path)} vs {os.path.basename(other_path)}"] = pair
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="compare earlier reports instead of running: pairs REFERENCE OTHER (e.g. eager, graphs)")
    p.add_argument("--model", default=os.path.join(os.path.expanduser("~"), ".cache", "colreduce-kvprune",
                                                   "agreement-llama-256x4"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default=None, help="vLLM attention backend (default: vLLM's choice)")
    p.add_argument("--policies", default="snapkv,h2o,tova,streamingllm,knorm")
    p.add_argument("--lengths", default="1024,1536,2048,3000,4096,5000,6144,8000")
    p.add_argument("--keep-ratio", type=float, default=0.25)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="CUDA: the KV pool (vLLM's kv_cache_memory_bytes)")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--skip-vanilla", action="store_true")
    p.add_argument("--engine-arg", action="append", default=[], help="extra LLM keyword, KEY=JSON")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.compare:
        if len(args.compare) % 2:
            p.error("--compare takes pairs of reports")
        pairs = compare_runs(args.compare)
        _write(pairs, args.out)
        return 0 if all(r["prompts_equal"] == r["prompts"] for v in pairs.values() for r in v["runs"].values()) else 1
    report = run(args)
    _write(report, args.out)
    ok = all(v["prompts_equal"] == len(report["lengths"]) for v in report["policies"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
