"""bench.metrics against independent brute-force computations on a toy Qwen3 (explicit softmax sums)."""
import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from bench.metrics import InitialPolicy, RolloutBatch, StepKL, completion_logprobs, completion_mask, kl_to_reference

V, EOS = 13, 0


def toy_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                      attn_implementation="eager", eos_token_id=EOS, pad_token_id=EOS)
    return Qwen3ForCausalLM(cfg).eval()


def toy_batch():
    """Two left-padded prompts and completions; the second completion ends early with EOS then padding."""
    prompt_ids = torch.tensor([[5, 6, 7, 8], [EOS, EOS, 9, 10]])
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    completion_ids = torch.tensor([[3, 4, 5, 6], [11, EOS, EOS, EOS]])
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask(completion_ids, EOS))


def brute_distributions(model, batch):
    """Per sequence, unpadded, one token at a time: next-token distributions as python lists (float64)."""
    out = []
    for i in range(batch.prompt_ids.shape[0]):
        prompt = [t for t, m in zip(batch.prompt_ids[i].tolist(), batch.prompt_mask[i].tolist()) if m]
        comp = [t for t, m in zip(batch.completion_ids[i].tolist(), batch.completion_mask[i].tolist()) if m]
        dists = []
        for j in range(len(comp)):
            ids = torch.tensor([prompt + comp[:j]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1].double().tolist()
            z = sum(math.exp(x) for x in logits)
            dists.append([math.exp(x) / z for x in logits])
        out.append(dists)
    return out


def brute_kl(p_dists, q_dists):
    total, n = 0.0, 0
    for ps, qs in zip(p_dists, q_dists):
        for p, q in zip(ps, qs):
            total += sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))
            n += 1
    return total / n


def brute_entropy(p_dists):
    vals = [-sum(pv * math.log(pv) for pv in p) for ps in p_dists for p in ps]
    return sum(vals) / len(vals)


def perturb(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_completion_mask_keeps_first_eos_only():
    ids = torch.tensor([[3, EOS, 4, EOS], [3, 4, 5, 6], [EOS, EOS, 1, 1]])
    assert completion_mask(ids, EOS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_completion_logprobs_match_unpadded_explicit_softmax():
    model, batch = toy_model(), toy_batch()
    logp = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.completion_mask)
    brute = brute_distributions(model, batch)
    for i, dists in enumerate(brute):
        for j, dist in enumerate(dists):
            assert torch.allclose(logp[i, j].exp().double(), torch.tensor(dist, dtype=torch.double), atol=1e-5)


def test_kl_ref_is_zero_at_init_and_matches_brute_force_after_a_change():
    model, batch = toy_model(), toy_batch()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[1].parameters():  # the "trainable" part, as an adapter would be
        p.requires_grad_(True)
    reference = InitialPolicy(model)
    at_init = kl_to_reference(model, reference, batch)
    assert abs(at_init["kl_ref"]) < 1e-6 and abs(at_init["kl_ref_k3"]) < 1e-6
    initial = brute_distributions(model, batch)
    perturb(model)
    current = brute_distributions(model, batch)
    m = kl_to_reference(model, reference, batch)
    assert m["kl_ref"] > 1e-4
    assert m["kl_ref"] == pytest.approx(brute_kl(current, initial), rel=1e-4)
    assert m["entropy_probe"] == pytest.approx(brute_entropy(current), rel=1e-4)
    # k3 on the sampled tokens, computed by hand
    k3, n = 0.0, 0
    for i in range(2):
        comp = [t for t, k in zip(batch.completion_ids[i].tolist(), batch.completion_mask[i].tolist()) if k]
        for j, tok in enumerate(comp):
            d = math.log(initial[i][j][tok]) - math.log(current[i][j][tok])
            k3, n = k3 + math.exp(d) - d - 1, n + 1
    assert m["kl_ref_k3"] == pytest.approx(k3 / n, rel=1e-4)


def test_initial_policy_swaps_back_current_values():
    model = toy_model()
    reference = InitialPolicy(model)
    perturb(model)
    current = [p.detach().clone() for p in model.parameters()]
    with reference.active():
        assert any(not torch.equal(p, c) for p, c in zip(model.parameters(), current))
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), current))


def test_step_kl_matches_brute_force_kl_between_before_and_after():
    model, batch = toy_model(), toy_batch()
    step = StepKL(max_seqs=2)
    before_m = step.capture_before(model, batch)
    before = brute_distributions(model, batch)
    assert before_m["entropy"] == pytest.approx(brute_entropy(before), rel=1e-4)
    perturb(model, scale=0.1)
    after = brute_distributions(model, batch)
    assert step.after_step(model)["kl_step"] == pytest.approx(brute_kl(before, after), rel=1e-4)


