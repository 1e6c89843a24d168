"""The field's stabilizers (methods/loss_variants.py, entropy.py, covariance.py) against their papers' formulas.

For every method: its trainer's loss and gradients on a fixed micro-batch equal a plain-torch computation of the
paper's objective from an independent forward pass (full-vocabulary log-softmax, autograd), with the method's
mechanism active: old log-probs are set so that the ratios rho = exp(delta) fall on both sides of every clip range
(clipped tokens, a clip-higher token, a CISPO-clipped weight, clipped and unclipped GSPO sequences), DAPO's micro-batch
holds truncated completions, and the covariance selections are non-empty.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.errors import BenchError
from bench.metrics import completion_mask
from bench.spec import RunSpec

L_MAX = 16        # every completion of the tiny model is cut here
L_MIXED = 44      # some completions end, some are cut (DAPO's overlong filter and punishment act)
SPEC = dict(rank=4, max_completion_length=L_MAX, micro_batch=8, grad_accum=2, num_generations=8)
ADVANTAGES = torch.tensor([1.5, -1.0, 0.7, -0.3, 2.0, -1.8, 0.2, -0.6])
# log-ratios log rho = delta, away from every clip boundary (log 0.8, log 1.2, log 1.28, log 5) by > 0.02:
# rho = 0.37, 0.61, 0.74, 0.90, 1, 1.11, 1.23 (inside DAPO's 1.28, outside 1.2), 1.65, 7.39 (> CISPO's 5)
DELTAS = torch.tensor([-1.0, -0.5, -0.3, -0.1, 0.0, 0.1, 0.21, 0.5, 2.0])


# ---- fixtures: one method's trainer, a generation batch, a fixed micro-batch ---------------------------------------

def _bench(method: str, max_completion_length: int = L_MAX, **method_params):
    from bench.perf import MethodBench, _rows
    spec = RunSpec(method=method, method_params=method_params,
                   **{**SPEC, "max_completion_length": max_completion_length})
    b = MethodBench(method, spec, "tiny", "cpu", _rows(spec))
    torch.manual_seed(0)
    with torch.no_grad():  # away from the zero-initialized adapter, so that gradients reach lora_A too
        for name, p in b.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return b


def _train_trainer(tmp_path, method: str):
    """The runner's trainer (make_trainer) for one generation batch = two optimizer steps of 2 micro-batches."""
    from datasets import Dataset

    from bench.engine import make_trainer
    from bench.models import load_policy
    from bench.policy import build_policy
    from methods import get_method
    from tasks import get_task, plain_prompt
    spec = RunSpec(method=method, rank=4, max_completion_length=32, steps=2, micro_batch=8, grad_accum=2,
                   checkpoint_every=100)
    m = get_method(spec.method)
    params = m.resolve_params({})
    model, tokenizer = load_policy("tiny")
    policy = build_policy(model, m, spec.rank, spec.lora_alpha, 0, params)
    rows = [{"prompt": plain_prompt(e.question), "gold": e.gold} for e in get_task("synth-gsm").examples("train")[:8]]
    return make_trainer(spec, m, params, policy, tokenizer, Dataset.from_list(rows), str(tmp_path), chat=False,
                        device="cpu")


def _forward(model, mb, mask):
    """Independent forward: per-token log-probs and entropies of the completion tokens, with gradient."""
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
    attention = torch.cat([mb["prompt_mask"], mask], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, mb["prompt_ids"].shape[1] - 1:-1].float()
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, mb["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1)


def _fixed(b, mb, mask=None, off_policy_everywhere=False):
    """The micro-batch with fixed advantages and old log-probs log pi_theta - delta (so rho = exp(delta));
    sequence 0 has rho = 1 on every token, unless off_policy_everywhere (then no delta is 0: |log rho| has no kink
    at a selected token, where float noise between two forwards would pick a side). Returns (inputs, delta)."""
    mask = mb["completion_mask"] if mask is None else mask
    with torch.no_grad():
        lp, _ = _forward(b.policy, mb, mask)
    B, T = lp.shape
    delta = DELTAS[(torch.arange(B)[:, None] + torch.arange(T)[None, :]) % len(DELTAS)]
    if off_policy_everywhere:
        delta[delta == 0] = 0.05
    else:
        delta[0] = 0.0
    inputs = dict(mb)
    inputs["advantages"] = ADVANTAGES[:B].clone()
    inputs["old_per_token_logps"] = lp - delta
    return inputs, delta


def _trainer_loss_and_grads(b, inputs):
    b.policy.zero_grad(set_to_none=True)
    b.trainer.current_gradient_accumulation_steps = b.spec.grad_accum
    loss = b.trainer.compute_loss(b.policy, inputs)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in b.policy.parameters() if p.requires_grad])
    b.policy.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _independent_loss_and_grads(b, loss_fn):
    b.policy.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in b.policy.parameters() if p.requires_grad])
    b.policy.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(trainer, independent, rtol=1e-4):
    (l1, g1), (l2, g2) = trainer, independent
    assert torch.isclose(l1, l2, rtol=rtol, atol=1e-6), (float(l1), float(l2))
    assert g2.norm() > 0
    assert (g1 - g2).norm() <= rtol * g2.norm() + 1e-8, float((g1 - g2).norm() / g2.norm())


