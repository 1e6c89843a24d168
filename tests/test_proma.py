"""PROMA against independent computations: per-sequence autograd gradients (one backward per sequence), an explicit
least-squares projection, an explicit SVD; then end-to-end runs through TRL."""
import pytest
import torch
from safetensors.torch import load_file

from bench.io import read_jsonl
from bench.models import load_policy
from bench.policy import build_policy, targeted_linears
from bench.runner import run_one
from bench.spec import RunSpec
from methods import get_method
from methods.proma import Projector, capped, projection, top_subspace
from tasks import get_task, plain_prompt

SMALL = dict(steps=2, eval_size=8, probe_size=4, probe_every=1, kl_step_seqs=4, checkpoint_every=2,
             max_completion_length=40)


def _microbatch(tok, start: int, n: int = 4, seed: int = 0):
    """Left-padded prompts + random completions with EOS at different places (padding after it), as TRL builds."""
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[start:start + n]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(5, 200, (n, 12), generator=g)
    comp_mask = torch.ones_like(comp)
    for i in range(n):
        end = 4 + 2 * i
        comp[i, end] = tok.eos_token_id
        comp_mask[i, end + 1:] = 0
        comp[i, end + 1:] = tok.pad_token_id
    return {"input_ids": torch.cat([enc["input_ids"], comp], 1),
            "attention_mask": torch.cat([enc["attention_mask"], comp_mask], 1),
            "completion_ids": comp, "completion_mask": comp_mask,
            "advantages": torch.randn(n, generator=g)}


