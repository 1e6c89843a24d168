"""bench.sweep: parallel local sweeps (worker processes) give the runs a sequential sweep gives, survive a killed
worker, and --jobs auto picks one run per core only for small models on CPU."""
import os
import signal
import threading
import time

import psutil
import pytest
import torch

from bench import sweep
from bench.io import read_json, read_jsonl
from bench.parallel import SMALL_MODEL_PARAMS, _parameter_count, auto_jobs, cpu_count, default_threads
from bench.spec import RunSpec
from bench.sweep import run_sweep

SMALL = dict(steps=2, eval_size=8, probe_size=4, probe_every=1, kl_step_seqs=4, checkpoint_every=2,
             max_completion_length=32)
TIMING = ("step_seconds", "time_generation", "time_reference", "time_policy", "time_other", "time_metrics")


def _specs(**kw):
    return [RunSpec(method=m, rank=4, **{**SMALL, **kw}) for m in ("kl_free_lora", "kl_grpo")]


def _measured(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.fixture
def one_thread(monkeypatch):
    """Both sides with one torch thread (CPU sums depend on it); workers inherit the environment."""
    monkeypatch.setenv("BENCH_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_parallel_sweep_equals_sequential(tmp_path, tiny, monkeypatch):
    """One thread per run on both sides (the default rule); the forward passes on two threads in the sequential
    sweep (as a run alone on two cores has them, parallel.forward_threads) and on one in the parallel one."""
    specs = _specs() + [RunSpec(method=m, rank=4, **SMALL) for m in ("proma_intra", "geora")]  # hooks; residual
    monkeypatch.setenv("BENCH_FORWARD_THREADS", "2")
    seq = run_sweep(specs, tmp_path / "seq", progress=False, jobs=1)
    monkeypatch.setenv("BENCH_FORWARD_THREADS", "1")  # the spawned workers inherit it
    par = run_sweep(specs, tmp_path / "par", progress=False, jobs=2)
    assert list(seq.status) == ["ok"] * 4 and list(par.status) == ["ok"] * 4
    for s in specs:
        assert _measured(tmp_path / "par" / s.run_id) == _measured(tmp_path / "seq" / s.run_id), s.run_id
        for side in ("seq", "par"):
            assert read_json(tmp_path / side / s.run_id / "config.json")["machine"]["torch_threads"] == 1
        seq_s, par_s = (read_json(tmp_path / side / s.run_id / "summary.json") for side in ("seq", "par"))
        assert (seq_s["forward_threads"], par_s["forward_threads"]) == (2, 1)
        assert (seq_s["decode_threads"], par_s["decode_threads"]) == (2, 1)  # pinned: decoding on two threads too
        for key in ("accuracy_base", "accuracy", "kl_ref", "kl_step", "entropy", "reward"):
            assert seq_s[key] == par_s[key], key
    assert (tmp_path / "par" / "summary.csv").is_file() and (tmp_path / "par" / "tables.md").is_file()
    # the same sweep again: every run is finished, so no worker pool is started and no run directory is touched
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "par").rglob("*") if p.is_file() and p.parent.name != "par"}

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started for a finished sweep")
    monkeypatch.setattr(sweep, "_run_parallel", no_pool)
    again = run_sweep(specs, tmp_path / "par", progress=False, jobs=2)
    assert list(again.run_id) == list(par.run_id) and list(again.status) == ["ok"] * 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_killed_worker_does_not_stop_the_sweep(tmp_path, tiny, one_thread):
    specs = _specs(steps=6, checkpoint_every=2)
    out = tmp_path / "sweep"
    result = {}
    thread = threading.Thread(target=lambda: result.update(df=run_sweep(specs, out, progress=False, jobs=2)))
    thread.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and thread.is_alive():
        started = [s for s in specs if (out / s.run_id / "metrics.jsonl").is_file()
                   and len(read_jsonl(out / s.run_id / "metrics.jsonl")) >= 2]
        workers = [p for p in psutil.Process().children(recursive=True) if "python" in p.name().lower()
                   and p.cpu_times().user > 1.0]  # the pool's workers (not the resource tracker)
        if started and workers:
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "no worker was caught mid-run"
    df = result["df"]
    assert sorted(df.status) == ["ok", "ok"], df[["run_id", "status", "error"]]
    for s in specs:
        assert [r["step"] for r in read_jsonl(out / s.run_id / "metrics.jsonl")] == list(range(7))


def test_auto_jobs_small_model_on_cpu_uses_every_core(tiny):
    specs = [RunSpec(method="kl_free_lora", rank=r) for r in (4, 8, 16, 32)]
    assert auto_jobs(specs) == min(cpu_count(), len(specs))
    assert auto_jobs(specs[:1]) == 1
    assert default_threads(specs) == 1 and default_threads(specs[:1]) == 1  # alone or side by side: same numbers


def test_auto_jobs_large_model_runs_one_at_a_time(tmp_path):
    from transformers import Qwen3Config
    config = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
    config.save_pretrained(tmp_path / "qwen3-0.6b-shaped")
    count = _parameter_count(config)
    assert 5.5e8 < count < 6.5e8  # Qwen3-0.6B: 0.6B parameters (0.44B without embeddings)
    assert count > SMALL_MODEL_PARAMS
    specs = [RunSpec(method="kl_free_lora", rank=4, model=str(tmp_path / "qwen3-0.6b-shaped"), seed=s)
             for s in range(4)]
    assert auto_jobs(specs) == 1
    assert default_threads(specs) is None  # torch's default: every core for the one run


def test_parameter_count_matches_the_built_model(tiny):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert _parameter_count(AutoConfig.from_pretrained(tiny)) == sum(p.numel() for p in model.parameters())


def test_cpu_count_respects_a_slurm_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cores = cpu_count()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # a task/none cluster lets the task see every core
    assert cpu_count() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cores + 8))  # never more than the affinity allows
    assert cpu_count() == cores
