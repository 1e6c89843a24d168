"""`bench eval RUN_DIR` (and `--final-eval lm-eval`): the trained policy evaluated by lm-eval's `simple_evaluate`,
in-process, with lm-eval's own gsm8k prompt, generation, filters and exact-match metric.

- hub GSM8K (task `gsm8k` without --data): lm-eval's stock `gsm8k` task;
- `synth-gsm` and local GSM8K jsonl: a task YAML generated from the stock one (same doc_to_text, `until`, filters
  and metric), reading the run's eval split from a local jsonl.
Zero-shot by default (`--num-fewshot` to change), the harness's own prompt format; `max_gen_toks` is the run's
max_completion_length. Strict and flexible exact match go into summary.json under `lm_eval`.
`eval_records(run_dir, phase)` reads the harness's own per-item greedy eval records of a run (None for older runs).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from bench.device import resolve_device
from bench.errors import BenchError
from bench.io import atomic_write_json, read_jsonl
from bench.models import load_policy, uses_chat_template
from bench.results import read_config, read_summary
from bench.spec import RunSpec
from tasks import get_task

STOCK_TASK = "gsm8k"
EVAL_PHASES = ("base", "final")
RECORD_KEYS = ("id", "prediction", "completion", "correct_strict", "correct_flexible", "completion_tokens",
               "truncated")


def eval_records(run_dir: Path, phase: str) -> list[dict] | None:
    """A run's per-item greedy eval records (eval_base.jsonl / eval_final.jsonl, written by bench.runner), or None
    for a run directory written before they existed (or whose run stopped before that eval)."""
    if phase not in EVAL_PHASES:
        raise BenchError(f"bad eval phase {phase!r}; valid: {', '.join(EVAL_PHASES)}")
    path = Path(run_dir) / f"eval_{phase}.jsonl"
    if not path.is_file():
        return None
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: unreadable ({type(e).__name__})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or set(r) != set(RECORD_KEYS)), None)
    if bad is not None:
        raise BenchError(f"{path}: record {bad + 1} does not have exactly the keys {', '.join(RECORD_KEYS)}")
    return rows


def local_task_yaml(name: str, data_file: Path, max_gen_toks: int) -> dict:
    """lm-eval's stock gsm8k task, pointed at a local jsonl test split."""
    import lm_eval
    stock = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    task = {k: v for k, v in stock.items() if k not in ("tag", "dataset_name", "training_split", "fewshot_split")}
    task.update(task=name, dataset_path="json", dataset_kwargs={"data_files": {"test": str(data_file)}},
                test_split="test", fewshot_split="test", num_fewshot=0)
    task["generation_kwargs"] = {**stock["generation_kwargs"], "max_gen_toks": max_gen_toks}
    return task


def load_trained(run_dir: Path, spec, device: str):
    """The trained policy as a plain model: the original base + the saved adapter, merged (or the saved full model)."""
    base, tokenizer = load_policy(spec.model, device=device, progress=False)
    if (run_dir / "adapter").is_dir():
        from peft import PeftModel
        model = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
    elif (run_dir / "model").is_dir():
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(run_dir / "model", use_safetensors=True).to(device)
    else:
        raise BenchError(f"{run_dir}: no trained adapter/ or model/ (did the run finish?)")
    return model.eval(), tokenizer


def run_spec(run_dir: Path):
    """The RunSpec recorded in run_dir/config.json; a missing or damaged file is a one-line error naming it."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise BenchError(f"{run_dir}: not a run directory (no config.json)")
    config, why = read_config(path)
    if why:
        raise BenchError(f"{path}: {why}")
    try:
        return RunSpec.from_dict(config["spec"])
    except TypeError as e:
        raise BenchError(f"{path}: not a valid run configuration ({e})") from None
    except BenchError as e:
        raise BenchError(f"{path}: not a valid run configuration ({e})") from None


def summary_of(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    summary, why = read_summary(path)
    if summary is None:
        raise BenchError(f"{path}: {why or 'missing'}; nothing evaluated")
    return summary


def evaluate_run(run_dir: Path, limit: int | None = None, num_fewshot: int = 0, batch_size: int = 64,
                 device: str = "auto", write: bool = True) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    run_dir = Path(run_dir)
    spec = run_spec(run_dir)
    if write and (run_dir / "summary.json").is_file():
        summary_of(run_dir)  # a damaged summary.json is refused before the evaluation, not after
    device = resolve_device(spec.device if device == "auto" else device)
    model, tokenizer = load_trained(run_dir, spec, device)
    with tempfile.TemporaryDirectory() as tmp:
        if spec.task == "gsm8k" and "data" not in spec.task_params:
            task_name, manager = STOCK_TASK, TaskManager()
        else:  # the run's own eval split (the items the harness's greedy accuracy uses)
            evals = get_task(spec.task, **spec.task_params).examples("eval")
            if spec.eval_size is not None:
                evals = evals[:spec.eval_size]
            data = Path(tmp) / "test.jsonl"
            data.write_text("".join(json.dumps({"question": e.question, "answer": f"#### {e.gold}"}) + "\n"
                                    for e in evals))
            task_name = f"bench_{spec.task.replace('-', '_')}"
            (Path(tmp) / f"{task_name}.yaml").write_text(yaml.safe_dump(
                local_task_yaml(task_name, data, spec.max_completion_length)))
            manager = TaskManager(include_path=tmp)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                  max_length=getattr(model.config, "max_position_embeddings", None))
        results = simple_evaluate(model=lm, tasks=[task_name], num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, apply_chat_template=uses_chat_template(tokenizer),
                                  log_samples=False, bootstrap_iters=0,
                                  gen_kwargs={"max_gen_toks": spec.max_completion_length})
    metrics = results["results"][task_name]
    import lm_eval
    out = {"task": task_name, "num_fewshot": num_fewshot, "strict_match": float(metrics["exact_match,strict-match"]),
           "flexible_extract": float(metrics["exact_match,flexible-extract"]),
           "n": results.get("n-samples", {}).get(task_name, {}).get("effective"),
           "chat_template": uses_chat_template(tokenizer), "lm_eval_version": lm_eval.__version__}
    if write and (run_dir / "summary.json").is_file():
        summary = summary_of(run_dir)
        summary["lm_eval"] = out
        atomic_write_json(run_dir / "summary.json", summary)
    return out
