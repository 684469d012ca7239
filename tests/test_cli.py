"""`colreduce-kvprune run` without vLLM: argument and bad-input handling (one stderr line, exit 2, before any engine),
prompt files, job settings, output agreement, the report table / JSON / PNG. The real runs: tests/vllm/test_cli_run.py.
"""
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from colreduce_kvprune import cli, serving, serving_sglang
from colreduce_kvprune.config import load_config
from colreduce_kvprune.serving import InputError, RunError

_VLLM_SPEC = importlib.util.find_spec("vllm")
HAS_VLLM = _VLLM_SPEC is not None and _VLLM_SPEC.origin is not None     # not tests/vllm seen as a namespace package


@pytest.fixture
def model_dir(tmp_path):
    """A config-only model folder (vocab 100, 512 positions): vLLM would load it with random weights."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100,
                                               "max_position_embeddings": 512}))
    return d


def run_main(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("colreduce-kvprune: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------------ bad input

def test_missing_model_folder(capsys, tmp_path):
    status, out, err = run_main(capsys, "run", "--model", str(tmp_path / "nope"))
    assert status == 2 and out == ""
    assert "does not exist" in one_error_line(err) and "nope" in err


def test_model_folder_without_config(capsys, tmp_path):
    status, _, err = run_main(capsys, "run", "--model", str(tmp_path))
    assert status == 2 and "has no config.json" in one_error_line(err)


def test_unreadable_prompts_file(capsys, model_dir, tmp_path):
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--prompts", str(tmp_path / "p.jsonl"))
    assert status == 2 and "cannot read prompts file" in one_error_line(err)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    ('{"text": "hi"}', 'line 2: expected an object with "prompt"'),
    ('{"prompt": "a", "prompt_token_ids": [1]}', 'line 2: expected an object with "prompt"'),
    ('{"prompt": ""}', 'line 2: "prompt" must be a non-empty string'),
    ('{"prompt_token_ids": [1, -2]}', "line 2: \"prompt_token_ids\" must be a non-empty list of non-negative"),
    ('{"prompt_token_ids": [1, true]}', "line 2: \"prompt_token_ids\" must be a non-empty list of non-negative"),
    ('[1, 2]', 'line 2: expected an object'),
])
def test_bad_prompt_lines(capsys, model_dir, tmp_path, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt_token_ids": [1, 2, 3]}\n' + line + "\n")
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--prompts", str(f))
    assert status == 2 and message in one_error_line(err) and "p.jsonl" in err


def test_empty_and_binary_prompt_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(InputError, match="has no prompts"):
        serving.load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="cannot read prompts file"):
        serving.load_prompts(tmp_path / "bin.jsonl")


def test_config_errors(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: snapkv\nbudget: {keep_ratio: 2}\n")
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--config", str(bad))
    assert status == 2 and "budget.keep_ratio" in one_error_line(err) and "bad.yaml" in err
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--config", "pyramidkv")
    assert status == 2 and "vllm" in one_error_line(err)           # per-layer budgets: vLLM cannot realise it
    status, _, err = run_main(capsys, "run", "--config", "nosuch")
    assert status == 2 and "no shipped config" in one_error_line(err) and "snapkv" in err
    status, _, err = run_main(capsys, "run", "--config", str(tmp_path / "missing.yaml"))
    assert status == 2 and "not found" in one_error_line(err)


def test_sizes_checked_before_any_engine(capsys, model_dir):
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--prompt-len", "500", "--max-tokens", "20")
    assert status == 2 and "exceeds the model's 512 positions" in one_error_line(err)
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--prompt-len", "100", "--kv-blocks", "4")
    assert status == 2 and "--kv-blocks 4 is too small" in one_error_line(err)
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--engine-arg", "novalue")
    assert status == 2 and "KEY=VALUE" in one_error_line(err)


def test_token_ids_outside_vocabulary(capsys, model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt_token_ids": [1, 2, 3]}\n{"prompt_token_ids": [5, 100]}\n')
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--prompts", str(f))
    assert status == 2 and "prompt 1: token id 100 is outside the model's vocabulary (size 100)" in err


@pytest.mark.parametrize("argv", [["run", "--num-prompts", "0"], ["run", "--max-tokens", "x"], []])
def test_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown where vLLM is missing")
def test_valid_input_without_vllm_says_so(capsys, model_dir):
    status, _, err = run_main(capsys, "run", "--model", str(model_dir), "--num-prompts", "2", "--prompt-len", "64")
    assert status == 2 and "vLLM is not installed" in one_error_line(err)


def test_python_dash_m_entry_point():
    run = subprocess.run([sys.executable, "-m", "colreduce_kvprune", "run", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "--kv-blocks" in run.stdout and "--plot" in run.stdout


# ------------------------------------------------------------------------------------------- inputs and jobs

def test_default_config_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in (cli.DEFAULT_CONFIG, "snapkv", "configs/snapkv.yaml"):
        config, path = cli.load_run_config(name)
        assert config.policy == "snapkv" and path.is_file()
        assert config == load_config(path)


def test_prompt_file_and_synthetic_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "t5 t7"}\n\n{"prompt_token_ids": [1, 9, 4]}\n')
    assert serving.load_prompts(f) == [{"prompt": "t5 t7"}, {"prompt_token_ids": [1, 9, 4]}]
    a = serving.synthetic_prompts(3, 50, vocab_size=40, seed=1)
    assert a == serving.synthetic_prompts(3, 50, vocab_size=40, seed=1) != serving.synthetic_prompts(3, 50, 40, 2)
    assert len(a) == 3 and all(len(p["prompt_token_ids"]) == 50 and p["prompt_token_ids"][0] == 1 for p in a)
    assert all(3 <= t < 40 for p in a for t in p["prompt_token_ids"][1:])


def test_job_settings(model_dir):
    prompts = serving.synthetic_prompts(3, 70, 100) + [{"prompt_token_ids": [1, 2]}]
    job = serving.make_job(str(model_dir), prompts, max_tokens=30, kv_blocks=9, block_size=32,
                           engine_args={"max_num_seqs": 7, "foo": "bar"})
    e = job["engine"]
    assert e["max_model_len"] == 128                     # 70 + 30 rounded up to a block
    assert e["num_gpu_blocks_override"] == 9 and e["load_format"] == "dummy"       # no weight files
    # vLLM's defaults: prefix caching (pruned requests bypass it), chunked prefill, CUDA graphs, async scheduling
    for name in ("enable_prefix_caching", "enable_chunked_prefill", "async_scheduling", "enforce_eager",
                 "max_num_batched_tokens"):
        assert name not in e
    assert e["max_num_seqs"] == 7 and e["foo"] == "bar"
    assert job["prompts"] == [p["prompt_token_ids"] for p in prompts] and job["max_tokens"] == 30
    (model_dir / "model.safetensors").write_bytes(b"")
    assert serving.make_job(str(model_dir), prompts)["engine"]["load_format"] == "auto"
    assert "num_gpu_blocks_override" not in serving.make_job(str(model_dir), prompts)["engine"]


def test_text_prompts_use_the_model_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from colreduce_kvprune.tiny_model import make_tiny_model

    path = make_tiny_model("llama", tmp_path / "m")
    ids = serving.tokenize_prompts(path, [{"prompt": "t5 t7 t300"}, {"prompt_token_ids": [1, 2]}])
    assert ids == [[5, 7, 300], [1, 2]]


def test_default_model_cached(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from colreduce_kvprune import tiny_model

    monkeypatch.setenv(tiny_model.CACHE_ENV, str(tmp_path))
    path = tiny_model.default_model()
    assert path.startswith(str(tmp_path)) and os.path.isfile(os.path.join(path, "config.json"))
    assert serving.has_weights(path) and serving.model_limits(serving.read_model_config(path)) == (512, 4096)
    stamp = os.path.join(path, "colreduce_kvprune_stamp.json")
    mtime = os.stat(stamp).st_mtime_ns
    assert tiny_model.default_model() == path and os.stat(stamp).st_mtime_ns == mtime      # not rebuilt
    with open(stamp, "w") as f:
        f.write("{}")
    assert tiny_model.default_model() == path and json.loads(open(stamp).read())["kind"] == "llama"  # rebuilt


def test_child_environment(monkeypatch):
    base = {"KVPRUNE_CONFIG": "x.yaml", "VLLM_PLUGINS": "other", "PATH": "/bin"}
    env = serving.child_env(False, base)
    assert env["VLLM_PLUGINS"] == "none" and "KVPRUNE_CONFIG" not in env
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["PATH"] == "/bin"
    assert serving.child_env(True, base)["VLLM_PLUGINS"] == "other,colreduce_kvprune"
    assert serving.child_env(True, dict(base, VLLM_PLUGINS="none"))["VLLM_PLUGINS"] == "colreduce_kvprune"
    assert "VLLM_PLUGINS" not in serving.child_env(True, {"PATH": "/bin"})


@pytest.mark.skipif(HAS_VLLM, reason="checks how a failing run is reported, by running where vLLM is missing")
def test_failed_run_is_reported_with_its_log(model_dir, tmp_path):
    job = serving.make_job(str(model_dir), serving.synthetic_prompts(1, 8, 100))
    with pytest.raises(RunError, match=r"baseline run failed: ModuleNotFoundError: No module named 'vllm'.*full log: "
                       ) as e:
        serving.run_in_subprocess(job, None, log_dir=str(tmp_path))
    assert (tmp_path / "baseline.log").is_file() and str(tmp_path / "baseline.log") in str(e.value)


def _scripted_child(monkeypatch, script: str):
    """Runs of run_in_subprocess start `script` (Python; `ev(dict)` prints an event) instead of an engine."""
    prelude = (f"import json, sys, time\nsys.stdin.read()\n"
               f"def ev(e): print({serving.EVENT_PREFIX!r} + json.dumps(e), flush=True)\n")
    monkeypatch.setattr(serving, "child_command", lambda module: [sys.executable, "-c", prelude + script])


def test_run_limits_kill_a_silent_child(monkeypatch, tmp_path):
    """The start limit and the run limit stop a child that prints nothing more, and say which limit passed; the
    time the engine takes to start does not count against the run's limit."""
    job = {"engine": {}, "prompts": [[1]], "max_tokens": 1}
    _scripted_child(monkeypatch, "time.sleep(60)")
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"the engine did not start within 1 s"):
        serving.run_in_subprocess(job, None, log_dir=str(tmp_path), timeout=100, start_timeout=1)
    assert time.monotonic() - t0 < 30
    _scripted_child(monkeypatch, "ev({'event': 'started', 'engine_start_s': 0.0, 'num_blocks': 1})\ntime.sleep(60)")
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"timed out after 1 s of the run \(the engine started in \d+ s\)"):
        serving.run_in_subprocess(job, None, log_dir=str(tmp_path), timeout=1, start_timeout=100)
    assert time.monotonic() - t0 < 30
    # a worker process of the child (tensor parallelism) holds the output pipe too: the whole group is killed
    _scripted_child(monkeypatch, "import subprocess\nsubprocess.Popen([sys.executable, '-c', 'import time; "
                                 "time.sleep(60)'])\nev({'event': 'started', 'engine_start_s': 0.0, 'num_blocks': 1})\n"
                                 "time.sleep(60)")
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"timed out after 1 s of the run"):
        serving.run_in_subprocess(job, None, log_dir=str(tmp_path), timeout=1)
    assert time.monotonic() - t0 < 30
    _scripted_child(monkeypatch, "time.sleep(3)\nev({'event': 'started', 'engine_start_s': 3.0, 'num_blocks': 1})\n"
                                 "ev({'event': 'result', 'result': {'requests': 1}})")
    got = serving.run_in_subprocess(job, None, log_dir=str(tmp_path), timeout=2, start_timeout=30)
    assert got == {"requests": 1}


