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
            "device": "auto", "task_param": [], "set": [], "method_param": []}
RUN_KEYS = set(DEFAULTS) | {"config", "no_progress"}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we print one line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _parse_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise BenchError(f"--{what} is empty")
    return items


def parse_key_values(pairs: list[str], flag: str) -> dict:
    """KEY=VALUE pairs (--task-param, --method-param, --set); values are read as YAML scalars."""
    import yaml
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise BenchError(f"bad {flag} {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:  # e.g. ops=*/ is not valid YAML: keep the text
            params[key.strip()] = value
    return params


def load_config_file(path: str) -> dict:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise BenchError(f"--config {path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise BenchError(f"--config {path}: bad YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BenchError(f"--config {path}: expected a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in DEFAULTS:
            raise BenchError(f"--config {path}: unknown key {key!r}; valid: "
                             f"{', '.join(k.replace('_', '-') for k in DEFAULTS)}")
        if name in ("methods", "ranks", "seeds") and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if name in ("task_param", "set", "method_param") and isinstance(value, dict):
            value = [f"{k}={v}" for k, v in value.items()]
        out[name] = value
    return out


def resolve_run_options(args: argparse.Namespace) -> dict:
    """defaults < --config file < command-line flags."""
    options = dict(DEFAULTS)
    if args.config:
        options.update(load_config_file(args.config))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and value != []:
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
    task_params = parse_key_values(options["task_param"], "--task-param")
    if options["data"]:
        task_params["data"] = str(options["data"])
    task = get_task(options["task"], **task_params)  # unknown task / bad task parameters fail here
    for split in ("train", "eval"):
        task.examples(split)  # malformed or missing data files fail here, before any training
    method_params = parse_key_values(options["method_param"], "--method-param")
    if method_params:
        from methods import get_method
        for name in methods:
            get_method(name).resolve_params(method_params)  # unknown or bad values fail before any training
    common = {"task": options["task"], "task_params": task_params, "model": options["model"],
              "device": options["device"], "method_params": method_params}
    overrides = parse_key_values(options["set"], "--set")  # any other RunSpec field
    settable = set(RunSpec.__dataclass_fields__) - {"method", "rank", "seed", "task", "task_params", "model",
                                                     "device", "method_params"}
    unknown = sorted(set(overrides) - settable)
    if unknown:
        raise BenchError(f"unknown --set key(s) {', '.join(unknown)}; valid: {', '.join(sorted(settable))}")
    common.update(overrides)
    for key, cast in (("steps", int), ("lr", float), ("alpha", float), ("eval_size", int)):
        if options[key] is not None:
            try:
                common[key] = cast(options[key])
            except (TypeError, ValueError):
                raise BenchError(f"bad --{key.replace('_', '-')} {options[key]!r}") from None
    return grid(methods, ranks, seeds, **common)


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


def cmd_run(args) -> int:
    from bench.sweep import check_writable, run_sweep
    options = resolve_run_options(args)
    specs = build_specs(options)
    out = Path(options["out"] or Path("results") / f"{options['task']}-{Path(options['model']).name}")
    check_writable(out)
    check_ranks_against_model(options["model"], [s.rank for s in specs])
    df = run_sweep(specs, out, progress=not args.no_progress)
    counts = df.status.value_counts().to_dict()
    print(f"{len(df)} runs in {out}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"tables: {out / 'tables.md'}  summary: {out / 'summary.csv'}")
    return 1 if counts.get("failed") else 0


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
    print("methods:")
    for name, m in METHODS.items():
        print(f"  {name:14s} {m.summary}")
    for name, m in COMPONENTS.items():
        print(f"  {'+' + name:14s} {m.summary} (compose, e.g. METHOD+{name})")
    return 0


def cmd_collect(args) -> int:
    from bench.sweep import collect
    out = Path(args.sweep)
    if not out.is_dir():
        raise BenchError(f"{out}: no such sweep directory")
    df = collect(out)
    if df.empty:
        raise BenchError(f"{out}: no run directories with summary.json")
    print(f"{len(df)} runs collected into {out / 'summary.csv'} and {out / 'tables.md'}")
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
    s.add_argument("--steps", help="optimizer steps per run (default 60)")
    s.add_argument("--task", help="task name (default synth-gsm)")
    s.add_argument("--task-param", action="append", dest="task_param", metavar="KEY=VALUE",
                   help="task parameter, e.g. max_steps=3 (repeatable)")
    s.add_argument("--data", help="local GSM8K-format jsonl file or directory (task gsm8k)")
    s.add_argument("--model", help="'tiny' (embedded) or a Hugging Face id / local path")
    s.add_argument("--lr", help="learning rate")
    s.add_argument("--alpha", help="LoRA alpha (default: alpha = rank)")
    s.add_argument("--eval-size", dest="eval_size", help="evaluate on the first N eval problems (default all)")
    s.add_argument("--device", help="auto | cpu | cuda")
    s.add_argument("--method-param", action="append", dest="method_param", metavar="KEY=VALUE",
                   help="method parameter, e.g. rho=0.3 for geora (repeatable)")
    s.add_argument("--set", action="append", dest="set", metavar="KEY=VALUE",
                   help="any other run setting, e.g. max_completion_length=512, num_generations=16 (repeatable)")
    s.add_argument("--out", help="sweep directory (default results/<task>-<model>)")
    s.add_argument("--config", help="YAML file with the same options (flags override)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)
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
