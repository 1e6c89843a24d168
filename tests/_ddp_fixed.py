"""Fixed rollouts for comparing a multi-process run with the 1-process run (tests/test_distributed.py).

Two patches of bench.engine, applied by `apply()` in the test process (1-process run) and, run as a script, in each
rank of a multi-process run before bench.ddp_worker.main:
- rollouts that are a function of (prompt, index in its group, optimizer step, seed) only: each completion is sampled
  from the current policy one prompt at a time (no padding) under its own seed, so they do not depend on how TRL
  splits the prompts over processes or on TRL's per-process seeds (set_seed(seed, device_specific=True));
- one optimizer step per generation batch (steps_per_generation = gradient_accumulation_steps): each process shuffles
  its own slice of a generation batch into micro-batches, so with two optimizer steps per generation batch the two
  runs would give each step a different half of the completions; with one, each step sees all of them in both runs.

usage (torchrun, as bench.distributed.WORKER): python _ddp_fixed.py RUN_DIR; the environment may say
  BENCH_TEST_FIXED=0       no patches (the harness as shipped)
  BENCH_TEST_FAIL=R:S      rank R raises at optimizer step S (a failing process)
  BENCH_TEST_STOP=R:S      rank R alone is asked to stop at optimizer step S (as by SLURM's USR2)
"""
import json
import os
import sys
import zlib

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["BENCH_EVAL_MEMO"] = "0"

from bench import engine  # noqa: E402


class FixedRollouts(engine.BenchGRPOTrainer):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        model = self.accelerator.unwrap_model(self.model)
        device = self.accelerator.device
        completions, seen = [], {}
        for ids in prompt_ids:
            j = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            seed = zlib.crc32(json.dumps([ids, j, self.state.global_step, self.args.seed]).encode())
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                x = torch.tensor([ids], device=device)
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                     generation_config=self.generation_config)
            c = out[0, len(ids):].tolist()
            ends = [i for i, t in enumerate(c) if t in self.eos_token_ids]
            completions.append(c[:ends[0] + 1] if ends else c)
        return completions, None


def apply():
    settings = engine.grpo_settings

    def one_step_per_generation(*args, **kwargs):
        out = settings(*args, **kwargs)
        out["steps_per_generation"] = out["gradient_accumulation_steps"]
        return out
    engine.grpo_settings = one_step_per_generation
    engine.BenchGRPOTrainer = FixedRollouts


def fail_at(rank: int, step: int):
    from bench import distributed, runner
    on_step_end = runner.MetricsCallback.on_step_end

    def failing(self, args, state, control, **kw):
        if distributed.rank() == rank and state.global_step == step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        return on_step_end(self, args, state, control, **kw)
    runner.MetricsCallback.on_step_end = failing


def stop_at(rank: int, step: int):
    from bench import distributed, runner
    on_step_end = runner.MetricsCallback.on_step_end

    def stopping(self, args, state, control, **kw):
        if distributed.rank() == rank and state.global_step == step:
            runner.request_stop()
        return on_step_end(self, args, state, control, **kw)
    runner.MetricsCallback.on_step_end = stopping


if __name__ == "__main__":
    if os.environ.get("BENCH_TEST_FIXED", "1") == "1":
        apply()
    if os.environ.get("BENCH_TEST_FAIL"):
        fail_at(*map(int, os.environ["BENCH_TEST_FAIL"].split(":")))
    if os.environ.get("BENCH_TEST_STOP"):
        stop_at(*map(int, os.environ["BENCH_TEST_STOP"].split(":")))
    from bench import ddp_worker
    sys.exit(ddp_worker.main(sys.argv[1:]))
