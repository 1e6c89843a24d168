"""Multi-process runs (bench.distributed): 2 processes over gloo on CPU, on the embedded model.

- a 2-process run completes through the harness, rank 0 alone writes whole files (its TensorBoard events
  included), and world size is recorded;
- with the rollouts fixed (tests/_ddp_fixed.py: the same completions whatever the process layout, one optimizer step
  per generation batch) the 2-process run matches the 1-process run with the same global batch, step by step;
- DDP's wrap gives every rank rank 0's weights, the frozen residual base weights of an SVD init included;
- a failing process makes the run `failed` and the sweep goes on;
- refusals are one line and exit code 2.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import distributed, engine
from bench.io import read_json, read_jsonl
from bench.runner import run_one
from bench.spec import RunSpec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture
def worker_env(monkeypatch):
    """The ranks import bench from this checkout and the helper scripts from tests/."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("BENCH_EVAL_MEMO", "0")


def spec(**kw) -> RunSpec:
    base = dict(method="kl_free_lora", rank=4, steps=4, eval_size=10, probe_every=1, checkpoint_every=2)
    return RunSpec(**{**base, **kw})


# kl_free_lora: test_two_processes_match_one_process_with_fixed_rollouts (CI time)
@pytest.mark.parametrize("method", ["proma", "geora"])
def test_two_process_run_completes_and_rank0_writes_whole_files(tmp_path, tiny, worker_env, method):
    """...and reports to TensorBoard from rank 0 only (where tensorboard is installed: the test extra has it)."""
    from bench.trackers import make_tracking
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    s = spec(method=method)
    summary = run_one(s, tmp_path / s.run_id, progress=False, nproc=2,
                      tracking=make_tracking("tensorboard", tmp_path) if tensorboard else None)
    run_dir = tmp_path / s.run_id
    assert summary["status"] == "ok", summary
    assert summary["world_size"] == 2 and read_json(run_dir / "summary.json") == summary
    rows = read_jsonl(run_dir / "metrics.jsonl")  # every line parses
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows[1:])
    assert [r["step"] for r in rows if r.get("reward") is not None] == [1, 3]  # where TRL generates, as 1 process
    assert all("kl_ref" in r for r in rows)
    config = read_json(run_dir / "config.json")
    assert config["machine"]["world_size"] == 2
    assert len(read_jsonl(run_dir / "eval_final.jsonl")) == 10 == summary["eval_n"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # nothing left of the launch, no rank's error, no temporary file
    leftovers = {p.name for p in run_dir.iterdir()} - {"config.json", "metrics.jsonl", "summary.json", "adapter",
                                                        "eval_base.jsonl", "eval_final.jsonl", ".lock", "run.log",
                                                        "adapter_init", *(["tensorboard"] if tensorboard else [])}
    assert not leftovers, leftovers
    if tensorboard:  # (formerly its own 2-process run: CI time)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = list(run_dir.rglob("events.out.tfevents*"))
        assert len(events) == 1, events  # one writer: rank 0
        ea = EventAccumulator(str(events[0]))
        ea.Reload()
        assert {"train/bench/kl_ref", "train/bench/kl_step"} <= set(ea.Tags()["scalars"])


# What differs between the two runs is the order of float sums (the gradient all-reduce averages two half-batch sums;
# each process left-pads its prompts to its own longest, which shifts rotary positions by a constant). Measured on a
# 2-core CPU (torch 2.13, float32), 4 steps: reward, reward_std and completion_length identical; grad_norm
# within 1.8e-7 relative; kl_ref within 2.6e-5 relative (2e-9 absolute) on an AMD EPYC and 5.7e-4 relative (3.8e-9
# absolute) on an Intel Xeon; entropy_probe within 6.3e-8 relative; the trained adapter within 9.7e-7 absolute
# (weights up to 0.09; one Adam step moves a weight by up to lr = 1e-3). kl_ref is about 7e-6 here, a second-order
# function of the small weight change, so the weights' last-bit differences weigh more in it than in the others.
# kl_step is not compared: it is measured on the step's first micro-batch, rank 0's alone (8 vs 4 rollouts).
RTOL, ATOL = 1e-4, 1e-9      # metrics
KL_RTOL = 2e-3               # kl_ref and kl_ref_k3 (a summed gradient, against averaged, would show in grad_norm)
# GRPO's on-policy loss is zero up to rounding (zero-mean advantages times ratios of 1, summed): measured 0 on both
# sides on the EPYC, 3.0e-8 vs 1.1e-8 on the Xeon; float32 rounding of its order-1 terms is about 1e-7
LOSS_ATOL = 1e-6
WEIGHTS_ATOL = 1e-5          # adapter weights: 1% of one Adam step


def test_two_processes_match_one_process_with_fixed_rollouts(tmp_path, tiny, worker_env, monkeypatch):
    import _ddp_fixed
    # 16 completions per generation batch and per optimizer step (2 micro-batches of 8, or 2 x 2 of 4)
    s = spec(micro_batch=8, grad_accum=2, num_generations=4, max_completion_length=32)
    with monkeypatch.context() as m:  # the same patches as the ranks apply (tests/_ddp_fixed.py)
        m.setattr(engine, "grpo_settings", engine.grpo_settings)
        m.setattr(engine, "BenchGRPOTrainer", engine.BenchGRPOTrainer)
        _ddp_fixed.apply()
        one = run_one(s, tmp_path / "one" / s.run_id, progress=False)
    monkeypatch.setattr(distributed, "WORKER", [str(HERE / "_ddp_fixed.py")])
    two = run_one(s, tmp_path / "two" / s.run_id, progress=False, nproc=2)
    assert one["status"] == two["status"] == "ok", (one, two)
    rows1 = read_jsonl(tmp_path / "one" / s.run_id / "metrics.jsonl")
    rows2 = read_jsonl(tmp_path / "two" / s.run_id / "metrics.jsonl")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [0, 1, 2, 3, 4]
    compared = ("loss", "reward", "reward_std", "grad_norm", "completion_length", "frac_reward_zero_std", "kl_ref",
                "kl_ref_k3", "entropy_probe")
    for r1, r2 in zip(rows1, rows2):
        for key in compared:
            if key in r1 or key in r2:
                rel = KL_RTOL if key.startswith("kl_ref") else RTOL
                tol = LOSS_ATOL if key == "loss" else ATOL
                assert r2[key] == pytest.approx(r1[key], rel=rel, abs=tol), (r1["step"], key, r1[key], r2[key])
    # a real signal: a gradient, rewards that vary (GRPO's loss itself is ~0 on-policy: advantages are zero-mean)
    assert any(r["grad_norm"] > 0 for r in rows1[1:]) and any(r["reward_std"] > 0 for r in rows1[1:])
    assert rows1[-1]["kl_ref"] > 0  # the policy moved
    w1 = load_file(tmp_path / "one" / s.run_id / "adapter" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "two" / s.run_id / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHTS_ATOL)
    assert one["accuracy"] == two["accuracy"]


@pytest.mark.parametrize("method", ["geora"])  # pissa: the same residual path (CI time)
def test_ddp_wrap_broadcasts_trainable_and_frozen_residual_weights(tmp_path, tiny, worker_env, method):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(HERE / "_ddp_broadcast.py"), method, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)
             if (tmp_path / f"rank{i}.json").is_file()]
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr[-3000:]
    for line in lines:
        assert line["frozen_residual"] > 0 and line["trainable"] > 0
        assert line["differ_before"] == line["tensors"]  # rank 1 had other weights, trainable and frozen
        assert line["differ_after"] == []                # and rank 0's after the wrap


