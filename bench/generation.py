"""Batched generation and greedy accuracy, shared by the tiny-model builder and the harness."""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

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
    policy is exactly what it was. bf16/fp16 weights are left alone (a small delta could round away).
    Yields whether it folded (then only the non-adapter weights act)."""
    from peft.tuners.lora import LoraLayer
    adapter = getattr(model, "active_adapter", None)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})]
    if not layers or not hasattr(model, "disable_adapter") or any(
            m.get_base_layer().weight.dtype != torch.float32 for m in layers):
        yield False
        return
    saved = []
    with torch.no_grad():
        for m in layers:
            weight = m.get_base_layer().weight
            saved.append((weight, weight.detach().clone()))
            weight.add_(m.get_delta_weight(adapter))
    try:
        with model.disable_adapter():
            yield True
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


def acting_weights_digest(model) -> str:
    """sha256 of every tensor the model's generation reads: the weights as `generate` uses them (adapters folded into
    their base weights where merged_adapters folds them, else the adapters and their configuration too), and the
    persistent buffers (the others derive from the configuration)."""
    digest = hashlib.sha256()
    with torch.no_grad(), merged_adapters(model) as folded:
        if not folded and hasattr(model, "peft_config"):  # adapters act: their scaling (alpha, rslora) too
            digest.update(json.dumps({k: v.to_dict() for k, v in model.peft_config.items()}, sort_keys=True,
                                     default=str).encode())
        for name, tensor in model.state_dict(keep_vars=False).items():
            if folded and ".lora_" in name:  # adapters are off while folded: they do not act
                continue
            # a wrapped layer acts as its base layer: the same key for the plain model and a folded PEFT model
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            t = tensor.detach().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _eval_memo_key(model, tokenizer, prompts, max_new_tokens: int, batch_size: int) -> str:
    """Everything greedy completions depend on: acting weights, model and generation configs, tokenizer, prompts,
    budget, batching, device, thread count, library versions and this module's source."""
    import inspect
    import sys

    import transformers
    device = next(model.parameters()).device
    tok = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(
        sorted(tokenizer.get_vocab().items()))
    parts = [acting_weights_digest(model), model.config.to_json_string(), model.generation_config.to_json_string(),
             str(getattr(model.config, "_attn_implementation", None)), tok, tokenizer.padding_side,
             repr(tokenizer.pad_token_id), repr(tokenizer.eos_token_id), repr(getattr(tokenizer, "chat_template", None)),
             repr(getattr(tokenizer, "clean_up_tokenization_spaces", None)), json.dumps(list(prompts), default=str),
             str(max_new_tokens), str(batch_size), str(torch.get_num_threads()), *_hardware(device),
             torch.__version__, transformers.__version__, _peft_version(), inspect.getsource(sys.modules[__name__])]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def _hardware(device) -> list[str]:
    """What the floats of the same program depend on across machines sharing one cache: the CPU kind and the kernels
    torch picks for it, or the GPU, its libraries and matmul precision settings."""
    import os
    import platform
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = [device.type, platform.machine(), cpu, torch.backends.cpu.get_cpu_capability(),
           os.environ.get("MKL_CBWR", ""), os.environ.get("ATEN_CPU_CAPABILITY", ""),
           torch.get_float32_matmul_precision()]
    if device.type == "cuda":
        out += [torch.cuda.get_device_name(device), str(torch.version.cuda), str(torch.backends.cudnn.version()),
                str(torch.backends.cuda.matmul.allow_tf32), str(torch.backends.cudnn.allow_tf32)]
    return out


def _peft_version() -> str:
    try:
        import peft
        return peft.__version__
    except ImportError:
        return ""


def greedy_completions(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 256,
                       memo_dir: Path | None = None) -> tuple[list[str], bool]:
    """Greedy completions, and whether they came from `memo_dir`. Greedy decoding is a pure function of the memo key
    (_eval_memo_key): runs whose initial policies act with the very same weights (every zero-initialized adapter
    and the base model itself) share one evaluation of it. Written atomically; an unreadable entry is recomputed."""
    from bench.io import atomic_write_json
    path = None
    if memo_dir is not None:
        path = Path(memo_dir) / f"greedy-{_eval_memo_key(model, tokenizer, prompts, max_new_tokens, batch_size)}.json"
        try:
            completions = json.loads(path.read_text())["completions"]
            if isinstance(completions, list) and len(completions) == len(prompts):
                return completions, True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    completions, _ = generate(model, tokenizer, prompts, max_new_tokens, greedy=True, batch_size=batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"completions": completions})
    return completions, False


def greedy_accuracy(model, tokenizer, prompts, golds, max_new_tokens: int, batch_size: int = 256,
                    memo_dir: Path | None = None) -> dict:
    """lm-eval exact match (strict and flexible) of greedy completions (scored afresh, also when memoized)."""
    completions, memoized = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size, memo_dir)
    strict = sum(is_correct(c, g, "strict") for c, g in zip(completions, golds))
    flexible = sum(is_correct(c, g, "flexible") for c, g in zip(completions, golds))
    n = max(1, len(golds))
    return {"accuracy": strict / n, "accuracy_flexible": flexible / n, "n": len(golds), "completions": completions,
            "memoized": memoized}
