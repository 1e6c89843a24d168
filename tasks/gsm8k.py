"""`gsm8k`: openai/gsm8k (config `main`) from the hub, or local GSM8K-format jsonl given with `--data PATH`.

PATH is a .jsonl file (its last 10% becomes the eval split) or a directory holding `train.jsonl` and
`test.jsonl`. Every record needs a string `question` and an `answer` whose last line is `#### N`; an optional `id`
(unique in its file) names the item in the per-item eval records (else its index in the eval split does).
The eval split is the whole test set (openai/gsm8k `test`: 1319 problems) unless a run sets `eval_size`.
The dev split (learning-rate tuning, bench.tune) is carved from train: its last `n_dev` records (default 500, at most
a tenth of train), less any whose question is also in the eval split, so dev never overlaps eval. Dev items stay in
the train split: a run evaluated on dev (a tuning trial) trains without them (bench.runner), a run evaluated on eval
trains on all of train.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from bench.errors import BenchError
from tasks import register_task
from tasks.base import CompletionBudget, Example, Task

_FINAL = re.compile(r"####\s*\$?-?[0-9][0-9,]*(\.[0-9]+)?\s*$")


def read_jsonl(path: Path) -> list[Example]:
    """Parse a GSM8K-format jsonl file; any malformed line is an error naming the file and line."""
    out, ids = [], {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: cannot read: {e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}:{lineno}: bad JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise BenchError(f"{path}:{lineno}: expected a JSON object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise BenchError(f"{path}:{lineno}: missing or empty string field {key!r}")
        if not _FINAL.search(record["answer"].strip()):
            raise BenchError(f"{path}:{lineno}: answer does not end with a final number '#### N'")
        item_id = record.get("id")
        if item_id is not None:
            if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
                raise BenchError(f"{path}:{lineno}: 'id' must be a non-empty string or an integer")
            if str(item_id) in ids:
                raise BenchError(f"{path}:{lineno}: duplicate id {item_id!r} (first on line {ids[str(item_id)]})")
            ids[str(item_id)] = lineno
        out.append(Example(question=record["question"], answer=record["answer"],
                           id=None if item_id is None else str(item_id)))
    if not out:
        raise BenchError(f"{path}: no records")
    return out


N_DEV = 500  # binomial standard error of at most 2.2 accuracy points


class GSM8K(Task):
    # GSM8K's gold solutions run to hundreds of tokens (a 1024-token BPE trained on its train split: median 131,
    # longest 517): RunSpec's 64 would cut most of them. 512 (at most, and for chat models) is the budget of the
    # suite's GSM8K preset (qwen3-0.6b-gsm8k).
    budget = CompletionBudget(at_most=512, multiple=64, chat=512)

    def __init__(self, data: str | None = None, n_dev: int = N_DEV):
        if isinstance(n_dev, bool) or not isinstance(n_dev, int) or n_dev < 0:
            raise BenchError(f"gsm8k: bad n_dev {n_dev!r}: a non-negative integer")
        params = {"data": str(data) if data else "openai/gsm8k:main"}
        if n_dev != N_DEV:
            params["n_dev"] = n_dev
        super().__init__("gsm8k", params)
        self.data = Path(data) if data else None
        self.n_dev = n_dev
        self._splits: dict[str, list[Example]] | None = None

    def _load(self) -> dict[str, list[Example]]:
        if self.data is None:
            return self._load_hub()
        if self.data.is_dir():
            files = {"train": self.data / "train.jsonl", "eval": self.data / "test.jsonl"}
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                raise BenchError(f"{self.data}: expected train.jsonl and test.jsonl; missing {', '.join(missing)}")
            return {split: read_jsonl(p) for split, p in files.items()}
        if self.data.is_file():
            rows = read_jsonl(self.data)
            if len(rows) < 2:
                raise BenchError(f"{self.data}: need at least 2 records to split into train and eval")
            cut = len(rows) - max(1, len(rows) // 10)
            return {"train": rows[:cut], "eval": rows[cut:]}
        raise BenchError(f"--data {self.data}: no such file or directory")

    def _load_hub(self) -> dict[str, list[Example]]:
        try:
            import datasets
            ds = datasets.load_dataset("openai/gsm8k", "main")
        except Exception as e:  # offline, no cache, hub error: all are the user's setup, not a bug
            raise BenchError(f"cannot load openai/gsm8k from the hub ({type(e).__name__}); "
                             f"pass --data PATH with local GSM8K jsonl") from None
        return {"train": [Example(r["question"], r["answer"]) for r in ds["train"]],
                "eval": [Example(r["question"], r["answer"]) for r in ds["test"]]}

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "eval", "dev"):
            raise BenchError(f"gsm8k: unknown split {split!r}; valid: train, eval, dev")
        if self._splits is None:
            self._splits = self._load()
            self._splits["dev"] = dev_split(self._splits["train"], self._splits["eval"], self.n_dev)
        return self._splits[split]


def dev_split(train: list[Example], evals: list[Example], n_dev: int) -> list[Example]:
    """The last min(n_dev, len(train) // 10) train records whose question is not in the eval split."""
    n = min(n_dev, len(train) // 10)
    in_eval = {e.question.strip() for e in evals}
    return [e for e in train[len(train) - n:] if e.question.strip() not in in_eval] if n else []


@register_task("gsm8k", "GSM8K: openai/gsm8k (main) from the hub, or local jsonl with --data PATH")
def _make_gsm8k(data: str | None = None, n_dev: int = N_DEV) -> Task:
    return GSM8K(data=data, n_dev=n_dev)
