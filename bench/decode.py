"""A lean KV-cache decoder for the Llama-family models the benchmark trains (Qwen3, Qwen2, Llama), used by the greedy
eval and by rollout sampling in place of transformers' `generate`.

Why: the embedded model (0.85M parameters) spends most of a `generate` step in Python and dispatch overhead (nested
modules, PEFT wrappers, mask building, a growing DynamicCache), not in arithmetic. The prompt goes through the model's
own forward (transformers' prefill, its cache); each later token runs the same arithmetic as the layers' modules on a
preallocated key/value buffer (one tensor for all layers), with fewer kernels and less Python per step:
- the attention of transformers' eager path (`eager_attention_forward`: q k^T * scale + additive mask, fp32 softmax,
  times v), grouped-query heads read in place rather than repeated (`repeat_kv` copies the whole cache per layer);
  the additive mask is kept across steps (one column set per step), not rebuilt;
- a LoRA layer whose adapters are off (folded into its base weight by bench.generation.merged_adapters) read as its
  base linear, and the q/k/v projections (and the MLP's gate/up) as one matmul over their concatenated weights,
  built once per decoder (each output column is the same dot product as in its own matmul: on the CPU tested the
  floats are identical); an active adapter, or any projection that is not a plain linear, runs through its module;
- transformers' RMSNorm arithmetic inline (Qwen3's per-head query and key norms in one pass) and rotary cos/sin read
  from a table of all positions computed once by the model's rotary module (default rope type; other types call the
  module every step); norms of other classes run through their modules;
- rows that finished (EOS) leave the batch once they are a quarter of its rows (COMPACT_FRACTION): each removal
  copies the cache (up to the current length), each finished row kept decodes padding that is discarded;
- a prompt repeated in the batch (GRPO's num_generations copies) goes through the prompt pass once.
Where the step's time goes (64 rows, tiny model, one thread; bench.perf / a torch.profiler run): the linear layers'
matmuls (compute-bound), the attention's small batched matmuls (bound by reading the cache), and the sampling's
exponential draws (`torch.multinomial`, the same in `generate`), together about 70%; the rest is elementwise kernels
and dispatch. torch.compile of the step was measured and is not used: compiling took 3-10 s (about a run's whole
generation time on this model) and the compiled step was not faster (its matmuls stay library calls), with floats that
differ from eager in the last bits. Also measured and not used (greedy eval, 1000 items, same tokens): continuous
batching (the next prompts taking finished rows' places) cost 16% more, since rows sharing one column index attend over
the longest row's span and each admission copies the cache; keys stored transposed, and rotate_half as a roll, were
not faster in the whole step.
The floats of a step can differ from `generate`'s in the last bits (matmul shapes: fewer rows, grouped heads), so a
token can differ only where two candidates nearly tie; tests/test_decode.py checks logits and tokens against
transformers. Unsupported architectures or settings fall back to transformers (`unsupported`).

Sampling (`sample`) keeps `generate`'s random stream: it draws `torch.multinomial` over the *whole* batch each step,
finished rows included, until every row has finished or the budget is spent, exactly as `generate` does (the draw of
a row does not depend on the other rows' probabilities: torch samples one token per row as argmax(p / E), E ~ Exp(1)
drawn for the whole [batch, vocab] tensor). Its logits warpers are transformers' own classes, in `generate`'s order.
"""
from __future__ import annotations

import torch

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
# finished rows leave the cache once they are this fraction of its rows (bench.perf eval cost, 1000 items, tiny model,
# one thread: 0 - every time a row finishes - cost about 10% more CPU than 0.25 at 128 rows per batch)
COMPACT_FRACTION = 0.25
# generation_config fields under which `generate` applies more than the sampling warpers implemented here, at the value
# where they do nothing (GenerationMixin._get_logits_processor of transformers 5.24)
_INACTIVE = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
             "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
             "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
             "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
             "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beams": 1,
             "num_return_sequences": 1, "guidance_scale": None, "watermarking_config": None, "stop_strings": None,
             "encoder_repetition_penalty": 1.0, "diversity_penalty": 0.0, "token_healing": False,
             "assistant_model": None, "prompt_lookup_num_tokens": None}


