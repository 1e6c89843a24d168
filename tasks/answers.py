"""Answer extraction identical to lm-eval's `gsm8k` task (lm_eval/tasks/gsm8k/gsm8k.yaml, v3.0).

strict-match:     regex `#### (\\-?[0-9\\.\\,]+)`, first match.
flexible-extract: regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match (group_select -1).
exact_match then ignores case, "," and "$", everything up to "#### " and one trailing ".", and compares strings.
Generation stops at "Question:" (the task's `until`), so text after it never counts.
"""
from __future__ import annotations

import re

STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FALLBACK = "[invalid]"
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
_IGNORE = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]
_STRICT = re.compile(STRICT_PATTERN)
_FLEXIBLE = re.compile(FLEXIBLE_PATTERN)


def truncate_at_stop(text: str) -> str:
    """Cut a completion at the first stop sequence, as lm-eval's `until` does."""
    for stop in STOP_SEQUENCES:
        i = text.find(stop)
        if i != -1:
            text = text[:i]
    return text


def _select(matches: list, group_select: int) -> str:
    # RegexFilter.apply: pick the match, then the first non-empty group of a tuple, then strip.
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        match = groups[0] if groups else FALLBACK
    return match.strip()


def extract_strict(text: str) -> str:
    return _select(_STRICT.findall(text), 0)


def extract_flexible(text: str) -> str:
    return _select(_FLEXIBLE.findall(text), -1)


def normalize(answer: str) -> str:
    """exact_match's preprocessing: regexes_to_ignore applied in order, then lower case."""
    for pattern in _IGNORE:
        answer = pattern.sub("", answer)
    return answer.lower()


def gold_answer(solution: str) -> str:
    """The gold answer of a GSM8K `answer` field, normalized as lm-eval normalizes the reference."""
    return normalize(solution)


def extract(text: str, mode: str = "strict") -> str:
    if mode == "strict":
        return extract_strict(text)
    if mode == "flexible":
        return extract_flexible(text)
    raise ValueError(f"unknown extraction mode {mode!r}; valid: strict, flexible")


def is_correct(completion: str, gold: str, mode: str = "strict") -> bool:
    """lm-eval exact_match of one completion against a gold answer (`#### N` text or bare number)."""
    return normalize(extract(truncate_at_stop(completion), mode)) == normalize(gold)
