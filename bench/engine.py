"""The engine: TRL's GRPOTrainer (pinned 1.16.0), subclassed narrowly to time phases and expose rollouts.

Overrides only observe: `_generate` (generation time, tokens), `_get_per_token_logps_and_entropies` (reference
vs policy forward time), `_prepare_inputs` (the step's rollouts for kl_step) and `training_step` (policy
forward+backward time; the pre-step capture for kl_step). The loss, the sampler and the optimizer are TRL's.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from trl import GRPOConfig, GRPOTrainer

from bench.generation import merged_adapters
from bench.metrics import RolloutBatch, StepKL


def grpo_config(spec, method, output_dir: str, reward_weights: list[float], chat: bool, use_cpu: bool) -> GRPOConfig:
    """Every default that silently changes the algorithm is set explicitly (ecosystem.md section 8)."""
    kwargs = dict(
        output_dir=output_dir,
        # objective (shared/seeds/001): per-sequence token mean, group-normalized advantages (std + 1e-4)
        loss_type="grpo", scale_rewards="group", epsilon=0.2, beta=method.resolved_beta(spec.method_params),
        use_bias_correction_kl=False,  # the plain k3 KL term; TRL 1.16 defaults to True
        importance_sampling_level="token", num_iterations=1, mask_truncated_completions=False,
        top_entropy_quantile=1.0,
        # batching: each generation batch feeds two optimizer steps, so the ratio and clipping are live
        per_device_train_batch_size=spec.micro_batch, gradient_accumulation_steps=spec.grad_accum,
        steps_per_generation=2 * spec.grad_accum, num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length,
        temperature=spec.temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
        # optimizer
        learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=spec.steps, seed=spec.seed, data_seed=spec.seed, shuffle_dataset=True,
        # machine
        bf16=not use_cpu, fp16=False, use_cpu=use_cpu, gradient_checkpointing=False, disable_dropout=True,
        dataloader_num_workers=0, remove_unused_columns=False,
        # bookkeeping: we log every step ourselves; checkpoints make interrupted runs resumable
        logging_steps=1, report_to="none", disable_tqdm=True, log_completions=False,
        save_strategy="steps", save_steps=spec.checkpoint_every, save_total_limit=1,
        reward_weights=reward_weights,
    )
    if chat:
        kwargs["chat_template_kwargs"] = {"enable_thinking": False}
    kwargs.update(spec.grpo)              # a preset's or user's extra TRL settings (checked in bench.spec)
    kwargs.update(method.grpo_overrides)  # what defines the method wins (e.g. PROMA's epsilon)
    return GRPOConfig(**kwargs)


class BenchGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, step_kl: StepKL | None = None, **kwargs):
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.generated_tokens = 0
        self.step_kl = step_kl or StepKL()
        self.step_metrics: dict = {}
        self._prep_seconds = 0.0
        self._step_first_batch = None
        self.method_summary: dict = {}  # what a method's hooks report into summary.json (see note())
        self.log_path = None            # the run's run.log
        self.run_id = "run"
        super().__init__(*args, **kwargs)

    def note(self, message: str, **fields) -> None:
        """A method's one-time remark: a line in run.log and on stderr, and `fields` in summary.json."""
        import sys
        self.method_summary.update(fields)
        self.method_summary.setdefault("notes", []).append(message)
        print(f"{self.run_id}: {message}", file=sys.stderr)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(message + "\n")

    @contextmanager
    def timed(self, phase: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.phase_seconds[phase] += time.perf_counter() - t0

    def _generate(self, prompts):
        with self.timed("generation"), merged_adapters(self.accelerator.unwrap_model(self.model)):
            out = super()._generate(prompts)
        self.generated_tokens += sum(len(ids) for ids in out[1])  # completion_ids_list
        return out

    def _is_reference_forward(self, model) -> bool:
        if self.ref_model is not None and model is self.ref_model:
            return True
        unwrapped = self.accelerator.unwrap_model(model)
        return getattr(unwrapped, "active_adapter", None) == "ref"

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if torch.is_grad_enabled():  # the training forward: timed as part of training_step
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        with self.timed("reference" if self._is_reference_forward(model) else "policy"):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _prepare_inputs(self, generation_batch):
        t0 = time.perf_counter()
        inputs = super()._prepare_inputs(generation_batch)
        self._prep_seconds += time.perf_counter() - t0
        if self.model.training and self._step_first_batch is None:
            self._step_first_batch = inputs
        return inputs

    def training_step(self, model, inputs, num_items_in_batch):
        t0, prep0 = time.perf_counter(), self._prep_seconds
        loss = super().training_step(model, inputs, num_items_in_batch)  # TRL's: increments self._step
        self.phase_seconds["policy"] += (time.perf_counter() - t0) - (self._prep_seconds - prep0)
        if self._step % self.current_gradient_accumulation_steps == 0 and self._step_first_batch is not None:
            b = self._step_first_batch  # parameters are still those before the optimizer step
            with self.timed("metrics"):
                self.step_metrics.update(self.step_kl.capture_before(model, RolloutBatch(
                    b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"])))
            self._step_first_batch = None
        return loss
