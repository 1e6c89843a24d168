"""Policies by name: the embedded `tiny` Qwen3 (built locally, cached) or any Hugging Face id / local path.

`tiny` is a Qwen3ForCausalLM with Qwen3-0.6B's module names (q/k/v/o/gate/up/down_proj) and a byte-level BPE
tokenizer trained on synth-gsm text, both saved in standard Hugging Face format (safetensors). It is
warm-started by supervised next-token training on synth-gsm train and stopped on an accuracy band on the
dev split, so that GRPO groups have reward variance. The build is deterministic and cached on disk under a key
of its full configuration; concurrent builders (e.g. SLURM array tasks) serialise on a file lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.errors import BenchError
from bench.generation import greedy_accuracy
from bench.io import atomic_write_json
from bench.threads import torch_threads
from tasks import get_task
from tasks.base import plain_prompt

BUILDER_VERSION = 3  # 3: built with BUILD_THREADS threads on every machine
EOS = "<|endoftext|>"
# CPU float sums depend on the torch thread count (gradients of skinny matrices split their long dimension), so the
# build pins it: the same model on a laptop, a 64-core node or a 1-CPU SLURM task (on the same CPU kind).
BUILD_THREADS = 2


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the embedded model; its hash is the cache key."""
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vocab_size: int = 512
    max_position_embeddings: int = 256
    task_params: dict = field(default_factory=dict)  # synth-gsm parameters of the warm-start data
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_warmup: int = 50
    sft_max_steps: int = 3000
    check_every: int = 25
    stop_accuracy: float = 0.35  # stop once dev accuracy reaches this (band for the eval split: 15%..60%)
    max_new_tokens: int = 80
    seed: int = 0

    def key(self) -> str:
        task = get_task("synth-gsm", **self.task_params).describe()  # resolved defaults are part of the key
        blob = json.dumps({"v": BUILDER_VERSION, **asdict(self), "task": task}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "grpo-bench"))


def tiny_dir(spec: TinySpec | None = None) -> Path:
    spec = spec or TinySpec()
    return cache_root() / "models" / f"tiny-{spec.key()}"


def build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Single digits (as Qwen's tokenizer does) so that numbers are spelled digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, padding_side="left",
                                   model_max_length=1024)


def _sft_batches(tokenizer, examples, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of prompt+completion with the loss on completion tokens only."""
    prompts = [tokenizer(plain_prompt(e.question), add_special_tokens=False)["input_ids"] for e in examples]
    answers = [tokenizer(" " + e.answer + EOS, add_special_tokens=False)["input_ids"] for e in examples]
    pad = tokenizer.pad_token_id
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            seqs = [prompts[i] + answers[i] for i in idx]
            width = max(map(len, seqs))
            ids = torch.full((batch_size, width), pad)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, i in enumerate(idx):
                n_p, n = len(prompts[i]), len(seqs[row])
                ids[row, :n] = torch.tensor(seqs[row])
                labels[row, n_p:n] = torch.tensor(answers[i])
                mask[row, :n] = 1
            yield ids, mask, labels


def build_tiny(spec: TinySpec | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the embedded model; returns its directory."""
    spec = spec or TinySpec()
    out = tiny_dir(spec)
    if (out / "build_info.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it built
        if (out / "build_info.json").is_file():
            return out
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with torch_threads(BUILD_THREADS):
            info = _build_tiny_into(spec, tmp, progress)
        atomic_write_json(tmp / "build_info.json", info)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def _build_tiny_into(spec: TinySpec, path: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm
    from transformers import Qwen3Config, Qwen3ForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    task = get_task("synth-gsm", **spec.task_params)
    train, dev = task.examples("train"), task.examples("dev")
    corpus = [plain_prompt(e.question) + " " + e.answer for e in train]
    tokenizer = build_tokenizer(corpus, spec.vocab_size)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager", use_cache=True)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / spec.sft_warmup))
    batches = _sft_batches(tokenizer, train, spec.sft_batch_size, torch.Generator().manual_seed(spec.seed))
    dev_prompts, dev_golds = [plain_prompt(e.question) for e in dev], [e.gold for e in dev]
    accuracy, history = 0.0, []
    bar = tqdm(total=spec.sft_max_steps, desc="building tiny model (SFT warm-start)", disable=not progress)
    step = 0
    for step in range(1, spec.sft_max_steps + 1):
        ids, mask, labels = next(batches)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step % spec.check_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, dev_prompts, dev_golds, spec.max_new_tokens)["accuracy"]
            history.append({"step": step, "loss": round(loss.item(), 4), "dev_accuracy": accuracy})
            bar.set_postfix(loss=f"{loss.item():.3f}", dev_acc=f"{accuracy:.2f}")
            if accuracy >= spec.stop_accuracy:
                break
    bar.close()
    if accuracy < spec.stop_accuracy:
        raise BenchError(f"tiny model: dev accuracy {accuracy:.2f} < {spec.stop_accuracy} after "
                         f"{spec.sft_max_steps} SFT steps")
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    return {"spec": asdict(spec), "key": spec.key(), "sft_steps": step, "dev_accuracy": accuracy,
            "history": history, "parameters": n_params, "build_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


# ---- loading -------------------------------------------------------------------------------------------------
EMBEDDED = {"tiny": "embedded 0.85M-parameter Qwen3 warm-started on synth-gsm (built locally on first use)"}


def resolve_model_path(name: str, progress: bool = True) -> str:
    """`tiny` -> its cache dir (built on first use); anything else is a local path or a hub id."""
    if name in EMBEDDED:
        return str(build_tiny(progress=progress))
    return name


def _load_error(name: str, e: Exception) -> BenchError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BenchError(f"cannot load model {name!r} (embedded models: {', '.join(EMBEDDED)}; or a Hugging Face id "
                      f"or local path with safetensors weights): {first}")


def check_weights(name: str) -> None:
    """A local model directory must hold safetensors weights (a config.json alone would fail inside each run).
    Hub ids are checked when downloaded."""
    path = Path(resolve_model_path(name, progress=False))
    if not path.is_dir():
        return
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
    raise BenchError(f"cannot load model {name!r}: {path} has no *.safetensors weights"
                     + (f" (found {', '.join(other[:3])}: only safetensors are loaded)" if other else ""))


def load_config(name: str):
    """The model's configuration only (no weights): enough to check ranks before any training."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None


def load_policy(name: str, device: str = "cpu", dtype: torch.dtype | None = None, attn: str | None = None,
                progress: bool = True):
    """Load (model, tokenizer) in float32 on CPU (bf16 on GPU) from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name, progress)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run would bury the sweep's own bars
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    attn = attn or ("eager" if device == "cpu" else "sdpa")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    return model, tokenizer


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
