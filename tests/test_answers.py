"""Answer extraction must agree with lm-eval's own gsm8k filters and exact_match metric."""
import json

import pytest

from tasks.answers import (
    FLEXIBLE_PATTERN,
    STRICT_PATTERN,
    extract_flexible,
    extract_strict,
    is_correct,
    normalize,
    truncate_at_stop,
)

SAMPLES = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72",
    "The answer is 1,234.\n#### 1,234",
    "She earned $10.\n#### $10",
    "#### -5",
    "We get 3.5 apples and then 7 more so 10.5\n#### 10.5.",
    "no number here at all",
    "first #### 12 then #### 13",
    "final 42",
    "costs $1,000.50 in total",
    "The result: -7 and then 8.",
    "1 2 3",
    "####12",
    "#### 5\nQuestion: next #### 9",
    "",
]


def lm_eval_filters():
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter
    strict = RegexFilter(regex_pattern=STRICT_PATTERN)
    flexible = RegexFilter(regex_pattern=FLEXIBLE_PATTERN, group_select=-1)
    return strict, flexible, TakeFirstFilter()


def test_patterns_are_lm_evals_own():
    """Our regexes are the ones in lm-eval's installed gsm8k.yaml (not a copy that could drift)."""
    from pathlib import Path

    import lm_eval
    import yaml
    text = (Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text()
    cfg = yaml.safe_load(text.replace("!function", ""))
    patterns = {f["name"]: f["filter"][0]["regex_pattern"] for f in cfg["filter_list"]}
    assert patterns == {"strict-match": STRICT_PATTERN, "flexible-extract": FLEXIBLE_PATTERN}
    assert cfg["metric_list"][0]["regexes_to_ignore"] == [",", "\\$", "(?s).*#### ", "\\.$"]


@pytest.mark.parametrize("text", SAMPLES)
def test_extraction_matches_lm_eval_filters(text):
    strict, flexible, take_first = lm_eval_filters()
    docs = [{}]
    lm_strict = list(take_first.apply(strict.apply([[text]], docs), docs))[0]
    lm_flex = list(take_first.apply(flexible.apply([[text]], docs), docs))[0]
    assert extract_strict(text) == lm_strict
    assert extract_flexible(text) == lm_flex


@pytest.mark.parametrize("text", SAMPLES)
def test_exact_match_agrees_with_lm_eval_metric(text):
    from lm_eval.api.metrics import exact_match_fn
    gold_answer = "Some reasoning <<1+1=2>>\n#### 1,234"
    for mode, fn in (("strict", extract_strict), ("flexible", extract_flexible)):
        pred = fn(truncate_at_stop(text))
        expected = exact_match_fn(predictions=[pred], references=[gold_answer], ignore_case=True,
                                  regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])["exact_match"]
        assert float(is_correct(text, gold_answer, mode)) == expected


def test_normalize_drops_commas_dollars_and_final_period():
    assert normalize("$1,234.") == "1234"
    assert normalize("Reasoning\n#### 72") == "72"


def test_stop_sequence_cuts_flexible_answer():
    assert extract_flexible(truncate_at_stop("so 5\nQuestion: what is 9")) == "5"


def test_every_real_gsm8k_test_gold_parses(gsm8k_dir):
    """Every gold answer of the real GSM8K test set yields a number under lm-eval's strict filter."""
    strict, _, take_first = lm_eval_filters()
    n = 0
    for line in (gsm8k_dir / "test.jsonl").read_text().splitlines():
        answer = json.loads(line)["answer"]
        ours = extract_strict(answer)
        theirs = list(take_first.apply(strict.apply([[answer]], [{}]), [{}]))[0]
        assert ours == theirs != "[invalid]"
        float(normalize(ours))  # a number once commas and $ are ignored
        assert is_correct(answer, answer, "strict")
        n += 1
    assert n == 1319
