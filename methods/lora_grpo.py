"""KL-penalized LoRA GRPO and KL-free LoRA GRPO (Rottman et al., ICML-W 2026, TR2026-092).

Objective (GRPO: Shao et al. 2024, arXiv 2402.03300, per-sequence token mean; as TRL's loss_type="grpo"):
for a group of G completions of one prompt,
  A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4)                                   # group-normalized advantage
  L = -1/G sum_i 1/|y_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta * KL_it ]   # per-seq token mean
  rho_it = pi_theta(y_it | .) / pi_old(y_it | .)                                  # live on the 2nd step of each batch
  KL_it  = exp(ref - logp) - (ref - logp) - 1                                     # k3, ref = initial policy
The engine is TRL's GRPOTrainer with loss_type="grpo", scale_rewards="group", epsilon=0.2 and
use_bias_correction_kl=False (the plain k3 term above), set explicitly in bench.engine.
`kl_free_lora` is the same with beta = 0, so TRL builds no reference and runs no reference forward.
"""
from bench.errors import BenchError
from methods import Method, register

CITE = "Rottman, Tonin, Wu, Koike-Akino, Cevher. Connecting Low-Rank Adapters and Policy Stability in GRPO " \
       "Fine-Tuning. ICML Workshop 2026 (MERL TR2026-092)"

def check_beta(params: dict) -> None:
    beta = params.get("beta", 0.0)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise BenchError(f"bad beta {beta!r}: must be a number >= 0")


register(Method(
    name="kl_grpo", family="KL penalty",
    summary="LoRA GRPO, clipped surrogate + KL penalty toward the initial policy (beta 0.04)",
    cite=CITE, beta=0.04, params={"beta": 0.04}, check_params=check_beta))

register(Method(
    name="kl_free_lora", family="KL-free LoRA",
    summary="LoRA GRPO without KL penalty (beta 0): no reference forward passes",
    cite=CITE, beta=0.0))

# `+kl` adds the KL penalty to any method (e.g. geora+kl); it is a component, not a method of its own.
register(Method(name="kl", family="KL penalty",
                summary="KL penalty toward the initial policy (beta 0.04)", cite=CITE, beta=0.04,
                params={"beta": 0.04}, check_params=check_beta), component_only=True)
