"""Metrics measured identically for every method (README, "Metrics").

Every distribution below is the one TRL's loss optimizes: softmax(logits / T) at the run's sampling temperature T
(TRL divides the logits by T in its log-prob head). The probe set is sampled from exactly that distribution: no
top-k, top-p, min-p, repetition penalty or any other logits processor, whatever the model's generation_config says
(TRL's rollouts may use such settings; its loss does not see them).

- kl_ref:  token-mean exact KL(pi_theta || pi_0) = sum_v p_theta(v) (log p_theta(v) - log p_0(v)), over the
           completion tokens that pi_theta samples for a fixed, seeded probe set of held-out prompts. pi_0 is the
           initial policy (for residual inits: residual + initial adapter), run by swapping the initial values of
           the trainable tensors back in. Measured whatever the method's beta. kl_ref_k3 is TRL's k3 estimate
           exp(q - p) - (q - p) - 1 on the sampled tokens, for comparison.
- kl_step: per optimizer step, token-mean exact KL(pi_before || pi_after) on (a fixed-size subset of) that
           step's rollouts.
- entropy: token-mean full-vocabulary entropy -sum_v p log p of the policy on its rollouts (entropy, before
           the step) and on the probe set (entropy_probe).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.generation import eval_mode, generate
from bench.threads import torch_threads


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for each completion token up to and including the first EOS (TRL's convention), else 0."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


@torch.no_grad()
def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, comp_mask,
                        temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) over the full vocabulary at every completion position: [B, Lc, V] in float32."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, comp_mask], 1)
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)  # left padding: count positions from the first token
    with eval_mode(model):
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits
    logits = logits[:, prompt_ids.shape[1] - 1:-1].float()
    return F.log_softmax(logits / temperature, dim=-1)


def kl_sum(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum over masked tokens of KL(p || q) over the vocabulary, number of tokens)."""
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return float((per_token * mask).sum()), int(mask.sum())


def entropy_sum(logp: torch.Tensor, mask: torch.Tensor) -> float:
    return float((-(logp.exp() * logp).sum(-1) * mask).sum())


