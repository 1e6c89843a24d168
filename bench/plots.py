"""The report's plots: a table of small functions (name, function, caption). Each function takes the sweep (runs,
curves) and the baseline's name and returns a matplotlib figure, or None where the sweep cannot support the plot
(e.g. one rank). Intervals come from bench.stats; no function names a method.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd

from bench import stats
from bench.tables import rank_order


def _setup():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _ok(sweep) -> pd.DataFrame:
    return sweep.runs[sweep.runs.status == "ok"].copy()


def _palette(labels):
    import seaborn as sns
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))))


def kl_vs_rank(sweep, baseline):
    """kl_ref vs rank, log-log, mean over seeds with the seed-level bootstrap interval as error bars."""
    plt, _ = _setup()
    ok = _ok(sweep)
    lora = ok[(ok["rank"] != "full") & (ok.kl_ref > 0)].copy()
    if lora.empty or lora["rank"].nunique() < 2:
        return None
    lora["rank_n"] = lora["rank"].astype(int)
    colors = _palette(list(dict.fromkeys(lora.label)))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for lab, g in lora.groupby("label", sort=False):
        cells = stats.cell_intervals(g, ["rank_n"], "kl_ref").sort_values("rank_n")
        text = lab
        if len(cells) >= 2:
            slope = np.polyfit(np.log(cells.rank_n.to_numpy(float)), np.log(cells.kl_ref.to_numpy(float)), 1)[0]
            text = f"{lab} (slope {slope:.2f})"
        err = np.array([cells.kl_ref - cells.kl_ref_ci_low, cells.kl_ref_ci_high - cells.kl_ref])
        ax.errorbar(cells.rank_n, cells.kl_ref, yerr=np.nan_to_num(err), marker="o", capsize=3, label=text,
                    color=colors[lab])
    ranks = sorted(lora.rank_n.unique())
    ax.set(xscale="log", yscale="log", xlabel="LoRA rank", ylabel="kl_ref (final)",
           title="KL to the initial policy vs rank (log-log)")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig


def _pareto_front(cells: pd.DataFrame) -> pd.DataFrame:
    """Cells not dominated by another (lower-or-equal KL and higher-or-equal accuracy, one strictly)."""
    front = []
    for i, a in cells.iterrows():
        dominated = any((b.kl_ref <= a.kl_ref and b.accuracy >= a.accuracy and
                         (b.kl_ref < a.kl_ref or b.accuracy > a.accuracy)) for j, b in cells.iterrows() if j != i)
        if not dominated:
            front.append(a)
    return pd.DataFrame(front).sort_values("kl_ref")


def accuracy_vs_kl(sweep, baseline):
    plt, sns = _setup()
    ok = _ok(sweep)
    if ok.empty:
        return None
    cells = ok.groupby(["label", "rank"]).agg(kl_ref=("kl_ref", "mean"), accuracy=("accuracy", "mean"))
    cells = cells.reset_index().dropna().rename(columns={"label": "method"})
    if cells.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sns.scatterplot(data=cells, x="kl_ref", y="accuracy", hue="method", style="rank", s=70, ax=ax,
                    palette=_palette(list(dict.fromkeys(cells.method))))
    front = _pareto_front(cells)
    ax.plot(front.kl_ref, front.accuracy, color="black", lw=1, ls="--", label="Pareto front")
    if (cells.kl_ref > 0).all():
        ax.set_xscale("log")
    ax.set(xlabel="kl_ref (lower is more stable)", ylabel="greedy accuracy",
           title="Accuracy vs KL (means over seeds): the Pareto front")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig


def _curves(sweep) -> pd.DataFrame:
    rows = []
    for run in _ok(sweep).itertuples():
        for r in sweep.curves.get(run.key, []):
            if isinstance(r, dict) and isinstance(r.get("step"), (int, float)) and r["step"] > 0:
                rows.append({"label": run.label, "rank": str(run.rank), "seed": run.seed, "step": r["step"],
                             "kl_step": r.get("kl_step"), "entropy": r.get("entropy"), "reward": r.get("reward")})
    return pd.DataFrame(rows)


def _small_multiples(sweep, metric: str, log: bool, smooth: int = 1):
    """One panel per rank; per method the mean over seeds and a band from the lowest to the highest seed."""
    plt, _ = _setup()
    curves = _curves(sweep)
    if curves.empty:
        return None
    data = curves.dropna(subset=[metric]).copy()
    if data.empty:
        return None
    data[metric] = pd.to_numeric(data[metric], errors="coerce")
    if smooth > 1:  # logged on generation steps only: a rolling mean per run for readability
        data = data.sort_values("step")
        data[metric] = data.groupby(["label", "rank", "seed"])[metric].transform(
            lambda s: s.rolling(smooth, min_periods=1).mean())
    ranks = sorted(data["rank"].unique(), key=rank_order)
    colors = _palette(list(dict.fromkeys(data.label)))
    fig, axes = plt.subplots(1, len(ranks), figsize=(min(4.2 * len(ranks), 15), 3.8), sharey=True, squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        for lab, g in data[data["rank"] == rank].groupby("label", sort=False):
            by_step = g.groupby("step")[metric]
            mean, low, high, n = by_step.mean(), by_step.min(), by_step.max(), by_step.count()
            ax.plot(mean.index, mean.values, lw=1.2, color=colors[lab], label=lab)
            if n.max() >= 2:
                ax.fill_between(mean.index, low.values, high.values, color=colors[lab], alpha=0.18, lw=0)
        if log and (data[metric] > 0).all():
            ax.set_yscale("log")
        ax.set(title=f"rank {rank}", xlabel="optimizer step")
    axes[0][0].set_ylabel(metric)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(f"{metric} over training, per rank (line: mean over seeds; band: lowest to highest seed)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def kl_step_curves(sweep, baseline):
    return _small_multiples(sweep, "kl_step", log=True)


def entropy_curves(sweep, baseline):
    return _small_multiples(sweep, "entropy", log=False)


def reward_curves(sweep, baseline):
    return _small_multiples(sweep, "reward", log=False, smooth=5)


def wall_clock_phases(sweep, baseline):
    plt, sns = _setup()
    ok = _ok(sweep)
    phases = ["time_generation_s", "time_reference_s", "time_policy_s", "time_other_s"]
    if ok.empty or not ok[phases].notna().any().any():
        return None
    t = ok.groupby(["label", "rank"])[phases].mean().reset_index()
    t = t.sort_values(["label", "rank"], key=lambda s: s.map(rank_order) if s.name == "rank" else s)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(t)), 4.5))
    bottom = np.zeros(len(t))
    labels = t.label + " r" + t["rank"].astype(str)
    for phase, color in zip(phases, sns.color_palette("deep", len(phases))):
        values = t[phase].fillna(0).values
        ax.bar(labels, values, bottom=bottom, label=phase.replace("time_", "").replace("_s", ""), color=color)
        bottom += values
    ax.set(ylabel="seconds (mean over seeds)", title="Training wall-clock by phase")
    ax.tick_params(axis="x", rotation=75, labelsize=7)
    ax.legend(fontsize=8)
    return fig


def performance_profile(sweep, baseline):
    """Fraction of runs above each accuracy threshold, per method, with stratified bootstrap bands."""
    plt, _ = _setup()
    ok = _ok(sweep).dropna(subset=["accuracy"])
    if ok.empty or ok.groupby("label").size().max() < 2:
        return None
    lo, hi = ok.accuracy.min(), ok.accuracy.max()
    pad = max(0.01, 0.05 * (hi - lo))
    taus = np.linspace(lo - pad, hi + pad, 41)
    profile = stats.performance_profile(ok, "label", "rank", "accuracy", taus, resamples=2000)
    colors = _palette(list(dict.fromkeys(ok.label)))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for lab, g in profile.groupby("label", sort=False):
        ax.step(g.threshold, g.fraction, where="post", color=colors[lab], lw=1.3, label=f"{lab} (n={g.n.iloc[0]})")
        if g.low.notna().any():
            ax.fill_between(g.threshold, g.low, g.high, step="post", color=colors[lab], alpha=0.15, lw=0)
    ax.set(xlabel="accuracy threshold tau", ylabel="fraction of runs with accuracy > tau", ylim=(-0.02, 1.02),
           title="Performance profile (runs over seeds x ranks)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig


def probability_of_improvement(sweep, baseline):
    """P(a run of the method beats a run of the baseline at the same rank), with stratified bootstrap intervals."""
    plt, _ = _setup()
    ok = _ok(sweep).dropna(subset=["accuracy"])
    base = list(dict.fromkeys(ok[ok.method == baseline].label))
    if len(base) != 1 or ok.label.nunique() < 2:
        return None
    poi = stats.improvement_intervals(ok, "label", "rank", "accuracy", base[0]).dropna(subset=["point"])
    if poi.empty:
        return None
    poi = poi.iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(poi) + 1.5))
    y = np.arange(len(poi))
    has = poi.ci_low.notna().to_numpy()
    ax.hlines(y[has], poi.ci_low[has], poi.ci_high[has], color="tab:blue", lw=5, alpha=0.45,
              label=f"{stats.CONFIDENCE:.0%} stratified bootstrap interval")
    ax.plot(poi.point, y, "o", color="tab:blue", label="point estimate")
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_yticks(y, [f"{lab} (n={n})" for lab, n in zip(poi.label, poi.n)], fontsize=8)
    ax.set(xlim=(-0.02, 1.02), xlabel=f"P(accuracy of method > {base[0]}) at the same rank",
           title=f"Probability of improvement over {base[0]}")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")  # outside: never over an interval
    return fig


PLOTS = [
    ("kl_vs_rank", kl_vs_rank, "KL to the initial policy vs LoRA rank, log-log, per method: mean over seeds with "
                               "its 95% bootstrap interval (no bar: fewer than 3 seeds) and the fitted slope."),
    ("accuracy_vs_kl", accuracy_vs_kl, "Final greedy accuracy vs kl_ref per method x rank (means over seeds); "
                                       "dashed: the Pareto front."),
    ("kl_step_curves", kl_step_curves, "Per-step KL over training, one panel per rank: mean over seeds, band from "
                                       "the lowest to the highest seed (none with one seed)."),
    ("entropy_curves", entropy_curves, "Rollout entropy over training, one panel per rank: mean over seeds and "
                                       "the seeds' range."),
    ("reward_curves", reward_curves, "Training reward (rolling mean of 5 logged values), one panel per rank: mean "
                                     "over seeds and the seeds' range."),
    ("performance_profile", performance_profile, "Performance profile: the fraction of a method's runs (seeds x "
                                                 "ranks) above each accuracy threshold, with 95% stratified bootstrap "
                                                 "bands (rliable's run-score distribution)."),
    ("probability_of_improvement", probability_of_improvement, "Probability that a run of each method reaches a "
                                                               "higher accuracy than a run of the baseline at the "
                                                               "same rank, with 95% stratified bootstrap intervals; "
                                                               "0.5: no difference."),
    ("wall_clock_phases", wall_clock_phases, "Training wall-clock split into generation, reference forward, policy "
                                             "forward+backward and the rest (means over seeds)."),
]


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def render(sweep, baseline: str) -> dict[str, tuple[bytes, str]]:
    """name -> (PNG bytes, caption) for every plot the sweep supports."""
    out = {}
    for name, fn, caption in PLOTS:
        fig = fn(sweep, baseline)
        if fig is not None:
            out[name] = (_png(fig), caption)
    return out
