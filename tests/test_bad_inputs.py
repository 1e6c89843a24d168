"""Bad input, table by table: the bad input, the exact first (and only) line of stderr, the exit code (2, or the
documented 1 where what can be read is still reported). Every command runs in-process through bench.cli.main with
training replaced by a function that fails the test if reached, and the output directory is compared before and
after: absent stays absent, an existing sweep stays byte for byte unchanged. No test here trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.spec import RunSpec

BASE = ["run", "--methods", "kl_free_lora", "--ranks", "4", "--steps", "2", "--no-progress"]
SLURM_ONLY = ("only with --executor slurm (a local sweep runs in this process and re-running the same command "
              "resumes it)")

# (id, extra arguments ({tmp}: the test's folder; files named below are created there), expected stderr line)
USAGE_ERRORS = [
    ("seed-negative", ["--seeds", "-1"],
     "bad seed -1: must be an integer in [0, 4294967295] (numpy's seed range, which transformers.set_seed uses)"),
    ("seed-too-large", ["--seeds", "99999999999"],
     "bad seed 99999999999: must be an integer in [0, 4294967295] (numpy's seed range, which transformers.set_seed "
     "uses)"),
    ("seed-twice", ["--seeds", "0,0"], "bad --seeds '0,0': 0 listed twice"),
    ("alpha-nan", ["--alpha", "nan"], "bad alpha nan: must be a finite number > 0 (or unset: alpha = rank)"),
    ("alpha-negative", ["--alpha", "-4"], "bad alpha -4.0: must be a finite number > 0 (or unset: alpha = rank)"),
    ("alpha-text", ["--set", "alpha=abc"], "bad alpha 'abc': must be a finite number > 0 (or unset: alpha = rank)"),
    ("eval-size-0", ["--eval-size", "0"], "bad eval_size 0: must be a positive integer (or unset: all)"),
    ("eval-size-negative", ["--eval-size", "-1"], "bad eval_size -1: must be a positive integer (or unset: all)"),
    ("device-bogus", ["--device", "bogus"], "bad device 'bogus'; valid: auto, cpu, cuda, cuda:N"),
    ("grpo-wrong-type", ["--set", "grpo={num_train_epochs: abc}"],
     "bad grpo setting num_train_epochs='abc': GRPOConfig declares float"),
    ("grpo-list-value", ["--set", "grpo={warmup_steps: [1]}"],
     "bad grpo setting warmup_steps=[1]: GRPOConfig declares float"),
    ("grpo-not-mapping", ["--set", "grpo=[1]"], "bad grpo [1]: expected a mapping of GRPOConfig settings"),
    ("grpo-refused-by-trl", ["--set", "grpo={lr_scheduler_type: bogus}"],
     "kl_free_lora_r4_s0: TRL refuses the GRPOConfig (grpo {'lr_scheduler_type': 'bogus'}): bogus is not a valid "
     "SchedulerType, please select one of ['linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', "
     "'constant_with_warmup', 'inverse_sqrt', 'reduce_lr_on_plateau', 'cosine_with_min_lr', "
     "'cosine_warmup_with_min_lr', 'warmup_stable_decay', 'greedy']"),
    ("reward-not-mapping", ["--set", "reward=1"], "bad reward 1: expected a mapping, e.g. {correct: 1, format: 0.2}"),
    ("reward-all-zero", ["--set", "reward={correct: 0}"],
     "bad reward: the correct and format weights are both 0 (nothing to learn from)"),
    ("reward-extraction", ["--set", "reward={extraction: loose}"],
     "bad reward extraction 'loose'; valid: strict, flexible"),
    ("lr-inf", ["--lr", "inf"], "bad lr inf: must be a finite number > 0"),
    ("model-without-weights", ["--model", "{tmp}/noweights"],
     "cannot load model '{tmp}/noweights': {tmp}/noweights has no *.safetensors weights"),
    ("model-bin-only", ["--model", "{tmp}/binonly"],
     "cannot load model '{tmp}/binonly': {tmp}/binonly has no *.safetensors weights (found pytorch_model.bin: only "
     "safetensors are loaded)"),
    ("steps-absurd", ["--steps", "1000000000000"],
     "bad steps 1000000000000: at most 100,000 optimizer steps per run (README, \"Set up and run\"; the longest "
     "preset runs 604)"),
    ("ranks-empty-item", ["--ranks", "4,,16"], "bad --ranks '4,,16': an empty item between commas"),
    ("wait-local", ["--wait"], f"--wait: {SLURM_ONLY}"),
    ("resume-local", ["--resume"], f"--resume: {SLURM_ONLY}"),
    ("partition-local", ["--partition", "gpu"], f"--partition: {SLURM_ONLY}"),
    ("executor-unknown", ["--executor", "pbs"], "unknown --executor 'pbs'; valid: local, slurm"),
    ("jobs-slurm", ["--executor", "slurm", "--jobs", "2"],
     "--jobs: only for the local executor (under SLURM each run is its own array task; --array-parallelism caps how "
     "many run at once)"),
    ("task-param-type", ["--task-param", "max_number=abc"],
     "bad --task-param for task synth-gsm (max_number='abc'): TypeError: '<' not supported between instances of "
     "'str' and 'int'"),
    ("config-set-list", ["--config", "{tmp}/set_list.yaml"], "bad num_generations [1, 2]: must be a positive integer"),
    ("config-task-param-list", ["--config", "{tmp}/task_param_list.yaml"],
     "bad --task-param for task synth-gsm (max_number=[1, 2]): TypeError: '<' not supported between instances of "
     "'list' and 'int'"),
    ("config-out-list", ["--config", "{tmp}/out_list.yaml"],
     "--config {tmp}/out_list.yaml: out must be a single value, got ['a', 'b']"),
    ("config-binary", ["--config", "{tmp}/garbage.yaml"],
     "--config {tmp}/garbage.yaml: not a YAML text file (not UTF-8)"),
    ("config-set-sequence", ["--config", "{tmp}/set_sequence.yaml"],
     "bad --config {tmp}/set_sequence.yaml: set 1: expected KEY=VALUE"),
]
PARAMETERS_SHARDED = ("partitions the parameters over the processes, but the harness measures (kl_ref, kl_step), "
                      "evaluates and saves the policy on rank 0's whole weights")
ONLY_ZERO2 = "; not supported: zero2 partitions the optimizer state and gradients only"
USAGE_ERRORS += [
    ("sharding-fsdp", ["--sharding", "fsdp", "--nproc-per-run", "2"],
     f"--sharding fsdp: {PARAMETERS_SHARDED} (and accelerate ignores FSDP on CPU){ONLY_ZERO2}"),
    ("sharding-zero3", ["--sharding", "zero3", "--nproc-per-run", "2"],
     f"--sharding zero3: {PARAMETERS_SHARDED}{ONLY_ZERO2}"),
    ("sharding-one-process", ["--sharding", "zero2"],
     "--sharding zero2: partitions over the processes of a run; it needs --nproc-per-run 2 or more"),
    ("sharding-proma", ["--sharding", "zero2", "--nproc-per-run", "2", "--methods", "kl_free_lora,geora+proma"],
     "--sharding zero2: method geora+proma cannot run with partitioned gradients: projects the running gradient sum "
     "that each weight's .grad holds between micro-batches; DeepSpeed ZeRO-2 moves every micro-batch's gradient out "
     "of .grad into its partitioned buffers (use --sharding ddp)"),
]
if not torch.cuda.is_available():
    import importlib.util
    if importlib.util.find_spec("deepspeed") is None:
        USAGE_ERRORS.append(("sharding-zero2-here", ["--sharding", "zero2", "--nproc-per-run", "2"],
                             "--sharding zero2 needs CUDA (accelerate runs DeepSpeed on GPUs only; this machine shows "
                             "none) and the deepspeed package (pip install deepspeed, on a CUDA machine; not a "
                             "dependency)"))
    USAGE_ERRORS.append(("device-cuda-missing", ["--device", "cuda"],
                         f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}, CUDA "
                         f"build {torch.version.cuda or 'none'}); use --device cpu or auto"))


def _inputs(tmp: Path) -> None:
    """The bad files the table names."""
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (tmp / "binonly").mkdir()
    (tmp / "binonly" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (tmp / "binonly" / "pytorch_model.bin").write_bytes(b"\0" * 16)
    (tmp / "set_list.yaml").write_text("set: {num_generations: [1, 2]}\n")
    (tmp / "task_param_list.yaml").write_text("task-param: {max_number: [1, 2]}\n")
    (tmp / "out_list.yaml").write_text("out: [a, b]\n")
    (tmp / "garbage.yaml").write_bytes(bytes(range(256)))
    (tmp / "set_sequence.yaml").write_text("set: [1, 2]\n")


def snapshot(folder: Path) -> dict | None:
    """Every file under folder with its bytes and mode (None: absent)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_training(monkeypatch):
    """Training and submission fail the test if reached."""
    import bench.runner
    import bench.slurm
    import bench.sweep

    def reached(*args, **kwargs):
        raise AssertionError("training or submission started for a bad input")
    for module, name in ((bench.sweep, "run_sweep"), (bench.runner, "run_one"), (bench.slurm, "submit")):
        monkeypatch.setattr(module, name, reached)