# ------------------------------------------------------------------------------------------------ the report

def test_agreement_against_an_independent_count():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randrange(1, 6)
        base = [[rng.randrange(3) for _ in range(rng.randrange(1, 8))] for _ in range(n)]
        pruned = [[t if rng.random() < 0.8 else rng.randrange(3) for t in b] for b in base]
        a = serving.agreement(base, pruned)
        assert a["identical"] == sum(b == p for b, p in zip(base, pruned))
        assert a["first_token_equal"] == sum(b[0] == p[0] for b, p in zip(base, pruned))
        assert a["common_prefix"] == [len(os.path.commonprefix([b, p])) for b, p in zip(base, pruned)]
        assert a["tokens_equal"] == sum(map(lambda bp: sum(x == y for x, y in zip(*bp)), zip(base, pruned)))
        assert a["tokens_total"] == sum(len(b) for b in base)
    with pytest.raises(ValueError):
        serving.agreement([[1]], [])


def fake_run(rng, requests, pruned):
    """A run result shaped like serving.run_engine's, with random numbers."""
    steps = rng.randrange(5, 30)
    t = sorted(rng.uniform(0, 3) for _ in range(steps))
    return {"requests": requests, "prompt_tokens": 1000 * requests, "output_tokens": 8 * requests,
            "num_blocks": 511, "block_size": 32, "peak_kv_blocks": rng.randrange(50, 511),
            "mean_blocks_per_running_request": rng.uniform(10, 70), "peak_running": rng.randrange(1, 20),
            "preemptions": rng.randrange(0, 4), "steps": steps, "engine_start_s": rng.uniform(1, 5),
            "wall_s": rng.uniform(1, 9), "output_tokens_per_s": rng.uniform(10, 300),
            "timeline": {"t": t, "kv_blocks": [rng.randrange(0, 511) for _ in t],
                         "running": [rng.randrange(0, 20) for _ in t], "waiting": [0 for _ in t]},
            "prune_stats": ({"requests_pruned": requests, "prompt_tokens": 1000 * requests, "kept_tokens":
                             250 * requests, "blocks_freed": 23 * requests, "peak_blocks_in_use": 1, "num_blocks": 511}
                            if pruned else None),
            "outputs": [[rng.randrange(4) for _ in range(8)] for _ in range(requests)]}


