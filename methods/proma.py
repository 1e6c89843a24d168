"""PROMA: projected microbatch accumulation (Abrahamsen, arXiv 2601.10498).

Accumulation variant (`proma`, the paper's main method; the author's VeRL fork, dp_actor.py). For every trainable
weight W (d_out x d_in) of an nn.Linear (LoRA: lora_A and lora_B; rank `full`: the projections) and every
micro-batch m of an optimizer step, inside the backward pass:
  g_i   = sum_t G_it^T X_it                            # sequence-wise log-prob gradient (advantages set to 1):
                                                       #   output grads G x input activations, split by sequence
  p_m   = sum_i A_i g_i                                # micro-batch policy gradient (group-normalized A_i)
  gh_i  = g_i / (||g_i||_F + 1e-8)
  proj  = sum_i w_i gh_i,  w = (K + ridge I)^-1 b      # exact: K_ij = <gh_i, gh_j>, b_i = <acc, gh_i>
          or sweeps x { a <- a - <a, gh_i> gh_i }      # approx: sequential deflation (the author's GSM8K runs)
  proj <- proj * min(1, cap ||p_m|| / ||proj||)        # norm cap (0.5 in the GSM8K runs)
  acc  <- acc - s * proj + p_m                         # acc: the running gradient (first micro-batch: acc = p_m)
Layer-wise (Frobenius products per tensor). No reference policy, no KL term, no ratio clipping (epsilon 1e9, the
author's "pure" setting); TRL's group-normalized advantages are unchanged. Loss aggregation: the author's VeRL
`token-mean` (a mean over the micro-batch's tokens) is TRL's `bnpo`, which the proma-gsm8k preset sets; TRL's
`dapo` divides by the generation batch's token count instead, and `grpo` (the suite's default) is a per-sequence
token mean. The loss is backpropagated with advantages 1 (the author's include_advantages_in_loss=False) so that
the output gradients give every sequence's log-prob gradient, also where A_i = 0; p_m is rebuilt from them with
the true advantages, which equals the gradient of TRL's loss exactly when that loss is sum_i A_i l_i(theta) and
nothing else (check_grpo below lists the TRL settings that break this, and refuses them). Advantages and masks are
read from the micro-batch's own inputs, so TRL's shuffling of sequences into micro-batches is harmless.
Only Linear weights whose forward runs as a module call get a projected gradient. At rank `full` the harness trains
exactly those for every method (bench.policy); should a trainer hold any other trainable tensor, it is frozen here
and said so (the author's code left norms and embeddings the advantage-free gradient, a latent quirk we do not
reproduce). An untied LM head is never projected: TRL's fused log-prob head multiplies by `lm_head.weight` directly,
so the module's hooks cannot see its per-sequence gradients. A projected weight whose gradient arrives without its
forward hooks having fired is an error (it would keep the advantage-free gradient).

Intra-microbatch variant (`proma_intra`, paper v3/v4). THE EXACT FORMULA IS NOT IN ANY SOURCE WE COULD READ: it is
reconstructed from the abstract ("a factored projection built from the dominant subspaces of activations and of
output gradients, applied independently within each micro-batch") and the author's run scripts (proma_intra_dim k,
eig_iters 1, shrinkage 1, a randomized SVD + QR per Linear). Per Linear and micro-batch, with X, G all its
(unpadded) tokens' activations and output gradients of the ordinary loss:
  Q_X = top-k right singular subspace of X,  Q_G = top-k right singular subspace of G   # randomized range finder
                                                        # (exact eigh of the d x d Gram up to d = 512: cheaper)
  p_m <- p_m - s * Q_G (Q_G^T p_m Q_X) Q_X^T                                           # remove span(Q_G) x span(Q_X)
  acc <- acc + p_m                                                                       # ordinary accumulation
k per side is min(k, max(1, dim // 10)) (our choice: k = 100 is the author's GSM8K value for Qwen3-0.6B full
fine-tuning, hidden size 1024; a narrower model or adapter side projects the same tenth of its width).
Whose output gradients span Q_G is a second reconstruction choice, the parameter `output_grads`: "loss" (default)
takes those of TRL's loss (advantages applied); "logprob" those of the advantage-free loss (advantages 1), which is
what the author's hook machinery computes for the accumulation variant. With "logprob" the micro-batch gradient is
rebuilt from them as p_m = sum_bt A_b G_bt^T X_bt (same exactness conditions as the accumulation variant). No
source we could read says which one the intra variant uses, so the default is unchanged.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from bench.errors import BenchError
from methods import Method, register

CITE = "Abrahamsen. PROMA: Projected Microbatch Accumulation for Reference-Free Proximal Policy Updates. " \
       "arXiv 2601.10498 (2026)"
NORM_EPS = 1e-8  # the author's normalization constant for g_i


# ---- the math, on plain tensors --------------------------------------------------------------------------------

def sequence_gradients(x: torch.Tensor, out_grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence weight gradients of a Linear, flattened: g_i = sum_t G_it^T X_it over unpadded tokens.
    x: [B, L, d_in], out_grad: [B, L, d_out], mask: [B, L] -> [B, d_out * d_in] (fp32)."""
    g = out_grad.float() * mask[..., None].to(torch.float32)
    return torch.einsum("blo,bli->boi", g, x.float()).flatten(1)


