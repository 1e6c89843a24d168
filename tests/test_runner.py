"""End-to-end runs on the embedded tiny model with a tiny budget: names, statuses, determinism, resume."""
import json
import shutil

import pytest
import torch

from bench.io import read_json, read_jsonl
from bench.runner import run_one
from bench.spec import RunSpec
from methods import METHODS, Method

SMALL = dict(steps=2, eval_size=12, probe_size=6, probe_every=1, kl_step_seqs=4, checkpoint_every=2,
             max_completion_length=48)
TIMING = ("step_seconds", "time_generation", "time_reference", "time_policy", "time_other", "time_metrics")


def _run(tmp_path, tiny, name="run", **kw):
    spec = RunSpec(**{"method": "kl_free_lora", "rank": 4, **SMALL, **kw})
    return spec, run_one(spec, tmp_path / name, progress=False)


def _rows(tmp_path, name="run"):
    return read_jsonl(tmp_path / name / "metrics.jsonl")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, tiny):
    """The default small run (kl_free_lora, 2 steps), run once for the tests that only read it: (folder, summary);
    its run directory is folder / "run"."""
    folder = tmp_path_factory.mktemp("two_steps")
    return folder, _run(folder, tiny)[1]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, tiny):
    """The same run with 1 step: (folder, summary); tests that change its run directory copy it first."""
    folder = tmp_path_factory.mktemp("one_step")
    return folder, _run(folder, tiny, steps=1)[1]


def _copy(run, tmp_path):
    """A test's own copy of a module fixture's run directory, at tmp_path / "run"."""
    shutil.copytree(run[0] / "run", tmp_path / "run")
    return run[1]


def test_kl_free_run_writes_all_metrics(two_steps):
    tmp_path, s = two_steps
    assert s["status"] == "ok", s.get("error")
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert abs(rows[0]["kl_ref"]) < 1e-6  # before any update, pi_theta == pi_0
    assert rows[-1]["kl_ref"] > 0 and rows[1]["kl_step"] > 0
    for r in rows[1:]:
        for key in ("kl_step", "entropy", "loss", "grad_norm", "tokens") + TIMING:
            assert key in r, key
        assert r["time_reference"] == 0.0  # beta = 0: no reference forward at all
        assert "kl_trl" not in r
        parts = r["time_generation"] + r["time_reference"] + r["time_policy"] + r["time_other"]
        assert parts == pytest.approx(r["step_seconds"])
    for key in ("accuracy_base", "accuracy", "accuracy_gain", "kl_ref", "kl_step", "entropy", "reward",
                "wall_clock_s", "trainable_params", "peak_mem_mb", "tokens_per_s"):
        assert s[key] is not None, key
    assert s["accuracy_gain"] == pytest.approx(s["accuracy"] - s["accuracy_base"])
    cfg = read_json(tmp_path / "run" / "config.json")
    assert cfg["versions"]["trl"] == "1.16.0" and cfg["git_sha"] and cfg["spec"]["rank"] == 4
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainable_params_equal_lora_count(tiny, one_step):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny)
    expected = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1].endswith("proj"))
    assert one_step[1]["trainable_params"] == expected


def test_kl_grpo_runs_reference_forwards_and_logs_trl_kl(tmp_path, tiny):
    _, s = _run(tmp_path, tiny, method="kl_grpo")
    assert s["status"] == "ok", s.get("error")
    rows = _rows(tmp_path)
    assert sum(r["time_reference"] for r in rows[1:]) > 0
    assert all("kl_trl" in r for r in rows[1:])
    assert abs(rows[1]["kl_trl"]) < 1e-6  # first step: nothing updated yet, TRL's reference == the policy
    assert rows[2]["kl_trl"] > 0
    assert abs(rows[0]["kl_ref"]) < 1e-6 and rows[-1]["kl_ref"] > 0


def test_same_seed_same_metrics(tmp_path, tiny, two_steps):
    a = _rows(two_steps[0])  # the same spec, run earlier in this process
    _run(tmp_path, tiny, name="b")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(a) == strip(_rows(tmp_path, "b"))
    _run(tmp_path, tiny, name="c", seed=1)
    assert strip(_rows(tmp_path, "c")) != strip(a)


def test_finished_run_is_skipped(tmp_path, tiny, one_step):
    first = _copy(one_step, tmp_path)
    _, again = _run(tmp_path, tiny, steps=1)
    assert again == first  # read back, not re-run


