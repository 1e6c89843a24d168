"""grpo-bench: a comparative benchmark of GRPO stabilizers (harness, metrics, sweeps, reports)."""
__version__ = "0.1.0"