@pytest.fixture
def report(model_dir):
    rng = random.Random(7)
    job = serving.make_job(str(model_dir), serving.synthetic_prompts(5, 100, 100), max_tokens=8, kv_blocks=512)
    base, pruned = fake_run(rng, 5, False), fake_run(rng, 5, True)
    config = load_config({"policy": "snapkv", "budget": {"keep_ratio": 0.25}, "window": 8, "min_prompt_tokens": 16})
    return cli.compare(job, base, pruned, config=config, config_source="snapkv.yaml", model_label="m"), base, pruned


def test_report_numbers_and_table(report):
    rep, base, pruned = report
    for key in serving.RATIO_KEYS:
        assert rep["ratios"][key] == pytest.approx(pruned[key] / base[key])
    assert "outputs" not in rep["runs"]["baseline"] and rep["agreement"] == serving.agreement(base["outputs"],
                                                                                              pruned["outputs"])
    json.dumps(rep)                                                      # machine-readable as is
    table = cli.format_report(rep)
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())}
    assert rows["peak requests running at once"] == [str(base["peak_running"]), str(pruned["peak_running"]),
                                                     f"{pruned['peak_running'] / base['peak_running']:.2f}×"]
    assert rows["peak KV blocks in use"][:2] == [f"{base['peak_kv_blocks']} / 511", f"{pruned['peak_kv_blocks']} / 511"]
    assert rows["preemptions"] == [str(base["preemptions"]), str(pruned["preemptions"])]
    assert rows["prefills pruned"] == ["0", "5"]
    assert rows["their prompt tokens → kept"] == ["5000 → 1250", "0.25×"]
    assert rows["output tokens/s"][:2] == [f"{base['output_tokens_per_s']:.1f}", f"{pruned['output_tokens_per_s']:.1f}"]
    assert f"identical {rep['agreement']['identical']}/5" in table and "snapkv.yaml (snapkv: keep_ratio 0.25" in table


