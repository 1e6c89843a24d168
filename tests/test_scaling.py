"""--lora-scaling: the rule's spelling, its place in run identity (run ids, config digests, claim contexts), --alpha
as fixed:N, and the scale PEFT applies, checked against alpha / r and alpha / sqrt(r) computed here."""
import math

import pandas as pd
import pytest

from bench.claims import check_claims
from bench.cli import main, make_parser
from bench.config import build_specs, resolve_run_options
from bench.errors import BenchError
from bench.scaling import parse_scaling, sweep_scalings
from bench.spec import RunSpec
from bench.variants import assign, normalized_spec


@pytest.mark.parametrize("text,name,alpha,use_rslora", [
    ("rank", "rank", None, False), (" RANK ", "rank", None, False), ("fixed:16", "fixed:16", 16.0, False),
    ("fixed:16.0", "fixed:16", 16.0, False), ("fixed:0.5", "fixed:0.5", 0.5, False),
    ("rslora", "rslora:4", 4.0, True), ("rslora:8", "rslora:8", 8.0, True)])
def test_scaling_names_are_canonical(text, name, alpha, use_rslora):
    s = parse_scaling(text)
    assert (s.name, s.alpha, s.use_rslora) == (name, alpha, use_rslora)


@pytest.mark.parametrize("text", ["", "fixed", "fixed:", "fixed:0", "fixed:-2", "fixed:nan", "fixed:inf", "rank:4",
                                  "rslora:x", "alpha", 16])
def test_bad_scalings_are_refused(text):
    with pytest.raises(BenchError, match="bad lora_scaling"):
        parse_scaling(text)


@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_scale_is_alpha_over_r_or_over_sqrt_r(rank):
    assert parse_scaling("rank").scale(rank) == 1.0
    assert parse_scaling("fixed:16").scale(rank) == pytest.approx(16 / rank)
    assert parse_scaling("rslora").scale(rank) == pytest.approx(4 / rank ** 0.5)
    # the three rules agree at rank 16 (the reason for rsLoRA's default alpha 4)
    if rank == 16:
        assert {parse_scaling(s).scale(16) for s in ("rank", "fixed:16", "rslora")} == {1.0}


def test_alpha_is_fixed_scaling_in_run_identity():
    a = RunSpec("kl_free_lora", 16, alpha=32.0)
    b = RunSpec("kl_free_lora", 16, lora_scaling="fixed:32")
    assert a == b and a.key() == b.key() and a.run_id == b.run_id == "kl_free_lora_r16_s0_fixed32"
    assert a.lora_alpha == 32.0 and a.alpha is None
    default = RunSpec("kl_free_lora", 16)
    assert default.run_id == "kl_free_lora_r16_s0" and default.lora_alpha == 16.0 and not default.use_rslora
    assert RunSpec("kl_free_lora", "full", lora_scaling="rslora").lora_scaling == "rank"  # no adapter, no scaling
    with pytest.raises(BenchError, match="alpha 8 and lora_scaling rslora:4 disagree"):
        RunSpec("kl_free_lora", 16, alpha=8.0, lora_scaling="rslora")


def test_an_older_config_with_alpha_reads_as_fixed_scaling():
    """A config.json written before lora_scaling existed ({'alpha': 32}) is the same configuration as fixed:32."""
    old = {k: v for k, v in RunSpec("kl_free_lora", 16).to_dict().items() if k not in ("lora_scaling", "eval_split",
                                                                                        "tuning")}
    old["alpha"] = 32.0
    assert normalized_spec({"spec": old})["lora_scaling"] == "fixed:32"
    assert RunSpec.from_dict(old).key() == RunSpec("kl_free_lora", 16, lora_scaling="fixed:32").key()


def _specs(*argv):
    return build_specs(resolve_run_options(make_parser().parse_args(["run", "--methods", "kl_free_lora", *argv])))


