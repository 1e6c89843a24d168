"""Reports, leaderboard and claims on a synthetic sweep (statistics checked against brute force), and the rendered
report.html opened in a real headless Chromium."""
import json
import math
import os
import shutil
import subprocess
from itertools import permutations, product

import numpy as np
import pandas as pd
import pytest

from bench.report import LEADERBOARD_COLUMNS, check_claims, leaderboard, load_sweep, sign_test_p, \
    spearman_permutation, write_report
from tests.test_cli import bench


def _write_run(sweep, method, rank, seed, status="ok", **values):
    d = sweep / f"{method}_r{rank}_s{seed}"
    d.mkdir(parents=True)
    summary = {"run_id": d.name, "method": method, "rank": str(rank), "seed": seed, "status": status,
               "accuracy_base": 0.3, "eval_n": 100, **values}
    if status == "ok":
        summary.setdefault("accuracy_gain", summary.get("accuracy", 0.3) - 0.3)
    (d / "summary.json").write_text(json.dumps(summary))
    spec = {"method": method, "rank": rank, "seed": seed, "steps": 4, "eval_size": 100}
    (d / "config.json").write_text(json.dumps({"spec": spec, "versions": {"torch": "x"}, "git_sha": "abc"}))
    rows = [{"step": 0, "kl_ref": 0.0, "entropy_probe": 0.3}]
    for step in range(1, 5):
        rows.append({"step": step, "kl_step": values.get("kl_step", 1e-4) * step, "entropy": 0.3 - 0.01 * step,
                     "reward": 0.3 + 0.02 * step})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture
def sweep(tmp_path):
    s = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    for method, base_kl, t in (("kl_grpo", 1e-3, 60.0), ("kl_free_lora", 2e-3, 50.0), ("proma", 5e-4, 55.0),
                               ("geora", 1e-3, 50.0), ("pissa", 3e-3, 50.0)):
        for rank, seed in product((4, 16, 64), (0, 1)):
            _write_run(s, method, rank, seed, accuracy=0.4 + rng.uniform(-0.02, 0.02) + (0.02 if method == "geora"
                                                                                           else 0.0),
                       kl_ref=base_kl * rank * (1 + 0.1 * seed), kl_step=base_kl / 10, entropy=0.25,
                       entropy_base=0.3, wall_clock_s=t + seed, time_generation_s=t / 2, time_policy_s=t / 3,
                       time_reference_s=5.0 if method == "kl_grpo" else 0.0, time_other_s=1.0,
                       trainable_params=1000 * rank, peak_mem_mb=900.0)
    _write_run(s, "proma", 64, 2, status="diverged", error="loss not finite at step 3")
    return s


def test_sign_test_and_spearman_against_brute_force():
    for n in range(1, 9):
        for k in range(n + 1):
            outcomes = list(product((0, 1), repeat=n))
            assert sign_test_p(k, n) == pytest.approx(sum(sum(o) >= k for o in outcomes) / len(outcomes))
    x, y = [4, 16, 64, 4, 16], [0.1, 0.3, 0.2, 0.05, 0.4]
    rho, p = spearman_permutation(x, y)
    rx, ry = pd.Series(x).rank().values, pd.Series(y).rank().values
    expected = np.corrcoef(rx, ry)[0, 1]
    assert rho == pytest.approx(expected)
    perms = [np.corrcoef(rx, pd.Series(q).rank().values)[0, 1] for q in permutations(y)]
    assert p == pytest.approx(np.mean([r >= expected - 1e-12 for r in perms]))


def test_leaderboard_columns_order_failed_and_merge(sweep, tmp_path):
    board = leaderboard(load_sweep(sweep))
    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert len(board) == 15  # 5 methods x 3 ranks
    acc = board.accuracy_mean.tolist()
    assert acc == sorted(acc, reverse=True)
    proma64 = board[(board.method == "proma") & (board["rank"] == "64")].iloc[0]
    assert proma64.n_seeds == 2 and proma64.n_failed == 1  # the diverged run is counted, not dropped
    free16 = board[(board.method == "kl_free_lora") & (board["rank"] == "16")].iloc[0]
    assert free16.time_vs_kl_grpo == pytest.approx(50.5 / 60.5)
    assert free16.accuracy_std == pytest.approx(pd.Series(
        [json.loads((sweep / f"kl_free_lora_r16_s{s}" / "summary.json").read_text())["accuracy"] for s in (0, 1)]
    ).std(ddof=1))
    other = tmp_path / "other"
    _write_run(other, "kl_free_lora", 16, 7, accuracy=0.9, kl_ref=0.1, wall_clock_s=50.0)
    shutil.copytree(sweep / "kl_free_lora_r16_s0", other / "kl_free_lora_r16_s0")  # the same run in both sweeps
    merged = load_sweep(sweep, other)
    assert len(merged.notes) == 1 and "counted once" in merged.notes[0]
    row = leaderboard(merged).query("method == 'kl_free_lora' and rank == '16'").iloc[0]
    assert row.n_seeds == 3 and str(other) in row.sweeps


