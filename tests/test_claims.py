"""The claims registry: every verdict (supported, contradicted, inconclusive, skipped) of every claim, on run tables
built to come out each way; margins settable; PROMA checked against clipped and unclipped GRPO, never kl_grpo.
No model, no files: fast."""
import math

import numpy as np
import pandas as pd

from bench import claims as C

RANKS, SEEDS = ("4", "16", "64"), (0, 1, 2)


def _table(spec: dict, ranks=RANKS, seeds=SEEDS, context="") -> pd.DataFrame:
    """spec: method -> function(rank:int, seed:int, rng) -> {metric: value}; one ok run per method x rank x seed."""
    rng = np.random.default_rng(0)
    rows = []
    for method, values in spec.items():
        for r in ranks:
            for s in seeds:
                rows.append({"method": method, "rank": r, "seed": s, "status": "ok", "context": context,
                             **values(int(r), s, rng)})
    return pd.DataFrame(rows)


def _verdict(table, claim_id, **kw):
    (result,) = [r for r in C.check_claims(table, **kw) if r.id == claim_id]
    return result


def _noise(rng, scale):
    return float(rng.normal(0, scale))


def test_registry_records_are_complete():
    assert {c.id for c in C.CLAIMS} == {"kl_grows_with_rank", "kl_free_faster_equal_accuracy",
                                        "proma_tighter_step_kl", "geora_at_least_lora",
                                        "entropy_methods_keep_entropy"}
    for claim in C.CLAIMS:
        assert claim.source and claim.sentence and claim.checks
        for check in claim.checks:
            assert check.test in C.TESTS and check.metric and check.method and check.direction
    proma = next(c for c in C.CLAIMS if c.id == "proma_tighter_step_kl")
    assert {ch.baseline for ch in proma.checks if ch.baseline} == {"kl_free_lora", "unclipped_lora"}


# ---- Rottman et al.: KL grows with rank ----------------------------------------------------------------------

def test_rank_claim_supported_contradicted_inconclusive_skipped():
    grows = _table({"kl_free_lora": lambda r, s, rng: {"kl_ref": 1e-3 * r * (1 + 0.1 * s)}})
    res = _verdict(grows, "kl_grows_with_rank")
    assert res.verdict == "supported" and res.n == 9 and "exact" in res.statistic and "+0.95" in res.statistic
    shrinks = _table({"kl_free_lora": lambda r, s, rng: {"kl_ref": 1e-3 / r * (1 + 0.1 * s)}})
    res = _verdict(shrinks, "kl_grows_with_rank")
    assert res.verdict == "contradicted" and "-0.95" in res.statistic  # a clear reversal is not "inconclusive"
    one_seed = _table({"kl_free_lora": lambda r, s, rng: {"kl_ref": 1e-3 * r}}, seeds=(0,))
    res = _verdict(one_seed, "kl_grows_with_rank")
    assert res.verdict == "inconclusive" and res.n == 3
    assert "smallest p 3 runs can give is 0.33" in res.detectable
    assert res.needs == "the observed effect needs >= 2 seeds with 3 ranks (80% power)"  # 2 x 2!^3 / 6! = 0.022
    flat = _table({"kl_free_lora": lambda r, s, rng: {"kl_ref": 1e-3 * (1 + _noise(rng, 0.3))}})
    res = _verdict(flat, "kl_grows_with_rank")
    assert res.verdict == "inconclusive" and "abs(rho) >=" in res.detectable and "seeds" in res.needs
    one_rank = _table({"kl_free_lora": lambda r, s, rng: {"kl_ref": 1e-3}}, ranks=("16",))
    res = _verdict(one_rank, "kl_grows_with_rank")
    assert res.verdict == "skipped" and "needs kl_free_lora at >= 2 ranks" in res.statistic


# ---- Rottman et al.: faster at equal accuracy -------------------------------------------------------------------

def _speed(free_time, free_acc, time_noise=0.01, acc_noise=0.003):
    return _table({
        "kl_grpo": lambda r, s, rng: {"wall_clock_s": 60.0 * (1 + _noise(rng, time_noise)),
                                      "accuracy": 0.40 + _noise(rng, acc_noise)},
        "kl_free_lora": lambda r, s, rng: {"wall_clock_s": free_time * (1 + _noise(rng, time_noise)),
                                           "accuracy": free_acc + _noise(rng, acc_noise)}})


