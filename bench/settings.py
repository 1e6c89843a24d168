"""The settings of `bench run`, declared once: each is a dataclass field with its default and its help
(`metadata={"help": ...}`, as TRL's GRPOConfig and HfArgumentParser do), and the argparse options, the keys of
preset and --config files, the `--set` keys and `bench run --help` are all derived from these declarations.

Three kinds of settings:
- `RunSpec` fields (bench/spec.py): what determines one run. Every field that no option below owns is a
  `--set KEY=VALUE` key (and a `set:` key of presets and --config files), listed with its help in `bench run --help`.
- `SweepOptions`: the sweep's options, layered defaults < --preset < --config file < command-line flags
  (bench.config.resolve_run_options). Their flags are read as text and cast once, for flags and files alike, in
  bench.config.build_specs. An option with `spec=FIELD` sets that RunSpec field: with a default of its own it always
  sets it (task, model, device; the field is then not a --set key); with default None only when given, and the field
  stays a --set key (the flag wins over --set).
- `LaunchOptions` and `SlurmOptions`: how and where the sweep runs, command line only; argparse types them from
  their annotations. SlurmOptions are refused without `--executor slurm`; those that are SLURM profile fields
  (bench.slurm.PROFILE_FIELDS) override the profile.

Adding a setting is one field:
- a run setting: a field of `RunSpec` with its default and help (`_setting(default, "help")`); it is a --set key at
  once, shown in `bench run --help`, and part of the run's key;
- a sweep option (also read from presets and --config files): a field of `SweepOptions`, `setting(default, "help")`;
  one that sets a RunSpec field says which (`spec="field"`) and needs nothing else, any other is read from the
  options in bench.config.build_specs;
- a command-line-only option: a field of `LaunchOptions` (or `SlurmOptions`), read from `args.<name>` in bench.cli.
The flag is the field's name with dashes (`eval_size` -> `--eval-size`); `kind` says how it is parsed: "value" (one
value), "list" (a comma list), "params" (KEY=VALUE, repeatable), "switch" (a flag without a value).
"""
from __future__ import annotations

import argparse
import textwrap
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields

from bench.spec import SHARDINGS, RunSpec

KINDS = ("value", "list", "params", "switch")


def setting(default=None, help: str = "", *, kind: str = "value", spec: str | None = None, choices=None,
            metavar: str | None = None) -> Field:
    """A declared option: default, help, how its flag is parsed (`kind`), and the RunSpec field it sets (`spec`)."""
    assert kind in KINDS, kind
    meta = {"help": help, "kind": kind, "spec": spec, "choices": choices, "metavar": metavar}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def spec_default(name: str):
    """A RunSpec field's default (its single declaration)."""
    f = RunSpec.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass
