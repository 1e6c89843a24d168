"""Checks of a sweep before its first run starts: executor flags, devices, the output directory, runs already there,
ranks against the model. Each failure is one BenchError (one line, exit code 2), and leaves the output directory as
it was."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from bench import settings
from bench.errors import BenchError


def check_sweep(args, options: dict, specs, out: Path, existing_runs: bool = True):
    """Everything `bench run` checks between building the run specs and starting the first run, in this order:
    executor flags, thread counts in the environment, devices (local runs), the output directory, the model (built
    once here if it is the embedded one; safetensors weights; ranks against its matrices), the generation backend,
    and runs already in the output directory (existing_runs; bench run --tune checks its trial and final runs
    itself, since their learning rates are known only after tuning). --tune options are refused without --tune.
    Returns the experiment trackers (bench.trackers.Tracking, or None): a tracker that cannot start stops here,
    before any run."""
    from bench.device import resolve_device
    from bench.models import check_weights, resolve_model_path
    from bench.threads import env_threads
    from bench.trackers import make_tracking
    check_executor_flags(args)
    if not getattr(args, "tune", False):
        given = [settings.flag(name) for name in settings.TUNE_OPTIONS if options.get(name) is not None]
        if given:
            raise BenchError(f"{', '.join(given)}: only with --tune")
    for name in ("BENCH_NUM_THREADS", "BENCH_FORWARD_THREADS"):
        env_threads(name)  # a bad value stops here, before any training
    if args.executor == "local":
        for device in sorted({s.device for s in specs}):
            check_device_available(device)
    check_out_writable(out)
    tracking = make_tracking(options["report_to"], out)
    resolve_model_path(options["model"], progress=not args.no_progress)  # builds `tiny` once, before any run
    check_weights(options["model"])
    check_ranks_against_model(options["model"], [s.rank for s in specs])
    if any(s.generation_backend == "vllm" and resolve_device(s.device) != "cuda" for s in specs):
        raise BenchError("generation_backend vllm needs a CUDA device (--device cuda or auto on a GPU machine)")
    if existing_runs:
        check_existing_runs(specs, out)
    return tracking


def check_executor_flags(args) -> None:
    """SLURM options do nothing on this machine: refused rather than silently ignored."""
    if args.executor not in ("local", "slurm"):
        raise BenchError(f"unknown --executor {args.executor!r}; valid: local, slurm")
    if args.executor == "local":
        given = [settings.flag(f.name) for f in fields(settings.SlurmOptions)
                 if getattr(args, f.name, None) not in (None, False)]
        if given:
            raise BenchError(f"{', '.join(given)}: only with --executor slurm (a local sweep runs in this process "
                             "and re-running the same command resumes it)")
    elif str(args.jobs).strip().lower() != "auto":
        raise BenchError("--jobs: only for the local executor (under SLURM each run is its own array task; "
                         "--array-parallelism caps how many run at once)")


def check_nproc(args, options: dict, specs) -> int | None:
    """--nproc-per-run (bench.distributed): None where not given (SLURM then takes the profile's gpus_per_node),
    else N, refused where N processes cannot run these specs here (--sharding included; a local sweep without
    --nproc-per-run runs 1 process per run)."""
    from bench.distributed import check_nproc as check
    from bench.distributed import parse_nproc
    if options.get("nproc_per_run") is None:
        if args.executor == "local":
            check(specs, 1)
        return None
    nproc = parse_nproc(options["nproc_per_run"])
    check(specs, nproc, local=args.executor == "local")
    return nproc


def parse_jobs(value: str, specs, nproc: int | None = None) -> int:
    """--jobs: a positive integer, or 'auto' (bench.sweep.auto_jobs; with N processes per run, a run at a time
    per N GPUs or N cores)."""
    from bench.parallel import auto_jobs
    if str(value).strip().lower() == "auto":
        return max(1, auto_jobs(specs) // (nproc or 1))
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise BenchError(f"bad --jobs {value!r}: a positive integer or 'auto'")
    return jobs


def check_device_available(device: str) -> None:
    """A local run's device must exist on this machine (SLURM runs are checked on their node)."""
    import torch
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise BenchError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise BenchError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_out_writable(out: Path) -> None:
    """bench.sweep.check_writable, but leaving no directory behind: a command refused later must not leave an
    empty --out (run_sweep creates it when the runs start)."""
    from bench.sweep import check_writable
    created = []
    for parent in (out, *out.parents):
        if parent.exists():
            break
        created.append(parent)
    try:
        check_writable(out)
    finally:
        for d in created:  # deepest first; only the empty directories this check made
            try:
                d.rmdir()
            except OSError:
                break


def check_existing_runs(specs, out: Path) -> None:
    """Every run directory that already holds another configuration, or a config.json that cannot be read, before
    the first run starts (a parallel sweep would otherwise report it only after the other runs have trained)."""
    from bench.runner import check_run_dir
    conflicts, unreadable = [], []
    for spec in specs:
        try:
            check_run_dir(spec, out / spec.run_id)
        except BenchError as e:
            (conflicts if "different configuration" in str(e) else unreadable).append((spec.run_id, str(e)))
    if unreadable:
        raise BenchError(unreadable[0][1] + (f" ({len(unreadable) - 1} more like it)" if len(unreadable) > 1 else ""))
    if conflicts:
        raise BenchError(f"{out} holds {len(conflicts)} run(s) with a different configuration "
                         f"(e.g. {conflicts[0][0]}); use another --out, or remove those run directories; "
                         "nothing was run")


def check_ranks_against_model(model_name: str, ranks) -> None:
    """Reject ranks larger than the smallest targeted matrix before any training (model built from its config)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.models import load_config
    from bench.policy import check_rank
    config = load_config(model_name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for rank in sorted(set(ranks), key=str):
        check_rank(skeleton, rank)
