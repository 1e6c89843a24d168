"""One run: RunSpec -> trained policy -> run directory (config.json, metrics.jsonl, summary.json).

Data flow: task (prompts + reward) -> method (policy) -> TRL GRPOTrainer (engine) -> bench.metrics.
Interrupted runs resume from the last checkpoint (every `checkpoint_every` steps); finished runs are skipped.
"""
from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import threading
import time
import traceback
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.errors import BenchError
from bench.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json, read_jsonl
from bench.runlock import RunHeld, run_lock
from bench.metrics import PROBE_SAMPLING
from bench.spec import RunSpec, stored_key
from bench.threads import env_threads, torch_threads

DONE = ("ok", "diverged")  # finished states; a `failed` run is retried when the sweep is re-run


class Diverged(Exception):
    pass


class Preempted(Exception):
    """Training stopped on request (SLURM preemption or time limit) after saving a checkpoint."""


# Set (e.g. by a SLURM signal handler) to ask the running run to stop at the end of the current generation batch,
# save a checkpoint there, and return with status `preempted`; re-running the run resumes from that checkpoint.
STOP_REQUESTED = threading.Event()


def versions() -> dict:
    import peft
    import transformers
    import trl
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "bench": __import__("bench").__version__}


def git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class PeakMemory:
    """Peak memory of one run: GPU max allocated on CUDA; on CPU the process's resident set, sampled every 20 ms
    (ru_maxrss would carry an earlier run's peak over to every later run of an in-process sweep)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil
            process = psutil.Process()

            def sample():
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, process.memory_info().rss)
            self.peak = process.memory_info().rss
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


class MetricsCallback(TrainerCallback):
    """Writes one metrics.jsonl row per optimizer step (row 0: before any update)."""

    PHASES = ("generation", "reference", "policy", "metrics")
    TRL_KEYS = {"reward": "reward", "reward_std": "reward_std", "loss": "loss", "grad_norm": "grad_norm",
                "kl": "kl_trl", "entropy": "entropy_trl", "clip_ratio/region_mean": "clip_ratio",
                "completions/mean_length": "completion_length", "frac_reward_zero_std": "frac_reward_zero_std"}

    def __init__(self, path: Path, probe, reference, tokenizer, spec: RunSpec, rows: list, bar=None):
        self.path, self.probe, self.reference, self.tokenizer = path, probe, reference, tokenizer
        self.spec, self.rows, self.bar = spec, rows, bar
        self.trainer = None
        self.pending: dict | None = None
        self.last_reward = float("nan")
        self.stopped_at: int | None = None

    def _snapshot(self):
        return {k: self.trainer.phase_seconds[k] for k in self.PHASES}, self.trainer.generated_tokens, \
            time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.last = self._snapshot()
        if state.global_step == 0 and not self.rows:
            with self.trainer.timed("metrics"), torch_threads(self.trainer.forward_threads):
                m = self.probe.measure(model, self.tokenizer, self.reference)
            # before any update: no step has happened and no rollout exists yet
            self.rows.append({"step": 0, **m, "entropy": m["entropy_probe"], "kl_step": None, "reward": None})
            atomic_write_jsonl(self.path, self.rows)
            self.last = self._snapshot()

    def on_step_end(self, args, state, control, model=None, **kw):
        if not all(torch.isfinite(p).all() for p in self.reference.trainable()):
            raise Diverged(f"parameters not finite after step {state.global_step}")
        row = {"step": state.global_step}
        with self.trainer.timed("metrics"), torch_threads(self.trainer.forward_threads):
            row.update(self.trainer.step_metrics)
            row.update(self.trainer.step_kl.after_step(model))
            if state.global_step % self.spec.probe_every == 0 or state.global_step == state.max_steps:
                row.update(self.probe.measure(model, self.tokenizer, self.reference))
        self.trainer.step_metrics = {}
        # A stop request takes effect at a generation-batch boundary: TRL does not checkpoint its buffered
        # rollouts, so resuming there gives exactly the run that was not interrupted.
        if STOP_REQUESTED.is_set() and state.global_step % (args.steps_per_generation //
                                                            args.gradient_accumulation_steps) == 0:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        phases, tokens, now = self._snapshot()
        (prev_phases, prev_tokens, prev_now) = self.last
        for k in self.PHASES:
            row[f"time_{k}"] = phases[k] - prev_phases[k]
        row["step_seconds"] = now - prev_now - row["time_metrics"]  # the method's own cost, metrics excluded
        row["time_other"] = row["step_seconds"] - row["time_generation"] - row["time_reference"] - row["time_policy"]
        row["tokens"] = tokens - prev_tokens
        self.last = (phases, tokens, now)
        self.pending = row

    def on_log(self, args, state, control, logs=None, **kw):
        if self.pending is None or logs is None or "loss" not in logs:
            return
        row, self.pending = self.pending, None
        for key, name in self.TRL_KEYS.items():
            if logs.get(key) is not None:
                row[name] = float(logs[key])
        self.rows.append(row)
        atomic_write_jsonl(self.path, self.rows)
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
    from bench.models import cache_root
    return cache_root() / "evals"


def run_threads(spec: RunSpec) -> int | None:
    """Torch threads for a run: BENCH_NUM_THREADS if set; else 1 for a model under 50M parameters on CPU (see
    bench.sweep.default_threads), wherever the run happens; else None (the process's setting)."""
    if pinned := env_threads("BENCH_NUM_THREADS"):
        return pinned
    from bench.sweep import default_threads
    try:
        return default_threads([spec])
    except BenchError:  # the model's configuration is unreadable: the run itself will say why
        return None


# The cores this process may use for one run's forward passes: None = all of them (sweep._worker_init sets a
# parallel worker's share).
FORWARD_CORES: int | None = None
MAX_FORWARD_THREADS = 4  # a cap, not a measurement: only 1 vs 2 threads was timed (bench.perf, README)


def forward_threads(spec: RunSpec, model, tokenizer, prompts: list) -> int | None:
    """Threads for the run's forward passes (rollout generation, old and reference log-probs, the training forward,
    greedy evals, metric forwards) where a small model runs with one thread (run_threads): the run's free cores.
    Backward passes keep the run's one thread: LoRA weight gradients sum over tokens, and those sums are split
    across threads. Used only where forward_is_thread_invariant holds on this model and machine, so the metrics stay
    those of the same run inside a parallel sweep. None: no split."""
    if pinned := env_threads("BENCH_FORWARD_THREADS"):
        return pinned
    if env_threads("BENCH_NUM_THREADS") or run_threads(spec) != 1:
        return None
    from bench.sweep import cpu_count
    n = min(FORWARD_CORES or cpu_count(), MAX_FORWARD_THREADS)
    if n <= 1 or not forward_is_thread_invariant(model, tokenizer, prompts, n, spec.temperature):
        return 1
    return n


def forward_is_thread_invariant(model, tokenizer, prompts: list, n: int, temperature: float = 1.0) -> bool:
    """Whether forwards on n threads give this model's one-thread floats, checked bitwise on what the run does: a
    short greedy generation (adapters folded, as for rollouts and evals) and a logits forward; and TRL's training
    path, the backbone forward with gradients and TRL's fused log-prob head (pinned trl 1.16), on n threads, with
    its backward on one thread: log-probs, entropies and every gradient."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    from bench.generation import eval_mode, generate
    prompts = list(prompts)[:64]  # a generation batch's worth of rows
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = base.get_decoder(), base.get_output_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def once(threads):
        with torch_threads(threads), torch.no_grad():
            texts, out = generate(model, tokenizer, prompts, max_new_tokens=8, greedy=True, batch_size=len(prompts))
            prompt_ids, prompt_mask, completion_ids = out["batches"][0]
            ids = torch.cat([prompt_ids, completion_ids], 1)
            mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
            with eval_mode(model):
                logits = model(input_ids=ids, attention_mask=mask).logits
        rows = slice(0, 16)  # a micro-batch
        with eval_mode(model), torch.enable_grad():
            with torch_threads(threads):
                hidden = backbone(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state[:, :-1]
                fused = _ChunkedLogProbFunction.apply(
                    hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, ids[rows, 1:].reshape(-1),
                    temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, OPTIONAL_OUTPUTS)
            loss = (fused[0] * mask[rows, 1:].reshape(-1)).sum() + fused[1].sum()
            grads = torch.autograd.grad(loss, trainable) if trainable and loss.requires_grad else ()
        return texts, [logits, *(t for t in fused if t is not None), *grads]

    (texts_1, tensors_1), (texts_n, tensors_n) = once(1), once(n)
    return texts_1 == texts_n and all(torch.equal(a, b) for a, b in zip(tensors_1, tensors_n))


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


def run_one(spec: RunSpec, run_dir: Path, progress: bool = True, position: int = 1, bar=None) -> dict:
    """Run (or skip, or resume) one run; always leaves a summary.json with its status. A run that another process
    is running (it holds the run directory's lock, bench.runlock) is left to it: the returned status is `held`,
    and nothing in the directory is touched.
    bar: an object with tqdm's update/set_postfix/close to report steps to instead of a bar of its own."""
    run_dir = Path(run_dir)
    if (finished := check_run_dir(spec, run_dir)) is not None:
        return finished
    try:
        with run_lock(run_dir):
            # checked again under the lock: another process may have finished it in the meantime
            if (finished := check_run_dir(spec, run_dir)) is not None:
                return finished
            with torch_threads(run_threads(spec)):  # before config.json records the thread count
                return _run_one(spec, run_dir, progress, position, bar)
    except RunHeld as held:
        return {"run_id": spec.run_id, "method": spec.method, "rank": str(spec.rank), "seed": spec.seed,
                "status": "held", "error": f"being run by another process ({held.holder}); left to it"}


def _run_one(spec: RunSpec, run_dir: Path, progress: bool, position: int, bar) -> dict:
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.json"
    from methods import get_method
    method = get_method(spec.method)
    atomic_write_json(config_path, {
        "spec": spec.to_dict(), "spec_key": spec.key(), "run_id": spec.run_id,
        "method": {"name": method.name, "summary": method.summary, "cite": method.cite,
                   "beta": method.resolved_beta(spec.method_params),
                   "init_lora_weights": str(method.resolved_init(spec.method_params)),
                   "params": method.resolve_params(spec.method_params),
                   "grpo_overrides": method.grpo_overrides},
        "metrics": {"temperature": spec.temperature, "probe_sampling": PROBE_SAMPLING},
        "versions": versions(), "git_sha": git_sha(), "machine": {"platform": platform.platform(),
                                                                   "cpus": os.cpu_count(),
                                                                   "torch_threads": torch.get_num_threads()}})
    t0 = time.perf_counter()
    summary = {"run_id": spec.run_id, "method": spec.method, "rank": str(spec.rank), "seed": spec.seed}
    try:
        summary.update(_train(spec, method, run_dir, progress, position, bar))
        summary["status"] = "ok"
        if spec.final_eval == "lm-eval":
            from bench.evaluate import evaluate_run
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
    _remove_if_empty(run_dir / "checkpoints")  # a run that failed before its first checkpoint
    if summary["status"] != "ok" and (run_dir / "metrics.jsonl").is_file():
        summary.update(_aggregate(read_jsonl(run_dir / "metrics.jsonl")))
    atomic_write_json(summary_path, summary)
    return summary


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
    }
    for phase in ("generation", "reference", "policy", "other", "metrics"):
        out[f"time_{phase}_s"] = round(sum(r.get(f"time_{phase}", 0.0) for r in steps), 3)
    out["wall_clock_s"] = round(sum(r.get("step_seconds", 0.0) for r in steps), 3)
    tokens = sum(r.get("tokens", 0) for r in steps)
    out["tokens_per_s"] = tokens / out["wall_clock_s"] if out["wall_clock_s"] else None
    return out


def _train(spec: RunSpec, method, run_dir: Path, progress: bool, position: int, bar=None) -> dict:
    device = resolve_device(spec.device)
    with PeakMemory(device) as memory:
        out = _train_measured(spec, method, run_dir, progress, position, device, bar)
    out["peak_mem_mb"] = memory.mb
    return out


def _train_measured(spec: RunSpec, method, run_dir: Path, progress: bool, position: int, device: str,
                    bar=None) -> dict:
    from datasets import Dataset
    from tqdm.auto import tqdm

    from bench.engine import make_trainer
    from bench.generation import greedy_accuracy
    from bench.metrics import InitialPolicy, ProbeSet
    from bench.models import load_policy, uses_chat_template
    from bench.policy import InitKLToBase, build_policy, trainable_parameters, trained_set
    from tasks import chat_prompt, get_task, plain_prompt

    t_setup = time.perf_counter()
    task = get_task(spec.task, **spec.task_params)
    model, tokenizer = load_policy(spec.model, device=device, progress=progress)
    to_prompt = chat_prompt if uses_chat_template(tokenizer) else plain_prompt
    train, evals = task.training_examples(spec.eval_split), task.examples(spec.eval_split)  # dev: bench.tune
    if spec.eval_size is not None:
        evals = evals[:spec.eval_size]
    probe_examples = evals[:spec.probe_size]

    params = method.resolve_params(spec.method_params)
    init_kl = InitKLToBase(model, method, spec.rank, params, tokenizer,  # SVD inits: pi_0 vs base (bf16 rounding)
                           [to_prompt(e.question) for e in probe_examples], spec.temperature)
    t_init = time.perf_counter()
    policy = build_policy(model, method, spec.rank, spec.lora_alpha, spec.seed, params, spec.lora_dropout,
                          spec.use_rslora)
    init_seconds = time.perf_counter() - t_init
    residual = spec.rank != "full" and method.modifies_base(params)  # base weights now hold W - s*B0*A0
    adapter_init_dir = run_dir / "adapter_init"
    if residual and not adapter_init_dir.exists():
        policy.save_pretrained(adapter_init_dir)  # the initial adapter: to convert the trained one for reload
    reference = InitialPolicy(policy)
    init_kl = init_kl.measure(policy)
    eval_prompts, eval_golds = [to_prompt(e.question) for e in evals], [e.gold for e in evals]
    eval_ids = [e.id if e.id is not None else str(i) for i, e in enumerate(evals)]  # stable across runs: paired stats
    eval_tokens = spec.max_completion_length
    fwd_threads = forward_threads(spec, policy, tokenizer, eval_prompts)
    t_eval = time.perf_counter()
    with torch_threads(fwd_threads):
        base = greedy_accuracy(policy, tokenizer, eval_prompts, eval_golds, eval_tokens, spec.eval_batch,
                               memo_dir=eval_memo_dir(), ids=eval_ids)  # shared by runs starting from these weights
    atomic_write_jsonl(run_dir / "eval_base.jsonl", base["items"])
    eval_seconds = time.perf_counter() - t_eval

    dataset = Dataset.from_list([{"prompt": to_prompt(e.question), "gold": e.gold} for e in train])
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint = _latest_checkpoint(run_dir)
    rows = []
    if checkpoint is not None and metrics_path.is_file():
        done = int(checkpoint.name.split("-")[-1])
        rows = [r for r in read_jsonl(metrics_path) if r["step"] <= done]
    else:
        checkpoint = None
    done_steps = max((r["step"] for r in rows), default=0)
    if bar is None:
        bar = tqdm(total=spec.steps, initial=done_steps, desc=spec.run_id, position=position, leave=False,
                   disable=not progress)
    elif done_steps:
        bar.update(done_steps)
    probe = ProbeSet([to_prompt(e.question) for e in probe_examples], spec.max_completion_length, seed=spec.seed,
                     temperature=spec.temperature)
    callback = MetricsCallback(metrics_path, probe, reference, tokenizer, spec, rows, bar)
    trainer = make_trainer(spec, method, params, policy, tokenizer, dataset, str(run_dir / "checkpoints"),
                           chat=to_prompt is chat_prompt, device=device, callbacks=[callback],
                           log_path=run_dir / "run.log", forward_threads=fwd_threads)
    callback.trainer = trainer
    setup_seconds = time.perf_counter() - t_setup - init_seconds - eval_seconds
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
    t_eval = time.perf_counter()
    with torch_threads(fwd_threads):
        final = greedy_accuracy(policy, tokenizer, eval_prompts, eval_golds, eval_tokens, spec.eval_batch,
                                ids=eval_ids)
    atomic_write_jsonl(run_dir / "eval_final.jsonl", final["items"])
    eval_seconds += time.perf_counter() - t_eval
    save_trained(policy, run_dir, residual)
    out = _aggregate(rows)
    out.update({
        "status": "ok", "accuracy_base": base["accuracy"], "accuracy": final["accuracy"],
        "accuracy_gain": final["accuracy"] - base["accuracy"], "accuracy_base_memoized": base["memoized"],
        "accuracy_flexible_base": base["accuracy_flexible"], "accuracy_flexible": final["accuracy_flexible"],
        "eval_n": base["n"], "eval_seconds": round(eval_seconds, 3), "init_seconds": round(init_seconds, 4),
        "setup_seconds": round(setup_seconds, 3), "forward_threads": fwd_threads or torch.get_num_threads(),
        "trainable_params": trainable_parameters(policy), "trained_set": trained_set(policy), **init_kl,
        "device": device, "resumed_from": checkpoint.name if checkpoint else None,
    })
    out.update(trainer.method_summary)
    return out