def test_claims_verdicts(sweep):
    claims = {c.claim.split(" (")[0][:20]: c for c in check_claims(load_sweep(sweep))}
    kl_rank = next(c for c in claims.values() if "grows with LoRA rank" in c.claim)
    assert kl_rank.verdict == "supported" and kl_rank.n == 6  # kl_ref proportional to rank in every seed
    faster = next(c for c in claims.values() if "faster" in c.claim)
    assert faster.verdict == "supported" and "6/6" in faster.statistic  # 50 s vs 60 s in all 6 pairs, p = 1/64
    proma = next(c for c in claims.values() if "PROMA" in c.claim)
    assert proma.verdict == "supported" and "0/6 proma runs" in proma.statistic
    geora = next(c for c in claims.values() if "GeoRA" in c.claim)
    assert geora.verdict in ("supported", "inconclusive") and "vs pissa" in geora.statistic


def test_report_files_and_bad_input(sweep, tmp_path):
    r = bench("report", str(sweep))
    assert r.returncode == 0, r.stderr
    for name in ("report.html", "tables.md", "claims.md", "summary.csv", "plots/kl_vs_rank.png",
                 "plots/accuracy_vs_kl.png", "plots/kl_step_curves.png", "plots/entropy_curves.png",
                 "plots/reward_curves.png", "plots/wall_clock_phases.png"):
        assert (sweep / name).is_file(), name
    html = (sweep / "report.html").read_text()
    assert html.count("<img ") == 6 and "data:image/png;base64," in html and "Run configuration" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    (sweep / "pissa_r4_s0" / "summary.json").write_text("{not json")
    (sweep / "junk_dir").mkdir()
    (sweep / "junk_dir" / "config.json").write_text("{}")
    r = bench("report", str(sweep))
    assert r.returncode == 1  # reported, but something was skipped
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("bench: skipped:")]
    assert any("pissa_r4_s0/summary.json: unreadable" in ln for ln in skipped)
    assert any("junk_dir/summary.json: missing" in ln for ln in skipped)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = bench("report", str(empty))
    assert r.returncode == 2 and "no run directories" in r.stderr and "nothing to report" in r.stderr
    r = bench("leaderboard", str(empty), "--csv", str(tmp_path / "lb.csv"))
    assert r.returncode == 2 and not (tmp_path / "lb.csv").exists()
    r = bench("leaderboard", str(sweep), "--csv", str(tmp_path / "lb.csv"))
    assert r.returncode == 1 and len(pd.read_csv(tmp_path / "lb.csv")) == 15


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None and os.environ.get("BENCH_REQUIRE_CHROMIUM") != "1",
                    reason="Chromium is absent (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(sweep, tmp_path):
    assert _chromium(), "BENCH_REQUIRE_CHROMIUM=1 but no chromium"
    write_report(sweep)
    url = (sweep / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=5000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import re
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    images = re.search(r'data-images="(\d+)/(\d+)"', body)
    tables = re.search(r'data-tables="(\d+)"', body)
    assert images and images.group(1) == images.group(2) == "6", body  # every image decoded in the browser
    expected = (sweep / "report.html").read_text().count("<table>")
    assert expected == 8 and tables and int(tables.group(1)) == expected, body  # claims, 6 metrics, runs not ok
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        colors = im.convert("L").getextrema()
        assert colors[0] < 100 < colors[1]  # not a blank page
    artifacts = os.environ.get("BENCH_ARTIFACTS")
    if artifacts:
        shutil.copy(shot, os.path.join(artifacts, "report_screenshot.png"))
    assert math.isfinite(shot.stat().st_size) and shot.stat().st_size > 20000
