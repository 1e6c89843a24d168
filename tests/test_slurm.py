"""SLURM sweeps on a real cluster (slurm/local_cluster.sh; started by .ci/run): a 4-task job array through
`bench run --executor slurm`, scancel + --resume, preemption with requeue and resume, equality with a local run.
The cluster tests skip where SLURM is absent; profile and parsing tests always run."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from bench.errors import BenchError
from bench.io import read_json, read_jsonl
from tests.test_cli import assert_one_line_error, bench


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "allocated"))


needs_slurm = pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster here (bash slurm/local_cluster.sh start)")

TINY = ["--model", "tiny", "--steps", "2", "--eval-size", "4", "--set", "probe_size=2", "--set", "kl_step_seqs=2",
        "--set", "max_completion_length=24", "--set", "checkpoint_every=2"]
STRIP = ("step_seconds", "time_generation", "time_reference", "time_policy", "time_other", "time_metrics")


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in STRIP} for r in rows]


def test_profiles_are_checked(tmp_path):
    from bench.slurm import load_profile
    assert load_profile("local")["partition"] == "debug"
    assert load_profile("gpu-example")["gpus_per_node"] == 1
    with pytest.raises(BenchError, match="SLURM profile 'nope' not found.*gpu-example, local"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: gpu\ngpus: 2\n")
    with pytest.raises(BenchError, match=r"bad.yaml: unknown field 'gpus'"):
        load_profile(str(bad))
    bad.write_text("partition: gpu\ntimeout_min: -5\n")
    with pytest.raises(BenchError, match=r"bad.yaml: field 'timeout_min' has bad value -5"):
        load_profile(str(bad))
    bad.write_text("partition: [gpu\n")
    with pytest.raises(BenchError, match=r"bad.yaml: bad YAML"):
        load_profile(str(bad))


def test_array_ids_expand():
    from bench.slurm import _expand
    assert _expand("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert _expand("12_3") == ["12_3"]


@pytest.mark.slow  # starts the CLI in a subprocess
def test_bad_profile_is_one_line(tmp_path):
    r = bench("run", "--executor", "slurm", "--profile", "nope", "--out", str(tmp_path / "s"))
    if shutil.which("sbatch") is None:
        assert_one_line_error(r, "sbatch not found")
    else:
        assert_one_line_error(r, "SLURM profile 'nope' not found")


@pytest.mark.slow  # two collects in subprocesses
def test_two_concurrent_collects_leave_valid_files(tmp_path):
    """Sweep-level files are written by collect, atomically: concurrent collects never leave a torn file."""
    out = tmp_path / "sweep"
    for i in range(40):
        d = out / f"kl_free_lora_r{i + 1}_s0"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"run_id": d.name, "method": "kl_free_lora", "rank": str(i + 1),
                                                    "seed": 0, "status": "ok", "accuracy": 0.5, "kl_ref": 0.01}))
    code = f"from pathlib import Path; from bench.sweep import collect\nfor _ in range(15): collect(Path({str(out)!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    import pandas as pd
    seen = 0
    while any(p.poll() is None for p in procs):
        if (out / "summary.csv").is_file():
            assert len(pd.read_csv(out / "summary.csv")) == 40  # never a partial file
            seen += 1
        if (out / "tables.md").is_file():
            assert (out / "tables.md").read_text().startswith("# Sweep tables")
        time.sleep(0.01)
    assert seen > 0 and all(p.returncode == 0 for p in procs) and len(pd.read_csv(out / "summary.csv")) == 40
    assert not list(out.glob(".*tmp*")) and not list(out.glob("*.tmp"))


@needs_slurm
def test_sbatch_failure_is_one_line_and_nothing_is_recorded(tmp_path, tiny):
    out = tmp_path / "s"
    r = bench("run", "--executor", "slurm", "--profile", "local", "--partition", "no_such_partition",
              "--methods", "kl_free_lora", "--ranks", "4", *TINY, "--out", str(out))
    assert_one_line_error(r, "sbatch failed", "partition")
    assert not (out / "slurm_jobs.json").exists()


@needs_slurm
def test_four_task_array_matches_local_runs_and_status(tmp_path, tiny):
    out = tmp_path / "sweep"
    r = bench("run", "--executor", "slurm", "--profile", "local", "--methods", "kl_free_lora,proma",
              "--ranks", "4,8", *TINY, "--out", str(out), "--wait", "--wait-timeout", "600", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted SLURM array" in r.stdout and "4 run(s) of 4" in r.stdout
    record = read_json(out / "slurm_jobs.json")
    assert len(record["runs"]) == 4 and len({j.split("_")[0] for j in record["runs"].values()}) == 1  # one array
    runs = sorted(p.parent.name for p in out.glob("*/summary.json"))
    assert runs == ["kl_free_lora_r4_s0", "kl_free_lora_r8_s0", "proma_r4_s0", "proma_r8_s0"]
    assert all(read_json(out / run / "summary.json")["status"] == "ok" for run in runs)
    import pandas as pd
    assert len(pd.read_csv(out / "summary.csv")) == 4 and (out / "tables.md").is_file()
    status = bench("status", str(out))
    assert status.returncode == 0 and status.stdout.count(" ok ") == 4, status.stdout
    # the same spec run locally gives the same metrics (CPU, same seed)
    from bench.runner import run_one
    from bench.spec import RunSpec
    spec = RunSpec.from_dict(read_json(out / "proma_r8_s0" / "config.json")["spec"])
    local = run_one(spec, tmp_path / "local", progress=False)
    assert _strip(read_jsonl(tmp_path / "local" / "metrics.jsonl")) == \
        _strip(read_jsonl(out / "proma_r8_s0" / "metrics.jsonl"))
    assert local["accuracy"] == read_json(out / "proma_r8_s0" / "summary.json")["accuracy"]


@needs_slurm
def test_a_two_process_run_launches_inside_its_array_task(tmp_path, tiny):
    """--nproc-per-run 2: the array task starts the run's processes itself (bench.distributed, torchrun over gloo
    here; one per GPU on a GPU partition), and rank 0 writes the run's files."""
    out = tmp_path / "sweep"
    r = bench("run", "--executor", "slurm", "--profile", "local", "--methods", "kl_free_lora", "--ranks", "4",
              "--nproc-per-run", "2", *TINY, "--out", str(out), "--wait", "--wait-timeout", "600", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = read_json(out / "kl_free_lora_r4_s0" / "summary.json")
    assert summary["status"] == "ok" and summary["world_size"] == 2, summary
    assert read_json(out / "kl_free_lora_r4_s0" / "config.json")["machine"]["world_size"] == 2
    assert [row["step"] for row in read_jsonl(out / "kl_free_lora_r4_s0" / "metrics.jsonl")] == [0, 1, 2]


@needs_slurm
def test_cancelled_task_shows_failed_and_resume_submits_only_it(tmp_path, tiny):
    out = tmp_path / "sweep"
    args = ["run", "--executor", "slurm", "--profile", "local", "--array-parallelism", "1",
            "--methods", "kl_free_lora", "--ranks", "4,8", *TINY, "--out", str(out), "--no-progress"]
    r = bench(*args)
    assert r.returncode == 0, r.stderr
    jobs = read_json(out / "slurm_jobs.json")["runs"]
    subprocess.run(["scancel", jobs["kl_free_lora_r8_s0"]], check=True)  # still pending: parallelism 1
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = {row.split()[0]: row.split()[1] for row in bench("status", str(out)).stdout.splitlines()[1:-1]}
        if rows.get("kl_free_lora_r4_s0") == "ok" and rows.get("kl_free_lora_r8_s0") == "failed":
            break
        time.sleep(2)
    status = bench("status", str(out)).stdout
    print(status)
    assert "kl_free_lora_r8_s0" in status and "CANCELLED" in status, status
    assert rows == {"kl_free_lora_r4_s0": "ok", "kl_free_lora_r8_s0": "failed"}, status
    r = bench(*args, "--resume", "--wait", "--wait-timeout", "600")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 run(s) of 2" in r.stdout  # only the missing run was resubmitted
    assert read_json(out / "kl_free_lora_r8_s0" / "summary.json")["status"] == "ok"


@needs_slurm
def test_preempted_task_checkpoints_requeues_and_resumes_to_the_same_metrics(tmp_path, tiny):
    from bench import slurm
    from bench.runner import run_one
    from bench.spec import RunSpec
    spec = RunSpec(method="kl_free_lora", rank=4, steps=12, eval_size=4, probe_size=2, probe_every=4,
                   kl_step_seqs=2, max_completion_length=24, checkpoint_every=100)
    out = tmp_path / "sweep"
    job = slurm.submit([spec], out, slurm.load_profile("local"))["runs"][spec.run_id]
    metrics = out / spec.run_id / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(read_jsonl(metrics)) >= 2):  # training has started
        assert time.time() < deadline, "the array task never started training"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before a time limit
    # SLURM holds a requeued job until a BeginTime ~2 minutes out; start it now, as an admin could
    deadline = time.time() + 300
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True).stdout
        if "BeginTime" in q:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            break
        if (out / spec.run_id / "summary.json").is_file() and \
                read_json(out / spec.run_id / "summary.json")["status"] == "ok":
            break
        time.sleep(0.3)
    rows = slurm.wait(out, [spec.run_id], timeout_s=600, poll_s=1)
    summary = read_json(out / spec.run_id / "summary.json")
    log = "".join(p.read_text() for p in (out / ".slurm").rglob("*.err"))
    assert summary["status"] == "ok", (summary, rows, log[-2000:])
    assert summary["resumed_from"] is not None, summary
    assert "Caught signal SIGUSR2" in log and "DUE TO JOB REQUEUE" in log, log[-2000:]  # submitit, then SLURM
    local = run_one(spec, tmp_path / "local", progress=False)
    assert _strip(read_jsonl(tmp_path / "local" / "metrics.jsonl")) == _strip(read_jsonl(metrics))
    assert local["accuracy"] == summary["accuracy"]


