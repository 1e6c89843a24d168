"""The engine: TRL's GRPOTrainer (pinned 1.16.0), subclassed narrowly to time phases and expose rollouts.

Overrides observe: `_generate` (generation time, tokens), `_get_per_token_logps_and_entropies` (reference vs
policy forward time), `_prepare_inputs` (the step's rollouts for kl_step) and `training_step` (policy
forward+backward time; kl_step's pre-step distribution, read from the training forward's final hidden states).
`_compute_loss` is a declared extension point for methods whose loss TRL lacks: a per-token term added to TRL's
per-token loss (`install_loss_hook`).

The method contract: what a method's trainer hook (methods.Method.trainer_hooks, called once by make_trainer) may
use, and nothing else of the trainer's internals:
  trainer.add_step_metrics(dict)       values for this optimizer step's metrics.jsonl row
  trainer.set_method_summary(**fields) fields for summary.json; trainer.note(message, **fields) also logs a remark
  trainer.wrap_compute_loss(wrapper)   wrapper(compute_loss, model, inputs, *args, **kwargs) -> loss, around each
                                       training micro-batch's loss (the last wrapper added is the outermost)
  install_loss_hook(trainer, hook)     a per-token term added to TRL's per-token policy loss
  trainer.add_reward(func, name, w)    one more reward function, weighted as TRL weights its own
  trainer.add_callback(callback)       a transformers TrainerCallback; make_trainer adds the harness's callbacks
                                       (e.g. the metrics row writer) after every method hook, so in each event a
                                       method's callbacks run first and the harness reads what they added
Two save work without changing what TRL computes: each micro-batch drops its all-padding completion columns (TRL pads
a whole generation batch to its longest completion), and the "old" log-prob forward, which TRL runs over a whole
generation batch, runs only for the micro-batches of later optimizer steps: those of the first step are scored by
the very parameters that sampled them, where TRL's loss uses the current log-probs (ratio 1).
The loss (plus a method's declared per-token term), the sampler and the optimizer are TRL's.
"""
from __future__ import annotations

import copy
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import trl
from trl import GRPOConfig, GRPOTrainer

from bench.distributed import is_main, multiprocess_settings, per_process_batch
from bench.errors import BenchError
from bench.generation import merged_adapters
from bench.metrics import RolloutBatch, StepKL
from bench.threads import torch_threads
from tasks import RewardConfig


def grpo_config(spec, method, output_dir: str, reward_weights: list[float], chat: bool, use_cpu: bool,
                report: dict | None = None) -> GRPOConfig:
    """The run's GRPOConfig, after the method's check of its settings (also done earlier, by RunSpec). `report`:
    the experiment-tracker settings (report_to, run_name, project; bench.trackers), which change no computation."""
    kwargs = grpo_settings(spec, method, output_dir, reward_weights, chat, use_cpu)
    if method.check_grpo is not None:
        method.check_grpo(effective_grpo(kwargs))
    return GRPOConfig(**{**kwargs, **(report or {})})


def effective_grpo(settings: dict) -> dict:
    """Every GRPOConfig field of TRL 1.16: the value in `settings`, else TRL's default."""
    from dataclasses import MISSING
    out = {}
    for name, f in GRPOConfig.__dataclass_fields__.items():
        if name in settings:
            out[name] = settings[name]
        elif f.default is not MISSING:
            out[name] = f.default
        elif f.default_factory is not MISSING:
            out[name] = f.default_factory()
    return out


