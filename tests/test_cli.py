"""The CLI: bad input is one line on stderr and exit code 2, before any training; a tiny sweep end to end. The bad
inputs run in-process (the `cli` fixture, tests/conftest.py); the module entry point `python -m bench.cli` is
started in subprocesses here, once for a bad input and once for `bench list`."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from bench.cli import main


def bench(*args):
    """`python -m bench.cli ARGS` in a fresh process: the entry point, with its imports' own output on stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.slow  # starts the CLI in a subprocess
def test_module_entry_point_bad_input_is_one_line_and_exit_2():
    """A fresh process that imports the method registry (torch, transformers, TRL, PEFT) before refusing: nothing
    but the one line on stderr."""
    assert_one_line_error(bench("run", "--methods", "nope"), "unknown method 'nope'", "kl_free_lora", "kl_grpo")


@pytest.mark.parametrize("args,fragments", [
    (["run", "--methods", "nope"], ["unknown method 'nope'", "kl_free_lora", "kl_grpo"]),
    (["run", "--ranks", "0"], ["bad rank 0"]),
    (["run", "--ranks", "four"], ["bad rank 'four'"]),
    (["run", "--task", "nope"], ["unknown task 'nope'", "synth-gsm"]),
    (["run", "--seeds", "x"], ["bad --seeds"]),
    (["run", "--steps", "-3"], ["bad steps -3"]),
    (["run", "--bogus"], ["unrecognized arguments"]),
    (["prepare", "--model", "huge"], ["unknown embedded model 'huge'", "tiny"]),
    (["run", "--set", "bogus=1"], ["unknown --set key(s) bogus", "max_completion_length"]),
    (["run", "--set", "temperature"], ["bad --set 'temperature': expected KEY=VALUE"]),
    (["run", "--task-param", "max_steps"], ["bad --task-param 'max_steps': expected KEY=VALUE"]),
    (["run", "--set", "temperature=hot"], ["bad temperature 'hot'"]),
    (["run", "--task-param", "max_steps=9"], ["synth-gsm: steps must satisfy"]),
    (["run", "--methods", "proma", "--method-param", "mode=fast"], ["bad mode 'fast'", "approx, exact"]),
    (["run", "--methods", "proma", "--method-param", "cap=0"], ["bad cap 0: must be > 0"]),
    (["run", "--methods", "proma_intra", "--method-param", "k=-2"], ["bad k -2: must be > 0"]),
    (["run", "--methods", "proma+kl"], ["cannot compose proma+kl: both set beta"]),
    (["perf", "--methods", "proma"], ["--methods needs a baseline"]),
])
def test_bad_input_is_one_line_and_exit_2(cli, args, fragments):
    assert_one_line_error(cli(*args), *fragments)


@pytest.mark.parametrize("name,value", [("BENCH_NUM_THREADS", "two"), ("BENCH_FORWARD_THREADS", "0")])
def test_bad_thread_count_in_the_environment(tmp_path, monkeypatch, cli, name, value):
    monkeypatch.setenv(name, value)
    assert_one_line_error(cli("run", "--out", str(tmp_path / "out")), f"bad {name} '{value}'", "positive integer")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_method_params_go_to_the_methods_that_have_them():
    from bench.config import method_params_per_method
    from bench.errors import BenchError
    methods = ["geora", "proma", "geora+proma", "kl_free_lora"]
    out = method_params_per_method(methods, {"rho": 0.3, "proma.cap": 0.2, "sweeps": 3})
    assert out == {"geora": {"rho": 0.3}, "proma": {"cap": 0.2, "sweeps": 3},
                   "geora+proma": {"rho": 0.3, "cap": 0.2, "sweeps": 3}, "kl_free_lora": {}}
    with pytest.raises(BenchError, match="method 'kl_grpo' is not in this sweep"):
        method_params_per_method(methods, {"kl_grpo.rho": 0.3})
    with pytest.raises(BenchError, match="bad cap -1"):
        method_params_per_method(methods, {"proma.cap": -1})


def test_rank_larger_than_smallest_matrix(tmp_path, tiny, cli):
    r = cli("run", "--ranks", "65", "--out", str(tmp_path / "s"))
    assert_one_line_error(r, "bad rank 65", "smallest targeted matrix dimension (64)")
    assert not list((tmp_path / "s").glob("*/metrics.jsonl"))  # nothing trained


def test_unknown_model_lists_embedded_ones(tmp_path, cli):
    assert_one_line_error(cli("run", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")),
                          "cannot load model", "tiny")


def test_unwritable_output_directory(tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(cli("run", "--out", str(blocker / "sub")), "not writable")


def test_malformed_data_file(tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    assert_one_line_error(cli("run", "--task", "gsm8k", "--data", str(bad), "--out", str(tmp_path / "o")),
                          f"{bad}:2", "'answer'")


@pytest.mark.parametrize("text,fragment", [("methods: [kl_grpo]\nbogus_key: 1\n", "unknown key 'bogus_key'"),
                                           ("methods: [kl_grpo\n", "bad YAML"),
                                           ("- just\n- a list\n", "expected a mapping")])
def test_bad_config_file(tmp_path, cli, text, fragment):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(text)
    assert_one_line_error(cli("run", "--config", str(cfg)), str(cfg), fragment)


@pytest.mark.slow  # starts the CLI in a subprocess
def test_list_shows_tasks_models_methods():
    r = bench("list")
    assert r.returncode == 0
    for name in ("synth-gsm", "gsm8k", "tiny", "kl_grpo", "kl_free_lora", "+kl"):
        assert name in r.stdout


def test_tiny_sweep_from_config_with_flag_override(tmp_path, tiny, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("methods: [kl_grpo, kl_free_lora]\nranks: [4]\nsteps: 5\neval-size: 8\n"
                   "set: {max_completion_length: 40, probe_size: 4}\n")
    out = tmp_path / "sweep"
    code = main(["run", "--config", str(cfg), "--steps", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    df = pd.read_csv(out / "summary.csv")
    assert sorted(df.run_id) == ["kl_free_lora_r4_s0", "kl_grpo_r4_s0"]
    assert set(df.status) == {"ok"} and set(df.steps_done) == {1}  # the flag overrode the file's steps
    for col in ("method", "rank", "seed", "status", "accuracy_base", "accuracy", "accuracy_gain", "kl_ref",
                "kl_step", "entropy", "reward", "wall_clock_s", "trainable_params", "peak_mem_mb"):
        assert col in df.columns and df[col].notna().all(), col
    tables = (out / "tables.md").read_text()
    for title in ("KL to the initial policy", "Per-step KL", "Entropy", "accuracy", "wall-clock"):
        assert title in tables
    assert "| kl_grpo |" in tables and "r=4" in tables
    mtime = (out / "kl_grpo_r4_s0" / "summary.json").stat().st_mtime
    assert main(["run", "--config", str(cfg), "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    assert (out / "kl_grpo_r4_s0" / "summary.json").stat().st_mtime == mtime  # finished runs are skipped
    spec = json.loads((out / "kl_grpo_r4_s0" / "config.json").read_text())["spec"]
    assert spec["steps"] == 1 and spec["eval_size"] == 8 and spec["max_completion_length"] == 40
