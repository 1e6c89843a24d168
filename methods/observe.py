"""Per-step observables of the stabilizers, added to the step's metrics.jsonl row (`trainer.add_step_metrics`).

`trl_metrics(names)` copies what TRL 1.16's GRPOTrainer already measures (its `_metrics["train"]`, one entry per
micro-batch, or per generation batch for completion statistics) as the mean over the optimizer step, under the
suite's names. `TokenFraction` accumulates a method's own count of selected tokens over a step's micro-batches.
"""
from __future__ import annotations

import math

import torch
from transformers import TrainerCallback


class _CopyTRLMetrics(TrainerCallback):
    def __init__(self, trainer, names: dict):
        self.trainer, self.names = trainer, names

    def on_step_end(self, args, state, control, **kw):
        if not hasattr(self.trainer, "add_step_metrics"):  # not bench.engine's trainer: nobody reads them
            return
        logged = self.trainer._metrics["train"]
        for trl_key, name in self.names.items():
            values = [v for v in logged.get(trl_key, []) if v is not None and math.isfinite(v)]
            if values:
                self.trainer.add_step_metrics({name: sum(values) / len(values)})


def trl_metrics(names: dict):
    """A trainer hook: TRL metric key -> metrics.jsonl column, averaged over each optimizer step."""
    def install(trainer, params):
        trainer.add_callback(_CopyTRLMetrics(trainer, names))
    install.__name__ = f"trl_metrics({', '.join(names.values())})"
    return install


# TRL 1.16's names for the ratio clipping of the clipped-surrogate loss types (grpo, bnpo, dr_grpo, dapo, luspo):
# masked token means of (rho < 1 - eps_low and A < 0) and (rho > 1 + eps_high and A > 0).
CLIP_FRACTIONS = {"clip_ratio/low_mean": "clip_low_frac", "clip_ratio/high_mean": "clip_high_frac"}


class TokenFraction(TrainerCallback):
    """selected / valid tokens summed over an optimizer step's micro-batches, as the step's metric `name`.
    Counts stay device tensors until the step ends (no host sync per micro-batch)."""

    def __init__(self, trainer, name: str):
        self.trainer, self.name = trainer, name
        self.selected = self.total = 0

    def add(self, selected: torch.Tensor, mask: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training micro-batches only
            self.selected = self.selected + selected.sum().detach()
            self.total = self.total + mask.sum().detach()

    def on_step_begin(self, args, state, control, **kw):
        self.selected = self.total = 0

    def on_step_end(self, args, state, control, **kw):
        if float(self.total) > 0 and hasattr(self.trainer, "add_step_metrics"):
            self.trainer.add_step_metrics({self.name: float(self.selected) / float(self.total)})

    @classmethod
    def installed(cls, trainer, name: str) -> TokenFraction:
        counter = cls(trainer, name)
        trainer.add_callback(counter)  # before the harness's callbacks (bench.engine's contract)
        return counter
