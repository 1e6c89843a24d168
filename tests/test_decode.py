"""bench.decode against transformers: next-token logits equal the model's own full forward (float noise), sampled
tokens equal `generate`'s for the same seed (the same random stream), and what it cannot reproduce falls back."""
import copy

import pytest
import torch

from bench import decode
from bench.generation import merged_adapters
from bench.models import load_policy
from bench.policy import build_policy
from methods import get_method
from tasks import get_task, plain_prompt


@pytest.fixture(scope="module")
def base(tiny):
    return load_policy("tiny")


def prompts_of(tok, n, distinct=None):
    evals = get_task("synth-gsm").examples("eval")[:distinct or n]
    ids = [tok(plain_prompt(e.question), add_special_tokens=False)["input_ids"] for e in evals]
    return [ids[i % len(ids)] for i in range(n)]


def acting_lora(model, seed=0):
    method = get_method("kl_free_lora")
    lora = build_policy(copy.deepcopy(model), method, 4, 4.0, 0, method.resolve_params({}), 0.0)
    with torch.no_grad():  # a nonzero adapter
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 1e-2)
    return lora


def decoded_logits(model, prompt_ids, tokens, pad):
    """The decoder's logits at each appended token: prefill, then one step per column of `tokens`."""
    dec = decode.KVDecoder(model)
    ids, mask = decode._left_pad(prompt_ids, pad, "cpu")
    out = [dec.prefill(ids, mask, tokens.shape[1])]
    for j in range(tokens.shape[1]):
        out.append(dec.step(tokens[:, j]))
    return torch.stack(out, 1), ids, mask