def test_json_and_plot_outputs(report, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rep = report[0]
    args = cli.build_parser().parse_args(["run", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "k.png")])
    cli.write_outputs(rep, args)
    out = capsys.readouterr().out
    assert "peak KV blocks in use" in out and json.loads((tmp_path / "r.json").read_text()) == rep
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = cli.build_parser().parse_args(["run", "--json"])
    cli.write_outputs(rep, args)
    assert json.loads(capsys.readouterr().out) == rep                   # --json alone: only JSON on stdout


# ---------------------------------------------------------------------------------------------- --engine sglang

_SGLANG_SPEC = importlib.util.find_spec("sglang")
HAS_SGLANG = _SGLANG_SPEC is not None and _SGLANG_SPEC.origin is not None   # not tests/sglang (namespace package)


def test_engine_option_default_and_choices(capsys):
    assert cli.build_parser().parse_args(["run"]).engine == "vllm"
    assert cli.build_parser().parse_args(["run", "--engine", "sglang"]).engine == "sglang"
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--engine", "trtllm"])
    assert e.value.code == 2 and "invalid choice: 'trtllm'" in capsys.readouterr().err


@pytest.mark.skipif(HAS_SGLANG, reason="checks the message shown where SGLang is missing")
def test_valid_input_without_sglang_says_so(capsys, model_dir):
    status, out, err = run_main(capsys, "run", "--engine", "sglang", "--model", str(model_dir), "--num-prompts", "2",
                                "--prompt-len", "64")
    assert status == 2 and out == "" and "SGLang is not installed" in one_error_line(err)


