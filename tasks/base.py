"""What every task gives the harness: examples with a verifiable gold answer, prompts, and rewards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tasks.answers import FALLBACK, extract_strict, is_correct, truncate_at_stop

INSTRUCTION = "Solve the math word problem step by step. Write the final answer on its own line as '#### N'."


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # GSM8K-format solution: reasoning lines, then `#### N`
    id: str | None = None  # the dataset's own item id, if it has one (eval records fall back to the split index)

    @property
    def gold(self) -> str:
        return self.answer.split("####")[-1].strip()


def plain_prompt(question: str) -> str:
    """lm-eval gsm8k's doc_to_text; used for models without a chat template."""
    return f"Question: {question}\nAnswer:"


def chat_prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{question}"}]


def completion_text(completion) -> str:
    """TRL passes strings for plain prompts and message lists for conversational ones."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


@dataclass
class RewardConfig:
    """Weights of the reward terms; correctness is 1/0 (lm-eval exact match), format is 1/0 (`#### N` present)."""
    correct: float = 1.0
    format: float = 0.0
    extraction: str = "strict"  # strict | flexible

    def funcs_and_weights(self):
        funcs, weights = [], []
        mode = self.extraction

        def correct_reward(completions, gold, **_):
            return [float(is_correct(completion_text(c), g, mode)) for c, g in zip(completions, gold)]

        def format_reward(completions, **_):
            return [float(extract_strict(truncate_at_stop(completion_text(c))) != FALLBACK) for c in completions]

        for func, weight in ((correct_reward, self.correct), (format_reward, self.format)):
            if weight:
                funcs.append(func)
                weights.append(float(weight))
        if not funcs:
            raise ValueError("reward weights are all zero")
        return funcs, weights


@dataclass(frozen=True)
class CompletionBudget:
    """How a task sizes a run's completion budget (max_completion_length) where the run does not set one
    (bench.defaults): for a plain-prompt model, its longest train-split gold solution in the run's tokenizer plus
    EOS, rounded up to `multiple`, at most `at_most`; for a chat-template model, which answers in its own style
    rather than the gold format, `chat`."""
    at_most: int = 512
    multiple: int = 64
    chat: int = 512


@dataclass
class Task:
    """A named task: `examples(split)` for split in ("train", "eval")."""
    name: str
    params: dict = field(default_factory=dict)
    # None: runs keep RunSpec's default budget (64, sized for synth-gsm on the embedded model)
    budget: ClassVar[CompletionBudget | None] = None

    def examples(self, split: str) -> list[Example]:  # pragma: no cover - interface
        raise NotImplementedError

    def training_examples(self, eval_split: str = "eval") -> list[Example]:
        """The train split of a run evaluated on eval_split: all of train for the eval split; for another split (dev,
        which a task may carve from train) train less that split's questions, so that a tuning trial is never
        selected on items it trained on."""
        train = self.examples("train")
        if eval_split == "eval":
            return train
        held_out = {e.question for e in self.examples(eval_split)}
        return [e for e in train if e.question not in held_out]

    def describe(self) -> dict:
        return {"name": self.name, **self.params}
