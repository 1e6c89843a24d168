"""bench run --tune: the learning-rate grid, the selection rule on constructed trial results (checked against an
independent pandas ranking), dev splits that never overlap eval, trial and final specs, and a tiny end-to-end tune."""
import json
import math
import random

import pandas as pd
import pytest

from bench.errors import BenchError
from bench.spec import RunSpec
from bench.tune import RULES, Trial, TuneConfig, parse_config, parse_grid, plan, select
from tasks import get_task
from tasks.base import Example
from tasks.gsm8k import dev_split

# ---- the grid ----------------------------------------------------------------------------------------------------

def test_default_grid_is_five_half_decades_around_the_lr():
    assert parse_grid(None, 1e-3) == (1e-4, 3.162e-4, 1e-3, 3.162e-3, 1e-2)
    assert parse_grid("auto", 2e-5) == pytest.approx((2e-6, 6.325e-6, 2e-5, 6.325e-5, 2e-4))


def test_grid_range_and_list():
    assert parse_grid("1e-4:1e-2:3", 1) == (1e-4, 1e-3, 1e-2)
    assert parse_grid("3e-3, 1e-3", 1) == (1e-3, 3e-3)  # ascending


@pytest.mark.parametrize("text,fragment", [("1e-3,-1", "not a finite number > 0"), ("1e-2:1e-4:3", "LOW < HIGH"),
                                           ("1e-4:1e-2:1", "N >= 2"), ("1:2", "LOW:HIGH:N"),
                                           ("0.001,0.0010000001", "print alike"), ("abc", "not a finite")])
def test_bad_grids_are_refused(text, fragment):
    with pytest.raises(BenchError, match=fragment):
        parse_grid(text, 1e-3)


def test_config_and_budget():
    specs = [RunSpec("kl_free_lora", 16, steps=40)]
    cfg = parse_config({"lr_grid": "1e-4,1e-3", "tune_seeds": "7,8"}, specs)
    assert (cfg.grid, cfg.trial_steps, cfg.trial_seeds, cfg.trials) == ((1e-4, 1e-3), 40, (7, 8), 4)
    assert parse_config({}, specs).trial_seeds == (1000,)
    with pytest.raises(BenchError, match="bad --tune-metric"):
        parse_config({"tune_metric": "kl"}, specs)
    with pytest.raises(BenchError, match="bad --tune-steps"):
        parse_config({"tune_steps": "0"}, specs)


# ---- selection -----------------------------------------------------------------------------------------------------

def _t(lr, acc, kl, seed=0, status="ok", reward=math.nan):
    return Trial(lr, seed, status, acc, kl, reward)


def test_best_dev_accuracy_wins():
    sel = select([_t(1e-4, 0.30, 0.01), _t(1e-3, 0.42, 0.20), _t(1e-2, 0.35, 1.0)])
    assert sel.lr == 1e-3 and "best mean dev accuracy 0.42" in sel.reason


def test_ties_go_to_the_lower_kl_then_the_smaller_lr():
    sel = select([_t(1e-4, 0.40, 0.05), _t(1e-3, 0.40, 0.02), _t(1e-2, 0.38, 0.001)])
    assert sel.lr == 1e-3 and "tied at lr 0.0001, 0.001" in sel.reason and "kl_ref 0.02" in sel.reason
    sel = select([_t(3e-4, 0.40, 0.02), _t(1e-3, 0.40, 0.02)])
    assert sel.lr == 3e-4 and "still tied: the smaller lr" in sel.reason


def test_tie_is_over_the_seed_mean():
    """0.1 + 0.2 and 0.2 + 0.1 (float sums in another order) tie; the mean over seeds decides, not one seed."""
    trials = [_t(1e-4, 0.1, 0.03, 0), _t(1e-4, 0.2, 0.03, 1), _t(1e-3, 0.2, 0.01, 0), _t(1e-3, 0.1, 0.01, 1),
              _t(1e-2, 0.3, 0.5, 0), _t(1e-2, 0.0, 0.5, 1)]
    assert select(trials).lr == 1e-3


def test_a_diverged_or_failed_lr_is_not_eligible():
    sel = select([_t(1e-3, 0.40, 0.02), _t(1e-2, 0.50, 0.5, 0), _t(1e-2, math.nan, math.nan, 1, "diverged")])
    assert sel.lr == 1e-3
    assert select([_t(1e-3, math.nan, math.nan, status="failed")]).lr is None
    missing = select([_t(1e-3, 0.4, 0.1), Trial(1e-2, 0, "missing")])
    assert missing.lr is None and "not finished" in missing.reason


