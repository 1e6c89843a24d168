"""bench.progress: the counting hooks count what the decoding does (and change nothing), and a phase's bar appears
only once the phase has lasted its delay."""
import math
import time

import pytest
import torch

from bench import progress
from bench.generation import generate, greedy_decode
from bench.models import load_policy
from tasks import get_task, plain_prompt


class Bar:
    def __init__(self, total=None):
        self.total, self.n, self.updates = total, 0, []

    def update(self, n=1):
        self.n += n
        self.updates.append(n)


@pytest.fixture(scope="module")
def model_and_prompts(tiny):
    model, tokenizer = load_policy("tiny")
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:10]]
    return model, tokenizer, prompts


def test_count_prompts_counts_each_batch_once_it_is_done_and_changes_nothing(model_and_prompts):
    model, tokenizer, prompts = model_and_prompts
    plain = greedy_decode(model, tokenizer, prompts, 16, batch_size=4)
    bar = Bar(total=len(prompts))
    with progress.count_prompts(model, bar):
        counted = greedy_decode(model, tokenizer, prompts, 16, batch_size=4)
    assert counted == plain
    assert bar.updates == [0, 4, 4, 2] and bar.n == len(prompts) == 4 * (math.ceil(len(prompts) / 4) - 1) + 2


def test_count_prompts_completes_without_forwards():
    """Memoized completions: no forward runs, and the bar still ends at its total."""
    import torch
    bar = Bar(total=7)
    decoder = torch.nn.Linear(2, 2)
    model = type("M", (), {"get_decoder": lambda self: decoder})()
    with progress.count_prompts(model, bar):
        pass
    assert bar.n == 7


def test_count_forwards_is_one_per_generated_token(model_and_prompts):
    model, tokenizer, prompts = model_and_prompts
    bar = Bar()
    with progress.count_forwards(model, bar):
        _, out = generate(model, tokenizer, prompts[:3], max_new_tokens=12, greedy=False, seed=0)
    assert bar.n == out["batches"][0][2].shape[1]


def test_phase_bar_appears_only_after_its_delay(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY", 0.3)
    with progress.phase("short phase"):
        pass
    assert "short phase" not in capsys.readouterr().err
    with progress.phase("long phase"):
        time.sleep(1.6)  # the ticker redraws once a second
    assert "long phase" in capsys.readouterr().err
    with progress.phase("disabled phase", enabled=False):
        time.sleep(1.6)
    assert "disabled phase" not in capsys.readouterr().err


class _Decoder(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None):
        return input_ids * 2


class _CausalLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Decoder()

    def get_decoder(self):
        return self.model


@pytest.mark.parametrize("counter", [progress.count_forwards, progress.count_prompts])
def test_hooks_leave_the_forward_arguments_alone_when_a_real_bar_redraws(counter):
    """A real tqdm bar that is shown returns True from update() when it redraws; a pre-hook that returned it would
    replace the decoder's positional arguments (Qwen3Model.forward() got multiple values for 'input_ids')."""
    import io

    from tqdm import tqdm
    lm = _CausalLM()
    bar = tqdm(total=10, file=io.StringIO(), delay=0, mininterval=0, miniters=1)
    assert bar.update(1) is True  # this bar redraws on update: the case that broke
    ids = torch.ones(2, 3, dtype=torch.long)
    with counter(lm, bar):
        for _ in range(3):
            assert torch.equal(lm.model(input_ids=ids), ids * 2)
    bar.close()