def test_cli_scaling_axis_alpha_and_refusals():
    specs = _specs("--ranks", "4,full", "--lora-scaling", "rank,fixed:16,rslora")
    assert [s.run_id for s in specs] == ["kl_free_lora_r4_s0", "kl_free_lora_r4_s0_fixed16",
                                         "kl_free_lora_r4_s0_rslora4", "kl_free_lora_rfull_s0"]
    assert _specs("--ranks", "4", "--alpha", "16") == _specs("--ranks", "4", "--lora-scaling", "fixed:16")
    assert _specs("--ranks", "4") == _specs("--ranks", "4", "--lora-scaling", "rank")
    assert sweep_scalings(None) == ["rank"]
    with pytest.raises(BenchError, match="listed twice"):
        sweep_scalings("fixed:16,fixed:16.0")
    with pytest.raises(BenchError, match="disagree"):
        sweep_scalings("rslora", alpha=8)


def test_cli_bad_scaling_is_one_line_exit_2(capsys):
    assert main(["run", "--methods", "kl_free_lora", "--lora-scaling", "fixed:-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad lora_scaling 'fixed:-1'" in err


def _table(kl: dict) -> pd.DataFrame:
    """Runs of kl_free_lora at ranks 4/16/64 x 3 seeds under two scalings, with the given kl_ref per (scaling, rank)."""
    rows, specs = [], {}
    for scaling, by_rank in kl.items():
        for rank, value in by_rank.items():
            for seed in range(3):
                spec = RunSpec("kl_free_lora", rank, seed=seed, lora_scaling=scaling)
                key = f"{spec.run_id}"
                specs[key] = normalized_spec({"spec": spec.to_dict()})
                rows.append({"key": key, "method": "kl_free_lora", "rank": str(rank), "seed": seed, "status": "ok",
                             "eval_n": 100, "kl_ref": value * (1 + 0.01 * seed)})
    return assign(pd.DataFrame(rows), specs)


def test_rank_claim_is_checked_per_scaling():
    """KL grows with rank under `rank` and falls under fixed:16 in this constructed table: one verdict each."""
    runs = _table({"rank": {4: 0.01, 16: 0.05, 64: 0.5}, "fixed:16": {4: 0.5, 16: 0.05, 64: 0.01}})
    assert runs.groupby("lora_scaling").config_digest.nunique().to_dict() == {"fixed:16": 3, "rank": 3}
    verdicts = {r.context: r.verdict for r in check_claims(runs) if r.id == "kl_grows_with_rank"}
    assert verdicts == {"lora_scaling=rank": "supported", "lora_scaling=fixed:16": "contradicted"}


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["rank", "fixed:16", "rslora", "rslora:8"])
@pytest.mark.parametrize("rank", [4, 64])
def test_peft_applies_the_scale(tiny, scaling, rank):
    """The scale on every LoRA layer PEFT built for the run is alpha / r (alpha / sqrt(r) for rsLoRA), with alpha
    as the rule says, computed here from the rule's definition."""
    from bench.models import load_policy
    from bench.policy import build_policy
    from methods import get_method
    spec = RunSpec("kl_free_lora", rank, lora_scaling=scaling)
    model, _ = load_policy("tiny", device="cpu", progress=False)
    method = get_method("kl_free_lora")
    policy = build_policy(model, method, rank, spec.lora_alpha, 0, method.resolve_params({}), 0.0, spec.use_rslora)
    alpha = {"rank": rank, "fixed:16": 16, "rslora": 4, "rslora:8": 8}[scaling]
    expected = alpha / (math.sqrt(rank) if scaling.startswith("rslora") else rank)
    from peft.tuners.lora import LoraLayer
    scales = {m.scaling["default"] for m in policy.modules() if isinstance(m, LoraLayer)}
    assert scales and all(s == pytest.approx(expected, rel=1e-12) for s in scales), scales


def test_every_preset_states_its_scaling():
    from bench.config import load_config_file, preset_names, preset_path
    for name in preset_names():
        assert "lora_scaling" in load_config_file(preset_path(name), "preset"), name
    assert load_config_file(preset_path("rottman-kl-rank"), "preset")["lora_scaling"] == "rank"  # r = alpha