class SweepOptions:
    """`bench run` options that a preset or a --config file may also set (flags override them)."""
    methods: str = setting("all", "comma list of methods (bench list), or 'all'", kind="list", spec="method")
    ranks: str = setting("4,16,64", "comma list of LoRA ranks, or 'full'", kind="list", spec="rank")
    seeds: str = setting("0", "comma list of seeds", kind="list", spec="seed")
    task: str = setting(spec_default("task"), "task name (bench list)", spec="task")
    model: str = setting(spec_default("model"), "'tiny' (embedded) or a Hugging Face id / local path", spec="model")
    data: str | None = setting(None, "local GSM8K-format jsonl file or directory (task gsm8k)")
    out: str | None = setting(None, "sweep directory (default results/<task>-<model>)")
    steps: int | None = setting(None, "optimizer steps per run", spec="steps")
    lr: float | None = setting(None, "learning rate", spec="lr")
    alpha: float | None = setting(None, "LoRA alpha at every rank: the same as --lora-scaling fixed:N", spec="alpha")
    lora_scaling: str | None = setting(None, "comma list of LoRA scaling rules, each a sweep axis: rank (alpha = r, "
                                             "default), fixed:N (alpha = N), rslora or rslora:N (alpha N / sqrt(r), "
                                             "N default 4); bench.scaling", kind="list")
    eval_size: int | None = setting(None, "evaluate on the first N eval problems (default all)", spec="eval_size")
    device: str = setting(spec_default("device"), "auto | cpu | cuda | cuda:N", spec="device")
    task_param: dict = setting({}, "task parameter, e.g. max_steps=3 (repeatable)", kind="params", spec="task_params")
    set: dict = setting({}, "any run setting listed below, e.g. num_generations=16 (repeatable)", kind="params")
    method_param: dict = setting({}, "method parameter, e.g. rho=0.3 for geora, proma.cap=0.3 for proma only "
                                     "(repeatable)", kind="params", spec="method_params")
    final_eval: str | None = setting(None, "lm-eval: also evaluate each trained policy with lm-eval (into "
                                           "summary.json)", choices=("none", "lm-eval"), spec="final_eval")
    report_to: str | None = setting(None, "experiment trackers, comma list: tensorboard, trackio, wandb, mlflow "
                                          "(default "
                                          "none; pip install -e \".[trackers]\"); not part of a run's identity",
                                    kind="list", metavar="TRACKERS")
    nproc_per_run: int | None = setting(None, "data-parallel processes per run (accelerate DDP through torchrun: gloo "
                                              "on CPU, NCCL with one GPU each on CUDA); each takes micro_batch / N "
                                              "completions, so the global batch is unchanged; not part of a run's "
                                              "identity (recorded as world_size); SLURM: default one per training "
                                              "GPU of a task (gpus_per_node less vllm_server_gpus)", metavar="N")
    sharding: str = setting(spec_default("sharding"), "with --nproc-per-run: ddp (a whole copy per process) or zero2 "
                                                      "(DeepSpeed ZeRO-2: optimizer state and gradients partitioned; "
                                                      "CUDA and the deepspeed package); zero3 and fsdp are refused: "
                                                      "the harness measures and saves on rank 0's whole weights; "
                                                      "part of a run's identity unless ddp",
                            choices=SHARDINGS, spec="sharding")
    lr_grid: str | None = setting(None, "--tune: learning rates to try, A,B,C or LOW:HIGH:N (log-spaced); default "
                                        "the run's lr x 10^(-1,-0.5,0,0.5,1)", kind="list")
    tune_steps: int | None = setting(None, "--tune: steps per trial (default: the run's steps)")
    tune_seeds: str | None = setting(None, "--tune: comma list of trial seeds (default 1000)", kind="list")
    tune_metric: str | None = setting(None, "--tune: select by dev accuracy (default) or training reward; ties: "
                                            "lower kl_ref, then the smaller lr", choices=("accuracy", "reward"))


TUNE_OPTIONS = ("lr_grid", "tune_steps", "tune_seeds", "tune_metric")  # only with --tune (bench.tune)


@dataclass
class LaunchOptions:
    """How the sweep runs: command line only."""
    config: str | None = setting(None, "YAML file with the sweep options above (flags override it)")
    preset: str | None = setting(None, "a shipped preset (bench list); --config and flags override it")
    no_progress: bool = setting(False, "no progress bars", kind="switch")
    verbose: bool = setting(False, "print every setting of the runs at the start (default: those that differ from the "
                                   "defaults or the preset)", kind="switch")
    yes: bool = setting(False, "run even where the cost estimate says the sweep is beyond this device", kind="switch")
    tune: bool = setting(False, "tune the learning rate per method x rank x scaling on the dev split first, then run "
                                "the seeds at the selected rate (trials in <out>/tuning; README, \"Tuned learning "
                                "rates\")", kind="switch")
    executor: str = setting("local", "local (this machine) or slurm (one job array)")
    jobs: str = setting("auto", "local: runs at a time, each in a worker process; 'auto': one per visible GPU on a "
                                "CUDA "
                                "machine (each worker pinned to its own), one per core on CPU for "
                                "models under 50M parameters (one torch thread each), else 1")


@dataclass
class SlurmOptions:
    """Only with --executor slurm; those named like SLURM profile fields override the profile."""
    profile: str | None = setting(None, "SLURM profile: a name in slurm/ (e.g. local, gpu-example) or a YAML path")
    partition: str | None = setting(None, "SLURM partition")
    gpus_per_node: int | None = setting(None, "GPUs per array task")
    cpus_per_task: int | None = setting(None, "CPUs per array task")
    mem_gb: float | None = setting(None, "memory per array task in GB")
    timeout_min: int | None = setting(None, "time limit per array task in minutes (requeued on expiry)")
    array_parallelism: int | None = setting(None, "array tasks running at once")
    resume: bool = setting(False, "add to an existing submission, submitting only runs not finished, pending or "
                                  "running", kind="switch")
    wait: bool = setting(False, "wait for the array, then collect the tables", kind="switch")
    wait_timeout: float | None = setting(None, "seconds to wait (default 1 day)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def defaults(cls=SweepOptions) -> dict:
    """Every option's default by name, in declaration order."""
    return {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default) for f in fields(cls)}


