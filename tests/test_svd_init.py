"""GeoRA, PiSSA, MiLoRA initializers against explicit numpy SVDs and quantiles; residual reference; reload."""
import numpy as np
import pytest
import torch

from bench.metrics import InitialPolicy, RolloutBatch, completion_mask, kl_to_reference
from bench.models import load_policy
from bench.policy import build_policy
from methods import get_method
from methods.svd_init import abs_quantile, top_svd
from tasks import get_task, plain_prompt


def _np_geora(w: np.ndarray, r: int, rho: float) -> np.ndarray:
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    w_r = (u[:, :r] * s[:r]) @ vh[:r]
    def q(x):  # lower order statistic at ceil(rho * n), as documented
        flat = np.sort(np.abs(x).ravel())
        return flat[int(np.ceil(rho * flat.size)) - 1]
    mask = (np.abs(w_r) <= q(w_r)) | (np.abs(w) <= q(w))
    return w * mask


def _assert_is_geora_part(ba: np.ndarray, w: np.ndarray, r: int, rho: float = 0.2) -> None:
    """ba is the top-r SVD part of W_geo (Eckart-Young), W_geo computed here in fp64. The method computes W_r in
    fp32 (methods/svd_init.py), and fp32 SVD moves W_r's entries by up to ~4e-4 of the quantile: where two entries
    lie closer than that around the quantile they may swap sides of the mask (one o_proj of the embedded model).
    There W_geo differs in those entries, and ba is judged by its approximation error instead: within 0.1% of the
    optimal one (a wrong subspace, e.g. the minor triplets, is worse by far more)."""
    w_geo = _np_geora(w, r, rho)
    u, s, vh = np.linalg.svd(w_geo, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    u, s_r, vh = np.linalg.svd(w, full_matrices=False)
    flat = np.sort(np.abs((u[:, :r] * s_r[:r]) @ vh[:r]).ravel())
    k = int(np.ceil(rho * flat.size)) - 1
    if min(flat[k + 1] - flat[k], flat[k] - flat[k - 1]) > 1e-3 * flat[k]:
        assert np.abs(ba - best).max() < 1e-4
    else:
        assert np.linalg.norm(w_geo - ba) <= 1.001 * np.sqrt((s[r:] ** 2).sum())


def _layers(policy):
    from peft.tuners.lora import LoraLayer
    return [m for m in policy.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def test_masks_select_a_rho_fraction():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    for rho in (0.05, 0.2, 0.5):
        frac = float((w.abs() <= abs_quantile(w, rho)).float().mean())
        assert frac == pytest.approx(np.ceil(rho * w.numel()) / w.numel())


@pytest.mark.parametrize("method", ["geora", "pissa", "milora"])
def test_init_reproduces_base_logits_and_kl_ref_is_zero(tiny, method):
    base, tok = load_policy("tiny")
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:6]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        base_logits = base(**enc).logits
    policy = build_policy(base, get_method(method), 16, 16.0, seed=0)
    with torch.no_grad():
        assert (policy(**enc).logits - base_logits).abs().max() <= 1e-4
        with policy.disable_adapter():  # the residual alone is NOT the initial policy
            assert (policy(**enc).logits - base_logits).abs().max() > 1e-3
    comp = torch.randint(1, 100, (6, 10))
    batch = RolloutBatch(enc["input_ids"], enc["attention_mask"], comp, completion_mask(comp, tok.eos_token_id))
    assert abs(kl_to_reference(policy, InitialPolicy(policy), batch)["kl_ref"]) < 1e-6


def test_geora_adapter_is_the_best_rank_r_approximation_of_w_geo(tiny):
    base, _ = load_policy("tiny")
    originals = {n: m.weight.detach().double().numpy().copy() for n, m in base.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("proj")}
    policy = build_policy(base, get_method("geora"), 8, 8.0, seed=0)
    for layer in _layers(policy)[:7]:
        name = next(n for n, m in policy.named_modules() if m is layer).replace("base_model.model.", "")
        w = originals[name]
        ba = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        _assert_is_geora_part(ba.detach().double().numpy(), w, 8)
        residual = layer.get_base_layer().weight.detach().double().numpy()
        assert np.abs(residual + ba.detach().double().numpy() - w).max() < 1e-5


def test_milora_uses_the_last_r_triplets(tiny):
    base, _ = load_policy("tiny")
    w = base.model.layers[0].mlp.down_proj.weight.detach().double().numpy().copy()
    policy = build_policy(base, get_method("milora"), 4, 4.0, seed=0)
    layer = policy.base_model.model.model.layers[0].mlp.down_proj
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    minor = (u[:, -4:] * s[-4:]) @ vh[-4:]
    ba = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert np.abs(ba.detach().double().numpy() - minor).max() < 1e-5


def test_pissa_goes_through_peft_initializer(tiny):
    base, _ = load_policy("tiny")
    w = base.model.layers[1].self_attn.q_proj.weight.detach().double().numpy().copy()
    assert get_method("pissa").resolved_init() == "pissa"
    assert get_method("pissa").resolved_init({"svd": "randomized"}) == "pissa_niter_4"
    policy = build_policy(base, get_method("pissa"), 4, 4.0, seed=0)
    layer = policy.base_model.model.model.layers[1].self_attn.q_proj
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    ba = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert np.abs(ba.detach().double().numpy() - (u[:, :4] * s[:4]) @ vh[:4]).max() < 1e-4


def test_randomized_and_exact_svd_span_the_same_subspace():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(600, 600, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(700, 600, generator=g))
    s = torch.cat([torch.linspace(10, 5, 8), torch.linspace(0.5, 0.01, 592)])  # gap after 8
    w = (q2 * s) @ q1.T
    ue, _, vhe = top_svd(w, 8, "exact")
    ur, _, vhr = top_svd(w, 8, "randomized", niter=4)
    assert torch.dist(ue @ ue.T, ur @ ur.T) < 1e-3 and torch.dist(vhe.T @ vhe, vhr.T @ vhr) < 1e-3


def test_quantile_works_past_torch_quantile_limit():
    big = torch.arange(2**24 + 10, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(big, 0.5)
    assert abs_quantile(big, 0.5) == float(np.ceil(0.5 * big.numel()) - 1)


def test_bad_rho_is_a_one_line_error(cli):
    from tests.test_cli import assert_one_line_error
    assert_one_line_error(cli("run", "--methods", "geora", "--method-param", "rho=1.5"), "bad rho 1.5")
    assert_one_line_error(cli("run", "--methods", "milora", "--method-param", "rho=0.3"),
                          "--method-param rho: no method of this sweep has a parameter 'rho'")


@pytest.mark.parametrize("method", ["geora", "geora+kl"])
def test_short_run_reference_is_initial_policy(tmp_path, tiny, method):
    from bench.io import read_jsonl
    from bench.runner import run_one
    from bench.spec import RunSpec
    spec = RunSpec(method=method, rank=8, steps=2, eval_size=8, probe_size=4, probe_every=1,
                   max_completion_length=32)
    s = run_one(spec, tmp_path / "run", progress=False)
    assert s["status"] == "ok", s.get("error")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert abs(rows[0]["kl_ref"]) < 1e-6 and rows[-1]["kl_ref"] > 0
    if method.endswith("+kl"):
        assert abs(rows[1]["kl_trl"]) < 1e-6  # TRL's reference is the initial policy, not the residual
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["geora", "pissa", "milora", "kl_free_lora"])
def test_saved_adapter_reloads_onto_the_original_base(tmp_path, tiny, method):
    """Train-like change of the adapter, save it, load it onto a fresh original base: same logits."""
    from peft import PeftModel

    from bench.runner import save_trained
    base, tok = load_policy("tiny")
    m = get_method(method)
    policy = build_policy(base, m, 8, 8.0, seed=0)
    if m.modifies_base():
        policy.save_pretrained(tmp_path / "adapter_init")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    enc = tok([plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:4]], return_tensors="pt",
              padding=True, add_special_tokens=False)
    with torch.no_grad():
        trained = policy(**enc).logits
    save_trained(policy, tmp_path, m.modifies_base())
    fresh, _ = load_policy("tiny")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert (reloaded(**enc).logits - trained).abs().max() < 1e-4