def unsupported(model) -> str | None:
    """Why this decoder cannot stand in for the model's forward (None: it can)."""
    base = _causal_lm(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return f"attention implementation {config._attn_implementation!r}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]):
        return "sliding-window layers"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if not all(hasattr(base, a) for a in ("model", "lm_head")) or not hasattr(base.model, "rotary_emb"):
        return "not a decoder-only CausalLM with model.layers, model.rotary_emb and lm_head"
    return None


def sampling_unsupported(generation_config) -> str | None:
    """Why `sample` cannot reproduce `generate` under this generation config (None: it can)."""
    for key, inactive in _INACTIVE.items():
        value = getattr(generation_config, key, inactive)
        if value not in (inactive, None) and not (isinstance(value, (list, dict)) and not value):
            return f"generation setting {key}={value!r}"
    if getattr(generation_config, "do_sample", True) is not True:
        return "do_sample is off"
    if getattr(generation_config, "cache_implementation", None) not in (None, "dynamic"):
        return f"cache_implementation {generation_config.cache_implementation!r}"
    return None


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# transformers' RMSNorm classes of the supported models; their forward is the same arithmetic (transformers 5.24):
# x32 = x.float(); x32 * rsqrt(mean(x32^2) + eps); weight * x32.to(x.dtype)
_RMS_NORMS = ("Qwen3RMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm")


def _plain(module):
    """(weight, bias) of a module that acts as a plain linear layer (a PEFT LoRA layer with its adapters off reads as
    its base layer), else None."""
    from peft.tuners.lora import LoraLayer
    if isinstance(module, LoraLayer) and module.disable_adapters and not module.merged:
        module = module.get_base_layer()
    return (module.weight, module.bias) if type(module) is torch.nn.Linear else None


def _linear(*modules):
    """One callable for projections of the same input, their outputs concatenated on the last dim: one matmul over
    the concatenated weights (copied once per decoder) where all act as plain linears (each output column is the
    same dot product as in its own matmul), else each module's own forward (an active adapter runs through PEFT)."""
    plain = [_plain(m) for m in modules]
    if all(p is not None for p in plain):
        weight = torch.cat([w for w, _ in plain]) if len(plain) > 1 else plain[0][0]
        bias = None
        if any(b is not None for _, b in plain):
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in plain])
        return lambda x: torch.nn.functional.linear(x, weight, bias)
    if len(modules) == 1:
        return modules[0]
    return lambda x: torch.cat([m(x) for m in modules], -1)


def _inline_norm(module) -> bool:
    return type(module).__name__ in _RMS_NORMS and hasattr(module, "variance_epsilon")