def grpo_settings(spec, method, output_dir: str = "", reward_weights: list[float] | None = None, chat: bool = False,
                  use_cpu: bool = True) -> dict:
    """The GRPOConfig keyword arguments of a run. Every default that silently changes the algorithm is set
    explicitly (TRL 1.16 defaults: loss_type "dapo", use_bias_correction_kl True; see
    https://huggingface.co/docs/trl/grpo_trainer)."""
    kwargs = dict(
        output_dir=output_dir,
        # GRPO's objective (Shao et al. 2024, arXiv 2402.03300): per-sequence token mean, group-normalized advantages
        # (std + 1e-4)
        loss_type="grpo", scale_rewards="group", epsilon=0.2, beta=method.resolved_beta(spec.method_params),
        use_bias_correction_kl=False,  # the plain k3 KL term; TRL 1.16 defaults to True
        importance_sampling_level="token", num_iterations=1, mask_truncated_completions=False,
        top_entropy_quantile=1.0,
        # batching: each generation batch feeds two optimizer steps, so the ratio and clipping are live
        # N data-parallel processes (bench.distributed) take micro_batch / N each: the global batch is unchanged
        per_device_train_batch_size=per_process_batch(spec.micro_batch), gradient_accumulation_steps=spec.grad_accum,
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
        **multiprocess_settings(on_cuda=not use_cpu, sharding=spec.sharding),  # none in a 1-process run
    )
    if spec.generation_backend == "vllm":  # TRL's vLLM; its importance-sampling correction stays on
        kwargs.update(use_vllm=True, vllm_mode=spec.vllm_mode)
        if spec.vllm_mode == "server":  # `trl vllm-serve` on GPUs of its own (README, "Sweeps on SLURM")
            host, port = spec.vllm_server_address
            kwargs.update(vllm_server_host=host, vllm_server_port=port)
    if chat:
        kwargs["chat_template_kwargs"] = {"enable_thinking": False}
    kwargs.update(spec.grpo)              # a preset's or user's extra TRL settings (checked in bench.spec)
    kwargs.update(method.grpo_overrides)  # what defines the method wins (e.g. PROMA's epsilon)
    return kwargs


def make_trainer(spec, method, params: dict, policy, tokenizer, dataset, output_dir: str, chat: bool, device: str,
                 trainer_cls=None, log_path=None, callbacks: list | None = None, report: dict | None = None,
                 **kwargs):
    """The run's trainer: TRL's GRPOTrainer (or `trainer_cls`) on the spec's GRPOConfig, the task's reward, and the
    method's trainer hooks applied; then `callbacks` (the harness's), which thus run after the method's callbacks in
    every event. Used by the runner and by `bench perf`, so both time the same object."""
    from transformers import PrinterCallback

    funcs, weights = RewardConfig(**spec.reward).funcs_and_weights()
    args = grpo_config(spec, method, output_dir, weights, chat=chat, use_cpu=device == "cpu", report=report)
    if (trainer_cls or BenchGRPOTrainer) is BenchGRPOTrainer:
        kwargs.setdefault("step_kl", StepKL(spec.kl_step_seqs, temperature=spec.temperature))
        kwargs.setdefault("fast_generation", spec.generation_backend == "fast")
    trainer = (trainer_cls or BenchGRPOTrainer)(model=policy, reward_funcs=funcs, args=args, train_dataset=dataset,
                                                 processing_class=tokenizer, **kwargs)
    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer would print every log dict
    if isinstance(trainer, BenchGRPOTrainer):  # before the hooks: a method's note() goes to run.log
        # run.log is rank 0's (bench.distributed): another rank's notes go to its stderr only
        trainer.log_path, trainer.run_id = log_path if is_main() else None, spec.run_id
    for hook in method.trainer_hooks:
        hook(trainer, params)
    for callback in callbacks or ():
        trainer.add_callback(callback)
    return trainer


# Per-completion-token tensors of a TRL micro-batch (text models); trim_padding cuts them with completion_ids.
COMPLETION_ALIGNED = ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps",
                      "sampling_per_token_logps", "importance_sampling_ratio", "tool_mask")


