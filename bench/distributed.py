"""One run as N data-parallel processes (`bench run --nproc-per-run N`): TRL's GRPOTrainer under accelerate's DDP
(gloo on CPU, NCCL on CUDA; https://huggingface.co/docs/trl/distributing_training).

How a run is launched: the harness process that owns the run (it holds the run directory's lock, bench.runlock)
writes the run's spec to `RUN_DIR/.launch.json` and starts `python -m torch.distributed.run --standalone
--nproc-per-node N -m bench.ddp_worker RUN_DIR`. torchrun rather than torch.multiprocessing because it is what
accelerate and TRL document for multi-process training, it picks a free rendezvous port itself (`--standalone`: two
local runs at a time never collide), and it tears every process down when one fails, so a failing process cannot
leave the others waiting in a collective. Every process builds the same policy and trainer; accelerate initializes
the process group from torchrun's environment (RANK, WORLD_SIZE, ...) and TRL's trainer does the rest.

What stays the same as the 1-process run: the global batch. Each process takes micro_batch / N completions per
micro-batch (refused where N does not divide micro_batch), gradient_accumulation_steps and steps_per_generation are
unchanged, so TRL 1.16's generation_batch_size = per_device_train_batch_size x N x steps_per_generation
(grpo_config.py) and the completions per optimizer step (micro_batch x grad_accum) are those of the 1-process run.
TRL gathers rewards across processes before normalizing advantages per group, and DDP averages the gradients.

What differs, and why a 2-process run is not the 1-process run bit for bit: TRL seeds each process's sampling with
seed + rank (set_seed(device_specific=True)), generates each process's share of the prompts separately, and each
process shuffles its own slice of the generation batch into its micro-batches; so the completions, and which of them
an optimizer step sees, differ from the 1-process run (the same distribution, another draw). With the rollouts fixed
and one optimizer step per generation batch, the updates agree to float rounding (tests/test_distributed.py).

Files: rank 0 alone writes config.json, metrics.jsonl, eval_*.jsonl, the adapter and summary.json (checkpoints
through the Trainer's own rank-0 saving; each rank adds its RNG state file); rank 0 runs the greedy evals and the
probe measurements on its unwrapped model while the other ranks wait (the evals then equal the 1-process run's:
same prompts, same batches). A rank r > 0 that fails writes error_rank<r>.log; the harness then records the run
`failed` (the sweep goes on).

SVD initializations (geora, pissa, milora) run on every rank from the same weights and seed, and DDP's module-state
broadcast from rank 0 at wrap time (torch's _sync_module_states: every parameter, trainable or frozen, and every
buffer) makes all ranks hold rank 0's adapter and residual base weights (tested: tests/test_distributed.py).

Each method's meaning under data parallelism is its `Method.data_parallel` text (`bench list --methods`), default
DEFAULT_MEANING.

Sharding (RunSpec.sharding, `--sharding`; check_sharding refuses what cannot run, before any run starts):
- ddp (default): every process holds the whole policy, its gradients and its optimizer state (above).
- zero2: DeepSpeed ZeRO stage 2 through transformers' DeepSpeed integration (GRPOConfig's `deepspeed`, a config dict
  whose "auto" values transformers fills from the GRPOConfig: https://huggingface.co/docs/transformers/deepspeed;
  TRL documents the same through accelerate configs: https://huggingface.co/docs/trl/distributing_training). The
  optimizer state and the gradients are partitioned over the processes; the parameters stay whole on every rank,
  so rank 0's evals, probe measurements and saving work as under DDP. DeepSpeed broadcasts every parameter from
  rank 0 when it wraps the model (DeepSpeedEngine._broadcast_model: trainable and frozen, so SVD inits' residuals
  too), trains bf16 weights with fp32 master copies in the optimizer (its bf16 mode, where DDP on CUDA keeps fp32
  weights under autocast), and steps the optimizer inside the last micro-batch's backward (accelerate's
  DeepSpeedEngineWrapper.backward), so the engine reads kl_step's pre-step distribution before that backward
  (BenchGRPOTrainer.capture_before_backward). accelerate runs DeepSpeed on GPUs only: refused without CUDA or
  without the deepspeed package (not a dependency). Not run on this project's CPU machine: untested.
- zero3, fsdp: they partition the parameters too. accelerate 1.15 ignores an FSDP plugin on CPU (the run would
  silently be DDP: distributed type MULTI_CPU), and on GPUs rank 0 would hold a shard only, while the harness
  measures (kl_ref, kl_step, entropy), evaluates and saves the policy on rank 0's whole weights between training
  steps, with the other ranks waiting. Both are refused with that reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from bench.errors import BenchError
from bench.io import atomic_write_json, read_json

LAUNCH = ".launch.json"  # the run's spec and launch settings, for the worker processes
STOP = ".stop-request"   # created by the harness when it was asked to stop (SLURM preemption): the ranks stop together
WORKER = ["-m", "bench.ddp_worker"]  # what torchrun starts in each process (a test may start a wrapper of it)
TIMEOUT = timedelta(hours=2)  # collectives: the other ranks wait this long while rank 0 runs a greedy eval

DEFAULT_MEANING = ("the same objective: each process computes TRL's loss on its micro_batch / N completions and "
                   "DDP averages the gradients; per-micro-batch statistics are over each process's micro-batch")


def world_size() -> int:
    """Processes of this run (1 outside a multi-process run): torchrun's WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The process that writes the run's files (always true in a 1-process run)."""
    return rank() == 0


def _initialized() -> bool:
    import torch.distributed as dist
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """All ranks wait here (nothing in a 1-process run)."""
    if _initialized():
        import torch.distributed as dist
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank where it is true on any (a collective: every rank must call it at the same point); the
    flag itself in a 1-process run."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist
    backend = dist.get_backend()
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def per_process_batch(micro_batch: int) -> int:
    """The per-process micro-batch of this process's run (the global micro_batch in a 1-process run)."""
    return micro_batch // world_size()