def test_stop_request_saves_at_a_generation_boundary_and_resumes_identically(tmp_path, tiny, monkeypatch):
    """The in-process half of preemption (no SLURM needed): a stop request ends the run at the end of the
    current generation batch with a checkpoint and status `preempted`; re-running resumes to the same metrics."""
    from bench import runner
    from bench.runner import run_one
    from bench.spec import RunSpec
    spec = RunSpec(method="kl_free_lora", rank=4, steps=6, eval_size=4, probe_size=2, probe_every=2,
                   kl_step_seqs=2, max_completion_length=24, checkpoint_every=100)
    original = runner.MetricsCallback.on_step_end

    def request_stop_at_step_3(self, args, state, control, **kw):
        if state.global_step == 3:
            runner.request_stop()
        return original(self, args, state, control, **kw)
    monkeypatch.setattr(runner.MetricsCallback, "on_step_end", request_stop_at_step_3)
    try:
        s = run_one(spec, tmp_path / "cut", progress=False)
    finally:
        runner.clear_stop_request()
    assert s["status"] == "preempted" and "step 4" in s["error"], s
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-4").is_dir()
    monkeypatch.setattr(runner.MetricsCallback, "on_step_end", original)
    s = run_one(spec, tmp_path / "cut", progress=False)
    assert s["status"] == "ok" and s["resumed_from"] == "checkpoint-4"
    whole = run_one(spec, tmp_path / "whole", progress=False)
    assert _strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == _strip(read_jsonl(tmp_path / "whole" /
                                                                                       "metrics.jsonl"))
    assert s["accuracy"] == whole["accuracy"]


def test_cluster_tests_ran_in_ci():
    """In CI (.ci/run sets BENCH_REQUIRE_SLURM=1 after starting the cluster) the cluster tests must not skip."""
    if os.environ.get("BENCH_REQUIRE_SLURM") == "1":
        assert _cluster_up(), "BENCH_REQUIRE_SLURM=1 but no SLURM cluster answers"
