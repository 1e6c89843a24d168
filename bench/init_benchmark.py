"""Adapter-initialization time on a Qwen3-0.6B-shaped model built from its configuration with random weights
(no download; 28 layers x 7 matrices). Prints seconds per method and SVD mode, measured in one process.

    python -m bench.init_benchmark [--rank 16] [--exact]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.policy import build_policy
from methods import get_method

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


def main(argv=None) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--exact", action="store_true", help="also time the exact SVD (minutes on 2 cores)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B)).eval()
    print(f"Qwen3-0.6B-shaped model: {sum(x.numel() for x in base.parameters()) / 1e6:.0f}M parameters, "
          f"rank {args.rank}, {torch.get_num_threads()} threads")
    cases = [("geora", {"svd": "randomized"}), ("pissa", {"svd": "randomized"})]
    if args.exact:
        cases += [("geora", {"svd": "exact"}), ("pissa", {"svd": "exact"}), ("milora", {})]
    results = {}
    for name, params in cases:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        build_policy(model, get_method(name), args.rank, float(args.rank), seed=0, params=params)
        seconds = time.perf_counter() - t0
        label = f"{name} ({params.get('svd', 'exact')} SVD)"
        results[label] = seconds
        print(f"{label:28s} {seconds:8.1f} s", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
