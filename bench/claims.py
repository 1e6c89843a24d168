"""The papers' claims as data, and their verdicts on a sweep.

A claim is one record: what is claimed, the source paper and its sentence, and the checks (metric, method,
baseline, direction, statistical test, margin) that must all hold for it. Each check's verdict comes from a test of
both tails at ALPHA: `supported` (significant in the claimed direction), `contradicted` (significant in the opposite
direction, or beyond the margin), else `inconclusive`; a claim whose methods are not in the sweep is `skipped`
with the reason. A claim is supported when every check that ran is supported, contradicted when any is.
"Equal" is an equivalence test (TOST, Schuirmann 1987) with a stated margin, never "not significantly different".
Each check states the smallest effect its data could detect (power POWER at ALPHA) and, when inconclusive, how many
seeds the observed effect would need.

Checks pair runs of two methods by (rank, seed) within one context (every setting but method, its parameters, rank
and seed): n is the number of pairs (or runs). Only runs with status ok enter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from bench import stats

ALPHA = 0.05
DEFAULT_MARGIN = 0.02    # "equal accuracy": within 2 accuracy points (settable: bench report --margin)
COLLAPSE_RATIO = 0.5     # entropy collapse: final probe entropy below half of the initial

# The reference methods the report compares against (data, so that the report names no method).
IMPROVEMENT_BASELINE = "kl_free_lora"   # probability of improvement and paired item differences: clipped GRPO
TIME_BASELINE = "kl_grpo"               # the leaderboard's time_vs_kl_grpo column


@dataclass(frozen=True)
class Check:
    test: str                      # a key of TESTS
    metric: str                    # a run-table column (summary.json)
    method: str
    baseline: str | None = None
    direction: str = ""            # increases | lower | higher | equal | not_lower | no_collapse
    margin: float | None = None    # equivalence / non-inferiority margin (accuracy units)
    log_scale: bool = False        # compare log ratios (times, KLs: multiplicative effects)


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    source: str
    sentence: str                  # what the source says (paraphrased where marked)
    checks: tuple


CLAIMS = [
    Claim("kl_grows_with_rank", "KL to the initial policy grows with LoRA rank (kl_free_lora)",
          "Rottman et al. 2026, MERL TR2026-092",
          "Empirically, policy divergence increases with LoRA rank (abstract, paraphrased).",
          (Check("spearman_trend", "kl_ref", "kl_free_lora", direction="increases"),)),
    Claim("kl_free_faster_equal_accuracy",
          "KL-free LoRA trains faster than KL-penalized LoRA at equal accuracy",
          "Rottman et al. 2026, MERL TR2026-092",
          "KL-free LoRA (beta = 0) keeps evaluation accuracy and trains faster, skipping the reference-policy "
          "forward passes (abstract, paraphrased).",
          (Check("paired_t", "wall_clock_s", "kl_free_lora", "kl_grpo", "lower", log_scale=True),
           Check("tost", "accuracy", "kl_free_lora", "kl_grpo", "equal", margin=DEFAULT_MARGIN))),
    Claim("proma_tighter_step_kl",
          "PROMA keeps per-step KL below clipped and unclipped GRPO's without entropy collapse",
          "Abrahamsen 2026, arXiv 2601.10498",
          "PROMA enforces tighter control of local KL divergence than GRPO and avoids entropy collapse "
          "(abstract v1, paraphrased; baselines: GRPO with PPO clipping and no KL, and unclipped GRPO).",
          (Check("paired_t", "kl_step", "proma", "kl_free_lora", "lower", log_scale=True),
           Check("paired_t", "kl_step", "proma", "unclipped_lora", "lower", log_scale=True),
           Check("entropy_kept", "entropy", "proma", direction="no_collapse"))),
    Claim("geora_at_least_lora",
          "GeoRA's accuracy is at least that of PiSSA, MiLoRA and LoRA",
          "Zhang et al. 2026, ACL, arXiv 2601.09361",
          "GeoRA outperforms the low-rank baselines LoRA, PiSSA and MiLoRA on mathematical reasoning "
          "(results tables as reported by summaries of the paper, paraphrased).",
          tuple(Check("non_inferiority", "accuracy", "geora", b, "not_lower", margin=DEFAULT_MARGIN)
                for b in ("pissa", "milora", "kl_free_lora"))),
    Claim("entropy_methods_keep_entropy",
          "Entropy bonuses keep the final entropy above that of KL-free LoRA",
          "Skywork-OR1 (He et al. 2025, arXiv 2505.22312) and the entropy-bonus literature",
          "An entropy term (adaptive toward a target entropy in Skywork-OR1) counters the entropy collapse of "
          "GRPO training (paraphrased).",
          tuple(Check("paired_t", "entropy", m, "kl_free_lora", "higher") for m in ("entropy_bonus",
                                                                                      "adaptive_entropy"))),
]


@dataclass
class CheckResult:
    check: Check
    verdict: str                   # supported | contradicted | inconclusive | skipped
    statistic: str
    n: int = 0
    detectable: str = ""           # the smallest effect this design could detect
    seeds_needed: int | None = None
    n_ranks: int = 0
    unsized: str = ""              # why seeds_needed is None


@dataclass
class ClaimResult:
    id: str
    claim: str                     # the statement
    source: str
    sentence: str
    verdict: str
    statistic: str
    n: int
    detectable: str = ""
    needs: str = ""                # inconclusive: the seeds the observed effect would need
    context: str = ""
    checks: list = field(default_factory=list)


# ---- data --------------------------------------------------------------------------------------------------------

def _pairs(table: pd.DataFrame, check: Check) -> pd.DataFrame:
    """Rows (rank, seed, a, b) where both methods have an ok run with the metric."""
    cols = ["rank", "seed", check.metric]
    a = table[table.method == check.method][cols].dropna()
    b = table[table.method == check.baseline][cols].dropna()
    return a.merge(b, on=["rank", "seed"], suffixes=("_a", "_b")).rename(
        columns={f"{check.metric}_a": "a", f"{check.metric}_b": "b"})


def _no_pairs(table: pd.DataFrame, check: Check) -> CheckResult:
    return CheckResult(check, "skipped", _missing(table, check) or
                       f"no (rank, seed) run of both {check.method} and {check.baseline}")


def _ambiguous(table: pd.DataFrame, check: Check) -> str:
    """A method with several configurations in one context (e.g. two --method-param values) has two runs per
    (rank, seed): they cannot be paired or pooled, so the check is skipped."""
    for m in (check.method, check.baseline):
        runs = table[table.method == m]
        if m and runs.duplicated(["rank", "seed"]).any():
            return f"{m} has several configurations here; check them in separate sweeps"
    return ""


def _missing(table: pd.DataFrame, check: Check) -> str:
    absent = [m for m in (check.method, check.baseline) if m and m not in set(table.method)]
    return f"needs {' and '.join(absent)} runs" if absent else ""


def _seeds(n_needed, n_ranks) -> int | None:
    return None if n_needed is None or not n_ranks else max(1, math.ceil(n_needed / n_ranks))


def _p(p: float) -> str:
    if p == 0:  # only a t test on differences without any spread gives 0 (t is infinite)
        return "0 (the differences have no spread)"
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


# ---- the tests ---------------------------------------------------------------------------------------------------

def spearman_trend(table: pd.DataFrame, check: Check, alpha: float) -> CheckResult:
    runs = table[(table.method == check.method) & (table["rank"].astype(str) != "full")]
    runs = runs.dropna(subset=[check.metric])
    ranks = runs["rank"].astype(int).to_numpy()
    n_ranks = len(set(ranks))
    if n_ranks < 2:
        return CheckResult(check, "skipped", f"needs {check.method} at >= 2 ranks", len(runs))
    t = stats.spearman_test(ranks, runs[check.metric].to_numpy(float))
    sign = 1 if check.direction == "increases" else -1
    verdict = "inconclusive"
    if t.p < alpha and math.isfinite(t.rho):
        verdict = "supported" if sign * t.rho > 0 else "contradicted"
    how = "exact" if t.exact else f"{t.resamples} sampled permutations, +1-corrected"
    text = f"{check.metric} vs rank: Spearman rho = {t.rho:+.2f}, two-sided permutation p = {_p(t.p)} ({how})"
    if t.min_p >= alpha:
        detectable = f"no trend: the smallest p {t.n} runs can give is {_p(t.min_p)}"
    else:
        mde = stats.spearman_mde(t.n, alpha)
        detectable = f"abs(rho) >= {mde:.2f}" if math.isfinite(mde) else "not estimable"
    need = stats.spearman_n_needed(t.rho, alpha) if math.isfinite(t.rho) else None
    seeds = _seeds(need, n_ranks)
    if seeds is not None:  # and enough seeds per rank that the exact test can reach alpha at all
        while stats.spearman_min_p([seeds] * n_ranks) >= alpha:
            seeds += 1
    return CheckResult(check, verdict, text, t.n, detectable, seeds, n_ranks)


def paired_t(table: pd.DataFrame, check: Check, alpha: float) -> CheckResult:
    pairs = _pairs(table, check)
    if pairs.empty:
        return _no_pairs(table, check)
    n_ranks = pairs["rank"].nunique()
    if check.log_scale:
        pairs = pairs[(pairs.a > 0) & (pairs.b > 0)]
        d = np.log(pairs.a.to_numpy(float) / pairs.b.to_numpy(float))
    else:
        d = (pairs.a - pairs.b).to_numpy(float)
    t = stats.one_sample_t(d)
    sign = -1 if check.direction == "lower" else 1
    verdict = "inconclusive"
    if t.p_two < alpha:
        verdict = "supported" if sign * t.mean > 0 else "contradicted"
    vs = f"{check.method} vs {check.baseline}"
    if check.log_scale:
        text = (f"{check.metric} {vs}: ratio {math.exp(t.mean):.3g} (geometric mean over {t.n} pairs), "
                f"paired t on log ratios p = {_p(t.p_two)}")
        mde = stats.t_mde(t.sd, t.n, alpha)
        detectable = (f"ratios <= {math.exp(-mde):.3f} or >= {math.exp(mde):.3f}" if math.isfinite(mde)
                      else "needs >= 2 pairs with spread")
    else:
        text = f"{check.metric} {vs}: difference {t.mean:+.3g} over {t.n} pairs, paired t p = {_p(t.p_two)}"
        mde = stats.t_mde(t.sd, t.n, alpha)
        detectable = f"abs(difference) >= {mde:.3g}" if math.isfinite(mde) else "needs >= 2 pairs with spread"
    need = stats.t_n_needed(t.mean, t.sd, alpha) if t.n >= 2 else None
    return CheckResult(check, verdict, text, t.n, detectable, _seeds(need, n_ranks), n_ranks)


def tost(table: pd.DataFrame, check: Check, alpha: float) -> CheckResult:
    pairs = _pairs(table, check)
    if pairs.empty:
        return _no_pairs(table, check)
    n_ranks = pairs["rank"].nunique()
    m = check.margin
    e = stats.tost((pairs.a - pairs.b).to_numpy(float), m, alpha)
    verdict = "supported" if e.p_equivalent < alpha else "contradicted" if e.p_outside < alpha else "inconclusive"
    text = (f"{check.metric} {check.method} - {check.baseline}: {100 * e.mean:+.2f} points over {e.n} pairs, "
            f"{100 * (1 - 2 * alpha):.0f}% CI [{100 * e.low:+.2f}, {100 * e.high:+.2f}]; TOST within "
            f"+-{100 * m:g} points p = {_p(e.p_equivalent)}, beyond the margin p = {_p(e.p_outside)}")
    mde = stats.tost_margin_mde(e.sd, e.n, alpha)
    detectable = (f"equivalence within +-{100 * mde:.2g} points (true difference 0)" if math.isfinite(mde)
                  else "needs >= 2 pairs with spread")
    need = stats.tost_n_needed(e.mean, e.sd, m, alpha) if e.n >= 2 else None
    unsized = ("the observed difference is not inside the margin: more seeds would not show equivalence"
               if abs(e.mean) >= m else "")
    return CheckResult(check, verdict, text, e.n, detectable, _seeds(need, n_ranks), n_ranks, unsized)


def non_inferiority(table: pd.DataFrame, check: Check, alpha: float) -> CheckResult:
    pairs = _pairs(table, check)
    if pairs.empty:
        return _no_pairs(table, check)
    n_ranks = pairs["rank"].nunique()
    m = check.margin
    t = stats.one_sample_t((pairs.a - pairs.b).to_numpy(float), -m)
    # supported: the difference is above -margin; contradicted: below it (worse by more than the margin)
    verdict = "supported" if t.p_greater < alpha else "contradicted" if t.p_less < alpha else "inconclusive"
    text = (f"{check.metric} {check.method} - {check.baseline}: {100 * t.mean:+.2f} points over {t.n} pairs; "
            f"non-inferior within {100 * m:g} points p = {_p(t.p_greater)}, inferior by more p = {_p(t.p_less)}")
    mde = stats.t_mde(t.sd, t.n, alpha, sided=1)
    detectable = (f"non-inferiority margins >= {100 * mde:.2g} points (true difference 0)" if math.isfinite(mde)
                  else "needs >= 2 pairs with spread")
    need = stats.t_n_needed(t.mean + m, t.sd, alpha, sided=1) if t.n >= 2 else None
    return CheckResult(check, verdict, text, t.n, detectable, _seeds(need, n_ranks), n_ranks)


def entropy_kept(table: pd.DataFrame, check: Check, alpha: float) -> CheckResult:
    base = f"{check.metric}_base"
    runs = table[table.method == check.method].dropna(subset=[check.metric, base])
    runs = runs[(runs[check.metric] > 0) & (runs[base] > 0)]
    if runs.empty:
        return CheckResult(check, "skipped", _missing(table, check) or f"no {check.method} run with {base}")
    n_ranks = runs["rank"].nunique()
    ratio = np.log(runs[check.metric].to_numpy(float) / runs[base].to_numpy(float))
    collapsed = int((ratio < math.log(COLLAPSE_RATIO)).sum())
    t = stats.one_sample_t(ratio, math.log(COLLAPSE_RATIO))
    verdict = ("contradicted" if collapsed or t.p_less < alpha else
               "supported" if t.p_greater < alpha else "inconclusive")
    text = (f"{check.method} final/initial {check.metric}: {math.exp(t.mean):.3g} (geometric mean over {t.n} runs), "
            f"collapsed (< {COLLAPSE_RATIO:g}) in {collapsed}/{t.n}; above {COLLAPSE_RATIO:g} p = {_p(t.p_greater)}")
    mde = stats.t_mde(t.sd, t.n, alpha)
    detectable = (f"ratios >= {COLLAPSE_RATIO * math.exp(mde):.3g}" if math.isfinite(mde)
                  else "needs >= 2 runs with spread")
    need = stats.t_n_needed(t.mean - math.log(COLLAPSE_RATIO), t.sd, alpha) if t.n >= 2 else None
    return CheckResult(check, verdict, text, t.n, detectable, _seeds(need, n_ranks), n_ranks)


TESTS = {"spearman_trend": spearman_trend, "paired_t": paired_t, "tost": tost,
         "non_inferiority": non_inferiority, "entropy_kept": entropy_kept}


# ---- verdicts ----------------------------------------------------------------------------------------------------

def combine(verdicts: list[str]) -> str:
    ran = [v for v in verdicts if v != "skipped"]
    if not ran:
        return "skipped"
    if "contradicted" in ran:
        return "contradicted"
    return "supported" if all(v == "supported" for v in ran) else "inconclusive"


def check_claims(table: pd.DataFrame, claims: list[Claim] | None = None, margin: float | None = None,
                 alpha: float = ALPHA) -> list[ClaimResult]:
    """Every claim on the ok runs of `table` (columns method, rank, seed, context, status and the metrics), once per
    context (a sweep with one context gives one row per claim). margin: overrides every check's margin."""
    ok = table[table.status == "ok"] if "status" in table else table
    needed = {c for claim in claims or CLAIMS for ch in claim.checks for c in (ch.metric, f"{ch.metric}_base")}
    ok = ok.assign(**{c: math.nan for c in sorted(needed - set(ok.columns))})  # a metric never recorded: no value
    contexts = list(dict.fromkeys(ok["context"])) if "context" in ok and len(ok) else [""]
    out = []
    for context in contexts:
        runs = ok[ok["context"] == context] if "context" in ok else ok
        for claim in claims or CLAIMS:
            results = []
            for check in claim.checks:
                if margin is not None and check.margin is not None:
                    check = replace(check, margin=margin)
                ambiguous = _ambiguous(runs, check)
                results.append(CheckResult(check, "skipped", ambiguous) if ambiguous else
                               TESTS[check.test](runs, check, alpha))
            out.append(_claim_result(claim, results, context))
    return out


