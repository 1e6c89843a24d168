"""GPU check (no downloads): a Qwen3-0.6B-shaped model built from its configuration with random weights, a few
GRPO steps per method through the same side-by-side cycle as `bench perf`; step time and peak GPU memory per method.

    python -m bench.gpu_check [--methods kl_free_lora,kl_grpo,proma,proma_intra,geora] [--reps 1] [--layers 28]

The model has Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128, MLP 3072, vocabulary 151936, tied
embeddings) and the embedded tiny model's tokenizer: ids beyond it decode to nothing (so rewards are 0 and
completions run to the token budget); generation, logits and gradients cost what the real model's do. bf16 and sdpa
on GPU. The suite never needs a GPU: on CPU this runs too (slowly; the test runs it with one layer).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.init_benchmark import QWEN3_0_6B
from bench.io import atomic_write_json


def build_model_dir(path: Path, layers: int) -> Path:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from bench.models import resolve_model_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny", progress=False))
    config = Qwen3Config(**{**QWEN3_0_6B, "num_hidden_layers": layers}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def main(argv=None) -> int:
    from bench.device import resolve_device
    from bench.perf import MethodBench, _rows, machine, method_step_ratios
    from bench.provenance import versions
    from bench.spec import RunSpec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="kl_free_lora,kl_grpo,proma,proma_intra,geora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--layers", type=int, default=QWEN3_0_6B["num_hidden_layers"])
    p.add_argument("--max-new-tokens", dest="max_new", type=int, default=64)
    p.add_argument("--num-generations", dest="num_generations", type=int, default=8)
    p.add_argument("--micro-batch", dest="micro_batch", type=int, default=16)
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/gpu_check.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "qwen3-0.6b-shaped", args.layers)
        print(f"built {args.layers}-layer Qwen3-0.6B-shaped model in {time.perf_counter() - t0:.1f} s; {device}",
              flush=True)
        spec = RunSpec(method=methods[0], rank=args.rank, model=str(model_dir), max_completion_length=args.max_new,
                       device=device, num_generations=args.num_generations, micro_batch=args.micro_batch,
                       grad_accum=args.grad_accum)
        rows = _rows(spec)
        benches, init = [], {}
        for m in methods:
            t1 = time.perf_counter()
            benches.append(MethodBench(m, replace(spec, method=m), str(model_dir), device, rows))
            init[m] = time.perf_counter() - t1
        resident = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None
        # random weights: every method's policy starts identical only for non-SVD inits, so tokens are not compared
        result = method_step_ratios([], spec, str(model_dir), device, args.reps, benches=benches, check_tokens=False)
    out = {"machine": machine(), "versions": versions(), "layers": args.layers, "rank": args.rank,
           "sequences_per_step": args.micro_batch * args.grad_accum,
           "max_new_tokens": args.max_new, "reps": args.reps, "build_seconds_per_method": init,
           "step_seconds": {m: t["cycle"] / 2 for m, t in result["medians_s"].items()},
           "update_peak_mem_mb": result["update_peak_mem_mb"], "resident_mb_all_methods": resident,
           "ratios": {k: v for k, v in result.items() if k.endswith("_ratio")},
           "total_seconds": time.perf_counter() - t0}
    atomic_write_json(Path(args.out), out)
    print(f"{'method':14s} {'step s':>8s} {'update peak MB':>15s} {'build s':>8s}")
    for m in methods:
        print(f"{m:14s} {out['step_seconds'][m]:8.2f} {out['update_peak_mem_mb'][m]:15.0f} "
              f"{init[m]:8.1f}")
    print(f"total {out['total_seconds']:.0f} s; written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