def test_reward_metric():
    trials = [_t(1e-4, 0.5, 0.01, reward=0.2), _t(1e-3, 0.3, 0.01, reward=0.6)]
    assert select(trials, "reward").lr == 1e-3 and select(trials, "accuracy").lr == 1e-4


def _reference(trials: list[Trial], metric: str) -> float | None:
    """The rule as a pandas ranking: eligible lrs (every trial ok), sort by mean metric desc, mean kl asc, lr asc."""
    df = pd.DataFrame([t.__dict__ for t in trials])
    g = df.groupby("lr")
    ok = g.status.apply(lambda s: (s == "ok").all())
    table = pd.DataFrame({"score": g[metric].mean(), "kl": g.kl_ref.mean(), "ok": ok}).reset_index()
    table = table[table.ok]
    if table.empty:
        return None
    table["score"] = table.score.round(9)  # ties as the rule sees them (means of k/20 differ by >= 1/40)
    return float(table.sort_values(["score", "kl", "lr"], ascending=[False, True, True]).iloc[0].lr)


def test_selection_matches_an_independent_ranking_on_random_trials():
    rng = random.Random(0)
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    for _ in range(500):
        trials = []
        for lr in grid:
            for seed in range(2):
                status = rng.choices(["ok", "diverged", "failed"], [0.85, 0.1, 0.05])[0]
                acc = rng.randint(0, 20) / 20 if status == "ok" else math.nan  # coarse: many ties
                kl = rng.choice([0.01, 0.02, 0.05]) if status == "ok" else math.nan
                trials.append(_t(lr, acc, kl, seed, status))
        assert select(trials).lr == _reference(trials, "accuracy")


# ---- dev never overlaps eval ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{}, {"seed": 3}, {"seed": 1, "max_number": 6, "max_steps": 1, "n_train": 50,
                                                         "n_eval": 60, "n_dev": 40}])
def test_synth_gsm_dev_never_overlaps_eval_or_trial_training(params):
    task = get_task("synth-gsm", **params)
    dev, evals = task.examples("dev"), task.examples("eval")
    assert dev and not {e.question for e in dev} & {e.question for e in evals}
    train = task.training_examples("dev")
    assert not {e.question for e in train} & {e.question for e in dev}
    assert task.training_examples("eval") == task.examples("train")


def _jsonl(path, questions):
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n" for i, q in enumerate(questions)))


def test_gsm8k_dev_is_carved_from_train_without_eval_items(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [f"train {i}" for i in range(95)] + ["shared 1", "shared 2"] +
           [f"train {i}" for i in range(95, 98)])
    _jsonl(tmp_path / "test.jsonl", ["shared 1", "shared 2", "test 1"])
    task = get_task("gsm8k", data=str(tmp_path))
    dev = [e.question for e in task.examples("dev")]
    # the last min(500, 100 // 10) = 10 train records, less the two also in test
    assert dev == [f"train {i}" for i in range(90, 95)] + [f"train {i}" for i in range(95, 98)]
    assert not set(dev) & {e.question for e in task.examples("eval")}
    trial_train = [e.question for e in task.training_examples("dev")]
    assert len(trial_train) == 100 - 8 and not set(trial_train) & set(dev)
    assert len(task.training_examples("eval")) == 100  # final runs train on all of train
    assert get_task("gsm8k", data=str(tmp_path), n_dev=0).examples("dev") == []


def test_gsm8k_real_dev_split(gsm8k_dir):
    task = get_task("gsm8k", data=str(gsm8k_dir))
    dev, evals, train = task.examples("dev"), task.examples("eval"), task.examples("train")
    assert len(dev) <= 500 and len(dev) >= 490
    assert not {e.question.strip() for e in dev} & {e.question.strip() for e in evals}
    assert {e.question for e in dev} <= {e.question for e in train}


def test_dev_split_helper_caps_at_a_tenth():
    train = [Example(f"q{i}", "#### 1") for i in range(30)]
    assert [e.question for e in dev_split(train, [], 500)] == ["q27", "q28", "q29"]


