"""`bench report` and `bench leaderboard`: tables, seaborn plots, one self-contained report.html, a leaderboard CSV,
and a check of the papers' qualitative claims against a sweep, with honest verdicts.

Everything is computed from the run directories (summary.json, metrics.jsonl, config.json); a corrupt or missing
file is reported file by file and skipped, and the rest is reported.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.io import atomic_write_bytes, atomic_write_text
from bench.spec import stored_key
from bench.sweep import SUMMARY_COLUMNS, _rank_order, markdown_tables, metrics_problem, summary_problem

# leaderboard CSV columns (stable; documented in README)
LEADERBOARD_COLUMNS = ["method", "rank", "n_seeds", "n_failed", "accuracy_mean", "accuracy_std", "accuracy_gain",
                       "kl_ref_mean", "kl_step_mean", "entropy_final", "wall_clock_s", "time_vs_kl_grpo",
                       "trainable_params", "peak_mem_mb", "sweeps"]


@dataclass
class Sweep:
    runs: pd.DataFrame                                   # one row per run with a readable summary.json
    curves: dict = field(default_factory=dict)           # run_id -> list of metrics.jsonl rows
    configs: dict = field(default_factory=dict)          # run_id -> config.json
    problems: list = field(default_factory=list)         # "FILE: what is wrong" (skipped)
    notes: list = field(default_factory=list)            # e.g. duplicate runs of merged sweeps, counted once


def _read_json(path: Path, problems: list):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None


def load_sweep(*dirs: Path) -> Sweep:
    rows, curves, configs, problems, notes, seen = [], {}, {}, [], [], {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            problems.append(f"{d}: no such sweep directory")
            continue
        run_dirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not any((p / "summary.json").exists() or (p / "config.json").exists() for p in run_dirs):
            problems.append(f"{d}: no run directories")
        for run in run_dirs:
            if not (run / "summary.json").exists():
                if (run / "config.json").exists():
                    problems.append(f"{run / 'summary.json'}: missing (run not finished)")
                continue
            s = _read_json(run / "summary.json", problems)
            if s is None:
                continue
            if why := summary_problem(s):
                problems.append(f"{run / 'summary.json'}: {why}")
                continue
            row = {c: s.get(c) for c in SUMMARY_COLUMNS}
            row["rank"] = str(row["rank"])
            row["eval_n"] = s.get("eval_n")
            row["sweep"] = str(d)
            row["key"] = f"{d}/{run.name}"
            config = _read_json(run / "config.json", problems) if (run / "config.json").exists() else None
            if config is not None and not (isinstance(config, dict) and isinstance(config.get("spec"), dict)):
                problems.append(f"{run / 'config.json'}: not a run configuration (no \"spec\" object)")
                config = None
            spec_key = stored_key(config) if isinstance(config, dict) else None
            if spec_key and spec_key in seen:  # the same run configuration in two merged sweeps: count it once
                notes.append(f"{run}: same configuration as {seen[spec_key]}; counted once")
                continue
            if spec_key:
                seen[spec_key] = run
            rows.append(row)
            if config is not None:
                configs[row["key"]] = config
            if (run / "metrics.jsonl").exists():
                try:
                    curve = [json.loads(line) for line in
                             (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
                except ValueError as e:
                    problems.append(f"{run / 'metrics.jsonl'}: unreadable ({str(e)[:120]})")
                    continue
                if why := metrics_problem(curve):
                    problems.append(f"{run / 'metrics.jsonl'}: {why}")
                    continue
                curves[row["key"]] = curve
    runs = pd.DataFrame(rows, columns=[*SUMMARY_COLUMNS, "eval_n", "sweep", "key"])
    for c in ("accuracy", "accuracy_base", "accuracy_gain", "kl_ref", "kl_step", "entropy", "entropy_base",
              "wall_clock_s", "trainable_params", "peak_mem_mb", "seed", "time_generation_s", "time_reference_s",
              "time_policy_s", "time_other_s", "reward", "eval_n"):
        runs[c] = pd.to_numeric(runs[c], errors="coerce")
    return Sweep(runs, curves, configs, problems, notes)


# ---- leaderboard -----------------------------------------------------------------------------------------------

def leaderboard(sweep: Sweep) -> pd.DataFrame:
    """One row per method x rank over seeds (ok runs); failed/diverged runs are counted in n_failed."""
    df = sweep.runs
    out = []
    for (method, rank), g in df.groupby(["method", "rank"], sort=False):
        ok = g[g.status == "ok"]
        out.append({
            "method": method, "rank": rank, "n_seeds": len(ok), "n_failed": int((g.status != "ok").sum()),
            "accuracy_mean": ok.accuracy.mean(), "accuracy_std": ok.accuracy.std(ddof=1),
            "accuracy_gain": ok.accuracy_gain.mean(), "kl_ref_mean": ok.kl_ref.mean(),
            "kl_step_mean": ok.kl_step.mean(), "entropy_final": ok.entropy.mean(),
            "wall_clock_s": ok.wall_clock_s.mean(), "trainable_params": ok.trainable_params.max(),
            "peak_mem_mb": ok.peak_mem_mb.mean(), "sweeps": ";".join(sorted(set(g.sweep)))})
    board = pd.DataFrame(out, columns=LEADERBOARD_COLUMNS)
    kl_grpo = board[board.method == "kl_grpo"].set_index("rank").wall_clock_s
    board["time_vs_kl_grpo"] = [row.wall_clock_s / kl_grpo[row.rank] if row.rank in kl_grpo.index else math.nan
                                for row in board.itertuples()]
    board = board.sort_values(["accuracy_mean", "kl_ref_mean"], ascending=[False, True], na_position="last")
    return board.reset_index(drop=True)[LEADERBOARD_COLUMNS]


# ---- claims ----------------------------------------------------------------------------------------------------

def sign_test_p(successes: int, n: int) -> float:
    """One-sided exact sign test: P(X >= successes), X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, k) for k in range(successes, n + 1)) / 2 ** n if n else 1.0


