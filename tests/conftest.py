import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["BENCH_EVAL_MEMO"] = "0"  # every test evaluates afresh (the memo has its own tests: test_generation.py)
for name in ("BENCH_NUM_THREADS", "BENCH_FORWARD_THREADS"):  # the tests set thread counts themselves
    os.environ.pop(name, None)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GSM8K_DIR = SHARED / "data" / "gsm8k"


@pytest.fixture
def gsm8k_dir():
    if not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip("../shared/data/gsm8k is absent")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def tiny():
    """The embedded model, built once (cached under BENCH_CACHE) and loaded fresh per use via load()."""
    from bench.models import build_tiny
    return build_tiny(progress=False)


def pytest_collection_modifyitems(config, items):
    """Every test that uses the embedded model (the `tiny` fixture, directly or through another fixture) builds,
    loads or trains it: marked `slow`, so that `python -m pytest -m "not slow"` is the fast tier (math, statistics,
    parsing, registries). Tests that are slow for another reason carry the mark themselves."""
    for item in items:
        if "tiny" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


class CliResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capfd):
    """`bench ARGS` run in this process through bench.cli.main (as tests/test_bad_inputs.py does): its exit code and
    what it wrote to stdout and stderr, captured at the file-descriptor level (warnings and library logging too).
    A fresh `python -m bench.cli` costs ~7 s of imports (torch, transformers, TRL) per call; the module entry point
    itself is started in subprocesses by tests/test_cli.py. Environment variables and torch's thread count are
    restored after each call, so one command's settings never leak into the next test."""
    import torch

    from bench.cli import main

    def run(*args) -> CliResult:
        capfd.readouterr()
        environ, threads = dict(os.environ), torch.get_num_threads()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors (bench.cli.OneLineParser) and --help
            code = e.code
        finally:
            os.environ.clear()
            os.environ.update(environ)
            torch.set_num_threads(threads)
        out, err = capfd.readouterr()
        return CliResult(code, out, err)
    return run