def test_step_kl_uses_only_max_seqs():
    model, batch = toy_model(), toy_batch()
    step = StepKL(max_seqs=1)
    step.capture_before(model, batch)
    one = batch.head(1)
    before = brute_distributions(model, one)
    perturb(model, scale=0.1)
    assert step.after_step(model)["kl_step"] == pytest.approx(brute_kl(before, brute_distributions(model, one)),
                                                              rel=1e-4)


# ---- the sampling temperature: every metric is of softmax(logits / T), the distribution TRL's loss optimizes ------

T = 0.6


def tempered(dists_at_t1, temperature):
    """Brute force: p_T(v) = p(v)^(1/T) / sum_u p(u)^(1/T), i.e. softmax(logits / T), from the T = 1 lists."""
    out = []
    for ps in dists_at_t1:
        seq = []
        for p in ps:
            w = [pv ** (1 / temperature) for pv in p]
            z = sum(w)
            seq.append([x / z for x in w])
        out.append(seq)
    return out


def test_metrics_at_temperature_match_brute_force():
    model, batch = toy_model(), toy_batch()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(True)
    reference = InitialPolicy(model)
    initial = tempered(brute_distributions(model, batch), T)
    logp = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.completion_mask, temperature=T)
    for i, dists in enumerate(initial):
        for j, dist in enumerate(dists):
            assert torch.allclose(logp[i, j].exp().double(), torch.tensor(dist, dtype=torch.double), atol=1e-5)
    step = StepKL(max_seqs=2, temperature=T)
    assert step.capture_before(model, batch)["entropy"] == pytest.approx(brute_entropy(initial), rel=1e-4)
    perturb(model)
    current = tempered(brute_distributions(model, batch), T)
    m = kl_to_reference(model, reference, batch, temperature=T)
    assert m["kl_ref"] == pytest.approx(brute_kl(current, initial), rel=1e-4)
    assert m["entropy_probe"] == pytest.approx(brute_entropy(current), rel=1e-4)
    assert step.after_step(model)["kl_step"] == pytest.approx(brute_kl(initial, current), rel=1e-4)
    # and T matters here: the T = 1 figures are different numbers
    at_one = kl_to_reference(model, reference, batch)
    assert abs(at_one["entropy_probe"] - m["entropy_probe"]) > 1e-3  # (toy logits are small: entropy near log V)
    assert abs(at_one["kl_ref"] - m["kl_ref"]) > 0.2 * m["kl_ref"]


def test_probe_samples_from_the_tempered_softmax_whatever_the_generation_config(tiny):
    """The model ships sampling settings (as Hub models do); the probe must ignore them all: at every generated
    position the scores generate samples from are exactly logits / T (checked through generate's own outputs)."""
    from bench.metrics import ProbeSet
    from bench.models import load_policy
    from tasks import get_task, plain_prompt
    model, tok = load_policy("tiny")
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.min_p = True, 1.7, 3, 0.5, 0.2
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.suppress_tokens = 1.5, 2, [5, 6]
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        out = generate(**kwargs, output_scores=True, output_logits=True, return_dict_in_generate=True)
        seen["scores"], seen["logits"] = out.scores, out.logits
        return out.sequences
    model.generate = spy
    probe = ProbeSet([plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:4]], 24, seed=0,
                     temperature=T)
    batch = probe.sample(model, tok)
    assert len(seen["scores"]) == batch.completion_ids.shape[1] > 1
    for scores, logits in zip(seen["scores"], seen["logits"]):
        assert torch.allclose(scores, logits / T, rtol=1e-6, atol=1e-6)
    assert model.generation_config.repetition_penalty == 1.5  # the model's own settings are put back
    # the probe's entropy is that of softmax(logits / T) on the sampled tokens (independent forward, float64)
    ent, n = 0.0, 0
    for i in range(batch.prompt_ids.shape[0]):
        keep = torch.cat([batch.prompt_mask[i], batch.completion_mask[i]]).bool()
        ids = torch.cat([batch.prompt_ids[i], batch.completion_ids[i]])[keep][None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double() / T
        n_comp = int(batch.completion_mask[i].sum())
        logp = torch.log_softmax(logits[-n_comp - 1:-1], -1)
        ent, n = ent + float(-(logp.exp() * logp).sum()), n + n_comp
    m = probe.measure(model, tok, InitialPolicy(model))
    assert m["entropy_probe"] == pytest.approx(ent / n, rel=1e-4)
