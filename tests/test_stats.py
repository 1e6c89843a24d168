"""bench.stats against independent computations: exhaustive enumeration of every bootstrap resample of tiny tables,
brute-force permutation and pair counting, rliable's own estimators, scipy's tests, hand-computed t and TOST, and
Monte Carlo simulation of power. No model, no files: fast."""
import math
from itertools import permutations, product

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from bench import stats


def _exact_distribution(samples, statistic):
    """Every bootstrap resample of every sample (each equally likely) -> statistic values."""
    choices = [list(product(range(len(s)), repeat=len(s))) for s in samples]
    return np.array([statistic([np.asarray(s, float)[list(ix)] for s, ix in zip(samples, combo)])
                     for combo in product(*choices)])


def _assert_percentile_bounds(low, high, exact, confidence=0.95, slack=0.012):
    """A Monte Carlo percentile interval's ends sit at the exact distribution's alpha/2 and 1 - alpha/2 quantiles:
    the exact CDF just below `low` is <= alpha/2 and at `low` >= alpha/2 (up to Monte Carlo slack); same for high."""
    a = (1 - confidence) / 2
    cdf = lambda v: np.mean(exact <= v + 1e-12)  # noqa: E731
    below = lambda v: np.mean(exact < v - 1e-12)  # noqa: E731
    assert below(low) <= a + slack and cdf(low) >= a - slack, (low, below(low), cdf(low))
    assert below(high) <= 1 - a + slack and cdf(high) >= 1 - a - slack, (high, below(high), cdf(high))


def test_stratified_bootstrap_matches_exhaustive_enumeration():
    strata = [[0.1, 0.4, 0.35], [0.9, 0.5]]  # resampled within each stratum: 27 x 4 equally likely resamples
    iv = stats.interval(strata, stats.mean)
    exact = _exact_distribution(strata, lambda s: np.concatenate(s).mean())
    assert iv.point == pytest.approx(np.mean([0.1, 0.4, 0.35, 0.9, 0.5])) and iv.n == 5
    _assert_percentile_bounds(iv.low, iv.high, exact)
    # stratified: the stratum sizes are kept, so the interval is narrower than resampling all five values together
    pooled = _exact_distribution([sum(strata, [])], lambda s: s[0].mean())
    assert np.percentile(exact, 97.5) - np.percentile(exact, 2.5) < np.percentile(pooled, 97.5) - np.percentile(
        pooled, 2.5)


def test_a_single_run_stratum_is_held_fixed_and_small_n_gets_no_interval():
    strata = [[0.2], [0.3, 0.6, 0.5]]
    iv = stats.interval(strata, stats.mean)
    exact = _exact_distribution(strata, lambda s: np.concatenate(s).mean())
    _assert_percentile_bounds(iv.low, iv.high, exact)
    assert not stats.interval([[0.3, 0.5]]).ok and stats.interval([[0.3, 0.5]]).note == "n < 3"
    one_each = stats.interval([[0.1], [0.2], [0.3]])
    assert not one_each.ok and one_each.note == "one run per stratum" and one_each.point == pytest.approx(0.2)
    assert stats.interval([[np.nan, 1.0]]).n == 1  # missing values are not runs


def test_bootstrap_is_reproducible_and_seeded():
    x = [list(np.random.default_rng(5).normal(size=30))]  # enough distinct resample means to tell seeds apart
    assert stats.interval(x) == stats.interval(x)
    other = stats.interval(x, seed=1)
    assert (other.low, other.high) != (stats.interval(x).low, stats.interval(x).high)
    table = pd.DataFrame({"m": ["a"] * 4 + ["b"] * 4, "r": ["4", "4", "16", "16"] * 2,
                          "v": [0.1, 0.2, 0.3, 0.5, 0.2, 0.25, 0.4, 0.45]})
    pd.testing.assert_frame_equal(stats.improvement_intervals(table, "m", "r", "v", "a"),
                                  stats.improvement_intervals(table, "m", "r", "v", "a"))


