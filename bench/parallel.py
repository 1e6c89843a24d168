"""How a sweep uses the machine's cores: runs at a time (--jobs auto), torch threads per run, and threads for a
run's forward passes. CPU float sums depend on the thread count, so these choices decide whether a run's metrics
are the same alone, in a parallel sweep and on SLURM."""
from __future__ import annotations

import functools
import os

import torch

from bench.device import local_gpus, resolve_device
from bench.errors import BenchError
from bench.generation import eval_mode, generate
from bench.models import load_config
from bench.spec import RunSpec
from bench.threads import env_threads, torch_threads


def cpu_count() -> int:
    """The cores this process may use: its CPU affinity, and inside a SLURM job step no more than it was allocated
    (clusters without task binding let a task see every core of the node)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(n, int(allocated)) if allocated.isdigit() and int(allocated) > 0 else n


# A model this small does not use several cores for one run (tiny matrices, Python-bound decoding): on CPU, its
# runs get one torch thread each and run side by side, one per core.
SMALL_MODEL_PARAMS = 50_000_000


def small_model_on_cpu(specs: list[RunSpec]) -> bool:
    if not specs or any(resolve_device(s.device) != "cpu" for s in specs):
        return False
    return max(model_parameters(m) for m in {s.model for s in specs}) < SMALL_MODEL_PARAMS


def default_threads(specs: list[RunSpec]) -> int | None:
    """Torch threads per run unless BENCH_NUM_THREADS says otherwise: 1 for a small model on CPU, whatever the
    machine and however many runs go at once, so that a run's metrics are the same alone, in a local sweep, on
    SLURM and on a machine with more cores (CPU float sums depend on the thread count). None: torch's default."""
    return 1 if small_model_on_cpu(specs) else None


