"""The original package's three example scripts (examples/, only their import lines changed)
run against this package at a small size (examples/run_small.py), in a scratch directory:
simple_training.py trains and saves, load_and_generate.py reloads that checkpoint and
generates, test_early_stopping.py benchmarks adaptive against fixed iterations."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = ["--d-model", "32", "--layers", "1", "--heads", "4", "--iterations", "3"]


def run(script, cwd, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(EXAMPLES.parent), str(EXAMPLES.parent / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "run_small.py", script, *SMALL, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("examples")
    for f in ("simple_training.py", "load_and_generate.py", "test_early_stopping.py", "byte_tokenizer.py",
              "run_small.py"):
        shutil.copy(EXAMPLES / f, d / f)
    return d


@pytest.mark.slow
def test_simple_training_then_load_and_generate(workdir):
    pytest.importorskip("pandas")  # the script reads its parquet file with pandas
    out = run("simple_training.py", workdir, "--rows", "6")
    assert "Epoch 10/10" in out and "Phase: equilibrium" in out
    assert "[Task:" in out and "Speed:" in out and "Energy:" in out  # IntegratorLoss's components
    assert "✅ Example completed successfully!" in out
    assert (workdir / "checkpoints" / "inl_1b_model" / "pytorch_model.pt").exists()
    out = run("load_and_generate.py", workdir)
    assert "Weights loaded" in out and out.count("Generated:") == 3 and "✅ Generation complete!" in out


@pytest.mark.slow
def test_early_stopping_benchmark(workdir):
    out = run("test_early_stopping.py", workdir)
    assert "Average iterations used: 3.00 / 10" in out  # the adaptive model's layers ran 3 steps a row
    assert "✅ EARLY STOPPING BENCHMARK COMPLETE!" in out


def test_byte_tokenizer_round_trip(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from byte_tokenizer import AutoTokenizer
    finally:
        sys.path.remove(str(EXAMPLES))
    tok = AutoTokenizer.from_pretrained("gpt2")
    tok.pad_token = tok.eos_token
    ids = tok.encode("héllo", max_length=4, truncation=True)
    assert ids == list("héllo".encode())[:4] and tok.pad_token_id == 257
    assert tok.decode(tok.encode("héllo", return_tensors="pt")[0]) == "héllo"
    assert tok.decode([104, 257, 105], skip_special_tokens=True) == "hi"
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token_id == 257