def test_iqm_and_probability_of_improvement_match_rliable_and_brute_force():
    rl = pytest.importorskip("rliable.metrics")
    rng = np.random.default_rng(3)
    x, y = rng.normal(0.5, 0.1, (5, 3)), rng.normal(0.45, 0.1, (4, 3))  # (runs, tasks) as rliable takes them
    y[:, 1] = x[:4, 1]  # ties across the two sides are counted 1/2
    assert stats.iqm(x.ravel()) == pytest.approx(rl.aggregate_iqm(x))
    xs, ys = list(x.T), list(y.T)
    assert stats.probability_of_improvement(xs, ys) == pytest.approx(rl.probability_of_improvement(x, y))
    brute = np.mean([np.mean([(a > b) + 0.5 * (a == b) for a in xi for b in yi]) for xi, yi in zip(xs, ys)])
    assert stats.probability_of_improvement(xs, ys) == pytest.approx(brute)
    ordered = np.sort(rng.normal(size=12))
    assert stats.iqm(ordered) == pytest.approx(ordered[3:9].mean())  # drop 3 of 12 on each side


def test_iqm_across_strata_matches_exhaustive_enumeration():
    table = pd.DataFrame({"m": ["a"] * 6, "r": ["4"] * 3 + ["16"] * 3, "v": [0.1, 0.5, 0.3, 0.6, 0.2, 0.45]})
    row = stats.aggregate_intervals(table, "m", "r", "v").iloc[0]
    strata = [table[table.r == k].v.tolist() for k in ("16", "4")]
    assert row.point == pytest.approx(st.trim_mean(table.v, 0.25)) and (row.n, row.n_strata) == (6, 2)
    _assert_percentile_bounds(row.ci_low, row.ci_high, _exact_distribution(strata, lambda s: st.trim_mean(
        np.concatenate(s), 0.25)))


def test_improvement_interval_matches_exhaustive_enumeration():
    table = pd.DataFrame({"m": ["a"] * 4 + ["b"] * 4, "r": ["4", "4", "16", "16"] * 2,
                          "v": [0.1, 0.3, 0.6, 0.2, 0.2, 0.25, 0.4, 0.5]})
    row = stats.improvement_intervals(table, "m", "r", "v", "a").iloc[0]
    keys = sorted(["4", "16"])  # the strata, in the order improvement_intervals takes them
    xs = [table[(table.m == "b") & (table.r == k)].v.tolist() for k in keys]
    ys = [table[(table.m == "a") & (table.r == k)].v.tolist() for k in keys]
    exact = _exact_distribution(xs + ys, lambda s: stats.probability_of_improvement(s[:2], s[2:]))
    assert row.m == "b" and row.point == pytest.approx(stats.probability_of_improvement(xs, ys))
    _assert_percentile_bounds(row.ci_low, row.ci_high, exact)


def test_performance_profile_fractions_and_bands():
    table = pd.DataFrame({"m": ["a"] * 6, "r": ["4", "4", "4", "16", "16", "16"],
                          "v": [0.1, 0.3, 0.35, 0.5, 0.6, 0.2]})
    taus = [0.0, 0.25, 0.4, 0.7]
    prof = stats.performance_profile(table, "m", "r", "v", taus)
    assert prof.fraction.tolist() == pytest.approx([1.0, 4 / 6, 2 / 6, 0.0])
    strata = [table[table.r == k].v.tolist() for k in ("16", "4")]
    for tau, row in zip(taus, prof.itertuples()):
        exact = _exact_distribution(strata, lambda s: np.mean(np.concatenate(s) > tau))  # noqa: B023 (called at once)
        _assert_percentile_bounds(row.low, row.high, exact)


def test_paired_item_difference_matches_enumeration_and_is_paired():
    a = np.array([[1, 0, 1, 1, 0], [1, 1, 1, 0, 0]])  # two seeds of A on five items
    b = np.array([[0, 0, 1, 0, 0]])
    iv = stats.paired_item_difference(a, b)
    d = a.mean(0) - b.mean(0)
    assert iv.point == pytest.approx(a.mean() - b.mean()) and iv.n == 5
    _assert_percentile_bounds(iv.low, iv.high, _exact_distribution([d], lambda s: s[0].mean()))
    # pairing: identical answers on every item leave no eval noise, however noisy the items are
    same = np.array([[1, 0, 1, 0, 1, 1, 0, 0]])
    iv = stats.paired_item_difference(same, same)
    assert (iv.point, iv.low, iv.high) == (0.0, 0.0, 0.0)
    assert stats.paired_item_difference(np.zeros((1, 3)), np.zeros((1, 4))).note == "no shared eval items"


def _brute_spearman_p(x, y):
    rho = st.spearmanr(x, y).statistic
    null = np.array([st.spearmanr(x, q).statistic for q in permutations(y)])
    return rho, min(1.0, 2 * min(np.mean(null >= rho - 1e-12), np.mean(null <= rho + 1e-12)))