def trim_padding(mb: dict) -> None:
    """Drop the completion columns right of a micro-batch's longest completion, in place. TRL pads a whole
    generation batch to its longest completion; every loss and metric masks padding and attention is causal, so the
    result is exactly the same with less compute. Prompt columns stay: TRL's forward counts positions from the first
    column, and the reference log-probs were computed on the full width. Left alone when the micro-batch holds a
    tensor of unknown alignment (e.g. a multimodal model's)."""
    completion_w = mb["completion_ids"].shape[1]
    known = {"prompt_ids", "prompt_mask", *COMPLETION_ALIGNED}
    if any(torch.is_tensor(v) and v.dim() >= 2 and k not in known for k, v in mb.items()):
        return
    used = mb["completion_mask"].any(0).nonzero()
    keep_to = int(used[-1]) + 1 if len(used) else 1
    for k in COMPLETION_ALIGNED:
        v = mb.get(k)
        if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == completion_w:
            mb[k] = v[:, :keep_to]


# ---- the per-token loss extension point ----------------------------------------------------------------------------

@dataclass
class LossTerms:
    """What TRL's `_compute_loss` sees for one micro-batch, from its own training forward (no second forward)."""
    logps: torch.Tensor       # [B, T] current per-token log-probs, with gradient
    old_logps: torch.Tensor   # [B, T] the sampling policy's (TRL: the current ones, detached, where the batch has none)
    advantages: torch.Tensor  # [B, 1]
    mask: torch.Tensor        # [B, T] TRL's loss mask (completion_mask, times tool_mask where present)
    entropies: torch.Tensor   # [B, T] per-token entropies


# TRL 1.16 `GRPOTrainer._compute_loss` aggregates the per-token policy loss by loss type; `aggregate_policy_term`
# mirrors it for a term added to that per-token loss. Pinned: another TRL version must be re-read before use.
AGGREGATED_TRL = "1.16.0"


