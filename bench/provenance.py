"""What a result was produced with: library versions, the code's git commit, the machine (recorded in config.json
and in `bench perf` results)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import peft
import torch
import transformers
import trl

import bench


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "bench": bench.__version__}


def git_sha() -> str:
    """HEAD of the checkout the code runs from, `-dirty` with uncommitted changes to tracked files; `unknown`
    outside a git checkout."""
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


def run_machine() -> dict:
    """The machine of a run, as config.json records it (torch_threads: the run's own thread count, per process;
    world_size: the run's data-parallel processes, bench.distributed)."""
    from bench.distributed import world_size
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "world_size": world_size()}
