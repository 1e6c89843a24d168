"""KL-Cov and Clip-Cov: covariance-based remedies for entropy collapse (Cui et al. 2025, "The Entropy Mechanism of
Reinforcement Learning for Reasoning Language Models", arXiv 2505.22617, section 4; reference code: verl's
`compute_policy_loss_kl_cov` / `compute_policy_loss_clip_cov`, from the authors' PRIME-RL/Entropy-Mechanism-of-RL).

The paper shows entropy changes with the covariance of log-prob and advantage, and acts on the few tokens where it is
largest. Over the N valid completion tokens of a micro-batch (A_it = A_i broadcast over the tokens of y_i):
  Cov_it = (log pi_theta(y_it) - mean log pi_theta) * (A_it - mean A)               # eq. 12, per token, no gradient
Clip-Cov (eq. 13):
  I_clip = r N tokens drawn at random from {t : omega_low < Cov_t < omega_high, t not already clipped}
                                                    # r = 2e-4 (clip_cov_ratio), omega = (1, 5) (clip_cov_lb/_ub);
                                                    # at least one token, as in verl; "clipped": the ratio clip acts
  L = L_policy with the per-token term of every t in I_clip set to 0                # their gradient is cut
KL-Cov (eq. 14):
  I_KL = the k N tokens with the largest Cov_t      # k = 2e-3 (kl_cov_ratio, the paper's Qwen2.5-7B value); >= 1
  L_t  = -rho_t A_t + beta |log rho_t| for t in I_KL,  -rho_t A_t otherwise        # beta = 1 (ppo_kl_coef);
                                                    # no ratio clipping: epsilon = 1e9, as verl's kl_cov loss has none
Both keep TRL's loss and add a per-token term through bench.engine's `per_token_loss` extension point (aggregated
exactly as TRL aggregates its policy term, so any of TRL's clipped loss types' normalizations applies):
  Clip-Cov: + rho_t A_t on I_clip (cancels TRL's -rho_t A_t there: value and gradient 0, as verl's corr = 0);
  KL-Cov:   + beta |log rho_t| on I_KL.
On a generation batch's first optimizer step rho = 1 (pi_old = pi_theta): |log rho| is 0 with zero gradient there.
Clip-Cov's draw uses a private generator seeded with the run's seed (training's sampling stream is untouched).
Observables (metrics.jsonl): clip_cov_zeroed_frac / kl_cov_penalized_frac (selected share of valid tokens per
optimizer step), and TRL's clip_low_frac / clip_high_frac for Clip-Cov.
Refused with: loss types that are not the clipped surrogate, sequence-level ratios, other token masks
(top_entropy_quantile, off_policy_mask_threshold), two-sided clipping (delta), PROMA, the other covariance method;
KL-Cov also with epsilon_high (its loss is unclipped).
"""
from __future__ import annotations

from dataclasses import fields

import torch

from bench.engine import install_loss_hook
from bench.errors import BenchError
from methods import Method, register
from methods.observe import CLIP_FRACTIONS, TokenFraction, trl_metrics

FAMILY = "covariance"
# under N data-parallel processes (bench.distributed): the selection runs on each process's own micro-batch
DATA_PARALLEL = ("covariance and token selection over each process's micro-batch (micro_batch / N completions), not "
                 "over the 1-process micro-batch: k N and r N count that process's tokens")
CITE = "Cui et al. The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models. arXiv 2505.22617 " \
       "(2025)"
CLIPPED_SURROGATE = ("grpo", "bnpo", "dr_grpo", "dapo")  # TRL loss types whose per-token term is -min(rho A, clip A)
NO_CLIPPING = 1e9


# ---- the math, on plain tensors ------------------------------------------------------------------------------------

