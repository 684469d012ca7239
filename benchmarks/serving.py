"""Serving benchmark: a fixed KV pool, long prompts, many requests, run without and with pruning (one process each).

    python benchmarks/serving.py                       # tiny random Llama, 48 × 2048-token prompts, pool of 512 blocks
    python benchmarks/serving.py --model ./my-model --config configs/snapkv.yaml --kv-blocks 4000 --prompt-len 8000
Prints the side-by-side table of `colreduce-kvprune run`, then the two ratios pruned / unpruned: peak requests
running at once (what the freed blocks buy) and output throughput. On CPU the block and concurrency ratios are the
meaningful ones; the throughput ratio is reported as measured (scoring runs in plain torch there).
Options: those of `colreduce-kvprune run` (--engine sglang, --json, --plot, ...); the default KV pool applies to any
--model here.
"""
import argparse
import sys

from colreduce_kvprune import cli
from colreduce_kvprune.config import ConfigError
from colreduce_kvprune.serving import InputError, RunError, compare

DEFAULTS = dict(num_prompts=48, prompt_len=2048, max_tokens=32, kv_blocks=512)


def summary(report: dict) -> dict:
    """The benchmark's two ratios (pruned / unpruned) with the numbers they come from."""
    base, pruned = report["runs"]["baseline"], report["runs"]["pruned"]
    return {"kv_pool_blocks": base["num_blocks"],
            "peak_running": [base["peak_running"], pruned["peak_running"]],
            "concurrency_ratio": report["ratios"]["peak_running"],
            "output_tokens_per_s": [base["output_tokens_per_s"], pruned["output_tokens_per_s"]],
            "throughput_ratio": report["ratios"]["output_tokens_per_s"],
            "preemptions": [base["preemptions"], pruned["preemptions"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_run_arguments(parser, DEFAULTS)
    args = parser.parse_args(argv)
    try:
        job, config, config_path, label = cli.prepare(args, DEFAULTS, fixed_pool=True)
    except (InputError, ConfigError) as e:
        return cli.fail(str(e), 2)
    try:
        base, pruned = cli.run_pair(job, config, progress=not args.no_progress, verbose=args.verbose,
                                    log_dir=args.log_dir)
    except RunError as e:
        return cli.fail(str(e), 1)
    report = compare(job, base, pruned, config=config, config_source=str(config_path), model_label=label)
    report["benchmark"] = s = summary(report)
    cli.write_outputs(report, args)
    sglang = report["settings"]["engine"] == "sglang"                  # SGLang: the pool counts token slots
    lines = [f"KV pool {s['kv_pool_blocks']} {'token slots' if sglang else 'blocks'}; ratios {config.policy} / "
             "no pruning:",
             f"  peak requests running at once  {s['peak_running'][0]} -> {s['peak_running'][1]}"
             f"   ({s['concurrency_ratio']:.2f}x)",
             f"  output tokens/s                {s['output_tokens_per_s'][0]:.1f} -> {s['output_tokens_per_s'][1]:.1f}"
             f"   ({s['throughput_ratio']:.2f}x, as measured)",
             f"  {'retractions' if sglang else 'preemptions':<31}{s['preemptions'][0]} -> {s['preemptions'][1]}"]
    print("\n" + "\n".join(lines), file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
