"""Sweeps on SLURM through submitit: the whole grid as one job array (one array task per run spec).

- Each array task runs `run_one` on its own run directory only; sweep-level files (summary.csv, tables.md) are
  written by `bench collect` / `bench report` (atomic writes).
- Preemption and time limits: SLURM signals USR2 (submitit's `--signal USR2@<delay>`); the task stops at the end
  of the current generation batch, saves a checkpoint there, and is requeued through submitit's checkpointing;
  the requeued task resumes from that checkpoint and ends with the metrics of an uninterrupted run.
- `SWEEP/slurm_jobs.json` records which job holds which run (written by the submitter, atomically);
  `bench status` joins it with the run directories and `sacct`.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError
from bench.io import atomic_write_json, read_json
from bench.results import read_summary as read_run_summary
from bench.runlock import held_by
from bench.spec import RunSpec

PROFILE_DIR = Path(__file__).resolve().parent.parent / "slurm"
# profile field -> (type check, submitit parameter)
PROFILE_FIELDS = {
    "partition": (str, "slurm_partition"), "gpus_per_node": (int, "gpus_per_node"),
    "cpus_per_task": (int, "cpus_per_task"), "mem_gb": ((int, float), "mem_gb"),
    "timeout_min": (int, "timeout_min"), "array_parallelism": (int, "slurm_array_parallelism"),
    "signal_delay_s": (int, "slurm_signal_delay_s"), "setup": (list, "slurm_setup"),
    "additional_parameters": (dict, "slurm_additional_parameters"),
    # the task's last GPUs, kept for a `trl vllm-serve` its setup starts (vllm_mode server): not for training
    "vllm_server_gpus": (int, None),
}
# signal_delay_s: USR2 this long before the time limit, to finish the generation batch and save a checkpoint
DEFAULT_PROFILE = {"timeout_min": 60, "cpus_per_task": 1, "array_parallelism": 64, "signal_delay_s": 300}
RECORD = "slurm_jobs.json"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str | None) -> dict:
    """A named profile in slurm/NAME.yaml or a path to one; fields are checked by name and type."""
    import yaml
    if not name:
        return dict(DEFAULT_PROFILE)
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise BenchError(f"SLURM profile {name!r} not found ({path}); shipped profiles: {', '.join(profile_names())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise BenchError(f"SLURM profile {path}: bad YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BenchError(f"SLURM profile {path}: expected a mapping of field: value")
    load_profile_values(data, f"SLURM profile {path}")
    return {**DEFAULT_PROFILE, **data}


def load_profile_values(profile: dict, where: str = "SLURM options") -> None:
    for key, value in profile.items():
        if key not in PROFILE_FIELDS:
            raise BenchError(f"{where}: unknown field {key!r}; valid: {', '.join(PROFILE_FIELDS)}")
        kind = PROFILE_FIELDS[key][0]
        if isinstance(value, bool) or not isinstance(value, kind) or (
                isinstance(value, (int, float)) and value <= 0):
            raise BenchError(f"{where}: field {key!r} has bad value {value!r}")


def executor_parameters(profile: dict) -> dict:
    return {PROFILE_FIELDS[k][1]: v for k, v in profile.items() if v is not None and PROFILE_FIELDS[k][1]}


class RunTask:
    """One array task: run (or resume) one run spec in its own directory. Checkpointable: when SLURM signals
    preemption or the time limit, the run stops at a generation-batch boundary with a checkpoint, and submitit
    requeues this same call, which resumes from it. tracking: experiment trackers (bench.trackers.Tracking)."""

    def __init__(self, tracking=None, nproc: int = 1):
        self.tracking, self.nproc = tracking, nproc

    def __call__(self, spec: dict, run_dir: str) -> dict:
        from bench import runner  # torch and TRL: imported in the array task only, not by `bench status`

        # torch's thread count is chosen by run_one as in a local run (parallel.run_threads): CPU float sums depend
        # on it, and a SLURM sweep must reproduce a local one bit for bit
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda *_: runner.request_stop())
        # nproc > 1: the task's processes start here (bench.distributed.launch: torchrun over the task's GPUs)
        summary = runner.run_one(RunSpec.from_dict(spec), Path(run_dir), progress=False,
                                 tracking=getattr(self, "tracking", None), nproc=getattr(self, "nproc", 1))
        if summary.get("status") == "preempted" and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)  # submitit: checkpoint() -> requeue -> exit
        return summary

    def checkpoint(self, spec: dict, run_dir: str):
        import submitit
        return submitit.helpers.DelayedSubmission(self, spec, run_dir)


@contextmanager
def _captured_stderr():
    """Point file descriptor 2 at a temporary file for the block (child processes included)."""
    import sys
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read())


def _sbatch_error(e: Exception, stderr: str = "") -> str:
    text = stderr + "\n" + str(e)
    for line in text.splitlines():
        if "error" in line.lower() and "sbatch" in line.lower():
            return line.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if not p.is_dir()} if folder.is_dir() else set()


def _remove_new(folder: Path, before: set[Path], new_dirs: list[Path]) -> None:
    """Undo a failed submission: files that appeared under folder since `before`, empty folders left by them, and
    the directories the submission created (if empty)."""
    for path in _files_under(folder) - before:
        path.unlink(missing_ok=True)
    if folder.is_dir():
        for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
    for d in new_dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def task_nproc(profile: dict, nproc: int | None, specs) -> int:
    """Processes per run of a SLURM sweep: --nproc-per-run, else one per training GPU of the task (the profile's
    gpus_per_node less its vllm_server_gpus), else 1. Rank r trains on the task's GPU r, so a vLLM server the setup
    starts goes on the last GPUs. More processes than training GPUs is refused (the node checks the rest)."""
    from bench.distributed import check_nproc
    gpus, server = profile.get("gpus_per_node"), profile.get("vllm_server_gpus") or 0
    if server and (not gpus or server >= gpus):
        raise BenchError(f"SLURM profile: vllm_server_gpus {server} leaves no GPU of the task's "
                         f"{gpus or 0} (gpus_per_node) for training")
    training = (gpus - server) if gpus else None
    n = nproc if nproc is not None else (training or 1)
    if training and n > training:
        raise BenchError(f"--nproc-per-run {n}: the SLURM profile gives each task {training} training GPU(s); one "
                         "per process")
    check_nproc(specs, n, local=False)
    return n


def submit(specs, out: Path, profile: dict, tracking=None, nproc: int = 1) -> dict:
    """Submit the specs as one job array; record {run_id: job_id} in out/slurm_jobs.json. Returns the record."""
    import submitit

    new_dirs = [d for d in (out / ".slurm", out, *out.parents) if not d.exists()]
    before = _files_under(out / ".slurm")
    out.mkdir(parents=True, exist_ok=True)
    err: list[str] = []
    try:
        executor = submitit.AutoExecutor(folder=str(out / ".slurm" / "%j"), cluster="slurm", slurm_max_num_timeout=3)
        executor.update_parameters(name=f"bench-{out.name}", **executor_parameters(profile))
        with _captured_stderr() as err:  # submitit lets sbatch write to our stderr; keep it for the one-line error
            jobs = executor.map_array(RunTask(tracking, nproc), [s.to_dict() for s in specs],
                                      [str(out / s.run_id) for s in specs])
    except Exception as e:  # sbatch refused (no such partition, bad limits): nothing is recorded as submitted
        _remove_new(out / ".slurm", before, new_dirs)  # and nothing is left: submitit's pickles and script
        raise BenchError(f"sbatch failed: {_sbatch_error(e, ''.join(err))}") from None
    record = read_record(out)
    array_id = jobs[0].job_id.split("_")[0]
    record.setdefault("arrays", []).append({"array_id": array_id, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            "profile": profile, "runs": [s.run_id for s in specs]})
    record.setdefault("runs", {}).update({s.run_id: j.job_id for s, j in zip(specs, jobs)})
    atomic_write_json(out / RECORD, record)
    return record


def to_submit(specs, out: Path, resume: bool) -> list:
    """The runs of the grid to submit: all but those finished (ok, diverged), pending or running. Runs already pending
    or running are an error without `resume`, and so are runs whose state SLURM cannot tell (nothing is submitted)."""
    states = {r["run_id"]: r["state"] for r in sweep_status(out)}
    unknown = [s.run_id for s in specs if states.get(s.run_id) == "unknown"]
    if unknown:
        raise BenchError(f"{out}: cannot tell whether {len(unknown)} submitted run(s) are still queued "
                         f"(e.g. {unknown[0]}): sacct and squeue failed; nothing submitted")
    active = [s.run_id for s in specs if states.get(s.run_id) in ("pending", "running")]
    if active and not resume:
        raise BenchError(f"{out}: {len(active)} run(s) already pending or running under SLURM "
                         f"(e.g. {active[0]}); use --resume to submit only what is missing")
    return [s for s in specs if states.get(s.run_id) not in ("ok", "diverged", "pending", "running")]


def read_record(out: Path) -> dict:
    """SWEEP/slurm_jobs.json ({} when absent); a corrupt one is a one-line error naming it."""
    path = Path(out) / RECORD
    if not path.is_file():
        return {}
    try:
        record = read_json(path)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: unreadable ({type(e).__name__}): the record of submitted SLURM jobs is damaged; "
                         "move it away to rebuild the status from the run directories") from None
    if not (isinstance(record, dict) and isinstance(record.get("runs", {}), dict)
            and all(isinstance(j, str) for j in record.get("runs", {}).values())
            and isinstance(record.get("arrays", []), list)):
        raise BenchError(f"{path}: not a SLURM submission record (expected {{\"runs\": {{run: job}}, "
                         "\"arrays\": [...]})")
    return record


def read_summary(path: Path) -> tuple[dict, str | None]:
    """(summary, problem): a run's summary.json ({} when absent), or ({}, why) when it cannot be read as one."""
    summary, why = read_run_summary(path)
    return summary or {}, why


