"""bench.generation's memoized greedy eval: shared only by policies that act with the very same weights, and
equal to a fresh evaluation."""
import copy
import json

import pytest
import torch

from bench.generation import acting_weights_digest, greedy_accuracy
from bench.models import load_policy
from bench.policy import build_policy
from methods import get_method
from tasks import get_task, plain_prompt


@pytest.fixture(scope="module")
def base(tiny):
    return load_policy("tiny")


def policy_of(base, method_name, rank, seed=0):
    model, _ = base
    method = get_method(method_name)
    alpha = None if rank == "full" else rank  # alpha = rank, the harness default
    return build_policy(copy.deepcopy(model), method, rank, alpha, seed, method.resolve_params({}), 0.0)


def eval_set(n=24):
    evals = get_task("synth-gsm").examples("eval")[:n]
    return [plain_prompt(e.question) for e in evals], [e.gold for e in evals]


def test_digest_is_shared_exactly_by_policies_acting_with_the_base_weights(base):
    model, _ = base
    d0 = acting_weights_digest(model)
    # zero-initialized adapters (any rank, seed, method) and full fine-tuning start as the base model
    for name, rank, seed in [("kl_free_lora", 4, 0), ("kl_grpo", 16, 1), ("proma", 64, 0), ("kl_free_lora", "full", 0)]:
        assert acting_weights_digest(policy_of(base, name, rank, seed)) == d0, (name, rank)
    # residual SVD inits fold to W - sBA + sBA, not W bit for bit: their own key
    assert acting_weights_digest(policy_of(base, "pissa", 16)) != d0
    # a nonzero adapter acts: a different key; so does one ulp in one base weight
    lora = policy_of(base, "kl_free_lora", 4)
    with torch.no_grad():
        next(p for n, p in lora.named_parameters() if "lora_B" in n)[0, 0] = 1e-3
    assert acting_weights_digest(lora) != d0
    bumped = copy.deepcopy(model)
    with torch.no_grad():
        w = bumped.model.layers[2].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))
    assert acting_weights_digest(bumped) != d0


def test_memoized_eval_equals_a_fresh_one(base, tmp_path):
    _, tok = base
    prompts, golds = eval_set()
    first = greedy_accuracy(policy_of(base, "kl_free_lora", 4), tok, prompts, golds, 24, memo_dir=tmp_path)
    assert first["memoized"] is False and len(list(tmp_path.glob("greedy-*.json"))) == 1
    other = policy_of(base, "kl_grpo", 16, seed=1)  # other adapter, rank and seed, same acting weights
    hit = greedy_accuracy(other, tok, prompts, golds, 24, memo_dir=tmp_path)
    fresh = greedy_accuracy(other, tok, prompts, golds, 24)  # computed, no memo
    assert hit["memoized"] is True and fresh["memoized"] is False
    assert hit["completions"] == fresh["completions"] == first["completions"]
    assert (hit["accuracy"], hit["accuracy_flexible"]) == (fresh["accuracy"], fresh["accuracy_flexible"])
    # another budget, batch size or prompt set is another entry
    assert greedy_accuracy(other, tok, prompts, golds, 20, memo_dir=tmp_path)["memoized"] is False
    assert greedy_accuracy(other, tok, prompts[:-1], golds[:-1], 24, memo_dir=tmp_path)["memoized"] is False
    assert greedy_accuracy(other, tok, prompts, golds, 24, batch_size=8, memo_dir=tmp_path)["memoized"] is False
    # a residual init is evaluated on its own
    assert greedy_accuracy(policy_of(base, "milora", 16), tok, prompts, golds, 24,
                           memo_dir=tmp_path)["memoized"] is False


def test_a_damaged_memo_entry_is_recomputed(base, tmp_path):
    model, tok = base
    prompts, golds = eval_set(8)
    first = greedy_accuracy(model, tok, prompts, golds, 16, memo_dir=tmp_path)
    (entry,) = tmp_path.glob("greedy-*.json")
    for damage in ("{not json", json.dumps({"completions": ["x"]})):  # unreadable; wrong length
        entry.write_text(damage)
        again = greedy_accuracy(model, tok, prompts, golds, 16, memo_dir=tmp_path)
        assert again["memoized"] is False and again["completions"] == first["completions"]
        assert json.loads(entry.read_text())["completions"] == first["completions"]
