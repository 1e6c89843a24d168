"""bench.generation's memoized greedy eval: shared only by policies that act with the very same weights, and
equal to a fresh evaluation."""
import copy
import json

import pytest
import torch

from bench.generation import acting_weights_digest, greedy_accuracy, greedy_decode, score_records
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
    assert hit["items"] == fresh["items"] == first["items"]  # per-item records from the memo too
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
    records = json.loads(entry.read_text())["records"]
    damages = ["{not json", json.dumps({"records": records[:-1]}),  # unreadable; wrong length
               json.dumps({"completions": first["completions"]}),  # the former format: no token counts
               json.dumps({"records": [{**r, "completion_tokens": None} for r in records]})]
    for damage in damages:
        entry.write_text(damage)
        again = greedy_accuracy(model, tok, prompts, golds, 16, memo_dir=tmp_path)
        assert again["memoized"] is False and again["items"] == first["items"]
        assert json.loads(entry.read_text())["records"] == records


def one_at_a_time(model, tok, prompt, budget):
    """The reference: the model's own greedy `generate` on the prompt alone (no padding, no batch)."""
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=budget, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    return {"completion": tok.decode(ids, skip_special_tokens=True), "completion_tokens": len(ids),
            "truncated": ids[-1] != tok.eos_token_id}


def spread_prompts(tok, n=10):
    """n eval prompts of n different token lengths, so that every batch below pads."""
    by_length = {}
    for e in get_task("synth-gsm").examples("eval")[:400]:
        by_length.setdefault(len(tok(plain_prompt(e.question))["input_ids"]), plain_prompt(e.question))
    lengths = sorted(by_length)
    return [by_length[lengths[round(i * (len(lengths) - 1) / (n - 1))]] for i in range(n)][::-1]


@pytest.mark.parametrize("budget", [64, 12])  # 12: most completions run out of budget (truncated)
def test_greedy_decode_equals_one_at_a_time_generation(base, budget):
    model, tok = base
    prompts = spread_prompts(tok)
    reference = [one_at_a_time(model, tok, p, budget) for p in prompts]
    assert any(r["truncated"] for r in reference) if budget == 12 else not any(r["truncated"] for r in reference)
    for batch_size in (1, 3, 64):  # alone, several padded batches, one batch
        for fast in (True, False):  # bench.decode's step, the model's own forward
            assert greedy_decode(model, tok, prompts, budget, batch_size, fast=fast) == reference, (batch_size, fast)


def test_greedy_decode_with_an_acting_adapter_equals_its_generate(base):
    _, tok = base
    lora = policy_of(base, "kl_free_lora", 4)
    with torch.no_grad():  # a nonzero adapter: generation folds it into the base weights
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 1e-2)
    prompts = spread_prompts(tok, 6)
    merged = copy.deepcopy(lora).merge_and_unload()  # PEFT's own merge, generated one prompt at a time
    assert greedy_decode(lora, tok, prompts, 48, 4) == [one_at_a_time(merged, tok, p, 48) for p in prompts]


def test_greedy_decode_falls_back_to_generate_where_logits_are_processed(base):
    model, tok = base
    penalized = copy.deepcopy(model)
    penalized.generation_config.repetition_penalty = 1.5  # HF applies it in greedy search too
    prompts = spread_prompts(tok, 4)
    got = greedy_decode(penalized, tok, prompts, 40, 64)
    assert got == [one_at_a_time(penalized, tok, p, 40) for p in prompts]
    assert got != greedy_decode(model, tok, prompts, 40, 64)  # the penalty did act


def test_score_records_are_lm_eval_exact_match_item_by_item():
    records = [{"completion": " 3+4 = <<3+4=7>>7\n#### 7", "completion_tokens": 9, "truncated": False},
               {"completion": " so she has 7 apples", "completion_tokens": 6, "truncated": False},  # no '#### N'
               {"completion": " #### 1,000.", "completion_tokens": 5, "truncated": True},
               {"completion": " #### 8\nQuestion: #### 7", "completion_tokens": 12, "truncated": False}]
    items = score_records(records, ["7", "7", "1000", "7"])
    assert [r["id"] for r in items] == ["0", "1", "2", "3"]
    assert [r["prediction"] for r in items] == ["7", None, "1,000.", "8"]  # text after "Question:" never counts
    assert [r["correct_strict"] for r in items] == [True, False, True, False]
    assert [r["correct_flexible"] for r in items] == [True, True, True, False]
    assert [(r["completion_tokens"], r["truncated"]) for r in items] == [(9, False), (6, False), (5, True), (12, False)]
    assert [r["id"] for r in score_records(records, ["7"] * 4, ids=["a", "b", 3, "d"])] == ["a", "b", "3", "d"]
    with pytest.raises(ValueError):  # a record without its gold (or the reverse) is a bug, not a zero
        score_records(records, ["7"] * 3)


def test_eval_cost_measures_both_evals_on_identical_completions(tiny):
    from bench.perf import eval_cost
    from bench.spec import RunSpec
    spec = RunSpec(method="kl_free_lora", rank=4, task_params={"n_eval": 30}, max_completion_length=24, eval_batch=8)
    r = eval_cost(spec, "tiny", "cpu", reps=1, log=lambda *_: None, old_n=10, old_batch=16)
    assert r["eval_items"] == {"old": 10, "new": 30} and r["eval_batch"] == {"old": 16, "new": 8}
    med = r["eval_medians_s"]
    assert r["eval_fast_vs_dynamic_wall_ratio"] == pytest.approx(med["new_30"]["wall_s"] / med["dynamic_30"]["wall_s"])
    assert r["eval_new_vs_old_cpu_ratio"] == pytest.approx(med["new_30"]["cpu_s"] / med["old_10"]["cpu_s"])
    assert r["eval_same_items_cpu_ratio"] == pytest.approx(med["new_30"]["cpu_s"] / med["old_30"]["cpu_s"])
