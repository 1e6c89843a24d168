"""Sweeps: the grid of RunSpecs, running it in-process, and collecting run directories into sweep tables."""
from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.io import atomic_write_text, read_json
from bench.spec import RunSpec

# summary.csv columns, in order (documented in README, "Output files")
SUMMARY_COLUMNS = ["run_id", "method", "rank", "seed", "status", "accuracy_base", "accuracy", "accuracy_gain",
                   "kl_ref", "kl_ref_k3", "kl_step", "kl_step_max", "entropy", "entropy_base", "entropy_rollout",
                   "reward", "reward_first", "wall_clock_s", "time_generation_s", "time_reference_s",
                   "time_policy_s", "time_other_s", "time_metrics_s", "tokens_per_s", "peak_mem_mb",
                   "trainable_params", "trained_set", "init_kl_to_base", "steps_done", "run_seconds", "error"]
TABLES = [("kl_ref", "KL to the initial policy (kl_ref, final, exact, probe set)", "{:.2e}"),
          ("kl_step", "Per-step KL (kl_step, mean over steps)", "{:.2e}"),
          ("entropy", "Entropy on the probe set (final)", "{:.3f}"),
          ("accuracy", "Greedy eval accuracy after training (strict match)", "{:.3f}"),
          ("accuracy_gain", "Accuracy gain over the base policy", "{:+.3f}"),
          ("wall_clock_s", "Training wall-clock, seconds (metrics excluded)", "{:.1f}")]


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


def run_sweep(specs: list[RunSpec], out: Path, progress: bool = True, jobs: int = 1) -> pd.DataFrame:
    """Run the grid: in this process (jobs 1) or in `jobs` worker processes of cpu_count // jobs threads (a run
    may pin fewer: runner.run_threads). Runs that another process is running (another invocation on the same
    --out) are left to it, said on stderr, and listed in the returned table's attrs["held"]."""
    from tqdm.auto import tqdm

    check_writable(out)
    held = []

    def finished(spec: RunSpec, summary: dict) -> None:
        if summary.get("status") == "held":
            held.append(spec.run_id)
            tqdm.write(f"{spec.run_id}: {summary['error']}", file=sys.stderr)
    if jobs > 1 and len(specs) > 1:
        _run_parallel(specs, out, progress, min(jobs, len(specs)), finished)
    else:
        from bench.runner import run_one
        bar = tqdm(specs, desc="runs", position=0, disable=not progress)
        for spec in bar:
            bar.set_postfix_str(spec.run_id)
            finished(spec, run_one(spec, out / spec.run_id, progress=progress, position=1))
            collect(out)
    df = collect(out)
    df.attrs["held"] = held
    return df


def cpu_count() -> int:
    """The cores this process may use: its CPU affinity, and inside a SLURM job step no more than it was allocated
    (clusters without task binding let a task see every core of the node)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(n, int(allocated)) if allocated.isdigit() and int(allocated) > 0 else n


# A model this small does not use several cores for one run (tiny matrices, Python-bound decoding): on CPU, its
# runs get one torch thread each and run side by side, one per core.
SMALL_MODEL_PARAMS = 50_000_000


def small_model_on_cpu(specs: list[RunSpec]) -> bool:
    from bench.runner import resolve_device
    if not specs or any(resolve_device(s.device) != "cpu" for s in specs):
        return False
    return max(_model_parameters(m) for m in {s.model for s in specs}) < SMALL_MODEL_PARAMS


def default_threads(specs: list[RunSpec]) -> int | None:
    """Torch threads per run unless BENCH_NUM_THREADS says otherwise: 1 for a small model on CPU, whatever the
    machine and however many runs go at once, so that a run's metrics are the same alone, in a local sweep, on
    SLURM and on a machine with more cores (CPU float sums depend on the thread count). None: torch's default."""
    return 1 if small_model_on_cpu(specs) else None


