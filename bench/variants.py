"""Run identity for tables: a stable digest of every setting in a run's spec except the seed (config.json), so
that runs with different settings (`--set grpo=...`, `--method-param`, `--lr`, `--alpha`, task parameters, ...)
never average into one row or cell; the settings that differ between a method's configurations become its
variant label. Runs evaluated on different numbers of eval items are different configurations too.
"""
from __future__ import annotations

import hashlib
import json

import pandas as pd

from bench.errors import BenchError
from bench.spec import NOT_IDENTITY, RunSpec, identity_settings

IDENTITY_COLUMNS = ["config_digest", "variant"]
NOT_SETTINGS = ("seed", *NOT_IDENTITY)                      # what a configuration's runs differ in (and where they ran)
NOT_CONTEXT = ("seed", "rank", "method", "method_params", *NOT_IDENTITY)  # what a claim's paired runs may differ in


def normalized_spec(config) -> dict | None:
    """The spec of config.json under today's RunSpec (fields added since take their defaults, as spec.stored_key),
    or the raw spec where today's RunSpec rejects it; None without one."""
    spec = config.get("spec") if isinstance(config, dict) else None
    if not isinstance(spec, dict):
        return None
    try:
        return RunSpec.from_dict(spec).to_dict()
    except (TypeError, ValueError, BenchError):
        return dict(spec)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # an empty mapping sets nothing: the same as an absent one
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


_ABSENT = object()


def _value(v) -> str:
    return "default" if v is _ABSENT else json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)


def assign(runs: pd.DataFrame, specs: dict) -> pd.DataFrame:
    """runs (columns key, method, status, eval_n) + specs (key -> normalized spec or None) -> runs with
    config_digest, variant (the settings in which this run's configuration differs from the method's others; empty
    when the method has one) and context (digest of the settings shared across methods, for pairing runs)."""
    runs = runs.copy()
    flat = {}
    for row in runs.itertuples():
        spec = specs.get(row.key)
        # (identity_settings: a field that is part of a run's identity only off its default is absent at it)
        flat[row.key] = None if spec is None else {k: v for k, v in _flat(identity_settings(spec)).items()
                                                    if k.split(".")[0] not in NOT_SETTINGS}
    # eval items: recorded by ok runs; a run without the record takes its configuration's one value, if unique
    def group(row):
        return digest(flat[row.key]) if flat[row.key] is not None else f"unknown {row.method} {row.rank}"
    by_group: dict[str, set] = {}
    for row in runs.itertuples():
        if pd.notna(row.eval_n):
            by_group.setdefault(group(row), set()).add(int(row.eval_n))
    eval_n = {}
    for row in runs.itertuples():
        known = by_group.get(group(row), set())
        eval_n[row.key] = int(row.eval_n) if pd.notna(row.eval_n) else next(iter(known)) if len(known) == 1 else None
    settings = {k: (None if f is None else {**f, "eval_items": eval_n[k]}) for k, f in flat.items()}
    # without a readable spec a run is known by its method, rank and eval items only: never merged across those
    runs["config_digest"] = [digest(settings[row.key]) if settings[row.key] is not None else
                             "unknown-" + digest({"method": row.method, "rank": str(row.rank),
                                                  "eval_items": eval_n[row.key]})
                             for row in runs.itertuples()]
    # a tuned learning rate is each cell's own outcome of one protocol (the `tuning.*` settings), not a variant of
    # the method nor a context of the claims: runs tuned alike share their rows and pair across ranks
    settings = {k: (None if s is None else {**s, "lr": "tuned"} if any(n.startswith("tuning.") for n in s) else s)
                for k, s in settings.items()}
    runs["variant"] = ""
    for _, g in runs.groupby("method", sort=False):
        known = [settings[k] for k in g.key if settings[k] is not None]
        keys = sorted({k for s in known for k in s} - {"rank", "method"})
        differ = [k for k in keys
                  if len({json.dumps(s.get(k, "<absent>"), sort_keys=True, default=str) for s in known}) > 1]
        shapes = {"unknown" if settings[k] is None else digest({n: v for n, v in settings[k].items() if n != "rank"})
                  for k in g.key}
        if len(shapes) < 2:  # one configuration per rank: no variant to tell apart
            continue
        for idx, key in zip(g.index, g.key):
            s = settings[key]
            runs.at[idx, "variant"] = ("config unknown" if s is None else
                                       ", ".join(f"{k}={_value(s.get(k, _ABSENT))}" for k in differ))
    ctx = {k: (None if s is None else {n: v for n, v in s.items() if n.split(".")[0] not in NOT_CONTEXT})
           for k, s in settings.items()}
    known_ctx = [c for c in ctx.values() if c is not None]
    ctx_keys = sorted({k for c in known_ctx for k in c})
    ctx_differ = [k for k in ctx_keys if len({json.dumps(c.get(k, "<absent>"), sort_keys=True, default=str)
                                              for c in known_ctx}) > 1]
    runs["context"] = [("config unknown" if ctx[k] is None else
                        ", ".join(f"{n}={_value(ctx[k].get(n, _ABSENT))}" for n in ctx_differ)) for k in runs.key]
    from bench.protocol import protocol
    for column, values in protocol(runs.key, specs).items():
        runs[column] = values
    return runs


def label(method: str, variant: str) -> str:
    """A table row's name: the method, and its variant where it has several."""
    return f"{method} ({variant})" if variant else method
