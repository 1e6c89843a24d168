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
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.io import atomic_write_json


def _short(name: str) -> str:
    return name.replace("kl_free_lora", "kl_free")


class MethodBench:
    """One method's policy + trainer, resettable to its initial state."""

    def __init__(self, method_name: str, spec, model_name: str, device: str, rows: list):
        from datasets import Dataset

        from bench.engine import BenchGRPOTrainer, grpo_config
        from bench.models import load_policy, uses_chat_template
        from bench.policy import build_policy
        from methods import get_method
        from tasks import RewardConfig, chat_prompt, plain_prompt

        self.name = method_name
        method = get_method(method_name)
        params = method.resolve_params(spec.method_params)
        model, self.tokenizer = load_policy(model_name, device=device, progress=False)
        self.policy = build_policy(model, method, spec.rank, spec.lora_alpha, spec.seed, params)
        to_prompt = chat_prompt if uses_chat_template(self.tokenizer) else plain_prompt
        self.rows = [{"prompt": to_prompt(r["question"]), "gold": r["gold"]} for r in rows]
        funcs, weights = RewardConfig(**spec.reward).funcs_and_weights()
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        args = grpo_config(spec, method, self.tmp.name, weights, chat=to_prompt is chat_prompt,
                           use_cpu=device == "cpu")
        self.trainer = BenchGRPOTrainer(model=self.policy, reward_funcs=funcs, args=args,
                                        train_dataset=Dataset.from_list(self.rows[:1]),
                                        processing_class=self.tokenizer)
        for hook in method.trainer_hooks:
            hook(self.trainer, params)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]
        self.spec, self.device = spec, device

    def reset(self):
        with torch.no_grad():
            for p, v in zip(self.params, self.initial):
                p.copy_(v)
        self.trainer.optimizer = None
        self.trainer.create_optimizer()

    def generation_batch(self, seed: int) -> dict:
        from transformers import set_seed
        set_seed(seed)
        self.policy.train()
        return self.trainer._generate_and_score_completions(self.rows)

    def update(self, batch: dict) -> None:
        """Two optimizer steps on the generation batch, as the Trainer's loop does them."""
        from trl.trainer.utils import split_tensor_dict
        t, ga = self.trainer, self.spec.grad_accum
        t.current_gradient_accumulation_steps = ga
        micro = split_tensor_dict(batch, 2 * ga)
        for step in range(2):
            for mb in micro[step * ga:(step + 1) * ga]:
                loss = t.compute_loss(self.policy, mb)
                t.accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(self.params, t.args.max_grad_norm)
            t.optimizer.step()
            self.policy.zero_grad(set_to_none=True)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def method_step_ratios(methods: list[str], spec, model_name: str, device: str, reps: int, seed: int = 0,
                       log=print) -> dict:
    from bench.runner import PeakMemory
    from tasks import get_task

    n_prompts = 2 * spec.micro_batch * spec.grad_accum // spec.num_generations
    examples = get_task(spec.task, **spec.task_params).examples("train")[:n_prompts]
    rows = [{"question": e.question, "gold": e.gold} for e in examples for _ in range(spec.num_generations)]
    benches = [MethodBench(m, spec, model_name, device, rows) for m in methods]
    times = {m: {"generation": [], "update": [], "cycle": []} for m in methods}
    memory = {m: [] for m in methods}
    reference_tokens = None
    for rep in range(reps + 1):  # rep 0 is the warm-up
        order = benches if rep % 2 else benches[::-1]  # alternate the order: drift hits every method alike
        for b in order:
            b.reset()
            _sync()
            t0 = time.perf_counter()
            batch = b.generation_batch(seed + rep)
            _sync()
            t1 = time.perf_counter()
            with PeakMemory(device) as peak:
                base_rss = peak.peak
                b.update(batch)
            _sync()
            t2 = time.perf_counter()
            tokens = batch["completion_ids"]
            if rep == 1 and reference_tokens is None:
                reference_tokens = tokens
            if rep == 1 and not torch.equal(tokens, reference_tokens):
                raise RuntimeError(f"{b.name} generated different completions: the comparison would not be fair")
            if rep == 0:
                continue
            times[b.name]["generation"].append(t1 - t0)
            times[b.name]["update"].append(t2 - t1)
            times[b.name]["cycle"].append(t2 - t0)
            memory[b.name].append((peak.peak - (0 if device.startswith("cuda") else base_rss)) / 2**20)
        log(f"  repetition {rep}/{reps}{' (warm-up)' if rep == 0 else ''} done")
    medians = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    base = methods[0]
    out = {"medians_s": medians, "update_peak_mem_mb": {m: max(v) for m, v in memory.items()},
           "completion_tokens_per_cycle": int(batch["completion_mask"].sum())}
    for m in methods[1:]:
        out[f"{_short(m)}_vs_{_short(base)}_step_ratio"] = medians[m]["cycle"] / medians[base]["cycle"]
        out[f"{_short(m)}_vs_{_short(base)}_update_ratio"] = medians[m]["update"] / medians[base]["update"]
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__}


def run_perf(methods: list[str], rank, reps: int, model: str, device: str, out: Path, log=print) -> dict:
    from bench.runner import resolve_device, versions
    from bench.spec import RunSpec

    device = resolve_device(device)
    spec = RunSpec(method=methods[0], rank=rank, model=model)
    log(f"method step ratios: {', '.join(methods)} at rank {rank}, {reps} repetitions + warm-up, {device}")
    result = {"machine": machine(), "versions": versions(), "settings": {
        "rank": rank, "reps": reps, "model": model, "micro_batch": spec.micro_batch, "grad_accum": spec.grad_accum,
        "num_generations": spec.num_generations, "max_completion_length": spec.max_completion_length}}
    result.update(method_step_ratios(methods, spec, model, device, reps, log=log))
    atomic_write_json(out, result)
    return result


def format_table(result: dict) -> str:
    lines = ["| method | generation s | update s | step cycle s | update peak MB |", "|---|---|---|---|---|"]
    for m, t in result["medians_s"].items():
        lines.append(f"| {m} | {t['generation']:.3f} | {t['update']:.3f} | {t['cycle']:.3f} | "
                     f"{result['update_peak_mem_mb'][m]:.0f} |")
    lines.append("")
    for k, v in result.items():
        if k.endswith("_ratio"):
            lines.append(f"{k:45s} {v:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    r = run_perf(["kl_free_lora", "proma", "proma_intra"], 16, 3, "tiny", "auto", Path("/tmp/perf.json"))
    print(format_table(r))
    print(json.dumps(r, indent=1)[:2000])