def covariance(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (log pi_t - mean log pi) (A_t - mean A), means over the valid tokens; [B, T], no gradient."""
    valid = mask.bool()
    lp = logps.detach()
    adv = advantages.detach().expand_as(lp)
    return (lp - lp[valid].mean()) * (adv - adv[valid].mean())


def clip_is_active(ratio, advantages, eps_low: float, eps_high: float) -> torch.Tensor:
    """Tokens where the clipped term of -min(rho A, clip(rho) A) is the larger loss (verl's clip_by_origin)."""
    return -advantages * ratio.clamp(1 - eps_low, 1 + eps_high) > -advantages * ratio


def kl_cov_selection(cov: torch.Tensor, mask: torch.Tensor, kl_cov_ratio: float) -> torch.Tensor:
    """I_KL: the max(1, int(k N)) valid tokens with the largest covariance; bool [B, T]."""
    valid = mask.bool()
    n = int(valid.sum())
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if n:
        top = torch.topk(cov.masked_fill(~valid, -torch.inf).flatten(), max(1, int(n * kl_cov_ratio))).indices
        selected[top] = True
    return selected.view_as(cov)


def clip_cov_candidates(cov, mask, clipped, lb: float, ub: float) -> torch.Tensor:
    return mask.bool() & ~clipped & (cov > lb) & (cov < ub)


def clip_cov_selection(candidates: torch.Tensor, n_valid: int, clip_cov_ratio: float, generator) -> torch.Tensor:
    """I_clip: min(max(1, int(r N)), #candidates) candidates drawn uniformly at random; bool [B, T]."""
    idx = candidates.flatten().nonzero().squeeze(1)
    take = min(max(1, int(clip_cov_ratio * n_valid)), len(idx))
    pick = idx[torch.randperm(len(idx), generator=generator)[:take].to(idx.device)]
    selected = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    selected[pick] = True
    return selected.view_as(candidates)


# ---- the hooks on the trainer -------------------------------------------------------------------------------------

def trl_settings(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(args)}


def check_grpo_common(settings: dict, name: str) -> None:
    problems = []
    if settings.get("loss_type") not in CLIPPED_SURROGATE:
        problems.append(f"loss_type {settings.get('loss_type')!r} (supported: {', '.join(CLIPPED_SURROGATE)})")
    if settings.get("importance_sampling_level", "token") != "token":
        problems.append("sequence-level importance sampling")
    if settings.get("top_entropy_quantile", 1.0) < 1.0:
        problems.append("top_entropy_quantile < 1")
    for key in ("off_policy_mask_threshold", "delta"):
        if settings.get(key) is not None:
            problems.append(key)
    if problems:
        raise BenchError(f"{name} cannot be combined with " + ", ".join(problems))


def check_grpo_kl_cov(settings: dict) -> None:
    """f(effective TRL settings) raising BenchError: KL-Cov's loss is the unclipped -rho A plus its penalty."""
    check_grpo_common(settings, "kl_cov")
    high = settings.get("epsilon_high")
    if settings.get("epsilon", 0) < NO_CLIPPING or (high is not None and high < NO_CLIPPING):
        raise BenchError("kl_cov cannot be combined with ratio clipping (epsilon, epsilon_high): its loss is "
                         "unclipped")


def check_grpo_clip_cov(settings: dict) -> None:
    check_grpo_common(settings, "clip_cov")


def _refuse_proma(trainer, name: str) -> None:
    if getattr(trainer, "proma", None) is not None:
        raise BenchError(f"PROMA cannot be combined with {name}: its advantages-1 backward needs a loss linear in "
                         "the advantages")


def install_kl_cov(trainer, params: dict) -> None:
    check_grpo_kl_cov(trl_settings(trainer.args))
    _refuse_proma(trainer, "kl_cov")
    counter = TokenFraction.installed(trainer, "kl_cov_penalized_frac")

    def per_token_loss(trainer, t):
        cov = covariance(t.logps, t.advantages, t.mask)                                   # Cov_t
        selected = kl_cov_selection(cov, t.mask, params["kl_cov_ratio"])                  # I_KL
        counter.add(selected, t.mask)
        return params["ppo_kl_coef"] * (t.logps - t.old_logps).abs() * selected           # + beta |log rho_t|
    install_loss_hook(trainer, per_token_loss)


def install_clip_cov(trainer, params: dict) -> None:
    check_grpo_clip_cov(trl_settings(trainer.args))
    _refuse_proma(trainer, "clip_cov")
    counter = TokenFraction.installed(trainer, "clip_cov_zeroed_frac")
    generator = torch.Generator().manual_seed(trainer.args.seed)  # private: sampling's RNG stream is untouched
    trainer.clip_cov_last = None  # the last micro-batch's I_clip (tests read it)

    def per_token_loss(trainer, t):
        ratio = torch.exp(t.logps - t.old_logps)                                          # rho_t
        cov = covariance(t.logps, t.advantages, t.mask)                                   # Cov_t
        clipped = clip_is_active(ratio.detach(), t.advantages, trainer.epsilon_low, trainer.epsilon_high)
        candidates = clip_cov_candidates(cov, t.mask, clipped, params["clip_cov_lb"], params["clip_cov_ub"])
        selected = clip_cov_selection(candidates, int(t.mask.sum()), params["clip_cov_ratio"], generator)  # I_clip
        counter.add(selected, t.mask)
        trainer.clip_cov_last = selected
        return ratio * t.advantages * selected                                            # cancels -rho_t A_t
    install_loss_hook(trainer, per_token_loss)


def _positive(params: dict, names: tuple) -> None:
    for name in names:
        if name in params:
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise BenchError(f"bad {name} {v!r}: must be a number > 0")


def check_kl_cov(params: dict) -> None:
    _positive(params, ("kl_cov_ratio", "ppo_kl_coef"))
    if params.get("kl_cov_ratio", 0) > 1:
        raise BenchError(f"bad kl_cov_ratio {params['kl_cov_ratio']!r}: a fraction of tokens, at most 1")


def check_clip_cov(params: dict) -> None:
    _positive(params, ("clip_cov_ratio",))
    if params.get("clip_cov_ratio", 0) > 1:
        raise BenchError(f"bad clip_cov_ratio {params['clip_cov_ratio']!r}: a fraction of tokens, at most 1")
    if "clip_cov_lb" in params and not params["clip_cov_lb"] < params.get("clip_cov_ub", float("inf")):
        raise BenchError(f"bad clip_cov_lb/ub {params['clip_cov_lb']!r}/{params.get('clip_cov_ub')!r}: need lb < ub")


register(Method(
    name="kl_cov", family=FAMILY, cite=CITE,
    summary="KL-Cov: unclipped surrogate + |log ratio| penalty on the top 0.2% log-prob x advantage covariance tokens",
    grpo_overrides={"epsilon": NO_CLIPPING}, trainer_hooks=(install_kl_cov,), check_params=check_kl_cov,
    params={"kl_cov_ratio": 2e-3, "ppo_kl_coef": 1.0}, data_parallel=DATA_PARALLEL))

register(Method(
    name="clip_cov", family=FAMILY, cite=CITE,
    summary="Clip-Cov: gradient cut on a random 0.02% of tokens with covariance in (1, 5)",
    trainer_hooks=(install_clip_cov, trl_metrics(CLIP_FRACTIONS)), check_params=check_clip_cov,
    params={"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0}, data_parallel=DATA_PARALLEL))
