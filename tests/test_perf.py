"""`bench perf` runs and writes its keys (a smoke test: figures are never asserted in timed unit tests)."""
import json

import pytest


def test_perf_compares_methods_on_identical_tokens(tmp_path, tiny):
    """`bench perf` (not a timing assertion): it runs, every method saw the same completions, it writes the keys."""
    from bench.perf import run_perf
    out = tmp_path / "perf.json"
    result = run_perf(["kl_free_lora", "proma", "proma_intra"], 4, 1, "tiny", "cpu", out, log=lambda *_: None,
                      full=False)
    saved = json.loads(out.read_text())
    assert saved["proma_vs_kl_free_step_ratio"] == result["proma_vs_kl_free_step_ratio"] > 0
    for key in ("proma_intra_vs_kl_free_step_ratio", "proma_vs_kl_free_update_ratio", "machine", "versions"):
        assert key in saved, key
    for m in ("kl_free_lora", "proma", "proma_intra"):
        t = saved["medians_s"][m]
        assert t["cycle"] == pytest.approx(t["generation"] + t["update"], rel=1e-6)


def test_run_profile_splits_a_runs_seconds():
    """Every second of a run is in exactly one part; the final eval is the evals' total minus the base eval."""
    from bench.perf import run_profile
    summary = {"time_generation_s": 10.0, "time_policy_s": 20.0, "time_reference_s": None, "time_metrics_s": 1.5,
               "eval_seconds": 7.0, "eval_base_seconds": 3.0, "setup_seconds": 2.0, "init_seconds": 0.5,
               "run_seconds": 50.0}
    prof = run_profile(summary)
    assert prof == {"generation": 10.0, "policy": 20.0, "reference": 0.0, "metrics": 1.5, "eval_base": 3.0,
                    "eval_final": 4.0, "setup": 2.5, "total": 50.0, "other": 9.0}
