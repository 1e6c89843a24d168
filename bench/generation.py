"""Batched generation and greedy accuracy, shared by the tiny-model builder and the harness."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from tasks.answers import is_correct


@contextmanager
def eval_mode(model):
    """model.eval() for the block, then the train/eval mode the model had before."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def merged_adapters(model):
    """Run generation with each LoRA update folded into its fp32 base weight (W + s*B*A, PEFT's own delta) and
    the adapters off: one matmul per projection instead of three. The base weights are restored by copy, so the
    policy is exactly what it was. bf16/fp16 weights are left alone (a small delta could round away)."""
    from peft.tuners.lora import LoraLayer
    adapter = getattr(model, "active_adapter", None)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})]
    if not layers or not hasattr(model, "disable_adapter") or any(
            m.get_base_layer().weight.dtype != torch.float32 for m in layers):
        yield
        return
    saved = []
    with torch.no_grad():
        for m in layers:
            weight = m.get_base_layer().weight
            saved.append((weight, weight.detach().clone()))
            weight.add_(m.get_delta_weight(adapter))
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def format_prompts(tokenizer, prompts) -> list[str]:
    """Plain strings pass through; conversational prompts go through the chat template (Qwen3: thinking off)."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        else:
            out.append(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True,
                                                     enable_thinking=False))
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int, greedy: bool = True, batch_size: int = 256,
             temperature: float = 1.0, seed: int | None = None) -> tuple[list[str], dict]:
    """Generate completions for prompts (KV cache on). Returns the texts and token tensors of the last batch set.

    Sampling with `seed` runs under a forked RNG so that measuring never perturbs training's random stream.
    """
    texts = format_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    completions, batches = [], []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), eval_mode(model), \
            merged_adapters(model):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False).to(device)
            kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0,
                                                                top_p=1.0)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **kwargs)
            completion_ids = out[:, enc["input_ids"].shape[1]:]
            completions += tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            batches.append((enc["input_ids"], enc["attention_mask"], completion_ids))
    return completions, {"batches": batches}


def greedy_accuracy(model, tokenizer, prompts, golds, max_new_tokens: int, batch_size: int = 256) -> dict:
    """lm-eval exact match (strict and flexible) of greedy completions."""
    completions, _ = generate(model, tokenizer, prompts, max_new_tokens, greedy=True, batch_size=batch_size)
    strict = sum(is_correct(c, g, "strict") for c, g in zip(completions, golds))
    flexible = sum(is_correct(c, g, "flexible") for c, g in zip(completions, golds))
    n = max(1, len(golds))
    return {"accuracy": strict / n, "accuracy_flexible": flexible / n, "n": len(golds), "completions": completions}
