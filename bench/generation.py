"""Batched generation and greedy accuracy, shared by the tiny-model builder and the harness.

The greedy eval (`greedy_decode`) sorts prompts by token length and decodes `batch_size` of them at a time, each
batch left-padded to its longest prompt; a row that emits EOS leaves the batch (its KV cache rows are dropped), and
a batch stops when every row has finished or the budget is spent. Less padding and no finished rows: the same
greedy tokens as the model's own `generate` at a fraction of the cost (bench.perf.eval_cost measures it). Each token
after the prompt runs through bench.decode's lean KV-cache step where the model is supported (`fast=True`), else
through the model's own forward with a DynamicCache (`fast=False`, the path before bench.decode). The
completions are a pure function of the acting weights, the prompts, the budget and `batch_size` (which rows share a
batch decides the padding, and padding may change the last bits of a float, hence a near-tied argmax); on the tiny
model they equal one-at-a-time decoding (tests/test_generation.py).
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from tasks.answers import FALLBACK, extract_strict, is_correct, truncate_at_stop


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


# generation_config settings under which HF's greedy search is more than the argmax of the logits (its logits
# processors: GenerationMixin._get_logits_processor); with any of them set, greedy_decode uses `generate` itself.
_PROCESSED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
              "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
              "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
              "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False}


def _plain_argmax(model) -> bool:
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, k, v) in (v, None) for k, v in _PROCESSED.items())


@torch.no_grad()
def greedy_decode(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 64,
                  fast: bool = True) -> list[dict]:
    """Greedy completions of prompts, in prompt order: {"completion": text, "completion_tokens": tokens generated
    (EOS included), "truncated": the budget ran out before EOS}. See the module docstring for the batching and
    `fast`."""
    from bench import decode
    if not _plain_argmax(model):
        return _generate_records(model, tokenizer, prompts, max_new_tokens, batch_size)
    texts = format_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # similar lengths share a batch: less padding
    tokens: list[list[int]] = [[] for _ in ids]
    with eval_mode(model), merged_adapters(model):
        lean = fast and decode.unsupported(model) is None  # (after folding: adapters that are off act as base layers)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = [ids[i] for i in rows]
            done = decode.greedy(model, batch, max_new_tokens, [eos], pad) if lean else \
                _greedy_batch(model, batch, max_new_tokens, eos, pad, device)
            for row, toks in zip(rows, done):
                tokens[row] = toks
    out = []
    for toks in tokens:
        ended = bool(toks) and toks[-1] == eos
        out.append({"completion": tokenizer.decode(toks, skip_special_tokens=True), "completion_tokens": len(toks),
                    "truncated": not ended})
    return out


def _generate_records(model, tokenizer, prompts, max_new_tokens: int, batch_size: int) -> list[dict]:
    """greedy_decode's records from the model's own `generate` (HF stops a batch only when every row has ended, so a
    row without EOS used the whole budget)."""
    texts, out = generate(model, tokenizer, prompts, max_new_tokens, greedy=True, batch_size=batch_size)
    records = []
    for *_, completion_ids in out["batches"]:
        for row in completion_ids.tolist():
            n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            records.append({"completion_tokens": n, "truncated": tokenizer.eos_token_id not in row})
    return [{"completion": t, **r} for t, r in zip(texts, records)]


def _greedy_batch(model, prompt_ids: list[list[int]], max_new_tokens: int, eos: int, pad: int, device) -> list:
    """One left-padded batch; what HF generate does for greedy search (position ids from the attention mask, a
    dynamic KV cache, argmax of the last position's logits), minus the finished rows."""
    from transformers import DynamicCache
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    live = list(range(len(prompt_ids)))  # batch row -> prompt of this batch
    done: list[list[int]] = [[] for _ in prompt_ids]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    for step in range(max_new_tokens):
        next_ids = logits.argmax(-1)
        for row, token in zip(live, next_ids.tolist()):
            done[row].append(token)
        if step == max_new_tokens - 1:
            break
        running = next_ids != eos
        if not running.any():
            break
        if not running.all():  # finished rows leave the batch, their cache rows with them
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live = [live[i] for i in keep.tolist()]
            next_ids, mask = next_ids[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        logits = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                       cache=cache, use_cache=True).logits[:, -1]
    return done


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


def _eval_memo_key(model, tokenizer, prompts, max_new_tokens: int, batch_size: int, fast: bool = True) -> str:
    """Everything greedy completions depend on: acting weights, model and generation configs, tokenizer, prompts,
    budget, batching, decoder, device, thread count, library versions and the source of this module and of
    bench.decode."""
    import inspect
    import sys

    import transformers

    from bench import decode
    device = next(model.parameters()).device
    tok = _tokenizer_state(tokenizer)
    parts = [acting_weights_digest(model), model.config.to_json_string(), model.generation_config.to_json_string(),
             str(getattr(model.config, "_attn_implementation", None)), tok, tokenizer.padding_side,
             repr(tokenizer.pad_token_id), repr(tokenizer.eos_token_id),
             repr(getattr(tokenizer, "chat_template", None)),
             repr(getattr(tokenizer, "clean_up_tokenization_spaces", None)), json.dumps(list(prompts), default=str),
             str(max_new_tokens), str(batch_size), str(torch.get_num_threads()), *_hardware(device),
             torch.__version__, transformers.__version__, _peft_version(), inspect.getsource(sys.modules[__name__]),
             f"fast={fast}", inspect.getsource(decode)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def _tokenizer_state(tokenizer) -> str:
    """The tokenizer as it tokenizes: its backend without the padding and truncation settings, which transformers
    resets on every call (so they are left over from whichever call came last)."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        return repr(sorted(tokenizer.get_vocab().items()))
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    return json.dumps(state, sort_keys=True)


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


MEMO_FIELDS = ("completion", "completion_tokens", "truncated")


def greedy_completions(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 64,
                       memo_dir: Path | None = None, fast: bool = True) -> tuple[list[dict], bool]:
    """greedy_decode's records, and whether they came from `memo_dir`. Greedy decoding is a pure function of the
    memo key (_eval_memo_key): runs whose initial policies act with the very same weights (every zero-initialized
    adapter and the base model itself) share one evaluation of it. Written atomically; an unreadable or incomplete
    entry is recomputed."""
    from bench.io import atomic_write_json
    path = None
    if memo_dir is not None:
        key = _eval_memo_key(model, tokenizer, prompts, max_new_tokens, batch_size, fast)
        path = Path(memo_dir) / f"greedy-{key}.json"
        try:
            records = json.loads(path.read_text())["records"]
            if isinstance(records, list) and len(records) == len(prompts) and all(
                    isinstance(r, dict) and isinstance(r.get("completion"), str)
                    and type(r.get("completion_tokens")) is int and type(r.get("truncated")) is bool
                    for r in records):
                return [{k: r[k] for k in MEMO_FIELDS} for r in records], True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    records = greedy_decode(model, tokenizer, prompts, max_new_tokens, batch_size, fast)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"records": records})
    return records, False


def score_records(records: list[dict], golds, ids=None) -> list[dict]:
    """Per-item eval records (id, prediction, completion, correct_strict, correct_flexible, completion_tokens,
    truncated), scored afresh with lm-eval's exact match. `prediction`: the strict-match extraction (`#### N`),
    None where there is none. ids: the items' stable ids (default: their index, as a string)."""
    out = []
    for i, (record, gold) in enumerate(zip(records, golds, strict=True)):
        text = record["completion"]
        prediction = extract_strict(truncate_at_stop(text))
        out.append({"id": str(ids[i]) if ids is not None else str(i),
                    "prediction": None if prediction == FALLBACK else prediction, "completion": text,
                    "correct_strict": is_correct(text, gold, "strict"),
                    "correct_flexible": is_correct(text, gold, "flexible"),
                    "completion_tokens": record["completion_tokens"], "truncated": record["truncated"]})
    return out


def greedy_accuracy(model, tokenizer, prompts, golds, max_new_tokens: int, batch_size: int = 64,
                    memo_dir: Path | None = None, ids=None, fast: bool = True) -> dict:
    """lm-eval exact match (strict and flexible) of greedy completions (scored afresh, also when memoized), and the
    per-item records (`items`, see score_records)."""
    records, memoized = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size, memo_dir, fast)
    items = score_records(records, golds, ids)
    n = max(1, len(golds))
    return {"accuracy": sum(r["correct_strict"] for r in items) / n,
            "accuracy_flexible": sum(r["correct_flexible"] for r in items) / n, "n": len(golds),
            "completions": [r["completion"] for r in items], "items": items, "memoized": memoized}