def _claim_result(claim: Claim, results: list[CheckResult], context: str) -> ClaimResult:
    verdict = combine([r.verdict for r in results])
    ran = [r for r in results if r.verdict != "skipped"]
    statistic = "; ".join(r.statistic if r.verdict != "skipped" else f"not tested ({r.statistic})"
                          for r in results)
    detectable = "; ".join(f"{r.check.metric}: {r.detectable}" for r in ran if r.detectable)
    needs = ""
    if verdict == "inconclusive":
        open_ = [r for r in ran if r.verdict == "inconclusive"]
        sized = [r for r in open_ if r.seeds_needed is not None]
        parts = []
        if sized:
            worst = max(sized, key=lambda r: r.seeds_needed)
            parts.append(f"the observed effect needs >= {worst.seeds_needed} seeds with {worst.n_ranks} "
                         f"rank{'s' if worst.n_ranks != 1 else ''} ({stats.POWER:.0%} power)")
        for r in open_:
            if r.seeds_needed is None:
                parts.append(f"{r.check.metric}: " + (r.unsized or "no effect observed (or no spread to estimate "
                                                                  "one): more seeds cannot be sized"))
        needs = "; ".join(parts)
    return ClaimResult(claim.id, claim.statement, claim.source, claim.sentence, verdict, statistic,
                       max((r.n for r in ran), default=0), detectable, needs, context, results)


