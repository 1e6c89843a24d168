"""bench.engine: the work it saves must not change what TRL computes.

- trim_padding: TRL's loss and every gradient are the same on a micro-batch with its all-padding columns cut;
- deferred old log-probs: the first optimizer step's micro-batches carry none (TRL then uses the current ones, ratio
  1), the later ones carry the sampling policy's log-probs, checked against an independent full-vocabulary forward;
- kl_step's pre-step distribution read from the training forward's hidden states equals a separate forward.
"""
import copy

import pytest
import torch

from bench.engine import trim_padding
from bench.metrics import RolloutBatch, StepKL, completion_logprobs
from bench.perf import MethodBench, _rows
from bench.spec import RunSpec

SPEC = dict(method="kl_free_lora", rank=4, max_completion_length=48)


@pytest.fixture(scope="module")
def bench_and_batch(tiny):
    spec = RunSpec(**SPEC)
    b = MethodBench("kl_free_lora", spec, "tiny", "cpu", _rows(spec))
    torch.manual_seed(0)
    with torch.no_grad():  # a policy away from its zero-initialized adapter, so that gradients reach lora_A too
        for name, p in b.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return b, b.generation_batch(0)


def _loss_and_grads(b, mb):
    b.policy.zero_grad(set_to_none=True)
    b.trainer.current_gradient_accumulation_steps = 1
    loss = b.trainer.compute_loss(b.policy, mb)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in b.policy.named_parameters() if p.requires_grad}
    b.policy.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _untrimmed(mb, prompt_pad: int, completion_pad: int, pad_id: int):
    """The micro-batch with extra all-padding columns: left of the prompts, right of the completions."""
    out = copy.copy(mb)
    out["prompt_ids"] = torch.nn.functional.pad(mb["prompt_ids"], (prompt_pad, 0), value=pad_id)
    out["prompt_mask"] = torch.nn.functional.pad(mb["prompt_mask"], (prompt_pad, 0), value=0)
    out["completion_ids"] = torch.nn.functional.pad(mb["completion_ids"], (0, completion_pad), value=pad_id)
    out["completion_mask"] = torch.nn.functional.pad(mb["completion_mask"], (0, completion_pad), value=0)
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        if k in mb:
            out[k] = torch.nn.functional.pad(mb[k], (0, completion_pad), value=0.0)
    return out


def test_trim_padding_cuts_only_completion_padding_and_keeps_loss_and_gradients(bench_and_batch):
    b, micro = bench_and_batch
    mb = micro[-1]  # a later step's micro-batch: it carries old log-probs, which must be trimmed alike
    assert "old_per_token_logps" in mb
    padded = _untrimmed(mb, 5, 7, b.tokenizer.pad_token_id)
    trimmed = copy.copy(padded)
    trim_padding(trimmed)
    assert trimmed["prompt_ids"].shape == padded["prompt_ids"].shape  # prompts keep their columns (positions)
    assert trimmed["completion_ids"].shape[1] <= mb["completion_ids"].shape[1]
    assert trimmed["old_per_token_logps"].shape == trimmed["completion_ids"].shape
    assert trimmed["completion_mask"][:, -1].any()  # nothing more to cut
    assert int(trimmed["completion_mask"].sum()) == int(padded["completion_mask"].sum())
    loss_p, grads_p = _loss_and_grads(b, padded)
    loss_t, grads_t = _loss_and_grads(b, trimmed)
    assert torch.allclose(loss_p, loss_t, rtol=1e-5, atol=1e-7)
    nonzero = 0
    for name in grads_p:
        assert torch.allclose(grads_p[name], grads_t[name], rtol=1e-4, atol=1e-8), name
        nonzero += int(grads_p[name].abs().sum() > 0)
    assert nonzero == len(grads_p)


def test_trim_padding_leaves_unknown_tensors_alone():
    mb = {"prompt_ids": torch.tensor([[0, 5]]), "prompt_mask": torch.tensor([[0, 1]]),
          "completion_ids": torch.tensor([[6, 0]]), "completion_mask": torch.tensor([[1, 0]]),
          "pixel_values": torch.zeros(1, 3)}
    trim_padding(mb)
    assert mb["prompt_ids"].shape[1] == 2 and mb["completion_ids"].shape[1] == 2
    del mb["pixel_values"]
    trim_padding(mb)
    assert mb["prompt_ids"].tolist() == [[0, 5]] and mb["completion_ids"].tolist() == [[6]]