def spearman_permutation(x: list, y: list) -> tuple[float, float]:
    """Spearman's rho and its exact one-sided permutation p-value (P(rho' >= rho) over all orderings of y);
    for n > 8, 20000 seeded random permutations."""
    import random

    def rho(a, b):
        ra, rb = pd.Series(a).rank(), pd.Series(b).rank()
        return float(ra.corr(rb)) if ra.std() > 0 and rb.std() > 0 else math.nan
    r = rho(x, y)
    if math.isnan(r):
        return r, 1.0
    n = len(y)
    if n <= 8:
        from itertools import permutations
        perms = list(permutations(y))
    else:
        rng = random.Random(0)
        perms = [rng.sample(list(y), n) for _ in range(20000)]
    hits = sum(1 for p in perms if rho(x, p) >= r - 1e-12)
    return r, hits / len(perms)


@dataclass
class Claim:
    claim: str
    source: str
    verdict: str
    statistic: str
    n: int


def _verdict(direction_ok: bool, p: float, n: int, alpha: float = 0.05) -> str:
    if n == 0:
        return "inconclusive"
    if direction_ok and p < alpha:
        return "supported"
    if not direction_ok and p < alpha:
        return "not supported"
    return "inconclusive"


def _pairs(ok: pd.DataFrame, a: str, b: str, column: str) -> list[tuple]:
    """(value_a, value_b) over (rank, seed, sweep) cells where both methods have an ok run."""
    ia = ok[ok.method == a].set_index(["rank", "seed", "sweep"])[column]
    ib = ok[ok.method == b].set_index(["rank", "seed", "sweep"])[column]
    common = ia.index.intersection(ib.index)
    return [(float(ia[k]), float(ib[k])) for k in common if pd.notna(ia[k]) and pd.notna(ib[k])]


