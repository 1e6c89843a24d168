"""One run: RunSpec -> trained policy -> run directory (config.json, metrics.jsonl, summary.json).

Data flow: task (prompts + reward) -> method (policy) -> TRL GRPOTrainer (engine) -> bench.metrics.
A run's phases, one function each: prepare (model, the method's policy, the eval set), the base eval, resume (the
last checkpoint and its metrics rows), train (the trainer, to the step budget or a stop request), the final eval,
and summarize (the summary.json fields, bench.results). Interrupted runs resume from the last checkpoint (every
`checkpoint_every` steps); finished runs are skipped.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import TrainerCallback

from bench import distributed
from bench.device import PeakMemory, resolve_device, run_device
from bench.engine import make_trainer
from bench.errors import BenchError
from bench.evaluate import evaluate_run
from bench.generation import greedy_accuracy
from bench.health import RunHealth
from bench.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json, read_jsonl
from bench.metrics import PROBE_SAMPLING, InitialPolicy, ProbeSet
from bench.models import cache_root, load_policy, uses_chat_template
from bench.parallel import decode_threads, forward_threads, run_threads
from bench.policy import InitKLToBase, build_policy, trainable_parameters, trained_set
from bench.progress import count_prompts
from bench.progress import phase as phase_bar
from bench.provenance import git_sha, run_machine, versions
from bench.results import DONE, identity, outcome, read_summary
from bench.runlock import RunHeld, run_lock
from bench.spec import RunSpec, stored_key
from bench.threads import torch_threads
from bench.trackers import Session
from methods import Method, get_method
from tasks import chat_prompt, get_task, plain_prompt


class Diverged(Exception):
    pass


class Preempted(Exception):
    """Training stopped on request (SLURM preemption or time limit) after saving a checkpoint."""


# Set by request_stop (e.g. from a SLURM signal handler) to ask the running run to stop at the end of the current
# generation batch, save a checkpoint there, and return with status `preempted`; re-running the run resumes from
# that checkpoint.
_STOP_REQUESTED = threading.Event()


def request_stop() -> None:
    """Ask the run in progress to stop at its next generation-batch boundary, with a checkpoint (safe in a signal
    handler)."""
    _STOP_REQUESTED.set()


def clear_stop_request() -> None:
    _STOP_REQUESTED.clear()


class MetricsCallback(TrainerCallback):
    """Writes one metrics.jsonl row per optimizer step (row 0: before any update)."""

    PHASES = ("generation", "reference", "policy", "metrics")
    TRL_KEYS = {"reward": "reward", "reward_std": "reward_std", "loss": "loss", "grad_norm": "grad_norm",
                "kl": "kl_trl", "entropy": "entropy_trl", "clip_ratio/region_mean": "clip_ratio",
                "completions/mean_length": "completion_length", "frac_reward_zero_std": "frac_reward_zero_std",
                # completions that hit the budget without EOS (TRL: the last token is neither EOS nor padding)
                "completions/clipped_ratio": "frac_truncated"}

    def __init__(self, path: Path, probe, reference, tokenizer, spec: RunSpec, rows: list, bar=None,
                 main: bool = True):
        self.path, self.probe, self.reference, self.tokenizer = path, probe, reference, tokenizer
        self.spec, self.rows, self.bar = spec, rows, bar
        # a multi-process run's rank > 0 (bench.distributed): it measures and writes nothing, but stops and
        # diverges at the same step as rank 0 (the others would wait for it in the next collective)
        self.main = main
        self.trainer = None
        self.report = None  # where rows also go: an experiment tracker session (bench.trackers.Session.report)
        self.pending: dict | None = None
        self.last_reward = float("nan")
        self.stopped_at: int | None = None
        self.health = RunHealth(spec.run_id, spec.max_completion_length)
        for row in rows:  # a resumed run: its earlier steps were already judged (and warned about)
            self.health.check(row)
        self.warnings: list[str] = []

    def _snapshot(self):
        return {k: self.trainer.phase_seconds[k] for k in self.PHASES}, self.trainer.generated_tokens, \
            time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.last = self._snapshot()
        if self.main and state.global_step == 0 and not self.rows:
            with self.trainer.timed("metrics"), torch_threads(self.trainer.forward_threads):
                m = self.probe.measure(model, self.tokenizer, self.reference)
            # before any update: no step has happened and no rollout exists yet
            self.rows.append({"step": 0, **m, "entropy": m["entropy_probe"], "kl_step": None, "reward": None})
            atomic_write_jsonl(self.path, self.rows)
            if self.report is not None:
                self.report(self.rows[-1], args, state, control, model=model)
            self.last = self._snapshot()

    def on_step_end(self, args, state, control, model=None, **kw):
        if not all(torch.isfinite(p).all() for p in self.reference.trainable()):
            raise Diverged(f"parameters not finite after step {state.global_step}")
        row = {"step": state.global_step}
        if self.main:
            with self.trainer.timed("metrics"), torch_threads(self.trainer.forward_threads):
                row.update(self.trainer.pop_step_metrics())  # a method's (bench.engine's contract), then ours
                row.update(self.trainer.step_kl.after_step(model))
                if state.global_step % self.spec.probe_every == 0 or state.global_step == state.max_steps:
                    row.update(self.probe.measure(model, self.tokenizer, self.reference))
        else:
            self.trainer.pop_step_metrics()
            self.trainer.step_kl.discard()
        # A stop request takes effect at a generation-batch boundary: TRL does not checkpoint its buffered
        # rollouts, so resuming there gives exactly the run that was not interrupted. (Every rank of a multi-process
        # run asks the others: they stop at the same step.)
        if state.global_step % (args.steps_per_generation // args.gradient_accumulation_steps) == 0 and \
                distributed.any_rank(_STOP_REQUESTED.is_set()):
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        if not self.main:
            return
        phases, tokens, now = self._snapshot()
        (prev_phases, prev_tokens, prev_now) = self.last
        for k in self.PHASES:
            row[f"time_{k}"] = phases[k] - prev_phases[k]
        row["step_seconds"] = now - prev_now - row["time_metrics"]  # the method's own cost, metrics excluded
        row["time_other"] = row["step_seconds"] - row["time_generation"] - row["time_reference"] - row["time_policy"]
        row["tokens"] = tokens - prev_tokens
        self.last = (phases, tokens, now)
        self.pending = row

    def warn(self, message: str) -> None:
        """One line on stderr (above the progress bars) and in run.log; kept for summary.json."""
        self.warnings.append(message)
        tqdm.write(f"warning: {message}", file=sys.stderr)
        with open(self.path.parent / "run.log", "a") as f:
            f.write(f"warning: {message}\n")

    def on_log(self, args, state, control, logs=None, **kw):
        if not self.main:  # TRL's logged values are gathered over the ranks: every rank sees rank 0's
            bad = [k for k in ("loss", "grad_norm") if logs and k in logs and not math.isfinite(float(logs[k]))]
            if bad:
                raise Diverged(f"{' and '.join(bad)} not finite at step {state.global_step}")
            return
        if self.pending is None or logs is None or "loss" not in logs:
            return
        row, self.pending = self.pending, None
        for key, name in self.TRL_KEYS.items():
            if logs.get(key) is not None:
                row[name] = float(logs[key])
        self.rows.append(row)
        atomic_write_jsonl(self.path, self.rows)
        for message in self.health.check(row):
            self.warn(message)
        if self.report is not None:
            self.report(row, args, state, control, model=kw.get("model"))
        if self.bar is not None:
            self.bar.update(1)
            if "reward" in row:
                self.last_reward = row["reward"]
            self.bar.set_postfix(reward=f"{self.last_reward:.2f}", kl_step=f"{row.get('kl_step', float('nan')):.1e}")
        bad = [k for k in ("loss", "grad_norm") if k in row and not math.isfinite(row[k])]
        if bad:
            raise Diverged(f"{' and '.join(bad)} not finite at step {row['step']}")


def save_trained(policy, run_dir: Path, residual: bool) -> None:
    """The trained adapter in run_dir/adapter, loadable onto the *original* base model with
    PeftModel.from_pretrained. For residual inits (the base holds W - s*B0*A0) PEFT converts it against the
    initial adapter into a rank-2r LoRA of the whole update; full fine-tuning saves the model (safetensors)."""
    out = run_dir / "adapter" if hasattr(policy, "peft_config") else run_dir / "model"
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if residual:
        policy.save_pretrained(tmp, selected_adapters=["default"],
                               path_initial_model_for_weight_conversion=str(run_dir / "adapter_init"))
    elif hasattr(policy, "peft_config"):
        policy.save_pretrained(tmp, selected_adapters=["default"])  # not TRL's "ref" copy
    else:
        policy.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint (the Trainer writes trainer_state.json last: a process killed while saving
    leaves a folder without it)."""
    ckpts = sorted((p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def eval_memo_dir() -> Path | None:
    """Where base-policy greedy completions are memoized (bench.generation.greedy_completions): the model cache's
    evals/ folder; BENCH_EVAL_MEMO=0 turns it off."""
    if os.environ.get("BENCH_EVAL_MEMO", "1") == "0":
        return None
    return cache_root() / "evals"


def check_run_dir(spec: RunSpec, run_dir: Path) -> dict | None:
    """What run_dir holds for this spec: its finished summary (None: nothing finished yet). A directory that holds
    another configuration, or whose config.json cannot be read, is a BenchError: its checkpoints cannot be told
    apart from this run's. A summary.json that cannot be read (cut by a crash or a full disk) is not a finished run:
    the run is resumed or re-run, and the summary rewritten."""
    config_path, summary_path = run_dir / "config.json", run_dir / "summary.json"
    if config_path.is_file():
        try:
            key = stored_key(read_json(config_path))
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            key = None
        if key is None:
            raise BenchError(f"{config_path} is unreadable (cut short or not a run's config): cannot tell which run "
                             f"{run_dir} holds; move or delete that directory to run {spec.run_id} again") from None
        if key != spec.key():
            raise BenchError(f"{run_dir} holds run {spec.run_id} with a different configuration; use another --out")
    if summary_path.is_file():
        try:
            old = read_json(summary_path)
        except (OSError, ValueError):
            return None
        if isinstance(old, dict) and old.get("status") in DONE:
            return old
    return None


def unfinished_runs(specs, out: Path) -> list:
    """The specs whose run directory under `out` holds no finished run (check_run_dir), in order."""
    return [spec for spec in specs if check_run_dir(spec, out / spec.run_id) is None]


def run_one(spec: RunSpec, run_dir: Path, progress: bool = True, position: int = 1, bar=None,
            tracking=None, nproc: int = 1) -> dict:
    """Run (or skip, or resume) one run; always leaves a summary.json with its status. A run that another process
    is running (it holds the run directory's lock, bench.runlock) is left to it: the returned status is `held`,
    and nothing in the directory is touched.
    bar: an object with tqdm's update/set_postfix/close to report steps to instead of a bar of its own.
    tracking: experiment trackers to report to (bench.trackers.Tracking; None: none).
    nproc: data-parallel processes for the run (bench.distributed; 1: this process)."""
    run_dir = Path(run_dir)
    if (finished := check_run_dir(spec, run_dir)) is not None:
        return finished
    try:
        with run_lock(run_dir):
            # checked again under the lock: another process may have finished it in the meantime
            if (finished := check_run_dir(spec, run_dir)) is not None:
                return finished
            if nproc > 1:
                return _run_launched(spec, run_dir, nproc, progress, bar, tracking)
            with torch_threads(run_threads(spec)):  # before config.json records the thread count
                return _run_one(spec, run_dir, progress, position, bar, tracking)
    except RunHeld as held:
        return outcome(spec, "held", f"being run by another process ({held.holder}); left to it")


def _run_launched(spec: RunSpec, run_dir: Path, nproc: int, progress: bool, bar, tracking) -> dict:
    """The run as `nproc` processes (bench.distributed.launch); rank 0 writes its files and summary.json. Where
    no process got to write summary.json (a rank failed and torchrun stopped the others, or one was killed), the
    run is recorded `failed` here, with the failing rank's error."""
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)  # not a finished run's (check_run_dir): one from an earlier attempt
    threads = run_threads(spec) or max(1, torch.get_num_threads() // nproc)
    t0 = time.perf_counter()
    code, error = distributed.launch(spec, run_dir, nproc, threads=threads, progress=progress and bar is None,
                                     tracking=tracking, stop_requested=_STOP_REQUESTED.is_set)
    summary, _ = read_summary(summary_path)  # None: absent, unreadable or not a run summary
    if summary is not None and summary.get("status") == "failed" and any(run_dir.glob("error_rank*.log")):
        # rank 0 failed because another rank did (a closed connection in a collective): that rank's error is the cause
        summary["error"] = f"{error} (rank0: {summary.get('error')})"[:500]
        atomic_write_json(summary_path, summary)
    elif summary is None:
        summary = identity(spec)
        summary.update(status="failed", world_size=nproc, sharding=spec.sharding,
                       error=f"a process of the {nproc}-process run failed (exit code {code}): {error}"[:500])
        if (run_dir / "metrics.jsonl").is_file():
            summary.update(_aggregate(read_jsonl(run_dir / "metrics.jsonl")))
        summary["run_seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(summary_path, summary)
    if bar is not None and summary.get("steps_done"):
        bar.update(summary["steps_done"])
    return summary


def run_rank(spec: RunSpec, run_dir: Path, progress: bool, tracking=None) -> str:
    """One rank of a multi-process run (bench.ddp_worker): the run as in one process, rank 0 writing its files;
    returns the run's status (on ranks > 0: ok, or failed after writing error_rank<r>.log)."""
    return _run_one(spec, Path(run_dir), progress, 1, None, tracking)["status"]


def _run_one(spec: RunSpec, run_dir: Path, progress: bool, position: int, bar, tracking=None) -> dict:
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.json"
    method = get_method(spec.method)
    if not distributed.is_main():
        return _follow(spec, method, run_dir)
    atomic_write_json(config_path, {
        "spec": spec.to_dict(), "spec_key": spec.key(), "run_id": spec.run_id,
        "method": {"name": method.name, "summary": method.summary, "cite": method.cite,
                   "beta": method.resolved_beta(spec.method_params),
                   "init_lora_weights": str(method.resolved_init(spec.method_params)),
                   "params": method.resolve_params(spec.method_params),
                   "grpo_overrides": method.grpo_overrides,
                   "data_parallel": method.data_parallel or distributed.DEFAULT_MEANING},
        "metrics": {"temperature": spec.temperature, "probe_sampling": PROBE_SAMPLING},
        "versions": versions(), "git_sha": git_sha(), "machine": run_machine()})
    t0 = time.perf_counter()
    summary = identity(spec)
    try:
        summary.update(_train(spec, method, run_dir, progress, position, bar, tracking))
        summary["status"] = "ok"
        if spec.final_eval == "lm-eval":
            summary["lm_eval"] = evaluate_run(run_dir, write=False)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    except Diverged as e:
        summary.update(status="diverged", error=str(e))
    except Preempted as e:
        summary.update(status="preempted", error=str(e))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing run is recorded (traceback in error.log) and the sweep goes on
        summary.update(status="failed", error=f"{type(e).__name__}: {e}".strip().splitlines()[0][:500])
        atomic_write_text(run_dir / "error.log", traceback.format_exc())
    summary["run_seconds"] = round(time.perf_counter() - t0, 2)
    summary.setdefault("world_size", distributed.world_size())
    summary.setdefault("sharding", spec.sharding)
    _remove_if_empty(run_dir / "checkpoints")  # a run that failed before its first checkpoint
    if summary["status"] != "ok" and (run_dir / "metrics.jsonl").is_file():
        summary.update(_aggregate(read_jsonl(run_dir / "metrics.jsonl")))
    atomic_write_json(summary_path, summary)
    return summary


def _follow(spec: RunSpec, method: Method, run_dir: Path) -> dict:
    """A rank > 0 of a multi-process run: trains alongside rank 0 and writes nothing but, on failure,
    error_rank<r>.log (rank 0 writes the run's files)."""
    try:
        _train(spec, method, run_dir, False, 1)
        return {"status": "ok"}
    except Diverged as e:
        return {"status": "diverged", "error": str(e)}
    except Preempted as e:
        return {"status": "preempted", "error": str(e)}
    except KeyboardInterrupt:
        raise
    except Exception:
        atomic_write_text(run_dir / f"error_rank{distributed.rank()}.log", traceback.format_exc())
        return {"status": "failed"}


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # absent, or not empty
        pass


def _aggregate(rows: list[dict]) -> dict:
    steps = [r for r in rows if r["step"] > 0]
    probes = [r for r in rows if "kl_ref" in r]
    last = probes[-1] if probes else {}
    rewards = [r.get("reward") for r in steps if r.get("reward") is not None]
    tail = max(1, len(rewards) // 4)
    out = {
        "steps_done": steps[-1]["step"] if steps else 0,
        "kl_ref": last.get("kl_ref"), "kl_ref_k3": last.get("kl_ref_k3"),
        "kl_step": _mean(r.get("kl_step") for r in steps),
        "kl_step_max": max((r["kl_step"] for r in steps if "kl_step" in r), default=None),
        "entropy": last.get("entropy_probe"), "entropy_base": rows[0].get("entropy_probe") if rows else None,
        "entropy_rollout": _mean(r.get("entropy") for r in steps[-tail:]),
        "reward": _mean(rewards[-tail:]), "reward_first": _mean(rewards[:tail]),
        "frac_truncated": _mean(r.get("frac_truncated") for r in steps),
    }
    for phase in ("generation", "reference", "policy", "other", "metrics"):
        out[f"time_{phase}_s"] = round(sum(r.get(f"time_{phase}", 0.0) for r in steps), 3)
    out["wall_clock_s"] = round(sum(r.get("step_seconds", 0.0) for r in steps), 3)
    tokens = sum(r.get("tokens", 0) for r in steps)
    out["tokens_per_s"] = tokens / out["wall_clock_s"] if out["wall_clock_s"] else None
    return out


def _train(spec: RunSpec, method: Method, run_dir: Path, progress: bool, position: int, bar=None,
           tracking=None) -> dict:
    device = resolve_device(spec.device)
    with PeakMemory(device) as memory:
        out = _train_measured(spec, method, run_dir, progress, position, device, bar, tracking)
    out["peak_mem_mb"] = memory.mb
    return out


# ---- the phases of a run ---------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A policy ready to train: the loaded model with the method's adapter (or full fine-tuning) built on it."""
    method: Method
    params: dict           # the method's resolved parameters
    policy: object
    tokenizer: object
    to_prompt: Callable    # question -> prompt (the chat template where the tokenizer has one)
    residual: bool         # the initializer wrote W - s*B0*A0 into the base weights (SVD inits)
    init_seconds: float    # building the policy (the adapter's initialization)
    init_kl: dict          # KL(pi_0 || base) for residual inits (bench.policy.InitKLToBase), else {}

    @property
    def chat(self) -> bool:
        return self.to_prompt is chat_prompt


def prepare(spec: RunSpec, method: Method, device: str, progress: bool = True, model: str | None = None,
            attn: str | None = None, init_kl_questions: list[str] = ()) -> Prepared:
    """Load the model (spec.model unless `model`) and build the method's policy on it with the spec's rank, alpha,
    dropout and seed. init_kl_questions: where KL(pi_0 || base) is measured for residual inits. Used by runs and
    by `bench perf`, so both start from the same policy."""
    base, tokenizer = load_policy(model or spec.model, device=device, progress=progress, attn=attn)
    to_prompt = chat_prompt if uses_chat_template(tokenizer) else plain_prompt
    params = method.resolve_params(spec.method_params)
    init_kl = InitKLToBase(base, method, spec.rank, params, tokenizer,  # SVD inits: pi_0 vs base (bf16 rounding)
                           [to_prompt(q) for q in init_kl_questions], spec.temperature)
    t_init = time.perf_counter()
    with phase_bar(f"building the policy ({method.name} init)", enabled=progress):  # SVD inits take minutes on 8B
        policy = build_policy(base, method, spec.rank, spec.lora_alpha, spec.seed, params, spec.lora_dropout,
                              spec.use_rslora)
    init_seconds = time.perf_counter() - t_init
    return Prepared(method=method, params=params, policy=policy, tokenizer=tokenizer, to_prompt=to_prompt,
                    residual=spec.rank != "full" and method.modifies_base(params), init_seconds=init_seconds,
                    init_kl=init_kl.measure(policy))


@dataclass
class EvalSet:
    """The eval problems as prompts, with their gold answers and stable item ids (paired statistics)."""
    prompts: list
    golds: list
    ids: list

    @classmethod
    def of(cls, examples: list, to_prompt: Callable) -> EvalSet:
        return cls([to_prompt(e.question) for e in examples], [e.gold for e in examples],
                   [e.id if e.id is not None else str(i) for i, e in enumerate(examples)])


def greedy_eval(spec: RunSpec, prep: Prepared, evals: EvalSet, threads: int | None, memo_dir: Path | None = None,
                bar: dict | None = None):
    """The greedy eval of the policy as it is now (bench.generation.greedy_accuracy); memo_dir: memoize (only for
    the base policy, which runs starting from the same weights share); bar: bench.progress.phase's arguments."""
    bar = bar or {"desc": "eval", "enabled": False}
    with torch_threads(threads), phase_bar(total=len(evals.prompts), unit="prompt", **bar) as counter, \
            count_prompts(prep.policy, counter):
        return greedy_accuracy(prep.policy, prep.tokenizer, evals.prompts, evals.golds, spec.max_completion_length,
                               spec.eval_batch, memo_dir=memo_dir, ids=evals.ids,
                               fast=spec.generation_backend != "transformers")  # bench.decode where supported


def resume_point(run_dir: Path) -> tuple[Path | None, list[dict]]:
    """(the last complete checkpoint, the metrics rows up to its step); (None, []) for a fresh start."""
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint = _latest_checkpoint(run_dir)
    if checkpoint is None or not metrics_path.is_file():
        return None, []
    done = int(checkpoint.name.split("-")[-1])
    return checkpoint, [r for r in read_jsonl(metrics_path) if r["step"] <= done]


def build_trainer(spec: RunSpec, prep: Prepared, run_dir: Path, dataset, device: str, callback, threads,
                  report: dict | None = None, decode_threads: int | None = None):
    """The run's trainer (bench.engine.make_trainer) with the metrics callback, checkpointing into run_dir;
    report: experiment-tracker settings for TRL's report_to (bench.trackers.Session.grpo_settings)."""
    trainer = make_trainer(spec, prep.method, prep.params, prep.policy, prep.tokenizer, dataset,
                           str(run_dir / "checkpoints"), chat=prep.chat, device=device, callbacks=[callback],
                           log_path=run_dir / "run.log", forward_threads=threads, report=report,
                           decode_threads=decode_threads)
    callback.trainer = trainer
    return trainer


def train(spec: RunSpec, trainer, callback, checkpoint: Path | None, done_steps: int, bar) -> None:
    """Train to spec.steps from `checkpoint` (or the start); Preempted where a stop request ended it earlier."""
    try:
        if done_steps >= spec.steps:
            # The budget was trained before the process died (in the final eval or while saving): only load the
            # last checkpoint's weights, as train() would on resume. train() itself would take one more step:
            # the Trainer checks max_steps only after a step.
            trainer._load_from_checkpoint(str(checkpoint))  # transformers' own loader (pinned 5.24)
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        bar.close()
    if callback.stopped_at is not None and callback.stopped_at < spec.steps:
        raise Preempted(f"stopped at step {callback.stopped_at} on request; checkpoint saved, re-run to resume")


def summarize(rows: list[dict], base: dict, final: dict, prep: Prepared, *, device: str, threads: int | None,
              checkpoint: Path | None, seconds: dict, method_summary: dict, decode_threads: int | None = None) -> dict:
    """The summary.json fields of a finished training (bench.results.RUN_FIELDS, then the method's own fields);
    seconds: eval (base and final), eval_base (the base eval alone; default: eval), init and setup seconds."""
    out = _aggregate(rows)
    out.update({
        "status": "ok", "accuracy_base": base["accuracy"], "accuracy": final["accuracy"],
        "accuracy_gain": final["accuracy"] - base["accuracy"], "accuracy_base_memoized": base["memoized"],
        "accuracy_flexible_base": base["accuracy_flexible"], "accuracy_flexible": final["accuracy_flexible"],
        "eval_n": base["n"], "eval_seconds": round(seconds["eval"], 3),
        "eval_base_seconds": round(seconds.get("eval_base", seconds["eval"]), 3),
        "init_seconds": round(seconds["init"], 4),
        "setup_seconds": round(seconds["setup"], 3), "forward_threads": threads or torch.get_num_threads(),
        "decode_threads": decode_threads or threads or torch.get_num_threads(),
        "trainable_params": trainable_parameters(prep.policy), "trained_set": trained_set(prep.policy),
        **prep.init_kl, "device": device, **run_device(device), "resumed_from": checkpoint.name if checkpoint else None,
    })
    out.update(method_summary)
    return out


def _train_measured(spec: RunSpec, method: Method, run_dir: Path, progress: bool, position: int, device: str,
                    bar=None, tracking=None) -> dict:
    # prepare: the task, the policy, the initial policy kept for kl_ref, the eval set and its base accuracy
    t_setup = time.perf_counter()
    task = get_task(spec.task, **spec.task_params)
    # a run evaluated on dev (a tuning trial, bench.tune) trains without the dev items
    train_examples, evals = task.training_examples(spec.eval_split), task.examples(spec.eval_split)
    if spec.eval_size is not None:
        evals = evals[:spec.eval_size]
    probe_questions = [e.question for e in evals[:spec.probe_size]]
    prep = prepare(spec, method, device, progress, init_kl_questions=probe_questions)
    main = distributed.is_main()
    adapter_init_dir = run_dir / "adapter_init"
    if main and prep.residual and not adapter_init_dir.exists():
        prep.policy.save_pretrained(adapter_init_dir)  # the initial adapter: to convert the trained one for reload
    reference = InitialPolicy(prep.policy)
    eval_set = EvalSet.of(evals, prep.to_prompt)
    at = {"enabled": progress, "position": position + 1}  # phase bars: below the run's step bar
    with phase_bar(f"{spec.run_id}: checking forwards on several threads", **at):
        fwd_threads = forward_threads(spec, prep.policy, prep.tokenizer, eval_set.prompts)
    dec_threads = decode_threads(fwd_threads)
    t_eval = time.perf_counter()
    if main:  # (a multi-process run's other ranks wait: the eval is the 1-process run's)
        base = greedy_eval(spec, prep, eval_set, dec_threads, memo_dir=eval_memo_dir(),  # shared by runs from these
                           bar={"desc": f"{spec.run_id}: base eval", **at})                # weights
        atomic_write_jsonl(run_dir / "eval_base.jsonl", base["items"])
    distributed.barrier()
    eval_seconds = eval_base_seconds = time.perf_counter() - t_eval

    # resume, then train
    dataset = Dataset.from_list([{"prompt": prep.to_prompt(e.question), "gold": e.gold} for e in train_examples])
    checkpoint, rows = resume_point(run_dir)
    done_steps = max((r["step"] for r in rows), default=0)
    if bar is None:
        bar = tqdm(total=spec.steps, initial=done_steps, desc=spec.run_id, position=position, leave=False,
                   disable=not progress)
    elif done_steps:
        bar.update(done_steps)
    probe = ProbeSet([prep.to_prompt(q) for q in probe_questions], spec.max_completion_length, seed=spec.seed,
                     temperature=spec.temperature, progress=progress, position=position + 1, threads=dec_threads)
    callback = MetricsCallback(run_dir / "metrics.jsonl", probe, reference, prep.tokenizer, spec, rows, bar,
                               main=main)
    trackers = Session(tracking, spec.run_id, run_dir)  # experiment trackers (none by default)
    trainer = build_trainer(spec, prep, run_dir, dataset, device, callback, fwd_threads,
                            report=trackers.grpo_settings(), decode_threads=dec_threads)
    trackers.attach(trainer, callback)
    trainer.show_progress, trainer.progress_position = progress, position + 1  # checkpoint saves
    setup_seconds = time.perf_counter() - t_setup - prep.init_seconds - eval_seconds
    trained = False
    try:
        train(spec, trainer, callback, checkpoint, done_steps, bar)
        trained = True
    except Preempted:  # trained up to a checkpoint: the tracker run ends cleanly, the resumed run continues it
        trained = True
        raise
    finally:
        trackers.close(ok=trained)
    if not main:
        return {}

    # evaluate, save, summarize
    t_eval = time.perf_counter()
    final = greedy_eval(spec, prep, eval_set, dec_threads, bar={"desc": f"{spec.run_id}: final eval", **at})
    atomic_write_jsonl(run_dir / "eval_final.jsonl", final["items"])
    eval_seconds += time.perf_counter() - t_eval
    saved = "adapter" if hasattr(prep.policy, "peft_config") else "model"
    with phase_bar(f"{spec.run_id}: saving the trained {saved}", **at):
        save_trained(prep.policy, run_dir, prep.residual)
    out = summarize(rows, base, final, prep, device=device, threads=fwd_threads, checkpoint=checkpoint,
                    decode_threads=dec_threads,
                    seconds={"eval": eval_seconds, "eval_base": eval_base_seconds, "init": prep.init_seconds,
                             "setup": setup_seconds},
                    method_summary=trainer.method_summary)
    if callback.warnings:
        out["warnings"] = callback.warnings
    return out
