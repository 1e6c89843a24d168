"""bench.estimate: the arithmetic bound, the refusal of a sweep beyond the device (a 7B Llama's configuration on this
CPU: no weights needed), and the calibrated figure against a real run of the tiny model."""
import shutil

import pytest

from bench.errors import BenchError
from bench.estimate import MAX_RUN_HOURS, check_feasible, duration, estimate
from bench.io import read_jsonl
from bench.runner import run_one
from bench.spec import RunSpec


def test_duration_units():
    assert [duration(s) for s in (5, 600, 7200, 3 * 86400)] == ["5.0 s", "10.0 min", "2.0 h", "3.0 days"]


@pytest.fixture
def llama_7b(tmp_path, tiny):
    """Llama-2-7B's shape (config only) with the tiny model's tokenizer; an empty weights file passes the CLI's
    safetensors check, and nothing may load it."""
    from transformers import LlamaConfig
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, tmp_path / name)
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


def test_a_7b_model_on_cpu_is_refused_unless_yes(llama_7b):
    # 400 steps: beyond a day per run at any CPU's rate (at 40 steps an idle 2-core machine comes within a day)
    spec = RunSpec(method="kl_free_lora", rank=4, model=str(llama_7b), device="cpu", steps=400)
    est = estimate([spec], calibrate=True)  # too large to calibrate: the weights are never read
    assert est.step_s is None
    # 6 N T over the measured rate, N counted independently from Llama's shapes
    h, f, v, layers = 4096, 11008, 32000, 32
    n = 2 * v * h + layers * (4 * h * h + 3 * h * f + 2 * h) + h
    assert est.parameters == n
    tokens = 32 * (est.prompt_tokens + 64)
    assert est.least_step_s == pytest.approx(6 * n * tokens / est.flops, rel=1e-3)
    assert est.least_run_s > MAX_RUN_HOURS * 3600
    with pytest.raises(BenchError, match="beyond this device; use a GPU"):
        check_feasible(est, yes=False)
    check_feasible(est, yes=True)


def test_cli_refuses_in_one_line_with_exit_2(llama_7b, tmp_path, cli):
    out = cli("run", "--model", llama_7b, "--methods", "kl_free_lora", "--ranks", "4", "--device", "cpu",
              "--steps", "400", "--out", tmp_path / "sweep")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: error: at least ") and "--yes" in lines[0]
    assert "cost estimate: 1 run(s) to do x 400 steps" in out.stdout
    assert not list((tmp_path / "sweep").glob("*/config.json"))  # nothing ran


@pytest.mark.slow
def test_calibrated_estimate_is_near_a_real_tiny_run(tmp_path, tiny, monkeypatch):
    """The calibrated step time against the measured one of the same run, both on one thread (the calibration's).
    The estimate assumes full-budget completions (the tiny model's end near half of it) and times each phase once on
    a shared machine: within a factor of 5 either way, not better."""
    monkeypatch.setenv("BENCH_FORWARD_THREADS", "1")
    spec = RunSpec(method="kl_free_lora", rank=4, steps=4, eval_size=64, probe_every=100, checkpoint_every=100)
    est = estimate([spec])
    assert est.threads == 1 and est.step_s is not None and est.step_s > est.least_step_s
    summary = run_one(spec, tmp_path / "run", progress=False)
    assert summary["status"] == "ok", summary.get("error")
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    measured = sum(r["step_seconds"] + r["time_metrics"] for r in steps) / len(steps)
    print(f"estimated {est.step_s:.2f} s per step, measured {measured:.2f} s")
    assert measured / 5 < est.step_s < measured * 5