def test_changed_configuration_in_same_directory_is_refused(tmp_path, tiny, one_step):
    from bench.errors import BenchError
    _copy(one_step, tmp_path)
    with pytest.raises(BenchError, match="different configuration"):
        _run(tmp_path, tiny, steps=2)


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_checkpoint(tmp_path, tiny, monkeypatch):
    from bench import runner
    original = runner.MetricsCallback.on_log

    def crash_after_step_3(self, args, state, control, logs=None, **kw):
        original(self, args, state, control, logs=logs, **kw)
        if state.global_step == 3 and logs and "loss" in logs:
            raise _Interrupt()

    monkeypatch.setattr(runner.MetricsCallback, "on_log", crash_after_step_3)
    _, s = _run(tmp_path, tiny, name="cut", steps=4)
    assert s["status"] == "failed" and (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(runner.MetricsCallback, "on_log", original)
    _, s = _run(tmp_path, tiny, name="cut", steps=4)
    assert s["status"] == "ok" and s["resumed_from"] == "checkpoint-2"
    assert [r["step"] for r in _rows(tmp_path, "cut")] == [0, 1, 2, 3, 4]
    _, whole = _run(tmp_path, tiny, name="whole", steps=4)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path, "cut")) == strip(_rows(tmp_path, "whole"))
    assert s["accuracy"] == whole["accuracy"]


def test_nan_gradients_are_recorded_as_diverged(tmp_path, tiny):
    def poison(trainer, params):
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: g * float("nan"))

    METHODS["nan_test"] = Method(name="nan_test", summary="test only", trainer_hooks=(poison,))
    try:
        _, s = _run(tmp_path, tiny, method="nan_test")
    finally:
        del METHODS["nan_test"]
    assert s["status"] == "diverged" and "not finite" in s["error"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def test_forward_threads_use_free_cores_only_where_forwards_are_thread_invariant(tmp_path, tiny, monkeypatch):
    from bench import parallel
    from bench.models import load_policy
    from tasks import get_task, plain_prompt
    spec = RunSpec(method="kl_free_lora", rank=4, **SMALL)
    model, tok = load_policy("tiny")
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:16]]
    # this model's forwards give the same floats at 1 and 2 threads (greedy tokens, logits, TRL's fused head with
    # its one-thread backward); a LoRA policy as in a run
    policy = runner_policy(model)
    assert parallel.forward_is_thread_invariant(policy, tok, prompts, 2)
    # the check is not vacuous: gradients on two threads (the backward included) differ from one thread's
    assert not _two_thread_backward_is_invariant(policy, tok, prompts)
    try:
        parallel.set_forward_cores(2)
        assert parallel.forward_threads(spec, model, tok, prompts) == 2
        parallel.set_forward_cores(1)  # a parallel worker's share
        assert parallel.forward_threads(spec, model, tok, prompts) == 1
        parallel.set_forward_cores(2)
        monkeypatch.setattr(parallel, "_INVARIANT", {})  # a fresh process
        monkeypatch.setattr(parallel, "forward_is_thread_invariant", lambda *a: False)  # a CPU where they differ
        assert parallel.forward_threads(spec, model, tok, prompts) == 1
        monkeypatch.setenv("BENCH_NUM_THREADS", "2")  # pinned by the user: every pass, no split
        assert parallel.forward_threads(spec, model, tok, prompts) is None
        monkeypatch.setenv("BENCH_FORWARD_THREADS", "3")  # or the forwards' own count, unchecked
        assert parallel.forward_threads(spec, model, tok, prompts) == 3
    finally:
        parallel.set_forward_cores(None)


def test_decoding_keeps_one_thread_where_forwards_were_split(monkeypatch):
    """Token-by-token decoding (rollouts, evals, probe sampling) on one thread wherever forward_threads chose
    several (their floats were checked equal), on the pinned count where the user pinned it."""
    from bench import parallel
    monkeypatch.delenv("BENCH_FORWARD_THREADS", raising=False)
    assert [parallel.decode_threads(n) for n in (None, 1, 2, 4)] == [None, 1, 1, 1]
    monkeypatch.setenv("BENCH_FORWARD_THREADS", "2")
    assert parallel.decode_threads(2) == 2


