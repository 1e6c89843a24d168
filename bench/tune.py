"""`bench run --tune`: the learning rate tuned per method x rank (x LoRA scaling) under a declared budget, then the
final runs at the selected rate.

Protocol (stated in every output): for each cell of the sweep (a configuration but its seed and learning rate), one
short trial run per learning rate of a log grid and per trial seed, each trained on the train split less the dev
items and evaluated on the task's dev split, which is disjoint from the eval split (tasks: synth-gsm draws it apart,
gsm8k carves it from train); the selection rule (`RULES`) picks one rate per cell from the trials alone; the final
runs over the requested seeds then train at that rate and are evaluated on the eval split. Tuning every method under
the same budget before comparing them follows Schmidt et al. 2021 ("Descending through a crowded valley") and
MLCommons AlgoPerf (Dahl et al. 2023). Trial seeds default to 1000, apart from the final seeds, so a final run never
repeats the trajectory that selected its rate.

Trials are ordinary runs in `<out>/tuning/` (their run ids carry the learning rate and `_dev`), final runs are the
sweep's runs in `<out>/`: re-running the command resumes both (bench.sweep), and under `--executor slurm` each phase
is a job array (the command submits the trials, and once they are finished, the final runs).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.errors import BenchError
from bench.io import atomic_write_json, atomic_write_text
from bench.results import read_summary
from bench.spec import NOT_IDENTITY, RunSpec, is_number

TUNING_DIR = "tuning"
DEFAULT_POINTS = 5          # default grid: the run's lr x 10^(-1, -1/2, 0, 1/2, 1)
DEFAULT_TRIAL_SEEDS = (1000,)
RULES = {
    "accuracy": "highest mean dev accuracy (strict) over the trial seeds; ties: lower mean kl_ref, then the smaller "
                "lr; a learning rate with a diverged or failed trial is not eligible",
    "reward": "highest mean training reward (last quarter of the trial) over the trial seeds; ties: lower mean "
              "kl_ref, then the smaller lr; a learning rate with a diverged or failed trial is not eligible",
}
TIE_TOLERANCE = 1e-12       # equal scores (means of k/n over the same seeds) up to float summation order


@dataclass(frozen=True)
class TuneConfig:
    grid: tuple                 # learning rates, ascending
    trial_steps: int
    trial_seeds: tuple
    metric: str = "accuracy"    # a key of RULES

    @property
    def trials(self) -> int:
        """The budget: trial runs per cell."""
        return len(self.grid) * len(self.trial_seeds)

    def protocol(self) -> dict:
        """What a final run records as its `tuning` (the same for every cell: it is the protocol, not a result)."""
        return {"param": "lr", "grid": list(self.grid), "trials": self.trials, "trial_steps": self.trial_steps,
                "trial_seeds": list(self.trial_seeds), "split": "dev", "metric": self.metric,
                "rule": RULES[self.metric]}


def _positive(value: str, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise BenchError(f"bad --lr-grid {what}: {value!r} is not a finite number > 0")
    return v


def parse_grid(text, base_lr: float) -> tuple:
    """--lr-grid: unset or `auto` -> base_lr x 10^(k/2), k = -2..2; `A,B,C` -> those values; `LOW:HIGH:N` -> N
    values evenly spaced in log between LOW and HIGH. Ascending, distinct (as written in run ids)."""
    if text is None or str(text).strip().lower() == "auto":
        half = (DEFAULT_POINTS - 1) // 2
        values = [float(f"{base_lr * 10 ** (k / 2):.4g}") for k in range(-half, half + 1)]
    elif ":" in str(text):
        parts = str(text).split(":")
        if len(parts) != 3:
            raise BenchError(f"bad --lr-grid {text!r}: LOW:HIGH:N, a comma list, or auto")
        low, high = _positive(parts[0], "LOW"), _positive(parts[1], "HIGH")
        try:
            n = int(parts[2])
        except ValueError:
            n = 0
        if n < 2 or not low < high:
            raise BenchError(f"bad --lr-grid {text!r}: LOW < HIGH and N >= 2")
        values = [float(f"{math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (n - 1)):.4g}")
                  for i in range(n)]
    else:
        items = [v.strip() for v in str(text).split(",")]
        values = [_positive(v, "value") for v in items]
    values = sorted(values)
    names = [f"{v:g}" for v in values]
    if len(set(names)) != len(names):
        raise BenchError(f"bad --lr-grid {text!r}: two values print alike ({', '.join(names)}); space them further")
    return tuple(values)


def parse_config(options: dict, specs: list[RunSpec]) -> TuneConfig:
    """The tuning options (lr_grid, tune_steps, tune_seeds, tune_metric) of a sweep whose final runs are specs."""
    base = {s.lr for s in specs}
    if len(base) != 1:
        raise BenchError("--tune: the runs have several learning rates; give one --lr (the grid's centre) or --lr-grid")
    grid = parse_grid(options.get("lr_grid"), base.pop())
    steps = options.get("tune_steps")
    try:
        steps = max(s.steps for s in specs) if steps is None else int(steps)
    except (TypeError, ValueError):
        raise BenchError(f"bad --tune-steps {steps!r}: a positive integer") from None
    if steps <= 0:
        raise BenchError(f"bad --tune-steps {steps}: a positive integer")
    seeds = options.get("tune_seeds")
    try:
        seeds = DEFAULT_TRIAL_SEEDS if seeds is None else tuple(int(s) for s in str(seeds).split(","))
    except ValueError:
        raise BenchError(f"bad --tune-seeds {seeds!r}: a comma list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise BenchError(f"bad --tune-seeds {options.get('tune_seeds')!r}: a seed listed twice")
    metric = options.get("tune_metric") or "accuracy"
    if metric not in RULES:
        raise BenchError(f"bad --tune-metric {metric!r}; valid: {', '.join(RULES)}")
    return TuneConfig(grid, steps, tuple(seeds), metric)


# ---- cells, trials and finals ------------------------------------------------------------------------------------

def cell_key(spec: RunSpec) -> str:
    """A cell: every setting of a run but its seed, learning rate and tuning record (and where it runs)."""
    d = {k: v for k, v in spec.to_dict().items() if k not in ("seed", "lr", "tuning", *NOT_IDENTITY)}
    return json.dumps(d, sort_keys=True, default=str)


def cells(specs: list[RunSpec]) -> dict[str, list[RunSpec]]:
    out: dict[str, list[RunSpec]] = {}
    for s in specs:
        out.setdefault(cell_key(s), []).append(s)
    return out


def trial_specs(cell: RunSpec, cfg: TuneConfig) -> list[RunSpec]:
    """The trials of one cell (cell: any of its final specs)."""
    return [replace(cell, lr=lr, seed=seed, steps=cfg.trial_steps, eval_split="dev", tuning={})
            for lr in cfg.grid for seed in cfg.trial_seeds]


def final_specs(cell_specs: list[RunSpec], lr: float, cfg: TuneConfig) -> list[RunSpec]:
    return [replace(s, lr=lr, tuning=cfg.protocol()) for s in cell_specs]


# ---- selection ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    lr: float
    seed: int
    status: str                 # ok | diverged | failed | missing (not run yet, or held by another process)
    accuracy: float = math.nan  # dev accuracy
    kl_ref: float = math.nan
    reward: float = math.nan
    run_id: str = ""


@dataclass
class Selection:
    lr: float | None            # None: no eligible learning rate (or trials missing)
    scores: list                # per lr: {lr, n_ok, n, score, kl_ref, eligible}
    reason: str


def _num(v) -> float:
    return float(v) if is_number(v) else math.nan


def select(trials: list[Trial], metric: str = "accuracy") -> Selection:
    """The rule RULES[metric] over one cell's trials. Pure: a function of the trial table alone."""
    if metric not in RULES:
        raise BenchError(f"bad tuning metric {metric!r}; valid: {', '.join(RULES)}")
    by_lr: dict[float, list[Trial]] = {}
    for t in trials:
        by_lr.setdefault(t.lr, []).append(t)
    scores = []
    for lr in sorted(by_lr):
        ts = by_lr[lr]
        ok = [t for t in ts if t.status == "ok"]
        values = [getattr(t, metric) for t in ok]
        eligible = len(ok) == len(ts) and all(math.isfinite(v) for v in values)
        kls = [t.kl_ref for t in ok]
        scores.append({"lr": lr, "n": len(ts), "n_ok": len(ok), "eligible": eligible,
                       "statuses": sorted({t.status for t in ts}),
                       "score": sum(values) / len(values) if eligible and values else math.nan,
                       "kl_ref": (sum(kls) / len(kls) if kls and all(math.isfinite(k) for k in kls)
                                  else math.inf)})
    missing = [s["lr"] for s in scores if "missing" in s["statuses"]]
    if missing:
        return Selection(None, scores, f"trials not finished at lr {', '.join(f'{v:g}' for v in missing)}")
    eligible = [s for s in scores if s["eligible"]]
    if not eligible:
        return Selection(None, scores, "no learning rate of the grid trained every trial without divergence or "
                                       "failure")
    best = max(s["score"] for s in eligible)
    top = [s for s in eligible if best - s["score"] <= TIE_TOLERANCE]
    reason = f"best mean dev {metric} {best:.4g}"
    if len(top) > 1:
        tied = ", ".join(f"{s['lr']:g}" for s in top)
        least_kl = min(s["kl_ref"] for s in top)
        top = [s for s in top if s["kl_ref"] <= least_kl]
        reason += f" tied at lr {tied}; " + (f"lowest mean kl_ref {least_kl:.3g}" if math.isfinite(least_kl)
                                              else "no kl_ref")
        if len(top) > 1:
            reason += "; still tied: the smaller lr"
    chosen = min(s["lr"] for s in top)
    return Selection(chosen, scores, reason)