def params_options() -> dict[str, str]:
    """The KEY=VALUE options (name -> flag): they merge key by key across layers."""
    return {f.name: flag(f.name) for f in fields(SweepOptions) if f.metadata["kind"] == "params"}


def list_options() -> list[str]:
    return [f.name for f in fields(SweepOptions) if f.metadata["kind"] == "list"]


def _plain_type(hint):
    """int for `int | None`; None for text."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (int, float) else None


def always_options() -> dict[str, str]:
    """Single-value options that set their RunSpec field whatever the layers say (they have a default of their own):
    name -> field (task, model, device)."""
    return {f.name: f.metadata["spec"] for f in fields(SweepOptions)
            if f.metadata["spec"] and f.metadata["kind"] == "value" and f.default is not None}


def given_options() -> dict[str, tuple[str, type]]:
    """Options that set their RunSpec field only when given (default None): name -> (field, cast), the cast being
    the RunSpec field's own type (`alpha: float | None` -> float; text: str)."""
    hints = typing.get_type_hints(RunSpec)
    return {f.name: (f.metadata["spec"], _plain_type(hints[f.metadata["spec"]]) or str)
            for f in fields(SweepOptions) if f.metadata["spec"] and f.default is None}


def set_keys() -> list[str]:
    """RunSpec fields that `--set` may change: those no option with a default of its own sets."""
    owned = {f.metadata["spec"] for f in fields(SweepOptions)
             if f.metadata["spec"] and (f.default is not None or f.default_factory is not MISSING)}
    return [f.name for f in fields(RunSpec) if f.name not in owned and f.metadata.get("settable", True)]


def set_keys_help(width: int = 118) -> str:
    """The `--set` keys with their defaults and help, for the epilog of `bench run --help`."""
    lines = textwrap.wrap("--set KEY=VALUE keys (run settings; values are YAML, e.g. --set \"reward={correct: 1, "
                          "format: 0.2}\"; in a preset or --config file, under `set:`):", width)
    for name in set_keys():
        f = RunSpec.__dataclass_fields__[name]
        default = spec_default(name)
        text = f.metadata["help"] + ("" if default is None else f" (default {default})")
        lines += textwrap.wrap(text, width, initial_indent=f"  {name:22s}  ", subsequent_indent=" " * 26)
    return "\n".join(lines)


def _help(f: Field, cls) -> str:
    text = f.metadata["help"]
    spec = f.metadata["spec"]
    if cls is SweepOptions and f.default is None and spec and spec_default(spec) is not None:
        text += f" (default {spec_default(spec)})"  # the RunSpec field's default
    elif f.metadata["kind"] in ("value", "list") and f.default is not None:
        text += f" (default {f.default})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One flag per field of `cls`. SweepOptions flags default to None (not given), so that the layers below them
    show through (bench.config.resolve_run_options); the others carry their own default."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kwargs = {"dest": f.name, "help": _help(f, cls)}
        kind = f.metadata["kind"]
        if kind == "switch":
            kwargs["action"] = "store_true"
        elif kind == "params":
            kwargs.update(action="append", metavar=f.metadata["metavar"] or "KEY=VALUE")
        else:
            if f.metadata["choices"]:
                kwargs["choices"] = list(f.metadata["choices"])
            if f.metadata["metavar"]:
                kwargs["metavar"] = f.metadata["metavar"]
            if cls is not SweepOptions:
                kwargs["default"] = f.default
                if _plain_type(hints[f.name]):
                    kwargs["type"] = _plain_type(hints[f.name])
        group.add_argument(flag(f.name), **kwargs)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, SweepOptions, "sweep options (also keys of a --preset or --config YAML file, with dashes "
                                        "or underscores; flags override them)")
    add_arguments(parser, LaunchOptions, "how the sweep runs")
    add_arguments(parser, SlurmOptions, "SLURM (only with --executor slurm)")
