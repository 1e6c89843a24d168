"""What a sweep will cost on this device, said before it starts, and refused where it is beyond the device.

Two figures, both for completions that use the whole budget (completions that end earlier cost less):
1. a bound from arithmetic alone, before any weights are loaded: an optimizer step trains T tokens (its completions
   and their prompts) with at least 6*N*T floating-point operations for an N-parameter model (2N per token
   forward, 2N backward to the activations, which LoRA needs as much as full fine-tuning, and 2N to generate the
   token; Kaplan et al. 2020, arXiv 2001.08361, section 2.1), run at this device's measured matmul throughput. Real
   steps are slower (decoding is not one big matmul), so this is the least a step can take. Where even this least is
   over MAX_RUN_HOURS for one run the sweep is refused unless --yes: e.g. a 7B model on a CPU.
2. otherwise, a calibration on the model itself: one forward+backward of a micro-batch's sequences, one forward, a
   prefill and a few decode steps of a generation batch, timed once each and scaled to a run (steps, the extra
   forwards the method makes, probes, base and final evals), then to the sweep (runs left, runs side by side).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from bench.defaults import load_tokenizer
from bench.device import resolve_device, synchronize
from bench.errors import BenchError
from bench.generation import format_prompts
from bench.models import load_policy, uses_chat_template
from bench.parallel import model_parameters, run_threads
from bench.threads import torch_threads
from methods import get_method
from tasks import chat_prompt, get_task, plain_prompt

MAX_RUN_HOURS = 24.0  # beyond a day per run even at the device's peak matmul rate: not a sweep for this device
CALIBRATION_ROWS = 2   # sequences in the timed training forward+backward (scaled per token)
DECODE_STEPS = 4       # timed decode steps (scaled to the budget)


@dataclass
class Estimate:
    runs: int                   # runs not yet finished
    steps: int                  # optimizer steps per run
    completions_per_step: int
    prompt_tokens: float        # mean prompt length in tokens
    budget: int                 # completion budget (max_completion_length)
    parameters: int
    device: str
    threads: int
    jobs: int
    least_step_s: float         # bound 1, per optimizer step
    flops: float = 0.0          # the device's measured matmul rate, FLOP/s
    step_s: float | None = None         # calibrated, per optimizer step (None: not calibrated)
    eval_s: float | None = None         # calibrated, one greedy eval of the eval split
    run_s: float | None = None          # calibrated, one run (steps, probes, base and final eval)

    @property
    def tokens_per_step(self) -> int:
        return round(self.completions_per_step * (self.prompt_tokens + self.budget))

    @property
    def least_run_s(self) -> float:
        return self.least_step_s * self.steps

    @property
    def sweep_s(self) -> float:
        per_run = self.run_s if self.run_s is not None else self.least_run_s
        return per_run * math.ceil(self.runs / self.jobs)

    def lines(self) -> list[str]:
        head = (f"cost estimate: {self.runs} run(s) to do x {self.steps} steps x {self.tokens_per_step:,} tokens per "
                f"step ({self.completions_per_step} completions x ({self.prompt_tokens:.0f} prompt + {self.budget} "
                f"budget) tokens), {self.parameters / 1e6:,.1f}M parameters on {self.device}")
        if self.run_s is None:
            return [head, f"  at least {duration(self.least_step_s)} per step, {duration(self.least_run_s)} per run "
                          f"(6 x parameters x tokens at this device's measured matmul rate)"]
        side = f", {self.jobs} runs at a time" if self.jobs > 1 else ""
        return [head,
                f"  about {duration(self.step_s)} per step, {duration(self.eval_s)} per greedy eval, "
                f"{duration(self.run_s)} per run; the sweep: about {duration(self.sweep_s)}{side}",
                f"  (one timing of each phase on this model, {self.threads} thread(s), scaled; no interval: one "
                f"sample each; completions that end before the budget make it shorter)"]


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def matmul_flops(device: str, seconds: float = 0.3) -> float:
    """This device's sustained matmul rate (FLOP/s) in the dtype runs use there (fp32 on CPU, bf16 on CUDA), with
    the process's current thread count."""
    n, dtype = (1024, torch.float32) if device == "cpu" else (4096, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _prompt_tokens(spec, tokenizer) -> float:
    to_prompt = chat_prompt if uses_chat_template(tokenizer) else plain_prompt
    train = get_task(spec.task, **spec.task_params).examples("train")[:256]
    texts = format_prompts(tokenizer, [to_prompt(e.question) for e in train])
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(map(len, ids)) / max(1, len(ids))


def estimate(specs, jobs: int = 1, calibrate: bool = True) -> Estimate:
    """The cost of running `specs` (the runs not finished yet); calibrated on the model unless `calibrate` is off
    or bound 1 already says a run is beyond this device."""
    spec = max(specs, key=lambda s: (s.steps, s.max_completion_length))  # the longest run speaks for all
    device = resolve_device(spec.device)
    tokenizer = load_tokenizer(spec.model)
    parameters = model_parameters(spec.model)
    threads = run_threads(spec)
    with torch_threads(threads), torch.random.fork_rng(devices=[] if device == "cpu" else [device]):
        est = Estimate(runs=len(specs), steps=spec.steps, completions_per_step=spec.micro_batch * spec.grad_accum,
                       prompt_tokens=_prompt_tokens(spec, tokenizer), budget=spec.max_completion_length,
                       parameters=parameters, device=device, threads=torch.get_num_threads(), jobs=jobs,
                       least_step_s=0.0)
        est.flops = matmul_flops(device)
        est.least_step_s = 6 * parameters * est.tokens_per_step / est.flops
        if calibrate and est.least_run_s <= MAX_RUN_HOURS * 3600:
            _calibrate(est, spec, device, full=any(s.rank == "full" for s in specs))
    return est


def _calibrate(est: Estimate, spec, device: str, full: bool) -> None:
    """Time the run's phases once on the model itself (random weights would do: only shapes matter; the real ones
    are loaded because they are at hand)."""
    model, tokenizer = load_policy(spec.model, device=device, progress=False)
    model.eval()
    vocab = model.config.vocab_size
    prompt, budget = max(1, round(est.prompt_tokens)), spec.max_completion_length
    gen_rows = spec.micro_batch * 2 * spec.grad_accum  # one generation batch feeds two optimizer steps
    for p in model.parameters():
        p.requires_grad_(full)  # LoRA: gradients reach the activations, not the frozen weights
    ids = torch.randint(0, vocab, (CALIBRATION_ROWS, prompt + budget), device=device)

    def timed(fn) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    def train_pass():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.float().logsumexp(-1).mean().backward()

    with torch.enable_grad():
        train_pass()  # warm-up: first calls allocate and pick kernels
        train_s = timed(train_pass) / CALIBRATION_ROWS  # per sequence
    with torch.no_grad():
        _decode_timing(model, vocab, 1, prompt, device)  # warm-up
        forward_s = timed(lambda: model(input_ids=ids)) / CALIBRATION_ROWS
        decode_s, prefill_s = _decode_timing(model, vocab, gen_rows, prompt, device)
        eval_decode_s, eval_prefill_s = _decode_timing(model, vocab, spec.eval_batch, prompt, device)
    method = get_method(spec.method)
    beta = method.resolved_beta(spec.method_params)
    per_step = est.completions_per_step * (train_s + forward_s * (0.5 + (1 if beta else 0)))  # old, reference log-probs
    per_step += (prefill_s + budget * decode_s) / 2  # half a generation batch
    per_step += 2 * forward_s * min(spec.kl_step_seqs, est.completions_per_step)  # kl_step: before and after
    probes = spec.steps // spec.probe_every + 2
    probe_s = prefill_s + budget * decode_s + 2 * forward_s * spec.probe_size  # an upper figure: a batch of gen_rows
    n_eval = len(_eval_items(spec))
    eval_s = math.ceil(n_eval / spec.eval_batch) * (eval_prefill_s + budget * eval_decode_s)
    est.step_s, est.eval_s = per_step, eval_s
    est.run_s = spec.steps * per_step + probes * probe_s + 2 * eval_s


def _eval_items(spec):
    evals = get_task(spec.task, **spec.task_params).examples("eval")
    return evals[:spec.eval_size] if spec.eval_size is not None else evals


def _decode_timing(model, vocab: int, rows: int, prompt: int, device: str) -> tuple[float, float]:
    """(seconds per decode step, seconds of the prefill) of `rows` sequences with a KV cache."""
    from transformers import DynamicCache
    ids = torch.randint(0, vocab, (rows, prompt), device=device)
    cache = DynamicCache(config=model.config)
    synchronize(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = model(input_ids=logits.argmax(-1)[:, None], cache=cache, use_cache=True).logits[:, -1]
    synchronize(device)
    return (time.perf_counter() - t1) / DECODE_STEPS, t1 - t0


def check_sweep_cost(specs, out, jobs: int, yes: bool) -> None:
    """`bench run`'s estimate of the runs not finished yet in `out`, printed; refused (BenchError) where a run is
    beyond this device, unless yes."""
    from bench.runner import unfinished_runs
    todo = unfinished_runs(specs, out)
    if not todo:
        return
    est = estimate(todo, jobs)
    print("\n".join(est.lines()), flush=True)
    check_feasible(est, yes)


def check_feasible(est: Estimate, yes: bool) -> None:
    """Refuse (one line, exit 2) a sweep whose runs are beyond this device even at its peak matmul rate."""
    if yes or est.least_run_s <= MAX_RUN_HOURS * 3600:
        return
    where = "a GPU (--device cuda), " if est.device == "cpu" else ""
    raise BenchError(f"at least {duration(est.least_run_s)} per run on {est.device} ({est.parameters / 1e9:.1f}B "
                     f"parameters x {est.tokens_per_step:,} tokens per step x {est.steps} steps): beyond this device; "
                     f"use {where}a smaller model, fewer steps or a smaller batch/budget (--set micro_batch=..., "
                     f"max_completion_length=...), or --yes to run anyway")