@pytest.mark.parametrize("x,y", [([4, 16, 64, 4, 16, 64], [0.1, 0.3, 0.2, 0.05, 0.4, 0.5]),
                                 ([4, 4, 16, 16, 64, 64, 4], [3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 0.5]),
                                 ([1, 2, 3, 4, 5], [5.0, 4.0, 3.0, 2.0, 1.0])])
def test_spearman_exact_p_matches_enumeration(x, y):
    t = stats.spearman_test(x, y)
    rho, p = _brute_spearman_p(x, y)
    assert t.exact and t.rho == pytest.approx(rho) and t.p == pytest.approx(p)


def test_spearman_sampled_p_is_never_zero_and_small_designs_say_so():
    x = list(range(12))
    t = stats.spearman_test(x, [2.0 * v for v in x], permutations=999)
    assert not t.exact and t.rho == pytest.approx(1.0)
    assert t.p == pytest.approx(2 / 1000) and t.p > 0  # (0 + 1) / (999 + 1), both tails
    three = stats.spearman_test([4, 16, 64], [0.1, 0.2, 0.3])
    assert three.rho == pytest.approx(1.0) and three.p == pytest.approx(1 / 3) and three.min_p == pytest.approx(1 / 3)
    x = [4, 4, 16, 16, 64, 64]  # 3 ranks x 2 seeds: the closed form against the enumerated null distribution
    tied = stats.spearman_test(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert tied.min_p == pytest.approx(stats.spearman_min_p([2, 2, 2])) == pytest.approx(2 * 8 / 720)
    assert tied.p == pytest.approx(_brute_spearman_p(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[1])


def test_t_and_tost_against_hand_computation():
    d = np.array([0.012, -0.004, 0.007, 0.001, -0.009, 0.003])
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    se = sd / math.sqrt(n)
    t = stats.one_sample_t(d)
    assert t.p_two == pytest.approx(2 * st.t.sf(abs(mean / se), n - 1))
    m = 0.02
    e = stats.tost(d, m)
    p_lower = st.t.sf((mean + m) / se, n - 1)    # H0: delta <= -m
    p_upper = st.t.cdf((mean - m) / se, n - 1)   # H0: delta >= +m
    assert e.p_equivalent == pytest.approx(max(p_lower, p_upper))
    assert e.p_outside == pytest.approx(min(1 - p_lower, 1 - p_upper))
    half = st.t.ppf(0.95, n - 1) * se
    assert (e.low, e.high) == pytest.approx((mean - half, mean + half))
    assert (e.p_equivalent < 0.05) == (-m < e.low and e.high < m)  # TOST = the 90% interval inside the margin
    far = stats.tost(d + 0.05, m)
    assert far.p_equivalent > 0.5 and far.p_outside < 0.05


def test_power_functions_against_simulation():
    rng = np.random.default_rng(0)
    sims, n, sd = 20000, 8, 1.0
    mde = stats.t_mde(sd, n)
    assert stats.t_power(mde, sd, n) == pytest.approx(stats.POWER, abs=1e-6)
    data = rng.normal(mde, sd, (sims, n))
    rejected = st.ttest_1samp(data, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(stats.POWER, abs=0.015)
    need = stats.t_n_needed(0.5, 1.0)
    assert stats.t_power(0.5, 1.0, need) >= 0.8 > stats.t_power(0.5, 1.0, need - 1)
    margin, n = 0.5, 20
    data = rng.normal(0.0, sd, (sims, n))
    lo = st.ttest_1samp(data, -margin, axis=1, alternative="greater").pvalue
    hi = st.ttest_1samp(data, margin, axis=1, alternative="less").pvalue
    assert np.mean(np.maximum(lo, hi) < 0.05) == pytest.approx(stats.tost_power(0.0, sd, n, margin), abs=0.015)
    m_mde = stats.tost_margin_mde(sd, n)
    assert stats.tost_power(0.0, sd, n, m_mde) == pytest.approx(stats.POWER, abs=1e-6)


def test_spearman_mde_against_simulation():
    rng = np.random.default_rng(1)
    n, sims = 30, 4000
    rho_s = stats.spearman_mde(n)
    r = 2 * math.sin(math.pi * rho_s / 6)  # Pearson's r whose bivariate normal has Spearman's rho_s
    z = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], (sims, n))
    p = np.array([st.spearmanr(s[:, 0], s[:, 1]).pvalue for s in z])
    assert np.mean(p < 0.05) == pytest.approx(stats.POWER, abs=0.04)
    assert stats.spearman_n_needed(rho_s) in (n, n + 1)
    assert math.isnan(stats.spearman_mde(3))
