"""The GPU check's code path on CPU (one layer of the Qwen3-0.6B shape, a few tokens), so it cannot rot where no
GPU is lent; the figures themselves come from a GPU run (see README)."""
import json

from bench.gpu_check import main


def test_gpu_check_code_path_on_cpu(tmp_path, tiny, capsys):
    out = tmp_path / "gpu_check.json"
    assert main(["--methods", "kl_free_lora,proma", "--layers", "1", "--max-new-tokens", "4", "--reps", "1",
                 "--num-generations", "2", "--micro-batch", "2", "--grad-accum", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["step_seconds"]) == {"kl_free_lora", "proma"}
    assert all(v > 0 for v in result["step_seconds"].values())
    assert "proma_vs_kl_free_step_ratio" in result["ratios"] and result["layers"] == 1
    assert "kl_free_lora" in capsys.readouterr().out
