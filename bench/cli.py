"""`bench`: the command layer (prepare | list | run | perf | status | eval | report | leaderboard | collect). Each
command parses, calls the modules that do the work and prints; bad input is one line on stderr and exit code 2.
`bench run`'s options are declared in bench.settings, layered into run specs by bench.config and checked by
bench.preflight before any run starts."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from bench import preflight, settings
from bench.config import (
    build_specs,
    default_out,
    load_config_file,
    preset_names,
    preset_path,
    preset_summary,
    resolve_run_options,
)
from bench.errors import BenchError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we print one line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def cmd_run(args) -> int:
    from bench.defaults import baseline, settings_lines
    from bench.estimate import check_sweep_cost
    from bench.sweep import run_sweep
    options = resolve_run_options(args)
    derived = {}
    specs = build_specs(options, derived)
    out = default_out(options)
    tracking = preflight.check_sweep(args, options, specs, out, existing_runs=not args.tune)
    nproc = preflight.check_nproc(args, options, specs)
    preset = load_config_file(preset_path(args.preset), "preset") if args.preset else None
    print("\n".join(settings_lines(specs, baseline(preset), derived, verbose=args.verbose)), flush=True)
    if args.tune:  # the learning rate tuned per cell first (bench.tune): trials in out/tuning, then the runs
        from bench.tune import cmd_tune
        return cmd_tune(args, options, specs, out, submit=lambda a, s, o: submit_to_slurm(a, s, o, tracking, nproc),
                        tracking=tracking, nproc=nproc)
    if args.executor == "slurm":
        return submit_to_slurm(args, specs, out, tracking, nproc)
    jobs = preflight.parse_jobs(args.jobs, specs, nproc)
    check_sweep_cost(specs, out, jobs, yes=args.yes)  # printed; refused where beyond this device
    df = run_sweep(specs, out, progress=not args.no_progress, jobs=jobs, tracking=tracking, nproc=nproc)
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


def submit_to_slurm(args, specs, out: Path, tracking=None, nproc: int | None = None) -> int:
    """The grid (minus finished, pending and running runs) as one SLURM job array. nproc: processes per run
    (None: the profile's gpus_per_node, else 1); they start inside each array task (bench.distributed)."""
    import shutil

    from bench import slurm

    if shutil.which("sbatch") is None:
        raise BenchError("--executor slurm: sbatch not found (is this a SLURM login node?)")
    profile = slurm.load_profile(args.profile)
    for f in fields(settings.SlurmOptions):  # flags override the profile's fields of the same name
        if f.name in slurm.PROFILE_FIELDS and getattr(args, f.name) is not None:
            profile[f.name] = getattr(args, f.name)
    slurm.load_profile_values(profile)
    nproc = slurm.task_nproc(profile, nproc, specs)
    todo = slurm.to_submit(specs, out, resume=args.resume)
    if not todo:
        print(f"nothing to submit: all {len(specs)} runs in {out} are finished, pending or running")
        return 0
    record = slurm.submit(todo, out, profile, tracking, nproc)
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
    preflight.check_device_available(args.device)
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
    s = sub.add_parser("run", help="run a sweep: methods x ranks x seeds", epilog=settings.set_keys_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_run_arguments(s)
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
