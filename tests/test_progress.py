"""bench.progress: the counting hooks count what the decoding does (and change nothing), and a phase's bar appears
only once the phase has lasted its delay."""
import math
import time

import pytest

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