def check_claims(sweep: Sweep) -> list[Claim]:
    ok = sweep.runs[sweep.runs.status == "ok"]
    claims = []
    # 1. Rottman et al.: policy divergence (KL to the initial policy) grows with LoRA rank, here for kl_free_lora
    free = ok[(ok.method == "kl_free_lora") & (ok["rank"] != "full")].dropna(subset=["kl_ref"])
    if len(free) >= 3 and free["rank"].nunique() >= 2:
        r, p = spearman_permutation([int(x) for x in free["rank"]], list(free.kl_ref))
        claims.append(Claim("KL to the initial policy grows with LoRA rank (kl_free_lora)", "Rottman et al. 2026",
                            _verdict(r > 0, p, len(free)), f"Spearman rho = {r:+.2f}, one-sided permutation "
                            f"p = {p:.3f}", len(free)))
    else:
        claims.append(Claim("KL to the initial policy grows with LoRA rank (kl_free_lora)", "Rottman et al. 2026",
                            "inconclusive", "needs kl_free_lora at >= 2 ranks", len(free)))
    # 2. Rottman et al.: KL-free LoRA is faster than KL-penalized at equal accuracy (within noise)
    times = _pairs(ok, "kl_free_lora", "kl_grpo", "wall_clock_s")
    accs = _pairs(ok, "kl_free_lora", "kl_grpo", "accuracy")
    if times:
        faster = sum(a < b for a, b in times)
        p = sign_test_p(faster, len(times))
        ratio = sum(a / b for a, b in times) / len(times)
        mean_diff = sum(a - b for a, b in accs) / len(accs) if accs else math.nan
        pooled = sum((a + b) / 2 for a, b in accs) / len(accs) if accs else math.nan
        n_items = _eval_items(sweep)
        noise = 2 * math.sqrt(2 * pooled * (1 - pooled) / n_items / max(1, len(accs))) if n_items else math.nan
        equal_acc = abs(mean_diff) <= noise if math.isfinite(noise) else False
        verdict = _verdict(faster > len(times) / 2, p, len(times))
        if verdict == "supported" and not equal_acc:
            verdict = "not supported"
        claims.append(Claim("KL-free LoRA trains faster than KL-penalized LoRA at equal accuracy within noise",
                            "Rottman et al. 2026", verdict,
                            f"faster in {faster}/{len(times)} pairs (sign test p = {p:.3f}), mean time ratio "
                            f"{ratio:.2f}; accuracy difference {mean_diff:+.3f} vs noise +-{noise:.3f} "
                            f"(2 binomial SE, {n_items} eval items)", len(times)))
    else:
        claims.append(Claim("KL-free LoRA trains faster than KL-penalized LoRA at equal accuracy within noise",
                            "Rottman et al. 2026", "inconclusive", "needs kl_free_lora and kl_grpo runs", 0))
    # 3. PROMA: per-step KL below GRPO's (kl_grpo) without entropy collapse
    kls = _pairs(ok, "proma", "kl_grpo", "kl_step")
    proma = ok[ok.method == "proma"].dropna(subset=["entropy", "entropy_base"])
    if kls:
        lower = sum(a < b for a, b in kls)
        p = sign_test_p(lower, len(kls))
        collapsed = int((proma.entropy < 0.5 * proma.entropy_base).sum())
        verdict = _verdict(lower > len(kls) / 2, p, len(kls))
        if collapsed:
            verdict = "not supported"
        claims.append(Claim("PROMA keeps per-step KL below GRPO's without entropy collapse", "Abrahamsen 2026",
                            verdict, f"kl_step lower in {lower}/{len(kls)} pairs (sign test p = {p:.3f}), "
                            f"median ratio {_median_ratio(kls):.2f}; entropy collapse (final < half of initial) in "
                            f"{collapsed}/{len(proma)} proma runs", len(kls)))
    else:
        claims.append(Claim("PROMA keeps per-step KL below GRPO's without entropy collapse", "Abrahamsen 2026",
                            "inconclusive", "needs proma and kl_grpo runs", 0))
    # 4. GeoRA: accuracy at least that of PiSSA, MiLoRA and LoRA
    parts, verdicts, total = [], [], 0
    for other in ("pissa", "milora", "kl_free_lora"):
        pairs = _pairs(ok, "geora", other, "accuracy")
        if not pairs:
            continue
        worse = sum(a < b for a, b in pairs)
        p_worse = sign_test_p(worse, len(pairs))
        diff = sum(a - b for a, b in pairs) / len(pairs)
        parts.append(f"vs {other}: mean diff {diff:+.3f}, geora lower in {worse}/{len(pairs)} "
                     f"(sign test p = {p_worse:.3f})")
        verdicts.append("not supported" if p_worse < 0.05 else ("supported" if worse == 0 and len(pairs) >= 5
                                                                  else "inconclusive"))
        total += len(pairs)
    if parts:
        verdict = "not supported" if "not supported" in verdicts else (
            "supported" if all(v == "supported" for v in verdicts) else "inconclusive")
        claims.append(Claim("GeoRA's accuracy is at least that of PiSSA, MiLoRA and LoRA", "Zhang et al. 2026",
                            verdict, "; ".join(parts), total))
    else:
        claims.append(Claim("GeoRA's accuracy is at least that of PiSSA, MiLoRA and LoRA", "Zhang et al. 2026",
                            "inconclusive", "needs geora and pissa/milora/kl_free_lora runs", 0))
    return claims


