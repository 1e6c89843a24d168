"""bench.results: the one run-record schema and the one loader. Fast (no model): the schema against the summary.csv
and leaderboard columns that sweeps on disk already have, the runner's summary against the schema, and the loader
on an old-format sweep, on damaged files and on a sweep being run."""
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from bench import results
from bench.results import FIELDS, LEADERBOARD_COLUMNS, SUMMARY_COLUMNS, load_sweep, read_summary
from bench.spec import RunSpec

# summary.csv's columns before the schema was declared in one place (sweep directories on disk have them)
V1_SUMMARY_COLUMNS = ["run_id", "method", "rank", "seed", "status", "accuracy_base", "accuracy", "accuracy_gain",
                      "kl_ref", "kl_ref_k3", "kl_step", "kl_step_max", "entropy", "entropy_base", "entropy_rollout",
                      "reward", "reward_first", "wall_clock_s", "time_generation_s", "time_reference_s",
                      "time_policy_s", "time_other_s", "time_metrics_s", "tokens_per_s", "peak_mem_mb",
                      "trainable_params", "trained_set", "init_kl_to_base", "steps_done", "run_seconds", "error"]


def test_summary_and_leaderboard_columns_are_those_on_disk():
    assert SUMMARY_COLUMNS[:len(V1_SUMMARY_COLUMNS)] == V1_SUMMARY_COLUMNS  # new columns only after the old ones
    assert LEADERBOARD_COLUMNS[:17] == ["method", "rank", "n_seeds", "n_failed", "accuracy_mean", "accuracy_std",
                                        "accuracy_gain", "kl_ref_mean", "kl_step_mean", "entropy_final",
                                        "wall_clock_s", "time_vs_kl_grpo", "trainable_params", "peak_mem_mb",
                                        "sweeps", "variant", "config_digest"]
    assert len(FIELDS) == len(results.RUN_FIELDS)  # no field declared twice
    assert all(f.kind in (results.TEXT, results.NUMBER, results.FLAG, results.JSON) and f.help
               for f in results.RUN_FIELDS)


def test_the_runners_summary_uses_declared_fields_only():
    """summarize() (the runner's summary of a finished training) on hand-made inputs: every key it writes is a
    declared field, or the method's own."""
    import torch

    from bench.runner import Prepared, _aggregate, summarize
    policy = torch.nn.Linear(2, 2)
    prep = Prepared(method=None, params={}, policy=policy, tokenizer=None, to_prompt=str, residual=False,
                    init_seconds=0.1, init_kl={"init_kl_to_base": 1e-6, "init_kl_to_base_tokens": 40})
    rows = [{"step": 0, "kl_ref": 0.0, "kl_ref_k3": 0.0, "entropy_probe": 0.3},
            *({"step": s, "kl_step": 1e-4, "entropy": 0.3, "reward": 0.5, "time_generation": 1.0, "tokens": 10,
               "step_seconds": 2.0} for s in (1, 2)),
            {"step": 2, "kl_ref": 1e-3, "kl_ref_k3": 1e-3, "entropy_probe": 0.29}]
    evals = {"accuracy": 0.5, "accuracy_flexible": 0.6, "n": 8, "memoized": False}
    out = summarize(rows, evals, evals, prep, device="cpu", threads=1, checkpoint=None,
                    seconds={"eval": 1.0, "init": 0.1, "setup": 2.0}, method_summary={"proma_calls": 3})
    assert results.undeclared(out, {"proma_calls"}) == []
    assert results.undeclared(_aggregate(rows)) == []
    assert out["trainable_params"] == 6 and out["accuracy_gain"] == 0.0 and out["proma_calls"] == 3
    assert results.undeclared({**out, "surprise": 1}, {"proma_calls"}) == ["surprise"]  # the check can fail
    spec = RunSpec(method="kl_free_lora", rank=4)
    assert results.undeclared(results.outcome(spec, "failed", "x")) == []
    assert list(results.identity(spec)) == SUMMARY_COLUMNS[:4]


