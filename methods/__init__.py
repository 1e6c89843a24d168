"""Method registry. A method is a small record of what it changes in the common GRPO recipe:

- `init_lora_weights` / `adapter_init`: how the adapter starts (PEFT's own initializer, or a custom one);
- `beta` and `grpo_overrides`: the objective (KL penalty, clipping, loss type);
- `trainer_hooks`: code installed on the trainer (e.g. PROMA's gradient projection), through the trainer's declared
  method contract only (bench.engine's docstring):
    trainer.add_step_metrics(dict)        this optimizer step's metrics.jsonl values
    trainer.set_method_summary(**fields)  summary.json fields (trainer.note(message, **fields): also a run.log line)
    trainer.wrap_compute_loss(wrapper)    wrapper(compute_loss, model, inputs, ...) around each micro-batch's loss
    install_loss_hook(trainer, hook)      a per-token term added to TRL's per-token loss (bench.engine)
    trainer.add_reward(func, name, w)     one more weighted reward function
    trainer.add_callback(callback)        a TrainerCallback; it runs before the harness's callbacks in every event,
                                          so the metrics row sees what it added at on_step_end;
- `params` / `check_params`: the method's parameters with their defaults, and their validation;
- `check_grpo`: validation of the run's effective TRL settings (e.g. PROMA refuses ratio clipping);
- `data_parallel`: what the method computes when a run is N data-parallel processes (`--nproc-per-run`,
  bench.distributed), where that is not simply the 1-process objective (bench.distributed.DEFAULT_MEANING);
- `refuses_sharding`: why the method cannot run where DeepSpeed partitions the gradients over the processes
  (`--sharding zero2`, bench.distributed.check_sharding); empty where it can (refused in preflight otherwise).

The reference policy of `kl_ref` and of the KL penalty is not a method field: it is always the *initial* policy
(bench.metrics.InitialPolicy; TRL's reference for LoRA is the initial adapter).

The harness reads these fields and never branches on a method's name. Methods compose with `+`
(e.g. `geora+kl`): each field comes from the one component that sets it; two components that set the same
field differently are an error.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

from bench.errors import BenchError, unknown_name

QWEN3_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    cite: str = ""
    family: str = ""                            # what `bench list` groups by (e.g. "loss variant")
    beta: float | None = None                   # KL coefficient toward the initial policy (None: unset -> 0)
    grpo_overrides: dict = field(default_factory=dict)
    init_lora_weights: bool | str | Callable | None = None  # PEFT initializer, or f(params) -> one (None: True)
    adapter_init: Callable | None = None         # custom initializer: f(peft_model, params) under no_grad
    trainer_hooks: tuple = ()                    # f(trainer, params) called once the trainer exists
    params: dict = field(default_factory=dict)   # method parameters and their defaults (recorded in config.json)
    check_params: Callable | None = None         # f(params) raising BenchError on a bad value
    # f(effective TRL settings dict) raising BenchError when the method cannot run with them. Called on the
    # method's own grpo_overrides (get_method: keys absent there are undecided) and on a run's full GRPOConfig
    # settings before any training (RunSpec validation; keys absent there take TRL's defaults).
    check_grpo: Callable | None = None
    # its meaning under N data-parallel processes, where a micro-batch statistic or cross-micro-batch state makes it
    # differ from the 1-process method ("": bench.distributed.DEFAULT_MEANING)
    data_parallel: str = ""
    # why it cannot run with its gradients partitioned over the processes (--sharding zero2: DeepSpeed moves each
    # micro-batch's gradients out of .grad into its partitioned buffers); "": it can
    refuses_sharding: str = ""

    def resolved_beta(self, params: dict | None = None) -> float:
        """The KL coefficient: the `beta` method parameter where the method has one, else the fixed field."""
        if "beta" in self.params:
            return float(self.resolve_params(params)["beta"])
        return 0.0 if self.beta is None else float(self.beta)

    def resolved_init(self, params: dict | None = None):
        init = True if self.init_lora_weights is None else self.init_lora_weights
        return init(self.resolve_params(params)) if callable(init) else init

    def modifies_base(self, params: dict | None = None) -> bool:
        """True when the initializer writes a residual into the base weights (SVD inits)."""
        return self.adapter_init is not None or self.resolved_init(params) is not True

    def resolve_params(self, overrides: dict | None = None) -> dict:
        """The method's defaults updated with user values; unknown keys and bad values are errors."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise BenchError(f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; valid: {valid}")
        params = {**self.params, **overrides}
        if self.check_params is not None:
            self.check_params(params)
        return params


METHODS: dict[str, Method] = {}
COMPONENTS: dict[str, Method] = {}  # composable parts that are not methods on their own (e.g. `kl`)


def register(method: Method, component_only: bool = False) -> Method:
    (COMPONENTS if component_only else METHODS)[method.name] = method
    return method


def _both(check_a, check_b):
    def check(settings):
        check_a(settings)
        check_b(settings)
    return check


def _merge(a: Method, b: Method) -> Method:
    merged = {}
    for f in fields(Method):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("name", "summary", "cite", "family"):
            merged[f.name] = f"{va}+{vb}" if f.name in ("name", "family") else f"{va}; {vb}"
        elif f.name in ("data_parallel", "refuses_sharding"):
            merged[f.name] = "; ".join(x for x in (va, vb) if x)
        elif f.name == "trainer_hooks":
            merged[f.name] = tuple(va) + tuple(vb)
        elif f.name in ("check_params", "check_grpo") and va is not None and vb is not None and va is not vb:
            merged[f.name] = _both(va, vb)
        elif f.name in ("grpo_overrides", "params"):
            clash = {k for k in set(va) & set(vb) if va[k] != vb[k]}
            if clash:
                raise BenchError(f"cannot compose {a.name}+{b.name}: both set {sorted(clash)}")
            merged[f.name] = {**va, **vb}
        else:
            empty = (None, ())
            if va not in empty and vb not in empty and va != vb:
                raise BenchError(f"cannot compose {a.name}+{b.name}: both set {f.name}")
            merged[f.name] = va if va not in empty else vb
    return Method(**merged)


def get_method(name: str) -> Method:
    """A registered method, or a `+`-composition of methods and components."""
    parts = [p.strip() for p in name.split("+")]
    pool = {**COMPONENTS, **METHODS}
    for p in parts:
        if p not in pool:
            raise unknown_name("method", p, list(METHODS) + [f"+{c}" for c in COMPONENTS])
    method = pool[parts[0]]
    for p in parts[1:]:
        method = _merge(method, pool[p])
    if method.check_grpo is not None:  # e.g. proma+gspo: GSPO's overrides are settings PROMA refuses
        try:
            method.check_grpo(method.grpo_overrides)
        except BenchError as e:
            raise BenchError(f"method {name!r}: {e}") from None
    return replace(method, name=name)


def method_names(spec: str) -> list[str]:
    """Expand a --methods value: `all` or a comma list."""
    names = list(METHODS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise BenchError("--methods is empty")
    for n in names:
        get_method(n)
    return names


from methods import covariance, entropy, lora_grpo, loss_variants, proma, svd_init  # noqa: E402,F401  (register)  # noqa: E402,F401  (register; after the adapter methods)
