"""Every shipped preset's code path on CPU, with the model swapped for the embedded tiny one (no download) and
the budget shrunk: options resolve, every run spec of the grid validates, and one run per method trains."""
import argparse
import json
import shutil

import pytest

from bench.config import build_specs, load_config_file, preset_names, preset_path, resolve_run_options
from bench.errors import BenchError
from bench.runner import run_one
from tests.test_cli import assert_one_line_error

GSM8K_LINES = [  # GSM8K's own format: question, answer with <<calc>> annotations and '#### N'
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3+4=<<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes?", "answer": "2*6=<<2*6=12>>12\n#### 12"},
    {"question": "Sara had 10 dollars and spent 4. How much is left?", "answer": "10-4=<<10-4=6>>6\n#### 6"},
    {"question": "There are 9 birds and 3 fly away. How many stay?", "answer": "9-3=<<9-3=6>>6\n#### 6"},
]


def test_presets_are_listed(cli):
    names = preset_names()
    assert {"qwen3-0.6b-gsm8k", "rottman-kl-rank", "proma-gsm8k", "geora"} <= set(names)
    r = cli("list")
    assert r.returncode == 0
    for name in names:
        assert name in r.stdout


@pytest.mark.parametrize("name", preset_names())
def test_preset_code_path_on_the_tiny_model(tmp_path, tiny, name):
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_LINES * 4))
    preset = load_config_file(preset_path(name), "preset")
    args = argparse.Namespace(preset=name, config=None, model="tiny", data=str(data), out=str(tmp_path / "out"),
                              **{k: None for k in ("methods", "ranks", "seeds", "steps", "task", "lr", "alpha",
                                                   "eval_size", "device", "task_param", "set", "method_param")})
    options = resolve_run_options(args)
    assert options["model"] == "tiny" and options["task"] == preset["task"]  # flags override the preset
    specs = build_specs(options)  # the whole grid validates (methods, method params, grpo settings, ranks)
    g = specs[0].num_generations
    shrink = dict(steps=1, max_completion_length=12, micro_batch=g // 2, grad_accum=2, eval_size=4, probe_size=2,
                  kl_step_seqs=2, checkpoint_every=1)
    first_rank, first_seed = specs[0].rank, specs[0].seed
    ran = 0
    for spec in specs:
        if spec.rank != first_rank or spec.seed != first_seed:
            continue
        small = type(spec).from_dict({**spec.to_dict(), **shrink})
        s = run_one(small, tmp_path / "out" / small.run_id, progress=False)
        assert s["status"] == "ok", (small.run_id, s.get("error"))
        config = json.loads((tmp_path / "out" / small.run_id / "config.json").read_text())
        assert config["spec"]["grpo"] == spec.grpo and config["spec"]["lr"] == spec.lr
        ran += 1
    assert ran == len({s.method for s in specs})


def test_unknown_preset_and_unknown_preset_key(tmp_path, monkeypatch, cli):
    assert_one_line_error(cli("run", "--preset", "nope"), "unknown preset 'nope'", "proma-gsm8k")
    import bench.config as config
    (tmp_path / "bad.yaml").write_text("model: tiny\nlearning_rate: 0.1\n")
    monkeypatch.setattr(config, "PRESETS", tmp_path)
    with pytest.raises(BenchError, match=r"preset .*bad.yaml: unknown key 'learning_rate'"):
        load_config_file(preset_path("bad"), "preset")


def test_preset_options_merge_with_flags():
    args = argparse.Namespace(preset="rottman-kl-rank", config=None, model=None, data=None, out=None,
                              methods=None, ranks="4", seeds=None, steps=None, task=None, lr=None, alpha=None,
                              eval_size=None, device=None, task_param=None, set=["temperature=0.9"],
                              method_param=None)
    o = resolve_run_options(args)
    assert o["ranks"] == "4" and o["set"]["temperature"] == 0.9
    assert o["set"]["num_generations"] == 16 and o["set"]["grpo"]["top_k"] == 20  # the rest of the preset stays
    assert o["method_param"] == {"kl_grpo.beta": 0.05}


def test_grpo_settings_are_checked():
    from bench.spec import RunSpec, check_grpo_settings
    with pytest.raises(BenchError, match="unknown grpo setting"):
        check_grpo_settings({"warmup_ratio": 0.1})
    with pytest.raises(BenchError, match="set by the harness or the method"):
        RunSpec(method="kl_grpo", rank=4, grpo={"beta": 0.1})


QWEN3_LIKE_TEMPLATE = (  # the parts of Qwen3's chat template that matter here, including its thinking switch
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def test_chat_model_path_uses_the_template_with_thinking_off(tmp_path, tiny):
    """A local model directory whose tokenizer has a (Qwen3-style) chat template: prompts go through the template
    with thinking off, in our eval and in TRL's rollouts, and a run finishes."""
    from transformers import AutoTokenizer

    from bench.engine import BenchGRPOTrainer
    from bench.generation import format_prompts
    from bench.spec import RunSpec
    from tasks import chat_prompt
    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    tok.save_pretrained(model_dir)
    text = format_prompts(AutoTokenizer.from_pretrained(model_dir), [chat_prompt("What is 2+3?")])[0]
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    seen, rendered = [], []
    original = BenchGRPOTrainer._generate

    def spy(self, prompts):
        seen.extend(prompts)
        out = original(self, prompts)
        rendered.extend(self.processing_class.decode(ids) for ids in out[0])  # the prompt ids TRL generated from
        return out
    BenchGRPOTrainer._generate = spy
    try:
        spec = RunSpec(method="kl_free_lora", rank=4, model=str(model_dir), steps=1, eval_size=4, probe_size=2,
                       max_completion_length=16, kl_step_seqs=2)
        s = run_one(spec, tmp_path / "run", progress=False)
    finally:
        BenchGRPOTrainer._generate = original
    assert s["status"] == "ok", s.get("error")
    assert seen and all(isinstance(p, list) and p[-1]["role"] == "user" for p in seen)  # conversational prompts
    assert rendered and all(t.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for t in rendered)