def _old_run(sweep: Path, method: str, **extra) -> Path:
    """A run directory as sweeps before the schema wrote it (an integer rank, no eval_n, no per-item records)."""
    spec = RunSpec(method=method, rank=4, steps=4)
    d = sweep / spec.run_id
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"run_id": spec.run_id, "method": method, "rank": 4, "seed": 0,
                                                "status": "ok", "accuracy_base": 0.3, "accuracy": 0.4,
                                                "accuracy_gain": 0.1, "kl_ref": 1e-3, "wall_clock_s": 5, **extra}))
    (d / "config.json").write_text(json.dumps({"spec": spec.to_dict(), "spec_key": spec.key()}))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "kl_ref": 0.0}) + "\n")
    return d


def test_loader_reads_old_sweeps_and_names_damaged_files(tmp_path):
    sweep = tmp_path / "old"
    _old_run(sweep, "kl_free_lora")
    _old_run(sweep, "kl_grpo", steps_done=4)
    (_old_run(sweep, "proma") / "summary.json").write_text('{"run_id": "pro')     # cut by a crash
    (sweep / "geora_r4_s0").mkdir()
    (sweep / "geora_r4_s0" / "config.json").write_text("{}")                         # started, not finished
    loaded = load_sweep(sweep)
    runs = loaded.runs
    assert sorted(runs.method) == ["kl_free_lora", "kl_grpo"]
    assert list(runs["rank"]) == ["4", "4"] and runs.accuracy.dtype.kind == "f" and runs.seed.dtype.kind in "iu"
    assert runs.eval_n.isna().all() and set(runs.config_digest.str.len()) == {12}
    assert sorted(loaded.curves) == sorted(runs.key) and loaded.items == {}
    proma, geora = sweep / "proma_r4_s0" / "summary.json", sweep / "geora_r4_s0" / "summary.json"
    assert loaded.problems == [f"{geora}: missing (run not finished)",
                               f"{proma}: unreadable (JSONDecodeError: truncated or not JSON)"]
    # a sweep being run (bench collect, bench run): unfinished runs are not problems
    assert load_sweep(sweep, unfinished=False).problems == [loaded.problems[1]]
    assert read_summary(proma) == (None, "unreadable (JSONDecodeError: truncated or not JSON)")
    assert read_summary(sweep / "nothing.json") == (None, None)
    assert read_summary(sweep / "kl_grpo_r4_s0" / "summary.json")[0]["steps_done"] == 4


def test_collect_writes_the_declared_columns(tmp_path):
    from bench.tables import collect
    sweep = tmp_path / "old"
    _old_run(sweep, "kl_free_lora")
    _old_run(sweep, "kl_grpo", error=None)
    df = collect(sweep)
    table = pd.read_csv(sweep / "summary.csv")
    assert list(table.columns) == SUMMARY_COLUMNS + ["config_digest", "variant", "lr", "lora_scaling", "lr_tuned",
                                                     "tuning_trials"] and len(df) == 2
    assert list(table["rank"]) == [4, 4] and list(table.accuracy) == [0.4, 0.4]


def test_crash_record_is_a_loadable_summary(tmp_path):
    from bench.sweep import _record_crash
    spec = RunSpec(method="kl_free_lora", rank=4)
    summary = _record_crash(spec, tmp_path)
    assert summary["status"] == "failed" and "worker process died" in summary["error"]
    assert read_summary(tmp_path / spec.run_id / "summary.json") == (summary, None)
    assert list(load_sweep(tmp_path).runs.status) == ["failed"]


def test_contract_ordering_without_a_model():
    """wrap_compute_loss nests wrappers, the last one outermost (as successive replacements of compute_loss did)."""
    from bench.engine import BenchGRPOTrainer
    calls = []
    fake = SimpleNamespace(_loss_wrappers=[], forward_threads=None, capture_before_backward=False,
                           _threaded_compute_loss=lambda model, inputs: calls.append("trl") or inputs["x"])

    def wrapper(tag):
        def wrap(compute_loss, model, inputs):
            calls.append(f"{tag}>")
            out = compute_loss(model, {"x": inputs["x"] + 1})
            calls.append(f"<{tag}")
            return out
        return wrap
    BenchGRPOTrainer.wrap_compute_loss(fake, wrapper("a"))
    BenchGRPOTrainer.wrap_compute_loss(fake, wrapper("b"))
    assert BenchGRPOTrainer.compute_loss(fake, None, {"x": 0}) == 2
    assert calls == ["b>", "a>", "trl", "<a", "<b"]
