"""benchmarks/host_python.py (the Python part of a call's host time, on any machine) runs: the product's direct path
on CPU tensors with its launches stubbed, every case, this checkout against itself loaded a second time (--ref).
It runs in a subprocess without TRITON_INTERPRET (the direct path is the one a GPU call takes)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_python_runs(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "host_python.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_python.py"), "--calls", "5",
                           "--rounds", "1", "--ref", ROOT, "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12 and {r["version"] for r in rows} == {"this", "ref"}
    assert all(0 < r["us"] < 10000 for r in rows), rows