def k3_sum(logp: torch.Tensor, logq: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lq = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    d = lq - lp
    return float(((d.exp() - d - 1) * mask).sum())


class InitialPolicy:
    """The reference-policy rule shared by all methods: pi_0 is the policy as the method built it.

    It keeps a copy of every trainable tensor at construction; `active()` swaps those values in (exactly the
    initial policy, including residual-initialized adapters), and swaps the current ones back afterwards.
    """

    def __init__(self, model):
        self.saved = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def trainable(self):
        return [p for p, _ in self.saved]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the initial values back for good (e.g. to repeat a measurement from the same start)."""
        for p, initial in self.saved:
            p.copy_(initial)

    @contextmanager
    def active(self):
        current = [p.detach().clone() for p, _ in self.saved]
        with torch.no_grad():
            for p, initial in self.saved:
                p.copy_(initial)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), value in zip(self.saved, current):
                    p.copy_(value)


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def head(self, n: int) -> RolloutBatch:
        return RolloutBatch(self.prompt_ids[:n], self.prompt_mask[:n], self.completion_ids[:n],
                            self.completion_mask[:n])

    def chunks(self, size: int):
        for s in range(0, self.prompt_ids.shape[0], size):
            yield RolloutBatch(self.prompt_ids[s:s + size], self.prompt_mask[s:s + size],
                               self.completion_ids[s:s + size], self.completion_mask[s:s + size])

    def logprobs(self, model, temperature: float = 1.0) -> torch.Tensor:
        return completion_logprobs(model, self.prompt_ids, self.prompt_mask, self.completion_ids,
                                   self.completion_mask, temperature)


@torch.no_grad()
def kl_to_reference(model, reference: InitialPolicy, batch: RolloutBatch, chunk: int = 16,
                    temperature: float = 1.0) -> dict:
    """kl_ref, kl_ref_k3 and entropy of the current policy on `batch` (sampled from the current policy), all of
    softmax(logits / temperature)."""
    kl = ent = k3 = 0.0
    n = 0
    for part in batch.chunks(chunk):
        logp = part.logprobs(model, temperature)
        with reference.active():
            logq = part.logprobs(model, temperature)
        mask = part.completion_mask.to(logp.dtype)
        s, c = kl_sum(logp, logq, mask)
        kl, n = kl + s, n + c
        ent += entropy_sum(logp, mask)
        k3 += k3_sum(logp, logq, part.completion_ids, mask)
    n = max(n, 1)
    return {"kl_ref": kl / n, "kl_ref_k3": k3 / n, "entropy_probe": ent / n}


@contextmanager
def plain_sampling(model):
    """The model's generation_config replaced by one holding only its special token ids, so that `generate` applies
    no logits processor the caller does not ask for (Hub models ship top-k, top-p, repetition penalties...)."""
    from transformers import GenerationConfig
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    target.generation_config = GenerationConfig(**{k: getattr(saved, k, None) for k in ids})
    try:
        yield
    finally:
        target.generation_config = saved


# How the probe set is sampled and scored (recorded in each run's config.json)
PROBE_SAMPLING = "softmax(logits / temperature); no top-k, top-p, min-p, repetition penalty or other processor"


class ProbeSet:
    """A fixed, seeded set of held-out prompts; each measurement samples from the current policy's softmax(logits / T)
    with the same seed (under a forked RNG, so measuring never changes training's random stream)."""

    def __init__(self, prompts: list, max_new_tokens: int, seed: int = 1234, temperature: float = 1.0,
                 progress: bool = False, position: int = 2, threads: int | None = None):
        self.prompts, self.max_new_tokens, self.seed, self.temperature = prompts, max_new_tokens, seed, temperature
        self.threads = threads  # torch threads of the sampling (bench.parallel.decode_threads; None: unchanged)
        self.progress, self.position = progress, position  # a bar (decode steps) where sampling takes seconds

    def sample(self, model, tokenizer) -> RolloutBatch:
        from bench.progress import count_forwards, phase
        with plain_sampling(model), phase("probe set: sampling", self.max_new_tokens, "token", self.progress,
                                          self.position) as bar, count_forwards(model, bar), \
                torch_threads(self.threads):
            # top_k=0, top_p=1 and the temperature are passed explicitly by generate
            _, out = generate(model, tokenizer, self.prompts, self.max_new_tokens, greedy=False, seed=self.seed,
                              temperature=self.temperature, batch_size=len(self.prompts))
        (prompt_ids, prompt_mask, completion_ids), = out["batches"]  # the probe set is generated at once
        return RolloutBatch(prompt_ids, prompt_mask, completion_ids,
                            completion_mask(completion_ids, tokenizer.eos_token_id))

    def measure(self, model, tokenizer, reference: InitialPolicy) -> dict:
        return kl_to_reference(model, reference, self.sample(model, tokenizer), temperature=self.temperature)


class StepKL:
    """kl_step: exact KL between the policy before and after one optimizer step, on that step's rollouts (both
    softmax(logits / temperature))."""

    def __init__(self, max_seqs: int = 16, temperature: float = 1.0):
        self.max_seqs, self.temperature = max_seqs, temperature
        self.batch: RolloutBatch | None = None
        self.before: torch.Tensor | None = None

    # Config fields that rescale logits after the LM head; where one is set, the head alone is not the policy.
    LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                        "logits_scaling")

    def reads_hidden(self, model, autocast: bool = False) -> bool:
        """Whether the pre-step distribution can come from the training forward's final hidden states, i.e. the
        training forward computes what a separate forward would: rotary positions (TRL counts positions from the
        padding, which only rotary attention cannot see), float32 weights and no autocast (in bf16 the two differ by
        a KL of ~1e-4, as large as kl_step itself), the LM head alone maps hidden states to logits, no dropout."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if autocast or getattr(config, "rope_parameters", None) is None:
            return False
        if any(getattr(config, name, None) is not None for name in self.LOGIT_TRANSFORMS):
            return False
        if any(p.dtype != torch.float32 for p in model.parameters()):
            return False
        return not any(isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in model.modules())

    @torch.no_grad()
    def capture_before(self, model, batch: RolloutBatch, hidden: torch.Tensor | None = None) -> dict:
        """The policy's distribution on the step's first rollouts before the optimizer step. `hidden`: the final
        hidden states the training forward computed for those rollouts (same parameters, same tokens; positions
        counted from the pad instead of the first token, which rotary attention does not see), saving a forward."""
        self.batch = batch.head(self.max_seqs)
        n, width = self.batch.prompt_ids.shape[0], self.batch.prompt_ids.shape[1] + self.batch.completion_ids.shape[1]
        if hidden is not None and hidden.shape[0] >= n and hidden.shape[1] == width:
            start = self.batch.prompt_ids.shape[1] - 1
            logits = model.get_output_embeddings()(hidden[:n, start:-1])
            self.before = F.log_softmax(logits.float() / self.temperature, dim=-1)
        else:
            self.before = self.batch.logprobs(model, self.temperature)
        mask = self.batch.completion_mask.to(self.before.dtype)
        return {"entropy": entropy_sum(self.before, mask) / max(1, int(mask.sum()))}

    @torch.no_grad()
    def after_step(self, model) -> dict:
        if self.batch is None:
            return {}
        after = self.batch.logprobs(model, self.temperature)
        mask = self.batch.completion_mask.to(after.dtype)
        s, n = kl_sum(self.before, after, mask)
        self.discard()
        return {"kl_step": s / max(n, 1)}

    def discard(self) -> None:
        """Forget the captured step (a process that does not measure: a multi-process run's ranks > 0)."""
        self.batch = self.before = None
