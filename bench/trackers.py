"""Experiment trackers: TensorBoard, trackio, Weights & Biases and MLflow, through TRL's own `report_to`.

TRL's GRPOTrainer logs through transformers' integration callbacks (transformers.integrations.integration_utils:
TensorBoardCallback, TrackioCallback, WandbCallback, MLflowCallback), which record the whole GRPOConfig and the
model's config when the run starts and TRL's metrics at every logging step (under `train/`). On top of that this
module sends to the same callbacks:
- the harness's own per-step metrics, each metrics.jsonl row (kl_ref, kl_step, entropy, phase times, a method's
  observables such as proma_removed_frac) under `train/bench/<name>`, at the row's step (row 0 at step 0);
- the run's config.json (RunSpec, resolved method parameters, versions, git commit), once.
Run name = the run id; project (trackio; wandb and MLflow unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say
otherwise) and wandb group = the sweep (its output directory's name). Sampled completions: TRL's
`log_completions` (`--set grpo='{log_completions: true}'`) logs a table to wandb and trackio and writes parquet
files, kept in the run directory's completions/.

Trackers are optional (`pip install -e ".[trackers]"`); with none (the default) nothing here runs and a run is
exactly what it is without this module.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

# name -> (package to install, transformers' availability check)
TRACKERS = {"tensorboard": ("tensorboard", "is_tensorboard_available"),
            "trackio": ("trackio", "is_trackio_available"),
            "wandb": ("wandb", "is_wandb_available"),
            "mlflow": ("mlflow", "is_mlflow_available")}
HARNESS_PREFIX = "bench/"  # the integrations prefix `train/` (transformers' rewrite_logs)
WANDB_QUIET_MODES = ("offline", "disabled", "dryrun")


@dataclass(frozen=True)
class Tracking:
    """Where a sweep's runs report: tracker names (empty: none) and the sweep's name. Picklable: it travels to
    parallel workers and SLURM array tasks with each run."""
    names: tuple[str, ...] = ()
    project: str = "grpo-bench"

    def __bool__(self) -> bool:
        return bool(self.names)


def parse_report_to(value) -> tuple[str, ...]:
    """`--report-to`: a comma list of tracker names, or none (also empty / unset)."""
    if value is None:
        return ()
    items = [v.strip().lower() for v in str(value).split(",")]
    if items == ["none"] or items == [""]:
        return ()
    if not all(items):
        raise BenchError(f"bad --report-to {value!r}: an empty item between commas")
    unknown = [v for v in items if v not in TRACKERS]
    if unknown:
        raise BenchError(f"unknown tracker {unknown[0]!r} in --report-to; valid: {', '.join(TRACKERS)} (or none)")
    if len(set(items)) < len(items):
        raise BenchError(f"bad --report-to {value!r}: a tracker listed twice")
    return tuple(items)


def project_name(out: Path) -> str:
    """The sweep's name as a tracker project: its directory's name, in the characters every tracker accepts
    (W&B refuses / \\ # ? % : in project names)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(out).resolve().name).strip("-.")
    return name[:100] or "grpo-bench"


def check_available(names) -> None:
    """Every tracker can start here: its package imports (transformers' own check) and, for W&B outside offline
    mode, an API key is set. Called before any training: a tracker that cannot start is a one-line error."""
    from transformers.integrations import integration_utils
    for name in names:
        package, check = TRACKERS[name]
        if not getattr(integration_utils, check)():
            raise BenchError(f"--report-to {name}: the {package} package is not installed "
                             f"(pip install -e \".[trackers]\" or pip install {package})")
        if name == "wandb" and os.environ.get("WANDB_MODE", "").lower() not in WANDB_QUIET_MODES \
                and not _wandb_key():
            raise BenchError("--report-to wandb: no W&B API key (run `wandb login`, set WANDB_API_KEY, or set "
                             "WANDB_MODE=offline to log locally and `wandb sync` later)")


def _wandb_key() -> bool:
    """Whether W&B has credentials without asking: WANDB_API_KEY, an identity token file, or the netrc entry that
    `wandb login` writes for the W&B host (https://docs.wandb.ai/ref/cli/wandb-login)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_tracking(report_to, out: Path) -> Tracking:
    names = parse_report_to(report_to)
    check_available(names)
    return Tracking(names, project_name(out))


class Session:
    """One run's trackers: the GRPOConfig settings that turn TRL's integrations on, the environment they read
    (set for the run, restored after), the harness's rows and config sent to them, and their closing, also when the
    run fails (so that the next run of an in-process sweep opens its own tracker run)."""

    def __init__(self, tracking: Tracking | None, run_id: str, run_dir: Path):
        self.tracking = tracking or Tracking()
        self.run_id, self.run_dir = run_id, Path(run_dir)
        self.callbacks: list = []
        self.config_sent = False
        self.skip: set[str] = set()
        self._env: dict[str, str | None] = {}
        if not self.tracking:
            return
        names = self.tracking.names
        if "wandb" in names:
            self._setenv("WANDB_PROJECT", self.tracking.project)
            self._setenv("WANDB_RUN_GROUP", self.tracking.project)
            self._setenv("WANDB_DIR", str(self.run_dir))  # offline runs land in the run directory
            self._setenv("WANDB_SILENT", "true")
        if "mlflow" in names:
            self._setenv("MLFLOW_EXPERIMENT_NAME", self.tracking.project)
            if "MLFLOW_TRACKING_URI" not in os.environ:
                # a local file store next to the sweep's runs; MLflow 3 asks for an explicit opt-in to it
                # (https://mlflow.org/docs/latest/self-hosting/migrate-from-file-store)
                self._setenv("MLFLOW_TRACKING_URI", (self.run_dir.parent / "mlruns").resolve().as_uri())
                self._setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def _setenv(self, key: str, value: str) -> None:
        """Set for this run unless the user set it (their W&B project, MLflow server...)."""
        if key not in os.environ:
            self._env[key] = None
            os.environ[key] = value

    def grpo_settings(self) -> dict:
        """GRPOConfig fields that TRL's integrations read; {} without trackers (TRL's report_to stays "none")."""
        if not self.tracking:
            return {}
        return {"report_to": list(self.tracking.names), "run_name": self.run_id, "project": self.tracking.project,
                "trackio_static_space_id": False}  # local trackio: no Hub Space snapshot at the end

    def attach(self, trainer, metrics_callback) -> None:
        """Point the integrations at this run's directory and route the harness's rows to them."""
        if not self.tracking:
            return
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        classes = tuple(INTEGRATION_TO_CALLBACK[n] for n in self.tracking.names)
        self.callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, classes)]
        for cb in self.callbacks:
            if type(cb).__name__ == "TensorBoardCallback" and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
                cb.logging_dir = str(self.run_dir / "tensorboard")  # not output_dir: checkpoints/ is removed
        self.skip = set(type(metrics_callback).TRL_KEYS.values())  # TRL's own metrics: already logged under train/
        metrics_callback.report = self.report

    def report(self, row: dict, args, state, control, model=None) -> None:
        """One metrics.jsonl row to every tracker, at its step (the integrations log at state.global_step)."""
        if not self.config_sent:
            self._send_config()
        logs = {f"{HARNESS_PREFIX}{k}": float(v) for k, v in row.items()
                if k != "step" and k not in self.skip and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v)}
        for cb in self.callbacks:
            cb.on_log(args, state, control, model=model, logs=dict(logs))

    def _send_config(self) -> None:
        self.config_sent = True
        try:
            config = json.loads((self.run_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        for cb in self.callbacks:
            kind = type(cb).__name__
            if kind == "TensorBoardCallback" and cb.tb_writer is not None:
                cb.tb_writer.add_text("bench/config", "```\n" + json.dumps(config, indent=1) + "\n```")
            elif kind in ("WandbCallback", "TrackioCallback"):
                module = cb._wandb if kind == "WandbCallback" else cb._trackio
                if getattr(module, "config", None) is not None:
                    module.config.update({"bench": config}, allow_val_change=True)
            elif kind == "MLflowCallback" and cb._ml_flow.active_run() is not None:
                cb._ml_flow.log_dict(config, "bench_config.json")
                cb._ml_flow.set_tags({"bench.run_id": self.run_id, "bench.sweep": self.tracking.project})

    def close(self, ok: bool) -> None:
        """End this run in every tracker (the integrations end it only after a completed train()), keep TRL's
        completion tables, and restore the environment."""
        self._keep_completions()
        try:
            if "tensorboard" in self.tracking.names:
                for cb in self.callbacks:
                    if type(cb).__name__ == "TensorBoardCallback" and cb.tb_writer is not None:
                        cb.tb_writer.close()
                        cb.tb_writer = None
            # a tracker whose module this process never imported has no run open: nothing to end
            if "wandb" in self.tracking.names and (wandb := sys.modules.get("wandb")) is not None:
                if wandb.run is not None:
                    wandb.finish(exit_code=0 if ok else 1)
                # wandb keeps the settings of its first run in a process-wide singleton (WANDB_DIR included): torn
                # down, the next run of an in-process sweep reads its own (https://docs.wandb.ai/ref/python/teardown)
                wandb.teardown()
            if "trackio" in self.tracking.names and (trackio := sys.modules.get("trackio")) is not None:
                if trackio.context_vars.current_run.get() is not None:
                    trackio.finish()
            if "mlflow" in self.tracking.names and (mlflow := sys.modules.get("mlflow")) is not None:
                if mlflow.active_run() is not None:
                    mlflow.end_run(status="FINISHED" if ok else "FAILED")
        finally:
            for key, old in self._env.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old
            self._env = {}

    def _keep_completions(self) -> None:
        """TRL writes log_completions' parquet files under output_dir (the run's checkpoints/, removed afterwards)."""
        src = self.run_dir / "checkpoints" / "completions"
        if src.is_dir() and any(src.iterdir()):
            dst = self.run_dir / "completions"
            dst.mkdir(exist_ok=True)
            for f in src.iterdir():
                shutil.copy2(f, dst / f.name)