def parse_nproc(value) -> int:
    """--nproc-per-run: a positive integer (None: 1)."""
    if value is None:
        return 1
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise BenchError(f"bad --nproc-per-run {value!r}: a positive integer")
    return n


PARAMETER_SHARDING = ("zero3", "fsdp")  # shardings that partition the parameters (refused: module docstring)


def check_sharding(specs, nproc: int, local: bool = True) -> None:
    """Refuse, before any run, a sharding that cannot run these specs as `nproc` processes here (module docstring;
    a method that cannot run sharded is refused by RunSpec itself, Method.refuses_sharding). local: the runs start
    on this machine, whose GPUs are checked (on SLURM the task's node has them)."""
    import importlib.util

    from bench.device import resolve_device
    for name in sorted({spec.sharding for spec in specs} - {"ddp"}):
        if name in PARAMETER_SHARDING:
            cpu = " (and accelerate ignores FSDP on CPU)" if name == "fsdp" else ""
            raise BenchError(f"--sharding {name}: partitions the parameters over the processes, but the harness "
                             "measures (kl_ref, kl_step), evaluates and saves the policy on rank 0's whole weights"
                             f"{cpu}; not supported: zero2 partitions the optimizer state and gradients only")
        if nproc < 2:
            raise BenchError(f"--sharding {name}: partitions over the processes of a run; it needs --nproc-per-run 2 "
                             "or more")
        missing = []
        if any(spec.device == "cpu" for spec in specs) or \
                (local and any(resolve_device(spec.device) != "cuda" for spec in specs)):
            missing.append("CUDA (accelerate runs DeepSpeed on GPUs only; " +
                           ("this machine shows none)" if local else "device cpu)"))
        if importlib.util.find_spec("deepspeed") is None:
            missing.append("the deepspeed package (pip install deepspeed, on a CUDA machine; not a dependency)")
        if missing:
            raise BenchError(f"--sharding {name} needs " + " and ".join(missing))


def check_nproc(specs, nproc: int, local: bool = True) -> None:
    """Refuse, before any run, what N data-parallel processes per run cannot do (the sharding too). local: the runs
    start on this machine (on SLURM the node is checked by the task)."""
    check_sharding(specs, nproc, local)
    if nproc == 1:
        return
    from bench.device import resolve_device, visible_gpus
    for spec in specs:
        if spec.micro_batch % nproc:
            raise BenchError(f"--nproc-per-run {nproc}: micro_batch {spec.micro_batch} is not divisible by {nproc} "
                             "(each process takes micro_batch / N completions, so that the global batch is that of "
                             "the 1-process run)")
        if spec.device.startswith("cuda:"):
            raise BenchError(f"--nproc-per-run {nproc}: device {spec.device} names one GPU; use --device cuda (each "
                             "process takes its own)")
    if local and any(resolve_device(s.device) == "cuda" for s in specs):
        gpus = visible_gpus()
        if len(gpus) < nproc:
            raise BenchError(f"--nproc-per-run {nproc}: this machine shows {len(gpus)} GPU(s); one per process")


