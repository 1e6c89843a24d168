"""From `bench run`'s options to the sweep's RunSpecs: presets, YAML config files, the layering
defaults < --preset < --config file < command-line flags (KEY=VALUE options merge key by key), and the grid of
validated run specs. Every bad value fails here, as one BenchError, before any training. The options themselves are
declared in bench.settings."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from bench import settings
from bench.errors import BenchError, unknown_name

PRESETS = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if name not in preset_names():
        raise unknown_name("preset", name, preset_names())
    return PRESETS / f"{name}.yaml"


def preset_summary(name: str) -> str:
    """The first comment line of the preset file."""
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _parse_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",")]
    if not any(items):
        raise BenchError(f"--{what} is empty")
    if not all(items):  # "4,,16" is a typo, not the list 4,16
        raise BenchError(f"bad --{what} {value!r}: an empty item between commas")
    dup = sorted({v for v in items if items.count(v) > 1})
    if dup:  # the same run twice would share one run directory
        raise BenchError(f"bad --{what} {value!r}: {', '.join(dup)} listed twice")
    return items


def parse_key_values(pairs: list[str], flag: str) -> dict:
    """KEY=VALUE pairs (--task-param, --method-param, --set); values are read as YAML scalars."""
    params = {}
    for pair in pairs:
        if not isinstance(pair, str) or "=" not in pair:
            raise BenchError(f"bad {flag} {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:  # e.g. ops=*/ is not valid YAML: keep the text
            params[key.strip()] = value
    return params


def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def as_params(value, flag: str) -> dict:
    """A mapping from a YAML file, or KEY=VALUE strings from the command line."""
    return dict(value) if isinstance(value, dict) else parse_key_values(value, flag)


def load_config_file(path, what: str = "--config") -> dict:
    """A preset or --config file: a mapping of SweepOptions names (dashes or underscores) to values."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise BenchError(f"{what} {path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BenchError(f"{what} {path}: not a YAML text file (not UTF-8)") from None
    except yaml.YAMLError as e:
        raise BenchError(f"{what} {path}: bad YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BenchError(f"{what} {path}: expected a mapping of option: value")
    valid, params, lists = settings.defaults(), settings.params_options(), settings.list_options()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            raise BenchError(f"{what} {path}: unknown key {key!r}; valid: "
                             f"{', '.join(k.replace('_', '-') for k in valid)}")
        if name in lists and isinstance(value, list):
            if not all(_is_scalar(v) for v in value):
                raise BenchError(f"{what} {path}: {key} must be a list of single values, got {value!r}")
            value = ",".join(str(v) for v in value)
        if name not in params and value is not None and not _is_scalar(value):
            raise BenchError(f"{what} {path}: {key} must be a single value, got {value!r}")
        if name in params:
            if value is None:
                value = {}
            if not isinstance(value, (dict, list)):
                raise BenchError(f"{what} {path}: {key} must be a mapping of KEY: VALUE")
            value = as_params(value, f"{what} {path}: {key}")
        out[name] = value
    return out


def resolve_run_options(args: argparse.Namespace) -> dict:
    """defaults < --preset < --config file < command-line flags. KEY=VALUE options merge key by key."""
    defaults, params = settings.defaults(), settings.params_options()
    options = {k: (as_params(v, params[k]) if k in params else v) for k, v in defaults.items()}
    layers = []
    if getattr(args, "preset", None):
        layers.append(load_config_file(preset_path(args.preset), "preset"))
    if args.config:
        layers.append(load_config_file(args.config))
    layers.append({k: getattr(args, k) for k in defaults if getattr(args, k, None) not in (None, [])})
    for layer in layers:
        for key, value in layer.items():
            if key in params:
                options[key] = {**options[key], **as_params(value, params[key])}
            else:
                options[key] = value
    return options


def default_out(options: dict) -> Path:
    return Path(str(options["out"]) if options["out"] else Path("results") / f"{options['task']}-"
                f"{Path(options['model']).name}")


def build_specs(options: dict, derived: dict | None = None):
    """The grid methods x ranks x seeds of RunSpecs, each validated (its own checks, its method's parameters, the task
    and its data files, and TRL's GRPOConfig built on a dry path). derived: a dict to receive the settings chosen for
    the task and model (bench.defaults.task_defaults: name -> Derived), for the start-of-run printout."""
    from bench.defaults import task_defaults
    from bench.spec import check_grpo_config, parse_rank
    from bench.sweep import grid
    from methods import method_names
    from tasks import get_task

    methods = method_names(str(options["methods"]))
    ranks = [parse_rank(r) for r in _parse_list(options["ranks"], "ranks")]
    try:
        seeds = [int(s) for s in _parse_list(options["seeds"], "seeds")]
    except ValueError:
        raise BenchError(f"bad --seeds {options['seeds']!r}: expected integers") from None
    task_params = as_params(options["task_param"], "--task-param")
    if options["data"]:
        task_params["data"] = str(options["data"])
    try:
        task = get_task(options["task"], **task_params)  # unknown task / bad task parameters fail here
        for split in ("train", "eval"):
            task.examples(split)  # malformed or missing data files fail here, before any training
    except (TypeError, ValueError, ArithmeticError) as e:  # a parameter of the wrong type deep in the generator
        given = ", ".join(f"{k}={v!r}" for k, v in task_params.items())
        raise BenchError(f"bad --task-param for task {options['task']} ({given}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    method_params = method_params_per_method(methods, as_params(options["method_param"], "--method-param"))
    common = {spec_field: options[name] for name, spec_field in settings.always_options().items()}
    common["task_params"] = task_params
    overrides = as_params(options["set"], "--set")  # any other RunSpec field
    settable = settings.set_keys()
    unknown = sorted(set(overrides) - set(settable))
    if unknown:
        raise BenchError(f"unknown --set key(s) {', '.join(unknown)}; valid: {', '.join(sorted(settable))}")
    common.update(overrides)
    chosen = task_defaults(task, str(options["model"]), set(overrides))  # e.g. gsm8k's budget in this tokenizer
    common.update({name: d.value for name, d in chosen.items()})
    if derived is not None:
        derived.update(chosen)
    if "grpo" in overrides and overrides["grpo"] is None:
        common["grpo"] = {}
    for name, (spec_field, cast) in settings.given_options().items():  # --steps etc. win over --set
        if options[name] is not None:
            try:
                common[spec_field] = cast(options[name])
            except (TypeError, ValueError, OverflowError):
                raise BenchError(f"bad {settings.flag(name)} {options[name]!r}") from None
    from bench.scaling import sweep_scalings
    scalings = sweep_scalings(options["lora_scaling"], common.pop("alpha", None), common.pop("lora_scaling", None))
    specs = grid(methods, ranks, seeds, method_params=method_params, scalings=scalings, **common)
    for spec in specs:
        check_grpo_config(spec)  # the effective TRL GRPOConfig of every run, through TRL's own checks
    return specs


def method_params_per_method(methods: list[str], raw: dict) -> dict[str, dict]:
    """--method-param KEY=V goes to every method of the sweep that has parameter KEY (an error if none has it);
    METHOD.KEY=V only to METHOD (and compositions containing it). Bad values fail here, before any training."""
    from methods import get_method
    out = {m: {} for m in methods}
    for key, value in raw.items():
        scope, _, name = key.rpartition(".")
        targets = [m for m in methods if (not scope or scope in (m, *m.split("+"))) and name in get_method(m).params]
        if not targets:
            why = (f"method {scope!r} is not in this sweep or has no parameter {name!r}" if scope
                   else f"no method of this sweep has a parameter {name!r}")
            raise BenchError(f"--method-param {key}: {why} (methods: {', '.join(methods)})")
        for m in targets:
            out[m][name] = value
    for m in methods:
        get_method(m).resolve_params(out[m])
    return out