def run_cli(args, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _existing_sweep(out: Path) -> None:
    """A finished run of another configuration than the table's commands would create."""
    spec = RunSpec(method="kl_free_lora", rank=16, steps=3)
    run = out / spec.run_id
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"spec": spec.to_dict(), "spec_key": spec.key()}))
    (run / "summary.json").write_text(json.dumps({"run_id": spec.run_id, "method": "kl_free_lora", "rank": "16",
                                                  "seed": 0, "status": "ok", "accuracy": 0.4}))
    (out / "summary.csv").write_text("run_id\nkl_free_lora_r16_s0\n")


@pytest.mark.parametrize("existing", [False, True], ids=["out-absent", "out-existing"])
@pytest.mark.parametrize("case,extra,expected", USAGE_ERRORS, ids=[c[0] for c in USAGE_ERRORS])
def test_usage_error_is_refused_before_training(case, extra, expected, existing, tmp_path, tiny, no_training, capsys):
    _inputs(tmp_path)
    out = tmp_path / "sweep" / "out"  # two levels: neither may be left behind
    if existing:
        _existing_sweep(out)
    before = snapshot(tmp_path / "sweep")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, err = run_cli([*BASE, *extra, *(["--out", str(out)] if case != "config-out-list" else [])], capsys)
    assert (code, err) == (2, ["bench: error: " + expected.replace("{tmp}", str(tmp_path))])
    assert snapshot(tmp_path / "sweep") == before
    if case == "config-out-list":
        assert not Path("a").exists() and not Path("b").exists()


