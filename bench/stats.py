"""Interval statistics over a score table, in rliable's design (Agarwal et al., "Deep RL at the Edge of the
Statistical Precipice", NeurIPS 2021): pure functions of a pandas DataFrame with one row per run (or per eval item)
and named columns. Nothing here knows a method; callers say which column groups, which stratifies and which holds
the value. The estimators and resampling are scipy.stats' (bootstrap, permutation_test, trim_mean, mannwhitneyu,
t and nct); every figure carries its interval and n, or a note saying why it has none.

Bootstrap intervals are percentile intervals from `RESAMPLES` resamples drawn with the fixed seed `SEED`, so a
report is identical when re-run. Seed-level intervals resample runs within each stratum (rank): rliable's
stratified bootstrap. Item-level intervals resample eval items jointly for both sides of a difference (paired) and
measure eval noise only, never seed-to-seed variation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as st

CONFIDENCE = 0.95
RESAMPLES = 10_000     # bootstrap resamples per interval (recorded in every report)
SEED = 0               # the bootstrap's seed: the same data give the same intervals
MIN_RUNS = 3           # fewer runs: no seed-level interval (a percentile interval of 2 values is [min, max])
PERMUTATIONS = 99_999  # sampled permutations where the exact permutation distribution is too large
EXACT_MAX_N = 9        # up to 9! = 362,880 orderings the permutation p is exact
POWER = 0.8            # power of the minimum detectable effects


@dataclass(frozen=True)
class Interval:
    point: float
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    note: str = ""          # why there is no interval (n too small, one run per stratum, ...)

    @property
    def ok(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


# ---- estimators (vectorized over the last axis, as scipy.stats.bootstrap calls them) -------------------------------

def mean(x, axis=-1):
    return np.mean(x, axis=axis)


def iqm(x, axis=-1):
    """Interquartile mean: the 25%-trimmed mean (rliable's aggregate_iqm)."""
    return st.trim_mean(x, 0.25, axis=axis)


def probability_of_improvement(x_strata: list, y_strata: list) -> float:
    """P(X > Y) + P(X = Y) / 2 for a random run of X and one of Y in the same stratum, averaged over strata
    (rliable's probability_of_improvement: the Mann-Whitney U statistic / (n_x n_y))."""
    return float(np.mean([_u_fraction(np.asarray(x, float), np.asarray(y, float)) for x, y in zip(x_strata, y_strata)]))


def _u_fraction(x, y):
    """Mann-Whitney U / (n_x n_y) along the last axis (batched)."""
    return st.mannwhitneyu(x, y, axis=-1, method="asymptotic").statistic / (x.shape[-1] * y.shape[-1])


# ---- the bootstrap ----------------------------------------------------------------------------------------------

def _bootstrap(samples: list, statistic, resamples: int, seed: int, confidence: float, batch: int | None = None):
    """Percentile interval of statistic(list of arrays) resampling each sample independently (a stratified
    bootstrap when the samples are the strata). A sample of one value resamples to itself; it is held fixed because
    scipy.stats.bootstrap needs two or more. Returns (low, high), or None when nothing can be resampled."""
    samples = [np.asarray(s, float) for s in samples]
    moving = [i for i, s in enumerate(samples) if len(s) >= 2]
    if not moving:
        return None

    def stat(*resampled, axis=-1):
        batch_shape = resampled[0].shape[:-1]
        full = [np.broadcast_to(s, batch_shape + s.shape) for s in samples]
        for i, r in zip(moving, resampled):
            full[i] = r
        return statistic(full)
    res = st.bootstrap(tuple(samples[i] for i in moving), stat, n_resamples=resamples, vectorized=True,
                       method="percentile", confidence_level=confidence, rng=np.random.default_rng(seed), batch=batch)
    low, high = res.confidence_interval
    return float(low), float(high)


def interval(strata: list, statistic=mean, *, resamples: int = RESAMPLES, seed: int = SEED,
             confidence: float = CONFIDENCE, min_n: int = MIN_RUNS) -> Interval:
    """statistic over all values, with a stratified bootstrap interval (runs resampled within each stratum)."""
    strata = [np.asarray(s, float)[np.isfinite(np.asarray(s, float))] for s in strata]
    strata = [s for s in strata if len(s)]
    n = sum(len(s) for s in strata)
    if n == 0:
        return Interval(math.nan, n=0, note="no runs")
    point = float(statistic(np.concatenate(strata)))
    if n < min_n:
        return Interval(point, n=n, note=f"n < {min_n}")
    ci = _bootstrap(strata, lambda full: statistic(np.concatenate(full, axis=-1)), resamples, seed, confidence)
    if ci is None:
        return Interval(point, n=n, note="one run per stratum")
    return Interval(point, *ci, n=n)


def cell_intervals(table: pd.DataFrame, by: list, value: str, statistic=mean, **kw) -> pd.DataFrame:
    """One row per cell (unique values of `by`): statistic of `value` over the cell's rows with a bootstrap interval.
    Columns: by, value, value_ci_low, value_ci_high, value_n, value_note."""
    rows = []
    for key, g in table.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        iv = interval([pd.to_numeric(g[value], errors="coerce").to_numpy(float)], statistic, **kw)
        rows.append({**dict(zip(by, key)), value: iv.point, f"{value}_ci_low": iv.low, f"{value}_ci_high": iv.high,
                     f"{value}_n": iv.n, f"{value}_note": iv.note})
    return pd.DataFrame(rows, columns=[*by, value, f"{value}_ci_low", f"{value}_ci_high", f"{value}_n",
                                       f"{value}_note"])


def _strata(table: pd.DataFrame, stratum: str, value: str) -> dict:
    values = pd.to_numeric(table[value], errors="coerce")
    return {k: v.dropna().to_numpy(float) for k, v in values.groupby(table[stratum], sort=True) if v.notna().any()}


def aggregate_intervals(table: pd.DataFrame, group: str, stratum: str, value: str, statistic=iqm,
                        **kw) -> pd.DataFrame:
    """Per group, statistic (default IQM) over all its runs across strata, with a stratified bootstrap interval.
    Columns: group, point, ci_low, ci_high, n, n_strata, note."""
    rows = []
    for key, g in table.groupby(group, sort=False):
        strata = _strata(g, stratum, value)
        iv = interval(list(strata.values()), statistic, **kw)
        rows.append({group: key, "point": iv.point, "ci_low": iv.low, "ci_high": iv.high, "n": iv.n,
                     "n_strata": len(strata), "note": iv.note})
    return pd.DataFrame(rows, columns=[group, "point", "ci_low", "ci_high", "n", "n_strata", "note"])


def improvement_intervals(table: pd.DataFrame, group: str, stratum: str, value: str, baseline,
                          resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE,
                          min_n: int = MIN_RUNS) -> pd.DataFrame:
    """Probability of improvement of each group over `baseline` on `value`, over the strata both have, with a
    stratified bootstrap interval (both groups' runs resampled independently within each stratum, as rliable's
    StratifiedIndependentBootstrap). Columns: group, point, ci_low, ci_high, n (runs of group), n_strata, note."""
    base = _strata(table[table[group] == baseline], stratum, value)
    rows = []
    for key, g in table[table[group] != baseline].groupby(group, sort=False):
        mine = _strata(g, stratum, value)
        common = [k for k in mine if k in base]
        row = {group: key, "point": math.nan, "ci_low": math.nan, "ci_high": math.nan,
               "n": sum(len(mine[k]) for k in common), "n_strata": len(common), "note": ""}
        if not common:
            row["note"] = f"no stratum shared with {baseline}"
            rows.append(row)
            continue
        xs, ys = [mine[k] for k in common], [base[k] for k in common]
        row["point"] = probability_of_improvement(xs, ys)
        k = len(common)
        ci = None
        if min(row["n"], sum(len(y) for y in ys)) >= min_n:
            ci = _bootstrap(xs + ys, lambda full: np.mean([_u_fraction(full[i], full[k + i]) for i in range(k)],  # noqa: B023 (called at once)
                                                          axis=0), resamples, seed, confidence)
        if ci is None:
            row["note"] = f"n < {min_n}" if min(row["n"], sum(len(y) for y in ys)) < min_n else "one run per stratum"
        else:
            row["ci_low"], row["ci_high"] = ci
        rows.append(row)
    return pd.DataFrame(rows, columns=[group, "point", "ci_low", "ci_high", "n", "n_strata", "note"])


def performance_profile(table: pd.DataFrame, group: str, stratum: str, value: str, thresholds,
                        resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE,
                        min_n: int = MIN_RUNS) -> pd.DataFrame:
    """Run-score distribution (rliable's performance profile): per group and threshold tau, the fraction of runs
    with value > tau, with a stratified bootstrap band. Columns: group, threshold, fraction, low, high, n."""
    thresholds = np.asarray(thresholds, float)
    rows = []
    for key, g in table.groupby(group, sort=False):
        strata = list(_strata(g, stratum, value).values())
        n = sum(len(s) for s in strata)
        if not n:
            continue
        values = np.concatenate(strata)
        for tau in thresholds:
            fraction = float(np.mean(values > tau))
            ci = _bootstrap(strata, lambda full, t=tau: np.mean(np.concatenate(full, axis=-1) > t, axis=-1),
                            resamples, seed, confidence) if n >= min_n else None
            rows.append({group: key, "threshold": tau, "fraction": fraction, "low": ci[0] if ci else math.nan,
                         "high": ci[1] if ci else math.nan, "n": n})
    return pd.DataFrame(rows, columns=[group, "threshold", "fraction", "low", "high", "n"])


def paired_item_difference(a: np.ndarray, b: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED,
                           confidence: float = CONFIDENCE) -> Interval:
    """Accuracy difference A - B on the same eval items, with a paired bootstrap over items (eval noise only).
    a, b: (runs, items) 0/1 matrices with the same item columns; each side is averaged over its runs first, then
    items are resampled jointly for both sides."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        return Interval(math.nan, note="no shared eval items")
    d = a.mean(axis=0) - b.mean(axis=0)  # per-item difference of the two sides
    if len(d) < 2:
        return Interval(float(d.mean()), n=len(d), note="one shared item")
    ci = _bootstrap([d], lambda full: full[0].mean(axis=-1), resamples, seed, confidence, batch=1000)
    return Interval(float(d.mean()), *ci, n=len(d))


# ---- tests of a claim -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trend:
    rho: float
    p: float                # two-sided permutation p
    n: int
    exact: bool             # all orderings enumerated; else `resamples` sampled with the +1 correction
    resamples: int
    min_p: float            # the smallest two-sided p this design can give


def spearman_test(x, y, *, seed: int = SEED, exact_max_n: int = EXACT_MAX_N,
                  permutations: int = PERMUTATIONS) -> Trend:
    """Spearman's rho of y on x with a two-sided permutation p (all n! orderings of y for n <= exact_max_n; else
    `permutations` sampled ones, p = (hits + 1) / (permutations + 1), never 0: scipy.stats.permutation_test)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    rx, ry = st.rankdata(x), st.rankdata(y)
    if n < 2 or np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return Trend(math.nan, 1.0, n, True, 0, 1.0)
    cx = rx - rx.mean()

    def rho(r, axis=-1):  # Pearson's r of the ranks = Spearman's rho (midranks for ties)
        c = r - r.mean(axis=axis, keepdims=True)
        return (c * cx).sum(axis=axis) / np.sqrt((c * c).sum(axis=axis) * (cx * cx).sum())
    exact = n <= exact_max_n
    res = st.permutation_test((ry,), rho, permutation_type="pairings", vectorized=True,
                              n_resamples=np.inf if exact else permutations, alternative="two-sided",
                              rng=np.random.default_rng(seed))
    null = res.null_distribution
    if exact:
        eps = 1e-12
        min_p = min(1.0, 2 * min(np.mean(null >= null.max() - eps), np.mean(null <= null.min() + eps)))
    else:
        min_p = 2 / (permutations + 1)
    return Trend(float(res.statistic), float(res.pvalue), n, exact, len(null), float(min_p))


