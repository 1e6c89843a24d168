"""Turn a base model into the trainable policy a method asks for (LoRA on all seven projections, or full FT)."""
from __future__ import annotations

import torch

from bench.errors import BenchError
from methods import QWEN3_TARGETS


def targeted_linears(model, targets=QWEN3_TARGETS) -> dict[str, torch.nn.Linear]:
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets}
    missing = [t for t in targets if not any(n.split(".")[-1] == t for n in found)]
    if missing:
        raise BenchError(f"model has no modules named {', '.join(missing)} (LoRA targets: {', '.join(targets)})")
    return found


def max_rank(model, targets=QWEN3_TARGETS) -> int:
    """The smallest dimension over all targeted matrices: the largest LoRA rank that makes sense."""
    return min(min(m.in_features, m.out_features) for m in targeted_linears(model, targets).values())


def check_rank(model, rank) -> None:
    if rank == "full":
        return
    limit = max_rank(model)
    if rank > limit:
        raise BenchError(f"bad rank {rank}: larger than the smallest targeted matrix dimension ({limit})")


def build_policy(model, method, rank, alpha: float | None, seed: int, params: dict | None = None,
                 lora_dropout: float = 0.0):
    """LoRA (PEFT) with the method's initializer, or every parameter trainable for rank `full`."""
    from peft import LoraConfig, get_peft_model

    params = method.resolve_params(params)
    check_rank(model, rank)
    torch.manual_seed(seed)  # LoRA's random A (and any randomized SVD) is part of the run's seed
    if rank == "full":
        if method.modifies_base(params):
            raise BenchError(f"method {method.name!r} initializes an adapter; it has no meaning at rank 'full'")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=list(QWEN3_TARGETS),
                        bias="none", init_lora_weights=method.resolved_init(params), task_type="CAUSAL_LM")
    policy = get_peft_model(model, config)
    if method.adapter_init is not None:
        with torch.no_grad():
            method.adapter_init(policy, params)
    # The adapter now holds its initial values; later copies (TRL's "ref" adapter) must not re-run an SVD init
    # on the already-residual base weights (ecosystem.md 1.5).
    policy.peft_config["default"].init_lora_weights = True
    return policy


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
