"""SVD-initialized adapters with a frozen residual: GeoRA, PiSSA, MiLoRA.

All three write, per targeted weight W (d_out x d_in), adapters with s*B*A = U_r S_r V_r^T for chosen singular
triplets and freeze the residual W - s*B*A, so that the initial policy is the base model. The residual is computed in
fp32 from the adapters as stored (after their own rounding), so that only the residual's rounding to the weights'
dtype remains: nothing in fp32 (float summation order aside); in bf16 an error of up to half a bf16 ulp per
entry of W - s*B*A, which no rank-r adapter can absorb. The harness measures the resulting KL(pi_0 || base) and
records it in summary.json (init_kl_to_base; bench.policy.build_policy_measured).

GeoRA (Zhang et al., ACL 2026, arXiv 2601.09361; no public code; the formulas are the paper's method section):
  W_r      = best rank-r approximation of W                                  # spectral prior (r = adapter rank)
  M_spec   = 1{ |W_r| <= q_rho(|W_r|) },  M_euc = 1{ |W| <= q_rho(|W|) }     # rho-quantiles, rho = 0.2
  W_geo    = W * (M_spec OR M_euc)                                            # geometry-constrained view of W
  W_geo    = U S V^T;  B = U_r (S_r/s)^1/2,  A = (S_r/s)^1/2 V_r^T            # top-r triplets of W_geo
  W_res    = W - s B A  (frozen)                                              # forward: W_res x + s B A x
PiSSA (Meng et al., arXiv 2404.02948): the top-r triplets of W itself, through PEFT's own initializer
  (init_lora_weights="pissa", or "pissa_niter_N" for its randomized SVD).
MiLoRA (Wang et al., NAACL 2025, arXiv 2406.09044): the last (minor) r triplets of W (exact SVD).
Math in fp32; quantiles by kthvalue (torch.quantile refuses more than 2^24 entries); exact SVD for small
matrices, randomized SVD (subspace iterations) for large ones.
"""
from __future__ import annotations

import math

import torch

from bench.errors import BenchError
from methods import Method, register

FAMILY = "SVD-initialized adapter"
EXACT_MAX_DIM = 512  # "auto": exact SVD when the smaller side is at most this, randomized above


def abs_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of |x| (lower order statistic) via kthvalue, which has no size limit."""
    flat = x.abs().flatten()
    k = min(flat.numel(), max(1, math.ceil(q * flat.numel())))
    return flat.kthvalue(k).values


def top_svd(w: torch.Tensor, r: int, svd: str = "auto", niter: int = 4, oversample: int = 8):
    """(U_r, S_r, Vh_r): the top-r singular triplets, exact or by a randomized range finder."""
    if svd == "exact" or (svd == "auto" and min(w.shape) <= EXACT_MAX_DIM):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    u, s, v = torch.svd_lowrank(w, q=min(min(w.shape), r + oversample), niter=niter)
    return u[:, :r], s[:r], v[:, :r].T


def minor_svd(w: torch.Tensor, r: int):
    """(U, S, Vh) of the last (smallest) r singular triplets; needs the exact SVD."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, -r:], s[-r:], vh[-r:]


def geora_matrix(w: torch.Tensor, r: int, rho: float, svd: str = "auto", niter: int = 4) -> torch.Tensor:
    u, s, vh = top_svd(w, r, svd, niter)
    w_r = (u * s) @ vh
    m_spec = w_r.abs() <= abs_quantile(w_r, rho)
    m_euc = w.abs() <= abs_quantile(w, rho)
    return w * (m_spec | m_euc)


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer
    return [m for m in peft_model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def _write_adapter(layer, u, s, vh):
    """B = U (S/s)^1/2, A = (S/s)^1/2 Vh; base weight <- W - s B A (the frozen residual)."""
    scale = layer.scaling["default"]
    base = layer.get_base_layer().weight
    root = (s / scale).sqrt()
    b, a = u * root, root[:, None] * vh
    layer.lora_B["default"].weight.copy_(b.to(layer.lora_B["default"].weight.dtype))
    layer.lora_A["default"].weight.copy_(a.to(layer.lora_A["default"].weight.dtype))
    b, a = layer.lora_B["default"].weight.float(), layer.lora_A["default"].weight.float()  # as the forward sees them
    w = base.detach().float()
    if getattr(layer, "fan_in_fan_out", False):
        base.copy_((w.T - scale * b @ a).T.to(base.dtype))
    else:
        base.copy_((w - scale * b @ a).to(base.dtype))


def _weight(layer) -> torch.Tensor:
    w = layer.get_base_layer().weight.detach().float()
    return w.T if getattr(layer, "fan_in_fan_out", False) else w


def geora_init(peft_model, params: dict) -> None:
    for layer in _lora_layers(peft_model):
        r = layer.r["default"]
        w_geo = geora_matrix(_weight(layer), r, params["rho"], params["svd"], params["niter"])
        _write_adapter(layer, *top_svd(w_geo, r, params["svd"], params["niter"]))


def milora_init(peft_model, params: dict) -> None:
    for layer in _lora_layers(peft_model):
        _write_adapter(layer, *minor_svd(_weight(layer), layer.r["default"]))


def check_params(params: dict) -> None:
    if "rho" in params and not (isinstance(params["rho"], (int, float)) and 0 < params["rho"] < 1):
        raise BenchError(f"bad rho {params['rho']!r}: must be in (0, 1)")
    if "svd" in params and params["svd"] not in ("auto", "exact", "randomized"):
        raise BenchError(f"bad svd {params['svd']!r}: valid: auto, exact, randomized")
    if "niter" in params and not (isinstance(params["niter"], int) and params["niter"] >= 0):
        raise BenchError(f"bad niter {params['niter']!r}: must be an integer >= 0")


def pissa_initializer(params: dict) -> str:
    """PEFT's own PiSSA: exact ("pissa") or its randomized SVD ("pissa_niter_N")."""
    return "pissa" if params["svd"] == "exact" else f"pissa_niter_{params['niter']}"


# under N data-parallel processes (bench.distributed; tested in tests/test_distributed.py)
DATA_PARALLEL = ("every process computes the initialization from the same weights and seed; DDP's wrap then "
                 "broadcasts rank 0's adapter and residual base weights, so all train rank 0's initialization")
GEORA = "Zhang et al. GeoRA: Geometry-Aware Low-Rank Adaptation for RLVR. ACL 2026 (arXiv 2601.09361)"
register(Method(name="geora", family=FAMILY,
                summary="GeoRA: adapters from the top-r SVD of the geometry-masked weight; "
                "residual frozen (rho 0.2)", cite=GEORA, adapter_init=geora_init, check_params=check_params,
                params={"rho": 0.2, "svd": "auto", "niter": 4}, data_parallel=DATA_PARALLEL))
register(Method(name="pissa", family=FAMILY,
                summary="PiSSA: adapters from the top-r SVD of W (PEFT's initializer); residual frozen",
                cite="Meng et al. PiSSA. NeurIPS 2024 (arXiv 2404.02948)", init_lora_weights=pissa_initializer,
                check_params=check_params, params={"svd": "exact", "niter": 4}, data_parallel=DATA_PARALLEL))
register(Method(name="milora", family=FAMILY,
                summary="MiLoRA: adapters from the minor r singular triplets of W; principal "
                "part frozen", cite="Wang et al. MiLoRA. NAACL 2025 (arXiv 2406.09044)",
                adapter_init=milora_init, data_parallel=DATA_PARALLEL))
