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
