"""`bench perf`: side-by-side cost ratios, measured in one process (warm-up, interleaved repetitions, medians).

Method step ratios: every method gets its own policy and TRL trainer built from the same seed, so at the start of
each repetition all policies are identical (trainable tensors and optimizer are reset) and the same generation
seed gives every method the *same* completions (checked token for token): the same tokens, the same batch and the
same two optimizer steps per generation batch for everyone. A step is half a generation-batch cycle:
  cycle = generation + scoring (+ the reference forward when beta > 0)              # TRL's own batch preparation
        + 2 x (grad_accum x [TRL's compute_loss + backward, with the method's hooks] + clip + AdamW step)
`<m>_vs_<baseline>_step_ratio` = median cycle(m) / median cycle(baseline); `..._update_ratio` the same for the
update part only (the stricter figure: generation is identical for all). Memory: peak growth over the update
(GPU: max allocated; CPU: resident set sampled every 20 ms, coarse).

The rest (skipped with --methods-only), each measured the same way on kl_free_lora:
- harness_vs_trl_step_ratio: our BenchGRPOTrainer vs a bare TRL GRPOTrainer, same cycle, metrics off;
- eager_vs_sdpa_step_ratio (CPU): attention implementations, same cycle;
- generation_vs_generate_ratio: completion tokens/s of the harness's rollout generation (bench.decode) vs the
  model's own `generate` on the same prompts, sampling settings, token budget and seed (and the fraction of
  completions that came out token for token the same: generation_same_tokens_fraction);
- run_vs_baseline_ratio: one default run (kl_free_lora, the spec's rank, 40 steps, base eval memoized + training +
  final eval) with generation_backend `fast` vs `transformers` (the path before bench.decode), and where each run's
  wall-clock goes (run_profile: generation, policy forward+backward, reference, metrics, final eval, other);
- metric_overhead_fraction: kl_step (every step) + the probe set (every probe_every steps) per training step;
- init_seconds: geora, pissa, milora initialization on the benchmarked model;
- eval_new_vs_old_{wall,cpu}_ratio: the greedy eval on the whole eval split (bench.generation.greedy_decode) vs the
  former eval (300 items, the model's own batched `generate`), same policy (`python -m bench.perf` runs only this);
  eval_fast_vs_dynamic_wall_ratio: greedy_decode through bench.decode vs through the model's forward, same items.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.device import synchronize
from bench.io import atomic_write_json


def _short(name: str) -> str:
    return name.replace("kl_free_lora", "kl_free")


class MethodBench:
    """One method's policy + trainer, resettable to its initial state."""

    def __init__(self, method_name: str, spec, model_name: str, device: str, rows: list, attn: str | None = None,
                 trainer_cls=None, label: str | None = None):
        import tempfile

        from datasets import Dataset

        from bench.engine import make_trainer
        from bench.metrics import InitialPolicy
        from bench.runner import prepare
        from methods import get_method

        self.name = label or method_name
        prep = prepare(spec, get_method(method_name), device, progress=False, model=model_name, attn=attn)
        self.policy, self.tokenizer = prep.policy, prep.tokenizer
        self.rows = [{"prompt": prep.to_prompt(r["question"]), "gold": r["gold"]} for r in rows]
        self.tmp = tempfile.TemporaryDirectory()
        self.trainer = make_trainer(spec, prep.method, prep.params, self.policy, self.tokenizer,
                                    Dataset.from_list(self.rows[:1]), self.tmp.name, chat=prep.chat, device=device,
                                    trainer_cls=trainer_cls)
        self.initial = InitialPolicy(self.policy)  # after the hooks: PROMA may freeze tensors at rank full
        self.spec, self.device = spec, device

    def reset(self):
        self.initial.restore()
        self.trainer.optimizer = None
        self.trainer.create_optimizer()

    def generation_batch(self, seed: int) -> list[dict]:
        """One generation batch through the trainer's own `_prepare_inputs` (generation, scoring, old log-probs,
        shuffle, split): its micro-batches, in the order the Trainer's loop uses them."""
        from transformers import set_seed
        set_seed(seed)
        self.policy.train()
        t = self.trainer
        t._step, t._buffered_inputs = 0, None
        t.current_gradient_accumulation_steps = self.spec.grad_accum
        t._prepare_inputs(self.rows)
        return list(t._buffered_inputs)

    def update(self, micro: list[dict], keep_hidden: bool = False) -> None:
        """Two optimizer steps on the generation batch's micro-batches, as the Trainer's loop does them.
        keep_hidden: keep the first micro-batch's final hidden states, as the harness does for kl_step."""
        t, ga = self.trainer, self.spec.grad_accum
        t.current_gradient_accumulation_steps = ga
        for step in range(2):
            for i, mb in enumerate(micro[step * ga:(step + 1) * ga]):
                hook = None
                if keep_hidden and step == 0 and i == 0:
                    t._hidden = None
                    hook = t._final_hidden_hook(self.policy)
                loss = t.compute_loss(self.policy, mb)
                if hook is not None:
                    hook.remove()
                t.accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(self.initial.trainable(), t.args.max_grad_norm)
            t.optimizer.step()
            self.policy.zero_grad(set_to_none=True)