def test_a_failing_process_fails_its_run_and_the_sweep_goes_on(tmp_path, tiny, worker_env, monkeypatch):
    from bench.sweep import run_sweep
    monkeypatch.setattr(distributed, "WORKER", [str(HERE / "_ddp_fixed.py")])
    monkeypatch.setenv("BENCH_TEST_FIXED", "0")
    monkeypatch.setenv("BENCH_TEST_FAIL", "1:2")  # rank 1 raises at step 2 of every run
    specs = [spec(steps=3, checkpoint_every=1), spec(method="kl_grpo", steps=1)]
    df = run_sweep(specs, tmp_path, progress=False, nproc=2)
    status = dict(zip(df.run_id, df.status))
    assert status == {specs[0].run_id: "failed", specs[1].run_id: "ok"}, df
    failed = read_json(tmp_path / specs[0].run_id / "summary.json")
    assert "rank1" in failed["error"] and "injected failure on rank 1 at step 2" in failed["error"], failed
    rows = read_jsonl(tmp_path / specs[0].run_id / "metrics.jsonl")  # whole: the rows up to the failure
    assert [r["step"] for r in rows][:2] == [0, 1]
    assert failed["world_size"] == 2


STRIP = ("step_seconds", "time_generation", "time_reference", "time_policy", "time_other", "time_metrics")


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in STRIP} for r in rows]


