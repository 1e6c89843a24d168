"""RunSpec: everything that determines one run (hashable, serializable), and the sweep grid."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from bench.errors import BenchError


def parse_rank(value) -> int | str:
    """A LoRA rank (positive int) or `full` (full fine-tuning)."""
    if isinstance(value, str) and value.strip().lower() == "full":
        return "full"
    try:
        rank = int(str(value).strip())
    except ValueError:
        raise BenchError(f"bad rank {value!r}: expected a positive integer or 'full'") from None
    if rank <= 0:
        raise BenchError(f"bad rank {rank}: must be > 0")
    return rank


@dataclass(frozen=True)
class RunSpec:
    method: str
    rank: int | str
    seed: int = 0
    task: str = "synth-gsm"
    task_params: dict = field(default_factory=dict)
    model: str = "tiny"
    steps: int = 60
    lr: float = 5e-4
    alpha: float | None = None          # LoRA alpha; None -> alpha = rank (scaling 1)
    method_params: dict = field(default_factory=dict)  # overrides of the method's parameters (e.g. rho)
    num_generations: int = 8            # G completions per prompt
    micro_batch: int = 16               # completions per micro-batch
    grad_accum: int = 2                 # micro-batches per optimizer step (2 steps per generation batch)
    max_completion_length: int = 72
    temperature: float = 1.0            # rollout sampling temperature (TRL also scales training logits by it)
    eval_size: int | None = None        # None: the whole eval split
    probe_size: int = 16
    probe_every: int = 20
    kl_step_seqs: int = 8
    checkpoint_every: int = 10
    reward: dict = field(default_factory=lambda: {"correct": 1.0, "format": 0.0, "extraction": "strict"})
    device: str = "auto"

    def __post_init__(self):
        for name in ("steps", "num_generations", "micro_batch", "grad_accum", "max_completion_length",
                     "probe_size", "probe_every", "kl_step_seqs", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise BenchError(f"bad {name} {getattr(self, name)!r}: must be a positive integer")
        if self.num_generations < 2:
            raise BenchError("num_generations must be >= 2 (GRPO needs a group)")
        if (2 * self.micro_batch * self.grad_accum) % self.num_generations:
            raise BenchError(f"a generation batch ({2 * self.micro_batch * self.grad_accum} completions) must be a "
                             f"multiple of num_generations ({self.num_generations})")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise BenchError(f"bad {name} {value!r}: must be a number > 0")

    @property
    def run_id(self) -> str:
        return f"{self.method}_r{self.rank}_s{self.seed}"

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def __hash__(self):
        return hash(self.key())

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