def _padded(ids: torch.Tensor, pad: int, width: int) -> torch.Tensor:
    """Completion ids right-padded to `width` (micro-batches may be trimmed to their own longest completion)."""
    return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad)


def _rows(spec) -> list[dict]:
    from tasks import get_task
    n_prompts = 2 * spec.micro_batch * spec.grad_accum // spec.num_generations
    examples = get_task(spec.task, **spec.task_params).examples("train")[:n_prompts]
    return [{"question": e.question, "gold": e.gold} for e in examples for _ in range(spec.num_generations)]


def method_step_ratios(methods: list[str], spec, model_name: str, device: str, reps: int, seed: int = 0,
                       log=print, benches: list | None = None, check_tokens: bool = True) -> dict:
    from bench.device import PeakMemory

    rows = _rows(spec)
    benches = benches or [MethodBench(m, spec, model_name, device, rows) for m in methods]
    methods = [b.name for b in benches]
    times = {m: {"generation": [], "update": [], "cycle": []} for m in methods}
    memory = {m: [] for m in methods}
    reference_tokens = None
    for rep in range(reps + 1):  # rep 0 is the warm-up
        order = benches if rep % 2 else benches[::-1]  # alternate the order: drift hits every method alike
        for b in order:
            b.reset()
            synchronize()
            t0 = time.perf_counter()
            batch = b.generation_batch(seed + rep)
            synchronize()
            t1 = time.perf_counter()
            with PeakMemory(device) as peak:
                base = torch.cuda.memory_allocated() if device.startswith("cuda") else peak.peak
                b.update(batch)
            synchronize()
            t2 = time.perf_counter()
            tokens = torch.cat([_padded(mb["completion_ids"], b.tokenizer.pad_token_id, spec.max_completion_length)
                                for mb in batch])
            if rep == 1 and reference_tokens is None:
                reference_tokens = tokens
            if check_tokens and rep == 1 and not torch.equal(tokens, reference_tokens):
                raise RuntimeError(f"{b.name} generated different completions: the comparison would not be fair")
            if rep == 0:
                continue
            times[b.name]["generation"].append(t1 - t0)
            times[b.name]["update"].append(t2 - t1)
            times[b.name]["cycle"].append(t2 - t0)
            memory[b.name].append((peak.peak - base) / 2**20)  # growth over what was resident before the update
        log(f"  repetition {rep}/{reps}{' (warm-up)' if rep == 0 else ''} done")
    medians = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    base = methods[0]
    out = {"medians_s": medians, "update_peak_mem_mb": {m: max(v) for m, v in memory.items()},
           "completion_tokens_per_cycle": sum(int(mb["completion_mask"].sum()) for mb in batch)}
    for m in methods[1:]:
        out[f"{_short(m)}_vs_{_short(base)}_step_ratio"] = medians[m]["cycle"] / medians[base]["cycle"]
        out[f"{_short(m)}_vs_{_short(base)}_update_ratio"] = medians[m]["update"] / medians[base]["update"]
    return out