def full_forward_logits(model, ids, mask, tokens):
    """The model's own forward over prompt + tokens in one pass (no cache), positions from the mask as `generate`."""
    full_ids = torch.cat([ids, tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    positions = (full_mask.cumsum(1) - 1).masked_fill(full_mask == 0, 1)
    logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    return logits[:, ids.shape[1] - 1:]


def check_logits(model, prompt_ids, pad, vocab, steps=12):
    tokens = torch.randint(1, vocab, (len(prompt_ids), steps), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ids, mask = decoded_logits(model, prompt_ids, tokens, pad)
        want = full_forward_logits(model, ids, mask, tokens)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_step_logits_equal_the_models_own_forward(base):
    model, tok = base
    prompt_ids = prompts_of(tok, 6)  # different lengths: left padding
    assert len({len(p) for p in prompt_ids}) > 1
    check_logits(model.eval(), prompt_ids, tok.pad_token_id, model.config.vocab_size)
    lora = acting_lora(model).eval()  # an active adapter runs through PEFT's own module
    check_logits(lora, prompt_ids, tok.pad_token_id, model.config.vocab_size)
    with merged_adapters(lora) as folded:  # folded into the base weights: read as plain linears
        assert folded
        check_logits(lora, prompt_ids, tok.pad_token_id, model.config.vocab_size)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-dynamic-rope"])
def test_other_llama_family_architectures(arch):
    """Random small Llama (grouped-query heads, no q/k norm) and Qwen2 (q/k/v biases) models: the same check. With a
    rotary embedding that is not the default type (dynamic NTK scaling) each step calls the model's rotary module
    instead of reading the decoder's table of positions."""
    from transformers import AutoConfig, AutoModelForCausalLM
    extra = {}
    if arch == "llama-dynamic-rope":
        arch, extra = "llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}
    config = AutoConfig.for_model(arch, vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  attn_implementation="eager", **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert decode.unsupported(model) is None
    assert decode.KVDecoder(model).rotary_table is not bool(extra)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    check_logits(model, prompts, 0, 96)


def test_module_forwards_where_the_arithmetic_is_not_known(base):
    """Norms of a class the decoder does not inline and projections that are not plain linears (an active PEFT
    adapter) run through their own modules: the same logits as the model's forward. The inlined, fused path gives
    the same floats as these module calls (each fused output column is the same dot product)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    model, tok = base

    class OtherNorm(Qwen3RMSNorm):  # the same arithmetic under a name the decoder does not know
        pass

    other = copy.deepcopy(model).eval()
    for parent in list(other.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Qwen3RMSNorm:
                norm = OtherNorm(child.weight.shape[0], eps=child.variance_epsilon)
                norm.weight.data.copy_(child.weight.data)
                setattr(parent, name, norm)
    dec = decode.KVDecoder(other)
    assert dec.norm is other.model.norm and dec.layers[0]["norm1"] is other.model.layers[0].input_layernorm
    prompt_ids = prompts_of(tok, 6)
    check_logits(other, prompt_ids, tok.pad_token_id, model.config.vocab_size)
    tokens = torch.randint(1, model.config.vocab_size, (6, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused, _, _ = decoded_logits(model.eval(), prompt_ids, tokens, tok.pad_token_id)
        modules, _, _ = decoded_logits(other, prompt_ids, tokens, tok.pad_token_id)
    assert torch.equal(fused, modules)
    lora = acting_lora(model).eval()  # adapters on: each projection through PEFT's module, outputs concatenated
    assert not decode._plain(lora.base_model.model.model.layers[0].self_attn.q_proj)
    check_logits(lora, prompt_ids, tok.pad_token_id, model.config.vocab_size)


def generate_completions(model, prompt_ids, config, pad, eos):
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]  # TRL's cut after the first EOS


# finished rows dropped from the cache as soon as one ends (0), by quarters (the default), never (2: they decode pads)
@pytest.mark.parametrize("settings,compact", [(dict(temperature=1.0, top_k=0, top_p=1.0), 0.0),  # the rollouts
                                              (dict(temperature=1.0, top_k=0, top_p=1.0), decode.COMPACT_FRACTION),
                                              (dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.01), 2.0)])
def test_sample_draws_generates_tokens_for_the_same_seed(base, settings, compact, monkeypatch):
    from transformers import GenerationConfig
    monkeypatch.setattr(decode, "COMPACT_FRACTION", compact)
    model, tok = base
    lora = acting_lora(model)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt_ids = prompts_of(tok, 24, distinct=3)  # GRPO-like: 3 prompts x 8 generations
    config = GenerationConfig(do_sample=True, max_new_tokens=48, eos_token_id=[eos], pad_token_id=pad, **settings)
    assert decode.sampling_unsupported(config) is None
    n_same = 0
    with torch.no_grad(), merged_adapters(lora):
        for seed in range(3):
            torch.manual_seed(seed)
            got = decode.sample(lora, prompt_ids, 48, config, pad)
            after_got = torch.rand(4)
            torch.manual_seed(seed)
            want = generate_completions(lora, prompt_ids, config, pad, eos)
            after_want = torch.rand(4)
            assert torch.equal(after_got, after_want)  # the random stream was consumed exactly alike
            n_same += sum(a == b for a, b in zip(got, want))
            assert any(c[-1] == eos for c in got) and len({tuple(c) for c in got}) > 3  # it sampled, rows ended
    # identical tokens (a near-tie decided by the last float bit could flip one; none does on this model)
    assert n_same == 3 * len(prompt_ids)


def test_what_it_cannot_reproduce_is_named(base):
    from transformers import GenerationConfig
    model, _ = base
    assert decode.sampling_unsupported(GenerationConfig(do_sample=True, repetition_penalty=1.2)) == \
        "generation setting repetition_penalty=1.2"
    assert "typical_p" in decode.sampling_unsupported(GenerationConfig(do_sample=True, typical_p=0.5))
    assert decode.sampling_unsupported(GenerationConfig(do_sample=False)) == "do_sample is off"
    assert decode.unsupported(model) is None
    other = copy.deepcopy(model)
    other.config.model_type = "gpt2"
    assert "gpt2" in decode.unsupported(other)
    other = copy.deepcopy(model)
    other.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in decode.unsupported(other)


@pytest.mark.slow
def test_trainer_rollouts_equal_trls_generate(tiny):
    """BenchGRPOTrainer's rollouts (bench.decode) vs TRL's own regular path on the same policy and seed: the same
    completions, token for token, and the same TRL generation batch tensors."""
    from transformers import set_seed

    from bench.perf import MethodBench, _rows
    from bench.spec import RunSpec
    spec = RunSpec(method="kl_free_lora", rank=4, max_completion_length=32)
    rows = _rows(spec)[:16]
    fast = MethodBench("kl_free_lora", spec, "tiny", "cpu", rows)
    trl_path = MethodBench("kl_free_lora", spec, "tiny", "cpu", rows)
    trl_path.trainer.fast_generation = False
    assert fast.trainer.fast_generation
    prompts = [r["prompt"] for r in fast.rows]
    outs = []
    for b in (fast, trl_path):
        b.policy.train()
        set_seed(3)
        outs.append(b.trainer._generate(prompts))
    (p1, c1, *_), (p2, c2, *_) = outs
    assert p1 == p2 and c1 == c2
    assert fast.trainer.fast_generation_skipped is None