# ---- trial and final specs -----------------------------------------------------------------------------------------

def test_plan_trials_are_dev_runs_per_lr_and_seed_apart_from_the_finals():
    specs = [RunSpec("kl_free_lora", r, seed=s, lora_scaling=sc) for r in (16, 64) for sc in ("rank", "fixed:16")
             for s in (0, 1, 2)]
    cfg = TuneConfig((1e-4, 1e-3), 5, (1000,))
    grouped, trials = plan(specs, cfg)
    assert len(grouped) == 4 and len(trials) == 4 * cfg.trials
    assert all(t.eval_split == "dev" and t.steps == 5 and t.seed == 1000 and not t.tuning for t in trials)
    assert len({t.run_id for t in trials}) == len(trials)
    assert "kl_free_lora_r64_s1000_fixed16_lr0.0001_dev" in {t.run_id for t in trials}
    assert cfg.protocol()["trials"] == 2 and cfg.protocol()["rule"] == RULES["accuracy"]


# ---- end to end ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_tune_end_to_end(tmp_path, tiny, capsys):
    from bench.cli import main
    from bench.io import read_json
    from bench.report import leaderboard, load_sweep
    out = tmp_path / "tune"
    argv = ["run", "--tune", "--methods", "kl_free_lora", "--ranks", "4", "--steps", "2", "--lr-grid", "1e-3,3e-3",
            "--tune-steps", "2", "--eval-size", "8", "--set", "probe_size=4", "--set", "kl_step_seqs=4",
            "--set", "max_completion_length=32", "--set", "checkpoint_every=2", "--out", str(out), "--no-progress",
            "--jobs", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "selection rule: highest mean dev accuracy" in printed
    selection = read_json(out / "tuning" / "selection.json")
    (cell,) = selection["cells"]
    assert {t["run_id"] for t in cell["trials"]} == {"kl_free_lora_r4_s1000_lr0.001_dev",
                                                     "kl_free_lora_r4_s1000_lr0.003_dev"}
    # the selection follows the rule on the trials' own summaries
    trials = [Trial(**t) for t in cell["trials"]]
    assert cell["lr"] == select(trials).lr is not None
    dev = {e.question for e in get_task("synth-gsm").examples("dev")}
    for t in cell["trials"]:
        config = read_json(out / "tuning" / t["run_id"] / "config.json")
        assert config["spec"]["eval_split"] == "dev"
        items = [json.loads(x) for x in (out / "tuning" / t["run_id"] / "eval_final.jsonl").read_text().splitlines()]
        assert len(items) == 8
    final = read_json(out / "kl_free_lora_r4_s0" / "config.json")["spec"]
    assert final["lr"] == cell["lr"] and final["eval_split"] == "eval" and final["tuning"]["trials"] == 2
    board = leaderboard(load_sweep(out))
    assert board.lr_tuned.tolist() == [True] and board.tuning_trials.tolist() == [2]
    assert "(tuned, 2 trials)" in (out / "tables.md").read_text()
    # resumable: the same command again runs nothing new and selects the same rate
    assert main(argv) == 0
    assert read_json(out / "tuning" / "selection.json")["cells"][0]["lr"] == cell["lr"]
    assert dev  # the dev split exists (the trials evaluated on its first 8 items)


def test_slurm_tune_submits_trials_then_the_final_runs(tmp_path, capsys):
    """--executor slurm: the first call submits the trials as an array and stops; once the trials are finished the
    same command selects the rates and submits the final runs (both through bench run's submit_to_slurm)."""
    import argparse

    from bench.io import atomic_write_json
    from bench.tune import cmd_tune
    submitted = []

    def fake_submit(args, specs, out):
        submitted.append((out.name, sorted(s.run_id for s in specs), args.resume))
        return 0
    out = tmp_path / "sweep"
    specs = [RunSpec("kl_free_lora", 4, seed=s) for s in (0, 1)]
    options = {"lr_grid": "1e-3,3e-3", "tune_steps": "2", "tune_seeds": None, "tune_metric": None}
    args = argparse.Namespace(executor="slurm", no_progress=True, jobs="auto", resume=False, wait=False)
    assert cmd_tune(args, options, specs, out, submit=fake_submit) == 0
    trial_ids = ["kl_free_lora_r4_s1000_lr0.001_dev", "kl_free_lora_r4_s1000_lr0.003_dev"]
    assert submitted == [("tuning", trial_ids, True)]
    assert "re-run this command when they are finished" in capsys.readouterr().out
    for run_id, acc in zip(trial_ids, (0.30, 0.35)):  # the trials finish (as the array tasks would write them)
        spec = next(t for t in plan(specs, parse_config(options, specs))[1] if t.run_id == run_id)
        atomic_write_json(out / "tuning" / run_id / "config.json", {"spec": spec.to_dict(), "spec_key": spec.key()})
        atomic_write_json(out / "tuning" / run_id / "summary.json",
                          {"run_id": run_id, "method": "kl_free_lora", "rank": "4", "seed": 1000, "status": "ok",
                           "accuracy": acc, "kl_ref": 0.01})
    submitted.clear()
    assert cmd_tune(args, options, specs, out, submit=fake_submit) == 0
    assert submitted == [("sweep", ["kl_free_lora_r4_s0", "kl_free_lora_r4_s1"], True)]
    assert "| 0.003 |" in (out / "tuning" / "selection.md").read_text()


def test_tables_leaderboard_and_claims_of_a_tuned_sweep(tmp_path):
    """Tuned runs (a different lr per rank, one protocol) share their method's row and the claims' context; the lr
    table says tuned with the budget; an untuned two-method sweep gets the warning, a tuned one does not."""
    from bench.claims import check_claims
    from bench.report import leaderboard, load_sweep, write_report
    from tests.test_report import _write_run
    protocol = TuneConfig((1e-4, 1e-3, 1e-2), 10, (1000,)).protocol()
    lrs = {4: 1e-2, 16: 1e-3, 64: 1e-4}
    for tuned, folder in ((True, tmp_path / "tuned"), (False, tmp_path / "untuned")):
        for method in ("kl_free_lora", "kl_grpo"):
            for rank in (4, 16, 64):
                for seed in range(3):
                    extra = {"lr": lrs[rank], "tuning": protocol} if tuned else {"lr": 1e-3}
                    _write_run(folder, method, rank, seed, spec_extra=extra, accuracy=0.4 + 0.01 * seed,
                               kl_ref=0.001 * rank * (1 + 0.1 * seed), wall_clock_s=10.0 + seed)
    sweep = load_sweep(tmp_path / "tuned")
    assert set(sweep.runs.variant) == {""} and sweep.runs.context.nunique() == 1
    board = leaderboard(sweep)
    assert len(board) == 6 and board.lr_tuned.all() and (board.tuning_trials == 3).all()
    assert dict(zip(board["rank"].astype(str), board.lr)) == {"4": 1e-2, "16": 1e-3, "64": 1e-4}
    (rank_claim,) = [c for c in check_claims(sweep.runs) if c.id == "kl_grows_with_rank"]
    assert rank_claim.verdict == "supported"  # pairs across ranks although the lr differs by rank
    _, info = write_report(tmp_path / "tuned")
    tables = (tmp_path / "tuned" / "tables.md").read_text()
    assert "| kl_free_lora | rank | 0.01 (tuned, 3 trials) | 0.001 (tuned, 3 trials) | 0.0001 (tuned, 3 trials) |" \
        in tables
    assert "Tuning budget: 3 trials: lr in {0.0001, 0.001, 0.01} x 1 seed(s) x 10 steps" in tables
    assert not info["warning"] and "**Warning**" not in tables
    _, info = write_report(tmp_path / "untuned")
    assert "not tuned per method x rank" in info["warning"]
    assert "**Warning**" in (tmp_path / "untuned" / "claims.md").read_text()
    assert "0.001 (set)" in (tmp_path / "untuned" / "tables.md").read_text()


@pytest.mark.parametrize("argv,fragment", [
    (["--lr-grid", "1e-3"], "--lr-grid: only with --tune"),
    (["--tune-seeds", "1"], "--tune-seeds: only with --tune"),
    (["--tune", "--lr-grid", "x"], "bad --lr-grid value: 'x' is not a finite number > 0"),
    (["--tune", "--tune-seeds", "1,1"], "a seed listed twice")])
def test_bad_tune_options_are_one_line_exit_2(tmp_path, capsys, argv, fragment):
    from bench.cli import main
    out = tmp_path / "out"
    assert main(["run", "--methods", "kl_free_lora", "--ranks", "4", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and not out.exists()