def _sequence_terms(model, mb, grad_accum: int = 2):
    """TRL's loss_type="grpo" at ratio 1 with advantages 1, one term per sequence:
    -1/(B GA |y_i|) sum_t log pi(y_it)  (summing the terms gives the loss TRL backpropagates)."""
    comp, cmask = mb["completion_ids"], mb["completion_mask"].float()
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    logits = logits[:, -comp.shape[1] - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
    per_seq = -(logp * cmask).sum(1) / cmask.sum(1)
    return per_seq / (len(per_seq) * grad_accum)


def _autograd_sequence_grads(model, mb, weights: dict) -> dict:
    """{name: [B, d_out*d_in]}: one backward per sequence."""
    terms = _sequence_terms(model, mb)
    out = {name: [] for name in weights}
    for i in range(len(terms)):
        grads = torch.autograd.grad(terms[i], list(weights.values()), retain_graph=True)
        for name, gr in zip(weights, grads):
            out[name].append(gr.flatten())
    return {name: torch.stack(v) for name, v in out.items()}


def _policy(rank, method="proma"):
    """The policy, with lora_B moved off zero (at LoRA's init lora_A's gradient is exactly 0)."""
    model, tok = load_policy("tiny")
    policy = build_policy(model, get_method(method), rank, None if rank == "full" else float(rank), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return policy, tok


def _backward(policy, projector, mb):
    projector.begin(mb["attention_mask"], mb["advantages"] if projector.advantage_free else None)
    projector.collecting = True
    terms = _sequence_terms(policy, mb)
    projector.collecting = False
    terms.sum().backward()


def _weights(policy, projector, names):
    return {s.name: s.module.weight for s in projector.slots if any(s.name.endswith(n) for n in names)}


PICKS = {4: ["layers.0.self_attn.q_proj.lora_A.default", "layers.3.mlp.down_proj.lora_B.default",
             "layers.1.mlp.up_proj.lora_A.default"],
         "full": ["layers.0.self_attn.q_proj", "layers.2.mlp.down_proj"]}


@pytest.mark.parametrize("rank", [4, "full"])
def test_hook_sequence_gradients_equal_autograd_and_first_microbatch_is_plain(tiny, rank):
    policy, tok = _policy(rank)
    projector = Projector(policy, get_method("proma").resolve_params(), intra=False, record=True)
    mb = _microbatch(tok, 0)
    weights = _weights(policy, projector, PICKS[rank])
    assert len(weights) == len(PICKS[rank])
    expected = _autograd_sequence_grads(policy, mb, weights)
    policy.zero_grad(set_to_none=True)
    _backward(policy, projector, mb)
    for name, w in weights.items():
        got = projector.recorded[name]
        scale = float(expected[name].abs().max())
        assert scale > 0 and (got - expected[name]).abs().max() <= 1e-5 * scale, name  # relative to the gradient
        # one micro-batch: the gradient is the advantage-weighted sum, i.e. plain accumulation of TRL's loss
        plain = (mb["advantages"][:, None] * expected[name]).sum(0)
        assert torch.allclose(w.grad.flatten(), plain, atol=1e-6, rtol=1e-5), name


def test_exact_projection_makes_running_gradient_orthogonal_to_sequence_gradients(tiny):
    policy, tok = _policy(4)
    params = get_method("proma").resolve_params({"mode": "exact", "ridge": 1e-9, "cap": 1e9})
    projector = Projector(policy, params, intra=False)
    mb1, mb2 = _microbatch(tok, 0, seed=1), _microbatch(tok, 4, seed=2)
    weights = _weights(policy, projector, PICKS[4])
    g2 = _autograd_sequence_grads(policy, mb2, weights)  # independent: one backward per sequence
    policy.zero_grad(set_to_none=True)
    _backward(policy, projector, mb1)
    acc_before = {n: w.grad.flatten().clone() for n, w in weights.items()}
    _backward(policy, projector, mb2)
    for name, w in weights.items():
        p2 = (mb2["advantages"][:, None] * g2[name]).sum(0)
        projected = w.grad.flatten() - p2  # what the running gradient became before p_2 was added
        unit = g2[name] / g2[name].norm(dim=1, keepdim=True)
        assert (unit @ projected).abs().max() <= 1e-4 * acc_before[name].norm(), name
        assert projected.norm() < acc_before[name].norm()  # something was removed
        # and what was removed lies in the span: projected + (removed part) == acc_before
        removed = acc_before[name] - projected
        coef = torch.linalg.lstsq(g2[name].T.double(), removed.double()).solution
        assert torch.allclose((g2[name].T.double() @ coef).float(), removed, atol=1e-5 * float(removed.norm()) + 1e-9)


def test_default_projection_through_the_hooks_with_a_zero_advantage(tiny):
    """Two micro-batches at the defaults (approx: 2 sweeps of sequential deflation, cap 0.5), one sequence with
    advantage 0: the hooked gradient equals an independent reconstruction from per-sequence autograd gradients."""
    policy, tok = _policy(4)
    params = get_method("proma").resolve_params()
    projector = Projector(policy, params, intra=False)
    mb1, mb2 = _microbatch(tok, 0, seed=1), _microbatch(tok, 4, seed=2)
    mb2["advantages"][1] = 0.0  # its direction must still be projected out
    weights = _weights(policy, projector, PICKS[4])
    g1 = _autograd_sequence_grads(policy, mb1, weights)
    g2 = _autograd_sequence_grads(policy, mb2, weights)
    policy.zero_grad(set_to_none=True)
    _backward(policy, projector, mb1)
    _backward(policy, projector, mb2)
    for name, w in weights.items():
        acc = (mb1["advantages"][:, None] * g1[name]).sum(0).double()
        p2 = (mb2["advantages"][:, None] * g2[name]).sum(0).double()
        a = acc.clone()
        units = g2[name].double() / (g2[name].double().norm(dim=1, keepdim=True) + 1e-8)
        for _ in range(params["sweeps"]):  # the author's loop, written out
            for u in units:
                a = a - (a @ u) * u
        proj = acc - a
        if proj.norm() > params["cap"] * p2.norm():
            proj = proj * (params["cap"] * p2.norm() / proj.norm())
        expected = acc - proj + p2
        assert torch.allclose(w.grad.flatten().double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
        assert float((units[1] @ proj).abs()) > 0  # the zero-advantage sequence's direction was used


def _explicit_projection(acc, basis):
    """Orthogonal projection of acc onto the row span of basis, by least squares (no Gram, no normalization)."""
    coef = torch.linalg.lstsq(basis.T.double(), acc.double()).solution
    return (basis.T.double() @ coef).float()


def test_exact_projection_equals_least_squares_and_approx_converges_to_it():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 60, generator=g) @ torch.diag(torch.linspace(0.5, 2, 60))
    basis[1] = 0.6 * basis[0] + 0.4 * basis[1]  # correlated directions: deflation is not exact in one sweep
    acc = torch.randn(60, generator=g)
    g_hat = basis / basis.norm(dim=1, keepdim=True)
    truth = _explicit_projection(acc, basis)
    assert torch.allclose(projection(acc, g_hat, "exact", 1e-10, 0), truth, atol=1e-4)
    errors = [float((projection(acc, g_hat, "approx", 0.0, s) - truth).norm()) for s in (1, 2, 4, 16, 128)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-4, errors
    # one sweep of the coefficient form is literally the author's sequential deflation a <- a - <a,gh_i> gh_i
    a = acc.clone()
    for row in g_hat:
        a = a - (a @ row) * row
    assert torch.allclose(projection(acc, g_hat, "approx", 0.0, 1), acc - a, atol=1e-5)


def test_norm_cap():
    proj, ref = torch.tensor([3.0, 4.0]), torch.tensor(2.0)
    out, was = capped(proj, ref, 0.5)
    assert was and float(out.norm()) == pytest.approx(1.0) and torch.allclose(out / out.norm(), proj / 5)
    out, was = capped(proj, ref, 10.0)
    assert not was and torch.equal(out, proj)


def test_randomized_top_subspace_matches_svd_with_a_gap(monkeypatch):
    import methods.proma
    monkeypatch.setattr(methods.proma, "EXACT_MAX_DIM", 0)  # the randomized range finder, not the exact eigh
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(500, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(90, 40, generator=g))
    s = torch.cat([torch.linspace(50, 30, 6), torch.linspace(1, 0.1, 34)])
    m = (u * s) @ v.T
    q = top_subspace(m, 6, power_iters=1, oversample=8, generator=torch.Generator().manual_seed(1))
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    exact = vh[:6].T
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)
    assert torch.allclose(q @ q.T, exact @ exact.T, atol=1e-3)  # the same subspace


def _record_inputs_and_output_grads(module):
    """A dict that the module's next forward and backward fill with its input ("x") and output gradient ("g"), and
    the hook handle to remove."""
    seen = {}

    def record(module, args, out):
        seen["x"] = args[0].detach()
        out.register_hook(lambda gr: seen.__setitem__("g", gr))
    return seen, module.register_forward_hook(record)


def test_intra_removes_the_dominant_block_per_microbatch(tiny):
    policy, tok = _policy(4, "proma_intra")
    params = get_method("proma_intra").resolve_params({"power_iters": 30})
    projector = Projector(policy, params, intra=True)
    mb = _microbatch(tok, 0)
    name = "layers.0.self_attn.q_proj.lora_A.default"
    slot = next(s for s in projector.slots if s.name.endswith(name))
    # independent record of the layer's activations and output gradients (our own hooks)
    seen, h = _record_inputs_and_output_grads(slot.module)
    weights = _weights(policy, projector, [name])
    expected = _autograd_sequence_grads(policy, mb, weights)[next(iter(weights))]
    policy.zero_grad(set_to_none=True)
    _backward(policy, projector, mb)
    h.remove()
    keep = mb["attention_mask"].bool()
    x, gout = seen["x"][keep], seen["g"][keep]
    k_in, k_out = min(100, x.shape[1] // 10), max(1, min(100, gout.shape[1] // 10))
    q_in = torch.linalg.svd(x, full_matrices=False)[2][:k_in].T
    q_out = torch.linalg.svd(gout, full_matrices=False)[2][:k_out].T
    plain = expected.sum(0).view_as(slot.module.weight)  # the loss here has no advantages: sum of g_i
    got = slot.module.weight.grad
    assert float((q_out.T @ got @ q_in).abs().max()) <= 1e-4 * float(plain.abs().max())
    assert torch.allclose(got, plain - q_out @ (q_out.T @ plain @ q_in) @ q_in.T, atol=1e-4 * float(plain.abs().max()))
    assert float((got - plain).norm()) > 0.05 * float(plain.norm())


def test_one_microbatch_per_step_proma_is_unclipped_grpo_through_trl(tmp_path, tiny):
    """Through TRL (its shuffling of sequences into micro-batches included): with one micro-batch per step there
    is nothing to project, so proma's hook-rebuilt gradient must give exactly unclipped GRPO's training."""
    out = {}
    for method in ("proma", "unclipped_lora"):
        spec = RunSpec(method=method, rank=4, grad_accum=1, micro_batch=16, **SMALL)
        s = run_one(spec, tmp_path / method, progress=False)
        assert s["status"] == "ok", s.get("error")
        out[method] = (s, load_file(tmp_path / method / "adapter" / "adapter_model.safetensors"))
    (sp, wp), (_, wu) = out["proma"], out["unclipped_lora"]
    assert sp["proma_nothing_to_project"] is True and "nothing to project" in sp["notes"][0]
    assert sp["proma_weight_hook_calls"] > 0  # the gradients did come from the hooks
    assert "nothing to project" in (tmp_path / "proma" / "run.log").read_text()
    assert wp.keys() == wu.keys()
    # Equal up to float summation order (the hooks sum g_i in another order than autograd). Adam turns such
    # differences in near-zero gradient coordinates into weight differences that grow with lr; a different
    # algorithm (a projection applied, an advantage misplaced) moves coordinates by about lr itself.
    lr = RunSpec(method="proma", rank=4).lr
    for k in wu:
        assert torch.allclose(wp[k], wu[k], rtol=0, atol=0.02 * lr), k
    assert any(float(wu[k].abs().max()) > 0 for k in wu if "lora_B" in k)  # it trained (lora_B starts at 0)


@pytest.mark.parametrize("method,rank", [("proma", 4), ("proma", "full"), ("proma_intra", 4), ("geora+proma", 4)])
def test_short_runs_write_all_metrics(tmp_path, tiny, method, rank):
    spec = RunSpec(method=method, rank=rank, **SMALL)
    s = run_one(spec, tmp_path / "run", progress=False)
    assert s["status"] == "ok", s.get("error")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("kl_step", "entropy", "kl_ref", "loss", "grad_norm", "proma_removed_frac", "step_seconds"):
            assert key in r, key
        assert r["time_reference"] == 0.0  # reference-free
        assert 0 < r["proma_removed_frac"] < (1 if "intra" in method else 10)  # intra: an orthogonal projection
    for key in ("accuracy", "kl_ref", "kl_step", "entropy", "wall_clock_s", "peak_mem_mb", "trainable_params"):
        assert s[key] is not None, key
    if rank == "full":  # only the targeted Linear weights train (bench.policy): nothing left for PROMA to freeze
        model, _ = load_policy("tiny")
        linear = sum(m.weight.numel() for m in targeted_linears(model).values())
        assert s["trainable_params"] == linear < sum(p.numel() for p in model.parameters())
        assert "proma_frozen_tensors" not in s



# ---- the TRL settings PROMA refuses, and hooks that never fired -----------------------------------------------------

REFUSED = [({"epsilon_high": 0.28}, "epsilon_high"), ({"delta": 2.0}, "delta"), ({"loss_type": "sapo"}, "sapo"),
           ({"loss_type": "vespo"}, "vespo"), ({"loss_type": "cispo"}, "cispo"),
           ({"importance_sampling_level": "sequence"}, "sequence"), ({"top_entropy_quantile": 0.2}, "top_entropy"),
           ({"entropy_coef": 0.01}, "entropy bonus"), ({"use_adaptive_entropy": True}, "entropy bonus"),
           ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold")]


@pytest.mark.parametrize("method", ["proma", "proma_intra", "geora+proma"])
@pytest.mark.parametrize("grpo,fragment", REFUSED)
def test_proma_refuses_settings_that_break_the_advantage_one_trick(method, grpo, fragment):
    from bench.errors import BenchError
    with pytest.raises(BenchError, match=fragment) as e:
        RunSpec(method=method, rank=4, grpo=grpo)
    assert "\n" not in str(e.value)
    RunSpec(method=method, rank=4, grpo={"loss_type": "bnpo", "weight_decay": 0.01})  # aggregation is free


def test_proma_refusal_is_a_one_line_cli_error(cli):
    from tests.test_cli import assert_one_line_error
    assert_one_line_error(cli("run", "--methods", "proma", "--set", "grpo={epsilon_high: 0.28}"),
                          "PROMA cannot run with ratio clipping", "epsilon_high=0.28")


def test_composition_with_a_method_whose_overrides_proma_refuses(monkeypatch):
    """proma+gspo-style: a registered method whose grpo_overrides set sequence-level ratios and epsilon_high."""
    import methods
    from bench.errors import BenchError
    gspo_like = methods.Method(name="gspo_like", summary="test", grpo_overrides={
        "importance_sampling_level": "sequence", "epsilon_high": 4e-4})
    monkeypatch.setitem(methods.METHODS, "gspo_like", gspo_like)
    get_method("gspo_like")  # fine alone
    for name in ("proma+gspo_like", "gspo_like+proma"):
        with pytest.raises(BenchError, match="epsilon_high=0.0004.*importance_sampling_level 'sequence'") as e:
            get_method(name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_a_projected_weight_whose_forward_was_bypassed_is_an_error(tiny):
    """As TRL's fused head does with lm_head.weight: the weight is used without calling its module, so the
    forward hook never fires and the gradient would stay the advantage-free one."""
    import torch.nn.functional as F

    from bench.errors import BenchError
    policy, tok = _policy("full")
    projector = Projector(policy, get_method("proma").resolve_params(), intra=False)
    mlp = policy.model.layers[1].mlp
    mlp.forward = lambda x: F.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)
    mb = _microbatch(tok, 0)
    projector.begin(mb["attention_mask"], mb["advantages"])
    projector.collecting = True
    terms = _sequence_terms(policy, mb)
    projector.collecting = False
    with pytest.raises(BenchError, match="layers.1.mlp.down_proj.*forward hooks never fired"):
        terms.sum().backward()


def test_untied_lm_head_is_never_a_projected_slot(tiny):
    from methods.proma import projected_linears
    policy, _ = _policy("full")
    policy.lm_head.weight = torch.nn.Parameter(policy.lm_head.weight.detach().clone())  # untie
    policy.lm_head.weight.requires_grad_(True)
    names = set(projected_linears(policy))
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names


def test_intra_with_advantage_free_output_gradients(tiny):
    """output_grads="logprob": Q_G from the output gradients of the advantage-free loss, and the gradient rebuilt
    with the true advantages; shrinkage 0 gives exactly the advantage-weighted loss's gradient."""
    policy, tok = _policy(4, "proma_intra")
    mb = _microbatch(tok, 0)
    name = "layers.0.self_attn.q_proj.lora_A.default"
    for shrinkage in (0.0, 1.0):
        params = get_method("proma_intra").resolve_params({"power_iters": 30, "output_grads": "logprob",
                                                           "shrinkage": shrinkage})
        projector = Projector(policy, params, intra=True)
        assert projector.advantage_free
        slot = next(s for s in projector.slots if s.name.endswith(name))
        seen, h = _record_inputs_and_output_grads(slot.module)
        weights = _weights(policy, projector, [name])
        per_seq = _autograd_sequence_grads(policy, mb, weights)[next(iter(weights))]
        policy.zero_grad(set_to_none=True)
        _backward(policy, projector, mb)  # the loss backpropagated has advantages 1
        h.remove()
        projector.remove()
        true = (mb["advantages"][:, None] * per_seq).sum(0).view_as(slot.module.weight)  # sum_i A_i g_i
        got = slot.module.weight.grad
        scale = float(true.abs().max())
        if shrinkage == 0.0:
            assert torch.allclose(got, true, atol=1e-5 * scale)
            continue
        keep = mb["attention_mask"].bool()
        x, gout = seen["x"][keep], seen["g"][keep]  # advantage-free output gradients
        k_in, k_out = min(100, x.shape[1] // 10), max(1, min(100, gout.shape[1] // 10))
        q_in = torch.linalg.svd(x, full_matrices=False)[2][:k_in].T
        q_out = torch.linalg.svd(gout, full_matrices=False)[2][:k_out].T
        assert torch.allclose(got, true - q_out @ (q_out.T @ true @ q_in) @ q_in.T, atol=1e-4 * scale)
        assert float((got - true).norm()) > 0.01 * float(true.norm())
