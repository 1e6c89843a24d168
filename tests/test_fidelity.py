"""Fidelity checks across methods: what a rank-`full` run trains (an untied LM head included), and the importance
ratio being live on the second optimizer step of each generation batch."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.runner import run_one
from bench.spec import RunSpec

SMALL = dict(steps=2, eval_size=8, probe_size=4, probe_every=1, kl_step_seqs=4, checkpoint_every=2,
             max_completion_length=40)


@pytest.fixture
def untied(tmp_path, tiny):
    """The tiny model with an LM head of its own (tie_word_embeddings=False), the head a perturbed embedding copy."""
    out = tmp_path / "tiny-untied"
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    embed = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = embed + 0.01 * torch.randn(embed.shape, generator=g)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_rank_full_trains_the_same_linear_weights_for_every_method_untied_head(tmp_path, untied):
    """At rank full every method trains exactly the targeted Linear weights: the untied LM head (which TRL's fused
    log-prob head uses without calling the module, so PROMA cannot project it), the embedding and the norms keep
    their values, the projections move, and the trained set is recorded (summary.json, tables.md)."""
    from bench.models import load_policy
    from bench.policy import targeted_linears
    from bench.sweep import collect
    base, _ = load_policy(str(untied))
    assert base.lm_head.weight.data_ptr() != base.model.embed_tokens.weight.data_ptr()
    targeted = {f"{n}.weight" for n in targeted_linears(base)}
    initial = {n: p.detach().clone() for n, p in base.named_parameters()}
    sets = {}
    for method in ("proma", "kl_free_lora"):
        spec = RunSpec(method=method, rank="full", model=str(untied), **SMALL)
        s = run_one(spec, tmp_path / "sweep" / spec.run_id, progress=False)
        assert s["status"] == "ok", s.get("error")
        trained = load_file(tmp_path / "sweep" / spec.run_id / "model" / "model.safetensors")
        for name, value in initial.items():
            moved = not torch.equal(trained[name], value)
            assert moved == (name in targeted), (method, name)
        assert s["trainable_params"] == sum(initial[n].numel() for n in targeted)
        sets[method] = s["trained_set"]
    assert len(set(sets.values())) == 1 and "lm_head" not in sets["proma"] and "q_proj" in sets["proma"]
    collect(tmp_path / "sweep")
    tables = (tmp_path / "sweep" / "tables.md").read_text()
    rows = [line for line in tables.splitlines() if line.startswith("| full | ")]
    assert rows == [f"| full | {sets['proma']} | kl_free_lora, proma |"]  # one set, every method


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kl_grpo", "kl_free_lora"])
def test_second_step_importance_ratio_is_live_for_clipped_methods(tmp_path, tiny, monkeypatch, method):
    """Each generation batch feeds two optimizer steps: on the first the ratio pi_theta / pi_old is exactly 1,
    on the second the policy has moved, so the ratio differs from 1 and the clipping can act. Checked on the
    log-probs TRL's loss itself sees (old_per_token_logps against an extra forward at the current parameters)."""
    from bench import engine

    seen = []

    class Spy(engine.BenchGRPOTrainer):
        def _compute_loss(self, model, inputs):
            with torch.no_grad():
                logps, _, _ = self._get_per_token_logps_and_entropies(
                    model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                    torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                    inputs["completion_ids"].size(1))
            old = inputs.get("old_per_token_logps")
            mask = inputs["completion_mask"].bool()
            gap = None if old is None else float((logps - old)[mask].abs().max())
            seen.append((self.state.global_step, gap))
            return super()._compute_loss(model, inputs)

    from bench import runner
    make_trainer = engine.make_trainer  # the runner's name for it (imported at the top of bench.runner)
    monkeypatch.setattr(runner, "make_trainer", lambda *a, **kw: make_trainer(*a, trainer_cls=Spy, **kw))
    s = run_one(RunSpec(method=method, rank=4, **SMALL), tmp_path / "run", progress=False)
    assert s["status"] == "ok", s.get("error")
    first = [gap for step, gap in seen if step == 0]
    second = [gap for step, gap in seen if step == 1]
    assert len(first) == len(second) == 2  # grad_accum 2
    assert all(gap is None for gap in first)  # TRL's loss uses the current log-probs: ratio exactly 1
    assert all(gap is not None for gap in second) and max(second) > 1e-4  # the policy moved: ratio != 1