@pytest.mark.parametrize("asked", [1])  # a non-zero rank asks: the case that needs the agreement (CI time)
def test_a_stop_request_on_one_rank_stops_all_at_a_boundary_and_resumes_identically(tmp_path, tiny, worker_env,
                                                                                      monkeypatch, asked):
    """Preemption (SLURM's USR2, bench.runner.request_stop) reaching one rank only: every rank stops at the same
    generation-batch boundary with a checkpoint; re-running resumes to the metrics of the uninterrupted run."""
    monkeypatch.setattr(distributed, "WORKER", [str(HERE / "_ddp_fixed.py")])
    monkeypatch.setenv("BENCH_TEST_FIXED", "0")
    # TRL generates every 2 optimizer steps here (at steps 1 and 3): asked at step 1, mid-batch, all ranks stop
    # after step 2; the resumed run generates afresh at step 3
    s = spec(steps=4, checkpoint_every=100)
    monkeypatch.setenv("BENCH_TEST_STOP", f"{asked}:1")
    cut = run_one(s, tmp_path / "cut", progress=False, nproc=2)
    assert cut["status"] == "preempted" and "step 2" in cut["error"], cut
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.delenv("BENCH_TEST_STOP")
    resumed = run_one(s, tmp_path / "cut", progress=False, nproc=2)
    assert resumed["status"] == "ok" and resumed["resumed_from"] == "checkpoint-2", resumed
    whole = run_one(s, tmp_path / "whole", progress=False, nproc=2)
    assert _strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == _strip(read_jsonl(tmp_path / "whole" /
                                                                                       "metrics.jsonl"))
    assert resumed["accuracy"] == whole["accuracy"]


# ---- the fast tier: settings and refusals without starting processes ---------------------------------------------

def test_each_process_takes_its_share_of_the_micro_batch_and_the_global_batch_is_unchanged(monkeypatch):
    from methods import get_method
    s, method = spec(micro_batch=16, grad_accum=2), get_method("kl_free_lora")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = engine.grpo_settings(s, method)
    assert one["per_device_train_batch_size"] == 16 and not {k for k in one if k.startswith("ddp_")}
    for n in (2, 4):
        monkeypatch.setenv("WORLD_SIZE", str(n))
        many = engine.grpo_settings(s, method)
        assert many["per_device_train_batch_size"] == 16 // n
        # TRL 1.16 (grpo_config.py): generation_batch_size = per_device_train_batch_size x num_processes x
        # steps_per_generation; completions per optimizer step = per_device x num_processes x grad_accum
        assert many["per_device_train_batch_size"] * n * many["steps_per_generation"] == \
            one["per_device_train_batch_size"] * one["steps_per_generation"]
        assert many["gradient_accumulation_steps"] == one["gradient_accumulation_steps"]
        assert many["ddp_backend"] == "gloo" and many["ddp_timeout"] >= 3600 and "deepspeed" not in many
        assert {k: v for k, v in many.items() if k != "per_device_train_batch_size" and not k.startswith("ddp_")} \
            == {k: v for k, v in one.items() if k != "per_device_train_batch_size"}


