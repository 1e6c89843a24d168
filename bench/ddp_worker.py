"""One rank of a multi-process run: `python -m torch.distributed.run ... -m bench.ddp_worker RUN_DIR` (started by
bench.distributed.launch). Reads the run's spec from RUN_DIR/.launch.json, joins the process group and runs the
run's rank (bench.runner.run_rank). Exit code 1 where the run failed, so that torchrun tears the other ranks down
instead of leaving them in a collective; else 0."""
from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0])
    warnings.filterwarnings("ignore", category=FutureWarning)  # as bench.cli.main
    import torch
    from accelerate import PartialState

    from bench import distributed, parallel, runner
    from bench.io import atomic_write_text
    from bench.spec import RunSpec
    from bench.trackers import Tracking

    launch = distributed.read_launch(run_dir)
    spec = RunSpec.from_dict(launch["spec"])
    tracking = Tracking(tuple(launch["tracking"]["names"]), launch["tracking"]["project"]) \
        if launch.get("tracking") else None
    threads = int(launch["threads"])
    torch.set_num_threads(threads)
    parallel.set_forward_cores(threads)  # this rank's share of the cores, also for its forwards
    # SLURM's USR2 (if it reaches the ranks at all) asks for a stop, as in a 1-process run; the harness also
    # forwards its own stop requests through the stop file
    signal.signal(signal.SIGUSR2, lambda *_: runner.request_stop())
    distributed.watch_stop_file(run_dir, runner.request_stop)
    on_cuda = spec.device != "cpu" and torch.cuda.is_available()
    if on_cuda:  # torchrun's LOCAL_RANK -> this rank's GPU (CUDA_VISIBLE_DEVICES holds this run's GPUs)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if distributed.uses_deepspeed(spec.sharding):
        # what `accelerate launch --use_deepspeed` sets: the process group below is then DeepSpeed's
        # (accelerate's PartialState), as the Trainer's Accelerator expects it
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    # the process group now, with the long timeout: rank 0's greedy evals happen before the Trainer would create it
    PartialState(cpu=not on_cuda, backend="nccl" if on_cuda else "gloo", timeout=distributed.TIMEOUT)
    try:
        status = runner.run_rank(spec, run_dir, progress=bool(launch.get("progress")) and distributed.is_main(),
                                 tracking=tracking if distributed.is_main() else None)
    except BaseException:
        if not distributed.is_main():
            atomic_write_text(run_dir / f"error_rank{distributed.rank()}.log", traceback.format_exc())
        raise
    # diverged and preempted runs end on every rank at the same step (bench.runner.MetricsCallback): exit 0, so that
    # torchrun does not stop rank 0 before it has written summary.json; a failure stops the other ranks
    return 1 if status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
