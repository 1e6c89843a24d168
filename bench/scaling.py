"""The LoRA scaling rule: how the adapter's output s * B A is scaled with the rank r (a sweep axis, `--lora-scaling`).

- `rank`: alpha = r, so s = alpha / r = 1 at every rank (the suite's default; Rottman et al.'s recipes use r = alpha).
  With a fixed learning rate the update s * B A can then move further at a higher rank.
- `fixed:N`: alpha = N at every rank, s = N / r (Hu et al. 2021, LoRA, section 4.1: alpha held constant while r
  varies). `--alpha N` is the same setting.
- `rslora` / `rslora:N`: rank-stabilized LoRA, s = N / sqrt(r) (Kalajdzievski 2023, arXiv 2312.03732), through
  PEFT's `LoraConfig(use_rslora=True)`. N defaults to 4 (RSLORA_ALPHA): the scale is then 1 at rank 16, where `rank`
  and `fixed:16` are 1 too, so the three rules differ only away from rank 16.

At rank `full` there is no adapter and no scaling: the rule is normalized to `rank` there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from bench.errors import BenchError

KINDS = ("rank", "fixed", "rslora")
DEFAULT = "rank"
RSLORA_ALPHA = 4.0


def _number(text: str) -> str:
    """A positive float written without a trailing .0 (fixed:16, fixed:0.5): one spelling per value."""
    value = float(text)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


@dataclass(frozen=True)
class Scaling:
    kind: str                    # rank | fixed | rslora
    alpha: float | None = None   # None for `rank` (alpha = r)

    @property
    def name(self) -> str:
        """The canonical spelling (a run's `lora_scaling`)."""
        return self.kind if self.alpha is None else f"{self.kind}:{_number(self.alpha)}"

    def lora_alpha(self, rank: int) -> float:
        return float(rank) if self.alpha is None else float(self.alpha)

    def scale(self, rank: int) -> float:
        """s, the factor PEFT multiplies B A by (LoraLayer.scaling)."""
        return self.lora_alpha(rank) / (math.sqrt(rank) if self.kind == "rslora" else rank)

    @property
    def use_rslora(self) -> bool:
        return self.kind == "rslora"

    def describe(self) -> str:
        return {"rank": "alpha = r (scale 1)", "fixed": f"alpha = {_number(self.alpha or 0)} (scale alpha/r)",
                "rslora": f"rsLoRA, alpha = {_number(self.alpha or 0)} (scale alpha/sqrt(r))"}[self.kind]


def parse_scaling(value) -> Scaling:
    """`rank`, `fixed:N` or `rslora[:N]` (N a finite number > 0) -> Scaling; anything else is a BenchError."""
    if isinstance(value, Scaling):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else None
    if not text:
        raise BenchError(f"bad lora_scaling {value!r}; valid: rank, fixed:N, rslora, rslora:N")
    kind, sep, number = text.partition(":")
    if kind not in KINDS or (kind == "rank" and sep) or (kind == "fixed" and not number):
        raise BenchError(f"bad lora_scaling {value!r}; valid: rank, fixed:N (alpha = N), rslora or rslora:N")
    if kind == "rank":
        return Scaling("rank")
    if kind == "rslora" and not sep:
        return Scaling("rslora", RSLORA_ALPHA)
    try:
        alpha = float(number)
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise BenchError(f"bad lora_scaling {value!r}: alpha {number!r} must be a finite number > 0")
    return Scaling(kind, alpha)


def with_alpha(scaling: str, alpha) -> str:
    """The canonical scaling of a run that also sets `alpha` (the older setting): `alpha N` alone is `fixed:N`;
    with a scaling it must say the same."""
    s = parse_scaling(scaling)
    if alpha is None:
        return s.name
    fixed = Scaling("fixed", float(alpha))
    if s.kind == "rank":  # the default rule: alpha N replaces it
        return fixed.name
    if s == fixed:
        return s.name
    raise BenchError(f"alpha {alpha:g} and lora_scaling {s.name} disagree: alpha N is lora_scaling fixed:N; "
                     "set one of them")


def sweep_scalings(option, alpha=None, set_value=None) -> list[str]:
    """The sweep's scaling rules (canonical names) from `--lora-scaling` (a comma list), `--alpha N` (fixed:N) and
    `--set lora_scaling=...`; none given: [`rank`]. Two spellings of one rule, or --alpha with another rule, are
    refused."""
    given = [v for v in (option, set_value) if v is not None]
    if len(given) > 1:
        raise BenchError("--lora-scaling and --set lora_scaling both given: use --lora-scaling")
    if alpha is not None and not isinstance(alpha, bool):
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            alpha = math.nan if isinstance(alpha, (int, float)) else alpha
    if alpha is not None:
        if not (isinstance(alpha, float) and math.isfinite(alpha) and alpha > 0):
            raise BenchError(f"bad alpha {alpha!r}: must be a finite number > 0 (or unset: alpha = rank)")
    if not given:
        return [Scaling("fixed", alpha).name if alpha is not None else DEFAULT]
    items = [v.strip() for v in str(given[0]).split(",")]
    if not all(items):
        raise BenchError(f"bad --lora-scaling {given[0]!r}: an empty item between commas")
    names = [parse_scaling(v).name for v in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"bad --lora-scaling {given[0]!r}: {', '.join(dup)} listed twice")
    if alpha is not None:
        if names != [Scaling("fixed", alpha).name]:
            raise BenchError(f"--alpha {alpha:g} and --lora-scaling {given[0]} disagree: --alpha N is "
                             f"--lora-scaling fixed:N; give one of them")
    return names