def _median_ratio(pairs) -> float:
    ratios = sorted(a / b for a, b in pairs if b)
    return ratios[len(ratios) // 2] if ratios else math.nan


def _eval_items(sweep: Sweep) -> int:
    """Eval items per run (summary.json's eval_n, read with the runs)."""
    n = sweep.runs["eval_n"].max()
    return int(n) if pd.notna(n) else 0


def claims_markdown(claims: list[Claim]) -> str:
    lines = ["## Claims of the papers, checked on this sweep", "",
             "Verdicts: supported / not supported at one-sided p < 0.05 with the statistic shown, else inconclusive "
             "(with few seeds and ranks most claims cannot reach significance; that is the honest answer).", "",
             "| claim | source | verdict | statistic | n |", "|---|---|---|---|---|"]
    lines += [f"| {c.claim} | {c.source} | **{c.verdict}** | {c.statistic} | {c.n} |" for c in claims]
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def plots(sweep: Sweep) -> dict[str, bytes]:
    """name -> PNG bytes. Plots that the sweep cannot support (e.g. one rank) are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    ok = sweep.runs[sweep.runs.status == "ok"].copy()
    out = {}
    lora = ok[(ok["rank"] != "full") & (ok.kl_ref > 0)].copy()
    if not lora.empty and lora["rank"].nunique() >= 2:
        lora["rank_n"] = lora["rank"].astype(int)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, g in lora.groupby("method"):
            mean = g.groupby("rank_n").kl_ref.mean()
            label = method
            if len(mean) >= 2:
                slope = np.polyfit(np.log(mean.index.values), np.log(mean.values), 1)[0]
                label = f"{method} (slope {slope:.2f})"
            ax.plot(mean.index, mean.values, marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="LoRA rank", ylabel="kl_ref (final)",
               title="KL to the initial policy vs rank (log-log; slope of the fitted line)")
        ranks = sorted(lora.rank_n.unique())
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        out["kl_vs_rank"] = _png(fig)
    if not ok.empty:
        cells = ok.groupby(["method", "rank"]).agg(kl_ref=("kl_ref", "mean"), accuracy=("accuracy", "mean"))
        cells = cells.reset_index().dropna()
        if not cells.empty:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            sns.scatterplot(data=cells, x="kl_ref", y="accuracy", hue="method", style="rank", s=70, ax=ax)
            front = _pareto_front(cells)
            ax.plot(front.kl_ref, front.accuracy, color="black", lw=1, ls="--", label="Pareto front")
            if (cells.kl_ref > 0).all():
                ax.set_xscale("log")
            ax.set(xlabel="kl_ref (lower is more stable)", ylabel="greedy accuracy",
                   title="Accuracy vs KL: the Pareto front (higher accuracy, lower KL)")
            ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
            out["accuracy_vs_kl"] = _png(fig)
    curve_rows = []
    for row in ok.itertuples():
        for r in sweep.curves.get(row.key, []):
            if r.get("step", 0) > 0:
                curve_rows.append({"method": row.method, "rank": row.rank, "step": r["step"],
                                   "kl_step": r.get("kl_step"), "entropy": r.get("entropy"),
                                   "reward": r.get("reward")})
    if curve_rows:
        curves = pd.DataFrame(curve_rows)
        curves["run"] = curves.method + " r" + curves["rank"].astype(str)
        for metric, log in (("kl_step", True), ("entropy", False), ("reward", False)):
            data = curves.dropna(subset=[metric])
            if data.empty:
                continue
            if metric == "reward":  # logged on generation steps only; smooth over 5 points for readability
                data = data.sort_values("step")
                data[metric] = data.groupby("run")[metric].transform(lambda s: s.rolling(5, min_periods=1).mean())
            fig, ax = plt.subplots(figsize=(8, 4.5))
            sns.lineplot(data=data, x="step", y=metric, hue="method", style="rank", errorbar=None, ax=ax, lw=1)
            if log and (data[metric] > 0).all():
                ax.set_yscale("log")
            ax.set(title=f"{metric} over optimizer steps (mean over seeds)")
            ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
            out[f"{metric}_curves"] = _png(fig)
    phases = ["time_generation_s", "time_reference_s", "time_policy_s", "time_other_s"]
    if not ok.empty and ok[phases].notna().any().any():
        t = ok.groupby(["method", "rank"])[phases].mean().reset_index()
        t = t.sort_values(["method", "rank"], key=lambda s: s.map(_rank_order) if s.name == "rank" else s)
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(t)), 4.5))
        bottom = np.zeros(len(t))
        labels = t.method + " r" + t["rank"].astype(str)
        for phase, color in zip(phases, sns.color_palette("deep", len(phases))):
            values = t[phase].fillna(0).values
            ax.bar(labels, values, bottom=bottom, label=phase.replace("time_", "").replace("_s", ""), color=color)
            bottom += values
        ax.set(ylabel="seconds (mean over seeds)", title="Training wall-clock by phase")
        ax.tick_params(axis="x", rotation=75, labelsize=7)
        ax.legend(fontsize=8)
        out["wall_clock_phases"] = _png(fig)
    return out


def _pareto_front(cells: pd.DataFrame) -> pd.DataFrame:
    """Cells not dominated by another (lower-or-equal KL and higher-or-equal accuracy, one strictly)."""
    front = []
    for i, a in cells.iterrows():
        dominated = any((b.kl_ref <= a.kl_ref and b.accuracy >= a.accuracy and
                         (b.kl_ref < a.kl_ref or b.accuracy > a.accuracy)) for j, b in cells.iterrows() if j != i)
        if not dominated:
            front.append(a)
    return pd.DataFrame(front).sort_values("kl_ref")


# ---- report ----------------------------------------------------------------------------------------------------

def _md_table_to_html(md: str) -> str:
    """Our markdown (headings, paragraphs, pipe tables, **bold**) as HTML."""
    out, table = [], []

    def flush():
        if table:
            head, *body = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = lambda r: [c.strip() for c in r.strip().strip("|").split("|")]  # noqa: E731
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells(head)) +
                       "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells(r))
                                                        + "</tr>" for r in body) + "</tbody></table>")
            table.clear()
    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _inline(text: str) -> str:
    import re
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


CAPTIONS = {"kl_vs_rank": "KL to the initial policy vs LoRA rank, log-log, per method with the fitted slope.",
            "accuracy_vs_kl": "Final greedy accuracy vs kl_ref per method x rank; dashed: the Pareto front.",
            "kl_step_curves": "Per-step KL (policy before vs after each optimizer step) over training.",
            "entropy_curves": "Rollout entropy over training.",
            "reward_curves": "Training reward over training (rolling mean of 5 logged values).",
            "wall_clock_phases": "Training wall-clock split into generation, reference forward, policy "
                                 "forward+backward and the rest."}


def report_html(title: str, tables_md: str, claims_md: str, images: dict[str, bytes], config: dict,
                problems: list[str]) -> str:
    figs = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>" for name, png in images.items())
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
{_md_table_to_html(claims_md)}
<h2>Plots</h2>
{figs}
{_md_table_to_html(tables_md)}
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


def write_report(sweep_dir: Path) -> tuple[Sweep, dict]:
    """tables.md, summary.csv, plots/*.png, claims.md and report.html in sweep_dir (the runs are read once)."""
    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    if sweep.runs.empty:
        return sweep, {}
    atomic_write_text(sweep_dir / "summary.csv", sweep.runs[SUMMARY_COLUMNS].to_csv(index=False))  # as collect
    tables_md = markdown_tables(sweep.runs)
    claims = check_claims(sweep)
    claims_md = claims_markdown(claims)
    images = plots(sweep)
    for name, png in images.items():
        atomic_write_bytes(sweep_dir / "plots" / f"{name}.png", png)
    atomic_write_text(sweep_dir / "tables.md", tables_md + "\n" + claims_md)
    atomic_write_text(sweep_dir / "claims.md", claims_md)
    atomic_write_text(sweep_dir / "report.html", report_html(f"GRPO stabilizer sweep: {sweep_dir.name}", tables_md,
                                                             claims_md, images, common_config(sweep),
                                                             sweep.problems))
    return sweep, {"plots": sorted(images), "claims": claims}
