"""What a run directory holds decides what run_one does: skip, resume, re-run, or refuse
(bench.runner.check_run_dir)."""
import json

import pytest

from bench.errors import BenchError
from bench.io import read_json
from bench.runner import check_run_dir, run_one
from bench.spec import RunSpec

SPEC = RunSpec(method="kl_free_lora", rank=4, steps=2, eval_size=12, probe_size=6, probe_every=1, kl_step_seqs=4,
               checkpoint_every=2, max_completion_length=48)


def _config(run_dir, spec=SPEC):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"spec": spec.to_dict(), "spec_key": spec.key()}))


def test_empty_or_absent_directory_is_unfinished(tmp_path):
    assert check_run_dir(SPEC, tmp_path / "absent") is None
    assert check_run_dir(SPEC, tmp_path) is None


def test_finished_summary_is_returned(tmp_path):
    _config(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "ok", "accuracy": 0.5}))
    assert check_run_dir(SPEC, tmp_path) == {"status": "ok", "accuracy": 0.5}
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert check_run_dir(SPEC, tmp_path) is None  # a failed run is run again


@pytest.mark.parametrize("summary", ['{"status": "o', "", "[1, 2]", '"ok"'])
def test_cut_or_foreign_summary_is_an_unfinished_run(tmp_path, summary):
    _config(tmp_path)
    (tmp_path / "summary.json").write_text(summary)
    assert check_run_dir(SPEC, tmp_path) is None


@pytest.mark.parametrize("config", ['{"spec": {"meth', "", "[]", '{"spec": 3}'])
def test_cut_or_foreign_config_is_refused_naming_the_file(tmp_path, config):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(BenchError, match=r"config.json is unreadable .*move or delete that directory"):
        check_run_dir(SPEC, tmp_path)


def test_other_configuration_is_refused(tmp_path):
    _config(tmp_path, RunSpec(method="kl_free_lora", rank=4, steps=3))
    with pytest.raises(BenchError, match="different configuration"):
        check_run_dir(SPEC, tmp_path)


@pytest.mark.slow
def test_finished_run_with_a_cut_summary_is_run_again_to_the_same_figures(tmp_path, tiny):
    first = run_one(SPEC, tmp_path, progress=False)
    assert first["status"] == "ok"
    (tmp_path / "summary.json").write_text(json.dumps(first)[:40])  # cut by a full disk
    again = run_one(SPEC, tmp_path, progress=False)
    keys = ("status", "accuracy", "accuracy_base", "kl_ref", "kl_step", "entropy", "reward", "steps_done")
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}
    assert read_json(tmp_path / "summary.json")["status"] == "ok"