# ---- scalings other than 1, the randomized GeoRA path, bf16 residuals -----------------------------------------------

def _lora_policy(method, rank, alpha, rslora):
    """PEFT's LoraConfig directly (build_policy has no rsLoRA switch), then the method's initializer."""
    from peft import LoraConfig, get_peft_model

    from methods import QWEN3_TARGETS
    base, tok = load_policy("tiny")
    m = get_method(method)
    params = m.resolve_params()
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=list(QWEN3_TARGETS),
                        init_lora_weights=m.resolved_init(params), task_type="CAUSAL_LM")
    policy = get_peft_model(base, config)
    if m.adapter_init is not None:
        with torch.no_grad():
            m.adapter_init(policy, params)
    return policy, tok


@pytest.mark.parametrize("method", ["geora", "pissa", "milora"])
@pytest.mark.parametrize("alpha,rslora", [(32.0, False), (3.0, False), (16.0, True)])
def test_svd_inits_with_scaling_other_than_one(tiny, method, alpha, rslora):
    """alpha != rank (scaling alpha / r) and rsLoRA (alpha / sqrt(r)): s B A is still the chosen SVD part and the
    residual + s B A is W (numpy SVD, independent of the code under test)."""
    rank = 8
    base, _ = load_policy("tiny")
    originals = {n: m.weight.detach().double().numpy().copy() for n, m in base.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("proj")}
    policy, _ = _lora_policy(method, rank, alpha, rslora)
    for layer in _layers(policy)[:7]:
        scale = layer.scaling["default"]
        assert scale == pytest.approx(alpha / (rank ** 0.5 if rslora else rank))
        name = next(n for n, m in policy.named_modules() if m is layer).replace("base_model.model.", "")
        w = originals[name]
        ba = (scale * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)).detach().double().numpy()
        if method == "geora":
            _assert_is_geora_part(ba, w, rank)
        else:
            u, s, vh = np.linalg.svd(w, full_matrices=False)
            part = ((u[:, -rank:] * s[-rank:]) @ vh[-rank:] if method == "milora"
                    else (u[:, :rank] * s[:rank]) @ vh[:rank])
            assert np.abs(ba - part).max() < 1e-4
        residual = layer.get_base_layer().weight.detach().double().numpy()
        assert np.abs(residual + ba - w).max() < 1e-5


