"""Sweeps: the grid of RunSpecs, running it in-process, and collecting run directories into sweep tables."""
from __future__ import annotations

import math
import os
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
                   "trainable_params", "steps_done", "run_seconds", "error"]
TABLES = [("kl_ref", "KL to the initial policy (kl_ref, final, exact, probe set)", "{:.2e}"),
          ("kl_step", "Per-step KL (kl_step, mean over steps)", "{:.2e}"),
          ("entropy", "Entropy on the probe set (final)", "{:.3f}"),
          ("accuracy", "Greedy eval accuracy after training (strict match)", "{:.3f}"),
          ("accuracy_gain", "Accuracy gain over the base policy", "{:+.3f}"),
          ("wall_clock_s", "Training wall-clock, seconds (metrics excluded)", "{:.1f}")]


def grid(methods: list[str], ranks: list, seeds: list[int], method_params: dict | None = None,
         **common) -> list[RunSpec]:
    """method_params: {method: {param: value}} (each method gets only its own)."""
    per = method_params or {}
    return [RunSpec(method=m, rank=r, seed=s, method_params=dict(per.get(m, {})), **common)
            for m in methods for r in ranks for s in seeds]


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise BenchError(f"output directory {out} is not writable: {e.strerror or e}") from None


def run_sweep(specs: list[RunSpec], out: Path, progress: bool = True) -> pd.DataFrame:
    from tqdm.auto import tqdm

    from bench.runner import run_one
    check_writable(out)
    bar = tqdm(specs, desc="runs", position=0, disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.run_id)
        run_one(spec, out / spec.run_id, progress=progress, position=1)
        collect(out)
    return collect(out)


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
        if not isinstance(s, dict) or "status" not in s:
            if problems is not None:
                problems.append(f"{summary}: not a run summary")
            continue
        rows.append({c: s.get(c) for c in SUMMARY_COLUMNS})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _rank_order(rank: str):
    return (1, 0) if str(rank) == "full" else (0, int(rank))


def _cell(values: pd.Series, fmt: str) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return "-"
    if len(values) == 1:
        return fmt.format(values.iloc[0])
    std = values.std(ddof=1)
    return f"{fmt.format(values.mean())} ± {fmt.format(std).lstrip('+')}" if math.isfinite(std) else "-"


def markdown_tables(df: pd.DataFrame) -> str:
    lines = ["# Sweep tables", "", "Rows: method; columns: LoRA rank. Cells: mean ± std over seeds (n = seeds with "
             "status ok). Definitions: README, \"Metrics\".", ""]
    ok = df[df.status == "ok"]
    ranks = sorted({str(r) for r in df["rank"]}, key=_rank_order)
    methods = list(dict.fromkeys(df["method"]))
    for column, title, fmt in TABLES:
        lines += [f"## {title}", "", "| method | " + " | ".join(f"r={r}" for r in ranks) + " |",
                  "|---|" + "---|" * len(ranks)]
        for m in methods:
            cells = [_cell(ok[(ok.method == m) & (ok["rank"].astype(str) == r)][column], fmt) for r in ranks]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    base = ok["accuracy_base"].dropna()
    if not base.empty:
        lines += [f"Base policy accuracy: {base.mean():.3f} (same initial policy for every run).", ""]
    bad = df[df.status != "ok"]
    if not bad.empty:
        lines += ["## Runs not ok", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {r.run_id} | {r.status} | {r.error or ''} |" for r in bad.itertuples()]
        lines.append("")
    return "\n".join(lines)


def collect(out: Path) -> pd.DataFrame:
    """(Re)build summary.csv and tables.md from whatever run directories exist; idempotent, atomic writes."""
    out = Path(out)
    df = load_runs(out)
    if df.empty:
        return df
    atomic_write_text(out / "summary.csv", df.to_csv(index=False))
    atomic_write_text(out / "tables.md", markdown_tables(df))
    return df
