"""vLLM's OpenAI-compatible server with a pruning config, the way a user starts it:
`python -m vllm.entrypoints.openai.api_server --model M --additional-config '{"kv_prune": "snapkv.yaml"}'` (what
`vllm serve` runs), its engine core in its own process, at vLLM's defaults but for what the tiny test model needs
(float32, its length, the test's KV pool). Greedy completions of token-id prompts equal the transformers path with
the shipped SnapKV config, where that differs from the unpruned answer; a bad config stops the server at start with
a message naming the key, and no server is left behind."""
import json
import os
import subprocess
import sys
import urllib.request

from colreduce_kvprune.config import load_config
from vllm_helpers import BLOCK_SIZE, DEVICE, random_prompts, reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
try:
    from serving_online import cli_args, free_port, stop_server, wait_ready      # the online benchmark's server helpers
finally:
    sys.path.pop(0)

START_TIMEOUT = 600


def _server_cmd(model: str, port: int, kv_prune) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "2048",
           "--block-size", str(BLOCK_SIZE), "--seed", "0",
           "--additional-config", json.dumps({"kv_prune": kv_prune})]
    if DEVICE == "cuda":                     # the tests' fixed 1 GiB pool (vllm_helpers.ENGINE_KW)
        cmd += ["--kv-cache-memory-bytes", str(1 << 30), "--gpu-memory-utilization", "0.15"]
    return cmd


def _env() -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)     # the server's own default: the engine core in a process
    return env


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_openai_server_prunes_with_the_shipped_config(llama_path, tmp_path):
    config = load_config("snapkv.yaml")                  # keep 25%, prompts of >= 1024 tokens
    prompts = random_prompts((1100, 1500, 300), seed=11)
    want = reference(llama_path, prompts, config, max_tokens=16)
    unpruned = reference(llama_path, prompts, dict(config.to_dict(), min_prompt_tokens=100_000), max_tokens=16)
    assert want[2] == unpruned[2] and want[:2] != unpruned[:2]     # the comparison can tell pruned from not
    port, log_path = free_port(), str(tmp_path / "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_server_cmd(llama_path, port, "snapkv.yaml"), stdout=log, stderr=subprocess.STDOUT,
                                env=_env(), cwd=tmp_path)           # "snapkv.yaml" is not a file there: the shipped one
        try:
            wait_ready(proc, port, log_path, START_TIMEOUT)
            got = []
            for p in prompts:
                out = _post(port, {"model": llama_path, "prompt": p, "max_tokens": 16, "temperature": 0.0,
                                   "ignore_eos": True, "return_token_ids": True})
                got.append(out["choices"][0]["token_ids"])
        finally:
            stop_server(proc)
    assert got == want


def test_openai_server_refuses_a_bad_config_at_start(llama_path, tmp_path):
    port = free_port()
    proc = subprocess.run(_server_cmd(llama_path, port, {"policy": "snapkv", "budget": {"keep_ratio": 0.25},
                                                         "windoww": 32}),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path,
                          timeout=START_TIMEOUT)
    assert proc.returncode != 0
    assert "windoww" in proc.stdout and "ConfigError" in proc.stdout, proc.stdout[-4000:]


def test_online_benchmark_passes_engine_arguments_as_server_flags(llama_path):
    """benchmarks/serving_online.py --frontend server starts the server with the run's engine arguments as flags:
    vLLM's own parser reads them back to the same EngineArgs (booleans off, JSON mappings, the pruning config)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:              # the layout before vLLM 0.32
        from vllm.entrypoints.openai.cli_args import make_arg_parser

    prune = {"policy": "snapkv", "budget": {"keep_ratio": 0.1}, "min_prompt_tokens": 2048}
    engine = dict(model=llama_path, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                  max_model_len=18432, tensor_parallel_size=1, gpu_memory_utilization=0.9,
                  compilation_config={"cudagraph_mode": "PIECEWISE"}, async_scheduling=False,
                  enable_prefix_caching=True, additional_config={"kv_prune": prune})
    args = AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(cli_args(engine)))
    got = {k: getattr(args, k) for k in engine}
    got["compilation_config"] = {"cudagraph_mode": str(got["compilation_config"].cudagraph_mode).split(".")[-1]}
    assert got == engine