def test_geora_randomized_svd_path_on_a_wide_matrix(monkeypatch):
    """Both sides > 512: `auto` takes the randomized SVD for W_r and for W_geo. W has a spectral gap, so the masks
    equal numpy's exact GeoRA masks; W_geo has none (masking flattens the spectrum), so its randomized rank-r
    factor is judged by Eckart-Young: its approximation error is within 1% of the optimal (exact SVD) one."""
    from methods import svd_init
    calls = []
    lowrank = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **kw: calls.append(1) or lowrank(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(700, 600, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(600, 600, generator=g))
    s = torch.cat([torch.linspace(40, 20, 8), torch.linspace(0.05, 0.01, 592)])
    w = (q1 * s) @ q2.T  # 700 x 600
    r = 8
    w_geo = svd_init.geora_matrix(w, r, 0.2, "auto", niter=4)
    u, sv, vh = svd_init.top_svd(w_geo, r, "auto", niter=4)
    assert len(calls) == 2
    expected_geo = _np_geora(w.double().numpy(), r, 0.2)
    agree = float((torch.from_numpy(expected_geo != 0) == (w_geo != 0)).double().mean())
    assert agree > 0.999  # masks equal up to entries at the quantile threshold
    ue, se, vhe = np.linalg.svd(expected_geo, full_matrices=False)
    best = (ue[:, :r] * se[:r]) @ vhe[:r]
    got = ((u * sv) @ vh).double().numpy()
    optimal = np.linalg.norm(expected_geo - best)
    assert optimal < np.linalg.norm(expected_geo - got) < 1.01 * optimal


@pytest.mark.parametrize("method", ["geora", "pissa", "milora"])
def test_bf16_residual_init_kl_to_base_is_measured(tiny, method):
    """bf16 weights: the residual W - s B A is rounded, so pi_0 is not exactly the base. The measured
    KL(pi_0 || base) equals a float64 brute-force computation from the two models' logits, and it is what a
    bf16 model gets (fp32: zero up to float noise)."""
    from bench.policy import InitKLToBase
    prompts = [plain_prompt(e.question) for e in get_task("synth-gsm").examples("eval")[:4]]
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        base, tok = load_policy("tiny", dtype=dtype)
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        pos = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            base_logits = base(**enc, position_ids=pos).logits.double()
        m = get_method(method)
        kl = InitKLToBase(base, m, 16, None, tok, prompts, temperature=0.7)
        policy = build_policy(base, m, 16, 16.0, seed=0)
        measured = kl.measure(policy)
        with torch.no_grad():
            init_logits = policy(**enc, position_ids=pos).logits.double()
        p, q = torch.log_softmax(init_logits / 0.7, -1), torch.log_softmax(base_logits / 0.7, -1)
        mask = enc["attention_mask"].bool()
        brute = float((p.exp() * (p - q)).sum(-1)[mask].mean())
        assert measured["init_kl_to_base_tokens"] == int(mask.sum())
        assert measured["init_kl_to_base"] == pytest.approx(brute, rel=1e-2, abs=1e-7)  # float32 log-softmax noise
        results[dtype] = measured["init_kl_to_base"]
    assert results[torch.bfloat16] > 1e-6 and abs(results[torch.float32]) < 1e-7
    print(f"{method}: init KL to base, bf16 {results[torch.bfloat16]:.3g}, fp32 {results[torch.float32]:.3g}")


def test_init_kl_is_not_measured_for_methods_that_keep_the_base(tiny):
    from bench.policy import InitKLToBase
    base, tok = load_policy("tiny")
    assert InitKLToBase(base, get_method("kl_free_lora"), 16, None, tok, ["a"]).measure(base) == {}
    assert InitKLToBase(base, get_method("kl_free_lora"), "full", None, tok, ["a"]).measure(base) == {}