def test_zero2_gives_transformers_a_deepspeed_config_that_resolves_to_the_runs_own_settings(monkeypatch):
    """--sharding zero2: each rank's GRPOConfig carries a ZeRO stage-2 DeepSpeed config whose "auto" values
    transformers' own DeepSpeed integration (HfTrainerDeepSpeedConfig, as the Trainer uses it) fills with the run's
    micro-batch share, accumulation, clipping and precision; no optimizer section, so DeepSpeed wraps the Trainer's
    AdamW with the run's settings. (DeepSpeed itself needs CUDA: not run here.)"""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from methods import get_method
    s, method = spec(micro_batch=16, grad_accum=2, sharding="zero2"), get_method("kl_free_lora")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "deepspeed" not in engine.grpo_settings(s, method)  # a 1-process run (and the harness's dry run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    settings = engine.grpo_settings(s, method)
    ds = settings["deepspeed"]
    assert ds["zero_optimization"]["stage"] == 2 and "optimizer" not in ds and "scheduler" not in ds
    ddp = engine.grpo_settings(spec(micro_batch=16, grad_accum=2), method)
    assert {k: v for k, v in settings.items() if k != "deepspeed"} == ddp  # nothing else differs from ddp
    # the "auto" values as transformers resolves them against the run's GRPOConfig (built without the deepspeed
    # field, which would import DeepSpeed; world size 1 in this process; bf16 as the harness sets it on CUDA, which
    # transformers refuses to construct on a machine without a bf16 GPU)
    monkeypatch.delenv("WORLD_SIZE")
    args = engine.grpo_config(spec(micro_batch=8, grad_accum=2), method, "/nonexistent/x", [1.0], chat=False,
                              use_cpu=True)
    args.bf16 = engine.grpo_settings(s, method, use_cpu=False)["bf16"]
    # transformers' resolver (trainer_config_process, as the Trainer calls it) on accelerate's config class, which
    # transformers derives it from where DeepSpeed is installed; without transformers' constructor, which checks for
    # the deepspeed package and registers the config globally (what a DeepSpeed run does)
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    class Resolver(HfTrainerDeepSpeedConfig, HfDeepSpeedConfig):
        def __init__(self, config):
            HfDeepSpeedConfig.__init__(self, config)
            self._dtype, self.mismatches = None, []
    resolved = Resolver(distributed.deepspeed_config(stage=2))
    resolved.trainer_config_process(args)
    config = resolved.config
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 16 and config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False  # the harness's bf16 on CUDA
    assert "auto" not in json.dumps(config)


def test_sharding_is_part_of_the_key_unless_ddp():
    """ddp (the default) leaves every run's key what it was before the setting existed; zero2 is another run
    (DeepSpeed's bf16 weights and its own checkpoint format); the setting is recorded in the spec (config.json)."""
    import hashlib

    from bench.errors import BenchError
    from bench.spec import NOT_IDENTITY, stored_key
    from bench.variants import assign
    ddp, zero2 = spec(), spec(sharding="zero2")
    before = {k: v for k, v in ddp.to_dict().items() if k not in NOT_IDENTITY and k != "sharding"}
    assert ddp.key() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert zero2.key() != ddp.key() and zero2.to_dict()["sharding"] == "zero2"
    old_config = {"spec": {k: v for k, v in ddp.to_dict().items() if k != "sharding"}}  # recorded before
    assert stored_key(old_config) == ddp.key()
    # tables: an old run and a ddp run are one configuration, a zero2 run is a variant of its own
    import pandas as pd
    runs = pd.DataFrame({"key": ["old", "ddp", "zero2"], "method": ["kl_free_lora"] * 3, "status": ["ok"] * 3,
                         "eval_n": [10] * 3})
    specs = {"old": old_config["spec"], "ddp": ddp.to_dict(), "zero2": zero2.to_dict()}
    digests = list(assign(runs, specs).config_digest)
    assert digests[0] == digests[1] != digests[2]
    with pytest.raises(BenchError, match="bad sharding 'deepspeed'; valid: ddp, zero2, zero3, fsdp"):
        spec(sharding="deepspeed")


def test_sharding_refusals(monkeypatch):
    from bench import slurm
    from bench.errors import BenchError
    distributed.check_sharding([spec()], 1)  # ddp: nothing to check
    for s in ("zero3", "fsdp"):
        with pytest.raises(BenchError, match=f"--sharding {s}: partitions the parameters"):
            distributed.check_sharding([spec(sharding=s)], 2, local=False)
    with pytest.raises(BenchError, match="needs --nproc-per-run 2 or more"):
        distributed.check_sharding([spec(sharding="zero2")], 1, local=False)
    for method in ("proma", "geora+proma"):  # the method's own refusal (Method.refuses_sharding), in RunSpec
        with pytest.raises(BenchError, match=f"--sharding zero2: method {re.escape(method)} cannot run with "
                                             r"partitioned gradients: projects the running gradient sum that each "
                                             r"weight's \.grad"):
            spec(method=method, sharding="zero2")
    distributed.check_sharding([spec(method="proma")], 2)  # ddp: any method
    # on SLURM the task's node has the GPUs: only a cpu device and the package are checked from here
    with pytest.raises(BenchError, match=r"needs CUDA \(accelerate runs DeepSpeed on GPUs only; device cpu\)"):
        distributed.check_sharding([spec(sharding="zero2", device="cpu")], 2, local=False)
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else
                        real_find_spec(name, *a))
    with pytest.raises(BenchError, match="^--sharding zero2 needs the deepspeed package"):
        slurm.task_nproc({"gpus_per_node": 2}, None, [spec(sharding="zero2")])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else
                        real_find_spec(name, *a))
    assert slurm.task_nproc({"gpus_per_node": 2}, None, [spec(sharding="zero2")]) == 2  # would run there
    with pytest.raises(BenchError, match="needs --nproc-per-run 2 or more"):
        slurm.task_nproc({"gpus_per_node": 1}, None, [spec(sharding="zero2")])


