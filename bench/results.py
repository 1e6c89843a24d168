"""What a run leaves behind, declared once, and the only reader of run directories.

- RUN_FIELDS: every field of a run's summary.json, with its type and meaning, in summary.csv's column order (the
  fields with `csv=True`; README, "Output files"). The runner, crash recording, `bench collect`, `bench report`,
  `bench leaderboard`, `bench status` and `bench eval` all read them from here. A method may add fields of its own
  (bench.engine's trainer contract: `set_method_summary`); they go to summary.json only.
- LEADERBOARD_COLUMNS: the leaderboard CSV's columns (one row per configuration over seeds).
- read_summary / read_config: one file each, with a one-line reason when it cannot be one.
- load_sweep: run directories of one or more sweeps -> a Sweep (one row per run, its curves, configs and per-item
  eval records); a damaged or missing file is named in `problems` and skipped, and the rest is loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.io import read_json, read_jsonl
from bench.spec import is_number, stored_key
from bench.variants import IDENTITY_COLUMNS, assign, label, normalized_spec

TEXT, NUMBER, FLAG, JSON = "text", "number", "flag", "json"  # JSON: a nested object, summary.json only


@dataclass(frozen=True)
class Field:
    name: str
    kind: str          # TEXT | NUMBER | FLAG | JSON
    help: str
    csv: bool = True   # a summary.csv column (else summary.json only)


RUN_FIELDS: tuple[Field, ...] = (
    # identity and outcome
    Field("run_id", TEXT, "<method>_r<rank>_s<seed> (the run directory's name)"),
    Field("method", TEXT, "method name (a registered method or a + composition)"),
    Field("rank", TEXT, "LoRA rank, or 'full'"),
    Field("seed", NUMBER, "training seed"),
    Field("status", TEXT, "ok | diverged | failed | preempted (held: being run by another process; not written)"),
    # accuracy (greedy eval, bench.generation)
    Field("accuracy_base", NUMBER, "strict accuracy of the initial policy"),
    Field("accuracy", NUMBER, "strict accuracy after training"),
    Field("accuracy_gain", NUMBER, "accuracy - accuracy_base"),
    # KL, entropy and reward (bench.metrics; aggregated over metrics.jsonl)
    Field("kl_ref", NUMBER, "KL(pi || pi_0) at the last probe, exact over the vocabulary"),
    Field("kl_ref_k3", NUMBER, "the k3 estimate of kl_ref on the same samples"),
    Field("kl_step", NUMBER, "mean over steps of the per-step KL(pi_before || pi_after)"),
    Field("kl_step_max", NUMBER, "largest per-step KL"),
    Field("entropy", NUMBER, "entropy on the probe set at the last probe"),
    Field("entropy_base", NUMBER, "entropy on the probe set before training"),
    Field("entropy_rollout", NUMBER, "mean rollout entropy over the last quarter of steps"),
    Field("reward", NUMBER, "mean reward over the last quarter of steps"),
    Field("reward_first", NUMBER, "mean reward over the first quarter of steps"),
    # cost
    Field("wall_clock_s", NUMBER, "training seconds, metrics excluded"),
    Field("time_generation_s", NUMBER, "seconds generating rollouts"),
    Field("time_reference_s", NUMBER, "seconds in reference-policy forwards"),
    Field("time_policy_s", NUMBER, "seconds in policy forwards and backwards"),
    Field("time_other_s", NUMBER, "the rest of the training seconds (optimizer, data, hooks)"),
    Field("time_metrics_s", NUMBER, "seconds measuring metrics (excluded from wall_clock_s)"),
    Field("tokens_per_s", NUMBER, "generated completion tokens per training second"),
    Field("peak_mem_mb", NUMBER, "peak GPU memory allocated, or the process's peak resident set on CPU"),
    Field("trainable_params", NUMBER, "trainable parameters of the policy"),
    Field("trained_set", TEXT, "which tensors were trained (bench.policy.trained_set)"),
    Field("init_kl_to_base", NUMBER, "KL(pi_0 || base) for initializers that rewrite the base weights"),
    Field("steps_done", NUMBER, "optimizer steps recorded in metrics.jsonl"),
    Field("run_seconds", NUMBER, "the run's whole duration, setup and evals included"),
    Field("error", TEXT, "why a run is not ok (first line; traceback in error.log)"),
    Field("frac_truncated", NUMBER, "mean over generation steps of the completions cut at the budget without EOS "
          "(after the older columns: summary.csv files on disk keep their column order)"),
    # summary.json only
    Field("accuracy_base_memoized", FLAG, "the base accuracy came from the eval memo (same weights, same items)",
          csv=False),
    Field("accuracy_flexible_base", NUMBER, "flexible-match accuracy of the initial policy", csv=False),
    Field("accuracy_flexible", NUMBER, "flexible-match accuracy after training", csv=False),
    Field("eval_n", NUMBER, "eval items", csv=False),
    Field("eval_seconds", NUMBER, "seconds in the base and final greedy evals", csv=False),
    Field("eval_base_seconds", NUMBER, "seconds in the base greedy eval (near 0 where memoized)", csv=False),
    Field("init_seconds", NUMBER, "seconds building the policy (adapter initialization)", csv=False),
    Field("setup_seconds", NUMBER, "seconds loading the task, model and trainer", csv=False),
    Field("forward_threads", NUMBER, "torch threads of the run's forward passes (bench.parallel)", csv=False),
    Field("decode_threads", NUMBER, "torch threads of its token-by-token decoding: rollouts, evals, probe sampling "
                                    "(bench.parallel.decode_threads)", csv=False),
    Field("init_kl_to_base_tokens", NUMBER, "token positions behind init_kl_to_base", csv=False),
    Field("device", TEXT, "cpu or cuda", csv=False),
    Field("resumed_from", TEXT, "the checkpoint the run resumed from, if any", csv=False),
    Field("world_size", NUMBER, "data-parallel processes the run trained on (--nproc-per-run; bench.distributed); "
          "not part of the run's identity, like its thread count", csv=False),
    Field("sharding", TEXT, "how a multi-process run held its training state (--sharding: ddp or zero2; "
          "bench.distributed); part of the run's identity unless ddp", csv=False),
    Field("lm_eval", JSON, "lm-eval results (--final-eval lm-eval)", csv=False),
    Field("warnings", JSON, "the run's one-line warnings: truncation, no reward variance (bench.health)", csv=False),
)
FIELDS = {f.name: f for f in RUN_FIELDS}
SUMMARY_COLUMNS = [f.name for f in RUN_FIELDS if f.csv]       # summary.csv, in order (then IDENTITY_COLUMNS)
NUMBER_COLUMNS = [f.name for f in RUN_FIELDS if f.kind == NUMBER]
DONE = ("ok", "diverged")  # finished states; a `failed` run is retried when the sweep is re-run

# leaderboard CSV columns (stable; README): the original ones, then identity and intervals. CI_METRICS: leaderboard
# name -> run field whose seed-level bootstrap interval it carries.
CI_METRICS = [("accuracy", "accuracy"), ("accuracy_gain", "accuracy_gain"), ("kl_ref", "kl_ref"),
              ("kl_step", "kl_step"), ("entropy_final", "entropy"), ("wall_clock_s", "wall_clock_s")]
LEADERBOARD_COLUMNS = ["method", "rank", "n_seeds", "n_failed", "accuracy_mean", "accuracy_std", "accuracy_gain",
                       "kl_ref_mean", "kl_step_mean", "entropy_final", "wall_clock_s", "time_vs_kl_grpo",
                       "trainable_params", "peak_mem_mb", "sweeps", "variant", "config_digest",
                       *[f"{name}_ci_{end}" for name, _ in CI_METRICS for end in ("low", "high")],
                       "lora_scaling", "lr", "lr_tuned", "tuning_trials", "tuning_budget"]  # bench.protocol

# metrics.jsonl: what reports plot must be numbers where present
CURVE_COLUMNS = ("kl_ref", "kl_ref_k3", "kl_step", "entropy", "entropy_probe", "reward")
ITEMS_FILE = "eval_final.jsonl"   # per-item results of the final greedy eval (one JSON object per eval item)


# ---- records ---------------------------------------------------------------------------------------------------

def identity(spec) -> dict:
    """The fields that name a run (every summary.json starts with them)."""
    return {"run_id": spec.run_id, "method": spec.method, "rank": str(spec.rank), "seed": spec.seed}


def outcome(spec, status: str, error: str) -> dict:
    """A run that produced no results: its identity, status and why."""
    return {**identity(spec), "status": status, "error": error}


def undeclared(summary: dict, method_fields: set | frozenset = frozenset()) -> list[str]:
    """Keys of a summary that neither RUN_FIELDS nor the method declares (a test holds the runner to the schema)."""
    return sorted(k for k in summary if k not in FIELDS and k not in method_fields)


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
        if FIELDS[column].kind == NUMBER and value is not None and not is_number(value):
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
        bad = [k for k in CURVE_COLUMNS if row.get(k) is not None and not is_number(row[k])]
        if bad:
            return f"line {i}: {bad[0]} {row[bad[0]]!r} is not a number"
    return None


def _unreadable(e: Exception) -> str:
    return f"unreadable ({type(e).__name__}: truncated or not JSON)"


def _read_checked(path: Path, problem) -> tuple[dict | None, str | None]:
    """(the JSON file, None), or (None, why it cannot be used: unreadable, or `problem`'s answer); (None, None) where
    there is no such file."""
    if not Path(path).is_file():
        return None, None
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        return None, _unreadable(e)
    why = problem(data)
    return (None, why) if why else (data, None)


def _config_problem(config) -> str | None:
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        return "not a run configuration (no \"spec\" object)"
    return None


def read_summary(path: Path) -> tuple[dict | None, str | None]:
    """(summary, None), or (None, why it cannot be one); (None, None) where there is no such file."""
    return _read_checked(path, summary_problem)


def read_config(path: Path) -> tuple[dict | None, str | None]:
    """(config.json, None), or (None, why it cannot be a run's configuration); (None, None) where it is absent."""
    return _read_checked(path, _config_problem)


# ---- the loader ------------------------------------------------------------------------------------------------

@dataclass
class Sweep:
    runs: pd.DataFrame                                   # one row per run with a readable summary.json
    curves: dict = field(default_factory=dict)           # run key -> list of metrics.jsonl rows
    configs: dict = field(default_factory=dict)          # run key -> config.json
    problems: list = field(default_factory=list)         # "FILE: what is wrong" (skipped)
    notes: list = field(default_factory=list)            # e.g. duplicate runs of merged sweeps, counted once
    items: dict = field(default_factory=dict)            # run key -> per-item correctness (pd.Series by item id)


RUN_COLUMNS = [*SUMMARY_COLUMNS, "eval_n", "sweep", "key"]  # load_sweep's table, before identity and label


def load_sweep(*dirs: Path, curves: bool = True, items: bool = True, unfinished: bool = True) -> Sweep:
    """Every run directory of `dirs` (sweeps; a run configuration found in two of them counts once). The table:
    RUN_COLUMNS (numbers as numbers, rank as text; key: the run directory) with config_digest, variant and context
    (bench.variants) and label. curves / items: also read metrics.jsonl / eval_final.jsonl. unfinished: name run
    directories without a summary.json (and sweeps without run directories) in problems; a sweep being run has
    them by design."""
    rows, configs, problems, notes, seen, curve_of = [], {}, [], [], {}, {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            problems.append(f"{d}: no such sweep directory")
            continue
        run_dirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        if unfinished and not any((p / "summary.json").exists() or (p / "config.json").exists() for p in run_dirs):
            problems.append(f"{d}: no run directories")
        for run in run_dirs:
            if not (run / "summary.json").exists():
                if unfinished and (run / "config.json").exists():
                    problems.append(f"{run / 'summary.json'}: missing (run not finished)")
                continue
            s, why = read_summary(run / "summary.json")
            if why:
                problems.append(f"{run / 'summary.json'}: {why}")
                continue
            row = {c: s.get(c) for c in SUMMARY_COLUMNS}
            row.update(rank=str(row["rank"]), eval_n=s.get("eval_n"), sweep=str(d), key=f"{d}/{run.name}")
            config, why = read_config(run / "config.json")
            if why:
                problems.append(f"{run / 'config.json'}: {why}")
            spec_key = stored_key(config) if config is not None else None
            if spec_key and spec_key in seen:  # the same run configuration in two merged sweeps: count it once
                notes.append(f"{run}: same configuration as {seen[spec_key]}; counted once")
                continue
            if spec_key:
                seen[spec_key] = run
            rows.append(row)
            if config is not None:
                configs[row["key"]] = config
            if curves and (run / "metrics.jsonl").exists():
                try:
                    curve = read_jsonl(run / "metrics.jsonl")
                except (OSError, ValueError) as e:
                    problems.append(f"{run / 'metrics.jsonl'}: unreadable ({str(e)[:120]})")
                    continue
                if why := metrics_problem(curve):
                    problems.append(f"{run / 'metrics.jsonl'}: {why}")
                    continue
                curve_of[row["key"]] = curve
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for c in NUMBER_COLUMNS:
        if c in runs:
            runs[c] = pd.to_numeric(runs[c], errors="coerce")
    runs = assign(runs, {k: normalized_spec(configs.get(k)) for k in runs.key})
    runs["label"] = [label(m, v) for m, v in zip(runs.method, runs.variant)]
    sweep = Sweep(runs, curve_of, configs, problems, notes)
    if items:
        sweep.items = load_items(sweep)
    return sweep


def load_items(sweep: Sweep) -> dict:
    """run key -> pd.Series of strict correctness (0/1) indexed by item id, for ok runs whose eval_final.jsonl is
    readable; an unreadable or malformed file is named in sweep.problems, a missing one is not (older sweeps)."""
    out = {}
    for key in sweep.runs[sweep.runs.status == "ok"].key:
        path = Path(key) / ITEMS_FILE
        if not path.is_file():
            continue
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            ids = [r["id"] for r in rows]
            correct = [r["correct_strict"] for r in rows]
            if not all(isinstance(c, bool) for c in correct) or not all(isinstance(i, (str, int)) for i in ids):
                raise ValueError("id must be a string or integer and correct_strict a boolean")
            if len(set(map(str, ids))) != len(ids):
                raise ValueError("duplicate item ids")
        except (OSError, ValueError, TypeError, KeyError) as e:
            sweep.problems.append(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        out[key] = pd.Series([float(c) for c in correct], index=[str(i) for i in ids])
    return out


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: the CSV run fields, then the configuration's identity (bench.variants), then its comparison
    protocol (learning rate, LoRA scaling, tuning: bench.protocol)."""
    from bench.protocol import PROTOCOL_COLUMNS
    return runs[SUMMARY_COLUMNS + IDENTITY_COLUMNS + PROTOCOL_COLUMNS]