def generation_vs_generate(spec, model_name: str, device: str, reps: int, log=print) -> dict:
    """Rollout generation through the harness (TRL's _generate, LoRA folded into the weights) vs the model's own
    `generate` on the same prompts, sampling settings and token budget: ratio of completion tokens per second."""
    from transformers import set_seed
    b = MethodBench("kl_free_lora", spec, model_name, device, _rows(spec))
    prompts = [r["prompt"] for r in b.rows]
    text = [p if isinstance(p, str) else b.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts]
    enc = b.tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    times = {"harness": [], "generate": []}
    tokens = {"harness": [], "generate": []}
    same, total = 0, 0
    b.policy.train()
    for rep in range(reps + 1):
        for side in (("harness", "generate") if rep % 2 else ("generate", "harness")):
            set_seed(rep)
            synchronize()
            t0 = time.perf_counter()
            if side == "harness":
                out = b.trainer._generate(prompts)
                n = sum(len(c) for c in out[1])
                harness = out[1]
            else:
                with torch.no_grad():
                    ids = b.policy.generate(**enc, do_sample=True, temperature=spec.temperature, top_k=0, top_p=1.0,
                                            max_new_tokens=spec.max_completion_length,
                                            pad_token_id=b.tokenizer.pad_token_id,
                                            eos_token_id=b.tokenizer.eos_token_id)
                comp = ids[:, enc["input_ids"].shape[1]:]
                from bench.metrics import completion_mask
                keep = completion_mask(comp, b.tokenizer.eos_token_id).bool()
                n = int(keep.sum())
                reference = [c[m].tolist() for c, m in zip(comp, keep)]
            synchronize()
            if rep:
                times[side].append(time.perf_counter() - t0)
                tokens[side].append(n)
        same += sum(a == r for a, r in zip(harness, reference))  # the same seed for both sides of a repetition
        total += len(reference)
    rate = {s: statistics.median(n / t for n, t in zip(tokens[s], times[s])) for s in times}
    log("  generation vs generate done")
    return {"generation_vs_generate_ratio": rate["harness"] / rate["generate"],
            "generation_tokens_per_s": rate, "generation_same_tokens_fraction": same / total,
            "generation_fast": b.trainer.fast_generation and b.trainer.fast_generation_skipped is None,
            "generation_medians_s": {s: statistics.median(t) for s, t in times.items()}}


def metric_overhead(spec, model_name: str, device: str, reps: int, log=print) -> dict:
    """The harness's metrics at the default cadence (kl_step on every step; the probe set every probe_every steps)
    as a fraction of a training step, measured on the same policy and rollouts."""
    from bench.metrics import ProbeSet, RolloutBatch, StepKL
    from bench.models import uses_chat_template
    from tasks import chat_prompt, get_task, plain_prompt
    b = MethodBench("kl_free_lora", spec, model_name, device, _rows(spec))
    to_prompt = chat_prompt if uses_chat_template(b.tokenizer) else plain_prompt
    probe = ProbeSet([to_prompt(e.question) for e in get_task(spec.task, **spec.task_params).examples("eval")
                      [:spec.probe_size]], spec.max_completion_length, seed=spec.seed)
    reference, step_kl = b.initial, StepKL(spec.kl_step_seqs)
    cycles, kls, probes = [], [], []
    for rep in range(reps + 1):
        b.reset()
        t0 = time.perf_counter()
        batch = b.generation_batch(rep)
        b.update(batch, keep_hidden=step_kl.reads_hidden(b.policy, autocast=b.trainer.args.bf16 or b.trainer.args.fp16))
        t1 = time.perf_counter()
        first = batch[0]  # kl_step reads the step's first micro-batch
        rollout = RolloutBatch(first["prompt_ids"], first["prompt_mask"], first["completion_ids"],
                               first["completion_mask"])
        step_kl.capture_before(b.policy, rollout, hidden=b.trainer._hidden)  # as the harness: no extra forward
        step_kl.after_step(b.policy)
        t2 = time.perf_counter()
        probe.measure(b.policy, b.tokenizer, reference)
        t3 = time.perf_counter()
        if rep:
            cycles.append(t1 - t0)
            kls.append(t2 - t1)
            probes.append(t3 - t2)
    step = statistics.median(cycles) / 2
    per_step = statistics.median(kls) + statistics.median(probes) / spec.probe_every
    log("  metric overhead done")
    return {"metric_overhead_fraction": per_step / step,
            "metric_medians_s": {"step": step, "kl_step_per_step": statistics.median(kls),
                                 "probe": statistics.median(probes), "probe_every": spec.probe_every}}


