"""Child process of tests/test_runner_kill.py: run one run and SIGKILL this process at the named phase.

usage: python _kill_at.py PHASE RUN_DIR SPEC_JSON
"""
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["BENCH_EVAL_MEMO"] = "0"

from transformers import Trainer, TrainerState  # noqa: E402

from bench import generation, runner  # noqa: E402
from bench.spec import RunSpec  # noqa: E402

phase, run_dir, spec = sys.argv[1], Path(sys.argv[2]), RunSpec.from_dict(json.loads(sys.argv[3]))


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if phase in ("before_first_checkpoint", "between_checkpoints"):
    at = 1 if phase == "before_first_checkpoint" else spec.checkpoint_every + 1
    on_log = runner.MetricsCallback.on_log

    def on_log_then_die(self, args, state, control, logs=None, **kw):
        on_log(self, args, state, control, logs=logs, **kw)
        if state.global_step == at and logs and "loss" in logs:  # step `at` recorded, its checkpoint not taken
            die()
    runner.MetricsCallback.on_log = on_log_then_die
elif phase == "while_saving_a_checkpoint":
    save_to_json = TrainerState.save_to_json

    def save_then_die(self, json_path):  # the checkpoint's weights are written, its trainer_state.json is not
        if self.global_step == spec.checkpoint_every:
            die()
        save_to_json(self, json_path)
    TrainerState.save_to_json = save_then_die
elif phase == "after_last_checkpoint":
    save_checkpoint = Trainer._save_checkpoint

    def save_checkpoint_then_die(self, model, trial):
        save_checkpoint(self, model, trial)
        if self.state.global_step == spec.steps:
            die()
    Trainer._save_checkpoint = save_checkpoint_then_die
elif phase == "during_final_eval":
    greedy_accuracy, calls = generation.greedy_accuracy, []

    def second_eval_dies(*args, **kwargs):  # the first call is the base eval, the second the final one
        calls.append(1)
        if len(calls) == 2:
            die()
        return greedy_accuracy(*args, **kwargs)
    runner.greedy_accuracy = second_eval_dies  # the runner's own name for it (imported at the top of bench.runner)
elif phase == "while_saving_the_adapter":
    replace = os.replace

    def replace_or_die(src, dst):  # the adapter is written to its temporary folder, not yet moved into place
        if Path(dst).name in ("adapter", "model"):
            die()
        replace(src, dst)
    runner.os.replace = replace_or_die
else:
    raise SystemExit(f"unknown phase {phase}")

runner.run_one(spec, run_dir, progress=False)
raise SystemExit("the run finished without being killed")
