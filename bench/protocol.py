"""The comparison protocol of each run, for tables, the leaderboard and the report: the learning rate it ran at,
whether that rate was tuned for its method x rank (x scaling) and with what budget (bench.tune), and its LoRA
scaling rule (bench.scaling). Benchmarks of training algorithms tune each method under a declared budget before
comparing (Schmidt et al. 2021, "Descending through a crowded valley"; MLCommons AlgoPerf, Dahl et al. 2023); a
method run at another's learning rate is not compared fairly, and the report says where that is the case.
"""
from __future__ import annotations

import math

import pandas as pd

PROTOCOL_COLUMNS = ["lr", "lora_scaling", "lr_tuned", "tuning_trials"]


def _spec_protocol(spec: dict | None) -> dict:
    if not isinstance(spec, dict):
        return {"lr": math.nan, "lora_scaling": None, "lr_tuned": None, "tuning_trials": math.nan}
    tuning = spec.get("tuning") if isinstance(spec.get("tuning"), dict) else {}
    lr = spec.get("lr", 1e-3)
    rank = spec.get("rank")
    return {"lr": float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else math.nan,
            "lora_scaling": "none (full)" if str(rank) == "full" else str(spec.get("lora_scaling", "rank")),
            "lr_tuned": bool(tuning),
            "tuning_trials": float(tuning["trials"]) if isinstance(tuning.get("trials"), int) else math.nan}


def protocol(keys, specs: dict) -> dict[str, list]:
    """keys (run keys) + specs (key -> normalized spec or None) -> {column: values} for PROTOCOL_COLUMNS and
    tuning_text (the tuning budget in words, '' for a learning rate that was set)."""
    rows = [_spec_protocol(specs.get(k)) for k in keys]
    out = {c: [r[c] for r in rows] for c in PROTOCOL_COLUMNS}
    out["tuning_text"] = [budget_text(s["tuning"]) if isinstance(s, dict) and isinstance(s.get("tuning"), dict)
                          and s["tuning"] else "" for s in (specs.get(k) for k in keys)]
    return out


def budget_text(tuning: dict) -> str:
    """One line: what a tuned learning rate was selected from (bench.tune's protocol record)."""
    grid = tuning.get("grid") or []
    lrs = ", ".join(f"{v:g}" for v in grid)
    return (f"{tuning.get('trials', '?')} trials: lr in {{{lrs}}} x {len(tuning.get('trial_seeds') or [])} seed(s) x "
            f"{tuning.get('trial_steps', '?')} steps on the {tuning.get('split', 'dev')} split; "
            f"selected by {tuning.get('rule', '?')}")


def _lr_cell(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "-"
    lrs = sorted(set(runs.lr.dropna()))
    text = ", ".join(f"{v:.3g}" for v in lrs) or "?"
    tuned = set(runs.lr_tuned.dropna())
    if tuned == {True}:
        trials = sorted(set(runs.tuning_trials.dropna().astype(int)))
        return f"{text} (tuned, {'/'.join(map(str, trials)) or '?'} trials)"
    return f"{text} (set)" if tuned == {False} else f"{text} (mixed)"


def lr_markdown(df: pd.DataFrame, rows: list, ranks: list[str], label) -> list[str]:
    """The learning rate of each table cell, and whether it was tuned (with the number of tuning trials) or set."""
    if "lr" not in df:
        return []
    lines = ["## Learning rate and LoRA scaling per cell", "",
             "Each cell: the learning rate its runs trained at, `tuned` (selected per method x rank x scaling on the "
             "dev split by bench run --tune, with its number of trials) or `set` (one value given for the sweep).", "",
             "| method | LoRA scaling | " + " | ".join(f"r={r}" for r in ranks) + " |",
             "|---|---|" + "---|" * len(ranks)]
    for m, v in rows:
        mine = df[(df.method == m) & (df.variant == v)]
        scalings = ", ".join(sorted({str(s) for s in mine.lora_scaling.dropna()})) or "?"
        cells = [_lr_cell(mine[mine["rank"].astype(str) == r]) for r in ranks]
        lines.append(f"| {label(m, v)} | {scalings} | " + " | ".join(cells) + " |")
    lines.append("")
    budgets = tuning_budgets(df)
    if budgets:
        lines += ["Tuning budget" + ("s" if len(budgets) > 1 else "") + ": " + "; ".join(budgets) + ".", ""]
    warning = untuned_warning(df)
    if warning:
        lines += [f"**Warning**: {warning}", ""]
    return lines


def tuning_budgets(df: pd.DataFrame) -> list[str]:
    """The distinct tuning protocols of the ok runs, one line each (from the tuning_text column)."""
    if "tuning_text" not in df:
        return []
    return sorted({t for t in df.tuning_text.dropna() if t})


def untuned_warning(df: pd.DataFrame) -> str:
    """A warning where methods are compared at a learning rate that was not tuned for each of them ('' if none)."""
    ok = df[df.status == "ok"] if "status" in df else df
    if "lr_tuned" not in ok or ok.method.nunique() < 2:
        return ""
    untuned = ok[ok.lr_tuned != True]  # noqa: E712  (None: config unknown, counted as untuned)
    if untuned.empty:
        return ""
    methods = list(dict.fromkeys(untuned.method))
    lrs = ", ".join(f"{v:.3g}" for v in sorted(set(untuned.lr.dropna()))) or "?"
    every = len(untuned) == len(ok)
    return (f"{'all' if every else 'some'} methods are compared at a learning rate not tuned per method x rank "
            f"({', '.join(methods[:6])}{', ...' if len(methods) > 6 else ''} at lr {lrs}): a difference between "
            f"methods may be one of learning rates (bench run --tune selects one per cell on the dev split).")