def _rms(x, weight, eps):
    """transformers' RMSNorm forward (the classes in _RMS_NORMS), inline: the same operations in the same order."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _norm(module):
    if _inline_norm(module):
        weight, eps = module.weight, module.variance_epsilon
        return lambda x: _rms(x, weight, eps)
    return module


def _head_norms(q_norm, k_norm, q_heads: int, kv_heads: int):
    """Qwen3's per-head RMSNorms of queries and keys, applied to [rows, q_heads + kv_heads, head_dim]: one pass
    with each head's weight stacked where both are transformers' RMSNorm (elementwise the same arithmetic), else
    each module on its slice. None where the model has none (Llama, Qwen2)."""
    if q_norm is None:
        return None
    if _inline_norm(q_norm) and _inline_norm(k_norm) and q_norm.variance_epsilon == k_norm.variance_epsilon:
        d = q_norm.weight.shape[-1]
        weight = torch.cat([q_norm.weight.expand(q_heads, d), k_norm.weight.expand(kv_heads, d)])
        eps = q_norm.variance_epsilon
        return lambda x: _rms(x, weight, eps)
    return lambda x: torch.cat([q_norm(x[:, :q_heads]), k_norm(x[:, q_heads:])], 1)


def _rotate_half(x):
    """transformers' rotate_half (the supported models share it)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVDecoder:
    """One batch of left-padded prompts: `prefill` then one `step` per token; `keep` selects rows of the batch."""

    def __init__(self, model):
        lm = _causal_lm(model)
        self.config, self.backbone = lm.config, lm.model
        self.lm = lm
        self.embed, self.norm, self.head = self.backbone.embed_tokens, _norm(self.backbone.norm), _linear(lm.lm_head)
        self.rotary = self.backbone.rotary_emb
        # a table of every position's cos/sin, computed once, where the rotary embedding is a pure function of the
        # position (rope type default: position * inv_freq, elementwise; others may rescale with the sequence length)
        self.rotary_table = getattr(self.rotary, "rope_type", None) == "default"
        self.kv_heads = self.config.num_key_value_heads
        self.heads = self.config.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.layers = []
        for layer in self.backbone.layers[:self.config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                norm1=_norm(layer.input_layernorm), norm2=_norm(layer.post_attention_layernorm),
                qkv=_linear(attn.q_proj, attn.k_proj, attn.v_proj), o=_linear(attn.o_proj),
                qk_norm=_head_norms(getattr(attn, "q_norm", None), getattr(attn, "k_norm", None), self.heads,
                                    self.kv_heads),
                gate_up=_linear(mlp.gate_proj, mlp.up_proj), down=_linear(mlp.down_proj), act=mlp.act_fn,
                head_dim=attn.head_dim, scaling=attn.scaling))
        self.head_dim, self.intermediate = self.layers[0]["head_dim"], self.config.intermediate_size

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The prompts through the model's own forward (as `generate` runs it: position ids from the mask, a dynamic
        cache); its keys and values copied into one buffer with room for max_new_tokens. The last position's
        logits."""
        from transformers import DynamicCache
        batch, width = input_ids.shape
        positions = (attention_mask.long().cumsum(1) - 1).masked_fill(attention_mask == 0, 1)
        cache = DynamicCache(config=self.config)
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]
        self.length, total = width, width + max_new_tokens
        k = cache.layers[0].keys
        # transformers' eager mask: 0 where attended, the dtype's minimum where not, added to the scores
        self.additive = torch.full((batch, total), torch.finfo(k.dtype).min, dtype=k.dtype, device=k.device)
        self.additive[:, :width].masked_fill_(attention_mask.bool(), 0.0)
        self.positions = attention_mask.long().sum(1)  # the next token's: the count of real tokens before it
        # all layers' keys and values in one tensor [layer, key/value, row, kv head, position, head dim]: selecting
        # rows (`keep`) is one copy
        self.cache = k.new_empty(len(self.layers), 2, batch, k.shape[1], total, k.shape[3])
        for i in range(len(self.layers)):
            self.cache[i, 0, :, :, :width] = cache.layers[i].keys
            self.cache[i, 1, :, :, :width] = cache.layers[i].values
        if self.rotary_table:
            cos, sin = self.rotary(k, torch.arange(total, device=k.device)[None])
            self.cos, self.sin = cos[0], sin[0]
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows (indices into the current batch, repeats allowed) decode on; the cache is copied up to the
        current length only."""
        t = self.length
        cache = self.cache.new_empty(self.cache.shape[:2] + (len(rows),) + self.cache.shape[3:])
        cache[..., :t, :] = self.cache[..., :t, :].index_select(2, rows)
        self.cache = cache
        self.additive = self.additive[rows]
        self.positions = self.positions[rows]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; the next-token logits [rows, vocab]."""
        t = self.length
        self.additive[:, t] = 0.0
        self.length = t + 1
        additive = self.additive[:, None, None, :t + 1]
        positions = self.positions
        self.positions = positions + 1
        hidden = self.embed(tokens)
        if self.rotary_table:
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        else:
            cos, sin = self.rotary(hidden, positions[:, None])
        rows, h, kv, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        for i, p in enumerate(self.layers):
            qkv = p["qkv"](p["norm1"](hidden)).view(rows, h + 2 * kv, d)
            qk, v = qkv[:, :h + kv], qkv[:, h + kv:]
            if p["qk_norm"] is not None:
                qk = p["qk_norm"](qk)
            qk = qk * cos + _rotate_half(qk) * sin  # transformers' apply_rotary_pos_emb, queries and keys at once
            self.cache[i, 0, :, :, t] = qk[:, h:]
            self.cache[i, 1, :, :, t] = v
            keys, values = self.cache[i, 0, :, :, :t + 1], self.cache[i, 1, :, :, :t + 1]
            q = qk[:, :h].view(rows, kv, self.groups, d)  # head h = kv_head * groups + g, as repeat_kv
            scores = torch.matmul(q, keys.transpose(2, 3)) * p["scaling"] + additive
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            hidden = hidden + p["o"](torch.matmul(weights, values).view(rows, h * d))
            gate, up = p["gate_up"](p["norm2"](hidden)).split(self.intermediate, -1)
            hidden = hidden + p["down"](p["act"](gate) * up)
        return self.head(self.norm(hidden))


def _left_pad(prompt_ids: list[list[int]], pad: int, device, multiple: int | None = None):
    width = max(len(p) for p in prompt_ids)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    return ids, mask


def _decode(model, prompt_ids, max_new_tokens: int, eos_ids, pad: int, pick, pad_to_multiple_of=None):
    """Decode one batch: `pick(logits of the live rows, their batch indices, step)` chooses the next tokens. A row ends
    at its first EOS (kept) or at the budget. Returns each row's tokens."""
    device = next(model.parameters()).device
    decoder = KVDecoder(model)
    # GRPO repeats each prompt num_generations times: the prompt pass runs once per distinct prompt, its cache rows
    # then repeated (each row of a forward depends on that row alone)
    distinct = list(dict.fromkeys(map(tuple, prompt_ids)))
    ids, mask = _left_pad(distinct, pad, device, pad_to_multiple_of)
    logits = decoder.prefill(ids, mask, max_new_tokens)
    if len(distinct) < len(prompt_ids):
        where = {p: i for i, p in enumerate(distinct)}
        rows = torch.tensor([where[tuple(p)] for p in prompt_ids], device=device)
        decoder.keep(rows)
        logits = logits[rows]
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    live = torch.arange(len(prompt_ids), device=device)  # the batch row each live row decodes
    slots = torch.arange(len(prompt_ids), device=device)  # the decoder row each live row occupies
    rows = len(prompt_ids)  # decoder rows: the live ones and ended ones not yet dropped
    tokens = torch.full((len(prompt_ids), max_new_tokens), pad, dtype=torch.long, device=device)
    lengths = torch.full((len(prompt_ids),), max_new_tokens, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        next_ids = pick(logits, live)
        tokens[live, step] = next_ids
        if step == max_new_tokens - 1:
            break
        ended = torch.isin(next_ids, eos)
        if ended.any():
            lengths[live[ended]] = step + 1
            stay = ended.logical_not().nonzero().squeeze(1)
            if not len(stay):
                break
            live, slots, next_ids = live[stay], slots[stay], next_ids[stay]
            # ended rows leave the cache once they are COMPACT_FRACTION of it: each drop copies the cache, each
            # ended row kept decodes (discarded) padding
            if rows - len(live) >= COMPACT_FRACTION * rows:
                decoder.keep(slots)
                slots, rows = torch.arange(len(live), device=device), len(live)
        if rows == len(live):
            logits = decoder.step(next_ids)
        else:
            feed = torch.full((rows,), pad, dtype=next_ids.dtype, device=device)
            feed[slots] = next_ids
            logits = decoder.step(feed)[slots]
    return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]