def test_speed_claim_every_verdict():
    res = _verdict(_speed(50.0, 0.40), "kl_free_faster_equal_accuracy")
    assert res.verdict == "supported" and res.n == 9
    assert "ratio 0.8" in res.statistic and "TOST within +-2 points" in res.statistic
    assert _verdict(_speed(70.0, 0.40), "kl_free_faster_equal_accuracy").verdict == "contradicted"  # slower
    worse = _verdict(_speed(50.0, 0.30), "kl_free_faster_equal_accuracy")  # faster but 10 points less accurate
    assert worse.verdict == "contradicted" and [r.verdict for r in worse.checks] == ["supported", "contradicted"]
    noisy = _verdict(_speed(58.0, 0.40, time_noise=0.2), "kl_free_faster_equal_accuracy")
    assert [r.verdict for r in noisy.checks] == ["inconclusive", "supported"]
    assert noisy.verdict == "inconclusive" and noisy.needs.startswith("the observed effect needs >= ")
    assert noisy.needs.endswith("seeds with 3 ranks (80% power)") and "ratios <=" in noisy.detectable
    unequal = _verdict(_speed(50.0, 0.35, acc_noise=0.05), "kl_free_faster_equal_accuracy")
    assert unequal.verdict == "inconclusive" and "equivalence within +-" in unequal.detectable
    assert "not inside the margin: more seeds would not show equivalence" in unequal.needs
    none = _table({"kl_free_lora": lambda r, s, rng: {"wall_clock_s": 50.0, "accuracy": 0.4}})
    res = _verdict(none, "kl_free_faster_equal_accuracy")
    assert res.verdict == "skipped" and "needs kl_grpo runs" in res.statistic


def test_equivalence_margin_is_settable():
    table = _speed(50.0, 0.385, acc_noise=0.001)  # 1.5 points below, tightly
    assert _verdict(table, "kl_free_faster_equal_accuracy").verdict == "supported"  # within the default 2 points
    res = _verdict(table, "kl_free_faster_equal_accuracy", margin=0.01)
    assert res.verdict == "contradicted" and "+-1 points" in res.statistic  # 1.5 points is beyond a 1-point margin


# ---- PROMA: per-step KL below clipped and unclipped GRPO, no entropy collapse -----------------------------------

def _proma(proma_kl, ratio=0.9, baselines=("kl_free_lora", "unclipped_lora"), kl_noise=0.05, collapse_one=False):
    def proma(r, s, rng):
        e = ratio if not (collapse_one and r == 64 and s == 2) else 0.3
        return {"kl_step": proma_kl * (1 + _noise(rng, kl_noise)), "entropy": 0.3 * e * (1 + _noise(rng, 0.02)),
                "entropy_base": 0.3}
    spec = {"proma": proma}
    for b in baselines:
        spec[b] = lambda r, s, rng: {"kl_step": 1e-3 * (1 + _noise(rng, kl_noise)), "entropy": 0.25,
                                     "entropy_base": 0.3}
    return _table(spec)


def test_proma_claim_every_verdict_and_its_baselines():
    res = _verdict(_proma(5e-4), "proma_tighter_step_kl")
    assert res.verdict == "supported" and "vs kl_free_lora" in res.statistic and "vs unclipped_lora" in res.statistic
    assert "collapsed (< 0.5) in 0/9" in res.statistic
    assert _verdict(_proma(2e-3), "proma_tighter_step_kl").verdict == "contradicted"
    collapse = _verdict(_proma(5e-4, collapse_one=True), "proma_tighter_step_kl")
    assert collapse.verdict == "contradicted" and "collapsed (< 0.5) in 1/9" in collapse.statistic
    noisy = _verdict(_proma(1e-3, kl_noise=0.5), "proma_tighter_step_kl")
    assert noisy.verdict == "inconclusive" and noisy.needs
    only_kl_grpo = _verdict(_proma(5e-4, baselines=("kl_grpo",)), "proma_tighter_step_kl")
    assert "needs kl_free_lora runs" in only_kl_grpo.statistic and "needs unclipped_lora runs" in only_kl_grpo.statistic
    assert "vs kl_grpo" not in only_kl_grpo.statistic  # the paper's baselines are clipped and unclipped GRPO
    partial = _verdict(_proma(5e-4, baselines=("kl_free_lora",)), "proma_tighter_step_kl")
    assert partial.verdict == "supported" and "not tested (needs unclipped_lora runs)" in partial.statistic
    nothing = _table({"kl_grpo": lambda r, s, rng: {"kl_step": 1e-3}})
    assert _verdict(nothing, "proma_tighter_step_kl").verdict == "skipped"


# ---- GeoRA: accuracy at least that of PiSSA, MiLoRA and LoRA ----------------------------------------------------