def eval_cost(spec, model_name: str, device: str, reps: int, log=print, old_n: int = 300, old_batch: int = 512) -> dict:
    """The greedy eval's cost, side by side on the same policy (a LoRA policy as a run starts it): the eval as it was
    (the first `old_n` eval items through the model's own batched `generate`, `old_batch` prompts per call) vs
    bench.generation.greedy_decode on the whole eval split (`spec.eval_batch` prompts per batch), and the old way on
    the whole split too. Wall-clock and process CPU time (steadier on a shared machine), medians over interleaved
    repetitions after a warm-up. The old way's completions must equal the new one's item for item."""
    from bench.generation import generate, greedy_decode
    from bench.models import load_policy, uses_chat_template
    from bench.policy import build_policy
    from methods import get_method
    from tasks import chat_prompt, get_task, plain_prompt
    model, tokenizer = load_policy(model_name, device=device, progress=False)
    method = get_method("kl_free_lora")
    policy = build_policy(model, method, spec.rank, spec.lora_alpha, spec.seed, method.resolve_params({}))
    to_prompt = chat_prompt if uses_chat_template(tokenizer) else plain_prompt
    prompts = [to_prompt(e.question) for e in get_task(spec.task, **spec.task_params).examples("eval")]
    budget = spec.max_completion_length
    def greedy(fast):
        return [r["completion"] for r in greedy_decode(policy, tokenizer, prompts, budget, spec.eval_batch, fast)]

    sides = {f"old_{old_n}": lambda: generate(policy, tokenizer, prompts[:old_n], budget, batch_size=old_batch)[0],
             f"old_{len(prompts)}": lambda: generate(policy, tokenizer, prompts, budget, batch_size=old_batch)[0],
             f"new_{len(prompts)}": lambda: greedy(True), f"dynamic_{len(prompts)}": lambda: greedy(False)}
    wall, cpu, texts = {k: [] for k in sides}, {k: [] for k in sides}, {}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for name in (list(sides) if rep % 2 else list(sides)[::-1]):
            synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            texts[name] = sides[name]()
            synchronize()
            if rep:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        log(f"  eval cost repetition {rep}/{reps}{' (warm-up)' if rep == 0 else ''} done")
    old, whole, new, dynamic = sides
    if not texts[whole] == texts[new] == texts[dynamic]:
        raise RuntimeError("greedy_decode's completions differ from generate's: the comparison would not be fair")
    med = {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k])} for k in sides}
    return {"eval_medians_s": med, "eval_items": {"old": min(old_n, len(prompts)), "new": len(prompts)},
            "eval_batch": {"old": old_batch, "new": spec.eval_batch}, "eval_threads": torch.get_num_threads(),
            "eval_new_vs_old_wall_ratio": med[new]["wall_s"] / med[old]["wall_s"],
            "eval_new_vs_old_cpu_ratio": med[new]["cpu_s"] / med[old]["cpu_s"],
            "eval_same_items_cpu_ratio": med[new]["cpu_s"] / med[whole]["cpu_s"],
            "eval_fast_vs_dynamic_wall_ratio": med[new]["wall_s"] / med[dynamic]["wall_s"]}


PHASES = ("generation", "policy", "reference", "metrics")