def greedy(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids, pad: int) -> list[list[int]]:
    """Greedy completions (argmax of the logits) of one left-padded batch; each ends at its first EOS or the budget."""
    return _decode(model, prompt_ids, max_new_tokens, eos_ids, pad, lambda logits, live: logits.argmax(-1))


def warpers(generation_config) -> list:
    """transformers' own logits warpers for a sampling config, in `generate`'s order (temperature, top-k, top-p,
    min-p: GenerationMixin._get_logits_processor)."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    c, out = generation_config, []
    if c.temperature is not None and c.temperature != 1.0:
        out.append(TemperatureLogitsWarper(c.temperature))
    if c.top_k is not None and c.top_k != 0:
        out.append(TopKLogitsWarper(top_k=c.top_k, min_tokens_to_keep=1))
    if c.top_p is not None and c.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=c.top_p, min_tokens_to_keep=1))
    if c.min_p is not None:
        out.append(MinPLogitsWarper(min_p=c.min_p, min_tokens_to_keep=1))
    return out


def sample(model, prompt_ids: list[list[int]], max_new_tokens: int, generation_config, pad: int,
           pad_to_multiple_of: int | None = None) -> list[list[int]]:
    """Sampled completions of one batch, as `generate(do_sample=True)` with this config draws them (see the module
    docstring for the random stream). Each ends at its first EOS (kept) or the budget."""
    eos_ids = generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    processors = warpers(generation_config)
    batch = len(prompt_ids)

    def pick(logits, live):
        scores = logits.to(dtype=torch.float32, copy=True)
        for warp in processors:
            scores = warp(None, scores)
        probs = torch.zeros(batch, scores.shape[1], dtype=scores.dtype, device=scores.device)
        probs[:, pad] = 1.0  # a finished row: any valid distribution (its draw is discarded, as generate pads it)
        probs[live] = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)[live]

    return _decode(model, prompt_ids, max_new_tokens, eos_ids, pad, pick, pad_to_multiple_of)
