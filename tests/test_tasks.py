import json
import re

import pytest

from bench.errors import BenchError
from tasks import RewardConfig, get_task
from tasks.answers import extract_strict
from tasks.gsm8k import read_jsonl

ANNOTATION = re.compile(r"<<(\d+)([+\-*/])(\d+)=(\d+)>>(\d+)")


def test_unknown_task_lists_valid_ones():
    with pytest.raises(BenchError, match="unknown task 'nope'; valid: gsm8k, synth-gsm"):
        get_task("nope")


def test_synth_gsm_is_deterministic_per_seed():
    a, b = get_task("synth-gsm", seed=3, n_train=200), get_task("synth-gsm", seed=3, n_train=200)
    assert a.examples("train") == b.examples("train") and a.examples("eval") == b.examples("eval")
    c = get_task("synth-gsm", seed=4, n_train=200)
    assert c.examples("train") != a.examples("train")


def test_synth_gsm_splits_are_disjoint_by_question():
    t = get_task("synth-gsm", n_train=5000)
    train = {e.question for e in t.examples("train")}
    evals = {e.question for e in t.examples("eval")}
    dev = {e.question for e in t.examples("dev")}
    assert len(train) == 5000 and len(evals) == 1000 and len(dev) == 200
    assert not train & evals and not train & dev and not evals & dev


def test_synth_gsm_default_splits_are_disjoint_and_the_eval_split_has_1000_items():
    t = get_task("synth-gsm")  # the defaults every run uses
    train, dev = [e.question for e in t.examples("train")], [e.question for e in t.examples("dev")]
    evals = [e.question for e in t.examples("eval")]
    assert (len(train), len(dev), len(evals)) == (20000, 200, 1000)
    assert len(set(train)) == 20000 and len(set(dev)) == 200 and len(set(evals)) == 1000
    assert not set(train) & set(evals) and not set(train) & set(dev) and not set(dev) & set(evals)
    # a smaller eval split is a prefix of it: item ids (eval-split indices) name the same problems
    assert [e.question for e in get_task("synth-gsm", n_eval=300).examples("eval")] == evals[:300]


def test_gsm8k_eval_split_is_the_whole_test_set(gsm8k_dir):
    t = get_task("gsm8k", data=str(gsm8k_dir))
    lines = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines() if line.strip()]
    assert len(lines) == 1319 and [e.question for e in t.examples("eval")] == [r["question"] for r in lines]
    assert all(e.id is None for e in t.examples("eval"))  # GSM8K has no ids: eval records use the index


def test_gsm8k_jsonl_ids_are_kept_and_must_be_unique(tmp_path):
    rows = [{"question": "q1", "answer": "#### 1", "id": "a"}, {"question": "q2", "answer": "#### 2", "id": 7},
            {"question": "q3", "answer": "#### 3"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.id for e in read_jsonl(path)] == ["a", "7", None]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[0], "question": "q4"}]))
    with pytest.raises(BenchError, match=r"d.jsonl:4: duplicate id 'a' \(first on line 1\)"):
        read_jsonl(path)
    path.write_text(json.dumps({**rows[0], "id": ["x"]}) + "\n")
    with pytest.raises(BenchError, match="d.jsonl:1: 'id' must be a non-empty string or an integer"):
        read_jsonl(path)


@pytest.mark.parametrize("params", [{}, {"min_steps": 3, "max_steps": 3, "max_number": 50, "max_factor": 9},
                                    {"ops": "*/", "max_steps": 3}, {"ops": "+", "min_steps": 2}])
def test_synth_gsm_solutions_are_correct_gsm8k_format(params):
    t = get_task("synth-gsm", n_train=500, **params)
    ops_seen = set()
    for ex in t.examples("train"):
        lines = ex.answer.split("\n")
        assert lines[-1].startswith("#### ")
        steps = lines[:-1]
        lo, hi = params.get("min_steps", 1), params.get("max_steps", 2)
        assert lo <= len(steps) <= hi
        value = None
        for line in steps:
            (a, op, b, c, shown), = ANNOTATION.findall(line)
            a, b, c = int(a), int(b), int(c)
            exact = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
            assert exact == c and shown == str(c)  # exact division only
            if value is not None:
                assert a == value  # each step continues from the previous result
            value = c
            ops_seen.add(op)
        assert extract_strict(ex.answer) == str(value) == ex.gold
        assert set(ops_seen) <= set(params.get("ops", "+-*/"))
    assert ops_seen == set(params.get("ops", "+-*/"))


def test_synth_gsm_varies_names_items_and_templates():
    qs = [e.question for e in get_task("synth-gsm", n_train=500).examples("train")]
    assert len({q.split()[0] for q in qs}) > 15
    assert sum("$" in q for q in qs) > 50 and sum("$" not in q for q in qs) > 200


@pytest.mark.parametrize("params,message", [({"max_steps": 4}, "steps"), ({"ops": "+^"}, "ops"),
                                            ({"hardness": 3}, "unknown parameter")])
def test_synth_gsm_bad_parameters(params, message):
    with pytest.raises(BenchError, match=message):
        get_task("synth-gsm", **params)


def test_rewards_correct_and_format():
    funcs, weights = RewardConfig(correct=1.0, format=0.5).funcs_and_weights()
    correct, fmt = funcs
    completions = [" x = 3\n#### 7", " the answer is 7", [{"role": "assistant", "content": "#### 8"}]]
    gold = ["7", "7", "7"]
    assert correct(completions=completions, gold=gold) == [1.0, 0.0, 0.0]
    assert fmt(completions=completions) == [1.0, 0.0, 1.0]
    assert weights == [1.0, 0.5]
    assert RewardConfig(extraction="flexible").funcs_and_weights()[0][0](completions=completions[1:2],
                                                                         gold=["7"]) == [1.0]


def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("line,message", [
    ("{not json", "data.jsonl:2: bad JSON"),
    (json.dumps({"question": "q"}), "data.jsonl:2: missing or empty string field 'answer'"),
    (json.dumps({"question": "q", "answer": "it is 5"}), "data.jsonl:2: answer does not end with a final number"),
    (json.dumps([1, 2]), "data.jsonl:2: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "How many?", "answer": "2+2=<<2+2=4>>4\n#### 4"})
    path = _write(tmp_path, [good, line])
    with pytest.raises(BenchError, match=re.escape(message)):
        read_jsonl(path)


def test_local_jsonl_file_splits_train_and_eval(tmp_path):
    rows = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(20)]
    t = get_task("gsm8k", data=str(_write(tmp_path, rows)))
    assert len(t.examples("train")) == 18 and [e.gold for e in t.examples("eval")] == ["18", "19"]


def test_real_gsm8k_directory(gsm8k_dir):
    t = get_task("gsm8k", data=str(gsm8k_dir))
    assert len(t.examples("train")) == 7473 and len(t.examples("eval")) == 1319
    assert t.examples("train")[0].gold == "72"


def test_missing_data_path_is_an_error(tmp_path):
    with pytest.raises(BenchError, match="no such file or directory"):
        get_task("gsm8k", data=str(tmp_path / "nope.jsonl")).examples("train")


def test_hub_gsm8k_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BenchError, match="cannot load openai/gsm8k from the hub"):
        get_task("gsm8k").examples("eval")
