"""Sweep tables: summary.csv and tables.md from a sweep's run directories (`bench collect`, and after every run
of `bench run`), and the method x rank tables with their seed-level intervals that reports reuse."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench import stats
from bench.io import atomic_write_text
from bench.results import load_sweep, summary_table
from bench.variants import label

TABLES = [("kl_ref", "KL to the initial policy (kl_ref, final, exact, probe set)", "{:.2e}"),
          ("kl_step", "Per-step KL (kl_step, mean over steps)", "{:.2e}"),
          ("entropy", "Entropy on the probe set (final)", "{:.3f}"),
          ("frac_truncated", "Completions cut at the budget without EOS (frac_truncated, mean over steps)", "{:.2f}"),
          ("accuracy", "Greedy eval accuracy after training (strict match)", "{:.3f}"),
          ("accuracy_gain", "Accuracy gain over the base policy", "{:+.3f}"),
          ("wall_clock_s", "Training wall-clock, seconds (metrics excluded)", "{:.1f}")]


def rank_order(rank: str):
    return (1, 0) if str(rank) == "full" else (0, int(rank))


def _cell(values: pd.Series, fmt: str) -> str:
    """`mean [low, high] (n)`: the mean over seeds with its 95% bootstrap interval (bench.stats), or the reason
    there is none."""
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
    lines = ["# Sweep tables", "",
             f"Rows: method (and its variant where runs of the method differ in a setting); columns: LoRA rank. Cells: "
             f"mean [low, high] (n): the mean over seeds (n = seeds with status ok) and its {stats.CONFIDENCE:.0%} "
             f"percentile bootstrap interval over seeds ({stats.RESAMPLES} resamples, seed {stats.SEED}); with fewer "
             f"than {stats.MIN_RUNS} seeds the cell says so instead. With 3-5 seeds a percentile interval is "
             f"narrower than its nominal coverage. Definitions: README, \"Metrics\".", ""]
    df = df.assign(variant=df["variant"].fillna("") if "variant" in df else "")
    ok = df[df.status == "ok"]
    ranks = sorted({str(r) for r in df["rank"]}, key=rank_order)
    rows = list(dict.fromkeys(zip(df["method"], df["variant"])))
    from bench.protocol import lr_markdown
    lines += lr_markdown(df, rows, ranks, label)  # the learning rate, its tuning and the LoRA scaling of each cell
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


def collect(out: Path, problems: list | None = None) -> pd.DataFrame:
    """(Re)build summary.csv and tables.md from whatever run directories exist; idempotent, atomic writes.
    Unreadable run summaries are skipped (and named in `problems`)."""
    out = Path(out)
    sweep = load_sweep(out, curves=False, items=False, unfinished=False)
    if problems is not None:
        problems.extend(sweep.problems)
    df = sweep.runs
    if df.empty:
        return df
    atomic_write_text(out / "summary.csv", summary_table(df).to_csv(index=False))
    atomic_write_text(out / "tables.md", markdown_tables(df))
    return df
