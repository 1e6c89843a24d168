"""lm-eval on trained runs: the harness's greedy accuracy equals lm-eval's strict-match on the same items."""
import pytest

from bench.evaluate import evaluate_run, local_task_yaml
from bench.io import read_json
from bench.runner import run_one
from bench.spec import RunSpec
from tests.test_cli import assert_one_line_error

SMALL = dict(steps=2, probe_size=2, kl_step_seqs=2, max_completion_length=48, checkpoint_every=2)


def test_local_task_is_the_stock_gsm8k_task_on_local_data(tmp_path):
    from pathlib import Path

    import lm_eval
    import yaml
    stock = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    task = local_task_yaml("bench_x", tmp_path / "t.jsonl", 48)
    for key in ("doc_to_text", "doc_to_target", "filter_list", "metric_list", "output_type"):
        assert task[key] == stock[key], key
    assert task["generation_kwargs"]["until"] == stock["generation_kwargs"]["until"]
    assert task["generation_kwargs"]["max_gen_toks"] == 48 and task["num_fewshot"] == 0


@pytest.mark.parametrize("method", ["kl_free_lora", "geora"])
def test_harness_accuracy_equals_lm_eval_strict_match(tmp_path, tiny, method):
    spec = RunSpec(method=method, rank=8, eval_size=60, final_eval="lm-eval", **SMALL)
    s = run_one(spec, tmp_path / "run", progress=False)
    assert s["status"] == "ok", s.get("error")
    lm = s["lm_eval"]
    assert lm["n"] == 60 and lm["task"] == "bench_synth_gsm"
    assert abs(lm["strict_match"] - s["accuracy"]) <= 1 / 60 + 1e-9  # within one item
    assert abs(lm["flexible_extract"] - s["accuracy_flexible"]) <= 1 / 60 + 1e-9
    again = evaluate_run(tmp_path / "run", limit=20)  # bench eval: also written into summary.json
    assert again["n"] == 20 and read_json(tmp_path / "run" / "summary.json")["lm_eval"]["n"] == 20


def test_eval_bad_input(tmp_path, cli):
    assert_one_line_error(cli("eval", str(tmp_path)), "not a run directory")