def read_trials(specs: list[RunSpec], folder: Path) -> list[Trial]:
    """The trial runs' results from their summary.json (missing: not run or not finished)."""
    out = []
    for s in specs:
        summary, _ = read_summary(folder / s.run_id / "summary.json")  # unreadable or cut: not finished
        status = summary.get("status") if summary is not None else None
        if status not in ("ok", "diverged", "failed"):
            out.append(Trial(s.lr, s.seed, "missing", run_id=s.run_id))
            continue
        out.append(Trial(s.lr, s.seed, status, _num(summary.get("accuracy")), _num(summary.get("kl_ref")),
                         _num(summary.get("reward")), s.run_id))
    return out


def cell_name(spec: RunSpec) -> str:
    from bench.variants import label
    extra = [f"{k}={v}" for k, v in sorted(spec.method_params.items())]
    return label(spec.method, ", ".join(extra)) + f" r={spec.rank}" + (
        f" {spec.lora_scaling}" if spec.rank != "full" else "")


def selection_markdown(rows: list[dict], cfg: TuneConfig) -> str:
    """The trials' table per cell and the selected rates, with the protocol and rule."""
    lrs = list(cfg.grid)
    lines = ["# Learning-rate tuning", "",
             f"Budget per cell (method x rank x LoRA scaling): {cfg.trials} trial runs = {len(lrs)} learning rates "
             f"x {len(cfg.trial_seeds)} trial seed(s) ({', '.join(map(str, cfg.trial_seeds))}) x {cfg.trial_steps} "
             f"steps, each trained on train less dev and evaluated on the dev split (disjoint from eval).",
             f"Selection rule: {RULES[cfg.metric]}.", "",
             f"Cells: mean dev {cfg.metric} / mean kl_ref over the trial seeds (`div`: a diverged or failed trial; "
             f"`-`: not finished). **Bold**: selected.", "",
             "| cell | " + " | ".join(f"lr {v:g}" for v in lrs) + " | selected lr | why |",
             "|---|" + "---|" * len(lrs) + "---|---|"]
    for row in rows:
        by = {s["lr"]: s for s in row["scores"]}
        cells_ = []
        for v in lrs:
            s = by.get(v)
            if s is None or "missing" in s["statuses"]:
                text = "-"
            elif not s["eligible"]:
                text = "div"
            else:
                text = f"{s['score']:.3f} / {s['kl_ref']:.2e}"
            cells_.append(f"**{text}**" if row["lr"] == v else text)
        chosen = f"{row['lr']:g}" if row["lr"] is not None else "none"
        lines.append(f"| {row['cell']} | " + " | ".join(cells_) + f" | {chosen} | {row['reason']} |")
    return "\n".join(lines) + "\n"