def aggregate_policy_term(trainer, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
    """sum over tokens of `per_token`, normalized exactly as TRL 1.16 normalizes its per-token policy loss (for the
    trainer's loss_type, gradient accumulation and the vLLM importance-sampling correction). Linear in `per_token`,
    so TRL's loss + this = the aggregate of (TRL's per-token loss + per_token)."""
    if trl.__version__ != AGGREGATED_TRL:
        raise BenchError(f"the per-token loss hook mirrors TRL {AGGREGATED_TRL}'s loss aggregation; installed: "
                         f"{trl.__version__}")
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and trainer.loss_type != "vespo":
        per_token = per_token * inputs["importance_sampling_ratio"]
    train = trainer.model.training
    accumulation = trainer.current_gradient_accumulation_steps if train else 1.0
    x = per_token * mask
    if trainer.loss_type in ("grpo", "sapo"):
        return (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if trainer.loss_type == "bnpo":
        return x.sum() / mask.sum().clamp(min=1.0) / accumulation
    if trainer.loss_type == "dr_grpo":
        return x.sum() / (x.size(0) * trainer.max_completion_length) / accumulation
    if trainer.loss_type in ("cispo", "dapo", "vespo"):
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if train:
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return x.sum() / normalizer
    if trainer.loss_type == "luspo":
        return x.sum(-1).mean() / accumulation
    raise BenchError(f"per-token loss hook: unknown loss_type {trainer.loss_type!r}")


def install_loss_hook(trainer, hook: Callable) -> None:
    """Declare `hook(trainer, terms: LossTerms) -> [B, T] tensor | None`: a per-token term added to TRL's per-token
    policy loss on every training micro-batch, aggregated like it (`aggregate_policy_term`). One per trainer: two
    would each see TRL's loss but not the other's term."""
    if not isinstance(trainer, BenchGRPOTrainer):
        raise BenchError("a per-token loss hook needs bench.engine.BenchGRPOTrainer")
    if trainer.loss_hook is not None:
        raise BenchError("two per-token loss hooks on one trainer (e.g. kl_cov+clip_cov): combine at most one")
    trainer.loss_hook = hook


class BenchGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, step_kl: StepKL | None = None, forward_threads: int | None = None,
                 decode_threads: int | None = None, fast_generation: bool = True, **kwargs):
        self.fast_generation = fast_generation  # rollouts through bench.decode where it applies (else TRL's generate)
        self.fast_generation_skipped: str | None = None  # why the fast path did not apply, once known
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.forward_threads = forward_threads  # torch threads for forward passes (parallel.forward_threads)
        self.decode_threads = decode_threads or forward_threads  # for rollout generation (parallel.decode_threads)
        self.generated_tokens = 0
        self.step_kl = step_kl or StepKL()
        self.step_metrics: dict = {}
        self._prep_seconds = 0.0
        self._step_first_batch = None
        self._skip_old_logps = False    # set while TRL generates: its old-log-prob forward is done per micro-batch
        self._hidden = None             # final hidden states of the step's first micro-batch (kl_step "before")
        # kl_step's "before" is read ahead of the step's last backward where the optimizer steps inside that backward:
        # accelerate's DeepSpeed wrapper calls engine.step() in Accelerator.backward (accelerate utils/deepspeed.py,
        # DeepSpeedEngineWrapper.backward); elsewhere the Trainer steps after training_step returns
        self.capture_before_backward = False
        self.method_summary: dict = {}  # what a method's hooks report into summary.json (see note())
        self.log_path = None            # the run's run.log
        self.run_id = "run"
        self.loss_hook: Callable | None = None  # install_loss_hook: the per-token loss extension point
        self._loss_forward = None       # (logps, entropies) of the training forward, while a loss hook waits for them
        self.show_progress, self.progress_position = False, 2  # a bar while a checkpoint is saved (bench.progress)
        self._loss_wrappers: list[Callable] = []  # wrap_compute_loss, innermost first
        super().__init__(*args, **kwargs)
        self.capture_before_backward = self.is_deepspeed_enabled

    # ---- the method contract (module docstring) --------------------------------------------------------------------

    def add_step_metrics(self, metrics: dict) -> None:
        """Values for the current optimizer step's metrics.jsonl row (the harness reads them at the step's end)."""
        self.step_metrics.update(metrics)

    def pop_step_metrics(self) -> dict:
        """The current step's added metrics, cleared for the next step (the harness's side of add_step_metrics)."""
        metrics, self.step_metrics = self.step_metrics, {}
        return metrics

    def set_method_summary(self, **fields) -> None:
        """Fields for the run's summary.json (after the harness's own; bench.results.RUN_FIELDS)."""
        self.method_summary.update(fields)

    def wrap_compute_loss(self, wrapper: Callable) -> None:
        """wrapper(compute_loss, model, inputs, *args, **kwargs) -> loss runs around every micro-batch's loss
        computation (the training forward); it may change the inputs TRL's loss sees, and must return the loss of
        the compute_loss it was given. Wrappers nest in the order added (the last one outermost)."""
        self._loss_wrappers.append(wrapper)

    def add_reward(self, func: Callable, name: str, weight: float = 1.0) -> None:
        """One more reward function, as TRL 1.16 appends its own (e.g. environment rewards): its name in TRL's
        logged metrics, no processing class, `weight` in the weighted sum of rewards."""
        self.reward_funcs.append(func)
        self.reward_func_names.append(name)
        self.reward_processing_classes.append(None)
        self.reward_weights = torch.cat([self.reward_weights, torch.tensor([weight], dtype=self.reward_weights.dtype)])

    def note(self, message: str, **fields) -> None:
        """A method's one-time remark: a line in run.log and on stderr, and `fields` in summary.json."""
        import sys
        self.set_method_summary(**fields)
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

    def _save_checkpoint(self, model, trial):
        from bench.progress import phase
        with phase(f"{self.run_id}: saving checkpoint", enabled=self.show_progress, position=self.progress_position):
            return super()._save_checkpoint(model, trial)

    def _generate(self, prompts):
        # vLLM gets the weights through TRL's own adapter merge: folding the adapters in here would add them twice
        fold = nullcontext() if self.use_vllm else merged_adapters(self.accelerator.unwrap_model(self.model))
        with self.timed("generation"), fold, torch_threads(self.decode_threads):
            out = super()._generate(prompts)
        self.generated_tokens += sum(len(ids) for ids in out[1])  # completion_ids_list
        return out

    def _fast_unsupported(self, images, multimodal_fields) -> str | None:
        """Why TRL's regular generation path (left-padded `generate`) cannot be replaced by bench.decode.sample."""
        from bench import decode
        if not self.fast_generation:
            return "off"
        if self.use_vllm or self.use_transformers_continuous_batching:
            return "another generation backend"
        if images is not None or multimodal_fields or self.accelerator.num_processes > 1:
            return "multimodal inputs or several processes"
        model = self.accelerator.unwrap_model(self.model)
        return decode.unsupported(model) or decode.sampling_unsupported(self.generation_config)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's regular path (`generate` on left-padded prompts, completions cut after their first EOS) through
        bench.decode.sample: the same random draws and warpers, less per-token overhead. Elsewhere TRL's own."""
        from bench import decode
        reason = self._fast_unsupported(images, multimodal_fields)
        if reason is not None:
            if reason != "off" and self.fast_generation_skipped is None:
                self.fast_generation_skipped = reason
                self.note(f"fast rollout generation does not apply ({reason}): TRL's generate is used")
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        from trl.models import unwrap_model_for_generation
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                         generation_kwargs=self.generation_kwargs,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                                         ) as unwrapped, torch.no_grad():
            # the model's generation_config as TRL's override leaves it (generation_kwargs apply only inside this
            # context, hence the second check here): what `generate` would merge in
            config = copy.deepcopy(unwrapped.generation_config)
            for key, value in self.generation_config.to_diff_dict().items():
                setattr(config, key, value)
            if (reason := decode.sampling_unsupported(config)) is not None:
                self.fast_generation = False
                self.note(f"fast rollout generation does not apply ({reason}): TRL's generate is used")
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            budget = config.max_new_tokens if config.max_new_tokens is not None else self.max_completion_length
            completion_ids = decode.sample(unwrapped, prompt_ids, budget, config,
                                           self._tokenizer.pad_token_id, self.pad_to_multiple_of)
        return completion_ids, None

    def _is_reference_forward(self, model) -> bool:
        if self.ref_model is not None and model is self.ref_model:
            return True
        unwrapped = self.accelerator.unwrap_model(model)
        return getattr(unwrapped, "active_adapter", None) == "ref"

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if torch.is_grad_enabled():  # the training forward: timed as part of training_step
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            if self._loss_forward is not None:  # inside _compute_loss with a loss hook: keep what TRL's loss uses
                self._loss_forward = out[:2]
            return out
        reference = self._is_reference_forward(model)
        if self._skip_old_logps and not reference:  # TRL's old-log-prob forward (the first policy one): deferred
            self._skip_old_logps = False
            return None, None, None
        with self.timed("reference" if reference else "policy"), torch_threads(self.forward_threads):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _defers_old_logps(self) -> bool:
        """Where TRL would score a whole generation batch for its old log-probs (generation spans several optimizer
        steps, one pass over each rollout, no vLLM correction) and the per-micro-batch rule is the same thing (each
        generation batch starts an optimizer step)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.num_iterations == 1 and not self.use_vllm
                and self.args.gradient_accumulation_steps % generate_every != 0
                and self.args.steps_per_generation % self.args.gradient_accumulation_steps == 0)

    def _prepare_inputs(self, generation_batch):
        t0 = time.perf_counter()
        if not self.model.training:
            inputs = super()._prepare_inputs(generation_batch)
        else:
            buffer = self._buffered_inputs
            self._skip_old_logps = self._defers_old_logps()
            try:
                inputs = super()._prepare_inputs(generation_batch)  # TRL's: generates when the buffer is spent
            finally:
                self._skip_old_logps = False
            if self._buffered_inputs is not buffer:  # a new generation batch
                for mb in self._buffered_inputs:
                    trim_padding(mb)
                if self._defers_old_logps():
                    self._score_old_logps()
        self._prep_seconds += time.perf_counter() - t0
        if self.model.training and self._step_first_batch is None:
            self._step_first_batch = inputs
        return inputs

    @torch.no_grad()
    def _score_old_logps(self) -> None:
        """Old log-probs for the micro-batches that later optimizer steps will use (parameters unchanged since
        sampling, as TRL's own pass): those of the current step keep TRL's default, the current log-probs."""
        # the Trainer's count for this step (smaller for an epoch's last, partial accumulation): never too large
        ga = min(getattr(self, "current_gradient_accumulation_steps", 1), self.args.gradient_accumulation_steps)
        first_later = ((self._step % self.args.steps_per_generation) // ga + 1) * ga
        for mb in self._buffered_inputs[first_later:]:
            ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], dim=1)
            mask = torch.cat([mb["prompt_mask"], mb["completion_mask"]], dim=1)
            mb["old_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, mb["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size)

    def _final_hidden_hook(self, model):
        """A hook that keeps the backbone's final hidden states of this forward (no copy, no gradient)."""
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        backbone = base.get_decoder()

        def keep(module, args, output):
            # the first forward with gradients: the training forward (generation, old and reference log-probs run
            # without gradients; a method's own extra forward would come later)
            if self._hidden is None and torch.is_grad_enabled():
                hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                self._hidden = hidden[:self.step_kl.max_seqs].detach()
        return backbone.register_forward_hook(keep)

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = self._threaded_compute_loss
        for wrapper in self._loss_wrappers:  # a method's (wrap_compute_loss), innermost first
            loss = functools.partial(wrapper, loss)
        out = loss(model, inputs, *args, **kwargs)
        # the step's last micro-batch (TRL counts self._step after training_step), before its backward
        if self.capture_before_backward and torch.is_grad_enabled() and \
                (self._step + 1) % self.current_gradient_accumulation_steps == 0:
            self._capture_step_before(self.accelerator.unwrap_model(model))
        return out

    def _threaded_compute_loss(self, model, inputs, *args, **kwargs):
        # the training forward; its backward runs afterwards (Trainer.training_step) at the run's own thread count
        with torch_threads(self.forward_threads):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _compute_loss(self, model, inputs):
        if self.loss_hook is None or not torch.is_grad_enabled():  # (an evaluation loss is TRL's alone)
            return super()._compute_loss(model, inputs)
        self._loss_forward = ()
        try:
            loss = super()._compute_loss(model, inputs)  # TRL's loss, from one training forward
            logps, entropies = self._loss_forward
        finally:
            self._loss_forward = None
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        advantages = inputs["advantages"]
        terms = LossTerms(logps=logps, old_logps=logps.detach() if old is None else old, mask=mask,
                          advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                          entropies=entropies)
        extra = self.loss_hook(self, terms)
        return loss if extra is None else loss + aggregate_policy_term(self, extra, mask, inputs)

    def training_step(self, model, inputs, num_items_in_batch):
        t0, prep0 = time.perf_counter(), self._prep_seconds
        hook = None
        unwrapped = self.accelerator.unwrap_model(model)  # (DDP's wrapper in a multi-process run: no collective here)
        if self._step_first_batch is None and self.step_kl.reads_hidden(  # the step's first micro-batch
                unwrapped, autocast=self.args.bf16 or self.args.fp16):
            self._hidden = None  # (the Trainer prepares `inputs` inside training_step: the hook waits for it)
            hook = self._final_hidden_hook(model)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)  # TRL's: increments self._step
        finally:
            if hook is not None:
                hook.remove()
        self.phase_seconds["policy"] += (time.perf_counter() - t0) - (self._prep_seconds - prep0)
        if self._step % self.current_gradient_accumulation_steps == 0 and self._step_first_batch is not None:
            self._capture_step_before(unwrapped)  # parameters are still those before the optimizer step
        return loss

    def _capture_step_before(self, unwrapped) -> None:
        """kl_step's pre-step distribution on the step's first micro-batch (StepKL.capture_before), once per step."""
        if self._step_first_batch is None:
            return
        b = self._step_first_batch
        batch = RolloutBatch(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"])
        with self.timed("metrics"), torch_threads(self.forward_threads):
            self.add_step_metrics(self.step_kl.capture_before(unwrapped, batch, hidden=self._hidden))
        self._step_first_batch = self._hidden = None