@pytest.mark.parametrize("policy", ["pyramidkv", "adakv"])
def test_sglang_refuses_what_it_cannot_realise(capsys, model_dir, policy):
    status, _, err = run_main(capsys, "run", "--engine", "sglang", "--model", str(model_dir), "--config", policy)
    line = one_error_line(err)
    assert status == 2 and policy in line and "sglang" in line.lower() and "Engines that can: transformers" in line


def test_sglang_input_errors_before_any_engine(capsys, model_dir):
    argv = ["run", "--engine", "sglang", "--model", str(model_dir)]
    status, _, err = run_main(capsys, *argv, "--prompt-len", "100", "--max-tokens", "8", "--kv-blocks", "3")
    assert status == 2 and "KV pool of 96 tokens is too small" in one_error_line(err) and "100 + 8" in err
    status, _, err = run_main(capsys, *argv, "--prompt-len", "500", "--max-tokens", "20")
    assert status == 2 and "exceeds the model's 512 positions" in one_error_line(err)
    status, _, err = run_main(capsys, *argv, "--engine-arg", "=1")
    assert status == 2 and "KEY=VALUE" in one_error_line(err)


def test_sglang_job_settings(model_dir, monkeypatch):
    monkeypatch.setattr(cli, "check_sglang", lambda: None)           # the job is built before the install check
    args = cli.build_parser().parse_args(["run", "--engine", "sglang", "--model", str(model_dir), "--num-prompts",
                                          "3", "--prompt-len", "70", "--max-tokens", "9", "--kv-blocks", "10",
                                          "--block-size", "16", "--max-num-seqs", "5", "--engine-arg",
                                          "chunked_prefill_size=64", "--seed", "3"])
    job, config, _, _ = cli.prepare(args)
    e = job["engine"]
    assert job["engine_name"] == "sglang" and config.policy == "snapkv"
    assert job["prompts"] == [p["prompt_token_ids"] for p in serving.synthetic_prompts(3, 70, 100, seed=3)]
    assert e["max_total_tokens"] == 160 and e["page_size"] == 1 and e["max_running_requests"] == 5
    assert e["disable_radix_cache"] and e["disable_overlap_schedule"] and e["chunked_prefill_size"] == 64
    assert e["context_length"] == 512 and e["load_format"] == "dummy" and e["random_seed"] == 3
    assert e["model_path"] == str(model_dir.resolve()) and e["decode_log_interval"] == 1
    rep = serving.compare(job, fake_run(random.Random(1), 3, False), fake_run(random.Random(2), 3, True))
    assert rep["settings"]["engine"] == "sglang" and rep["settings"]["kv_blocks"] == 160
    assert rep["settings"]["block_size"] == 1 and rep["settings"]["max_num_seqs"] == 5
    assert "max_total_tokens" not in serving_sglang.make_sglang_job(str(model_dir), [{"prompt_token_ids": [1]}]
                                                                    )["engine"]