# ---- plain-torch objectives, from the papers -------------------------------------------------------------------

def clipped_surrogate(lp, old, adv, eps_low, eps_high):
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) per token (PPO, Schulman et al. 2017, eq. 7)."""
    rho = torch.exp(lp - old)
    return -torch.minimum(rho * adv, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv)


def seq_mean_then_mean(per_token, mask):
    """GRPO's 1/G sum_i 1/|y_i| sum_t (sequences with no valid token add 0)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def high_clipped(lp, old, adv, eps_high, mask):
    return ((torch.exp(lp - old) > 1 + eps_high) & (adv > 0) & mask.bool()).any()


def low_clipped(lp, old, adv, eps_low, mask):
    return ((torch.exp(lp - old) < 1 - eps_low) & (adv < 0) & mask.bool()).any()


# ---- Dr. GRPO ---------------------------------------------------------------------------------------------------

def test_dr_grpo_loss_has_no_length_normalization(tiny):
    b = _bench("dr_grpo")
    mb = b.generation_batch(0)[0]
    inputs, _ = _fixed(b, mb)
    mask, adv, old = mb["completion_mask"], inputs["advantages"][:, None], inputs["old_per_token_logps"]
    B = mask.shape[0]

    def loss():
        lp, _ = _forward(b.policy, mb, mask)
        assert high_clipped(lp, old, adv, 0.2, mask) and low_clipped(lp, old, adv, 0.2, mask)
        # Liu et al. eq. 3: sum over all tokens / (G * L_max), per micro-batch of B sequences; / grad_accum
        return (clipped_surrogate(lp, old, adv, 0.2, 0.2) * mask).sum() / (B * L_MAX) / b.spec.grad_accum
    _assert_same(_trainer_loss_and_grads(b, inputs), _independent_loss_and_grads(b, loss))


