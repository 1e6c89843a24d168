"""`synth-gsm`: an offline generator of GSM8K-format word problems.

Each problem is a chain of 1..3 arithmetic steps (+, -, x, exact /) on one quantity, told with varied names,
objects, units and sentence templates. Solutions are written like GSM8K's: one line per step with a
`<<a+b=c>>` calculator annotation, then `#### N`. Everything is a pure function of the parameters and the
seed; the train, dev and eval splits are disjoint by question text. The eval split (1000 problems by default: a
binomial standard error of at most 1.6 accuracy points) is drawn first, so a smaller `n_eval` gives a prefix of it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from bench.errors import BenchError
from tasks import register_task
from tasks.base import Example, Task

NAMES = [("Alice", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"), ("Emma", "she"), ("Farid", "he"),
         ("Grace", "she"), ("Hugo", "he"), ("Ines", "she"), ("Jamal", "he"), ("Kira", "she"), ("Liam", "he"),
         ("Maya", "she"), ("Noah", "he"), ("Olga", "she"), ("Pablo", "he"), ("Rosa", "she"), ("Sam", "he"),
         ("Tina", "she"), ("Omar", "he"), ("Uma", "she"), ("Victor", "he"), ("Wendy", "she"), ("Yusuf", "he")]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "shells", "flowers", "beads",
         "eggs", "oranges", "candies", "stamps", "balloons", "cupcakes", "toy cars", "crayons", "buttons", "rocks"]
CONTAINERS = ["bags", "boxes", "baskets", "jars", "piles"]

# Sentence templates per step kind. {n}=name, {p}=pronoun, {b}=operand, {x}=noun phrase for b units.
COUNT = {
    "intro": ["{n} has {a} {items}.", "{n} starts with {a} {items}.", "{n} collected {a} {items}.",
              "There are {a} {items} in {n}'s bag."],
    "+": ["{P} buys {b} more {items}.", "{P} finds {b} more {items}.", "A friend gives {n} {b} more {items}.",
          "Then {p} gets {b} more {items}."],
    "-": ["{P} gives {b} {items} to a friend.", "{P} loses {b} of the {items}.", "{P} sells {b} {items}.",
          "Then {p} gives away {b} {items}."],
    "*": ["Then {n} gets {b} times as many {items} as {p} had.", "{P} trades them for {b} times as many {items}."],
    "/": ["{P} puts the {items} equally into {b} {containers} and keeps one of them.",
          "{P} shares the {items} equally among {b} friends, keeping one share."],
    "line": {"+": "{n} has {v}+{b} = <<{v}+{b}={r}>>{r} {items}.",
             "-": "{n} has {v}-{b} = <<{v}-{b}={r}>>{r} {items} left.",
             "*": "{n} has {v}*{b} = <<{v}*{b}={r}>>{r} {items}.",
             "/": "{n} keeps {v}/{b} = <<{v}/{b}={r}>>{r} {items}."},
    "question": ["How many {items} does {n} have now?", "How many {items} does {n} end up with?"],
}
MONEY = {
    "intro": ["{n} has ${a}.", "{n} saved ${a}.", "{n} starts the week with ${a}."],
    "+": ["{P} earns ${b} more.", "{P} gets ${b} from a neighbor.", "Then {p} receives ${b} more."],
    "-": ["{P} spends ${b} on a book.", "{P} pays ${b} for lunch.", "Then {p} spends ${b} on a gift."],
    "*": ["Then {p} has {b} times as much money as before.", "{P} invests it and ends up with {b} times as much."],
    "/": ["{P} splits the money equally among {b} jars and keeps one jar.",
          "{P} shares the money equally with {b} people in all, keeping one share."],
    "line": {"+": "{n} has {v}+{b} = $<<{v}+{b}={r}>>{r}.",
             "-": "{n} has {v}-{b} = $<<{v}-{b}={r}>>{r} left.",
             "*": "{n} has {v}*{b} = $<<{v}*{b}={r}>>{r}.",
             "/": "{n} keeps {v}/{b} = $<<{v}/{b}={r}>>{r}."},
    "question": ["How much money does {n} have now?", "How many dollars does {n} have left?"],
}
SPLIT_OFFSETS = {"eval": 1, "dev": 2, "train": 3}  # generation order: eval first, so train avoids eval questions


@dataclass(frozen=True)
class Difficulty:
    min_steps: int = 1
    max_steps: int = 2
    max_number: int = 20   # starting amounts and +/- operands are drawn from 1..max_number
    max_factor: int = 3    # x and / operands are drawn from 2..max_factor
    ops: str = "+-*/"

    def check(self):
        if not 1 <= self.min_steps <= self.max_steps <= 3:
            raise BenchError(f"synth-gsm: steps must satisfy 1 <= min_steps <= max_steps <= 3, got "
                             f"{self.min_steps}..{self.max_steps}")
        if self.max_number < 2 or self.max_factor < 2:
            raise BenchError("synth-gsm: max_number and max_factor must be >= 2")
        if not self.ops or set(self.ops) - set("+-*/"):
            raise BenchError(f"synth-gsm: ops must be a non-empty subset of '+-*/', got {self.ops!r}")


def _step_op(rng: random.Random, value: int, d: Difficulty) -> tuple[str, int] | None:
    choices = list(d.ops)
    rng.shuffle(choices)
    for op in choices:
        if op == "+":
            return op, rng.randint(1, d.max_number)
        if op == "-" and value >= 2:
            return op, rng.randint(1, value - 1)
        if op == "*" and value * 2 <= d.max_number * d.max_factor:
            return op, rng.randint(2, min(d.max_factor, max(2, d.max_number * d.max_factor // value)))
        if op == "/":
            divisors = [k for k in range(2, d.max_factor + 1) if value % k == 0 and value // k >= 1]
            if divisors:
                return op, rng.choice(divisors)
    return None


def _apply(op: str, v: int, b: int) -> int:
    return {"+": v + b, "-": v - b, "*": v * b, "/": v // b}[op]


def make_problem(rng: random.Random, d: Difficulty) -> Example:
    name, pronoun = rng.choice(NAMES)
    money = rng.random() < 0.25
    t = MONEY if money else COUNT
    fields = {"n": name, "p": pronoun, "P": pronoun.capitalize(), "items": rng.choice(ITEMS),
              "containers": rng.choice(CONTAINERS)}
    value = rng.randint(2, d.max_number)
    sentences = [rng.choice(t["intro"]).format(a=value, **fields)]
    lines = []
    n_steps = rng.randint(d.min_steps, d.max_steps)
    while len(lines) < n_steps:
        step = _step_op(rng, value, d)
        if step is None:  # no op applies to this value (e.g. ops="/" and a prime); restart the chain
            return make_problem(rng, d)
        op, b = step
        result = _apply(op, value, b)
        sentences.append(rng.choice(t[op]).format(b=b, **fields))
        lines.append(t["line"][op].format(v=value, b=b, r=result, **fields))
        value = result
    sentences.append(rng.choice(t["question"]).format(**fields))
    return Example(question=" ".join(sentences), answer="\n".join(lines + [f"#### {value}"]))


class SynthGSM(Task):
    def __init__(self, seed: int = 0, n_train: int = 20000, n_eval: int = 1000, n_dev: int = 200, **difficulty):
        unknown = set(difficulty) - set(Difficulty.__dataclass_fields__)
        if unknown:
            raise BenchError(f"synth-gsm: unknown parameter(s) {sorted(unknown)}; valid: seed, n_train, n_eval, "
                             f"n_dev, {', '.join(Difficulty.__dataclass_fields__)}")
        self.difficulty = Difficulty(**difficulty)
        self.difficulty.check()
        self.sizes = {"train": int(n_train), "eval": int(n_eval), "dev": int(n_dev)}
        super().__init__("synth-gsm", {"seed": int(seed), **self.sizes, **self.difficulty.__dict__})
        self.seed = int(seed)
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        if split not in SPLIT_OFFSETS:
            raise BenchError(f"synth-gsm: unknown split {split!r}; valid: {', '.join(SPLIT_OFFSETS)}")
        if not self._cache:
            seen: set[str] = set()
            for name in sorted(SPLIT_OFFSETS, key=SPLIT_OFFSETS.get):
                rng = random.Random(f"synth-gsm/{self.seed}/{name}")
                out, tries = [], 0
                while len(out) < self.sizes[name]:
                    ex = make_problem(rng, self.difficulty)
                    tries += 1
                    if ex.question not in seen:
                        seen.add(ex.question)
                        out.append(ex)
                    elif tries > 50 * self.sizes[name] + 1000:
                        raise BenchError(f"synth-gsm: cannot draw {self.sizes[name]} distinct {name} problems at "
                                         f"this difficulty; raise max_number or steps")
                self._cache[name] = out
        return self._cache[split]


@register_task("synth-gsm", "offline GSM8K-format word problems (1-3 steps of + - x /), deterministic per seed")
def _make_synth_gsm(**params) -> Task:
    return SynthGSM(**params)