def auto_jobs(specs: list[RunSpec]) -> int:
    """--jobs auto: on a CUDA machine, one run per visible GPU (bench.device); on CPU with a model under 50M
    parameters, one run per core (at most one per 2 GiB of available memory); otherwise one run at a time."""
    if gpus := local_gpus(specs):
        return max(1, min(len(gpus), len(specs)))
    if not small_model_on_cpu(specs):
        return 1
    try:
        import psutil
        by_memory = max(1, int(psutil.virtual_memory().available // 2**31))
    except ImportError:
        by_memory = cpu_count()
    return max(1, min(cpu_count(), by_memory, len(specs)))


@functools.cache
def model_parameters(model: str) -> int:
    """Once per model and process: asked by --jobs auto and again by every run for its thread count."""
    return _parameter_count(load_config(model))


def _parameter_count(config) -> int:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # the architecture without memory or weights
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters())


def run_threads(spec: RunSpec) -> int | None:
    """Torch threads for a run: BENCH_NUM_THREADS if set; else 1 for a model under 50M parameters on CPU
    (default_threads), wherever the run happens; else None (the process's setting)."""
    if pinned := env_threads("BENCH_NUM_THREADS"):
        return pinned
    try:
        return default_threads([spec])
    except BenchError:  # the model's configuration is unreadable: the run itself will say why
        return None


# The cores this process may use for one run's forward passes: None = all of them (a parallel sweep's worker sets
# its share with set_forward_cores).
_FORWARD_CORES: int | None = None
MAX_FORWARD_THREADS = 4  # a cap, not a measurement: only 1 vs 2 threads was timed (bench.perf, README)


def set_forward_cores(n: int | None) -> None:
    """The cores this process's runs may use for their forward passes (None: all of them)."""
    global _FORWARD_CORES
    _FORWARD_CORES = n


def forward_threads(spec: RunSpec, model, tokenizer, prompts: list) -> int | None:
    """Threads for the run's forward passes (rollout generation, old and reference log-probs, the training forward,
    greedy evals, metric forwards) where a small model runs with one thread (run_threads): the run's free cores.
    Backward passes keep the run's one thread: LoRA weight gradients sum over tokens, and those sums are split
    across threads. Used only where forward_is_thread_invariant holds on this model and machine (checked once per
    process for each model structure, see _INVARIANT), so the metrics stay those of the same run inside a parallel
    sweep. None: no split."""
    if pinned := env_threads("BENCH_FORWARD_THREADS"):
        return pinned
    if env_threads("BENCH_NUM_THREADS") or run_threads(spec) != 1:
        return None
    n = min(_FORWARD_CORES or cpu_count(), MAX_FORWARD_THREADS)
    if n <= 1:
        return 1
    key = (model_structure(model), n, spec.temperature, repr(list(prompts[:INVARIANCE_PROMPTS])))  # text or chat
    if key not in _INVARIANT:
        _INVARIANT[key] = forward_is_thread_invariant(model, tokenizer, prompts, n, spec.temperature)
    return n if _INVARIANT[key] else 1


# forward_is_thread_invariant's answers in this process, per model structure, thread count, temperature and prompts:
# whether n threads change a float depends on how the kernels split their sums, which follows the tensors' shapes,
# dtypes and devices, not their values; so the later runs of a sequential sweep (or a test session) reuse it
_INVARIANT: dict = {}


def model_structure(model) -> tuple:
    """What decides the kernels a model's forward and backward run: its class and configuration (PEFT's adapter
    configuration too), and each parameter's name, shape, dtype, device and whether it trains; not the values."""
    config = getattr(model, "config", None)
    adapters = getattr(model, "peft_config", None)
    return (type(model).__name__, config.to_json_string() if hasattr(config, "to_json_string") else repr(config),
            repr(adapters), tuple((name, tuple(p.shape), str(p.dtype), str(p.device), p.requires_grad)
                                  for name, p in model.named_parameters()))


def decode_threads(forward: int | None) -> int | None:
    """Threads for token-by-token decoding (rollouts, greedy evals, the probe set's sampling) in a run whose forward
    passes use `forward` threads (forward_threads): one where forward_threads split them (its check makes one
    thread's floats equal), else `forward`. Why: a decode step of a small model is hundreds of operations of
    microseconds each, and every parallel region waits for all its threads; with another process on a core, a step
    waits for a descheduled thread (measured on 2 cores, one rollout of 64 x 64 tokens: 0.36-0.46 s on 2 threads
    and 0.42-0.51 s on 1 while the machine was otherwise idle; 10-12 s on 2 threads and 0.45-0.65 s on 1 while
    another process shared the cores). A pinned BENCH_FORWARD_THREADS applies to decoding too."""
    if forward is None or forward <= 1 or env_threads("BENCH_FORWARD_THREADS"):
        return forward
    return 1


INVARIANCE_PROMPTS = 64  # forward_is_thread_invariant's rows: a generation batch's worth


def forward_is_thread_invariant(model, tokenizer, prompts: list, n: int, temperature: float = 1.0) -> bool:
    """Whether forwards on n threads give this model's one-thread floats, checked bitwise on what the run does: a
    short greedy generation (adapters folded, as for rollouts and evals) and a logits forward; and TRL's training
    path, the backbone forward with gradients and TRL's fused log-prob head (pinned trl 1.16), on n threads, with
    its backward on one thread: log-probs, entropies and every gradient."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    prompts = list(prompts)[:INVARIANCE_PROMPTS]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = base.get_decoder(), base.get_output_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def once(threads):
        with torch_threads(threads), torch.no_grad():
            texts, out = generate(model, tokenizer, prompts, max_new_tokens=8, greedy=True, batch_size=len(prompts))
            prompt_ids, prompt_mask, completion_ids = out["batches"][0]
            ids = torch.cat([prompt_ids, completion_ids], 1)
            mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
            with eval_mode(model):
                logits = model(input_ids=ids, attention_mask=mask).logits
        rows = slice(0, 16)  # a micro-batch
        with eval_mode(model), torch.enable_grad():
            with torch_threads(threads):
                hidden = backbone(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state[:, :-1]
                fused = _ChunkedLogProbFunction.apply(
                    hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, ids[rows, 1:].reshape(-1),
                    temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, OPTIONAL_OUTPUTS)
            loss = (fused[0] * mask[rows, 1:].reshape(-1)).sum() + fused[1].sum()
            grads = torch.autograd.grad(loss, trainable) if trainable and loss.requires_grad else ()
        return texts, [logits, *(t for t in fused if t is not None), *grads]

    (texts_1, tensors_1), (texts_n, tensors_n) = once(1), once(n)
    return texts_1 == texts_n and all(torch.equal(a, b) for a, b in zip(tensors_1, tensors_n))