def test_old_logprobs_only_where_parameters_will_have_changed(bench_and_batch):
    b, micro = bench_and_batch
    ga = b.spec.grad_accum
    assert len(micro) == 2 * ga
    assert not any("old_per_token_logps" in mb for mb in micro[:ga])  # step 1: TRL uses the current log-probs
    for mb in micro[ga:]:  # step 2: the sampling policy's, computed before step 1 changed the parameters
        full = completion_logprobs(b.policy, mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"],
                                   mb["completion_mask"])
        sampled = full.gather(-1, mb["completion_ids"].unsqueeze(-1)).squeeze(-1)
        mask = mb["completion_mask"].bool()
        assert (mb["old_per_token_logps"] - sampled)[mask].abs().max() < 1e-4


def test_old_logprobs_defer_only_where_trl_would_score_the_batch(bench_and_batch):
    b, _ = bench_and_batch
    t = b.trainer
    assert t._defers_old_logps()  # two optimizer steps per generation batch
    saved = t.args.steps_per_generation
    try:
        t.args.steps_per_generation = t.args.gradient_accumulation_steps  # one step per generation: TRL skips it
        assert not t._defers_old_logps()
    finally:
        t.args.steps_per_generation = saved


def test_step_kl_reads_the_training_forward(bench_and_batch):
    b, micro = bench_and_batch
    mb, t = micro[0], b.trainer
    t._hidden = None
    hook = t._final_hidden_hook(b.policy)
    try:
        t.compute_loss(b.policy, mb)
    finally:
        hook.remove()
    batch = RolloutBatch(mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"], mb["completion_mask"])
    assert (batch.prompt_mask == 0).any()  # left padding present: positions differ from the separate forward
    from_hidden, separate = StepKL(6), StepKL(6)
    assert from_hidden.reads_hidden(b.policy)
    from_hidden.capture_before(b.policy, batch, hidden=t._hidden)
    separate.capture_before(b.policy, batch)
    mask = from_hidden.batch.completion_mask.bool()
    assert (from_hidden.before - separate.before)[mask].abs().max() < 1e-4
    p = from_hidden.before.exp()
    kl = (p * (from_hidden.before - separate.before)).sum(-1)[mask].mean()
    # float32 summation-order noise only: four orders of magnitude below any kl_step the sweeps measure (>= 1e-4);
    # the embedded model built on the 1000-item eval split gives 1.3e-9 here, the previous one less than 1e-9
    assert kl < 1e-8


def test_vllm_backend_is_optional_and_maps_to_trl():
    import importlib.util

    from bench.engine import grpo_config
    from bench.errors import BenchError
    from methods import get_method
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(BenchError, match="vLLM is not installed"):
            RunSpec(**SPEC, generation_backend="vllm")
    with pytest.raises(BenchError, match="valid: fast, transformers, vllm"):
        RunSpec(**SPEC, generation_backend="sglang")
    spec = RunSpec(**SPEC)
    assert grpo_config(spec, get_method("kl_free_lora"), "/tmp/unused", [1.0], chat=False, use_cpu=True).use_vllm \
        is False
    object.__setattr__(spec, "generation_backend", "vllm")  # as if vLLM were installed: only the mapping is tested
    args = grpo_config(spec, get_method("kl_free_lora"), "/tmp/unused", [1.0], chat=False, use_cpu=True)
    assert args.use_vllm and args.vllm_mode == "colocate"


def _two_step_trainer(tmp_path, **kw):
    """The runner's trainer (make_trainer) for one generation batch = two optimizer steps of 2 micro-batches."""
    from datasets import Dataset

    from bench.engine import make_trainer
    from bench.models import load_policy
    from bench.policy import build_policy
    from methods import get_method
    from tasks import get_task, plain_prompt
    spec = RunSpec(**SPEC, steps=2, micro_batch=8, grad_accum=2, checkpoint_every=100, **kw)
    method = get_method(spec.method)
    params = method.resolve_params({})
    model, tokenizer = load_policy("tiny")
    policy = build_policy(model, method, spec.rank, spec.lora_alpha, 0, params)
    rows = [{"prompt": plain_prompt(e.question), "gold": e.gold} for e in get_task("synth-gsm").examples("train")[:8]]
    return make_trainer(spec, method, params, policy, tokenizer, Dataset.from_list(rows), str(tmp_path), chat=False,
                        device="cpu")


def test_trainer_loop_defers_old_logprobs_to_the_second_step(tmp_path, tiny):
    """Through the Trainer's own loop (make_trainer + train): after one generation batch, the first step's
    micro-batches carry no old log-probs and the second step's do."""
    trainer = _two_step_trainer(tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2
    micro = trainer._buffered_inputs
    assert len(micro) == 4
    assert ["old_per_token_logps" in mb for mb in micro] == [False, False, True, True]
    assert all(mb["old_per_token_logps"].shape == mb["completion_ids"].shape for mb in micro[2:])


def test_trainer_loop_reads_kl_step_from_the_training_forward(tmp_path, tiny, monkeypatch):
    """In the Trainer's loop, every step's pre-step distribution comes from the training forward's hidden states
    (no forward of its own), and kl_step is positive. Where the optimizer steps inside the last micro-batch's
    backward (DeepSpeed, --sharding zero2: capture_before_backward, forced on here, where DeepSpeed cannot run), the
    pre-step distribution read ahead of that backward, by a forward of its own as with DeepSpeed's bf16 weights,
    gives the same kl_step (a read after the optimizer step would give ~0)."""
    from transformers import TrainerCallback

    def train(trainer):
        used, after = [], []
        capture = trainer.step_kl.capture_before

        def spy(model, batch, hidden=None):  # records whether the hidden states came along, then does the real work
            used.append(hidden is not None)
            return capture(model, batch, hidden=hidden)
        monkeypatch.setattr(trainer.step_kl, "capture_before", spy)

        class AfterStep(TrainerCallback):  # what the runner's MetricsCallback does after each optimizer step
            def on_step_end(self, args, state, control, model=None, **kw):
                after.append(trainer.step_kl.after_step(model)["kl_step"])
        trainer.add_callback(AfterStep())
        trainer.train()
        return used, after
    regular = _two_step_trainer(tmp_path / "regular", kl_step_seqs=4)
    assert regular.capture_before_backward is False  # no DeepSpeed here
    used, after = train(regular)
    assert used == [True, True]
    assert len(after) == 2 and all(a > 0 for a in after)
    ahead = _two_step_trainer(tmp_path / "ahead", kl_step_seqs=4)  # (after the first has trained: one at a time)
    ahead.capture_before_backward = True
    monkeypatch.setattr(ahead.step_kl, "reads_hidden", lambda model, autocast=False: False)
    used_ahead, after_ahead = train(ahead)
    assert used_ahead == [False, False]
    # the two reads differ by float32 summation order only (test_step_kl_reads_the_training_forward: < 1e-8 in KL)
    assert after_ahead == pytest.approx(after, rel=1e-3)


def test_step_kl_reads_hidden_only_where_it_equals_a_separate_forward(tiny):
    """bf16 weights or autocast (the GPU path) and absolute positions fall back to a separate forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.models import load_policy
    model, _ = load_policy("tiny")
    step_kl = StepKL(4)
    assert step_kl.reads_hidden(model)
    assert not step_kl.reads_hidden(model, autocast=True)
    assert not step_kl.reads_hidden(model.to(torch.bfloat16))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert not step_kl.reads_hidden(gpt2.eval())


def test_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path):
    from bench.runner import _latest_checkpoint
    for step, complete in ((10, True), (20, False)):
        ckpt = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
    assert _latest_checkpoint(tmp_path).name == "checkpoint-10"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_per_token_loss_hook_is_aggregated_as_trl_aggregates_its_policy_term(bench_and_batch, loss_type):
    """A hook returning minus TRL's own per-token policy loss cancels TRL's loss and every gradient exactly: the
    hook's term is normalized as TRL 1.16 normalizes that loss type (a different rule would leave a residue)."""
    from bench.engine import install_loss_hook
    b, micro = bench_and_batch
    t = b.trainer
    mb = dict(micro[-1])
    g = torch.Generator().manual_seed(0)
    mb["old_per_token_logps"] = mb["old_per_token_logps"] + 0.3 * torch.randn(mb["old_per_token_logps"].shape,
                                                                              generator=g)  # clipping is live
    mb["advantages"] = torch.randn(mb["advantages"].shape, generator=g)

    def minus_trl(trainer, terms):
        rho = torch.exp(terms.logps - terms.old_logps)
        clipped = torch.clamp(rho, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
        return torch.minimum(rho * terms.advantages, clipped * terms.advantages)
    saved = t.loss_type
    try:
        t.loss_type = loss_type
        loss, grads = _loss_and_grads(b, mb)
        install_loss_hook(t, minus_trl)
        cancelled, residue = _loss_and_grads(b, mb)
    finally:
        t.loss_type, t.loss_hook = saved, None
    assert abs(float(loss)) > 1e-4 and abs(float(cancelled)) < 1e-6 * max(1.0, abs(float(loss)))
    for name, g0 in grads.items():
        assert residue[name].norm() <= 1e-5 * g0.norm() + 1e-12, name
    assert sum(float(g0.norm()) for g0 in grads.values()) > 0


def test_per_token_loss_hook_is_one_per_trainer(bench_and_batch):
    from bench.engine import install_loss_hook
    from bench.errors import BenchError
    b, _ = bench_and_batch
    try:
        install_loss_hook(b.trainer, lambda trainer, terms: None)
        with pytest.raises(BenchError, match="two per-token loss hooks"):
            install_loss_hook(b.trainer, lambda trainer, terms: None)
    finally:
        b.trainer.loss_hook = None

