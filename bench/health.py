"""One-line warnings when a run's rollouts cannot teach it anything, read from its metrics.jsonl rows.

Two conditions, each said once per run:
- truncation: more than half of a generation batch's completions hit the completion budget without EOS
  (`frac_truncated`, TRL's completions/clipped_ratio). Under an exact-match reward a cut-off solution scores 0, so
  a budget shorter than the task's solutions zeroes the rewards.
- no reward variance: every group of a generation batch had rewards of zero spread (TRL's frac_reward_zero_std
  = 1) for ZERO_STD_BATCHES batches in a row. GRPO's advantages are then all 0 and the policy gradient is 0
  (Shao et al. 2024, arXiv 2402.03300, eq. 3 with normalized group rewards): nothing can learn.
"""
from __future__ import annotations

TRUNCATED_ABOVE = 0.5    # the threshold: more than half of the batch
ZERO_STD_BATCHES = 3     # "several steps in a row": three generation batches (six optimizer steps by default)


class RunHealth:
    """Feed it every metrics row in order (`check`); it returns the warnings to say now, each kind at most once."""

    def __init__(self, run_id: str, budget: int, zero_std_batches: int = ZERO_STD_BATCHES):
        self.run_id, self.budget, self.zero_std_batches = run_id, budget, zero_std_batches
        self.said: set[str] = set()
        self.zero_std_run: list[int] = []  # steps of the current streak of all-zero-variance generation batches

    def check(self, row: dict) -> list[str]:
        out = []
        step = row.get("step")
        truncated = row.get("frac_truncated")
        if truncated is not None and truncated > TRUNCATED_ABOVE and "truncated" not in self.said:
            self.said.add("truncated")
            out.append(f"{self.run_id}: step {step}: {truncated:.0%} of the completions hit the {self.budget}-token "
                       f"budget without EOS (frac_truncated); a cut-off solution earns no reward: raise it, e.g. "
                       f"--set max_completion_length={2 * self.budget}")
        zero_std = row.get("frac_reward_zero_std")
        if zero_std is not None:  # a generation step
            self.zero_std_run = self.zero_std_run + [step] if zero_std >= 1.0 else []
            if len(self.zero_std_run) >= self.zero_std_batches and "zero_std" not in self.said:
                self.said.add("zero_std")
                reward = row.get("reward")
                reward = f"{reward:.2f}" if isinstance(reward, (int, float)) else "not logged"
                out.append(f"{self.run_id}: steps {self.zero_std_run[0]}-{step}: {len(self.zero_std_run)} generation "
                           f"batches in a row with zero reward variance in every group (mean reward {reward}): "
                           "all advantages are 0, nothing can learn; check the budget, the reward and the "
                           "base accuracy")
        return out
