"""The embedded tiny model: standard HF format, Qwen3 module names, accuracy band, deterministic pieces."""
import json
import shutil

import pytest
import torch

from bench.generation import generate, greedy_accuracy
from bench.models import EOS, TinySpec, build_tokenizer, load_policy, tiny_dir
from methods import QWEN3_TARGETS
from tasks import get_task, plain_prompt


def test_tiny_is_a_qwen3_saved_in_hf_format(tiny):
    assert tiny == tiny_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "build_info.json"):
        assert (tiny / name).is_file(), name
    assert json.loads((tiny / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    model, tok = load_policy("tiny")
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert set(QWEN3_TARGETS) <= names
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config._attn_implementation == "eager"
    assert tok.padding_side == "left" and tok.eos_token == EOS == tok.pad_token
    info = json.loads((tiny / "build_info.json").read_text())
    assert info["key"] == TinySpec().key() and info["parameters"] == sum(p.numel() for p in model.parameters())


def test_tiny_base_accuracy_is_in_the_band(tiny):
    model, tok = load_policy("tiny")
    evals = get_task("synth-gsm").examples("eval")
    acc = greedy_accuracy(model, tok, [plain_prompt(e.question) for e in evals], [e.gold for e in evals], 72)
    assert 0.15 <= acc["accuracy"] <= 0.60, acc["accuracy"]


def test_batched_greedy_equals_one_by_one_argmax(tiny):
    """Left-padded batched generation (KV cache) == an explicit argmax loop per prompt without cache."""
    model, tok = load_policy("tiny")
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:4]]
    batched, _ = generate(model, tok, prompts, max_new_tokens=20)
    for prompt, text in zip(prompts, batched):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(20):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert tok.decode(out) == text


def test_tokenizer_build_is_deterministic_and_roundtrips():
    corpus = [plain_prompt(e.question) + " " + e.answer for e in get_task("synth-gsm", n_train=300).examples("train")]
    a, b = build_tokenizer(corpus, 300), build_tokenizer(corpus, 300)
    assert a.get_vocab() == b.get_vocab()
    text = corpus[0] + " $1,234.5 Ünïcode"
    assert a.decode(a(text)["input_ids"]) == text
    assert all(len(t.lstrip("Ġ")) <= 1 for t in a.tokenize("12345") if t.lstrip("Ġ").isdigit())  # single digits


def test_chat_template_model_gets_conversational_prompts(tmp_path, tiny):
    """A model with a chat template trains on chat-formatted prompts (the real-model path), offline."""
    from bench.runner import run_one
    from bench.spec import RunSpec
    chat_model = tmp_path / "chat-tiny"
    shutil.copytree(tiny, chat_model)
    cfg_path = chat_model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    spec = RunSpec(method="kl_free_lora", rank=4, model=str(chat_model), steps=1, eval_size=4, probe_size=4,
                   max_completion_length=16)
    s = run_one(spec, tmp_path / "run", progress=False)
    assert s["status"] == "ok", s.get("error")
    _, tok = load_policy(str(chat_model))
    from bench.generation import format_prompts
    from tasks import chat_prompt
    assert format_prompts(tok, [chat_prompt("Q?")])[0].startswith("<user>Solve the math word problem")


def test_merged_adapter_generation_matches_and_restores(tiny):
    """Generation with LoRA folded into the weights gives the same text, and leaves the weights untouched."""
    from peft import LoraConfig, get_peft_model

    from bench.generation import merged_adapters
    model, tok = load_policy("tiny")
    torch.manual_seed(0)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=list(QWEN3_TARGETS),
                                              init_lora_weights=False))  # random A and B: a non-zero update
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:8]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        logits = policy(**enc).logits
        with merged_adapters(policy):
            merged_logits = policy(**enc).logits
    assert (logits - merged_logits).abs().max() < 1e-4
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    with merged_adapters(policy):
        fast = [tok.decode(x) for x in policy.generate(**enc, max_new_tokens=24, do_sample=False)]
    slow = [tok.decode(x) for x in policy.generate(**enc, max_new_tokens=24, do_sample=False)]
    assert fast == slow


def _micro_build(tmp_path, monkeypatch, name, threads):
    """A small TinySpec built from scratch under `threads` process threads; returns (weights bytes, build_info)."""
    from bench import models
    spec = TinySpec(num_hidden_layers=1, vocab_size=300, task_params={"n_train": 600, "n_dev": 8, "n_eval": 8},
                    check_every=3, sft_max_steps=3, stop_accuracy=0.0, max_new_tokens=4)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / name))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        path = models.build_tiny(spec, progress=False)
        assert torch.get_num_threads() == threads  # the caller's setting is given back
    finally:
        torch.set_num_threads(before)
    return (path / "model.safetensors").read_bytes(), json.loads((path / "build_info.json").read_text())


@pytest.mark.slow  # builds the model four times
def test_build_pins_its_thread_count(tmp_path, monkeypatch):
    from bench import models
    one, info = _micro_build(tmp_path, monkeypatch, "a", 1)
    three, _ = _micro_build(tmp_path, monkeypatch, "b", 3)
    assert one == three and info["torch_threads"] == models.BUILD_THREADS
    # the control: without the pin, the thread count reaches the weights (so the equality above is not vacuous)
    monkeypatch.setattr(models, "BUILD_THREADS", None)
    one, _ = _micro_build(tmp_path, monkeypatch, "c", 1)
    three, _ = _micro_build(tmp_path, monkeypatch, "d", 3)
    if one == three:
        pytest.skip("this CPU's kernels give one and three threads the same sums here: the pin is not exercised")