def run_profile(summary: dict) -> dict:
    """Where one run's wall-clock went (seconds), from its summary.json: the training phases the engine times, the
    evals, setup (model load, adapter init), and the rest of the training loop (TRL's batch preparation outside
    generation and scoring forwards, rewards, optimizer, checkpoints)."""
    out = {p: summary.get(f"time_{p}_s") or 0.0 for p in PHASES}
    out["eval_base"] = summary.get("eval_base_seconds", 0.0)
    out["eval_final"] = summary["eval_seconds"] - out["eval_base"]
    out["setup"] = summary.get("setup_seconds", 0.0) + summary.get("init_seconds", 0.0)
    out["total"] = summary["run_seconds"]
    out["other"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return {k: round(v, 3) for k, v in out.items()}


def run_vs_baseline(spec, reps: int = 1, log=print) -> dict:
    """The same run (spec, training and evals) with generation_backend `fast` vs `transformers`, `reps` times each,
    alternating. A run in a sweep finds its base eval memoized, so the ratio is taken on run time minus the base
    eval (each run here computes its own, memo off, so neither side profits from the other's memo). Both runs must
    reach the same final accuracy (their rollouts are the same tokens where numerics allow)."""
    import dataclasses
    import tempfile

    from bench.runner import run_one
    backends = ("fast", "transformers")
    summaries = {b: [] for b in backends}
    before = os.environ.get("BENCH_EVAL_MEMO")
    os.environ["BENCH_EVAL_MEMO"] = "0"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(reps):
                for backend in (backends if rep % 2 == 0 else backends[::-1]):
                    run_spec = dataclasses.replace(spec, generation_backend=backend)
                    summary = run_one(run_spec, Path(tmp) / f"{backend}-{rep}", progress=False)
                    if summary.get("status") != "ok":
                        raise RuntimeError(f"perf run ({backend}) {summary.get('status')}: {summary.get('error')}")
                    summaries[backend].append(summary)
                    log(f"  run {rep + 1}/{reps} {backend}: {summary['run_seconds']:.1f} s")
    finally:
        if before is None:
            os.environ.pop("BENCH_EVAL_MEMO")
        else:
            os.environ["BENCH_EVAL_MEMO"] = before
    cost = {b: statistics.median(s["run_seconds"] - s["eval_base_seconds"] for s in summaries[b]) for b in backends}
    return {"run_vs_baseline_ratio": cost["fast"] / cost["transformers"],
            "run_seconds_without_base_eval": cost,
            "run_profile": {b: run_profile(summaries[b][0]) for b in backends},
            "run_spec": {"method": spec.method, "rank": spec.rank, "steps": spec.steps, "reps": reps},
            "run_metrics": {b: {k: summaries[b][0].get(k) for k in ("accuracy", "accuracy_base", "reward", "kl_ref",
                                                                    "entropy", "tokens_per_s")}
                            for b in backends}}


def init_seconds(model_name: str, rank: int, device: str) -> dict:
    from bench.models import load_policy
    from bench.policy import build_policy
    from methods import get_method
    out = {}
    for name in ("geora", "pissa", "milora"):
        model, _ = load_policy(model_name, device=device, progress=False)
        t0 = time.perf_counter()
        build_policy(model, get_method(name), rank, float(rank), seed=0)
        out[name] = time.perf_counter() - t0
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__}


