"""RunSpec: everything that determines one run (hashable, serializable), and the sweep grid."""
from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import types
import typing
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
                 "report_to", "use_cpu", "bf16", "fp16", "reward_weights", "use_vllm", "vllm_mode",
                 "vllm_server_host", "vllm_server_port", "vllm_server_base_url",
                 "deepspeed", "fsdp", "fsdp_config"}  # the run's sharding (bench.distributed)
# fast: bench.decode (rollouts and greedy evals) where the model and sampling settings allow, else transformers';
# transformers: the model's own `generate` (TRL's regular path) and the greedy eval's DynamicCache forward
GENERATION_BACKENDS = ("fast", "transformers", "vllm")
VLLM_MODES = ("colocate", "server")  # TRL's GRPOConfig.vllm_mode
SERVER_PATTERN = re.compile(r"(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})")


# Refused before any training (a documented bound, not a measurement): the longest shipped preset runs 604 optimizer
# steps; a budget beyond this is a typo (it would run for days even on the embedded model).
MAX_STEPS = 100_000
# transformers.set_seed (called by the Trainer) seeds numpy, whose seeds are 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
EXTRACTIONS = ("strict", "flexible")
EVAL_SPLITS = ("eval", "dev")
# how a multi-process run spreads its training state (bench.distributed.check_sharding says which run where)
SHARDINGS = ("ddp", "zero2", "zero3", "fsdp")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(value, hint) -> bool:
    """Whether a YAML value fits a dataclass field annotation (as TRL declares it; enums take their names)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return is_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation we cannot check here: GRPOConfig's own __post_init__ decides (check_grpo_config)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_grpo_settings(settings) -> None:
    """A run's `grpo` (extra TRL GRPOConfig fields by name): a mapping whose keys are GRPOConfig fields of TRL 1.16
    that neither the harness nor the method owns, each value of the type GRPOConfig's dataclass declares for it.
    (GRPOConfig itself does not check most types on construction: num_train_epochs='abc' would fail mid-run.)"""
    if not isinstance(settings, dict):
        raise BenchError(f"bad grpo {settings!r}: expected a mapping of GRPOConfig settings")
    from trl import GRPOConfig
    unknown = sorted(set(settings) - set(GRPOConfig.__dataclass_fields__))
    if unknown:
        raise BenchError(f"unknown grpo setting(s) {', '.join(unknown)}: not GRPOConfig fields of TRL 1.16")
    reserved = sorted(set(settings) & RESERVED_GRPO)
    if reserved:
        raise BenchError(f"grpo setting(s) {', '.join(reserved)} are set by the harness or the method "
                         "(use the run's own options)")
    hints = typing.get_type_hints(GRPOConfig)
    for key, value in settings.items():
        if key in hints and not _matches(value, hints[key]):
            raise BenchError(f"bad grpo setting {key}={value!r}: GRPOConfig declares {_type_name(hints[key])}")


def check_grpo_config(spec: RunSpec) -> None:
    """The run's whole GRPOConfig built as the engine builds it (bench.engine.grpo_config), with its output_dir a
    path that is never created: TRL's and transformers' own __post_init__ checks (scheduler names, option
    combinations) run here, before any training. bf16 is left off: on a CPU login node submitting GPU runs to
    SLURM, transformers would refuse it, and it is the harness's setting, not the user's."""
    from bench.engine import grpo_config
    from methods import get_method
    from tasks import RewardConfig
    method = get_method(spec.method)
    try:
        _, weights = RewardConfig(**spec.reward).funcs_and_weights()
        grpo_config(spec, method, output_dir="/nonexistent/bench-dry-run", reward_weights=weights, chat=False,
                    use_cpu=True)
    except (TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchError(f"{spec.run_id}: TRL refuses the GRPOConfig (grpo {spec.grpo}): {first}") from None


def check_reward(reward) -> None:
    """`reward`: a mapping of tasks.RewardConfig fields (correct and format weights, extraction strict|flexible)."""
    from tasks import RewardConfig
    if not isinstance(reward, dict):
        raise BenchError(f"bad reward {reward!r}: expected a mapping, e.g. {{correct: 1, format: 0.2}}")
    valid = [f.name for f in fields(RewardConfig)]
    unknown = sorted(set(reward) - set(valid))
    if unknown:
        raise BenchError(f"bad reward key(s) {', '.join(map(str, unknown))}; valid: {', '.join(valid)}")
    for name in ("correct", "format"):
        if name in reward and not (is_number(reward[name]) and math.isfinite(reward[name])):
            raise BenchError(f"bad reward {name} {reward[name]!r}: must be a finite number")
    if reward.get("extraction", "strict") not in EXTRACTIONS:
        raise BenchError(f"bad reward extraction {reward['extraction']!r}; valid: {', '.join(EXTRACTIONS)}")
    if not any(reward.get(name, default) for name, default in (("correct", 1.0), ("format", 0.0))):
        raise BenchError("bad reward: the correct and format weights are both 0 (nothing to learn from)")


def _setting(default=None, help: str = "", factory=None, settable: bool = True, identity: bool | str = True):
    """A RunSpec field with its default and its help (TRL's GRPOConfig style): `bench run --help` lists every field
    that `--set` may change, with this help (bench.settings). settable=False: written by the harness only.
    identity=False: where the run happens, not what it computes (left out of the run's key, like its thread count).
    identity="unless-default": part of the run's key (and of its table configuration) only where set to other than
    the default, so that runs recorded before the field existed keep their keys."""
    meta = {"help": help, "settable": settable, "identity": identity}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run. A new run setting is one field here, with its default and help: it is then
    a `--set` key, a `set:` key of presets and --config files, part of the run's key and config.json."""
    method: str = field(metadata={"help": "method name, a grid axis (--methods)"})
    rank: int | str = field(metadata={"help": "LoRA rank or 'full', a grid axis (--ranks)"})
    seed: int = _setting(0, "seed, a grid axis (--seeds)")
    task: str = _setting("synth-gsm", "task name (--task)")
    task_params: dict = _setting(help="the task's parameters (--task-param)", factory=dict)
    model: str = _setting("tiny", "'tiny' (embedded) or a Hugging Face id / local path (--model)")
    steps: int = _setting(40, "optimizer steps per run")
    lr: float = _setting(1e-3, "learning rate")
    alpha: float | None = _setting(None, "LoRA alpha at every rank: the older spelling of lora_scaling fixed:N, folded "
                                         "into it (always unset after)")
    method_params: dict = _setting(help="overrides of the method's parameters, e.g. rho (--method-param)",
                                   factory=dict)
    num_generations: int = _setting(8, "G: completions per prompt (the GRPO group)")
    micro_batch: int = _setting(16, "completions per micro-batch")
    grad_accum: int = _setting(2, "micro-batches per optimizer step (a generation batch feeds 2 optimizer steps)")
    max_completion_length: int = _setting(64, "completion budget in tokens (the longest synth-gsm solution: 62 "
                                              "tokens with EOS)")
    temperature: float = _setting(1.0, "rollout sampling temperature (TRL also scales training logits by it)")
    eval_size: int | None = _setting(None, "evaluate on the first N eval problems; unset: the whole eval split")
    # padding may move a float's last bits, so completions are a function of the batch (bench.generation)
    eval_batch: int = _setting(128, "greedy-eval prompts decoded together, sorted by length and left-padded to the "
                                   "batch's longest")
    probe_size: int = _setting(16, "held-out prompts of the probe set (kl_ref, entropy_probe)")
    probe_every: int = _setting(20, "optimizer steps between probe-set measurements (also at the end)")
    kl_step_seqs: int = _setting(8, "rollouts per step on which kl_step is measured")
    checkpoint_every: int = _setting(10, "optimizer steps between checkpoints (an interrupted run resumes there)")
    reward: dict = _setting(help="reward weights and extraction, e.g. {correct: 1, format: 0.2, extraction: "
                                 "flexible}", factory=lambda: {"correct": 1.0, "format": 0.0, "extraction": "strict"})
    device: str = _setting("auto", "auto | cpu | cuda | cuda:N (--device)")
    lora_dropout: float = _setting(0.0, "LoRA dropout")
    final_eval: str = _setting("none", "lm-eval: also evaluate the trained policy with lm-eval (summary.lm_eval)")
    grpo: dict = _setting(help="extra TRL GRPOConfig settings by name, e.g. {lr_scheduler_type: cosine}; those the "
                               "harness or the method owns are refused", factory=dict)
    generation_backend: str = _setting("fast", "rollouts and greedy evals: fast (bench.decode's lean KV-cache "
                                               "decoder where the model and sampling settings allow, else "
                                               "transformers), transformers (the model's generate) or vllm "
                                               "(TRL's vLLM, vllm_mode; CUDA, optional)")
    vllm_mode: str = _setting("colocate", "vLLM generation: colocate (vLLM inside each training process) or server "
                                          "(a `trl vllm-serve` process on GPUs of its own, at vllm_server; "
                                          "slurm/vllm-server-example.yaml); implies generation_backend vllm")
    vllm_server: str = _setting("localhost:8000", "HOST:PORT of the `trl vllm-serve` server (vllm_mode server); "
                                                  "not part of a run's identity", identity=False)
    lora_scaling: str = _setting("rank", "LoRA scaling rule: rank (alpha = r), fixed:N (alpha = N) or rslora[:N] "
                                         "(alpha N / sqrt(r), N default 4); bench.scaling")
    # in the key unless ddp: DeepSpeed trains bf16 weights with fp32 master copies in the optimizer (DDP on CUDA:
    # fp32 weights under bf16 autocast) and writes checkpoints of its own format, which a DDP run cannot resume;
    # the number of processes itself (world_size) stays out of the key, as the same objective (bench.distributed)
    sharding: str = _setting("ddp", "how a multi-process run (--nproc-per-run) holds its training state: ddp (every "
                                    "process a whole copy; accelerate DDP) or zero2 (DeepSpeed ZeRO-2: optimizer "
                                    "state and gradients partitioned over the processes; CUDA and the deepspeed "
                                    "package); zero3 and fsdp, which also partition the parameters, are refused "
                                    "(README, \"Multi-process runs\"); part of a run's identity unless "
                                    "ddp", identity="unless-default")
    eval_split: str = _setting("eval", "the split evaluated: eval, or dev (learning-rate tuning trials, bench.tune)")
    tuning: dict = _setting(help="how lr was selected (written by bench run --tune); empty: lr was set, not tuned",
                            factory=dict, settable=False)

    def __post_init__(self):
        if isinstance(self.rank, bool) or parse_rank(self.rank) != self.rank:
            raise BenchError(f"bad rank {self.rank!r}: expected a positive integer or 'full'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise BenchError(f"bad seed {self.seed!r}: must be an integer in [0, {MAX_SEED}] (numpy's seed range, "
                             "which transformers.set_seed uses)")
        for name in ("steps", "num_generations", "micro_batch", "grad_accum", "max_completion_length",
                     "probe_size", "probe_every", "kl_step_seqs", "checkpoint_every", "eval_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BenchError(f"bad {name} {value!r}: must be a positive integer")
        if self.steps > MAX_STEPS:
            raise BenchError(f"bad steps {self.steps}: at most {MAX_STEPS:,} optimizer steps per run (README, "
                             "\"Set up and run\"; the longest preset runs 604)")
        if self.eval_size is not None and (isinstance(self.eval_size, bool) or not isinstance(self.eval_size, int)
                                           or self.eval_size <= 0):
            raise BenchError(f"bad eval_size {self.eval_size!r}: must be a positive integer (or unset: all)")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise BenchError(f"bad device {self.device!r}; valid: auto, cpu, cuda, cuda:N")
        for name in ("task_params", "method_params"):
            if not isinstance(getattr(self, name), dict):
                raise BenchError(f"bad {name} {getattr(self, name)!r}: expected a mapping of KEY: VALUE")
        if self.generation_backend not in GENERATION_BACKENDS:
            raise BenchError(f"bad generation_backend {self.generation_backend!r}; valid: "
                             f"{', '.join(GENERATION_BACKENDS)}")
        if self.vllm_mode not in VLLM_MODES:
            raise BenchError(f"bad vllm_mode {self.vllm_mode!r}; valid: {', '.join(VLLM_MODES)}")
        if self.vllm_mode == "server":  # a server is only for vLLM generation: asking for one chooses vLLM
            object.__setattr__(self, "generation_backend", "vllm")
        if not isinstance(self.vllm_server, str) or not SERVER_PATTERN.fullmatch(self.vllm_server) \
                or not 0 < int(SERVER_PATTERN.fullmatch(self.vllm_server)["port"]) < 65536:
            raise BenchError(f"bad vllm_server {self.vllm_server!r}: expected HOST:PORT, e.g. localhost:8000")
        if self.generation_backend == "vllm":
            import importlib.util
            if importlib.util.find_spec("vllm") is None:
                what = "vllm_mode server" if self.vllm_mode == "server" else "generation_backend vllm"
                raise BenchError(f"{what}: vLLM is not installed (pip install vllm, on a CUDA machine); the default, "
                                 "transformers, needs nothing more")
        if self.num_generations < 2:
            raise BenchError("num_generations must be >= 2 (GRPO needs a group)")
        if (2 * self.micro_batch * self.grad_accum) % self.num_generations:
            raise BenchError(f"a generation batch ({2 * self.micro_batch * self.grad_accum} completions) must be a "
                             f"multiple of num_generations ({self.num_generations})")
        if self.final_eval not in ("none", "lm-eval"):
            raise BenchError(f"bad final_eval {self.final_eval!r}: valid: none, lm-eval")
        if self.grpo:
            check_grpo_settings(self.grpo)
        elif not isinstance(self.grpo, dict):
            raise BenchError(f"bad grpo {self.grpo!r}: expected a mapping of GRPOConfig settings")
        check_reward(self.reward)
        if not (is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise BenchError(f"bad lora_dropout {self.lora_dropout!r}: must be in [0, 1)")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value) or not value > 0:
                raise BenchError(f"bad {name} {value!r}: must be a finite number > 0")
        # a negative alpha flips the sign of every LoRA update; nan/inf poison the first step
        if self.alpha is not None and not (is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise BenchError(f"bad alpha {self.alpha!r}: must be a finite number > 0 (or unset: alpha = rank)")
        from bench.scaling import with_alpha
        # one spelling per configuration: alpha N is fixed:N, and rank `full` has no adapter to scale
        object.__setattr__(self, "lora_scaling", "rank" if self.rank == "full" else
                           with_alpha(self.lora_scaling, self.alpha))
        object.__setattr__(self, "alpha", None)
        if self.sharding not in SHARDINGS:
            raise BenchError(f"bad sharding {self.sharding!r}; valid: {', '.join(SHARDINGS)}")
        if self.eval_split not in EVAL_SPLITS:
            raise BenchError(f"bad eval_split {self.eval_split!r}; valid: {', '.join(EVAL_SPLITS)}")
        if not isinstance(self.tuning, dict):
            raise BenchError(f"bad tuning {self.tuning!r}: expected a mapping (written by bench tune)")
        self._check_method_grpo()

    def _check_method_grpo(self) -> None:
        """The method's check of the run's effective TRL settings (e.g. PROMA refuses ratio clipping) and of its
        sharding (Method.refuses_sharding), before any training: a refusal is a one-line error."""
        from methods import get_method
        method = get_method(self.method)
        if self.sharding != "ddp" and method.refuses_sharding:
            raise BenchError(f"--sharding {self.sharding}: method {self.method} cannot run with partitioned "
                             f"gradients: {method.refuses_sharding}")
        if method.check_grpo is not None:
            from bench.engine import effective_grpo, grpo_settings
            try:
                method.check_grpo(effective_grpo(grpo_settings(self, method)))
            except BenchError as e:
                raise BenchError(f"method {self.method!r} with these grpo settings: {e}") from None

    @property
    def run_id(self) -> str:
        """method_r{rank}_s{seed}; a scaling other than `rank` adds its name (fixed16, rslora4), and a run evaluated
        on another split than eval (a tuning trial) adds its learning rate and the split."""
        rid = f"{self.method}_r{self.rank}_s{self.seed}"
        if self.lora_scaling != "rank":
            rid += "_" + self.lora_scaling.replace(":", "")
        if self.eval_split != "eval":
            rid += f"_lr{self.lr:g}_{self.eval_split}"
        return rid

    @property
    def scaling(self):
        from bench.scaling import parse_scaling
        return parse_scaling(self.lora_scaling)

    @property
    def lora_alpha(self) -> float | None:
        if self.rank == "full":
            return None  # no adapter
        return self.scaling.lora_alpha(int(self.rank))

    @property
    def use_rslora(self) -> bool:
        return self.rank != "full" and self.scaling.use_rslora

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """The run's identity: a digest of every field but those where the run happens (NOT_IDENTITY) and those at
        a default that is not part of it (identity_settings)."""
        d = identity_settings(self.to_dict())
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def vllm_server_address(self) -> tuple[str, int]:
        m = SERVER_PATTERN.fullmatch(self.vllm_server)
        return m["host"].strip("[]"), int(m["port"])

    def __hash__(self):
        return hash(self.key())

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# fields that say where a run happens, not what it computes: outside its key and its table identity (bench.variants)
NOT_IDENTITY = tuple(f.name for f in fields(RunSpec) if not f.metadata.get("identity", True))
# fields in a run's identity only where set to other than their default (identity="unless-default")
IDENTITY_UNLESS_DEFAULT = {f.name: f.default for f in fields(RunSpec) if f.metadata.get("identity") == "unless-default"}


def identity_settings(spec: dict) -> dict:
    """A spec's fields that make its identity: all but NOT_IDENTITY, and but IDENTITY_UNLESS_DEFAULT at default."""
    return {k: v for k, v in spec.items() if k not in NOT_IDENTITY
            and not (k in IDENTITY_UNLESS_DEFAULT and v == IDENTITY_UNLESS_DEFAULT[k])}


def stored_key(config: dict) -> str | None:
    """The key of a run recorded in config.json, under today's RunSpec (fields added since take their defaults),
    so that older run directories still match the same configuration."""
    if not isinstance(config, dict):
        return None
    try:
        return RunSpec.from_dict(config["spec"]).key()
    except (KeyError, TypeError, AttributeError, BenchError):
        key = config.get("spec_key")
        return key if isinstance(key, str) else None
