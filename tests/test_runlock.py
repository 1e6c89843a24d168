"""One process per run directory: the lock, its release when the holder dies, and two invocations on one --out."""
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.runlock import RunHeld, held_by, run_lock

HOLD = """
import sys, time
from bench.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder_process(run_dir):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_lock_is_exclusive_and_released_on_exit(tmp_path):
    assert held_by(tmp_path) is None
    with run_lock(tmp_path):
        assert held_by(tmp_path) == f"pid {os.getpid()} on {os.uname().nodename}"
        with pytest.raises(RunHeld, match="being run by another process"):
            with run_lock(tmp_path):  # another open file: as another process would
                pass
    assert held_by(tmp_path) is None
    with run_lock(tmp_path):  # free again
        pass


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    child = _holder_process(tmp_path)
    try:
        assert held_by(tmp_path) == f"pid {child.pid} on {os.uname().nodename}"
        with pytest.raises(RunHeld, match=f"pid {child.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert held_by(tmp_path) is None  # the kernel dropped it with its holder
    with run_lock(tmp_path):
        pass


def test_status_tells_a_running_local_run_from_a_stopped_one(tmp_path):
    import json

    from bench.slurm import sweep_status
    from bench.spec import RunSpec
    spec = RunSpec(method="kl_free_lora", rank=4)
    run_dir = tmp_path / spec.run_id
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"spec": spec.to_dict(), "spec_key": spec.key()}))
    child = _holder_process(run_dir)
    try:
        [row] = sweep_status(tmp_path)
        assert (row["state"], row["detail"]) == ("running", f"locally, pid {child.pid} on {os.uname().nodename}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    [row] = sweep_status(tmp_path)
    assert row["state"] == "unfinished" and "stopped" in row["detail"]


TIMING = {"step_seconds", "time_generation", "time_reference", "time_policy", "time_other", "time_metrics"}
FIGURES = ["run_id", "status", "steps_done", "accuracy", "accuracy_base", "kl_ref", "kl_step", "entropy", "reward"]
RUN = ["run", "--methods", "kl_free_lora", "--ranks", "4", "--seeds", "0,1", "--steps", "2", "--eval-size", "12",
       "--set", "probe_size=6", "--set", "kl_step_seqs=4", "--set", "max_completion_length=48", "--set",
       "checkpoint_every=2", "--jobs", "1", "--no-progress"]


def _bench(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _results(out):
    from bench.io import read_json, read_jsonl
    runs = sorted(p for p in out.iterdir() if (p / "config.json").is_file())
    return {p.name: ({k: read_json(p / "summary.json").get(k) for k in FIGURES},
                     [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(p / "metrics.jsonl")])
            for p in runs}


@pytest.mark.slow
def test_a_run_held_by_another_process_is_left_untouched(tmp_path, tiny, cli):
    out = tmp_path / "out"
    run_dir = out / "kl_free_lora_r4_s0"
    child = _holder_process(run_dir)  # another invocation, e.g. in this run's final eval
    try:
        r = cli(*RUN[:6], "0", *RUN[7:], "--out", out)  # in this process: the holder is the other one
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"being run by another process (pid {child.pid}" in r.stderr
        assert "1 run(s) left to another process" in r.stdout
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written into it
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.slow
def test_two_concurrent_invocations_equal_one(tmp_path, tiny, cli):
    alone = cli(*RUN, "--out", tmp_path / "alone")  # the same command alone, in this process
    assert alone.returncode == 0, alone.stderr[-2000:]
    first = _bench(RUN + ["--out", str(tmp_path / "both")])
    time.sleep(1.0)
    second = _bench(RUN + ["--out", str(tmp_path / "both")])
    outs = [p.communicate(timeout=900) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [err[-2000:] for _, err in outs]
    both, expected = _results(tmp_path / "both"), _results(tmp_path / "alone")
    assert both == expected and len(expected) == 2
    assert any("being run by another process" in err for _, err in outs)  # they did meet at a run
    assert all(summary["status"] == "ok" for summary, _ in both.values())