def test_conflicting_run_directory_is_found_before_the_first_run(tmp_path, tiny, no_training, capsys):
    """A parallel sweep used to report it only after the other runs had trained."""
    out = tmp_path / "out"
    _existing_sweep(out)  # kl_free_lora_r16_s0 with steps 3
    before = snapshot(out)
    code, err = run_cli([*BASE[:4], "4,16", *BASE[5:], "--jobs", "2", "--out", str(out)], capsys)
    assert (code, err) == (2, [f"bench: error: {out} holds 1 run(s) with a different configuration (e.g. "
                               "kl_free_lora_r16_s0); use another --out, or remove those run directories; nothing "
                               "was run"])
    assert snapshot(out) == before


# ---- damaged or wrongly typed run files -----------------------------------------------------------------------

def _run(sweep: Path, method: str, **summary) -> Path:
    spec = RunSpec(method=method, rank=4, steps=4, eval_size=8)
    d = sweep / spec.run_id
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"run_id": spec.run_id, "method": method, "rank": "4", "seed": 0,
                                                "status": "ok", "accuracy_base": 0.3, "accuracy": 0.4,
                                                "accuracy_gain": 0.1, "kl_ref": 1e-3, "kl_step": 1e-4,
                                                "entropy": 0.3, "wall_clock_s": 10.0, **summary}))
    (d / "config.json").write_text(json.dumps({"spec": spec.to_dict(), "spec_key": spec.key()}))
    rows = [{"step": 0, "kl_ref": 0.0, "entropy_probe": 0.3}] + [
        {"step": s, "kl_step": 1e-4, "entropy": 0.3, "reward": 0.3} for s in (1, 2, 3, 4)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


BAD = "kl_grpo_r4_s0"
# (id, file of run BAD, its new content, command, expected exit code, expected first stderr line)
DAMAGED = [
    ("status-truncated-summary", "summary.json", '{"run_id": "kl_gr', "status", 1,
     "bench: skipped: {run}/summary.json: unreadable (JSONDecodeError: truncated or not JSON)"),
    ("status-summary-list", "summary.json", "[1, 2]", "status", 1,
     "bench: skipped: {run}/summary.json: not a run summary (a JSON list, not an object)"),
    ("status-truncated-record", "../slurm_jobs.json", '{"runs": {"a', "status", 2,
     "bench: error: {sweep}/slurm_jobs.json: unreadable (JSONDecodeError): the record of submitted SLURM jobs is "
     "damaged; move it away to rebuild the status from the run directories"),
    ("collect-truncated-summary", "summary.json", '{"run_id": "kl_gr', "collect", 1,
     "bench: skipped: {run}/summary.json: unreadable (JSONDecodeError: truncated or not JSON)"),
    ("collect-rank-text", "summary.json", json.dumps({"method": "kl_grpo", "rank": "abc", "status": "ok"}),
     "collect", 1, "bench: skipped: {run}/summary.json: not a run summary (rank 'abc' is not a positive integer or "
     "'full')"),
    ("report-summary-list", "summary.json", "[1, 2]", "report", 1,
     "bench: skipped: {run}/summary.json: not a run summary (a JSON list, not an object)"),
    ("report-rank-text", "summary.json", json.dumps({"method": "kl_grpo", "rank": "abc", "status": "ok"}), "report",
     1, "bench: skipped: {run}/summary.json: not a run summary (rank 'abc' is not a positive integer or 'full')"),
    ("report-accuracy-text", "summary.json",
     json.dumps({"method": "kl_grpo", "rank": "4", "status": "ok", "accuracy": "high"}), "report", 1,
     "bench: skipped: {run}/summary.json: not a run summary (accuracy 'high' is not a number)"),
    ("report-metrics-not-objects", "metrics.jsonl", "[1, 2]\n3\n", "report", 1,
     "bench: skipped: {run}/metrics.jsonl: line 1 is a JSON list, not an object"),
    ("report-metrics-step-text", "metrics.jsonl", '{"step": "a"}\n', "report", 1,
     "bench: skipped: {run}/metrics.jsonl: line 1: step 'a' is not an integer"),
    ("report-config-list", "config.json", "[1]", "report", 1,
     "bench: skipped: {run}/config.json: not a run configuration (no \"spec\" object)"),
    ("leaderboard-config-spec-list", "config.json", '{"spec": [1]}', "leaderboard", 1,
     "bench: skipped: {run}/config.json: not a run configuration (no \"spec\" object)"),
    ("eval-config-list", "config.json", "[1]", "eval", 2,
     "bench: error: {run}/config.json: not a run configuration (no \"spec\" object)"),
    ("eval-config-truncated", "config.json", '{"sp', "eval", 2,
     "bench: error: {run}/config.json: unreadable (JSONDecodeError: truncated or not JSON)"),
    ("eval-config-bad-rank", "config.json", json.dumps({"spec": {"method": "kl_grpo", "rank": "abc"}}), "eval", 2,
     "bench: error: {run}/config.json: not a valid run configuration (bad rank 'abc': expected a positive integer "
     "or 'full')"),
    ("eval-summary-truncated", "summary.json", '{"st', "eval", 2,
     "bench: error: {run}/summary.json: unreadable (JSONDecodeError: truncated or not JSON); nothing evaluated"),
]


@pytest.mark.parametrize("case,name,content,command,code,expected",  # `report` renders the plots: slow
                         [pytest.param(*c, marks=pytest.mark.slow) if c[3] == "report" else c for c in DAMAGED],
                         ids=[c[0] for c in DAMAGED])
def test_damaged_run_files_are_named_not_tracebacks(case, name, content, command, code, expected, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run(sweep, "kl_free_lora")
    run = _run(sweep, "kl_grpo")
    (run / name).write_text(content)
    args = {"status": ["status", str(sweep)], "collect": ["collect", str(sweep)], "report": ["report", str(sweep)],
            "leaderboard": ["leaderboard", str(sweep), "--csv", str(tmp_path / "board.csv")],
            "eval": ["eval", str(run)]}[command]
    before = snapshot(sweep)
    got_code, err = run_cli(args, capsys)
    expected = expected.replace("{run}", str(run)).replace("{sweep}", str(sweep))
    assert got_code == code and err and err[0] == expected, err
    assert not any("Traceback" in line for line in err)
    if command in ("status", "eval"):  # they write nothing
        assert snapshot(sweep) == before
    elif command == "collect":  # the readable run is collected; the damaged file is left as it was
        assert "kl_free_lora_r4_s0" in (sweep / "summary.csv").read_text()
        assert BAD not in (sweep / "summary.csv").read_text()
        assert (run / name).read_text() == content


def test_status_names_an_unfinished_local_run(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run(sweep, "kl_free_lora")
    (_run(sweep, "kl_grpo") / "summary.json").unlink()  # config.json written, killed before its summary
    code, err = run_cli(["status", str(sweep)], capsys)
    assert code == 0 and err == []


def test_status_table_shows_unfinished_and_unreadable(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (_run(sweep, "kl_free_lora") / "summary.json").write_text("{")
    (_run(sweep, "kl_grpo") / "summary.json").unlink()
    capsys.readouterr()
    assert main(["status", str(sweep)]) == 1
    lines = capsys.readouterr().out.splitlines()
    states = {line.split()[0]: line.split()[1] for line in lines[1:-1]}
    assert states == {"kl_free_lora_r4_s0": "unreadable", "kl_grpo_r4_s0": "unfinished"}
    assert lines[-1] == "1 unfinished, 1 unreadable"


def test_leaderboard_to_an_unwritable_csv(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run(sweep, "kl_free_lora")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(["leaderboard", str(sweep), "--csv", str(blocker / "board.csv")], capsys)
    assert (code, err) == (2, [f"bench: error: --csv {blocker / 'board.csv'}: cannot write: File exists ({blocker})"])
    assert blocker.read_text() == "x"


def test_failed_sbatch_leaves_nothing_behind(tmp_path, tiny):
    """sbatch refusing the array (here a stand-in sbatch on PATH that refuses like SLURM does): one line, exit 2,
    and neither submitit's pickles and submission script nor the --out it created are left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    out = tmp_path / "sweep" / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--executor", "slurm", "--partition", "nope",
                        *BASE[1:], "--ranks", "4,16", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert (r.returncode, r.stderr.strip().splitlines()) == (
        2, ["bench: error: sbatch failed: sbatch: error: invalid partition specified: nope"]), r.stderr
    assert not (tmp_path / "sweep").exists()


def test_grpo_values_of_the_declared_types_pass():
    """The type check admits what TRL declares (enum names, floats given as ints, optional dicts) and the dry
    GRPOConfig accepts a shipped preset's settings."""
    from bench.spec import check_grpo_config, check_grpo_settings
    check_grpo_settings({"lr_scheduler_type": "cosine", "warmup_steps": 0, "num_train_epochs": 2,
                         "lr_scheduler_kwargs": {"num_cycles": 2}, "epsilon_high": None, "loss_type": "dapo",
                         "weight_decay": 0.01, "optim": "adamw_torch"})
    for method in ("kl_free_lora", "proma", "geora+kl"):
        check_grpo_config(RunSpec(method=method, rank=4, grpo={"weight_decay": 0.01, "loss_type": "dapo"}))
