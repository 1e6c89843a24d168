"""`bench report` and `bench leaderboard`: assembles tables with intervals (bench.stats), the claims' verdicts
(bench.claims), plots (bench.plots), one self-contained report.html and a leaderboard CSV. It names no method:
which runs are baselines and what the papers claim is data in bench.claims.

Everything is computed from the run directories (summary.json, metrics.jsonl, config.json, eval_final.jsonl, read
by bench.results.load_sweep); a corrupt or missing file is reported file by file and skipped, and the rest is
reported. Runs group by configuration (bench.variants): runs that differ in any setting but the seed never share a
row or a cell.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import markdown
import numpy as np
import pandas as pd

from bench import claims as claims_registry
from bench import stats
from bench.io import atomic_write_bytes, atomic_write_text
from bench.plots import render
from bench.protocol import untuned_warning
from bench.results import CI_METRICS, ITEMS_FILE, LEADERBOARD_COLUMNS, Sweep, load_sweep, summary_table
from bench.tables import markdown_tables, rank_order

__all__ = ["LEADERBOARD_COLUMNS", "Sweep", "leaderboard", "load_sweep", "write_report"]  # load_sweep: bench.results


# ---- leaderboard -----------------------------------------------------------------------------------------------

def leaderboard(sweep: Sweep) -> pd.DataFrame:
    """One row per configuration (method x rank x variant) over seeds (ok runs), each metric's mean with its seed-level
    bootstrap interval (`<metric>_ci_low/high`, empty where n < stats.MIN_RUNS); failed/diverged runs are counted in
    n_failed."""
    df = sweep.runs
    out = []
    for digest, g in df.groupby("config_digest", sort=False):
        ok = g[g.status == "ok"]
        first = g.iloc[0]
        row = {"method": first.method, "rank": first["rank"], "variant": first.variant, "config_digest": digest,
               "n_seeds": len(ok), "n_failed": int((g.status != "ok").sum()),
               "accuracy_mean": ok.accuracy.mean(), "accuracy_std": ok.accuracy.std(ddof=1),
               "accuracy_gain": ok.accuracy_gain.mean(), "kl_ref_mean": ok.kl_ref.mean(),
               "kl_step_mean": ok.kl_step.mean(), "entropy_final": ok.entropy.mean(),
               "wall_clock_s": ok.wall_clock_s.mean(), "trainable_params": ok.trainable_params.max(),
               "peak_mem_mb": ok.peak_mem_mb.mean(), "sweeps": ";".join(sorted(set(g.sweep))),
               "context": first.context, "lora_scaling": first.lora_scaling, "lr": first.lr,
               "lr_tuned": first.lr_tuned, "tuning_trials": first.tuning_trials, "tuning_budget": first.tuning_text}
        for name, column in CI_METRICS:
            iv = stats.interval([ok[column].to_numpy(float)])
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = iv.low, iv.high
        out.append(row)
    board = pd.DataFrame(out, columns=[*LEADERBOARD_COLUMNS, "context"])
    ref = board[board.method == claims_registry.TIME_BASELINE]
    ref = ref[~ref.duplicated(["rank", "context"], keep=False)].set_index(["rank", "context"]).wall_clock_s
    board["time_vs_kl_grpo"] = [row.wall_clock_s / ref[(row.rank, row.context)] if (row.rank, row.context) in ref.index
                                else math.nan for row in board.itertuples()]
    board = board.sort_values(["accuracy_mean", "kl_ref_mean"], ascending=[False, True], na_position="last")
    return board.reset_index(drop=True)[LEADERBOARD_COLUMNS]


# ---- tables beyond the method x rank ones -----------------------------------------------------------------------

def _fmt_iv(point, low, high, n, note, fmt="{:.3f}") -> str:
    if not math.isfinite(point):
        return f"- ({note})" if note else "-"
    if math.isfinite(low) and math.isfinite(high):
        return f"{fmt.format(point)} [{fmt.format(low)}, {fmt.format(high)}] ({n})"
    return f"{fmt.format(point)} [{note}: no interval] ({n})"


def aggregates_markdown(sweep: Sweep, baseline: str) -> str:
    """IQM across seeds x ranks per method (stratified bootstrap over seeds within ranks), and the probability of
    improvement over the baseline, with intervals."""
    ok = sweep.runs[sweep.runs.status == "ok"]
    if ok.empty:
        return ""
    lines = ["## Across ranks: IQM and probability of improvement", "",
             f"IQM: interquartile mean of a method's runs over seeds x ranks; P(improve): probability that a run of "
             f"the method beats a run of **{baseline}** at the same rank (rliable, Agarwal et al. 2021). Intervals: "
             f"{stats.CONFIDENCE:.0%} stratified bootstrap over seeds within ranks ({stats.RESAMPLES} resamples, "
             f"seed {stats.SEED}); (n) counts runs.", "",
             "| method | accuracy IQM | accuracy gain IQM | P(improve accuracy) | P(lower kl_ref) |",
             "|---|---|---|---|---|"]
    acc = stats.aggregate_intervals(ok, "label", "rank", "accuracy").set_index("label")
    gain = stats.aggregate_intervals(ok, "label", "rank", "accuracy_gain").set_index("label")
    base_labels = list(dict.fromkeys(ok[ok.method == baseline].label))
    poi = poi_kl = None
    note = ""
    if len(base_labels) == 1:
        poi = stats.improvement_intervals(ok, "label", "rank", "accuracy", base_labels[0]).set_index("label")
        neg = ok.assign(neg_kl=-ok.kl_ref)  # lower KL is the improvement
        poi_kl = stats.improvement_intervals(neg, "label", "rank", "neg_kl", base_labels[0]).set_index("label")
    else:
        note = ("not in this sweep" if not base_labels else f"{baseline} has several configurations here")
    for lab in dict.fromkeys(ok.label):
        cells = [_fmt_iv(*acc.loc[lab, ["point", "ci_low", "ci_high", "n", "note"]]),
                 _fmt_iv(*gain.loc[lab, ["point", "ci_low", "ci_high", "n", "note"]], fmt="{:+.3f}")]
        for table in (poi, poi_kl):
            if table is None:
                cells.append(f"- ({note})")
            elif lab in table.index:
                cells.append(_fmt_iv(*table.loc[lab, ["point", "ci_low", "ci_high", "n", "note"]], fmt="{:.2f}"))
            else:
                cells.append("(baseline)")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_items_markdown(sweep: Sweep, baseline: str) -> str:
    """Accuracy difference to the baseline at each rank on the eval items both evaluated, with a paired bootstrap
    over items: eval noise only (a one-seed sweep gets an interval too), not seed-to-seed variation."""
    ok = sweep.runs[sweep.runs.status == "ok"]
    head = ["## Accuracy vs the baseline on shared eval items (eval noise only)", ""]
    missing = [k for k in ok.key if k not in sweep.items]
    if ok.empty or len(missing) == len(ok):
        return "\n".join(head + [f"Paired statistics skipped: no run has per-item eval records ({ITEMS_FILE}; "
                                 f"sweeps from before they were written lack them).", ""])
    base = ok[ok.method == baseline]
    if base.empty or base.label.nunique() != 1:
        why = "is not in this sweep" if base.empty else "has several configurations here"
        return "\n".join(head + [f"Paired statistics skipped: the baseline {baseline} {why}.", ""])
    lines = head + [f"Difference in strict accuracy, method - **{baseline}**, averaged over each side's seeds, on the "
                    f"items both evaluated; interval: {stats.CONFIDENCE:.0%} paired bootstrap over eval items "
                    f"({stats.RESAMPLES} resamples, seed {stats.SEED}). It measures eval noise only, apart from the "
                    f"seed-level intervals above; (n) counts items.", ""]
    if missing:
        lines += [f"{len(missing)} of {len(ok)} ok runs have no readable {ITEMS_FILE} and are left out here.", ""]
    ranks = sorted({str(r) for r in ok["rank"]}, key=rank_order)
    lines += ["| method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
    for lab in dict.fromkeys(ok[ok.method != baseline].label):
        cells = []
        for r in ranks:
            a = [sweep.items[k] for k in ok[(ok.label == lab) & (ok["rank"].astype(str) == r)].key if k in sweep.items]
            b = [sweep.items[k] for k in base[base["rank"].astype(str) == r].key if k in sweep.items]
            if not a or not b:
                cells.append("-")
                continue
            ids = sorted(set.intersection(*[set(s.index) for s in a + b]))
            iv = stats.paired_item_difference(np.array([s[ids].to_numpy() for s in a]),
                                              np.array([s[ids].to_numpy() for s in b]))
            cells.append(_fmt_iv(100 * iv.point, 100 * iv.low, 100 * iv.high, iv.n, iv.note, "{:+.1f}") + " pts")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- report ----------------------------------------------------------------------------------------------------

def _md_to_html(md: str) -> str:
    """Our markdown (headings, paragraphs, pipe tables, **bold**) as HTML, through Python-Markdown and its `tables`
    extension (https://python-markdown.github.io/extensions/tables/). The text is HTML-escaped first (cells hold
    text such as `<run_id>`, never markup); `# ` titles are dropped (the page has its own); a table gets the blank
    line before it that the extension needs."""
    lines, previous = [], ""
    for line in md.splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("|") and previous.strip() and not previous.startswith("|"):
            lines.append("")
        lines.append(line)
        previous = line
    return markdown.markdown(html.escape("\n".join(lines), quote=False), extensions=["tables"])


def report_html(title: str, tables_md: str, claims_md: str, images: dict[str, tuple[bytes, str]], config: dict,
                problems: list[str]) -> str:
    """images: name -> (PNG bytes, caption)."""
    figs = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, (png, caption) in images.items())
    skipped = ("<h2>Skipped files</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>"
               if problems else "")
    # a tiny self-check the browser test reads: every image decoded and every table present
    check = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
             " const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
             " document.body.setAttribute('data-images', ok + '/' + imgs.length);"
             " document.body.setAttribute('data-tables', document.querySelectorAll('table').length); });</script>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}th,td{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
th{{background:#f3f3f3}}figure{{margin:1em 0}}img{{max-width:100%}}figcaption{{font-size:13px;color:#555}}
pre{{background:#f7f7f7;padding:1em;font-size:12px;overflow-x:auto}}</style>{check}</head>
<body><h1>{html.escape(title)}</h1>
{_md_to_html(claims_md)}
<h2>Plots</h2>
{figs}
{_md_to_html(tables_md)}
{skipped}
<h2>Run configuration</h2>
<pre>{html.escape(json.dumps(config, indent=1, sort_keys=True, default=str))}</pre>
</body></html>
"""