def test_sglang_child_environment():
    base = {"KVPRUNE_CONFIG": "x.yaml", "KVPRUNE_SGLANG_EVENTS": "old.jsonl", "SGLANG_PLUGINS": "other", "PATH": "/b"}
    env = serving_sglang.child_env(None, None, base)
    assert env["SGLANG_PLUGINS"] == "none" and "KVPRUNE_CONFIG" not in env and "KVPRUNE_SGLANG_EVENTS" not in env
    env = serving_sglang.child_env("c.yaml", "ev.jsonl", base)
    assert env["KVPRUNE_CONFIG"] == "c.yaml" and env["KVPRUNE_SGLANG_EVENTS"] == "ev.jsonl" and env["PATH"] == "/b"
    assert env["SGLANG_PLUGINS"] == "other,colreduce_kvprune"
    assert serving_sglang.child_env("c", None, dict(base, SGLANG_PLUGINS="none"))["SGLANG_PLUGINS"] == "colreduce_kvprune"
    assert "SGLANG_PLUGINS" not in serving_sglang.child_env("c", None, {"PATH": "/b"})


def _decode_line(running, tokens, waiting):
    return (f"[2026-11-24 22:34:59] Decode batch, #running-req: {running}, #token: {tokens}, token usage: 0.88, "
            f"cpu graph: False, gen throughput (token/s): 9.08, #queue-req: {waiting}\n")


def test_step_sampler_reads_sglang_log_lines():
    """Random decode / prefill / retraction lines in SGLang 0.5.23's format; the stats against a direct count."""
    rng = random.Random(5)
    for _ in range(20):
        sampler = serving_sglang.StepSampler()
        sampler(_decode_line(9, 999, 0))                              # before start(): engine warm-up, ignored
        sampler.start()
        decode, prefills, retracted = [], 0, 0
        for _ in range(rng.randrange(1, 40)):
            kind = rng.random()
            if kind < 0.7:
                d = (rng.randrange(0, 9), rng.choice([0, rng.randrange(1, 5000)]), rng.randrange(0, 9))
                decode.append(d)
                sampler(_decode_line(*d))
            elif kind < 0.85:
                prefills += 1
                sampler(f"[x] Prefill batch, #new-seq: 3, #new-token: 900, #cached-token: 0, token usage: 0.88, "
                        f"#running-req: {rng.randrange(9)}, #queue-req: 1, #pending-token: 300, cpu graph: False\n")
            elif kind < 0.95:
                n = rng.randrange(1, 4)
                retracted += n
                sampler(f"[x] KV cache pool is full. Retract requests. #retracted_reqs: {n}, #new_tokens_gained: 7, "
                        "#new_token_ratio: 0.5000 -> 0.6000\n")
            else:
                sampler("[x] some other log line, #running-req: 99, #token: 99\n")
        st = sampler.stats()
        per = [t / r for r, t, _ in decode if r and t]
        assert st["peak_kv_blocks"] == max((t for _, t, _ in decode), default=0)
        assert st["peak_running"] == max((r for r, _, _ in decode), default=0)
        assert st["mean_blocks_per_running_request"] == pytest.approx(sum(per) / len(per) if per else 0.0)
        assert st["preemptions"] == retracted and st["steps"] == len(decode) + prefills
        assert st["timeline"]["kv_blocks"] == [t for _, t, _ in decode]
        assert st["timeline"]["waiting"] == [w for _, _, w in decode]
        assert st["timeline"]["t"] == sorted(st["timeline"]["t"])


def test_sglang_report_table_units(model_dir):
    job = serving_sglang.make_sglang_job(str(model_dir), serving.synthetic_prompts(5, 100, 100), max_tokens=8,
                                         kv_tokens=2000)
    rng = random.Random(3)
    base, pruned = fake_run(rng, 5, False), fake_run(rng, 5, True)
    for run in (base, pruned):
        run.update(num_blocks=2000, block_size=1, kv_unit="tokens", engine="sglang")
    config = load_config({"policy": "h2o", "budget": {"keep_tokens": 40}, "min_prompt_tokens": 16})
    table = cli.format_report(serving.compare(job, base, pruned, config=config, config_source="h.yaml"))
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())}
    assert "SGLang, KV pool 2000 token slots (page size 1)" in table and "blocks" not in table
    assert rows["peak KV tokens in use (decode steps)"][:2] == [f"{base['peak_kv_blocks']} / 2000",
                                                               f"{pruned['peak_kv_blocks']} / 2000"]
    assert rows["KV tokens freed after prefill"] == ["0", str(pruned["prune_stats"]["blocks_freed"])]
    assert rows["retractions"] == [str(base["preemptions"]), str(pruned["preemptions"])] and "preemptions" not in rows