def test_thread_invariance_is_checked_once_per_model_structure(tiny, monkeypatch):
    """forward_threads checks each model structure once per process: a policy of another seed (other values, same
    shapes) reuses the answer, a policy of another rank (other shapes) is checked again."""
    import copy

    from bench import parallel
    from bench.models import load_policy
    from bench.policy import build_policy
    from methods import get_method
    from tasks import get_task, plain_prompt
    model, tok = load_policy("tiny")
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:8]]
    method = get_method("kl_free_lora")
    policies = {(rank, seed): build_policy(copy.deepcopy(model), method, rank, rank, seed, method.resolve_params({}))
                for rank, seed in ((4, 0), (4, 1), (8, 0))}
    a, b = (dict(policies[4, s].named_parameters()) for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the seeds differ in value
    assert parallel.model_structure(policies[4, 0]) == parallel.model_structure(policies[4, 1])
    assert parallel.model_structure(policies[4, 0]) != parallel.model_structure(policies[8, 0])
    checked = []
    real = parallel.forward_is_thread_invariant

    def counted(policy, *args):
        checked.append(policy)
        return real(policy, *args)
    monkeypatch.setattr(parallel, "_INVARIANT", {})
    monkeypatch.setattr(parallel, "forward_is_thread_invariant", counted)
    try:
        parallel.set_forward_cores(2)
        for key in ((4, 0), (4, 1), (8, 0), (4, 0)):
            spec = RunSpec(method="kl_free_lora", rank=key[0], seed=key[1], **SMALL)
            assert parallel.forward_threads(spec, policies[key], tok, prompts) == 2
    finally:
        parallel.set_forward_cores(None)
    assert checked == [policies[4, 0], policies[8, 0]]


def runner_policy(model):
    from bench.policy import build_policy
    from methods import get_method
    method = get_method("kl_free_lora")
    policy = build_policy(model, method, 16, 16, 0, method.resolve_params({}), 0.0)
    with torch.no_grad():  # a trained adapter: B != 0, so every LoRA gradient is nonzero
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return policy



def _two_thread_backward_is_invariant(policy, tok, prompts):
    """LoRA gradients of one micro-batch, forward and backward both on 1 thread vs both on 2: equal?"""
    from bench.threads import torch_threads
    ids = tok(prompts[:16], return_tensors="pt", padding=True)
    trainable = [p for p in policy.parameters() if p.requires_grad]

    def grads(n):
        with torch_threads(n):
            logits = policy(**ids).logits
            return torch.autograd.grad(torch.log_softmax(logits, -1)[..., 7].sum(), trainable)
    return all(torch.equal(a, b) for a, b in zip(grads(1), grads(2)))


@pytest.mark.slow
def test_runs_write_per_item_eval_records_also_from_the_memo(tmp_path, tiny, monkeypatch):
    from bench import runner
    from bench.evaluate import RECORD_KEYS, eval_records
    monkeypatch.setattr(runner, "eval_memo_dir", lambda: tmp_path / "memo")
    _, first = _run(tmp_path, tiny, name="a")
    _, second = _run(tmp_path, tiny, name="b", method="kl_grpo", seed=1)  # same initial weights: a memo hit
    assert first["status"] == second["status"] == "ok"
    assert first["accuracy_base_memoized"] is False and second["accuracy_base_memoized"] is True
    for name, s in (("a", first), ("b", second)):
        for phase, key in (("base", "accuracy_base"), ("final", "accuracy")):
            rows = eval_records(tmp_path / name, phase)
            assert len(rows) == s["eval_n"] == 12 and all(tuple(sorted(r)) == tuple(sorted(RECORD_KEYS)) for r in rows)
            assert [r["id"] for r in rows] == [str(i) for i in range(12)]  # eval-split indices: paired across runs
            assert sum(r["correct_strict"] for r in rows) / 12 == pytest.approx(s[key])
            assert sum(r["correct_flexible"] for r in rows) / 12 == pytest.approx(s[key.replace("accuracy",
                                                                                              "accuracy_flexible")])
            assert all(0 < r["completion_tokens"] <= SMALL["max_completion_length"] for r in rows)
            assert all(r["completion_tokens"] == SMALL["max_completion_length"] for r in rows if r["truncated"])
    assert eval_records(tmp_path / "a", "base") == eval_records(tmp_path / "b", "base")


@pytest.mark.slow
def test_a_run_directory_without_eval_records_still_works(tmp_path, tiny, one_step):
    from bench.errors import BenchError
    from bench.evaluate import eval_records, evaluate_run
    s = _copy(one_step, tmp_path)
    for phase in ("base", "final"):  # as written before the records existed
        (tmp_path / "run" / f"eval_{phase}.jsonl").unlink()
        assert eval_records(tmp_path / "run", phase) is None
    assert run_one(RunSpec(**{"method": "kl_free_lora", "rank": 4, **SMALL, "steps": 1}), tmp_path / "run",
                   progress=False) == s  # a finished run is skipped, records or not
    assert evaluate_run(tmp_path / "run", limit=4)["n"] == 4  # bench eval
    (tmp_path / "run" / "eval_final.jsonl").write_text('{"id": "0"}\n')
    with pytest.raises(BenchError, match="record 1 does not have exactly the keys"):
        eval_records(tmp_path / "run", "final")
