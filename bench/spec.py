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


# GRPOConfig fields a run's `grpo` dict may not set: they are RunSpec options, or they define the method
RESERVED_GRPO = {"output_dir", "beta", "max_steps", "seed", "data_seed", "learning_rate", "temperature",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                 "num_generations", "max_completion_length", "save_steps", "save_strategy", "logging_steps",
                 "report_to", "use_cpu", "bf16", "fp16", "reward_weights", "use_vllm"}
GENERATION_BACKENDS = ("transformers", "vllm")


def check_grpo_settings(settings: dict) -> None:
    """Every key must be a GRPOConfig field (TRL 1.16)."""
    from trl import GRPOConfig
    unknown = sorted(set(settings) - set(GRPOConfig.__dataclass_fields__))
    if unknown:
        raise BenchError(f"unknown grpo setting(s) {', '.join(unknown)}: not GRPOConfig fields of TRL 1.16")


@dataclass(frozen=True)
class RunSpec:
    method: str
    rank: int | str
    seed: int = 0
    task: str = "synth-gsm"
    task_params: dict = field(default_factory=dict)
    model: str = "tiny"
    steps: int = 40
    lr: float = 1e-3
    alpha: float | None = None          # LoRA alpha; None -> alpha = rank (scaling 1)
    method_params: dict = field(default_factory=dict)  # overrides of the method's parameters (e.g. rho)
    num_generations: int = 8            # G completions per prompt
    micro_batch: int = 16               # completions per micro-batch
    grad_accum: int = 2                 # micro-batches per optimizer step (2 steps per generation batch)
    max_completion_length: int = 64      # longest synth-gsm solution: 62 tokens with EOS
    temperature: float = 1.0            # rollout sampling temperature (TRL also scales training logits by it)
    eval_size: int | None = None        # None: the whole eval split
    # greedy-eval prompts decoded together, sorted by length and left-padded to the batch's longest; padding may move
    # a float's last bits, so completions are a function of it (bench.generation)
    eval_batch: int = 64
    probe_size: int = 16
    probe_every: int = 20
    kl_step_seqs: int = 8
    checkpoint_every: int = 10
    reward: dict = field(default_factory=lambda: {"correct": 1.0, "format": 0.0, "extraction": "strict"})
    device: str = "auto"
    lora_dropout: float = 0.0
    final_eval: str = "none"            # "lm-eval": also evaluate the trained policy with lm-eval (summary.lm_eval)
    grpo: dict = field(default_factory=dict)  # extra GRPOConfig settings by TRL name (e.g. lr_scheduler_type)
    generation_backend: str = "transformers"  # rollouts: the model's generate, or TRL's colocated vLLM (GPU, optional)

    def __post_init__(self):
        for name in ("steps", "num_generations", "micro_batch", "grad_accum", "max_completion_length",
                     "probe_size", "probe_every", "kl_step_seqs", "checkpoint_every", "eval_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise BenchError(f"bad {name} {getattr(self, name)!r}: must be a positive integer")
        if self.generation_backend not in GENERATION_BACKENDS:
            raise BenchError(f"bad generation_backend {self.generation_backend!r}; valid: "
                             f"{', '.join(GENERATION_BACKENDS)}")
        if self.generation_backend == "vllm":
            import importlib.util
            if importlib.util.find_spec("vllm") is None:
                raise BenchError("generation_backend vllm: vLLM is not installed (pip install vllm, on a CUDA "
                                 "machine); the default, transformers, needs nothing more")
        if self.num_generations < 2:
            raise BenchError("num_generations must be >= 2 (GRPO needs a group)")
        if (2 * self.micro_batch * self.grad_accum) % self.num_generations:
            raise BenchError(f"a generation batch ({2 * self.micro_batch * self.grad_accum} completions) must be a "
                             f"multiple of num_generations ({self.num_generations})")
        if self.final_eval not in ("none", "lm-eval"):
            raise BenchError(f"bad final_eval {self.final_eval!r}: valid: none, lm-eval")
        if not isinstance(self.grpo, dict):
            raise BenchError(f"bad grpo {self.grpo!r}: expected a mapping of GRPOConfig settings")
        reserved = sorted(set(self.grpo) & RESERVED_GRPO)
        if reserved:
            raise BenchError(f"grpo setting(s) {', '.join(reserved)} are set by the harness or the method "
                             "(use the run's own options)")
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise BenchError(f"bad lora_dropout {self.lora_dropout!r}: must be in [0, 1)")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise BenchError(f"bad {name} {value!r}: must be a number > 0")

    @property
    def run_id(self) -> str:
        return f"{self.method}_r{self.rank}_s{self.seed}"

    @property
    def lora_alpha(self) -> float | None:
        if self.rank == "full":
            return None  # no adapter
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


def stored_key(config: dict) -> str | None:
    """The key of a run recorded in config.json, under today's RunSpec (fields added since take their defaults),
    so that older run directories still match the same configuration."""
    try:
        return RunSpec.from_dict(config["spec"]).key()
    except (KeyError, TypeError, BenchError):
        return config.get("spec_key")