# sacct/squeue state -> bench state (for runs whose directory holds no final summary)
SCHEDULER_STATES = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
                    "SPECIAL_EXIT": "pending", "RESV_DEL_HOLD": "pending", "RUNNING": "running",
                    "COMPLETING": "running", "CONFIGURING": "running", "SUSPENDED": "running", "STOPPED": "running",
                    "SIGNALING": "running", "STAGE_OUT": "running", "RESIZING": "running", "PREEMPTED": "preempted",
                    "CANCELLED": "failed", "FAILED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed",
                    "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed", "COMPLETED": "failed"}


def _expand(job_id: str) -> list[str]:
    """'12_[0-2,5%2]' -> ['12_0', '12_1', '12_2', '12_5']; '12_3' -> ['12_3']."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    ids = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def scheduler_states(array_ids: list[str]) -> tuple[dict[str, str], str | None]:
    """({job_id: SLURM state}, source): source "sacct" (accounting: every job), "squeue" (queued and running jobs
    only: a job missing from it has left the queue), or None when SLURM could not be asked."""
    if not array_ids:
        return {}, None
    states: dict[str, str] = {}
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(array_ids)],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                job, _, state = line.partition("|")
                for j in _expand(job.strip()):
                    states[j] = state.split()[0] if state else "UNKNOWN"
            return states, "sacct"
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(array_ids)],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return {}, None
        for line in out.stdout.splitlines():
            job, _, state = line.partition("|")
            states[job.strip()] = state.strip()
        return states, "squeue"
    except (OSError, subprocess.SubprocessError):
        return {}, None


def sweep_status(out: Path) -> list[dict]:
    """One row per run: run_id, state (pending | running | ok | failed | diverged | preempted; running also for a
    local run whose lock a process holds; unfinished: a local run started without a final record that nobody runs;
    unreadable: its summary.json is damaged (bench.results.read_summary) and no SLURM job holds it; unknown when
    SLURM cannot be asked about a run without a final record), job_id, detail."""
    out = Path(out)
    record = read_record(out)
    jobs = record.get("runs", {})
    run_ids = sorted(set(jobs) | {p.parent.name for p in out.glob("*/config.json")})
    live, source = scheduler_states(sorted({j.split("_")[0] for j in jobs.values()}))
    rows = []
    for run_id in run_ids:
        summary, problem = read_summary(out / run_id / "summary.json")
        job = jobs.get(run_id)
        scheduler = live.get(job) if job else None
        state, detail = summary.get("status"), summary.get("error") or ""
        active = SCHEDULER_STATES.get(scheduler) in ("pending", "running")
        holder = held_by(out / run_id)  # a process on this machine running it now (bench.runlock)
        if state in ("ok", "diverged", "failed") and not (state == "failed" and (active or holder)):
            pass  # the run's own record is final
        elif holder is not None and scheduler is None:
            state, detail = "running", f"locally, {holder}"
        elif scheduler is not None:
            state = SCHEDULER_STATES.get(scheduler, scheduler.lower())
            if state in ("failed", "preempted"):
                detail = f"SLURM state {scheduler}" + ("" if summary else ", no summary written")
        elif job and source == "squeue":  # without accounting: not queued any more, and no final record
            state, detail = "failed", state and f"left the queue as {state}" or "left the queue without a summary"
        elif job and source is None:
            state, detail = "unknown", "SLURM could not be asked (sacct/squeue failed)"
        elif job and state is None:  # sacct can lag a fresh submission by a moment
            state = "pending"
        elif problem:
            state, detail = "unreadable", problem
        elif state is None:  # a local run: started, no final record, and no process holds it: stopped
            state, detail = "unfinished", detail or "stopped before its summary.json (re-run resumes it)"
        if problem and state != "unreadable":
            detail = f"{detail}; summary.json {problem}" if detail else f"summary.json {problem}"
        rows.append({"run_id": run_id, "state": state, "job_id": job or "-", "detail": detail})
    return rows


def wait(out: Path, run_ids: list[str], timeout_s: float, poll_s: float = 2.0) -> list[dict]:
    """Poll until none of run_ids is pending or running (or the timeout); returns the last status rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in sweep_status(out) if r["run_id"] in set(run_ids)]
        if all(r["state"] not in ("pending", "running") for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(poll_s)
