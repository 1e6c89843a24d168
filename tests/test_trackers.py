"""Experiment trackers (bench.trackers): refusals before any training, and one tiny run reporting to every tracker
installed here, read back with each tracker's own reader (TensorBoard's EventAccumulator, trackio's SQLite storage,
MLflow's client, W&B's offline run files)."""
import importlib.util
import json
import math
import os

import pytest

from bench.cli import main
from bench.errors import BenchError
from bench.io import read_json, read_jsonl
from bench.runner import MetricsCallback, run_one
from bench.spec import RunSpec
from bench.trackers import Session, Tracking, parse_report_to, project_name

SMALL = dict(steps=2, eval_size=8, probe_size=4, probe_every=1, kl_step_seqs=4, checkpoint_every=2,
             max_completion_length=32)
TIMING = ("step_seconds", "time_generation", "time_reference", "time_policy", "time_other", "time_metrics")
RUN_FLAGS = ["run", "--methods", "kl_free_lora", "--ranks", "4", "--steps", "2", "--no-progress"]


def _installed(name):
    return importlib.util.find_spec(name) is not None


# ---- refusals: one line, exit 2, nothing written ---------------------------------------------------------------

def test_report_to_parsing():
    assert parse_report_to(None) == () and parse_report_to("none") == () and parse_report_to("") == ()
    assert parse_report_to("TensorBoard, trackio") == ("tensorboard", "trackio")
    for bad, why in (("tensorbord", "unknown tracker 'tensorbord'"), ("wandb,wandb", "listed twice"),
                     ("wandb,,mlflow", "empty item")):
        with pytest.raises(BenchError, match=why):
            parse_report_to(bad)
    assert project_name("/x/synth-gsm tiny:#1/") == "synth-gsm-tiny-1"


def test_report_to_from_a_config_file(tmp_path):
    from bench.config import load_config_file
    (tmp_path / "sweep.yaml").write_text("report-to: [tensorboard, trackio]\n")
    options = load_config_file(tmp_path / "sweep.yaml")
    assert parse_report_to(options["report_to"]) == ("tensorboard", "trackio")


