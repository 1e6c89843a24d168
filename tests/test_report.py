"""Reports and leaderboards on synthetic sweeps and on real run directories with edited values: intervals in every
table, configurations never merged, the rank claim supported and (reversed) contradicted, old sweeps without
per-item records, reproducible output; and the rendered report.html opened in a real headless Chromium."""
import json
import math
import os
import shutil
import subprocess
from itertools import product

import numpy as np
import pandas as pd
import pytest

from bench import stats
from bench.report import LEADERBOARD_COLUMNS, leaderboard, load_sweep, write_report
from tests.test_cli import bench

OLD_COLUMNS = ["method", "rank", "n_seeds", "n_failed", "accuracy_mean", "accuracy_std", "accuracy_gain",
               "kl_ref_mean", "kl_step_mean", "entropy_final", "wall_clock_s", "time_vs_kl_grpo",
               "trainable_params", "peak_mem_mb", "sweeps"]


def _write_run(sweep, method, rank, seed, status="ok", spec_extra=None, **values):
    d = sweep / f"{method}_r{rank}_s{seed}"
    d.mkdir(parents=True)
    summary = {"run_id": d.name, "method": method, "rank": str(rank), "seed": seed, "status": status,
               "accuracy_base": 0.3, **values}
    if status == "ok":
        summary.setdefault("accuracy_gain", summary.get("accuracy", 0.3) - 0.3)
        summary.setdefault("eval_n", 100)
    (d / "summary.json").write_text(json.dumps(summary))
    spec = {"method": method, "rank": rank, "seed": seed, "steps": 4, "eval_size": 100, **(spec_extra or {})}
    (d / "config.json").write_text(json.dumps({"spec": spec, "versions": {"torch": "x"}, "git_sha": "abc"}))
    rows = [{"step": 0, "kl_ref": 0.0, "entropy_probe": 0.3}]
    for step in range(1, 5):
        rows.append({"step": step, "kl_step": values.get("kl_step", 1e-4) * step * (1 + 0.1 * seed),
                     "entropy": 0.3 - 0.01 * step, "reward": 0.3 + 0.02 * step})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _write_items(run_dir, correct):
    """eval_final.jsonl as runs write it: one object per eval item, in eval-split order."""
    rows = [{"id": f"synth-{i}", "prediction": "7", "completion": "... #### 7", "correct_strict": bool(c),
             "correct_flexible": bool(c), "completion_tokens": 12, "truncated": False} for i, c in enumerate(correct)]
    (run_dir / "eval_final.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


METHODS = (("kl_grpo", 1e-3, 60.0), ("kl_free_lora", 2e-3, 50.0), ("proma", 5e-4, 55.0), ("geora", 1e-3, 50.0),
           ("pissa", 3e-3, 50.0))


@pytest.fixture
def sweep(tmp_path):
    """5 methods x 3 ranks x 3 seeds, per-item records for every ok run, one diverged run."""
    s = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    for method, base_kl, t in METHODS:
        for rank, seed in product((4, 16, 64), (0, 1, 2)):
            acc = 0.4 + rng.uniform(-0.02, 0.02) + (0.02 if method == "geora" else 0.0)
            d = _write_run(s, method, rank, seed, accuracy=acc, kl_ref=base_kl * rank * (1 + 0.1 * seed),
                           kl_step=base_kl / 10 * (1 + 0.05 * seed), entropy=0.25, entropy_base=0.3,
                           wall_clock_s=t + seed, time_generation_s=t / 2, time_policy_s=t / 3,
                           time_reference_s=5.0 if method == "kl_grpo" else 0.0, time_other_s=1.0,
                           trainable_params=1000 * rank, peak_mem_mb=900.0)
            _write_items(d, rng.random(100) < acc)
    _write_run(s, "proma", 64, 3, status="diverged", error="loss not finite at step 3")
    return s


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_leaderboard_intervals_columns_failed_and_merge(sweep, tmp_path):
    board = leaderboard(load_sweep(sweep))
    assert list(board.columns) == LEADERBOARD_COLUMNS and LEADERBOARD_COLUMNS[:len(OLD_COLUMNS)] == OLD_COLUMNS
    for name in ("accuracy", "accuracy_gain", "kl_ref", "kl_step", "entropy_final", "wall_clock_s"):
        assert f"{name}_ci_low" in board.columns and f"{name}_ci_high" in board.columns
    assert len(board) == 15 and set(board.variant) == {""}  # 5 methods x 3 ranks, one configuration each
    acc = board.accuracy_mean.tolist()
    assert acc == sorted(acc, reverse=True)
    proma64 = board[(board.method == "proma") & (board["rank"] == "64")].iloc[0]
    assert proma64.n_seeds == 3 and proma64.n_failed == 1  # the diverged run is counted, not dropped
    free16 = board[(board.method == "kl_free_lora") & (board["rank"] == "16")].iloc[0]
    assert free16.time_vs_kl_grpo == pytest.approx(51.0 / 61.0)
    values = [_summary(sweep / f"kl_free_lora_r16_s{s}")["accuracy"] for s in (0, 1, 2)]
    assert free16.accuracy_std == pytest.approx(pd.Series(values).std(ddof=1))
    iv = stats.interval([values])  # the CSV's interval is the statistics module's, over the cell's seeds
    assert (free16.accuracy_ci_low, free16.accuracy_ci_high) == pytest.approx((iv.low, iv.high))
    assert free16.accuracy_ci_low <= free16.accuracy_mean <= free16.accuracy_ci_high
    other = tmp_path / "other"
    _write_run(other, "kl_free_lora", 16, 7, accuracy=0.9, kl_ref=0.1, wall_clock_s=50.0)
    shutil.copytree(sweep / "kl_free_lora_r16_s0", other / "kl_free_lora_r16_s0")  # the same run in both sweeps
    merged = load_sweep(sweep, other)
    assert len(merged.notes) == 1 and "counted once" in merged.notes[0]
    row = leaderboard(merged).query("method == 'kl_free_lora' and rank == '16'").iloc[0]
    assert row.n_seeds == 4 and str(other) in row.sweeps  # same settings: one configuration, merged
    for run in ("kl_grpo_r4_s0", "pissa_r16_s1"):
        (sweep / run / "config.json").unlink()  # unknown settings: still never merged across method or rank
    board = leaderboard(load_sweep(sweep))
    assert len(board) == 17 and board.query("method == 'pissa' and rank == '16'").n_seeds.tolist() == [2, 1]
    assert "config unknown" in set(board.variant)
    for config in sweep.glob("*/config.json"):
        config.unlink()  # no configuration known at all (e.g. summaries copied alone): one row per method x rank
    board = leaderboard(load_sweep(sweep))
    assert len(board) == 15 and set(board.variant) == {""} and set(board.n_seeds) == {3}


@pytest.mark.slow  # renders a report (plots)
def test_different_settings_never_merge(tmp_path, cli):
    """Two sweeps that differ only in --set grpo=... (and a third in --lr) stay apart, labelled by the setting."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for seed in (0, 1, 2):
        _write_run(a, "kl_free_lora", 16, seed, accuracy=0.40 + 0.01 * seed, kl_ref=0.01)
        _write_run(b, "kl_free_lora", 16, seed, accuracy=0.50 + 0.01 * seed, kl_ref=0.02,
                   spec_extra={"grpo": {"epsilon": 0.3}})
        _write_run(c, "kl_free_lora", 16, seed, accuracy=0.45, kl_ref=0.03, spec_extra={"lr": 5e-4})
    board = leaderboard(load_sweep(a, b, c))
    assert len(board) == 3 and list(board.n_seeds) == [3, 3, 3] and board.config_digest.nunique() == 3
    labels = set(board.variant)
    assert labels == {"grpo.epsilon=default, lr=0.001", "grpo.epsilon=0.3, lr=0.001", "grpo.epsilon=default, lr=0.0005"}
    eps = board[board.variant.str.startswith("grpo.epsilon=0.3")].iloc[0]
    assert eps.accuracy_mean == pytest.approx(0.51)
    for d in (b, c):
        for run in d.iterdir():
            shutil.copytree(run, a / (run.name + f"_{d.name}"))  # one directory holding all three
    r = cli("report", str(a))
    assert r.returncode == 0, r.stderr
    tables = (a / "tables.md").read_text()
    assert "| kl_free_lora (grpo.epsilon=0.3, lr=0.001) | 0.510 [" in tables
    assert "| kl_free_lora (grpo.epsilon=default, lr=0.001) | 0.410 [" in tables
    csv = pd.read_csv(a / "summary.csv")
    assert csv.config_digest.nunique() == 3 and csv.variant.nunique() == 3


@pytest.mark.slow  # renders a report (plots)
def test_cells_without_enough_seeds_say_so(tmp_path, cli):
    small = tmp_path / "small"
    _write_run(small, "kl_free_lora", 4, 0, accuracy=0.41, kl_ref=0.01)
    _write_run(small, "kl_free_lora", 4, 1, accuracy=0.43, kl_ref=0.02)
    _write_run(small, "kl_grpo", 4, 0, accuracy=0.40, kl_ref=0.01)
    r = cli("report", str(small))
    assert r.returncode == 0, r.stderr
    tables = (small / "tables.md").read_text()
    assert "| 0.420 [n < 3: no interval] (2) |" in tables and "| 0.400 [n < 3: no interval] (1) |" in tables
    board = leaderboard(load_sweep(small))
    assert board.accuracy_ci_low.isna().all()  # too few seeds: empty, not a made-up interval


@pytest.mark.slow  # renders a report (plots)
def test_old_sweep_without_item_records_and_corrupt_ones(sweep, cli):
    for f in sweep.glob("*/eval_final.jsonl"):
        f.unlink()  # a sweep from before per-item records
    r = cli("report", str(sweep))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    tables = (sweep / "tables.md").read_text()
    assert "Paired statistics skipped: no run has per-item eval records (eval_final.jsonl" in tables
    assert "[0." in tables  # the seed-level intervals are still there
    _write_items(sweep / "kl_free_lora_r4_s0", [1, 0, 1])
    (sweep / "kl_grpo_r4_s0" / "eval_final.jsonl").write_text(json.dumps({"id": "a", "correct_strict": "yes"}) + "\n")
    (sweep / "kl_grpo_r4_s1" / "eval_final.jsonl").write_text("[1, 2]\n")
    (sweep / "kl_grpo_r4_s2" / "eval_final.jsonl").write_text("{torn")
    r = cli("report", str(sweep))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # reported; three files skipped
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("bench: skipped:")]
    assert len(skipped) == 3 and all("eval_final.jsonl: unreadable" in ln for ln in skipped)
    assert "ok runs have no readable eval_final.jsonl" in (sweep / "tables.md").read_text()


@pytest.mark.slow  # renders a report (plots) and starts the CLI in a subprocess
def test_report_files_reproducible_and_bad_input(sweep, tmp_path, cli):
    r = cli("report", str(sweep))
    assert r.returncode == 0, r.stderr
    plots = ("kl_vs_rank", "accuracy_vs_kl", "kl_step_curves", "entropy_curves", "reward_curves",
             "performance_profile", "probability_of_improvement", "wall_clock_phases")
    for name in ("report.html", "tables.md", "claims.md", "summary.csv", *[f"plots/{p}.png" for p in plots]):
        assert (sweep / name).is_file(), name
    tables = (sweep / "tables.md").read_text()
    values = [_summary(sweep / f"geora_r4_s{s}")["accuracy"] for s in (0, 1, 2)]
    iv = stats.interval([values])
    assert f"| {np.mean(values):.3f} [{iv.low:.3f}, {iv.high:.3f}] (3) |" in tables  # mean [low, high] (n)
    assert f"{stats.RESAMPLES} resamples, seed {stats.SEED}" in tables  # the bootstrap is recorded
    assert "IQM" in tables and "P(improve accuracy)" in tables and "(baseline)" in tables
    assert "paired bootstrap over eval items" in tables and " pts |" in tables
    html = (sweep / "report.html").read_text()
    assert html.count("<img ") == 8 and "data:image/png;base64," in html and "Run configuration" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    first = {f: (sweep / f).read_text() for f in ("tables.md", "claims.md", "summary.csv")}
    # re-run in a fresh process (its own hash seed, so set and dict orders differ if anything depends on them)
    assert bench("report", str(sweep)).returncode == 0
    assert first == {f: (sweep / f).read_text() for f in first}  # identical when re-run (fixed bootstrap seed)
    assert cli("report", str(sweep), "--margin", "0").returncode == 2
    (sweep / "pissa_r4_s0" / "summary.json").write_text("{not json")
    (sweep / "junk_dir").mkdir()
    (sweep / "junk_dir" / "config.json").write_text("{}")
    r = cli("report", str(sweep))
    assert r.returncode == 1  # reported, but something was skipped
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("bench: skipped:")]
    assert any("pissa_r4_s0/summary.json: unreadable" in ln for ln in skipped)
    assert any("junk_dir/summary.json: missing" in ln for ln in skipped)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("report", str(empty))
    assert r.returncode == 2 and "no run directories" in r.stderr and "nothing to report" in r.stderr
    r = cli("leaderboard", str(empty), "--csv", str(tmp_path / "lb.csv"))
    assert r.returncode == 2 and not (tmp_path / "lb.csv").exists()
    r = cli("leaderboard", str(sweep), "--csv", str(tmp_path / "lb.csv"))
    assert r.returncode == 1 and len(pd.read_csv(tmp_path / "lb.csv")) == 15


def _claim_line(stdout, fragment):
    return next(ln for ln in stdout.splitlines() if fragment in ln)


def _rank_sweep(out, template, values):
    """3 ranks x 3 seeds of kl_free_lora from one run directory, with kl_ref[rank, seed] edited in."""
    for (rank, seed), kl in values.items():
        d = out / f"kl_free_lora_r{rank}_s{seed}"
        shutil.copytree(template, d)
        config = json.loads((d / "config.json").read_text())
        config["spec"].update(rank=rank, seed=seed)
        config.pop("spec_key", None)
        (d / "config.json").write_text(json.dumps(config))
        summary = json.loads((d / "summary.json").read_text())
        summary.update(run_id=d.name, rank=str(rank), seed=seed, kl_ref=kl)
        (d / "summary.json").write_text(json.dumps(summary))
        _write_items(d, np.random.default_rng(rank + seed).random(50) < 0.4)


def _rank_sweeps(template, tmp_path):
    grows = {(r, s): 1e-3 * r * (1 + 0.1 * s) for r, s in product((4, 16, 64), (0, 1, 2))}
    up, down = tmp_path / "up", tmp_path / "down"
    _rank_sweep(up, template, grows)
    _rank_sweep(down, template, {k: 1.0 / v for k, v in grows.items()})  # the same values, reversed in rank
    return up, down


def test_rank_claim_supported_and_reversed_contradicted(tmp_path):
    from bench.claims import check_claims
    template = _write_run(tmp_path / "template", "kl_free_lora", 4, 0, accuracy=0.41, kl_ref=0.01, entropy=0.25,
                          entropy_base=0.3, wall_clock_s=50.0)
    verdicts = []
    for out in _rank_sweeps(template, tmp_path):
        (claim,) = [c for c in check_claims(load_sweep(out).runs) if c.id == "kl_grows_with_rank"]
        verdicts.append((claim.verdict, claim.statistic.split(",")[0], claim.n))
    assert verdicts == [("supported", "kl_ref vs rank: Spearman rho = +0.95", 9),
                        ("contradicted", "kl_ref vs rank: Spearman rho = -0.95", 9)]


@pytest.mark.slow
def test_rank_claim_on_real_run_directories(tmp_path, tiny, cli):
    """The issue's must-hold: a real (tiny) run, copied to 3 ranks x 3 seeds with kl_ref edited: supported, and
    with kl_ref reversed, contradicted."""
    out = tmp_path / "real"
    r = cli("run", "--methods", "kl_free_lora", "--ranks", "4", "--steps", "1", "--eval-size", "8",
              "--set", "max_completion_length=40", "--set", "probe_size=4", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    template = out / "kl_free_lora_r4_s0"
    assert _summary(template)["status"] == "ok"
    lines = []
    for sweep_dir in _rank_sweeps(template, tmp_path):
        r = cli("report", str(sweep_dir))
        assert r.returncode == 0, r.stderr
        lines.append(_claim_line(r.stdout, "grows with LoRA rank"))
        assert "kl_ref vs rank: Spearman rho" in (sweep_dir / "claims.md").read_text()
    assert lines[0].startswith("  [supported]") and "rho = +0.95" in lines[0] and "n=9" in lines[0]
    assert lines[1].startswith("  [contradicted]") and "rho = -0.95" in lines[1]
    assert (tmp_path / "up" / "plots" / "kl_vs_rank.png").is_file()


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow  # renders the report in a browser
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
    assert images and images.group(1) == images.group(2) == "8", body  # every image decoded in the browser
    expected = (sweep / "report.html").read_text().count("<table>")
    # claims, learning rate and scaling per cell, 7 metrics (frac_truncated the 7th), trained tensors, across ranks,
    # shared eval items, runs not ok
    assert expected == 13 and tables and int(tables.group(1)) == expected, body
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
