"""benchmarks/serving_online.py's run plumbing: each rate's own prompts (no prefix-cache hits from an earlier rate),
the root cause picked out of a failed server's log, the wait for a run's leftover processes before the next engine
starts, and a server interpreter that ignores the working directory."""
import asyncio
import os
import subprocess
import sys
import time

import pytest


def test_each_rate_gets_prompts_of_its_own(online):
    ids, max_tokens = online.rate_prompts("smoke", 1000, seed=3, num=6, n_rates=3)
    again, _ = online.rate_prompts("smoke", 1000, seed=3, num=6, n_rates=3)
    assert ids == again                                    # seeded
    assert [len(r) for r in ids] == [6, 6, 6] and max_tokens > 0
    first = online.prompts("smoke", 1000, 3, 6)[0]
    assert ids[0] == first                                 # rate 0 keeps the workload's own prompts
    seen = [tuple(p[:16]) for r in ids for p in r]         # no prompt (not even its first 16 tokens) repeats
    assert len(set(seen)) == len(seen)


def test_rates_submit_each_rates_own_prompts(online):
    ids = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    got = []

    async def submit(i, prompt, t_submit):
        got.append((i, prompt))
        return {"ttft_s": 0.01, "tpot_s": 0.001, "e2e_s": 0.02, "tokens": 2, "end": time.perf_counter()}

    out = asyncio.run(online._rates({"rates": [500.0, 900.0], "prompts": ids, "seed": 0}, submit))
    assert sorted(out) == ["500.0", "900.0"] and all(r["requests"] == 2 for r in out.values())
    assert got == [(0, [1, 2]), (1, [3, 4]), (1000, [5, 6]), (1001, [7, 8])]
    with pytest.raises(ValueError):                        # a rate without prompts is an error, not skipped
        asyncio.run(online._rates({"rates": [1.0, 2.0, 3.0], "prompts": ids, "seed": 0}, submit))


LOG = """INFO 12-02 11:40:01 [api_server.py:1] vLLM API server version 0.32.0
(EngineCore_DP0 pid=4242) ERROR 12-02 11:40:30 [core.py:700] EngineCore failed to start.
(EngineCore_DP0 pid=4242) Traceback (most recent call last):
(EngineCore_DP0 pid=4242)   File "/tmp/site/vllm/v1/worker/gpu_worker.py", line 240, in init_device
(EngineCore_DP0 pid=4242) ValueError: Free memory on device cuda:0 (20.1/139.8 GiB) on startup is less than desired GPU memory utilization (0.9, 125.8 GiB).
Traceback (most recent call last):
  File "/tmp/site/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_exception_lines_put_the_root_cause_first(online):
    lines = online.exception_lines(LOG)
    assert len(lines) == 2
    assert lines[0].startswith("(EngineCore_DP0 pid=4242) ValueError: Free memory on device")
    assert lines[1].startswith("RuntimeError: Engine core initialization failed")
    assert online.exception_lines("INFO all fine\n    raise ValueError(x)\n") == []   # code lines are not errors
    many = "\n".join(f"E{i}Error: {i}" for i in range(20))
    assert online.exception_lines(many, limit=4) == ["E0Error: 0", "E1Error: 1", "E2Error: 2", "E19Error: 19"]


def _group_with_orphan(script: str) -> int:
    """A process group whose leader exits at once and leaves `script` (python) running in it: a server's engine
    core after the server is gone. Returns the group id."""
    leader = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {script!r}])"],
                              start_new_session=True)
    leader.wait()
    time.sleep(0.3)                                        # the orphan is up
    return leader.pid


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_reap_group_waits_for_what_a_run_left(online):
    pgid = _group_with_orphan("import time; time.sleep(60)")
    assert _group_alive(pgid)
    waited = online.reap_group(pgid)
    assert waited is not None and waited < 10 and not _group_alive(pgid)
    assert online.reap_group(pgid) is None                 # nothing left: nothing to wait for


def test_reap_group_kills_what_ignores_sigterm(online):
    pgid = _group_with_orphan("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")
    t0 = time.monotonic()
    waited = online.reap_group(pgid, grace=1.0)
    assert not _group_alive(pgid)
    assert 1.0 <= waited < 10 and time.monotonic() - t0 >= 1.0     # SIGTERM was ignored: killed after the grace


def test_server_python_ignores_a_shadowing_package_in_the_working_directory(online, tmp_path):
    # The server is started from the repository root, whose colreduce_kvprune (the source tree) has no kernels
    # subpackage: the server's interpreter must import the installed package, not the working directory's.
    shadow = tmp_path / "colreduce_kvprune"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("SHADOW = True\n")
    probe = "import colreduce_kvprune as c; print(hasattr(c, 'SHADOW'))"
    shadowed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert shadowed.stdout.strip() == "True", shadowed.stderr      # the hazard is real without -P
    got = subprocess.run([*online.server_python(), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "False"
