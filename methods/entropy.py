"""Entropy stabilizers that TRL 1.16 implements as `GRPOConfig` options: an entropy bonus, its adaptive
(target-entropy) variant, and training on the highest-entropy tokens only.

H_it = -sum_v pi_theta(v | .) log pi_theta(v | .) is the full-vocabulary entropy at completion token t of y_i;
L_policy is the suite's common clipped-surrogate loss (methods/lora_grpo.py).

entropy_bonus (entropy regularization, Williams & Peng 1991; as in TRL's `entropy_coef`):
  L = L_policy - c * (sum_it m_it H_it / sum_it m_it) / grad_accum  # token mean over the micro-batch, c = 1e-3
adaptive_entropy (Skywork-OR1, He et al. 2025, arXiv 2505.22312, "adaptive entropy control"):
  L = L_policy - c_k 1{H_k-1 <= H_tgt} * (token-mean entropy)       # applied only at or below the target
  c_k+1 = clip(c_k + delta, c_min, c_max) if H_k <= H_tgt else clip(c_k - delta, c_min, c_max)
                                                                     # H_k: token-mean entropy of optimizer step k
  H_tgt = 0.2, delta = 0.005, c_0 = 0, c in [0, 1]: TRL's defaults (use_adaptive_entropy, entropy_target,
  entropy_coef_delta, entropy_coef_min/max); the paper sets the target per model. With 0.2 nats the bonus engages
  only near collapse, which is the regime it guards against.
top_entropy (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939, eq. 3):
  L = -1/G sum_i 1/|y_i| sum_t 1{H_it >= tau_0.8} min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)
                                                                     # tau_0.8: the 80th percentile of H over the
                                                                     # micro-batch's tokens: top_entropy_quantile=0.2;
                                                                     # the 1/|y_i| still counts every token (TRL)
Observables (metrics.jsonl): entropy_coef (the coefficient in force; TRL's counter), top_entropy_kept_frac (share
of completion tokens that keep their gradient). The rollout entropy itself is logged for every method.
"""
from __future__ import annotations

from methods import Method, register
from methods.observe import TokenFraction, trl_metrics

FAMILY = "entropy"
ENTROPY_BONUS = "Williams & Peng. Function optimization using connectionist reinforcement learning algorithms. " \
                "Connection Science 3(3), 1991 (entropy regularization); TRL GRPOConfig.entropy_coef"
SKYWORK = "He et al. Skywork Open Reasoner 1 Technical Report. arXiv 2505.22312 (2025)"
TOP_ENTROPY = "Wang et al. Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement " \
              "Learning for LLM Reasoning. arXiv 2506.01939 (2025)"


def count_kept_tokens(trainer, params: dict) -> None:
    """Wrap TRL's `get_high_entropy_mask` to count the tokens it keeps (it runs once per training micro-batch)."""
    counter = TokenFraction.installed(trainer, "top_entropy_kept_frac")
    select = trainer.get_high_entropy_mask

    def counted(entropies, mask, threshold):
        kept = select(entropies, mask, threshold)
        counter.add(kept, mask)
        return kept
    trainer.get_high_entropy_mask = counted


register(Method(
    name="entropy_bonus", family=FAMILY, cite=ENTROPY_BONUS,
    summary="entropy bonus: loss minus 1e-3 x token-mean entropy",
    grpo_overrides={"entropy_coef": 1e-3},
    trainer_hooks=(trl_metrics({"entropy_coef": "entropy_coef"}),)))

register(Method(
    name="adaptive_entropy", family=FAMILY, cite=SKYWORK,
    summary="adaptive entropy control (Skywork-OR1): bonus coefficient stepped by 0.005 toward target entropy 0.2",
    grpo_overrides={"use_adaptive_entropy": True, "entropy_coef": 0.0, "entropy_target": 0.2,
                    "entropy_coef_delta": 0.005, "entropy_coef_min": 0.0, "entropy_coef_max": 1.0},
    data_parallel="TRL steps the coefficient on the entropy averaged over all processes (the same on every rank)",
    trainer_hooks=(trl_metrics({"entropy_coef": "entropy_coef"}),)))

register(Method(
    name="top_entropy", family=FAMILY, cite=TOP_ENTROPY,
    summary="80/20 rule: policy gradient only through the top 20% highest-entropy tokens of each micro-batch",
    grpo_overrides={"top_entropy_quantile": 0.2},
    data_parallel="TRL's quantile is over the tokens of micro-batch k of every process, gathered: as many completions "
    "as a 1-process micro-batch holds, a different draw of them",
    trainer_hooks=(count_kept_tokens,)))
