"""A run killed (SIGKILL, as by the OOM killer or a scancel) at every phase boundary, then run again, ends exactly as
its uninterrupted twin: same metrics rows, same summary figures, same trained adapter. Each kill happens in a
child process, at a point chosen by patching it there only (tests/_kill_at.py)."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bench.io import read_json, read_jsonl
from bench.runner import run_one
from bench.spec import RunSpec

pytestmark = pytest.mark.slow

SPEC = dict(rank=4, steps=4, checkpoint_every=2, eval_size=12, probe_size=6, probe_every=1, kl_step_seqs=4,
            max_completion_length=48)
PHASES = ("before_first_checkpoint", "between_checkpoints", "while_saving_a_checkpoint", "after_last_checkpoint",
          "during_final_eval", "while_saving_the_adapter")
TIMING = {"step_seconds", "time_generation", "time_reference", "time_policy", "time_other", "time_metrics"}
FIGURES = ("steps_done", "accuracy", "accuracy_base", "accuracy_flexible", "kl_ref", "kl_ref_k3", "kl_step",
           "kl_step_max", "entropy", "entropy_base", "entropy_rollout", "reward", "reward_first", "eval_n")
KILLER = Path(__file__).with_name("_kill_at.py")


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "metrics.jsonl")]


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tiny):
    """The uninterrupted run of each method."""
    root = tmp_path_factory.mktemp("twins")
    return {m: (run_one(RunSpec(method=m, **SPEC), root / m, progress=False), root / m)
            for m in ("kl_free_lora", "proma")}


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("method", ["kl_free_lora", "proma"])
def test_killed_run_resumes_to_its_uninterrupted_twin(tmp_path, twins, method, phase):
    spec = RunSpec(method=method, **SPEC)
    run_dir = tmp_path / spec.run_id
    child = subprocess.run([sys.executable, str(KILLER), phase, str(run_dir), json.dumps(spec.to_dict())],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]  # it died where the phase says, not before
    assert not (run_dir / "summary.json").exists()
    resumed = run_one(spec, run_dir, progress=False)
    twin, twin_dir = twins[method]
    assert resumed["status"] == "ok", resumed.get("error")
    assert _rows(run_dir) == _rows(twin_dir)
    assert [r["step"] for r in _rows(run_dir)] == list(range(SPEC["steps"] + 1))  # never a step past the budget
    assert {k: resumed.get(k) for k in FIGURES} == {k: twin.get(k) for k in FIGURES}
    expected, got = _adapter(twin_dir), _adapter(run_dir)
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert not (run_dir / "checkpoints").exists()
    if phase in ("after_last_checkpoint", "during_final_eval", "while_saving_the_adapter"):
        assert resumed["resumed_from"] == f"checkpoint-{SPEC['steps']}"  # no training left: only eval and save


def test_run_that_fails_before_its_first_checkpoint_leaves_no_empty_checkpoints_folder(tmp_path, tiny):
    from methods import METHODS, Method

    def fail(trainer, params):
        raise RuntimeError("boom")
    METHODS["fail_test"] = Method(name="fail_test", summary="test only", trainer_hooks=(fail,))
    try:
        s = run_one(RunSpec(method="fail_test", **SPEC), tmp_path / "run", progress=False)
    finally:
        del METHODS["fail_test"]
    assert s["status"] == "failed" and "boom" in s["error"]
    assert read_json(tmp_path / "run" / "summary.json")["status"] == "failed"
    assert not (tmp_path / "run" / "checkpoints").exists()
