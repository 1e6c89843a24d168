"""GRPO loss variants that TRL 1.16 implements as `GRPOConfig` options: Dr. GRPO, DAPO, GSPO, CISPO.

Notation (as in methods/lora_grpo.py): G completions y_i of one prompt, rewards r_i, per-token ratio
rho_it = pi_theta(y_it | .) / pi_old(y_it | .), live on the second optimizer step of each generation batch.
Each method changes only the settings named below; everything else is the suite's common recipe (bench.engine).

Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783, eq. 3):
  A_i = r_i - mean_j r_j                                             # no division by std_j r_j: scale_rewards="none"
  L   = -1/(G L_max) sum_i sum_t min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)
                                                                     # no 1/|y_i|: loss_type="dr_grpo" (TRL's constant
                                                                     # L_max = max_completion_length)
DAPO (Yu et al. 2025, arXiv 2503.14476, eq. 8-13):
  L   = -1/sum_i |y_i| sum_i sum_t min(rho_it A_i, clip(rho_it, 1-eps_low, 1+eps_high) A_i)
                                                                     # token-level mean: loss_type="dapo" (TRL divides
                                                                     # by the generation batch's tokens per step)
  eps_low = 0.2, eps_high = 0.28                                     # clip-higher: epsilon, epsilon_high
  y_i truncated at L_max  ->  masked out of the loss                 # overlong filtering: mask_truncated_completions
  R_length(y) = 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache if |y| <= L_max; -1 beyond
                                                                     # soft overlong punishment (eq. 13), added to
                                                                     # the task reward with weight 1 (TRL's reward
                                                                     # function); L_cache = overlong_cache_frac L_max
                                                                     # (DAPO: 4096 of 20480 = 0.2)
  Dynamic sampling (drop groups whose rewards are all equal and sample again until the batch is full) is NOT
  implemented: it needs a generation loop outside TRL's GRPOTrainer. Such groups have A_i = 0 and add nothing to the
  gradient here, but still count in the token normalizer; their share is logged as frac_reward_zero_std.
GSPO (Zheng et al. 2025, arXiv 2507.18071, eq. 5-7):
  s_i = (pi_theta(y_i | x) / pi_old(y_i | x))^(1/|y_i|) = exp(1/|y_i| sum_t log rho_it)
                                                                     # importance_sampling_level="sequence"
  L   = -1/G sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)  # loss_type="grpo": the per-sequence mean of a
                                                                     # per-sequence constant is that constant
  eps_low = 3e-4, eps_high = 4e-4                                    # the paper's clipping range (section 5.1)
CISPO (MiniMax-M1 report, arXiv 2506.13585, eq. 4-5):
  L   = -1/sum_i |y_i| sum_i sum_t sg(min(rho_it, eps_max)) A_i log pi_theta(y_it | .)
                                                                     # loss_type="cispo": the IS weight is clipped and
                                                                     # detached, every token keeps its gradient;
                                                                     # TRL's epsilon_high is eps_max, an absolute
                                                                     # bound: 5.0 as TRL recommends after ScaleRL
                                                                     # (arXiv 2510.13786); no lower bound (MiniMax-M1)
Observables (metrics.jsonl, per optimizer step, from TRL's own counters): clip_low_frac / clip_high_frac (token
shares with rho < 1-eps_low and A < 0 / rho > 1+eps_high and A > 0; GSPO: sequence shares), cispo_clip_frac
(rho > eps_max and A > 0), truncated_frac (completions cut at L_max) and overlong_penalty (mean R_length) for DAPO.
"""
from __future__ import annotations

from trl.rewards import get_soft_overlong_punishment

from bench.errors import BenchError
from methods import Method, register
from methods.observe import CLIP_FRACTIONS, trl_metrics

FAMILY = "loss variant"
DR_GRPO = "Liu et al. Understanding R1-Zero-Like Training: A Critical Perspective. arXiv 2503.20783 (2025)"
DAPO = "Yu et al. DAPO: An Open-Source LLM Reinforcement Learning System at Scale. arXiv 2503.14476 (2025)"
GSPO = "Zheng et al. Group Sequence Policy Optimization. arXiv 2507.18071 (2025)"
CISPO = "MiniMax. MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention. arXiv 2506.13585 (2025)"


def add_soft_overlong_punishment(trainer, params: dict) -> None:
    """DAPO eq. 13 as one more reward function (weight 1), appended as TRL itself appends environment rewards."""
    l_max = trainer.args.max_completion_length
    l_cache = int(round(params["overlong_cache_frac"] * l_max))
    trainer.add_reward(get_soft_overlong_punishment(max_completion_len=l_max, soft_punish_cache=l_cache),
                       "soft_overlong_punishment_reward", weight=1.0)


def check_dapo(params: dict) -> None:
    frac = params.get("overlong_cache_frac")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise BenchError(f"bad overlong_cache_frac {frac!r}: must be in (0, 1]")


register(Method(
    name="dr_grpo", family=FAMILY, cite=DR_GRPO,
    summary="Dr. GRPO: no std normalization of advantages, no 1/|y| length normalization (constant L_max)",
    grpo_overrides={"loss_type": "dr_grpo", "scale_rewards": "none"},
    trainer_hooks=(trl_metrics(CLIP_FRACTIONS),)))

register(Method(
    name="dapo", family=FAMILY, cite=DAPO,
    summary="DAPO: token-level loss, clip-higher (0.2/0.28), overlong filtering + soft overlong punishment "
    "(no dynamic sampling)",
    grpo_overrides={"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "mask_truncated_completions": True},
    params={"overlong_cache_frac": 0.2}, check_params=check_dapo,
    trainer_hooks=(add_soft_overlong_punishment, trl_metrics({
        **CLIP_FRACTIONS, "completions/clipped_ratio": "truncated_frac",
        "rewards/soft_overlong_punishment_reward/mean": "overlong_penalty"}))))

register(Method(
    name="gspo", family=FAMILY, cite=GSPO,
    summary="GSPO: sequence-level (length-normalized) importance ratio, clipped to [1-3e-4, 1+4e-4]",
    grpo_overrides={"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4,
                    "epsilon_high": 4e-4},
    trainer_hooks=(trl_metrics(CLIP_FRACTIONS),)))

register(Method(
    name="cispo", family=FAMILY, cite=CISPO,
    summary="CISPO: clipped, detached IS weight times A log pi on every token (eps_max 5), token-level loss",
    grpo_overrides={"loss_type": "cispo", "epsilon_high": 5.0},
    trainer_hooks=(trl_metrics({"cispo_clip_ratio": "cispo_clip_frac"}),)))