def common_config(sweep: Sweep) -> dict:
    """Settings shared by every run of the sweep, plus what varies, versions and git shas."""
    specs = [c.get("spec", {}) for c in sweep.configs.values()]
    shared, varying = {}, {}
    if specs:
        for key in specs[0]:
            values = {json.dumps(s.get(key), sort_keys=True) for s in specs}
            if len(values) == 1:
                shared[key] = specs[0][key]
            else:
                varying[key] = sorted(values)
    return {"shared_settings": shared, "varying": varying,
            "versions": sorted({json.dumps(c.get("versions"), sort_keys=True) for c in sweep.configs.values()}),
            "git_sha": sorted({str(c.get("git_sha")) for c in sweep.configs.values()}),
            "sweeps": sorted(set(sweep.runs.sweep))}


def write_report(sweep_dir: Path, baseline: str | None = None, margin: float | None = None) -> tuple[Sweep, dict]:
    """tables.md, summary.csv, plots/*.png, claims.md and report.html in sweep_dir (the runs are read once).
    baseline: the method others are compared with (default claims.IMPROVEMENT_BASELINE); margin: the equivalence
    margin of the claims, in accuracy units (default claims.DEFAULT_MARGIN)."""
    sweep_dir = Path(sweep_dir)
    baseline = baseline or claims_registry.IMPROVEMENT_BASELINE
    sweep = load_sweep(sweep_dir)
    if sweep.runs.empty:
        return sweep, {}
    atomic_write_text(sweep_dir / "summary.csv", summary_table(sweep.runs).to_csv(index=False))  # as collect
    tables_md = "\n".join([markdown_tables(sweep.runs), aggregates_markdown(sweep, baseline),
                           paired_items_markdown(sweep, baseline)])
    claims = claims_registry.check_claims(sweep.runs, margin=margin)
    claims_md = claims_registry.claims_markdown(claims)
    warning = untuned_warning(sweep.runs)
    if warning:
        claims_md += f"\n**Warning**: {warning}\n"
    images = render(sweep, baseline)
    for name, (png, _) in images.items():
        atomic_write_bytes(sweep_dir / "plots" / f"{name}.png", png)
    atomic_write_text(sweep_dir / "tables.md", tables_md + "\n" + claims_md)
    atomic_write_text(sweep_dir / "claims.md", claims_md)
    atomic_write_text(sweep_dir / "report.html", report_html(f"GRPO stabilizer sweep: {sweep_dir.name}", tables_md,
                                                             claims_md, images, common_config(sweep),
                                                             sweep.problems))
    return sweep, {"plots": sorted(images), "claims": claims, "warning": warning}
