"""`bench`: prepare | list | run | collect.  Bad input: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from bench.errors import BenchError

DEFAULTS = {"methods": "all", "ranks": "4,16,64", "seeds": "0", "task": "synth-gsm", "model": "tiny",
            "data": None, "out": None, "steps": None, "lr": None, "alpha": None, "eval_size": None,
            "device": "auto", "task_param": [], "set": [], "method_param": [], "final_eval": None,
            "lora_scaling": None, "tune": None, "lr_grid": None, "tune_steps": None, "tune_seeds": None,
            "tune_metric": None}
TUNE_ONLY = {"lr_grid": "--lr-grid", "tune_steps": "--tune-steps", "tune_seeds": "--tune-seeds",
             "tune_metric": "--tune-metric"}
RUN_KEYS = set(DEFAULTS) | {"config", "no_progress", "preset"}
PARAM_OPTIONS = {"task_param": "--task-param", "set": "--set", "method_param": "--method-param"}
PRESETS = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    from bench.errors import unknown_name
    if name not in preset_names():
        raise unknown_name("preset", name, preset_names())
    return PRESETS / f"{name}.yaml"


def preset_summary(name: str) -> str:
    """The first comment line of the preset file."""
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we print one line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


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
    import yaml
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


def load_config_file(path, what: str = "--config") -> dict:
    import yaml
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
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in DEFAULTS:
            raise BenchError(f"{what} {path}: unknown key {key!r}; valid: "
                             f"{', '.join(k.replace('_', '-') for k in DEFAULTS)}")
        if name in ("methods", "ranks", "seeds", "lora_scaling", "lr_grid", "tune_seeds") and isinstance(value, list):
            if not all(_is_scalar(v) for v in value):
                raise BenchError(f"{what} {path}: {key} must be a list of single values, got {value!r}")
            value = ",".join(str(v) for v in value)
        if name == "tune" and value is not None and not isinstance(value, bool):
            raise BenchError(f"{what} {path}: tune must be true or false, got {value!r}")
        if name not in PARAM_OPTIONS and value is not None and not _is_scalar(value) and name != "tune":
            raise BenchError(f"{what} {path}: {key} must be a single value, got {value!r}")
        if name in PARAM_OPTIONS:
            if value is None:
                value = {}
            if not isinstance(value, (dict, list)):
                raise BenchError(f"{what} {path}: {key} must be a mapping of KEY: VALUE")
            value = as_params(value, f"{what} {path}: {key}")
        out[name] = value
    return out


def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def as_params(value, flag: str) -> dict:
    """A mapping from a YAML file, or KEY=VALUE strings from the command line."""
    return dict(value) if isinstance(value, dict) else parse_key_values(value, flag)


def resolve_run_options(args: argparse.Namespace) -> dict:
    """defaults < --preset < --config file < command-line flags. KEY=VALUE options merge key by key."""
    options = {k: (as_params(v, PARAM_OPTIONS[k]) if k in PARAM_OPTIONS else v) for k, v in DEFAULTS.items()}
    layers = []
    if getattr(args, "preset", None):
        layers.append(load_config_file(preset_path(args.preset), "preset"))
    if args.config:
        layers.append(load_config_file(args.config))
    layers.append({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) not in (None, [])})
    for layer in layers:
        for key, value in layer.items():
            if key in PARAM_OPTIONS:
                options[key] = {**options[key], **as_params(value, PARAM_OPTIONS[key])}
            else:
                options[key] = value
    return options


def build_specs(options: dict):
    from bench.spec import RunSpec, parse_rank
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
    common = {"task": options["task"], "task_params": task_params, "model": options["model"],
              "device": options["device"]}
    overrides = as_params(options["set"], "--set")  # any other RunSpec field
    settable = set(RunSpec.__dataclass_fields__) - {"method", "rank", "seed", "task", "task_params", "model",
                                                     "device", "method_params"}
    unknown = sorted(set(overrides) - settable)
    if unknown:
        raise BenchError(f"unknown --set key(s) {', '.join(unknown)}; valid: {', '.join(sorted(settable))}")
    common.update(overrides)
    if "grpo" in overrides and overrides["grpo"] is None:
        common["grpo"] = {}
    if options["final_eval"]:
        common["final_eval"] = str(options["final_eval"])
    for key, cast in (("steps", int), ("lr", float), ("alpha", float), ("eval_size", int)):
        if options[key] is not None:
            try:
                common[key] = cast(options[key])
            except (TypeError, ValueError, OverflowError):
                raise BenchError(f"bad --{key.replace('_', '-')} {options[key]!r}") from None
    from bench.scaling import sweep_scalings
    scalings = sweep_scalings(options["lora_scaling"], common.pop("alpha", None), common.pop("lora_scaling", None))
    specs = grid(methods, ranks, seeds, method_params=method_params, scalings=scalings, **common)
    from bench.spec import check_grpo_config
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


SLURM_ONLY = {"profile": "--profile", "partition": "--partition", "gpus_per_node": "--gpus-per-node",
              "cpus_per_task": "--cpus-per-task", "mem_gb": "--mem-gb", "timeout_min": "--timeout-min",
              "array_parallelism": "--array-parallelism", "resume": "--resume", "wait": "--wait",
              "wait_timeout": "--wait-timeout"}


def check_executor_flags(args) -> None:
    """SLURM options do nothing on this machine: refused rather than silently ignored."""
    if args.executor not in ("local", "slurm"):
        raise BenchError(f"unknown --executor {args.executor!r}; valid: local, slurm")
    if args.executor == "local":
        given = [flag for name, flag in SLURM_ONLY.items() if getattr(args, name, None) not in (None, False)]
        if given:
            raise BenchError(f"{', '.join(given)}: only with --executor slurm (a local sweep runs in this process "
                             "and re-running the same command resumes it)")
    elif str(args.jobs).strip().lower() != "auto":
        raise BenchError("--jobs: only for the local executor (under SLURM each run is its own array task; "
                         "--array-parallelism caps how many run at once)")


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
        raise BenchError(f"{out} holds {len(conflicts)} run(s) with a different configuration (e.g. {conflicts[0][0]}); "
                         "use another --out, or remove those run directories; nothing was run")


def cmd_run(args) -> int:
    from bench.sweep import run_sweep
    options = resolve_run_options(args)
    specs = build_specs(options)
    check_executor_flags(args)
    from bench.threads import env_threads
    for name in ("BENCH_NUM_THREADS", "BENCH_FORWARD_THREADS"):
        env_threads(name)  # a bad value stops here, before any training
    out = Path(str(options["out"]) if options["out"] else Path("results") / f"{options['task']}-"
               f"{Path(options['model']).name}")
    if args.executor == "local":
        for device in sorted({s.device for s in specs}):
            check_device_available(device)
    check_out_writable(out)
    from bench.models import check_weights, resolve_model_path
    resolve_model_path(options["model"], progress=not args.no_progress)  # builds `tiny` once, before any run
    check_weights(options["model"])
    check_ranks_against_model(options["model"], [s.rank for s in specs])
    from bench.runner import resolve_device
    if any(s.generation_backend == "vllm" and resolve_device(s.device) != "cuda" for s in specs):
        raise BenchError("generation_backend vllm needs a CUDA device (--device cuda or auto on a GPU machine)")
    if options["tune"]:
        from bench.tune import cmd_tune
        return cmd_tune(args, options, specs, out)
    given = [flag for name, flag in TUNE_ONLY.items() if options[name] is not None]
    if given:
        raise BenchError(f"{', '.join(given)}: only with --tune")
    check_existing_runs(specs, out)
    if args.executor == "slurm":
        return submit_to_slurm(args, specs, out)
    df = run_sweep(specs, out, progress=not args.no_progress, jobs=parse_jobs(args.jobs, specs))
    held = df.attrs.get("held", [])
    if not df.empty:
        df = df[~df.run_id.isin(held)]  # another process is running these: their summary.json is not final
    counts = df.status.value_counts().to_dict()
    print(f"{len(df)} runs in {out}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if held:
        print(f"{len(held)} run(s) left to another process running them (e.g. {held[0]}); "
              f"re-run this command when it is done to collect them")
    print(f"tables: {out / 'tables.md'}  summary: {out / 'summary.csv'}")
    return 1 if counts.get("failed") else 0


def parse_jobs(value: str, specs) -> int:
    from bench.sweep import auto_jobs
    if str(value).strip().lower() == "auto":
        return auto_jobs(specs)
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise BenchError(f"bad --jobs {value!r}: a positive integer or 'auto'")
    return jobs


SLURM_FLAGS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism")


def submit_to_slurm(args, specs, out: Path) -> int:
    """The grid (minus finished, pending and running runs) as one SLURM job array."""
    import shutil

    from bench import slurm

    if shutil.which("sbatch") is None:
        raise BenchError("--executor slurm: sbatch not found (is this a SLURM login node?)")
    profile = slurm.load_profile(args.profile)
    for name in SLURM_FLAGS:
        if getattr(args, name) is not None:
            profile[name] = getattr(args, name)
    slurm.load_profile_values(profile)
    states = {r["run_id"]: r["state"] for r in slurm.sweep_status(out)}
    unknown = [s.run_id for s in specs if states.get(s.run_id) == "unknown"]
    if unknown:
        raise BenchError(f"{out}: cannot tell whether {len(unknown)} submitted run(s) are still queued "
                         f"(e.g. {unknown[0]}): sacct and squeue failed; nothing submitted")
    active = [s.run_id for s in specs if states.get(s.run_id) in ("pending", "running")]
    if active and not args.resume:
        raise BenchError(f"{out}: {len(active)} run(s) already pending or running under SLURM "
                         f"(e.g. {active[0]}); use --resume to submit only what is missing")
    todo = [s for s in specs if states.get(s.run_id) not in ("ok", "diverged", "pending", "running")]
    if not todo:
        print(f"nothing to submit: all {len(specs)} runs in {out} are finished, pending or running")
        return 0
    record = slurm.submit(todo, out, profile)
    array = record["arrays"][-1]["array_id"]
    print(f"submitted SLURM array {array}: {len(todo)} run(s) of {len(specs)} into {out}")
    if not args.wait:
        print(f"progress: bench status {out}    tables when done: bench collect {out}")
        return 0
    rows = slurm.wait(out, [s.run_id for s in todo], timeout_s=args.wait_timeout or 24 * 3600.0)
    from bench.sweep import collect
    collect(out)
    print_status(rows)
    return 0 if all(r["state"] in ("ok", "diverged") for r in rows) else 1


def print_status(rows: list[dict]) -> None:
    width = max([len(r["run_id"]) for r in rows] + [6])
    print(f"{'run':{width}s}  {'state':9s}  {'job':12s}  detail")
    for r in rows:
        print(f"{r['run_id']:{width}s}  {r['state']:9s}  {r['job_id']:12s}  {r['detail'][:100]}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no runs")


def cmd_status(args) -> int:
    from bench import slurm
    out = Path(args.sweep)
    if not out.is_dir():
        raise BenchError(f"{out}: no such sweep directory")
    rows = slurm.sweep_status(out)
    if not rows:
        raise BenchError(f"{out}: no runs (no run directories and no SLURM submission record)")
    print_status(rows)
    unreadable = [r for r in rows if r["state"] == "unreadable"]
    _report_problems([f"{out / r['run_id'] / 'summary.json'}: {r['detail']}" for r in unreadable])
    return 1 if unreadable else 0


def _os_error(e: OSError) -> str:
    return f"{e.strerror} ({e.filename})" if e.strerror and e.filename else str(e.strerror or e)


def _report_problems(problems: list[str]) -> None:
    for p in problems:
        sys.stderr.write(f"bench: skipped: {p}\n")


def cmd_report(args) -> int:
    from bench.report import write_report
    out = Path(args.sweep)
    if not out.is_dir():
        raise BenchError(f"{out}: no such sweep directory")
    if args.margin is not None and not 0 < args.margin < 100:
        raise BenchError(f"bad --margin {args.margin:g}: accuracy points, between 0 and 100")
    try:
        sweep, info = write_report(out, baseline=args.baseline,
                                   margin=None if args.margin is None else args.margin / 100)
    except OSError as e:
        raise BenchError(f"{out}: cannot write the report: {_os_error(e)}") from None
    _report_problems(sweep.problems)
    if sweep.runs.empty:
        raise BenchError(f"{out}: nothing to report (no readable run summaries)")
    print(f"report: {out / 'report.html'}  ({len(sweep.runs)} runs, plots: {', '.join(info['plots']) or 'none'})")
    print(f"tables: {out / 'tables.md'}  claims: {out / 'claims.md'}")
    for c in info["claims"]:
        needs = f"; {c.needs}" if c.needs else ""
        detectable = f"; detectable: {c.detectable}" if c.detectable else ""
        print(f"  [{c.verdict}{needs}] {c.claim} ({c.statistic}; n={c.n}{detectable})")
    if info.get("warning"):
        print(f"warning: {info['warning']}")
    return 1 if sweep.problems else 0


def cmd_leaderboard(args) -> int:
    from bench.io import atomic_write_text
    from bench.report import leaderboard, load_sweep
    sweep = load_sweep(*[Path(s) for s in args.sweeps])
    _report_problems(sweep.problems)
    for note in sweep.notes:
        sys.stderr.write(f"bench: note: {note}\n")
    if sweep.runs.empty:
        raise BenchError("nothing to rank: no readable run summaries in " + ", ".join(args.sweeps))
    board = leaderboard(sweep)
    csv = Path(args.csv)
    try:
        atomic_write_text(csv, board.to_csv(index=False))
    except OSError as e:
        raise BenchError(f"--csv {csv}: cannot write: {_os_error(e)}") from None
    with pd_options():
        print(board.drop(columns=["sweeps", "tuning_budget"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    from bench.protocol import untuned_warning
    if warning := untuned_warning(sweep.runs):
        sys.stderr.write(f"bench: warning: {warning}\n")
    print(f"written: {csv} ({len(board)} rows from {len(sweep.runs)} runs)")
    return 1 if sweep.problems else 0


def pd_options():
    import pandas as pd
    return pd.option_context("display.width", 200, "display.max_columns", 30)


def cmd_eval(args) -> int:
    from bench.evaluate import evaluate_run
    from bench.spec import DEVICE_PATTERN
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise BenchError(f"bad {flag} {value}: must be >= {least}")
    if not DEVICE_PATTERN.fullmatch(args.device):
        raise BenchError(f"bad --device {args.device!r}; valid: auto, cpu, cuda, cuda:N")
    check_device_available(args.device)
    if not Path(args.run_dir).is_dir():
        raise BenchError(f"{args.run_dir}: no such run directory")
    out = evaluate_run(Path(args.run_dir), limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       device=args.device)
    print(f"{args.run_dir}: lm-eval {out['task']} ({out['n']} items, {out['num_fewshot']}-shot): "
          f"strict-match {out['strict_match']:.4f}, flexible-extract {out['flexible_extract']:.4f} "
          f"(written to summary.json)")
    return 0


def cmd_prepare(args) -> int:
    from bench.generation import greedy_accuracy
    from bench.io import read_json
    from bench.models import EMBEDDED, load_policy, resolve_model_path
    from tasks import get_task, plain_prompt

    if args.model not in EMBEDDED:
        raise BenchError(f"unknown embedded model {args.model!r}; valid: {', '.join(EMBEDDED)}")
    path = Path(resolve_model_path(args.model, progress=True))
    info = read_json(path / "build_info.json")
    model, tokenizer = load_policy(args.model, progress=False)
    task = get_task("synth-gsm", **info["spec"]["task_params"])
    evals = task.examples("eval")
    acc = greedy_accuracy(model, tokenizer, [plain_prompt(e.question) for e in evals], [e.gold for e in evals],
                          info["spec"]["max_new_tokens"])
    print(f"model: {args.model} at {path}")
    print(f"parameters: {info['parameters']:,}")
    print(f"build time: {info['build_seconds']} s ({info['sft_steps']} SFT steps; cached builds are reused)")
    print(f"base greedy accuracy on synth-gsm eval ({acc['n']} problems): {acc['accuracy']:.3f} strict, "
          f"{acc['accuracy_flexible']:.3f} flexible")
    return 0


def cmd_list(args) -> int:
    from bench.models import EMBEDDED
    from methods import COMPONENTS, METHODS
    from tasks import DESCRIPTIONS
    print("tasks:")
    for name, text in DESCRIPTIONS.items():
        print(f"  {name:14s} {text}")
    print("models:")
    for name, text in EMBEDDED.items():
        print(f"  {name:14s} {text}")
    print(f"  {'<hf id|path>':14s} any Hugging Face causal LM by id or local path (safetensors)")
    print("presets (bench run --preset NAME):")
    for name in preset_names():
        print(f"  {name:18s} {preset_summary(name)}")
    print("methods (by family; compose with +, e.g. geora+dapo):")
    families: dict[str, list] = {}
    for name, m in METHODS.items():
        families.setdefault(m.family or "other", []).append((name, m.summary))
    for name, m in COMPONENTS.items():
        families.setdefault(m.family or "other", []).append(
            (f"+{name}", f"{m.summary} (compose, e.g. METHOD+{name})"))
    for family, members in families.items():
        print(f"  {family}:")
        for name, summary in members:
            print(f"    {name:16s} {summary}")
    return 0


def cmd_collect(args) -> int:
    from bench.sweep import collect
    out = Path(args.sweep)
    if not out.is_dir():
        raise BenchError(f"{out}: no such sweep directory")
    problems: list[str] = []
    try:
        df = collect(out, problems)
    except OSError as e:
        raise BenchError(f"{out}: cannot write summary.csv / tables.md: {_os_error(e)}") from None
    _report_problems(problems)
    if df.empty:
        raise BenchError(f"{out}: no readable run summaries (no run directories with a valid summary.json)")
    print(f"{len(df)} runs collected into {out / 'summary.csv'} and {out / 'tables.md'}")
    return 1 if problems else 0


def cmd_perf(args) -> int:
    from bench.perf import format_table, run_perf
    from bench.spec import parse_rank
    from bench.sweep import check_writable
    from methods import method_names

    methods = method_names(args.methods)
    if len(methods) < 2:
        raise BenchError("--methods needs a baseline and at least one method to compare with it")
    if args.reps < 1:
        raise BenchError(f"bad --reps {args.reps}: must be >= 1")
    out = Path(args.out)
    check_writable(out.parent)
    result = run_perf(methods, parse_rank(args.rank), args.reps, args.model, args.device, out,
                      full=not args.methods_only)
    print(format_table(result))
    print(f"written: {out}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bench", description="Benchmark suite of GRPO stabilizers")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    s = sub.add_parser("prepare", help="build the embedded model (progress bar) and print its figures")
    s.add_argument("--model", default="tiny")
    s.set_defaults(func=cmd_prepare)
    s = sub.add_parser("list", help="registered tasks, models and methods")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("run", help="run a sweep: methods x ranks x seeds")
    s.add_argument("--methods", help="comma list or 'all' (default all)")
    s.add_argument("--ranks", help="comma list of LoRA ranks or 'full' (default 4,16,64)")
    s.add_argument("--seeds", help="comma list (default 0)")
    s.add_argument("--steps", help="optimizer steps per run (default 40)")
    s.add_argument("--task", help="task name (default synth-gsm)")
    s.add_argument("--task-param", action="append", dest="task_param", metavar="KEY=VALUE",
                   help="task parameter, e.g. max_steps=3 (repeatable)")
    s.add_argument("--data", help="local GSM8K-format jsonl file or directory (task gsm8k)")
    s.add_argument("--model", help="'tiny' (embedded) or a Hugging Face id / local path")
    s.add_argument("--lr", help="learning rate")
    s.add_argument("--alpha", help="LoRA alpha at every rank: the same as --lora-scaling fixed:N")
    s.add_argument("--lora-scaling", dest="lora_scaling",
                   help="comma list of LoRA scaling rules, each a sweep axis: rank (alpha = r, default), fixed:N "
                        "(alpha = N), rslora or rslora:N (alpha N / sqrt(r), N default 4)")
    s.add_argument("--eval-size", dest="eval_size", help="evaluate on the first N eval problems (default all)")
    s.add_argument("--device", help="auto | cpu | cuda")
    s.add_argument("--method-param", action="append", dest="method_param", metavar="KEY=VALUE",
                   help="method parameter, e.g. rho=0.3 for geora (repeatable)")
    s.add_argument("--set", action="append", dest="set", metavar="KEY=VALUE",
                   help="any other run setting, e.g. max_completion_length=512, num_generations=16 (repeatable)")
    s.add_argument("--tune", action="store_const", const=True,
                   help="tune the learning rate per method x rank x scaling on the dev split first, then run the "
                        "seeds at the selected rate (trials in <out>/tuning; README, \"Tuning\")")
    s.add_argument("--lr-grid", dest="lr_grid",
                   help="--tune: learning rates to try: A,B,C or LOW:HIGH:N (log-spaced); default: --lr x "
                        "10^(-1,-0.5,0,0.5,1)")
    s.add_argument("--tune-steps", dest="tune_steps", help="--tune: steps per trial (default: --steps)")
    s.add_argument("--tune-seeds", dest="tune_seeds", help="--tune: comma list of trial seeds (default 1000)")
    s.add_argument("--tune-metric", dest="tune_metric", choices=["accuracy", "reward"],
                   help="--tune: select by dev accuracy (default) or training reward; ties: lower kl_ref")
    s.add_argument("--out", help="sweep directory (default results/<task>-<model>)")
    s.add_argument("--config", help="YAML file with the same options (flags override)")
    s.add_argument("--preset", help="a shipped preset (bench list); --config and flags override it")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--final-eval", dest="final_eval", choices=["none", "lm-eval"],
                   help="lm-eval: also evaluate each trained policy with lm-eval (into summary.json)")
    s.add_argument("--executor", default="local", help="local (this machine, default) or slurm (one job array)")
    s.add_argument("--jobs", default="auto",
                   help="local: runs at a time, each in a worker process; 'auto' (default): one per core on CPU "
                        "for models under 50M parameters (one torch thread each), else 1")
    s.add_argument("--profile", help="SLURM profile: a name in slurm/ (e.g. local, gpu-example) or a YAML path")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--gpus-per-node", dest="gpus_per_node", type=int)
    s.add_argument("--cpus-per-task", dest="cpus_per_task", type=int)
    s.add_argument("--mem-gb", dest="mem_gb", type=float)
    s.add_argument("--timeout-min", dest="timeout_min", type=int, help="time limit per array task (requeued on expiry)")
    s.add_argument("--array-parallelism", dest="array_parallelism", type=int)
    s.add_argument("--resume", action="store_true",
                   help="SLURM: add to an existing submission, submitting only runs not finished, pending or running")
    s.add_argument("--wait", action="store_true", help="SLURM: wait for the array, then collect the tables")
    s.add_argument("--wait-timeout", dest="wait_timeout", type=float, help="SLURM: seconds (default 1 day)")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("perf", help="side-by-side cost ratios of methods (one process, medians)")
    s.add_argument("--methods", default="kl_free_lora,kl_grpo,proma,proma_intra",
                   help="comma list; the first is the baseline of every ratio")
    s.add_argument("--rank", default="16")
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("--model", default="tiny")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default="results/perf.json")
    s.add_argument("--methods-only", dest="methods_only", action="store_true",
                   help="only the method step ratios (skip harness-vs-TRL, attention, generation, metrics, init)")
    s.set_defaults(func=cmd_perf)
    s = sub.add_parser("status", help="state of each run of a sweep (pending, running, ok, failed, diverged, "
                       "preempted)")
    s.add_argument("sweep")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("eval", help="evaluate a trained run with lm-eval (strict and flexible exact match)")
    s.add_argument("run_dir")
    s.add_argument("--limit", type=int, help="first N items only")
    s.add_argument("--num-fewshot", dest="num_fewshot", type=int, default=0)
    s.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_eval)
    s = sub.add_parser("report", help="tables, plots, claims and a self-contained report.html for a sweep")
    s.add_argument("sweep")
    s.add_argument("--baseline", default=None,
                   help="method the others are compared with (probability of improvement, paired item differences; "
                        "default kl_free_lora)")
    s.add_argument("--margin", type=float, default=None,
                   help="equivalence margin of the claims' 'equal accuracy', in accuracy points (default 2)")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("leaderboard", help="one row per method x rank over seeds, merged over sweeps, as CSV")
    s.add_argument("sweeps", nargs="+")
    s.add_argument("--csv", default="results/leaderboard.csv")
    s.set_defaults(func=cmd_leaderboard)
    s = sub.add_parser("collect", help="rebuild summary.csv and tables.md of a sweep from its run directories")
    s.add_argument("sweep")
    s.set_defaults(func=cmd_collect)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.x deprecation notices, per run
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except BenchError as e:
        sys.stderr.write(f"bench: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted; re-run the same command to resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
