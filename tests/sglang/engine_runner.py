"""Runs SGLang engines one after another in this (fresh) process and prints one `RESULT <json>` line per run.

    python engine_runner.py '<json list of runs>'
    run: {"name", "env": {VAR: value or null}, "engine": {Engine kwargs}, "prompts": [[ids]], "max_new_tokens"}

Used by the tests (SGLang loads its plugins once per process, and the plugin reads $KVPRUNE_CONFIG when it is
loaded and when the engine resolves its arguments: the first run with pruning decides that the hooks are installed,
later runs turn them on or off through the environment, which every new scheduler subprocess inherits).
Per run the result holds the greedy outputs, the plugin's events (KVPRUNE_SGLANG_EVENTS, one file per run), and,
after the engine has been idle for a moment (SGLang's strict idle memory checks run then), the output of one more
short request — it fails if the scheduler died on a leak or a double free. A run whose engine refuses to start
gives {"error": "<type>: <message>", "new_children": [pids of processes started by the attempt and still alive]}.
"""
import json
import os
import sys
import tempfile
import time


def _children() -> set:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()}


def run_one(run: dict) -> dict:
    import sglang as sgl

    for var, value in run.get("env", {}).items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    events = tempfile.NamedTemporaryFile(prefix="kvprune-events-", suffix=".jsonl", delete=False).name
    os.environ["KVPRUNE_SGLANG_EVENTS"] = events
    sp = {"max_new_tokens": run.get("max_new_tokens", 8), "temperature": 0.0, "ignore_eos": True}
    children_before = _children()
    t0 = time.perf_counter()
    try:
        llm = sgl.Engine(**run["engine"])
    except Exception as e:        # noqa: BLE001 - the refusal is the result
        return {"name": run["name"], "error": f"{type(e).__name__}: {e}", "start_s": time.perf_counter() - t0,
                "new_children": sorted(_children() - children_before)}
    start_s = time.perf_counter() - t0
    try:
        out = llm.generate(input_ids=run["prompts"], sampling_params=sp)
        time.sleep(run.get("idle_s", 1.0))
        probe = llm.generate(input_ids=[run["prompts"][0][:8]], sampling_params=dict(sp, max_new_tokens=2))
    finally:
        llm.shutdown()
    with open(events) as f:
        ev = [json.loads(line) for line in f if line.strip()]
    os.unlink(events)
    return {"name": run["name"], "outputs": [o["output_ids"] for o in out], "rids": [o["meta_info"]["id"] for o in out],
            "events": ev, "probe": probe[0]["output_ids"], "start_s": start_s}


def main() -> None:
    runs = json.loads(sys.argv[1])
    for run in runs:
        print("RESULT " + json.dumps(run_one(run)), flush=True)


if __name__ == "__main__":
    main()
