"""Task-aware defaults (bench.defaults) on a small randomly initialized Llama model saved as safetensors (no
download), its tokenizer trained here; the embedded model and presets keep their values; the start-of-run printout."""
import json
import math

import pytest

from bench.config import build_specs, resolve_run_options
from bench.defaults import baseline, completion_budget, load_tokenizer, settings_lines, task_defaults
from bench.spec import RunSpec
from tasks import get_task


def _write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in examples))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """GSM8K-format train.jsonl / test.jsonl (synth-gsm problems: no download)."""
    task = get_task("synth-gsm", n_train=300, n_eval=20, n_dev=10)
    out = tmp_path_factory.mktemp("gsm8k-local")
    _write_jsonl(out / "train.jsonl", task.examples("train"))
    _write_jsonl(out / "test.jsonl", task.examples("eval"))
    return out


def make_llama(path, corpus, chat_template=None):
    """A 2-layer Llama with random weights and a byte-level BPE tokenizer trained on `corpus`, saved in Hugging Face
    format with safetensors weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.models import build_tokenizer
    tokenizer = build_tokenizer(corpus, vocab_size=400)
    if chat_template:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory, data_dir):
    corpus = [line for line in (data_dir / "train.jsonl").read_text().splitlines()]
    return make_llama(tmp_path_factory.mktemp("llama"), corpus)


def _expected_budget(model_dir, answers, multiple=64, at_most=512):
    """Independently of bench.defaults: the tokenizers library on the saved tokenizer.json."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    longest = max(len(tok.encode(" " + a, add_special_tokens=False).ids) + 1 for a in answers)
    return min(at_most, math.ceil(longest / multiple) * multiple), longest


def test_gsm8k_budget_is_the_longest_gold_solution_in_the_runs_tokenizer(llama, data_dir):
    task = get_task("gsm8k", data=str(data_dir))
    expected, longest = _expected_budget(llama, [e.answer for e in task.examples("train")])
    d = task_defaults(task, str(llama), given=set())["max_completion_length"]
    assert d.value == expected and d.value % 64 == 0 and longest <= d.value < longest + 64
    assert f"{longest} (longest)" in d.why and "capped" not in d.why


def test_budget_is_capped_and_says_how_many_solutions_are_longer(llama, tmp_path):
    long_answer = " ".join(f"Step {i}: 12+34 = <<12+34=46>>46." for i in range(60)) + "\n#### 46"
    short_answer = "12+34 = <<12+34=46>>46\n#### 46"
    rows = [{"question": "q", "answer": long_answer}] + [{"question": "q", "answer": short_answer}] * 3
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[1]) + "\n")
    _, longest = _expected_budget(llama, [long_answer])
    assert longest > 512
    d = task_defaults(get_task("gsm8k", data=str(tmp_path)), str(llama), given=set())["max_completion_length"]
    assert d.value == 512 and "capped at 512 (1 of the 4 solutions are longer)" in d.why


def test_chat_template_models_get_the_tasks_chat_budget(tmp_path, data_dir):
    corpus = (data_dir / "train.jsonl").read_text().splitlines()
    model = make_llama(tmp_path / "chat", corpus, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    d = completion_budget(get_task("gsm8k", data=str(data_dir)), load_tokenizer(str(model)))
    assert d.value == 512 and "chat" in d.why


def test_given_budget_and_tasks_without_a_rule_are_left_alone(llama, data_dir):
    assert task_defaults(get_task("gsm8k", data=str(data_dir)), str(llama), given={"max_completion_length"}) == {}
    assert task_defaults(get_task("synth-gsm"), "no-such-model", given=set()) == {}  # not even a tokenizer load


def _options(**flags):
    from bench.cli import make_parser
    args = make_parser().parse_args(["run"] + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v)])
    return args, resolve_run_options(args)


def test_cli_applies_the_task_default_unless_the_budget_is_given(llama, data_dir):
    expected, _ = _expected_budget(llama, [e.answer for e in get_task("gsm8k", data=str(data_dir)).examples("train")])
    _, options = _options(model=str(llama), task="gsm8k", data=str(data_dir), methods="kl_free_lora", ranks="2")
    derived = {}
    (spec,) = build_specs(options, derived)
    assert spec.max_completion_length == expected == derived["max_completion_length"].value
    _, options = _options(model=str(llama), task="gsm8k", data=str(data_dir), methods="kl_free_lora", ranks="2",
                          set="max_completion_length=100")
    derived = {}
    (spec,) = build_specs(options, derived)
    assert spec.max_completion_length == 100 and derived == {}


def test_embedded_model_defaults_are_unchanged(tiny):
    """tiny + synth-gsm: the very RunSpecs (same keys: same run directories, same metrics) as RunSpec's defaults."""
    _, options = _options(methods="kl_free_lora,geora", ranks="4,16")
    derived = {}
    specs = build_specs(options, derived)
    assert derived == {}
    assert [s.key() for s in specs] == [RunSpec(method=m, rank=r).key() for m in ("kl_free_lora", "geora")
                                        for r in (4, 16)]
    assert all(s.max_completion_length == 64 for s in specs)


def test_printout_shows_only_what_differs_unless_verbose(llama, data_dir):
    _, options = _options(methods="kl_free_lora", ranks="4", steps="3")
    specs = build_specs(options)
    lines = settings_lines(specs, baseline(None), {})
    assert lines[0] == "sweep: 1 run(s) = methods kl_free_lora x ranks 4 x seeds 0"
    assert lines[1:] == ["settings that differ from the defaults (all: --verbose):", "  steps = 3  (default 40)"]
    verbose = settings_lines(specs, baseline(None), {}, verbose=True)
    assert "  max_completion_length = 64" in verbose and "  lr = 0.001" in verbose and "  steps = 3  (default 40)" \
        in verbose
    _, options = _options(model=str(llama), task="gsm8k", data=str(data_dir), methods="kl_free_lora", ranks="2")
    derived = {}
    specs = build_specs(options, derived)
    text = "\n".join(settings_lines(specs, baseline(None), derived))
    assert f"  max_completion_length = {specs[0].max_completion_length}  (task gsm8k: its 300 train solutions" in text
    assert "  task = gsm8k  (default synth-gsm)" in text and f"  model = {llama}  (default tiny)" in text


def test_printout_compares_with_the_preset():
    from bench.config import load_config_file, preset_path
    preset = load_config_file(preset_path("qwen3-0.6b-gsm8k"), "preset")
    base = baseline(preset)
    assert base["max_completion_length"] == 512 and base["steps"] == 200 and base["model"] == "Qwen/Qwen3-0.6B"
    spec = RunSpec(method="kl_free_lora", rank=4, **{k: base[k] for k in ("task", "model", "steps", "lr",
                                                                             "max_completion_length")})
    lines = settings_lines([spec], base, {})
    # the preset's own values are not news; RunSpec defaults the preset overrides (micro_batch 16) are not either
    assert "  steps" not in "\n".join(lines) and "  max_completion_length" not in "\n".join(lines)


def test_real_gsm8k_budget(gsm8k_dir, llama):
    """The real GSM8K train split (../shared): the rule against an independent count, in the test model's tokenizer."""
    task = get_task("gsm8k", data=str(gsm8k_dir))
    expected, longest = _expected_budget(llama, [e.answer for e in task.examples("train")])
    d = task_defaults(task, str(llama), given=set())["max_completion_length"]
    assert d.value == expected and f"its {len(task.examples('train'))} train solutions" in d.why