# ---- the command -------------------------------------------------------------------------------------------------

def plan(specs: list[RunSpec], cfg: TuneConfig) -> tuple[dict, list[RunSpec]]:
    """cells (key -> final specs of the cell, lr not yet chosen) and every trial spec."""
    grouped = cells(specs)
    trials = [t for group in grouped.values() for t in trial_specs(group[0], cfg)]
    return grouped, trials


def selections(grouped: dict, cfg: TuneConfig, tuning_dir: Path) -> list[dict]:
    rows = []
    for key, group in grouped.items():
        trials = read_trials(trial_specs(group[0], cfg), tuning_dir)
        sel = select(trials, cfg.metric)
        rows.append({"cell": cell_name(group[0]), "key": key, "lr": sel.lr, "reason": sel.reason,
                     "scores": sel.scores, "trials": [t.__dict__ for t in trials]})
    return rows


def write_selection(rows: list[dict], cfg: TuneConfig, tuning_dir: Path) -> None:
    tuning_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(tuning_dir / "selection.json", {"protocol": cfg.protocol(), "cells": [
        {k: v for k, v in r.items() if k != "key"} for r in rows]})
    atomic_write_text(tuning_dir / "selection.md", selection_markdown(rows, cfg))


def cmd_tune(args, options: dict, specs: list[RunSpec], out: Path, submit=None, tracking=None,
             nproc: int | None = None) -> int:
    """bench run --tune: trials, selection, final runs (local), or the same in two SLURM arrays through `submit`
    (bench.cli.submit_to_slurm: bench run's own submission, passed in by the command layer). tracking: the sweep's
    experiment trackers (bench.trackers), for trials and final runs alike; nproc: processes per run
    (bench.distributed)."""
    from bench.preflight import check_existing_runs, parse_jobs
    cfg = parse_config(options, specs)
    grouped, trials = plan(specs, cfg)
    tuning_dir = out / TUNING_DIR
    check_existing_runs(trials, tuning_dir)
    print(f"tuning: {len(grouped)} cell(s) x {cfg.trials} trials ({len(cfg.grid)} lr: "
          f"{', '.join(f'{v:g}' for v in cfg.grid)}; trial seeds {', '.join(map(str, cfg.trial_seeds))}; "
          f"{cfg.trial_steps} steps; dev split) into {tuning_dir}")
    print(f"selection rule: {RULES[cfg.metric]}")
    t0 = time.perf_counter()
    if args.executor == "slurm":
        if not _slurm_phase(args, trials, tuning_dir, submit):
            return 0
    else:
        from bench.sweep import run_sweep
        df = run_sweep(trials, tuning_dir, progress=not args.no_progress, jobs=parse_jobs(args.jobs, trials, nproc),
                       tracking=tracking, nproc=nproc)
        print(f"trials: {len(df)} runs in {tuning_dir} ({time.perf_counter() - t0:.0f} s)")
    rows = selections(grouped, cfg, tuning_dir)
    write_selection(rows, cfg, tuning_dir)
    print(selection_markdown(rows, cfg))
    print(f"selection: {tuning_dir / 'selection.md'}")
    chosen = {r["key"]: r["lr"] for r in rows}
    finals = [f for key, group in grouped.items() if chosen[key] is not None
              for f in final_specs(group, chosen[key], cfg)]
    unselected = [r["cell"] for r in rows if r["lr"] is None]
    if unselected:
        sys.stderr.write(f"bench: {len(unselected)} cell(s) without a selected learning rate, not run: "
                         f"{', '.join(unselected[:5])}{' ...' if len(unselected) > 5 else ''} (see selection.md)\n")
    if not finals:
        return 1
    check_existing_runs(finals, out)
    t1 = time.perf_counter()
    if args.executor == "slurm":
        code = submit(_with(args, resume=True), finals, out)
        return code or (1 if unselected else 0)
    from bench.sweep import run_sweep
    df = run_sweep(finals, out, progress=not args.no_progress, jobs=parse_jobs(args.jobs, finals, nproc),
                   tracking=tracking, nproc=nproc)
    held = df.attrs.get("held", [])
    if not df.empty:
        df = df[~df.run_id.isin(held)]
    counts = df.status.value_counts().to_dict()
    print(f"final runs: {len(df)} in {out} ({time.perf_counter() - t1:.0f} s): "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"tables: {out / 'tables.md'}  summary: {out / 'summary.csv'}")
    return 1 if counts.get("failed") or unselected else 0


def _with(args, **changes):
    import argparse
    return argparse.Namespace(**{**vars(args), **changes})


def _slurm_phase(args, trials: list[RunSpec], tuning_dir: Path, submit) -> bool:
    """Submit the trials not finished (as bench run's arrays do); True when every trial is finished, so that the
    final runs can be selected and submitted now."""
    from bench import slurm

    def finished() -> bool:
        states = {r["run_id"]: r["state"] for r in slurm.sweep_status(tuning_dir)} if tuning_dir.is_dir() else {}
        return all(states.get(t.run_id) in ("ok", "diverged", "failed") for t in trials)
    if finished():
        return True
    submit(_with(args, resume=True), trials, tuning_dir)
    if finished():
        return True
    print(f"tuning trials are pending or running under SLURM; re-run this command when they are finished "
          f"(bench status {tuning_dir}) to select the learning rates and submit the final runs, or add --wait")
    return False