@pytest.mark.skipif(HAS_SGLANG, reason="checks how a failing SGLang run is reported, by running where SGLang is missing")
def test_failed_sglang_run_is_reported_with_its_log(model_dir, tmp_path):
    job = serving_sglang.make_sglang_job(str(model_dir), serving.synthetic_prompts(1, 8, 100))
    config = load_config({"policy": "snapkv", "budget": {"keep_ratio": 0.5}, "window": 4, "min_prompt_tokens": 4})
    with pytest.raises(RunError, match=r"pruned run failed: ModuleNotFoundError: No module named 'sglang'.*full log"):
        serving.run_in_subprocess(job, config.to_dict(), log_dir=str(tmp_path))
    assert load_config(tmp_path / "pruned-config.yaml") == config              # what $KVPRUNE_CONFIG pointed at
    assert (tmp_path / "pruned.log").is_file()


def test_sglang_run_output_parsing(model_dir, tmp_path, monkeypatch):
    """run_in_subprocess on a scripted SGLang child output: an event with a scheduler log line glued before its
    newline, log lines before "generating" (ignored), the step stats merged into the result, the log kept."""
    job = serving_sglang.make_sglang_job(str(model_dir), serving.synthetic_prompts(2, 8, 100))
    ev = lambda e: serving.EVENT_PREFIX + json.dumps(e)                                          # noqa: E731
    result = {"requests": 2, "outputs": [[1], [2]]}
    lines = [_decode_line(5, 500, 0), ev({"event": "started", "engine_start_s": 1.0, "num_blocks": 64}) + "\n",
             ev({"event": "generating"}) + "\n", _decode_line(2, 40, 1),
             ev({"event": "progress", "done": 1, "total": 2}) + _decode_line(1, 30, 0), _decode_line(1, 0, 0),
             ev({"event": "result", "result": result}) + "\n"]

    class FakeProc:
        def __init__(self, cmd, **kw):
            assert "colreduce_kvprune.serving_sglang" in cmd[-1] and kw["env"]["SGLANG_PLUGINS"] == "none"
            self.stdin, self.stdout = open(os.devnull, "w"), iter(lines)

        def wait(self):
            return 0

    monkeypatch.setattr(serving.subprocess, "Popen", FakeProc)
    events = []
    got = serving.run_in_subprocess(job, None, events.append, log_dir=str(tmp_path))
    assert [e["event"] for e in events] == ["started", "progress"]
    assert got["requests"] == 2 and got["peak_kv_blocks"] == 40 and got["peak_running"] == 2 and got["steps"] == 3
    assert got["mean_blocks_per_running_request"] == pytest.approx((20 + 30) / 2)
    assert got["timeline"]["running"] == [2, 1, 1] and got["timeline"]["waiting"] == [1, 0, 0]
    log = (tmp_path / "baseline.log").read_text()
    assert log.count("Decode batch") == 4 and serving.EVENT_PREFIX not in log


def test_run_process_imports_the_parents_package(tmp_path):
    """A run's child process imports the copy of the package its parent runs, not a `colreduce_kvprune` folder in
    the working directory (`python -m` would: from a source checkout that is the source tree, which lacks the
    installed `colreduce_kvprune.kernels`; seen on the GPU machine)."""
    import colreduce_kvprune

    decoy = tmp_path / "colreduce_kvprune"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('decoy package in the working directory imported')\n")
    cmd = serving.child_command("colreduce_kvprune.config")
    run = subprocess.run(cmd[:-1] + [cmd[-1] + "; import colreduce_kvprune; print('FILE', colreduce_kvprune.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"FILE {colreduce_kvprune.__file__}" in run.stdout
