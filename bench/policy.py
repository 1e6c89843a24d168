"""Turn a base model into the trainable policy a method asks for (LoRA on all seven projections, or full FT)."""
from __future__ import annotations

import torch

from bench.errors import BenchError
from bench.generation import eval_mode, format_prompts
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
                 lora_dropout: float = 0.0, use_rslora: bool = False):
    """LoRA (PEFT) with the method's initializer, or, for rank `full`, the weights of the same targeted Linear
    projections trained at full rank: every method of a sweep trains the same tensors (PROMA can project only
    Linear weights whose module runs, so norms, embeddings, biases and the LM head stay frozen for all)."""
    from peft import LoraConfig, get_peft_model

    params = method.resolve_params(params)
    check_rank(model, rank)
    torch.manual_seed(seed)  # LoRA's random A (and any randomized SVD) is part of the run's seed
    if rank == "full":
        if method.modifies_base(params):
            raise BenchError(f"method {method.name!r} initializes an adapter; it has no meaning at rank 'full'")
        for p in model.parameters():
            p.requires_grad_(False)
        for m in targeted_linears(model).values():
            m.weight.requires_grad_(True)
        return model
    # use_rslora: PEFT scales B A by alpha / sqrt(r) instead of alpha / r (bench.scaling)
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=list(QWEN3_TARGETS),
                        bias="none", init_lora_weights=method.resolved_init(params), task_type="CAUSAL_LM",
                        use_rslora=use_rslora)
    policy = get_peft_model(model, config)
    if method.adapter_init is not None:
        with torch.no_grad():
            method.adapter_init(policy, params)
    # The adapter now holds its initial values; later copies (TRL's "ref" adapter) must not re-run an SVD init
    # on the already-residual base weights (TRL 1.16 copies the adapter config with PeftModel.add_adapter, which
    # re-runs a PiSSA init and so mutates the shared base weights a second time).
    policy.peft_config["default"].init_lora_weights = True
    return policy


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_set(model) -> str:
    """The trainable tensors, named compactly: layer indices as `*`, PEFT's prefixes dropped, shared parts factored
    out, e.g. `28 tensors: model.layers.*.{mlp.down_proj,...,self_attn.v_proj}.weight`."""
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".default.", ".")
            names.append(".".join("*" if part.isdigit() else part for part in name.split(".")))
    patterns = sorted(set(names))
    if len(patterns) <= 1:
        return f"{len(names)} tensors: {patterns[0] if patterns else '-'}"
    split = [p.split(".") for p in patterns]
    head = 0
    while all(len(p) > head + 1 and p[head] == split[0][head] for p in split):
        head += 1
    tail = 0
    while all(len(p) - head > tail + 1 and p[-1 - tail] == split[0][-1 - tail] for p in split):
        tail += 1
    middles = [".".join(p[head:len(p) - tail]) for p in split]
    prefix, suffix = ".".join(split[0][:head]), ".".join(split[0][len(split[0]) - tail:])
    body = "{" + ",".join(middles) + "}"
    return f"{len(names)} tensors: " + ".".join(x for x in (prefix, body, suffix) if x)


@torch.no_grad()
def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) at every position of (left-padded) sequences, float32 [B, L, V]."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with eval_mode(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return torch.log_softmax(logits.float() / temperature, dim=-1)


class InitKLToBase:
    """For an initializer that writes a residual into the base weights (SVD inits): the exact token-mean
    KL(pi_0 || base) of softmax(logits / T) over every position of up to `max_prompts` prompts (teacher-forced: no
    sampling, no RNG use). The residual W - s B A is computed in fp32 but stored in the weights' dtype, so in bf16
    pi_0 is the base model only up to that rounding. Construct before build_policy (it scores the base model),
    call measure(policy) after; {} for methods that leave the base weights alone."""

    def __init__(self, model, method, rank, params: dict | None, tokenizer, prompts: list, temperature: float = 1.0,
                 max_prompts: int = 4):
        self.base = None
        if rank == "full" or not method.modifies_base(method.resolve_params(params)) or not prompts:
            return
        device = next(model.parameters()).device
        self.enc = tokenizer(format_prompts(tokenizer, prompts[:max_prompts]), return_tensors="pt", padding=True,
                             padding_side="left", add_special_tokens=False).to(device)
        self.temperature = temperature
        self.base = next_token_logprobs(model, self.enc["input_ids"], self.enc["attention_mask"], temperature)

    def measure(self, policy) -> dict:
        if self.base is None:
            return {}
        init = next_token_logprobs(policy, self.enc["input_ids"], self.enc["attention_mask"], self.temperature)
        mask = self.enc["attention_mask"].to(init.dtype)
        per_token = (init.exp() * (init - self.base)).sum(-1)
        n = int(mask.sum())
        self.base = None
        return {"init_kl_to_base": float((per_token * mask).sum()) / max(n, 1), "init_kl_to_base_tokens": n}
