"""Sweeps: the grid of RunSpecs and running it, in this process or in worker processes (tables: bench.tables)."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import threading
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from bench import parallel
from bench.device import local_gpus, pin_worker, worker_gpus
from bench.errors import BenchError
from bench.io import atomic_write_json
from bench.parallel import cpu_count
from bench.results import outcome
from bench.runner import run_one, unfinished_runs
from bench.spec import RunSpec
from bench.tables import collect


def grid(methods: list[str], ranks: list, seeds: list[int], method_params: dict | None = None,
         scalings: list[str] | None = None, **common) -> list[RunSpec]:
    """method_params: {method: {param: value}} (each method gets only its own); scalings: LoRA scaling rules
    (bench.scaling), one more axis (rank `full` has none: its run appears once)."""
    per = method_params or {}
    specs = [RunSpec(method=m, rank=r, seed=s, method_params=dict(per.get(m, {})), lora_scaling=sc, **common)
             for m in methods for r in ranks for sc in scalings or ["rank"] for s in seeds]
    return list(dict.fromkeys(specs))


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise BenchError(f"output directory {out} is not writable: {e.strerror or e}") from None


def run_sweep(specs: list[RunSpec], out: Path, progress: bool = True, jobs: int = 1, tracking=None,
              nproc: int | None = None) -> pd.DataFrame:
    """Run the grid: in this process (jobs 1) or in `jobs` worker processes of cpu_count // jobs threads (a run
    may pin fewer: parallel.run_threads). Runs that another process is running (another invocation on the same
    --out) are left to it, said on stderr, and listed in the returned table's attrs["held"]. tracking: experiment
    trackers (bench.trackers.Tracking). nproc: data-parallel processes per run (bench.distributed; None: 1);
    with jobs > 1 on CUDA each worker is pinned to nproc GPUs of its own."""
    nproc = nproc or 1
    check_writable(out)
    held = []

    def finished(spec: RunSpec, summary: dict) -> None:
        if summary.get("status") == "held":
            held.append(spec.run_id)
            tqdm.write(f"{spec.run_id}: {summary['error']}", file=sys.stderr)
    # runs finished earlier are skipped here, as run_one would skip them, so that no worker process is started for
    # them (a spawned worker costs seconds of imports before it can tell)
    todo = unfinished_runs(specs, out)
    if jobs > 1 and len(todo) > 1:
        _run_parallel(todo, out, progress, min(jobs, len(todo)), finished, tracking, nproc)
    else:
        bar = tqdm(todo, desc="runs", position=0, disable=not progress)
        for spec in bar:
            bar.set_postfix_str(spec.run_id)
            finished(spec, run_one(spec, out / spec.run_id, progress=progress, position=1, tracking=tracking,
                                   nproc=nproc))
            collect(out)
    df = collect(out)
    df.attrs["held"] = held
    return df


_STEPS = None  # in a worker: the queue its runs report finished steps to


def _worker_init(threads: int, steps_queue, gpu_queue=None) -> None:
    pin_worker(gpu_queue)  # this worker's GPU (bench.device), before anything here initializes CUDA
    global _STEPS
    warnings.filterwarnings("ignore", category=FutureWarning)  # as bench.cli.main: transformers 5.x notices, per run
    torch.set_num_threads(threads)  # the worker's share of the cores; run_one may pin fewer (parallel.run_threads)
    parallel.set_forward_cores(threads)  # and no more for its forwards (parallel.forward_threads)
    _STEPS = steps_queue


class _QueueBar:
    """What a run's progress bar does, reported to the parent's step bar through a queue."""

    def update(self, n=1):
        _STEPS.put(n)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _run_in_worker(spec_dict: dict, run_dir: str, tracking=None, nproc: int = 1) -> dict:
    summary = run_one(RunSpec.from_dict(spec_dict), Path(run_dir), progress=False, bar=_QueueBar(), tracking=tracking,
                      nproc=nproc)
    return {"status": summary.get("status"), "error": summary.get("error")}


def _run_parallel(specs: list[RunSpec], out: Path, progress: bool, jobs: int, finished, tracking=None,
                  nproc: int = 1) -> None:
    """Runs in `jobs` spawned worker processes (fresh interpreters, each reused for several runs). A worker that
    dies (e.g. killed for memory) breaks the pool: the runs then underway are retried one at a time, so that the
    one that kills its worker again is recorded failed and the sweep goes on."""
    ctx = mp.get_context("spawn")
    steps_queue = ctx.Queue()
    threads = max(1, cpu_count() // jobs)
    gpus = local_gpus(specs)  # [] on CPU: workers are not pinned
    if nproc > 1 and gpus:  # each worker's run spans nproc GPUs: the worker sees a group of them
        gpus = [",".join(gpus[i:i + nproc]) for i in range(0, len(gpus) - nproc + 1, nproc)]
    runs_bar = tqdm(total=len(specs), desc=f"runs ({jobs} at a time)", position=0, disable=not progress)
    steps_bar = tqdm(total=sum(s.steps for s in specs), desc="steps", position=1, disable=not progress)

    def drain():
        while (n := steps_queue.get()) is not None:
            steps_bar.update(n)
    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()

    def done(spec, summary: dict):
        finished(spec, summary)
        runs_bar.update(1)
        collect(out)
    try:
        todo, cut = list(specs), {}
        while todo:
            broken = _pool_run(todo, out, ctx, min(jobs, len(todo)), threads, steps_queue, done, tracking, gpus,
                               nproc)
            for s in broken:
                cut[s.run_id] = cut.get(s.run_id, 0) + 1
            # suspects: runs underway when the worker died, and any run cut off twice (a death before it started)
            suspects = [s for s in broken if (out / s.run_id / "config.json").is_file() or cut[s.run_id] >= 2]
            todo = [s for s in broken if s not in suspects]
            for spec in suspects:  # alone in a pool of one: a second death is this run's own
                if _pool_run([spec], out, ctx, 1, threads, steps_queue, done, tracking, gpus, nproc):
                    done(spec, _record_crash(spec, out))
    finally:
        steps_queue.put(None)
        drainer.join(timeout=5)
        steps_bar.close()
        runs_bar.close()


def worker_pool(ctx, jobs: int, threads: int, steps_queue, gpus: list[str] | None = None):
    """A pool of `jobs` spawned workers of `threads` torch threads each, worker i pinned to GPU i where `gpus` are
    given (bench.device: round-robin past their number)."""
    gpu_queue = None
    if gpus:
        gpu_queue = ctx.Queue()  # one entry per worker: each takes its own as it starts (a pool starts `jobs` at most)
        for gpu in worker_gpus(gpus, jobs):
            gpu_queue.put(gpu)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                               initargs=(threads, steps_queue, gpu_queue))


def _pool_run(specs, out: Path, ctx, jobs: int, threads: int, steps_queue, done, tracking=None,
              gpus: list[str] | None = None, nproc: int = 1) -> list[RunSpec]:
    """Run specs in a pool of `jobs` workers (worker_pool); returns the specs cut off by a worker's death (pool
    broken)."""
    broken = []
    pool = worker_pool(ctx, jobs, threads, steps_queue, gpus)
    try:
        futures = {pool.submit(_run_in_worker, s.to_dict(), str(out / s.run_id), tracking, nproc): s for s in specs}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    summary = f.result()
                except BrokenProcessPool:
                    broken.append(futures[f])
                    continue
                done(futures[f], summary)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return broken


def _record_crash(spec: RunSpec, out: Path) -> dict:
    (out / spec.run_id).mkdir(parents=True, exist_ok=True)
    summary = outcome(spec, "failed", "its worker process died (killed, e.g. out of memory, or crashed in native code)")
    atomic_write_json(out / spec.run_id / "summary.json", summary)
    return summary