def _refused(tmp_path, capsys, *flags):
    out = tmp_path / "sweep"
    code = main([*RUN_FLAGS, "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists()  # refused before any run directory (or the sweep directory) was made
    return err


def test_unknown_tracker_is_refused_before_training(tmp_path, capsys):
    assert "unknown tracker 'nope'" in _refused(tmp_path, capsys, "--report-to", "tensorboard,nope")


def test_missing_tracker_package_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from transformers.integrations import integration_utils
    monkeypatch.setattr(integration_utils, "is_trackio_available", lambda: False)
    err = _refused(tmp_path, capsys, "--report-to", "trackio")
    assert "trackio package is not installed" in err and ".[trackers]" in err


def test_wandb_without_credentials_is_refused_outside_offline_mode(tmp_path, capsys, monkeypatch):
    from transformers.integrations import integration_utils
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert "no W&B API key" in _refused(tmp_path, capsys, "--report-to", "wandb")


def test_session_sets_tracker_environment_for_the_run_only(tmp_path, monkeypatch):
    for name in ("WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_DIR", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI",
                 "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "mine")  # the user's own setting wins and survives
    session = Session(Tracking(("wandb", "mlflow"), "sweep-x"), "run_a", tmp_path / "run_a")
    assert os.environ["WANDB_PROJECT"] == "mine" and os.environ["WANDB_RUN_GROUP"] == "sweep-x"
    assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "mlruns").resolve().as_uri()
    assert session.grpo_settings() == {"report_to": ["wandb", "mlflow"], "run_name": "run_a", "project": "sweep-x",
                                       "trackio_static_space_id": False}
    session.callbacks = []  # nothing attached: close only ends open tracker runs and restores the environment
    session.close(ok=True)
    assert os.environ["WANDB_PROJECT"] == "mine"
    assert all(k not in os.environ for k in ("WANDB_RUN_GROUP", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"))
    assert Session(None, "r", tmp_path).grpo_settings() == {}  # no tracker: TRL's report_to stays "none"


def test_a_failed_run_ends_its_tracker_runs(tmp_path, monkeypatch):
    """close() ends what the integrations leave open when train() raises, so that the next run of an in-process
    sweep starts its own tracker run instead of writing into this one."""
    names = tuple(n for n in ("wandb", "trackio") if _installed(n))
    if not names:
        pytest.skip("neither wandb nor trackio is installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    session = Session(Tracking(names, "sweep-f"), "run_f", tmp_path / "run_f")
    (tmp_path / "run_f").mkdir()
    if "wandb" in names:
        import wandb
        wandb.init(name="run_f")  # as WandbCallback.setup does, with the environment the session set
    if "trackio" in names:
        import trackio
        trackio.init(project="sweep-f", name="run_f")
    session.close(ok=False)
    if "wandb" in names:
        assert wandb.run is None
        assert list((tmp_path / "run_f" / "wandb").glob("offline-run-*"))  # WANDB_DIR: the run directory
    if "trackio" in names:
        assert trackio.context_vars.current_run.get() is None


# ---- one run reporting to every installed tracker, next to the same run without any ----------------------------

def _trackers_here():
    names = ["tensorboard"]
    names += [n for n in ("trackio", "wandb", "mlflow") if _installed(n)]
    return tuple(names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    if not _installed("tensorboard"):
        pytest.skip("tensorboard is not installed (pip install -e \".[test]\")")
    root = tmp_path_factory.mktemp("trackers")
    names = _trackers_here()
    saved = {k: os.environ.get(k) for k in ("TRACKIO_DIR", "WANDB_MODE")}
    os.environ["TRACKIO_DIR"] = str(root / "trackio")  # local and offline: nothing leaves the machine
    os.environ["WANDB_MODE"] = "offline"
    try:
        spec = RunSpec(method="proma", rank=4, **SMALL)  # proma: a method observable (proma_removed_frac) too
        plain = run_one(spec, root / "plain" / spec.run_id, progress=False)
        tracked = run_one(spec, root / "sweep-t" / spec.run_id, progress=False,
                          tracking=Tracking(names, "sweep-t"))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert plain["status"] == "ok" and tracked["status"] == "ok", (plain.get("error"), tracked.get("error"))
    return {"root": root, "spec": spec, "names": names, "dir": root / "sweep-t" / spec.run_id,
            "plain_dir": root / "plain" / spec.run_id}


def _harness_values(run_dir):
    """{(name, step): value} of every metrics.jsonl number the harness itself measures (TRL's own metrics, copied
    into the rows, go to the trackers under train/ already)."""
    trl_keys = set(MetricsCallback.TRL_KEYS.values())
    return {(k, r["step"]): v for r in read_jsonl(run_dir / "metrics.jsonl") for k, v in r.items()
            if k != "step" and k not in trl_keys and isinstance(v, (int, float)) and math.isfinite(v)}


@pytest.mark.slow
def test_metrics_with_trackers_are_those_without(runs):
    def strip(run_dir):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert strip(runs["dir"]) == strip(runs["plain_dir"])
    a, b = read_json(runs["dir"] / "summary.json"), read_json(runs["plain_dir"] / "summary.json")
    assert a["accuracy"] == b["accuracy"] and a["kl_ref"] == b["kl_ref"]


@pytest.mark.slow
def test_tensorboard_holds_trl_and_harness_metrics_and_the_config(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(runs["dir"] / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/reward", "train/grad_norm"} <= scalars  # TRL's own, through its report_to
    expected = _harness_values(runs["dir"])
    assert {("kl_ref", 0), ("kl_step", 1), ("proma_removed_frac", 2), ("time_generation", 1)} <= set(expected)
    for (name, step), value in expected.items():
        events = {e.step: e.value for e in acc.Scalars(f"train/bench/{name}")}
        assert events[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (name, step)  # stored as float32
    text = acc.Tensors("bench/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n"))["run_id"] == runs["spec"].run_id


@pytest.mark.slow
def test_trackio_offline_run_holds_harness_metrics_and_config(runs):
    if "trackio" not in runs["names"]:
        pytest.skip("trackio is not installed")
    from trackio.sqlite_storage import SQLiteStorage
    os.environ["TRACKIO_DIR"] = str(runs["root"] / "trackio")
    try:
        logs = SQLiteStorage.get_logs("sweep-t", runs["spec"].run_id)
        config = SQLiteStorage.get_run_config("sweep-t", runs["spec"].run_id)
    finally:
        os.environ.pop("TRACKIO_DIR")
    got = {(k.removeprefix("train/bench/"), int(row["train/global_step"])): v for row in logs for k, v in row.items()
           if k.startswith("train/bench/")}
    expected = _harness_values(runs["dir"])
    assert set(expected) <= set(got)
    assert all(got[key] == pytest.approx(value, rel=1e-12) for key, value in expected.items())
    assert any("train/loss" in row for row in logs)
    assert config["bench"]["run_id"] == runs["spec"].run_id and config["run_name"] == runs["spec"].run_id


@pytest.mark.slow
def test_mlflow_local_store_holds_harness_metrics(runs):
    if "mlflow" not in runs["names"]:
        pytest.skip("mlflow is not installed")
    from mlflow.tracking import MlflowClient
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=(runs["root"] / "sweep-t" / "mlruns").resolve().as_uri())
        experiment = client.get_experiment_by_name("sweep-t")
        run, = client.search_runs([experiment.experiment_id])
        assert run.info.run_name == runs["spec"].run_id and run.info.status == "FINISHED"
        assert client.get_metric_history(run.info.run_id, "loss")  # TRL's own (MLflow's integration: no train/)
        for (name, step), value in _harness_values(runs["dir"]).items():
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"bench/{name}")}
            assert history[step] == pytest.approx(value, rel=1e-12), (name, step)
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE")


def _wandb_records(run_folder):
    """The records of a W&B offline run file: LevelDB's log format (32 KiB blocks, 7-byte record headers: crc32,
    length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) after W&B's 7-byte file header, each record a wandb_internal_pb2
    Record (https://github.com/google/leveldb/blob/main/doc/log_format.md)."""
    import struct

    from wandb.proto import wandb_internal_pb2
    data = next(run_folder.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, part, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the block's end
            pos += left
            continue
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_harness_metrics_and_config(runs):
    if "wandb" not in runs["names"]:
        pytest.skip("wandb is not installed")
    folder, = (runs["dir"] / "wandb").glob("offline-run-*")
    records = _wandb_records(folder)
    run, = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project, run.run_group) == (runs["spec"].run_id, "sweep-t", "sweep-t")
    got = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                if k.startswith("train/bench/"):
                    got[(k.removeprefix("train/bench/"), items["train/global_step"])] = v
    expected = _harness_values(runs["dir"])
    assert set(expected) <= set(got)
    assert all(got[key] == pytest.approx(value, rel=1e-12) for key, value in expected.items())
    config_keys = {i.key or i.nested_key[0] for r in records if r.WhichOneof("record_type") == "config"
                   for i in r.config.update}
    assert {"bench", "learning_rate", "beta"} <= config_keys