def projection(acc: torch.Tensor, g_hat: torch.Tensor, mode: str, ridge: float, sweeps: int) -> torch.Tensor:
    """The component of acc (flat [D]) in span{g_hat_i} (rows of g_hat [B, D]), exact or by deflation sweeps."""
    b = g_hat @ acc
    gram = g_hat @ g_hat.T
    if mode == "exact":
        coef = torch.linalg.solve(gram + ridge * torch.eye(len(b), dtype=gram.dtype, device=gram.device), b)
    else:  # a <- a - <a, gh_i> gh_i, i = 1..B, `sweeps` times; tracked as a = acc - sum_j c_j gh_j (Gauss-Seidel)
        b_cpu, gram_cpu = b.double().cpu(), gram.double().cpu()  # B x B: one transfer instead of B^2 tiny kernels
        coef = torch.zeros_like(b_cpu)
        for _ in range(sweeps):
            for i in range(len(b_cpu)):
                coef[i] += b_cpu[i] - gram_cpu[i] @ coef
        coef = coef.to(g_hat)
    return coef @ g_hat


def capped(proj: torch.Tensor, reference_norm: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """proj scaled down to at most cap * reference_norm; also whether it was (a 0-dim bool tensor, no device sync)."""
    norm, limit = proj.norm(), cap * reference_norm
    was_capped = norm > limit
    scale = torch.where(was_capped, limit / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
    return proj * scale, was_capped


EXACT_MAX_DIM = 512  # up to this width the d x d Gram + eigh is exact and cheaper than the sketch


def top_subspace(m: torch.Tensor, k: int, power_iters: int, oversample: int, generator) -> torch.Tensor:
    """An orthonormal basis [d, k] of the top-k right singular subspace of m [T, d]: randomized range finder
    (Gaussian sketch of m^T m, `power_iters` power iterations with QR, then a small SVD) for wide m; the exact
    eigenvectors of m^T m when d <= EXACT_MAX_DIM or the sketch would be as wide as d."""
    d = m.shape[1]
    width = k + oversample
    if width >= d or d <= EXACT_MAX_DIM:
        _, vecs = torch.linalg.eigh(m.T @ m)
        return vecs[:, -k:]
    omega = torch.randn(d, width, generator=generator, device=m.device, dtype=m.dtype)
    q, _ = torch.linalg.qr(m.T @ (m @ omega))
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(m.T @ (m @ q))
    _, _, vh = torch.linalg.svd(m @ q, full_matrices=False)
    return q @ vh[:k].T


def intra_width(k: int, dim: int) -> int:
    return min(k, max(1, dim // 10))


def factored_removal(grad: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """Q_G (Q_G^T grad Q_X) Q_X^T: the block of grad [d_out, d_in] in span(Q_G) x span(Q_X)."""
    return q_out @ (q_out.T @ grad @ q_in) @ q_in.T


# ---- the hooks ---------------------------------------------------------------------------------------------------

def projected_linears(model) -> dict[str, torch.nn.Linear]:
    """Linear modules whose own (unshared) weight trains: lora_A/lora_B under LoRA, the projections at rank full.
    Never the LM head: TRL 1.16's fused log-prob head uses `lm_head.weight` without calling the module, so its
    hooks would never see the head's output gradients."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and m.weight.requires_grad
            and uses[id(m.weight)] == 1}


class _Slot:
    __slots__ = ("name", "module", "x", "out_grad")

    def __init__(self, name, module):
        self.name, self.module, self.x, self.out_grad = name, module, None, None


class Projector:
    """PROMA's per-tensor projection, run by hooks inside the backward pass (no extra forward or backward).

    A forward hook keeps each Linear's input and puts a hook on its output, which receives the output gradient
    before the weight gradient is formed; the weight's own tensor hook then runs before autograd adds the
    micro-batch gradient to .grad (which still holds the running sum) and returns the gradient to add.
    `begin(attention_mask, advantages)` is called per micro-batch before its forward pass.
    """

    def __init__(self, model, params: dict, intra: bool, seed: int = 0, record: bool = False):
        self.params, self.intra, self.record = params, intra, record
        # the backward carries advantage-free (advantages 1) output gradients; the hooks apply the advantages
        self.advantage_free = not intra or params.get("output_grads", "loss") == "logprob"
        self.slots = [_Slot(n, m) for n, m in projected_linears(model).items()]
        if not self.slots:
            raise BenchError("PROMA found no trainable Linear weights to project")
        self.collecting = False
        self.armed = False  # from the first begin() on, every gradient of a projected weight must come via the hooks
        self.calls = 0  # weight-hook invocations that rebuilt a gradient
        self.mask = self.advantages = None
        self.seed = seed
        self._generators: dict = {}
        self.recorded: dict[str, torch.Tensor] = {}
        self.reset_stats()
        self.handles = []
        for slot in self.slots:
            self.handles.append(slot.module.register_forward_hook(self._forward_hook(slot)))
            self.handles.append(slot.module.weight.register_hook(self._weight_hook(slot)))

    def remove(self):
        for h in self.handles:
            h.remove()

    def reset_stats(self):
        # device tensors, read once per optimizer step (no host sync inside the backward pass)
        self.removed_sq = self.total_sq = self.n_capped = 0
        self.n_projected = 0

    def stats(self) -> dict:
        total = float(self.total_sq)
        if not total:
            return {}
        out = {"proma_removed_frac": (float(self.removed_sq) / total) ** 0.5}
        if self.n_projected:
            out["proma_capped_frac"] = float(self.n_capped) / self.n_projected
        return out

    def begin(self, attention_mask: torch.Tensor, advantages: torch.Tensor | None):
        if self.advantage_free and advantages is None:
            raise ValueError("PROMA: the advantage-free backward needs the micro-batch's advantages")
        self.mask, self.advantages = attention_mask, advantages
        self.armed = True
        self._subspaces = {}  # intra: q/k/v (and gate/up) share one input tensor, so one Q_X per micro-batch
        for slot in self.slots:
            slot.x = slot.out_grad = None

    def _forward_hook(self, slot):
        def hook(module, args, output):
            if not (self.collecting and torch.is_grad_enabled()):
                return
            if slot.x is not None:
                raise RuntimeError(f"PROMA: {slot.name} ran twice in one micro-batch (turn gradient checkpointing off)")
            slot.x = args[0].detach()

            def keep(grad):
                slot.out_grad = grad
            output.register_hook(keep)
        return hook

    def _weight_hook(self, slot):
        def hook(grad):
            if not self.armed:  # a backward before any micro-batch was announced (none in the harness)
                return None
            if slot.x is None or slot.out_grad is None:  # the module's forward was bypassed (e.g. a fused head)
                raise BenchError(f"PROMA: the gradient of {slot.name} arrived but its forward hooks never fired "
                                 "in this micro-batch; it would train on an unprojected gradient")
            x, out_grad = slot.x, slot.out_grad
            slot.x = slot.out_grad = None
            self.calls += 1
            mask = self.mask[:, -x.shape[1]:].to(x.device)
            weight = slot.module.weight
            if self.intra:
                return self._intra(slot, grad, x, out_grad, mask)
            return self._accumulate(slot, weight, x, out_grad, mask)
        return hook

    def _accumulate(self, slot, weight, x, out_grad, mask):
        p = self.params
        g = sequence_gradients(x, out_grad, mask)                                   # g_i (advantages 1)
        policy_grad = (self.advantages.to(g)[:, None] * g).sum(0)                   # p_m = sum_i A_i g_i
        if self.record:
            self.recorded[slot.name] = g
        acc = weight.grad
        if acc is None:                                                             # first micro-batch
            return policy_grad.view_as(weight).to(weight.dtype)
        g_hat = g / (g.norm(dim=1, keepdim=True) + NORM_EPS)                         # gh_i
        flat = acc.detach().flatten().float()
        proj = projection(flat, g_hat, p["mode"], p["ridge"], p["sweeps"])          # in span{gh_i}
        proj, was_capped = capped(proj, policy_grad.norm(), p["cap"])               # norm cap
        removal = p["shrinkage"] * proj
        acc.sub_(removal.view_as(acc).to(acc.dtype))                                # acc <- acc - s proj
        self.removed_sq = self.removed_sq + removal.square().sum()
        self.total_sq = self.total_sq + flat.square().sum()
        self.n_projected += 1
        self.n_capped = self.n_capped + was_capped.int()
        return policy_grad.view_as(weight).to(weight.dtype)                        # autograd adds p_m

    def _generator(self, device):
        if device not in self._generators:  # a private stream: never perturbs training's sampling RNG
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _intra(self, slot, grad, x, out_grad, mask):
        p = self.params
        keep = mask.bool()                                                        # the micro-batch's real tokens
        d_out, d_in = grad.shape
        k_in, k_out = intra_width(p["k"], d_in), intra_width(p["k"], d_out)
        gen = self._generator(x.device)
        key = (x.data_ptr(), tuple(x.shape), k_in)
        if key not in self._subspaces:
            self._subspaces[key] = top_subspace(x[keep].float(), k_in, p["power_iters"], p["oversample"], gen)
        q_in = self._subspaces[key]                                                                  # Q_X
        q_out = top_subspace(out_grad[keep].float(), k_out, p["power_iters"], p["oversample"], gen)  # Q_G
        if self.advantage_free:  # p_m = sum_bt A_b G_bt^T X_bt from the advantage-free output gradients
            weight = (mask.to(torch.float32) * self.advantages.to(x.device, torch.float32)[:, None])[..., None]
            g32 = torch.einsum("blo,bli->oi", out_grad.float() * weight, x.float())
        else:
            g32 = grad.float()
        removal = p["shrinkage"] * factored_removal(g32, q_out, q_in)
        self.total_sq = self.total_sq + g32.square().sum()
        self.removed_sq = self.removed_sq + removal.square().sum()
        return (g32 - removal).to(grad.dtype)                                       # p_m - s Q_G Q_G^T p_m Q_X Q_X^T


# ---- installation on TRL's GRPOTrainer ---------------------------------------------------------------------------

class _StepStats(TrainerCallback):
    """Per optimizer step: proma_removed_frac = sqrt(sum ||s proj||^2 / sum ||acc||^2) over projected tensors
    (intra: over micro-batch gradients), proma_capped_frac = share of projections the norm cap shortened."""

    def __init__(self, trainer, projector):
        self.trainer, self.projector = trainer, projector

    def on_step_begin(self, args, state, control, **kw):
        self.projector.reset_stats()

    def on_step_end(self, args, state, control, **kw):  # before the harness's callbacks (bench.engine's contract)
        self.trainer.add_step_metrics(self.projector.stats())

    def on_train_end(self, args, state, control, **kw):
        self.trainer.set_method_summary(proma_weight_hook_calls=self.projector.calls)


NO_CLIP = 1e9  # the author's clip ratios ("pure" runs): a ratio never gets near them
SURROGATE_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # -rho A per token; they differ in aggregation only


def check_grpo(settings: dict) -> None:
    """Refuse the TRL 1.16 settings under which the backward with advantages 1 does not give PROMA's gradients.
    Read off GRPOTrainer._compute_loss. The trick is exact when TRL's loss is sum_i A_i l_i(theta) and nothing else
    (l_i: sequence i's loss at A_i = 1); these break that:
      epsilon < 1e9, epsilon_high < 1e9   clipping: min(rho A, clip(rho) A) picks its branch by the sign of A
      delta                               two-sided clipping: the min picks clamp(rho, delta) A only where A > 0
      loss_type sapo, vespo               soft gate / gamma weights with separate parameters for A > 0 and A < 0
      off_policy_mask_threshold           drops sequences by the sign of A
      beta != 0                           a KL term that carries no advantage
      entropy_coef != 0, use_adaptive_entropy   an entropy bonus that carries no advantage
      router_aux_loss_coef != 0           an MoE load-balancing loss (also checked on the trainer: the model decides)
    and these keep the trick exact but are not PROMA's objective, the unclipped token-level surrogate over every
    completion token (the sequence gradients g_i it projects against would change meaning):
      loss_type cispo                     truncated-IS REINFORCE with a stop-gradient weight
      importance_sampling_level sequence  GSPO's sequence ratio in place of the per-token ratios
      top_entropy_quantile < 1            only the high-entropy tokens carry gradient
    Keys absent from `settings` are not decided there (a method's own overrides) or are TRL's defaults."""
    s = settings
    problems = []

    def number(name, default):
        value = s.get(name, default)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    loss_type = s.get("loss_type")
    if loss_type is not None and loss_type not in SURROGATE_LOSSES:
        problems.append(f"loss_type {loss_type!r} (valid: {', '.join(SURROGATE_LOSSES)})")
    for name in ("epsilon", "epsilon_high"):
        value = s.get(name)
        if value is not None and not (isinstance(value, (int, float)) and value >= NO_CLIP):
            problems.append(f"ratio clipping ({name}={value!r}; PROMA runs unclipped, {name} >= {NO_CLIP:g})")
    if s.get("delta") is not None:
        problems.append(f"two-sided clipping (delta={s['delta']!r})")
    if s.get("importance_sampling_level", "token") != "token":
        problems.append(f"importance_sampling_level {s['importance_sampling_level']!r} (PROMA: token)")
    if number("top_entropy_quantile", 1.0) < 1.0:
        problems.append(f"top_entropy_quantile {s['top_entropy_quantile']!r} (PROMA: 1.0, every token)")
    if s.get("off_policy_mask_threshold") is not None:
        problems.append("off_policy_mask_threshold (drops sequences by the sign of their advantage)")
    if number("beta", 0.0) != 0.0:
        problems.append(f"a KL term (beta={s['beta']!r})")
    if number("entropy_coef", 0.0) != 0.0 or s.get("use_adaptive_entropy"):
        problems.append("an entropy bonus (entropy_coef / use_adaptive_entropy)")
    if number("router_aux_loss_coef", 0.0) != 0.0:
        problems.append("an MoE auxiliary loss (router_aux_loss_coef)")
    if problems:
        raise BenchError("PROMA cannot run with " + "; ".join(problems))


def check_trainer(trainer) -> None:
    """The same check on the trainer TRL built (a backstop, and what only the model decides: an MoE aux loss)."""
    check_grpo({**vars(trainer.args), "beta": trainer.beta})
    if getattr(trainer, "loss_hook", None) is not None:  # bench.engine's per-token loss term (kl_cov, clip_cov)
        raise BenchError("PROMA cannot be combined with a per-token loss hook (e.g. kl_cov, clip_cov)")
    if getattr(trainer, "aux_loss_enabled", False):
        raise BenchError("PROMA cannot run with an auxiliary (MoE load-balancing) loss")


def _install(trainer, params: dict, intra: bool) -> Projector:
    check_trainer(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "peft_config"):  # rank full: only hookable Linear weights get a projected gradient
        hooked = {id(m.weight) for m in projected_linears(model).values()}
        frozen = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in hooked]
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        if frozen:  # bench.policy trains Linear weights only at rank full: this is for trainers built otherwise
            trainer.note(f"{len(frozen)} tensors frozen ({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}):"
                         " PROMA projects the hookable Linear weights only", proma_frozen_tensors=len(frozen))
    projector = Projector(model, params, intra=intra, seed=trainer.args.seed)
    hooked = {id(s.module.weight) for s in projector.slots}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in hooked]
    if stray:  # they would silently train on the advantage-free gradient
        raise BenchError(f"PROMA: trainable tensors outside the hooked Linear weights: {', '.join(stray[:3])}")
    if not intra and trainer.args.gradient_accumulation_steps == 1:
        trainer.note("one micro-batch per optimizer step: nothing to project (PROMA is plain accumulation here)",
                     proma_nothing_to_project=True)
    def projected_compute_loss(compute_loss, model, inputs, *args, **kwargs):
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        if projector.advantage_free:  # backprop log-prob gradients (advantages 1); the hooks apply the advantages
            projector.begin(mask, inputs["advantages"].detach())
            inputs = {**inputs, "advantages": torch.ones_like(inputs["advantages"])}
        else:
            projector.begin(mask, None)
        projector.collecting = True
        try:
            return compute_loss(model, inputs, *args, **kwargs)
        finally:
            projector.collecting = False

    trainer.wrap_compute_loss(projected_compute_loss)
    trainer.add_callback(_StepStats(trainer, projector))
    trainer.proma = projector
    return projector


def install_proma(trainer, params: dict) -> Projector:
    return _install(trainer, params, intra=False)


def install_proma_intra(trainer, params: dict) -> Projector:
    return _install(trainer, params, intra=True)


def check_params(params: dict) -> None:
    if "mode" in params and params["mode"] not in ("approx", "exact"):
        raise BenchError(f"bad mode {params['mode']!r}: valid: approx, exact")
    for name in ("cap", "k", "ridge", "sweeps"):
        if name in params and not (isinstance(params[name], (int, float)) and not isinstance(params[name], bool)
                                   and params[name] > 0):
            raise BenchError(f"bad {name} {params[name]!r}: must be > 0")
    for name in ("k", "sweeps", "power_iters", "oversample"):
        if name in params and not (isinstance(params[name], int) and params[name] >= 0):
            raise BenchError(f"bad {name} {params[name]!r}: must be an integer")
    if "shrinkage" in params and not (isinstance(params["shrinkage"], (int, float)) and 0 <= params["shrinkage"] <= 1):
        raise BenchError(f"bad shrinkage {params['shrinkage']!r}: must be in [0, 1]")
    if "output_grads" in params and params["output_grads"] not in ("loss", "logprob"):
        raise BenchError(f"bad output_grads {params['output_grads']!r}: valid: loss, logprob")


# Under N data-parallel processes (bench.distributed): DDP accumulates each process's micro-batch gradients locally
# and all-reduces the sum once, after the step's last micro-batch; the projection runs in the backward pass, before
# that all-reduce, so each process projects its own running sum off its own micro-batches (micro_batch / N
# sequences each) and the all-reduce averages the projected sums. The intra variant is per micro-batch: data-parallel
# by construction (the paper), over each process's micro-batch.
PROMA_DATA_PARALLEL = ("projected per process before the all-reduce: each process's running gradient off its own "
                       "micro-batches (micro_batch / N sequences); DDP averages the projected sums; "
                       "proma_removed_frac is rank 0's")
INTRA_DATA_PARALLEL = ("per micro-batch, data-parallel by construction (the paper): subspaces of each process's "
                       "micro-batch (micro_batch / N sequences); proma_removed_frac is rank 0's")
# ZeRO-2 (DeepSpeed's stage_1_and_2.py) sets each weight's .grad to None once it has moved the micro-batch's gradient
# into its partitioned buffers: the running sum that PROMA projects would be gone at every micro-batch
PROMA_REFUSES_SHARDING = ("projects the running gradient sum that each weight's .grad holds between micro-batches; "
                          "DeepSpeed ZeRO-2 moves every micro-batch's gradient out of .grad into its partitioned "
                          "buffers (use --sharding ddp)")
NO_CLIPPING = {"epsilon": NO_CLIP}  # the author's "pure" runs: clip ratios 1e9 (epsilon_high follows epsilon)

register(Method(
    name="proma", family="PROMA", summary="PROMA: running gradient projected off each micro-batch's sequence gradients "
    "(no KL, no clipping)", cite=CITE, beta=0.0, grpo_overrides=NO_CLIPPING, trainer_hooks=(install_proma,),
    check_params=check_params, check_grpo=check_grpo, data_parallel=PROMA_DATA_PARALLEL,
    refuses_sharding=PROMA_REFUSES_SHARDING,
    params={"mode": "approx", "sweeps": 2, "ridge": 1e-2, "cap": 0.5, "shrinkage": 1.0}))
register(Method(
    name="proma_intra", family="PROMA",
    summary="Intra-PROMA: each micro-batch gradient loses its block in the top-k activation x "
    "output-gradient subspaces (reconstructed; no KL, no clipping)", cite=CITE, beta=0.0,
    grpo_overrides=NO_CLIPPING, trainer_hooks=(install_proma_intra,), check_params=check_params,
    check_grpo=check_grpo,  # the same premise (no KL, no clipping); output_grads="logprob" also needs exactness
    data_parallel=INTRA_DATA_PARALLEL,
    params={"k": 100, "power_iters": 1, "oversample": 8, "shrinkage": 1.0, "output_grads": "loss"}))
register(Method(
    name="unclipped_lora", family="KL-free LoRA",
    summary="LoRA GRPO with neither KL nor ratio clipping: PROMA's baseline without the "
    "projection", cite=CITE, beta=0.0, grpo_overrides=NO_CLIPPING))
