"""bench run's settings, declared once (bench/settings.py): the parser, the config-file keys, the --set keys and the
help all come from the declarations, and they hold the values the CLI had before they were declared (written out
here as the reference). No model is built."""
import argparse
from dataclasses import fields

import pytest

from bench import settings
from bench.cli import make_parser
from bench.config import build_specs, resolve_run_options
from bench.errors import BenchError
from bench.spec import RunSpec

# The CLI's options before the declarations (bench/cli.py DEFAULTS), and the RunSpec fields --set could not change
OLD_DEFAULTS = {"methods": "all", "ranks": "4,16,64", "seeds": "0", "task": "synth-gsm", "model": "tiny",
                "data": None, "out": None, "steps": None, "lr": None, "alpha": None, "eval_size": None,
                "device": "auto", "task_param": {}, "set": {}, "method_param": {}, "final_eval": None}
NOT_SETTABLE = {"method", "rank", "seed", "task", "task_params", "model", "device", "method_params",
                "tuning", "sharding"}  # tuning: written by bench run --tune only; sharding: --sharding's own
# declared since: --lora-scaling (a sweep axis, bench.scaling), --report-to (bench.trackers), --nproc-per-run and
# --sharding (bench.distributed) and the --tune options (bench.tune)
ADDED = {"lora_scaling": None, "report_to": None, "nproc_per_run": None, "sharding": "ddp", "lr_grid": None,
         "tune_steps": None, "tune_seeds": None, "tune_metric": None}


def run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def test_defaults_and_set_keys_are_those_of_before():
    assert settings.defaults() == {**OLD_DEFAULTS, **ADDED}
    # the order of "valid: ..." in a bad config file's error
    assert [k for k in settings.defaults() if k not in ADDED] == list(OLD_DEFAULTS)
    assert set(settings.set_keys()) == {f.name for f in fields(RunSpec)} - NOT_SETTABLE
    assert settings.always_options() == {"task": "task", "model": "model", "device": "device",
                                         "sharding": "sharding"}
    assert settings.given_options() == {"steps": ("steps", int), "lr": ("lr", float), "alpha": ("alpha", float),
                                        "eval_size": ("eval_size", int), "final_eval": ("final_eval", str)}


def test_every_declared_setting_has_help():
    for cls in (RunSpec, settings.SweepOptions, settings.LaunchOptions, settings.SlurmOptions):
        for f in fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"


def test_parser_is_derived_from_the_declarations():
    parser = run_parser()
    args = parser.parse_args([])
    for f in fields(settings.SweepOptions):  # not given: None, so that presets and config files show through
        assert getattr(args, f.name) is None, f.name
    for cls in (settings.LaunchOptions, settings.SlurmOptions):
        for f in fields(cls):
            assert getattr(args, f.name) == f.default, f.name
    flags = {o for a in parser._actions for o in a.option_strings}
    declared = {settings.flag(f.name) for cls in (settings.SweepOptions, settings.LaunchOptions,
                                                  settings.SlurmOptions) for f in fields(cls)}
    assert flags == declared | {"-h", "--help"}
    typed = parser.parse_args(["--gpus-per-node", "2", "--mem-gb", "1.5", "--set", "a=1", "--set", "b=2",
                               "--steps", "7", "--wait"])
    assert (typed.gpus_per_node, typed.mem_gb, typed.set, typed.steps, typed.wait) == (2, 1.5, ["a=1", "b=2"], "7",
                                                                                        True)


def test_run_help_lists_every_set_key_with_its_help():
    text = " ".join(run_parser().format_help().split())  # argparse and textwrap re-wrap lines
    for name in settings.set_keys():
        help_words = " ".join(RunSpec.__dataclass_fields__[name].metadata["help"].split())
        assert f" {name} {help_words}" in text, name
    for f in fields(settings.SweepOptions):
        assert settings.flag(f.name) in text


def _args(**given) -> argparse.Namespace:
    return run_parser().parse_args([x for k, v in given.items() for x in (settings.flag(k), v)])


def test_layers_defaults_preset_config_flags(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("ranks: [4, 16]\nsteps: 5\nset: {temperature: 0.7}\nmethod-param: {kl_grpo.beta: 0.1}\n")
    o = resolve_run_options(_args(preset="rottman-kl-rank", config=str(config), steps="3"))
    assert o["steps"] == "3"  # flag over file
    assert o["ranks"] == "4,16"  # file over preset
    assert o["set"]["temperature"] == 0.7 and o["set"]["num_generations"] == 16  # merged key by key
    assert o["method_param"] == {"kl_grpo.beta": 0.1}  # file's key replaces the preset's same key
    assert o["device"] == "auto"  # default, set by nobody
    assert resolve_run_options(_args()) == {**OLD_DEFAULTS, **ADDED}


def test_flags_win_over_set_and_casts_name_the_flag():
    base = {"methods": "kl_free_lora", "ranks": "4"}
    spec, = build_specs(resolve_run_options(_args(**base, set="steps=9")))
    assert spec.steps == 9
    spec, = build_specs(resolve_run_options(_args(**base, set="steps=9", steps="3")))
    assert spec.steps == 3
    spec, = build_specs(resolve_run_options(_args(**base, alpha="8", eval_size="5", final_eval="lm-eval")))
    # --alpha N is lora_scaling fixed:N (bench.scaling), the one spelling a run records
    assert (spec.lora_scaling, spec.lora_alpha, spec.eval_size, spec.final_eval) == ("fixed:8", 8.0, 5, "lm-eval")
    with pytest.raises(BenchError, match=r"^bad --eval-size 'x'$"):
        build_specs(resolve_run_options(_args(**base, eval_size="x")))
    with pytest.raises(BenchError, match=r"unknown --set key\(s\) model; valid: alpha, checkpoint_every"):
        build_specs(resolve_run_options(_args(**base, set="model=x")))