def auto_jobs(specs: list[RunSpec]) -> int:
    """--jobs auto: on CPU with a model under 50M parameters, one run per core (at most one per 2 GiB of available
    memory); otherwise (GPU, larger models) one run at a time."""
    if not small_model_on_cpu(specs):
        return 1
    try:
        import psutil
        by_memory = max(1, int(psutil.virtual_memory().available // 2**31))
    except ImportError:
        by_memory = cpu_count()
    return max(1, min(cpu_count(), by_memory, len(specs)))


@functools.lru_cache(maxsize=None)
def _model_parameters(model: str) -> int:
    """Once per model and process: asked by --jobs auto and again by every run for its thread count."""
    from bench.models import load_config
    return _parameter_count(load_config(model))


def _parameter_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # the architecture without memory or weights
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters())


_STEPS = None  # in a worker: the queue its runs report finished steps to


def _worker_init(threads: int, steps_queue) -> None:
    import warnings

    import torch
    global _STEPS
    warnings.filterwarnings("ignore", category=FutureWarning)  # as bench.cli.main: transformers 5.x notices, per run
    torch.set_num_threads(threads)  # the worker's share of the cores; run_one may pin fewer (runner.run_threads)
    from bench import runner
    runner.FORWARD_CORES = threads  # and no more for its forwards (runner.forward_threads)
    _STEPS = steps_queue


class _QueueBar:
    """What a run's progress bar does, reported to the parent's step bar through a queue."""

    def update(self, n=1):
        _STEPS.put(n)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _run_in_worker(spec_dict: dict, run_dir: str) -> dict:
    from bench.runner import run_one
    summary = run_one(RunSpec.from_dict(spec_dict), Path(run_dir), progress=False, bar=_QueueBar())
    return {"status": summary.get("status"), "error": summary.get("error")}


def _run_parallel(specs: list[RunSpec], out: Path, progress: bool, jobs: int, finished) -> None:
    """Runs in `jobs` spawned worker processes (fresh interpreters, each reused for several runs). A worker that
    dies (e.g. killed for memory) breaks the pool: the runs then underway are retried one at a time, so that the
    one that kills its worker again is recorded failed and the sweep goes on."""
    import multiprocessing as mp
    import threading

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    steps_queue = ctx.Queue()
    threads = max(1, cpu_count() // jobs)
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
            broken = _pool_run(todo, out, ctx, min(jobs, len(todo)), threads, steps_queue, done)
            for s in broken:
                cut[s.run_id] = cut.get(s.run_id, 0) + 1
            # suspects: runs underway when the worker died, and any run cut off twice (a death before it started)
            suspects = [s for s in broken if (out / s.run_id / "config.json").is_file() or cut[s.run_id] >= 2]
            todo = [s for s in broken if s not in suspects]
            for spec in suspects:  # alone in a pool of one: a second death is this run's own
                if _pool_run([spec], out, ctx, 1, threads, steps_queue, done):
                    done(spec, _record_crash(spec, out))
    finally:
        steps_queue.put(None)
        drainer.join(timeout=5)
        steps_bar.close()
        runs_bar.close()


def _pool_run(specs, out: Path, ctx, jobs: int, threads: int, steps_queue, done) -> list[RunSpec]:
    """Run specs in a pool of `jobs` workers; returns those cut off by a worker's death (pool broken)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    broken = []
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                               initargs=(threads, steps_queue))
    try:
        futures = {pool.submit(_run_in_worker, s.to_dict(), str(out / s.run_id)): s for s in specs}
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
    from bench.io import atomic_write_json
    (out / spec.run_id).mkdir(parents=True, exist_ok=True)
    summary = {"run_id": spec.run_id, "method": spec.method, "rank": str(spec.rank), "seed": spec.seed,
               "status": "failed",
               "error": "its worker process died (killed, e.g. out of memory, or crashed in native code)"}
    atomic_write_json(out / spec.run_id / "summary.json", summary)
    return summary


_TEXT_COLUMNS = {"run_id", "method", "rank", "status", "trained_set", "error"}
_CURVE_COLUMNS = ("kl_ref", "kl_ref_k3", "kl_step", "entropy", "entropy_probe", "reward")  # what reports plot


def summary_problem(s) -> str | None:
    """Why a parsed summary.json cannot be a run summary (wrong JSON types included), or None."""
    if not isinstance(s, dict):
        return f"not a run summary (a JSON {type(s).__name__}, not an object)"
    if not isinstance(s.get("status"), str):
        return f"not a run summary (status {s.get('status')!r})"
    if not isinstance(s.get("method"), str):
        return f"not a run summary (method {s.get('method')!r})"
    rank = s.get("rank")
    if not (rank == "full" or (isinstance(rank, (str, int)) and not isinstance(rank, bool)
                               and str(rank).isdigit() and int(rank) > 0)):
        return f"not a run summary (rank {rank!r} is not a positive integer or 'full')"
    for column in SUMMARY_COLUMNS:
        value = s.get(column)
        if column not in _TEXT_COLUMNS and value is not None and (isinstance(value, bool)
                                                                 or not isinstance(value, (int, float))):
            return f"not a run summary ({column} {value!r} is not a number)"
    return None


def metrics_problem(rows) -> str | None:
    """Why parsed metrics.jsonl lines cannot be metrics rows (objects with an integer step; the plotted metrics
    numbers), or None."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            return f"line {i} is a JSON {type(row).__name__}, not an object"
        if isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            return f"line {i}: step {row.get('step')!r} is not an integer"
        bad = [k for k in _CURVE_COLUMNS if row.get(k) is not None and (isinstance(row[k], bool)
                                                                         or not isinstance(row[k], (int, float)))]
        if bad:
            return f"line {i}: {bad[0]} {row[bad[0]]!r} is not a number"
    return None


def load_runs(out: Path, problems: list | None = None) -> pd.DataFrame:
    """One row per readable run summary; unreadable ones are named in `problems` and skipped."""
    rows = []
    for summary in sorted(Path(out).glob("*/summary.json")):
        try:
            s = read_json(summary)
        except (OSError, ValueError) as e:
            if problems is not None:
                problems.append(f"{summary}: unreadable ({type(e).__name__})")
            continue
        if why := summary_problem(s):
            if problems is not None:
                problems.append(f"{summary}: {why}")
            continue
        rows.append({c: s.get(c) for c in SUMMARY_COLUMNS})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _rank_order(rank: str):
    return (1, 0) if str(rank) == "full" else (0, int(rank))


def _cell(values: pd.Series, fmt: str) -> str:
    """`mean [low, high] (n)`: the mean over seeds with its 95% bootstrap interval (bench.stats), or the reason
    there is none."""
    from bench import stats
    values = pd.to_numeric(values, errors="coerce").dropna().astype(float)
    if values.empty:
        return "-"
    iv = stats.interval([values.to_numpy()])
    f = lambda v: fmt.format(v)  # noqa: E731
    if not iv.ok:
        return f"{f(iv.point)} [{iv.note}: no interval] ({iv.n})"
    return f"{f(iv.point)} [{f(iv.low)}, {f(iv.high)}] ({iv.n})"


def trained_sets(ok: pd.DataFrame, ranks: list[str]) -> list[str]:
    """Which tensors each rank's runs trained, so that a comparison is seen to train the same ones for every method
    (several lines for one rank: the methods differ)."""
    lines = ["## Trained tensors", "", "| rank | trained tensors | methods |", "|---|---|---|"]
    for r in ranks:
        runs = ok[ok["rank"].astype(str) == r]
        for trained, group in runs.groupby(runs["trained_set"].fillna("(not recorded)"), sort=True):
            lines.append(f"| {r} | {trained} | {', '.join(dict.fromkeys(group['method']))} |")
    return lines + [""]


def markdown_tables(df: pd.DataFrame) -> str:
    """Method x rank tables of the ok runs; a method with several configurations (df's `variant`, from
    bench.variants) gets one row per configuration."""
    from bench import stats
    from bench.variants import label
    lines = ["# Sweep tables", "",
             f"Rows: method (and its variant where runs of the method differ in a setting); columns: LoRA rank. Cells: "
             f"mean [low, high] (n): the mean over seeds (n = seeds with status ok) and its {stats.CONFIDENCE:.0%} "
             f"percentile bootstrap interval over seeds ({stats.RESAMPLES} resamples, seed {stats.SEED}); with fewer "
             f"than {stats.MIN_RUNS} seeds the cell says so instead. With 3-5 seeds a percentile interval is "
             f"narrower than its nominal coverage. Definitions: README, \"Metrics\".", ""]
    df = df.assign(variant=df["variant"].fillna("") if "variant" in df else "")
    ok = df[df.status == "ok"]
    ranks = sorted({str(r) for r in df["rank"]}, key=_rank_order)
    rows = list(dict.fromkeys(zip(df["method"], df["variant"])))
    from bench.protocol import lr_markdown
    lines += lr_markdown(df, rows, ranks, label)
    for column, title, fmt in TABLES:
        lines += [f"## {title}", "", "| method | " + " | ".join(f"r={r}" for r in ranks) + " |",
                  "|---|" + "---|" * len(ranks)]
        for m, v in rows:
            mine = ok[(ok.method == m) & (ok.variant == v)]
            cells = [_cell(mine[mine["rank"].astype(str) == r][column], fmt) for r in ranks]
            lines.append(f"| {label(m, v)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += trained_sets(ok, ranks)
    base = pd.to_numeric(ok["accuracy_base"], errors="coerce").dropna()
    if not base.empty:
        values = ", ".join(f"{b:.3f}" for b in sorted(set(base.round(6))))
        lines += [f"Base policy accuracy: {values} (the initial policy; one value per eval set and starting "
                  f"weights).", ""]
    bad = df[df.status != "ok"]
    if not bad.empty:
        lines += ["## Runs not ok", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {r.run_id} | {r.status} | {r.error or ''} |" for r in bad.itertuples()]
        lines.append("")
    return "\n".join(lines)


def run_identity(out: Path, df: pd.DataFrame) -> pd.DataFrame:
    """df (load_runs) with config_digest, variant and context from each run's config.json (bench.variants); a run
    whose config.json is missing or unreadable gets config_digest `unknown`."""
    from bench.variants import assign, normalized_spec
    keys, specs = [], {}
    for run_id in df.run_id:
        key = str(Path(out) / str(run_id))
        keys.append(key)
        try:
            specs[key] = normalized_spec(read_json(Path(key) / "config.json"))
        except (OSError, ValueError):
            specs[key] = None
    eval_n = [_eval_n(Path(k)) for k in keys]
    return assign(df.assign(key=keys, eval_n=eval_n), specs).drop(columns=["key"])


def _eval_n(run_dir: Path):
    try:
        n = read_json(run_dir / "summary.json").get("eval_n")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def collect(out: Path, problems: list | None = None) -> pd.DataFrame:
    """(Re)build summary.csv and tables.md from whatever run directories exist; idempotent, atomic writes.
    Unreadable run summaries are skipped (and named in `problems`)."""
    out = Path(out)
    df = load_runs(out, problems)
    if df.empty:
        return df
    from bench.protocol import PROTOCOL_COLUMNS
    from bench.variants import IDENTITY_COLUMNS
    df = run_identity(out, df)
    columns = SUMMARY_COLUMNS + IDENTITY_COLUMNS + PROTOCOL_COLUMNS
    atomic_write_text(out / "summary.csv", df[columns].to_csv(index=False))
    atomic_write_text(out / "tables.md", markdown_tables(df))
    return df