@dataclass(frozen=True)
class TTest:
    mean: float
    sd: float
    n: int
    p_two: float            # H0: mean = mu (two-sided)
    p_greater: float        # H0: mean <= mu
    p_less: float           # H0: mean >= mu


def one_sample_t(d, mu: float = 0.0) -> TTest:
    """Student's t test of the mean of d against mu (paired differences: d = a - b)."""
    d = np.asarray(d, float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2 or np.std(d) == 0:
        m = float(d.mean()) if n else math.nan
        if n >= 2 and m != mu:  # no spread at all: every difference is the same; t is infinite
            return TTest(m, 0.0, n, 0.0, 0.0 if m > mu else 1.0, 0.0 if m < mu else 1.0)
        return TTest(m, 0.0 if n >= 2 else math.nan, n, 1.0, 1.0, 1.0)
    two = st.ttest_1samp(d, mu)
    return TTest(float(d.mean()), float(d.std(ddof=1)), n, float(two.pvalue),
                 float(st.ttest_1samp(d, mu, alternative="greater").pvalue),
                 float(st.ttest_1samp(d, mu, alternative="less").pvalue))


@dataclass(frozen=True)
class Equivalence:
    mean: float
    sd: float
    n: int
    margin: float
    p_equivalent: float     # TOST: max of the two one-sided p's (H0: |delta| >= margin)
    p_outside: float        # H0: |delta| <= margin, against |delta| > margin (the better of the two tails)
    low: float              # the (1 - 2 alpha) interval TOST is equivalent to
    high: float


def tost(d, margin: float, alpha: float = 0.05) -> Equivalence:
    """Two one-sided tests (Schuirmann 1987) on paired differences d: equivalent within +-margin when both
    H0: delta <= -margin and H0: delta >= +margin are rejected at alpha, i.e. the (1 - 2 alpha) interval lies inside
    (-margin, +margin). p_outside tests the other way: the difference lies beyond the margin."""
    lower, upper = one_sample_t(d, -margin), one_sample_t(d, margin)
    t = lower
    if t.n >= 2 and t.sd > 0:
        half = st.t.ppf(1 - alpha, t.n - 1) * t.sd / math.sqrt(t.n)
        low, high = t.mean - half, t.mean + half
    else:
        low = high = t.mean if t.n >= 2 else math.nan
    return Equivalence(t.mean, t.sd, t.n, margin, max(lower.p_greater, upper.p_less),
                       min(lower.p_less, upper.p_greater), low, high)


# ---- power: the smallest effect a design can detect, and the n an effect needs ---------------------------------

def t_power(effect: float, sd: float, n: int, alpha: float = 0.05, sided: int = 2) -> float:
    """Power of a one-sample t test (exact, noncentral t) to detect a mean `effect` with spread `sd` from n values."""
    if n < 2 or not sd > 0:
        return math.nan
    df, nc = n - 1, abs(effect) / sd * math.sqrt(n)
    crit = st.t.ppf(1 - alpha / sided, df)
    return float(st.nct.sf(crit, df, nc) + (st.nct.cdf(-crit, df, nc) if sided == 2 else 0.0))


def t_mde(sd: float, n: int, alpha: float = 0.05, power: float = POWER, sided: int = 2) -> float:
    """Smallest |mean| a one-sample t test detects with the given power (bisection on the exact power)."""
    if n < 2 or not sd > 0:
        return math.nan
    lo, hi = 0.0, sd
    while t_power(hi, sd, n, alpha, sided) < power:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_power(mid, sd, n, alpha, sided) < power else (lo, mid)
    return hi


def t_n_needed(effect: float, sd: float, alpha: float = 0.05, power: float = POWER, sided: int = 2,
               n_max: int = 10_000) -> int | None:
    """Smallest n at which a one-sample t test detects `effect` with the given power (None beyond n_max)."""
    if not (sd > 0 and abs(effect) > 0):
        return None
    return _smallest_n(lambda n: t_power(effect, sd, n, alpha, sided), power, n_max)


def _smallest_n(power_at, power: float, n_max: int) -> int | None:
    """The first n >= 2 with power_at(n) >= power: every n to 100, then in steps of 10% (None beyond n_max)."""
    n = 2
    while n <= n_max:
        if power_at(n) >= power:
            return n
        n = n + 1 if n < 100 else int(n * 1.1)
    return None


def tost_power(delta: float, sd: float, n: int, margin: float, alpha: float = 0.05) -> float:
    """Power of TOST at true difference delta (exact for a normal mean with known sd via the t approximation of
    Julious 2004: P(both one-sided tests reject) from the two noncentral t tails)."""
    if n < 2 or not sd > 0 or margin <= abs(delta):
        return 0.0 if n >= 2 and sd > 0 else math.nan
    df, se = n - 1, sd / math.sqrt(n)
    crit = st.t.ppf(1 - alpha, df)
    p = st.nct.sf(crit, df, (delta + margin) / se) - st.nct.sf(-crit, df, (delta - margin) / se)
    return float(max(0.0, p))


def tost_margin_mde(sd: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Smallest margin TOST can establish with the given power when the true difference is 0."""
    if n < 2 or not sd > 0:
        return math.nan
    lo, hi = 0.0, sd
    while tost_power(0.0, sd, n, hi, alpha) < power:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tost_power(0.0, sd, n, mid, alpha) < power else (lo, mid)
    return hi


def tost_n_needed(delta: float, sd: float, margin: float, alpha: float = 0.05, power: float = POWER,
                  n_max: int = 10_000) -> int | None:
    if not sd > 0 or abs(delta) >= margin:
        return None
    return _smallest_n(lambda n: tost_power(delta, sd, n, margin, alpha), power, n_max)


# Spearman's rho: Fisher's z with the variance 1.06 / (n - 3) of Fieller, Hartley & Pearson (1957)
def spearman_mde(n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Smallest |rho| a two-sided test on n pairs detects with the given power (Fisher-z approximation)."""
    if n <= 3:
        return math.nan
    z = st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power)
    return float(math.tanh(z * math.sqrt(1.06 / (n - 3))))


def spearman_n_needed(rho: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """Pairs a two-sided test needs to detect rho with the given power (Fisher-z approximation; at least 4)."""
    if not 0 < abs(rho):
        return None
    if abs(rho) >= 1:
        return 4
    z = st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power)
    return max(4, int(math.ceil(3 + 1.06 * (z / math.atanh(abs(rho))) ** 2)))


def spearman_min_p(group_sizes: list[int]) -> float:
    """The smallest two-sided exact permutation p of Spearman's rho when x takes len(group_sizes) distinct values,
    each group_sizes[i] times, and y has no ties: 2 x (orderings reaching the extreme rho) / n!."""
    n = sum(group_sizes)
    return min(1.0, 2 * math.prod(math.factorial(k) for k in group_sizes) / math.factorial(n))