def multiprocess_settings(on_cuda: bool, sharding: str = "ddp") -> dict:
    """GRPOConfig fields of a multi-process run (none in a 1-process run): the collective timeout (the other ranks
    wait through rank 0's greedy evals), the backend, and for zero2 the DeepSpeed config."""
    if world_size() == 1:
        return {}
    out = {"ddp_timeout": int(TIMEOUT.total_seconds()), "ddp_backend": "nccl" if on_cuda else "gloo",
           "ddp_find_unused_parameters": False}
    if uses_deepspeed(sharding):
        out["deepspeed"] = deepspeed_config(stage=2)
    elif sharding != "ddp":
        raise BenchError(f"--sharding {sharding}: not supported (bench.distributed.check_sharding)")
    return out


def deepspeed_config(stage: int) -> dict:
    """DeepSpeed's config for a ZeRO stage, as transformers' DeepSpeed integration takes it (GRPOConfig.deepspeed):
    every "auto" is filled from the GRPOConfig (batch sizes, accumulation, clipping, bf16 as the harness sets it),
    so the run's own settings hold. No optimizer or scheduler section: DeepSpeed wraps the Trainer's own (AdamW,
    one of ZeRO's supported optimizers; the constant schedule)."""
    return {"zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_scatter": True, "allgather_partitions": True},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def uses_deepspeed(sharding: str) -> bool:
    return sharding == "zero2"


# ---- the harness side: launch N processes for one run ----------------------------------------------------------

def launch(spec, run_dir: Path, nproc: int, *, threads: int, progress: bool, tracking=None,
           stop_requested=lambda: False) -> tuple[int, str]:
    """Run `spec` in run_dir as `nproc` processes (torchrun); returns (exit code, the first failing rank's error
    line or ''). threads: torch threads per process. stop_requested(): polled each second; when true the ranks are
    asked to stop at their next generation-batch boundary (bench.runner.request_stop in each)."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / LAUNCH, {"spec": spec.to_dict(), "progress": progress, "threads": threads,
                                         "tracking": None if tracking is None else
                                         {"names": list(tracking.names), "project": tracking.project}})
    (run_dir / STOP).unlink(missing_ok=True)
    for old in run_dir.glob("error_rank*.log"):
        old.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", *WORKER, str(run_dir)]
    # its own session: a signal for the harness (SLURM's USR2) reaches the ranks through the stop file only
    # progress: rank 0's bars and messages go straight to this terminal; else stderr is kept for the error line
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=None if progress else subprocess.DEVNULL,
                            stderr=None if progress else subprocess.PIPE, text=True)
    try:
        while True:
            try:
                _, err = proc.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop_requested() and not (run_dir / STOP).exists():
                    (run_dir / STOP).touch()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        (run_dir / STOP).unlink(missing_ok=True)
        (run_dir / LAUNCH).unlink(missing_ok=True)
    return proc.returncode, _rank_error(run_dir, err)


def _rank_error(run_dir: Path, stderr: str) -> str:
    for path in sorted(run_dir.glob("error_rank*.log")):
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        if lines:
            return f"{path.stem.replace('error_', '')}: {lines[-1][:400]}"
    lines = [x for x in (stderr or "").splitlines() if x.strip()]
    for line in reversed(lines):  # torchrun's own summary of a failure
        if "Error" in line or "error" in line:
            return line.strip()[:400]
    return lines[-1].strip()[:400] if lines else ""


def read_launch(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / LAUNCH)


def watch_stop_file(run_dir: Path, request_stop) -> None:
    """In a rank: a daemon thread that calls request_stop() once the harness creates the stop file."""
    import threading

    def watch():
        while not (Path(run_dir) / STOP).exists():
            time.sleep(1.0)
        request_stop()
    threading.Thread(target=watch, daemon=True).start()
