"""`colreduce-kvprune run` end to end on the embedded default (tiny random Llama built into a temp cache), real
vLLM: both runs in their own processes, the report's numbers checked against what the pool and the config imply."""
import importlib.util
import json
import re

import pytest

from colreduce_kvprune import cli
from colreduce_kvprune.policies import keep_count
from colreduce_kvprune.tiny_model import CACHE_ENV

pytestmark = pytest.mark.vllm

N, PROMPT, NEW, POOL, BS = 6, 1536, 8, 200, 32          # pool: 199 usable blocks; a prompt fills 48


def test_run_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    plot = importlib.util.find_spec("matplotlib") is not None      # not in every vLLM CI venv
    status = cli.main(["run", "--num-prompts", str(N), "--prompt-len", str(PROMPT), "--max-tokens", str(NEW),
                       "--kv-blocks", str(POOL), "--json", str(tmp_path / "r.json"), "--log-dir", str(tmp_path),
                       "--no-progress"] + ["--plot", str(tmp_path / "kv.png")] * plot)
    out, err = capsys.readouterr()
    logs = "".join(f"\n--- {p.name} (tail)\n" + p.read_text()[-4000:] for p in sorted(tmp_path.glob("*.log")))
    assert status == 0, err + logs
    report = json.loads((tmp_path / "r.json").read_text())
    base, pruned = report["runs"]["baseline"], report["runs"]["pruned"]
    config, _ = cli.load_run_config(cli.DEFAULT_CONFIG)
    keep = keep_count(config, PROMPT)
    assert keep < PROMPT

    for run in (base, pruned):
        assert run["requests"] == N and run["prompt_tokens"] == N * PROMPT and run["output_tokens"] == N * NEW
        assert run["num_blocks"] == POOL - 1 and 0 < run["peak_kv_blocks"] <= POOL - 1
        assert run["preemptions"] >= 0 and run["steps"] == len(run["timeline"]["t"]) > 0
    # Unpruned, each request holds its 48 prompt blocks (+1 for decode): at most 4 fit in the pool at once (vLLM's
    # default chunked prefill: a request still prefilling holds only its chunks so far, hence 0.9).
    assert base["peak_running"] <= (POOL - 1) // (PROMPT // BS)
    assert base["mean_blocks_per_running_request"] >= 0.9 * (PROMPT // BS)
    assert base["prune_stats"] is None
    # Pruned, each keeps cdiv(keep, 32) blocks (+1): all six run at once.
    assert pruned["peak_running"] == N > base["peak_running"]
    assert pruned["prune_stats"]["requests_pruned"] == N
    assert pruned["prune_stats"]["kept_tokens"] == N * keep
    assert pruned["prune_stats"]["blocks_freed"] == N * (PROMPT // BS - -(-keep // BS))
    assert pruned["mean_blocks_per_running_request"] < 0.5 * base["mean_blocks_per_running_request"]
    # Once all six are running and none waits (every prompt prefilled and pruned), the pool holds only the kept
    # blocks plus the decode's. (The peaks are not compared: with the GPU's larger step budget several prompts
    # prefill in one step and hold all their blocks until that step prunes them, so in both runs the peak is set
    # by the prompts prefilled together: 196 and 185 of 199 on the H200.)
    tl = pruned["timeline"]
    after = [b for b, r, w in zip(tl["kv_blocks"], tl["running"], tl["waiting"]) if r == N and w == 0]
    assert after and min(after) <= N * -(-(keep + NEW) // BS)
    # The first output token comes from the full prefill in both runs.
    assert report["agreement"]["first_token_equal"] == N

    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in out.splitlines())}
    assert rows["peak requests running at once"][:2] == [str(base["peak_running"]), str(N)]
    assert rows["prefills pruned"] == ["0", str(N)]
    assert not plot or (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "baseline.log").is_file() and (tmp_path / "pruned.log").is_file()
