"""Child of tests/test_distributed.py (torchrun, 2 processes, gloo): does DDP's wrap, as the Trainer does it
(accelerate's Accelerator.prepare), give every rank rank 0's weights, the frozen residual base weights of an SVD
init included? Rank 1 first perturbs every tensor of its policy (a different SVD would differ this way); each rank
writes OUT/rank<r>.json (the ranks share a stdout, where lines interleave); exit code 0 when every tensor equals
rank 0's after the wrap.

usage: torchrun --nproc-per-node 2 _ddp_broadcast.py METHOD OUT
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from bench.runner import prepare  # noqa: E402
from bench.spec import RunSpec  # noqa: E402
from methods import get_method  # noqa: E402

accelerator = Accelerator(cpu=True)
rank = dist.get_rank()
spec = RunSpec(method=sys.argv[1], rank=4, steps=1)
prep = prepare(spec, get_method(spec.method), "cpu", progress=False)
model = prep.policy
names = [n for n, _ in model.named_parameters()]
frozen_residual = [n for n, p in model.named_parameters() if not p.requires_grad and "base_layer" in n]
with torch.no_grad():
    if rank == 1:
        for p in model.parameters():
            p.add_(0.01)


def gathered(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.detach().contiguous())
    return out


def differing(m):
    return [n for n, p in m.named_parameters() if not torch.equal(*gathered(p))]


before = differing(model)
wrapped = accelerator.prepare(model)
after = differing(accelerator.unwrap_model(wrapped))
report = {"rank": rank, "tensors": len(names), "frozen_residual": len(frozen_residual),
          "trainable": sum(p.requires_grad for p in model.parameters()), "differ_before": len(before),
          "differ_after": after}
(Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(report))
sys.exit(0 if not after else 1)