def _geora(delta, noise=0.003):
    spec = {"geora": lambda r, s, rng: {"accuracy": 0.40 + delta + _noise(rng, noise)}}
    for b in ("pissa", "milora", "kl_free_lora"):
        spec[b] = lambda r, s, rng: {"accuracy": 0.40 + _noise(rng, noise)}
    return _table(spec)


def test_geora_claim_every_verdict():
    res = _verdict(_geora(0.01), "geora_at_least_lora")
    assert res.verdict == "supported" and all(f"- {b}" in res.statistic for b in ("pissa", "milora", "kl_free_lora"))
    assert _verdict(_geora(-0.10), "geora_at_least_lora").verdict == "contradicted"
    noisy = _verdict(_geora(-0.02, noise=0.05), "geora_at_least_lora")
    assert noisy.verdict == "inconclusive" and "non-inferiority margins >=" in noisy.detectable
    assert _verdict(_table({"pissa": lambda r, s, rng: {"accuracy": 0.4}}), "geora_at_least_lora").verdict == "skipped"


# ---- entropy bonuses keep final entropy above kl_free_lora's ----------------------------------------------------

def _entropy(delta, noise=0.005, methods=("entropy_bonus", "adaptive_entropy"), spread=0.0):
    spec = {"kl_free_lora": lambda r, s, rng: {"entropy": 0.2 + _noise(rng, noise)}}
    for m in methods:  # spread: differences of +spread, -spread, 0 over the seeds (mean 0, exactly)
        spec[m] = lambda r, s, rng: {"entropy": 0.2 + delta + _noise(rng, noise) + spread * (1, -1, 0)[s]}
    return _table(spec)


def test_entropy_claim_every_verdict_and_skip_reason():
    assert _verdict(_entropy(0.05), "entropy_methods_keep_entropy").verdict == "supported"
    assert _verdict(_entropy(-0.05), "entropy_methods_keep_entropy").verdict == "contradicted"
    even = _verdict(_entropy(0.0, noise=0.0, spread=0.03), "entropy_methods_keep_entropy")
    assert even.verdict == "inconclusive" and "more seeds cannot be sized" in even.needs  # no effect observed
    one = _verdict(_entropy(0.05, methods=("entropy_bonus",)), "entropy_methods_keep_entropy")
    assert one.verdict == "supported" and "needs adaptive_entropy runs" in one.statistic
    res = _verdict(_table({"kl_free_lora": lambda r, s, rng: {"entropy": 0.2}}), "entropy_methods_keep_entropy")
    assert res.verdict == "skipped"
    assert "needs entropy_bonus runs" in res.statistic and "needs adaptive_entropy runs" in res.statistic


# ---- composition, contexts, markdown ----------------------------------------------------------------------------

def test_combine_and_contexts_and_markdown():
    assert C.combine(["supported", "skipped", "supported"]) == "supported"
    assert C.combine(["supported", "inconclusive"]) == "inconclusive"
    assert C.combine(["inconclusive", "contradicted"]) == "contradicted"
    assert C.combine(["skipped"]) == "skipped"
    a = _table({"kl_free_lora": lambda r, s, rng: {"kl_ref": 1e-3 * r * (1 + 0.1 * s)}}, context="lr=0.001")
    b = _table({"kl_free_lora": lambda r, s, rng: {"kl_ref": 1e-3 / r * (1 + 0.1 * s)}}, context="lr=0.0005")
    results = [r for r in C.check_claims(pd.concat([a, b])) if r.id == "kl_grows_with_rank"]
    assert [(r.context, r.verdict) for r in results] == [("lr=0.001", "supported"), ("lr=0.0005", "contradicted")]
    twice = pd.concat([a, a.assign(kl_ref=a.kl_ref * 2)])  # two configurations of kl_free_lora in one context
    res = _verdict(twice, "kl_grows_with_rank")
    assert res.verdict == "skipped" and "kl_free_lora has several configurations here" in res.statistic
    failed = a.assign(status="failed")
    assert _verdict(failed, "kl_grows_with_rank").verdict == "skipped"  # only ok runs count
    md = C.claims_markdown(C.check_claims(a))
    assert "| claim | source | verdict | statistic | detectable | n |" in md and "**supported**" in md
    assert "[lr=0.001]" in md and "Rottman et al. 2026" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(rows) == 2 + len(C.CLAIMS) and {ln.count("|") for ln in rows} == {7}  # no cell splits the table
    assert " p = 0 " not in md and not any(math.isnan(r.n) for r in C.check_claims(a))
