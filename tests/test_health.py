"""frac_truncated and the one-line warnings of bench.health: the rule on hand-made rows, and live runs of the tiny model
with a budget far too small (warns) and with its own budget (does not)."""
import pytest

from bench.health import RunHealth
from bench.io import read_json, read_jsonl
from bench.runner import run_one
from bench.spec import RunSpec


def _feed(rows, **kw):
    health = RunHealth("r", budget=64, **kw)
    return [m for row in rows for m in health.check(row)]


def test_truncation_warns_once_above_half_and_never_at_half():
    assert _feed([{"step": 1, "frac_truncated": 0.5}, {"step": 3, "frac_truncated": 0.1}]) == []
    said = _feed([{"step": 1, "frac_truncated": 0.2}, {"step": 3, "frac_truncated": 0.75},
                  {"step": 5, "frac_truncated": 0.9}])
    assert len(said) == 1 and "step 3" in said[0] and "75%" in said[0] and "64-token" in said[0]


def test_zero_variance_warns_after_consecutive_generation_batches_only():
    gen = lambda step, z: {"step": step, "frac_reward_zero_std": z, "reward": 0.0}  # noqa: E731
    no_gen = lambda step: {"step": step, "loss": 0.0}  # noqa: E731  (an optimizer step without a new batch)
    # two in a row, a batch with variance, two more: no streak of three
    assert _feed([gen(1, 1.0), no_gen(2), gen(3, 1.0), gen(5, 0.5), gen(7, 1.0), gen(9, 1.0)]) == []
    said = _feed([gen(1, 1.0), no_gen(2), gen(3, 1.0), no_gen(4), gen(5, 1.0), gen(7, 1.0)])
    assert len(said) == 1 and "steps 1-5" in said[0] and "3 generation batches" in said[0]
    assert _feed([gen(1, 1.0), gen(3, 0.875), gen(5, 1.0)], zero_std_batches=2) == []


SMALL = dict(method="kl_free_lora", rank=4, steps=6, eval_size=4, probe_size=4, probe_every=100, kl_step_seqs=4,
             checkpoint_every=100, micro_batch=8, grad_accum=1, num_generations=8)


@pytest.mark.slow
@pytest.mark.parametrize("budget, warned", [(6, True), (64, False)])
def test_a_too_small_budget_warns_and_enough_does_not(tmp_path, tiny, capsys, budget, warned):
    spec = RunSpec(**SMALL, max_completion_length=budget)
    summary = run_one(spec, tmp_path / "run", progress=False)
    assert summary["status"] == "ok", summary.get("error")
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "frac_reward_zero_std" in r]
    assert [r["step"] for r in rows] == [1, 3, 5]  # a generation batch feeds two optimizer steps
    truncated = [r["frac_truncated"] for r in rows]
    assert all(0.0 <= t <= 1.0 for t in truncated)
    assert summary["frac_truncated"] == pytest.approx(sum(truncated) / len(truncated))
    err = capsys.readouterr().err
    log = (tmp_path / "run" / "run.log").read_text() if (tmp_path / "run" / "run.log").exists() else ""
    if warned:
        # the tiny model's shortest synth-gsm solution is far longer than 6 tokens: every completion is cut, no
        # completion can be right, every group has reward 0
        assert truncated == [1.0] * 3 and all(r["frac_reward_zero_std"] == 1.0 for r in rows)
        assert err.count("warning: ") == 2 and "6-token budget without EOS" in err and "nothing can learn" in err
        assert log.count("warning: ") == 2
        assert len(read_json(tmp_path / "run" / "summary.json")["warnings"]) == 2
    else:
        assert max(truncated) <= 0.5 and "warning: " not in err and "warning: " not in log
        assert "warnings" not in read_json(tmp_path / "run" / "summary.json")