def claims_markdown(results: list[ClaimResult], alpha: float = ALPHA) -> str:
    lines = ["## Claims of the papers, checked on this sweep", "",
             f"Each claim is a set of checks; a check is **supported** or **contradicted** when a test of both tails "
             f"is significant at alpha {alpha:g} in the claimed or the opposite direction, else **inconclusive**; "
             f"'equal' is an equivalence test (TOST) with the margin shown; **skipped**: the sweep lacks its "
             f"methods. Runs pair by (rank, seed); n counts pairs (or runs). 'Detectable' is the smallest effect the "
             f"sweep detects with {stats.POWER:.0%} power; 'needs' sizes the observed effect.", "",
             "| claim | source | verdict | statistic | detectable | n |", "|---|---|---|---|---|---|"]
    cell = lambda text: str(text).replace("|", "/")  # noqa: E731  (a pipe would split the table's cell)
    for c in results:
        verdict = f"**{c.verdict}**" + (f"; {cell(c.needs)}" if c.needs else "")
        label = c.claim + (f" [{c.context}]" if c.context else "")
        lines.append(f"| {cell(label)} | {cell(c.source)}: \"{cell(c.sentence)}\" | {verdict} | "
                     f"{cell(c.statistic)} | {cell(c.detectable or '-')} | {c.n} |")
    return "\n".join(lines) + "\n"
