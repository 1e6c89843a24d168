"""Defaults that follow the task and the model, and the one printout of a sweep's settings at its start.

A task may declare how it sizes the completion budget (tasks.base.CompletionBudget, e.g. gsm8k); where a run does not
set max_completion_length (flag, --set, --config or preset), the budget comes from the task's gold solutions measured
in the run's own tokenizer. A task that declares nothing (synth-gsm) keeps RunSpec's default, which is sized for the
embedded model: its runs, and every preset (each sets the budget), are unchanged.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields

from transformers import AutoTokenizer

from bench.models import _load_error, resolve_model_path, uses_chat_template
from bench.spec import RunSpec


@dataclass(frozen=True)
class Derived:
    """A run setting chosen by the harness for this task and model, and why (printed at the start of the run)."""
    value: object
    why: str


def load_tokenizer(model: str):
    """The run's tokenizer, without the weights (the embedded model is built on first use)."""
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(model), padding_side="left")
    except (OSError, ValueError) as e:
        raise _load_error(model, e) from None


def gold_lengths(examples, tokenizer) -> list[int]:
    """Tokens of each gold solution written as a plain-prompt completion: ' ' + answer (the prompt ends 'Answer:'),
    plus the EOS that ends it."""
    ids = tokenizer([" " + e.answer for e in examples], add_special_tokens=False)["input_ids"]
    return [len(i) + 1 for i in ids]


def _quantile(sorted_values: list[int], q: float) -> int:
    """The smallest value with at least a fraction q of the values at or below it (the inverse empirical CDF)."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def completion_budget(task, tokenizer) -> Derived | None:
    """The task's budget rule applied to this tokenizer; None where the task declares none."""
    rule = getattr(task, "budget", None)
    if rule is None:
        return None
    if uses_chat_template(tokenizer):
        return Derived(rule.chat, f"task {task.name}'s budget for chat-template models (a chat model answers in its "
                                  "own style, not in the gold solutions' format)")
    lengths = sorted(gold_lengths(task.examples("train"), tokenizer))
    longest = lengths[-1]
    fit = -(-longest // rule.multiple) * rule.multiple
    value = min(rule.at_most, fit)
    why = (f"task {task.name}: its {len(lengths)} train solutions are {_quantile(lengths, 0.5)} tokens (median), "
           f"{_quantile(lengths, 0.9)} (90th percentile), {longest} (longest) with EOS in this tokenizer; "
           f"the longest, rounded up to a multiple of {rule.multiple}")
    if value < fit:
        longer = sum(n > value for n in lengths)
        why += f", capped at {rule.at_most} ({longer} of the {len(lengths)} solutions are longer)"
    return Derived(value, why)


def task_defaults(task, model: str, given: set[str]) -> dict[str, Derived]:
    """The RunSpec fields the harness sets for this task and model, leaving out those the user gave (`given`)."""
    if "max_completion_length" in given or getattr(task, "budget", None) is None:
        return {}
    budget = completion_budget(task, load_tokenizer(model))
    return {} if budget is None else {"max_completion_length": budget}


# ---- the start-of-run printout ---------------------------------------------------------------------------------

GRID = ("method", "rank", "seed", "method_params")  # printed per sweep (the grid), not as settings


def spec_defaults() -> dict:
    """RunSpec's own defaults, by field."""
    out = {}
    for f in fields(RunSpec):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def baseline(preset: dict | None) -> dict:
    """What a run would use with nothing given: RunSpec's defaults, then the preset's values (bench.cli's option
    names: top-level keys and its `set` mapping)."""
    out = spec_defaults()
    for key, value in (preset or {}).items():
        if key == "set":
            out.update(value or {})
        elif key in out:
            out[key] = value
    return out


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def settings_lines(specs, base: dict, derived: dict[str, Derived], verbose: bool = False) -> list[str]:
    """What every run of the sweep uses: one line for the grid, then one per setting that differs from `base`
    (every setting with verbose), with the reason for those the harness chose. Settings that differ between the
    runs (other than the grid's) are shown once per distinct value."""
    methods = list(dict.fromkeys(s.method for s in specs))
    ranks = list(dict.fromkeys(str(s.rank) for s in specs))
    seeds = list(dict.fromkeys(s.seed for s in specs))
    lines = [f"sweep: {len(specs)} run(s) = methods {','.join(methods)} x ranks {','.join(ranks)} x seeds "
             f"{','.join(map(str, seeds))}"]
    for method in methods:
        params = next(s.method_params for s in specs if s.method == method)
        if params:
            lines.append(f"  {method}: " + ", ".join(f"{k}={_show(v)}" for k, v in sorted(params.items())))
    shown = []
    for name in (f.name for f in fields(type(specs[0]))):
        if name in GRID:
            continue
        values = list(dict.fromkeys(_show(getattr(s, name)) for s in specs))
        value = values[0] if len(values) == 1 else " | ".join(values)
        if name in derived:
            shown.append(f"  {name} = {value}  ({derived[name].why})")
        elif verbose or value != _show(base.get(name)):
            default = "" if value == _show(base.get(name)) else f"  (default {_show(base.get(name))})"
            shown.append(f"  {name} = {value}{default}")
    title = "settings" if verbose else "settings that differ from the defaults (all: --verbose)"
    return lines + [f"{title}:" if shown else f"{title}: none"] + shown