def test_nproc_checks():
    from bench.errors import BenchError
    assert distributed.parse_nproc(None) == 1 and distributed.parse_nproc("4") == 4
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(BenchError, match="bad --nproc-per-run"):
            distributed.parse_nproc(bad)
    distributed.check_nproc([spec(micro_batch=16)], 4)
    with pytest.raises(BenchError, match="micro_batch 16 is not divisible by 3"):
        distributed.check_nproc([spec(micro_batch=16)], 3)
    with pytest.raises(BenchError, match="device cuda:1 names one GPU"):
        distributed.check_nproc([spec(device="cuda:1")], 2, local=False)


def test_slurm_processes_per_task_follow_the_training_gpus():
    from bench import slurm
    from bench.errors import BenchError
    specs = [spec()]
    assert slurm.task_nproc({"gpus_per_node": 4}, None, specs) == 4
    assert slurm.task_nproc({"gpus_per_node": 5, "vllm_server_gpus": 1}, None, specs) == 4
    assert slurm.task_nproc({"gpus_per_node": 4, "vllm_server_gpus": 1}, 2, specs) == 2
    assert slurm.task_nproc({}, None, specs) == 1 and slurm.task_nproc({}, 2, specs) == 2  # CPU tasks
    with pytest.raises(BenchError, match="micro_batch 16 is not divisible by 3"):  # 3 training GPUs by default
        slurm.task_nproc({"gpus_per_node": 4, "vllm_server_gpus": 1}, None, specs)
    with pytest.raises(BenchError, match="each task 1 training GPU"):
        slurm.task_nproc({"gpus_per_node": 2, "vllm_server_gpus": 1}, 2, specs)
    with pytest.raises(BenchError, match="leaves no GPU"):
        slurm.task_nproc({"gpus_per_node": 1, "vllm_server_gpus": 1}, None, specs)
    profile = slurm.load_profile("vllm-server-example")
    assert slurm.task_nproc(profile, None, specs) == 1
    assert "vllm_server_gpus" not in str(slurm.executor_parameters(profile))  # not an sbatch option


def test_vllm_server_address_is_checked_and_not_part_of_the_key():
    from bench.errors import BenchError
    a, b = spec(), spec(vllm_server="gpu-node-3:8001")
    assert a.key() == b.key() and b.vllm_server_address == ("gpu-node-3", 8001)
    assert spec(vllm_server="[::1]:8000").vllm_server_address == ("::1", 8000)
    for bad in ("localhost", "host:0", "host:99999", ":8000", 8000):
        with pytest.raises(BenchError, match="bad vllm_server"):
            spec(vllm_server=bad)


@pytest.mark.parametrize("args,fragments", [
    (["--nproc-per-run", "3"], ["--nproc-per-run 3: micro_batch 16 is not divisible by 3"]),
    (["--nproc-per-run", "0"], ["bad --nproc-per-run '0'"]),
    (["--nproc-per-run", "two"], ["bad --nproc-per-run 'two'"]),
    (["--nproc-per-run", "2", "--set", "micro_batch=3", "--set", "num_generations=3"],
     ["micro_batch 3 is not divisible by 2"]),
    (["--set", "vllm_mode=server"], ["vllm_mode server", "vLLM is not installed"]),
    (["--set", "vllm_mode=remote"], ["bad vllm_mode 'remote'"]),
])
def test_refusals_are_one_line(tmp_path, cli, args, fragments):
    r = cli("run", "--methods", "kl_free_lora", "--ranks", "4", "--steps", "1", "--out", str(tmp_path / "out"),
              *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