def run_perf(methods: list[str], rank, reps: int, model: str, device: str, out: Path, log=print,
             full: bool = True) -> dict:
    from bench.device import resolve_device
    from bench.provenance import versions
    from bench.spec import RunSpec

    device = resolve_device(device)
    spec = RunSpec(method=methods[0], rank=rank, model=model)
    log(f"method step ratios: {', '.join(methods)} at rank {rank}, {reps} repetitions + warm-up, {device}")
    result = {"machine": machine(), "versions": versions(), "settings": {
        "rank": rank, "reps": reps, "model": model, "micro_batch": spec.micro_batch, "grad_accum": spec.grad_accum,
        "num_generations": spec.num_generations, "max_completion_length": spec.max_completion_length}}
    result.update(method_step_ratios(methods, spec, model, device, reps, log=log))
    if full:
        from trl import GRPOTrainer
        rows = _rows(spec)
        log("harness vs bare TRL GRPOTrainer (kl_free_lora, metrics off)")
        pair = [MethodBench("kl_free_lora", spec, model, device, rows, trainer_cls=GRPOTrainer, label="bare_trl"),
                MethodBench("kl_free_lora", spec, model, device, rows, label="harness")]
        r = method_step_ratios([], spec, model, device, reps, log=log, benches=pair, check_tokens=False)
        result["harness_vs_trl_step_ratio"] = r["harness_vs_bare_trl_step_ratio"]
        result["harness_vs_trl_medians_s"] = r["medians_s"]
        if device == "cpu":
            log("eager vs sdpa attention (kl_free_lora)")
            pair = [MethodBench("kl_free_lora", spec, model, device, rows, attn="sdpa", label="sdpa"),
                    MethodBench("kl_free_lora", spec, model, device, rows, attn="eager", label="eager")]
            r = method_step_ratios([], spec, model, device, reps, log=log, benches=pair, check_tokens=False)
            result["eager_vs_sdpa_step_ratio"] = r["eager_vs_sdpa_step_ratio"]
            result["eager_vs_sdpa_medians_s"] = r["medians_s"]
        result.update(generation_vs_generate(spec, model, device, reps, log=log))
        result.update(metric_overhead(spec, model, device, reps, log=log))
        log("greedy eval: today's batching on 300 items vs greedy_decode on the whole eval split")
        result.update(eval_cost(spec, model, device, reps, log=log))
        log(f"one default run ({spec.method}, rank {rank}, {spec.steps} steps): generation_backend fast vs "
            "transformers")
        result.update(run_vs_baseline(spec, log=log))
        result["init_seconds"] = init_seconds(model, rank if rank != "full" else 16, device)
        result["init_model"] = model
    atomic_write_json(out, result)
    return result


def format_table(result: dict) -> str:
    lines = ["| method | generation s | update s | step cycle s | update peak MB |", "|---|---|---|---|---|"]
    for m, t in result["medians_s"].items():
        lines.append(f"| {m} | {t['generation']:.3f} | {t['update']:.3f} | {t['cycle']:.3f} | "
                     f"{result['update_peak_mem_mb'][m]:.0f} |")
    lines.append("")
    for k, v in result.items():
        if k.endswith("_ratio") or k.endswith("_fraction"):
            lines.append(f"{k:45s} {v:.3f}")
    if "run_profile" in result:
        phases = list(next(iter(result["run_profile"].values())))
        lines += ["", "| run (s) | " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
        for backend, prof in result["run_profile"].items():
            lines.append(f"| {backend} | " + " | ".join(f"{prof[p]:.1f}" for p in phases) + " |")
    for k, v in result.get("init_seconds", {}).items():
        lines.append(f"init_seconds[{k}] ({result['init_model']}) {v:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m bench.perf [REPS] [THREADS]: the eval cost comparison alone;
    # python -m bench.perf run [REPS]: generation_vs_generate and run_vs_baseline (kl_free_lora r16, 40 steps)
    import json
    import sys

    from bench.device import resolve_device
    from bench.spec import RunSpec
    default = RunSpec(method="kl_free_lora", rank=16)
    if sys.argv[1:2] == ["run"]:
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 1
        torch.set_num_threads(1)
        # the runs' forwards on one thread too, as in the default sweep: on a shared machine, forwards split over
        # threads wait for descheduled ones, which would time the machine's load rather than the two paths
        os.environ.setdefault("BENCH_FORWARD_THREADS", "1")
        def log(message):
            print(message, flush=True)
        out = generation_vs_generate(default, "tiny", resolve_device("auto"), 3, log=log)
        print(json.dumps(out, indent=2), flush=True)  # the runs below take minutes: this part is kept
        out.update(run_vs_baseline(default, n, log=log))
    else:
        torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
        out = eval_cost(default, "tiny", resolve_device("auto"), int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print(json.dumps(out, indent=2))