def test_dr_grpo_advantages_are_not_divided_by_the_group_std(tiny):
    """Rewards 0..G-1 in every group: Dr. GRPO's advantages are r - mean (not divided by std, as default GRPO)."""
    b = _bench("dr_grpo")
    G = SPEC["num_generations"]

    def ranked_reward(completions, **_):
        return [float(i % G) for i in range(len(completions))]
    b.trainer.reward_funcs[0] = ranked_reward
    adv = torch.cat([mb["advantages"] for mb in b.generation_batch(0)])
    expected = torch.arange(G, dtype=torch.float32) - (G - 1) / 2
    assert torch.allclose(adv.sort().values, expected.repeat(len(adv) // G).sort().values, atol=1e-5)
    # the suite's default divides by the group's std (+1e-4): the same rewards give other values
    std = torch.arange(G, dtype=torch.float32).std()
    assert not torch.allclose(expected, expected / (std + 1e-4), atol=1e-2)


# ---- DAPO -------------------------------------------------------------------------------------------------------

def test_dapo_loss_masks_truncated_completions_and_clips_higher(tiny):
    b = _bench("dapo", max_completion_length=L_MIXED)
    micro = b.generation_batch(0)
    eos = b.tokenizer.eos_token_id
    # independent masks: tokens up to the first EOS; a completion without EOS was cut at L_max -> all masked
    masks = []
    for mb in micro:
        m = completion_mask(mb["completion_ids"], eos)
        truncated = ~(mb["completion_ids"] == eos).any(1)
        masks.append(m * (~truncated)[:, None])
    n_truncated = [int((m.sum(1) == 0).sum()) for m in masks]
    k = max(range(len(micro)), key=lambda i: min(n_truncated[i], len(masks[i]) - n_truncated[i]))
    assert 0 < n_truncated[k] < len(masks[k]), "no mixed micro-batch: the overlong filter would be untested"
    mb, mask = micro[k], masks[k]
    tokens_per_step = sum(int(m.sum()) for m in masks) / (b.trainer.args.steps_per_generation / b.spec.grad_accum)
    inputs, _ = _fixed(b, mb, mask)
    adv, old = inputs["advantages"][:, None], inputs["old_per_token_logps"]

    def loss():
        lp, _ = _forward(b.policy, mb, mask)
        rho = torch.exp(lp - old)
        assert ((rho > 1.2) & (rho < 1.28) & mask.bool()).any()  # a token only clip-higher leaves unclipped
        assert high_clipped(lp, old, adv, 0.28, mask) and low_clipped(lp, old, adv, 0.2, mask)
        # Yu et al. eq. 8: token-level sum over the step's tokens / their count (TRL: the generation batch's mean)
        return (clipped_surrogate(lp, old, adv, 0.2, 0.28) * mask).sum() / tokens_per_step
    _assert_same(_trainer_loss_and_grads(b, inputs), _independent_loss_and_grads(b, loss))


def test_dapo_soft_overlong_punishment_is_a_reward(tiny):
    b = _bench("dapo", max_completion_length=L_MIXED)
    t = b.trainer
    assert t.reward_func_names[-1] == "soft_overlong_punishment_reward" and float(t.reward_weights[-1]) == 1.0
    micro = b.generation_batch(0)
    eos, cache, L = b.tokenizer.eos_token_id, round(0.2 * L_MIXED), L_MIXED
    penalties = []
    for mb in micro:
        for ids in mb["completion_ids"]:
            hit = (ids == eos).nonzero()
            n = int(hit[0]) + 1 if len(hit) else L  # TRL's completion length: up to and with the EOS
            # Yu et al. eq. 13
            penalties.append(0.0 if n <= L - cache else ((L - cache) - n) / cache if n <= L else -1.0)
    logged = t._metrics["train"]["rewards/soft_overlong_punishment_reward/mean"][-1]
    assert math.isclose(logged, sum(penalties) / len(penalties), abs_tol=1e-6)
    assert min(penalties) < 0  # the punishment acted on this batch


# ---- GSPO -------------------------------------------------------------------------------------------------------

def test_gspo_loss_uses_the_sequence_ratio_and_its_clip_range(tiny):
    b = _bench("gspo")
    mb = b.generation_batch(0)[0]
    inputs, _ = _fixed(b, mb)
    mask, adv, old = mb["completion_mask"], inputs["advantages"][:, None], inputs["old_per_token_logps"]

    def loss():
        lp, _ = _forward(b.policy, mb, mask)
        # Zheng et al. eq. 7: s_i = exp(1/|y_i| sum_t log rho_it), clipped to [1 - 3e-4, 1 + 4e-4]
        s = torch.exp(((lp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))
        clipped = (s < 1 - 3e-4) | (s > 1 + 4e-4)
        assert clipped.any() and not clipped[0]  # sequence 0 has s = 1
        per_seq = -torch.minimum(s * adv, torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * adv)
        has_tokens = mask.sum(-1, keepdim=True) > 0
        return (per_seq * has_tokens).mean() / b.spec.grad_accum
    _assert_same(_trainer_loss_and_grads(b, inputs), _independent_loss_and_grads(b, loss))


# ---- CISPO ------------------------------------------------------------------------------------------------------

def test_cispo_loss_clips_and_detaches_the_is_weight(tiny):
    b = _bench("cispo")
    micro = b.generation_batch(0)
    mb = micro[0]
    mask = mb["completion_mask"]
    tokens_per_step = sum(int(m["completion_mask"].sum()) for m in micro) / 2
    inputs, _ = _fixed(b, mb)
    adv, old = inputs["advantages"][:, None], inputs["old_per_token_logps"]

    def loss():
        lp, _ = _forward(b.policy, mb, mask)
        rho = torch.exp(lp - old)
        assert ((rho > 5.0) & (adv > 0) & mask.bool()).any()
        # MiniMax-M1 eq. 4: sg(clip(rho, max=eps_max)) A log pi, token-level mean
        return -(torch.clamp(rho, max=5.0).detach() * adv * lp * mask).sum() / tokens_per_step
    _assert_same(_trainer_loss_and_grads(b, inputs), _independent_loss_and_grads(b, loss))


# ---- entropy methods -------------------------------------------------------------------------------------------

def _grpo_policy_loss(b, mb, mask, inputs, lp):
    adv, old = inputs["advantages"][:, None], inputs["old_per_token_logps"]
    return seq_mean_then_mean(clipped_surrogate(lp, old, adv, 0.2, 0.2), mask) / b.spec.grad_accum


def test_entropy_bonus_subtracts_the_token_mean_entropy(tiny):
    b = _bench("entropy_bonus")
    mb = b.generation_batch(0)[0]
    mask = mb["completion_mask"]
    inputs, _ = _fixed(b, mb)

    def loss():
        lp, ent = _forward(b.policy, mb, mask)
        bonus = (ent * mask).sum() / mask.sum() / b.spec.grad_accum
        return _grpo_policy_loss(b, mb, mask, inputs, lp) - 1e-3 * bonus
    trainer = _trainer_loss_and_grads(b, inputs)
    _assert_same(trainer, _independent_loss_and_grads(b, loss))
    # the bonus moves the gradient (it is not a logging-only term): by the gradient of -1e-3 x the token-mean entropy,
    # far above float32 rounding of the gradient (about 1e-7 relative; the move measured 2.6e-4 to over 1e-3 relative)
    without = _independent_loss_and_grads(b, lambda: _grpo_policy_loss(b, mb, mask, inputs,
                                                                        _forward(b.policy, mb, mask)[0]))

    def bonus_term():
        ent = _forward(b.policy, mb, mask)[1]
        return -1e-3 * (ent * mask).sum() / mask.sum() / b.spec.grad_accum
    bonus_only = _independent_loss_and_grads(b, bonus_term)
    assert (trainer[1] - without[1]).norm() > 1e-5 * without[1].norm()
    torch.testing.assert_close(trainer[1] - without[1], bonus_only[1], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("last_entropy", [0.0, 10.0])
def test_adaptive_entropy_applies_the_bonus_below_target_and_steps_the_coefficient(tiny, last_entropy):
    b = _bench("adaptive_entropy")
    t = b.trainer
    mb = b.generation_batch(0)[0]
    mask = mb["completion_mask"]
    inputs, _ = _fixed(b, mb)
    coef, target, step = 0.05, 0.2, 0.005
    with torch.no_grad():
        _, ent = _forward(b.policy, mb, mask)
    window_entropy = float((ent * mask).sum() / mask.sum())

    def loss():
        lp, ent = _forward(b.policy, mb, mask)
        applied = coef if last_entropy <= target else 0.0  # Skywork-OR1: the bonus acts only at or below target
        return _grpo_policy_loss(b, mb, mask, inputs, lp) - applied * (ent * mask).sum() / mask.sum() / 2
    t.entropy_coef, t._last_world_entropy, t._entropy_window_stats = coef, last_entropy, None
    trainer = _trainer_loss_and_grads(b, inputs)
    _assert_same(trainer, _independent_loss_and_grads(b, loss))
    # the controller: c +/- delta by the window's entropy against the target (one micro-batch window here)
    expected = coef + step if window_entropy <= target else coef - step
    assert math.isclose(t.entropy_coef, expected, rel_tol=1e-9)
    assert math.isclose(t._last_world_entropy, window_entropy, rel_tol=1e-4)


def test_top_entropy_trains_only_the_top_fifth_by_entropy(tiny):
    b = _bench("top_entropy")
    mb = b.generation_batch(0)[0]
    mask = mb["completion_mask"]
    inputs, _ = _fixed(b, mb)
    adv, old = inputs["advantages"][:, None], inputs["old_per_token_logps"]
    with torch.no_grad():
        _, ent = _forward(b.policy, mb, mask)
    valid = ent[mask.bool()]
    tau = torch.quantile(valid, 0.8)  # Wang et al.: the 80th percentile of the micro-batch's token entropies
    keep = (ent >= tau) & mask.bool()
    assert 0 < int(keep.sum()) < int(mask.sum())

    def loss():
        lp, _ = _forward(b.policy, mb, mask)
        per_token = clipped_surrogate(lp, old, adv, 0.2, 0.2) * keep
        return seq_mean_then_mean(per_token, mask) / b.spec.grad_accum  # 1/|y_i| still counts every token
    _assert_same(_trainer_loss_and_grads(b, inputs), _independent_loss_and_grads(b, loss))


# ---- covariance methods ----------------------------------------------------------------------------------------

def _cov(lp, adv, mask):
    """Cui et al. eq. 12, by explicit loops over the valid tokens."""
    B, T = lp.shape
    cells = [(i, j) for i in range(B) for j in range(T) if mask[i, j]]
    mean_lp = sum(float(lp[i, j]) for i, j in cells) / len(cells)
    mean_a = sum(float(adv[i, 0]) for i, j in cells) / len(cells)
    return {(i, j): (float(lp[i, j]) - mean_lp) * (float(adv[i, 0]) - mean_a) for i, j in cells}


def test_kl_cov_penalizes_the_top_covariance_tokens(tiny):
    b = _bench("kl_cov", kl_cov_ratio=0.05, ppo_kl_coef=100.0)  # a large beta: the penalty's gradient shows
    mb = b.generation_batch(0)[0]
    mask = mb["completion_mask"]
    inputs, delta = _fixed(b, mb, off_policy_everywhere=True)
    adv, old = inputs["advantages"][:, None], inputs["old_per_token_logps"]
    with torch.no_grad():
        lp0, _ = _forward(b.policy, mb, mask)
    cov = _cov(lp0, adv, mask)
    k = max(1, int(len(cov) * 0.05))
    top = sorted(cov, key=cov.get, reverse=True)[:k]           # I_KL, by sorting
    selected = torch.zeros_like(mask, dtype=torch.bool)
    for i, j in top:
        selected[i, j] = True
    assert (delta[selected] != 0).any()  # the penalty acts: |log rho| > 0 on a selected token

    def loss():
        lp, _ = _forward(b.policy, mb, mask)
        rho = torch.exp(lp - old)
        per_token = -rho * adv + 100.0 * (lp - old).abs() * selected  # eq. 14, unclipped
        return seq_mean_then_mean(per_token, mask) / b.spec.grad_accum
    trainer = _trainer_loss_and_grads(b, inputs)
    _assert_same(trainer, _independent_loss_and_grads(b, loss))
    unpenalized = _independent_loss_and_grads(b, lambda: seq_mean_then_mean(
        -torch.exp(_forward(b.policy, mb, mask)[0] - old) * adv, mask) / b.spec.grad_accum)
    assert (trainer[1] - unpenalized[1]).norm() > 1e-3 * unpenalized[1].norm()


def test_clip_cov_cuts_the_gradient_of_drawn_covariance_tokens(tiny):
    b = _bench("clip_cov", max_completion_length=L_MIXED, clip_cov_ratio=0.005)  # draws 1 of the candidates
    mb = b.generation_batch(0)[0]
    mask = mb["completion_mask"]
    inputs, _ = _fixed(b, mb)
    adv, old = inputs["advantages"][:, None], inputs["old_per_token_logps"]
    with torch.no_grad():
        lp0, _ = _forward(b.policy, mb, mask)
    rho0 = torch.exp(lp0 - old)
    cov = _cov(lp0, adv, mask)
    clipped = lambda i, j: float(-adv[i, 0] * rho0[i, j].clamp(0.8, 1.2)) > float(-adv[i, 0] * rho0[i, j])  # noqa
    candidates = {c for c, v in cov.items() if 1.0 < v < 5.0 and not clipped(*c)}
    trainer = _trainer_loss_and_grads(b, inputs)
    drawn = {tuple(x) for x in b.trainer.clip_cov_last.nonzero().tolist()}
    assert drawn <= candidates
    assert len(drawn) == min(max(1, int(0.005 * len(cov))), len(candidates)) > 0
    assert len(candidates) > len(drawn)  # a random subset, not all of them

    def loss(zeroed=drawn):
        lp, _ = _forward(b.policy, mb, mask)
        keep = torch.ones_like(lp)
        for i, j in zeroed:
            keep[i, j] = 0.0
        return seq_mean_then_mean(clipped_surrogate(lp, old, adv, 0.2, 0.2) * keep, mask) / b.spec.grad_accum
    _assert_same(trainer, _independent_loss_and_grads(b, loss))
    uncut = _independent_loss_and_grads(b, lambda: loss(set()))
    assert (trainer[1] - uncut[1]).norm() > 1e-4 * uncut[1].norm()


# ---- composition and refusals ------------------------------------------------------------------------------------

def test_adapter_methods_compose_with_loss_variants():
    from methods import get_method
    m = get_method("geora+dapo")
    assert m.adapter_init is not None and m.grpo_overrides["epsilon_high"] == 0.28
    assert get_method("pissa+gspo").grpo_overrides["importance_sampling_level"] == "sequence"
    assert get_method("pissa+gspo").family == "SVD-initialized adapter+loss variant"
    for bad in ("dr_grpo+dapo", "dapo+kl_cov", "gspo+cispo"):
        with pytest.raises(BenchError, match="cannot compose"):
            get_method(bad)


def test_all_means_every_registered_method():
    from methods import METHODS, method_names
    names = method_names("all")
    assert names == list(METHODS)
    for new in ("dr_grpo", "dapo", "gspo", "cispo", "entropy_bonus", "adaptive_entropy", "top_entropy", "kl_cov",
                "clip_cov"):
        assert new in names


@pytest.mark.parametrize("name", ["proma+gspo", "proma+dapo", "proma+cispo", "proma+entropy_bonus"])
def test_proma_refuses_losses_not_linear_in_the_advantages(name):
    from methods import get_method
    with pytest.raises(BenchError, match="PROMA cannot run with|cannot compose proma"):
        get_method(name)


def test_covariance_methods_refuse_incompatible_settings():
    from methods.covariance import check_grpo_clip_cov, check_grpo_kl_cov
    ok = {"loss_type": "grpo", "importance_sampling_level": "token", "top_entropy_quantile": 1.0, "epsilon": 1e9,
          "epsilon_high": None, "delta": None, "off_policy_mask_threshold": None}
    check_grpo_kl_cov(ok)
    check_grpo_clip_cov({**ok, "epsilon": 0.2, "loss_type": "dapo"})
    for bad, match in (({"loss_type": "cispo"}, "loss_type"), ({"importance_sampling_level": "sequence"}, "sequence"),
                       ({"top_entropy_quantile": 0.2}, "top_entropy"), ({"delta": 1.5}, "delta")):
        for check in (check_grpo_kl_cov, check_grpo_clip_cov):
            with pytest.raises(BenchError, match=match):
                check({**ok, **bad})
    with pytest.raises(BenchError, match="ratio clipping"):
        check_grpo_kl_cov({**ok, "epsilon_high": 0.28})


@pytest.mark.parametrize("name", ["proma+kl_cov", "kl_cov+proma", "clip_cov+proma", "kl_cov+clip_cov"])
def test_trainer_refuses_proma_or_two_loss_hooks(tmp_path, tiny, name):
    with pytest.raises(BenchError, match="PROMA cannot be combined|two per-token loss hooks"):
        _train_trainer(tmp_path, name)


# ---- observables ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,keys", [
    ("dapo", ("clip_low_frac", "clip_high_frac", "truncated_frac", "overlong_penalty")),
    ("top_entropy", ("top_entropy_kept_frac",)),
    ("kl_cov", ("kl_cov_penalized_frac",)),
    ("clip_cov", ("clip_cov_zeroed_frac", "clip_low_frac", "clip_high_frac")),
])
def test_methods_log_their_observables_per_step(tmp_path, tiny, name, keys):
    t = _train_trainer(tmp_path, name)
    t.train()
    for key in keys:
        assert key in t.step_metrics, key
        assert -1.0 <= t.step_metrics[key] <= 1.0, (key, t.step_metrics[key])
    if name == "top_entropy":
        assert 0.1 < t.step_metrics["top_entropy_kept_frac"] < 0.35
    if name == "kl_cov":  # one token per micro-batch of fewer than 500 (k = 2e-3)
        assert 0 < t.step_metrics["kl_cov_penalized_frac"] < 0.05
