"""The example scripts in examples/ (the original package's three workflows through its API),
each run in a subprocess at a tiny size through its flags; their printed output is checked
against values computed here: the scheduler's phases and the loss's annealed lambda_mean, the
loss components summing to the total, the parameter count of the saved model, a reloaded
checkpoint reproducing the trained model's sample, and early exit stopping at the minimum."""
import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TINY = ["--d-model", "32", "--heads", "2", "--seq-len", "16", "--batch-size", "2"]
NUMBER = r"(\d+\.\d+)"
EPOCH = re.compile(rf"epoch (\d+)/\d+ (\w+)\s+lambda_mean {NUMBER} excitation {NUMBER} \| loss {NUMBER} = task "
                   rf"{NUMBER} \+ mean {NUMBER} \+ speed {NUMBER} \+ energy {NUMBER}")
SAMPLE = re.compile(r"sample: ('.*?') \+ (\d+) tokens -> (.*)")


def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_simple_training_then_load_and_generate(tmp_path):
    out_dir, epochs, new_tokens = tmp_path / "ckpt", 4, 12
    out = run("simple_training.py", *TINY, "--layers", 1, "--iterations", 3, "--epochs", epochs, "--steps-per-epoch", 1,
              "--warmup-epochs", 1, "--phase-epochs", 1, "--corpus-bytes", 30000, "--prompt", "def ",
              "--sample-tokens", new_tokens, "--seed", 3, "--out", out_dir)

    rows = EPOCH.findall(out)
    assert [int(r[0]) for r in rows] == list(range(1, epochs + 1)), out
    # warmup 1 epoch (equilibrium settings), then 1-epoch equilibrium and exploration phases in turn
    phases = ["equilibrium", "equilibrium", "exploration", "equilibrium"]
    assert [r[1] for r in rows] == phases
    for epoch, (_, phase, lam, excitation, total, *terms) in enumerate(rows):
        # IntegratorLoss(lambda_mean_init=0.1, annealing_epochs=epochs), exponential annealing to
        # 0.1 × its start; exploration uses exploration_lambda_mean = 0.05 and excites the integrators
        expected = 0.05 if phase == "exploration" else 0.1 * 0.1 ** (epoch / epochs)
        assert float(lam) == pytest.approx(expected, abs=1e-4)
        assert (float(excitation) > 0) == (phase == "exploration")
        assert float(total) == pytest.approx(sum(map(float, terms)), abs=3e-4)
        assert all(float(t) >= 0 for t in terms)

    # an untrained model's logits are near uniform: its cross-entropy is about ln(vocab)
    before = float(re.search(rf"held-out loss before training: {NUMBER}", out).group(1))
    assert abs(before - math.log(259)) < 0.3
    assert re.search(rf"inference: 3\.00 integrator steps per row", out)  # never fewer than min(3, steps)

    for name in ("pytorch_model.pt", "model_args.json", "tokenizer_config.json"):
        assert (out_dir / name).is_file()
    from inl_llm.models import UltraOptimizedIntegratorLanguageModel
    model_args = json.loads((out_dir / "model_args.json").read_text())
    assert (model_args["d_model"], model_args["num_layers"], model_args["vocab_size"]) == (32, 1, 259)
    params = unique_params(UltraOptimizedIntegratorLanguageModel(**model_args))
    assert f"model: {params:,} parameters" in out

    trained = SAMPLE.findall(out)
    assert len(trained) == 1 and trained[0][:2] == ("'def '", str(new_tokens))
    assert ast.literal_eval(trained[0][2]).startswith("def ")  # the script prints repr()

    # reloaded, the same prompt and seed give the trained model's own sample
    out = run("load_and_generate.py", "--checkpoint", out_dir, "--prompt", "def ", "--prompt", "x = ",
              "--max-new-tokens", new_tokens, "--seed", 3)
    assert f"({params:,} parameters, d_model 32, layers 1, vocab 259)" in out
    samples = SAMPLE.findall(out)
    assert [s[:2] for s in samples] == [("'def '", str(new_tokens)), ("'x = '", str(new_tokens))]
    assert samples[0] == trained[0]
    assert ast.literal_eval(samples[1][2]).startswith("x = ")


def test_load_and_generate_without_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "load_and_generate.py"), "--checkpoint", str(tmp_path)],
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")])),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "run simple_training.py first" in proc.stderr


def test_early_stopping_benchmark():
    steps = 6
    out = run("test_early_stopping.py", *TINY, "--layers", 2, "--iterations", steps, "--threshold", 1e9, "--runs", 3)
    timings = {}
    for name in ("fixed", "adaptive"):
        m = re.search(rf"{name}: +{NUMBER} ms per batch \(median\), {NUMBER} of {steps} steps per row "
                      rf"\(per layer: ([\d. ]+)\)", out)
        assert m, out
        timings[name] = float(m.group(1))
        # fixed: every step; adaptive with a threshold every row passes: the minimum, min(3, steps)
        used = steps if name == "fixed" else 3
        assert float(m.group(2)) == pytest.approx(used, abs=0.005)
        assert [float(v) for v in m.group(3).split()] == pytest.approx([used, used], abs=0.005)
    ratio = float(re.search(rf"speedup \(fixed / adaptive time\): {NUMBER}x at threshold 1e\+09", out).group(1))
    assert ratio == pytest.approx(timings["fixed"] / timings["adaptive"], rel=0.02, abs=0.01)
    assert "an untrained model rarely converges" in out
    assert "no row stopped early" not in out


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
    assert tok.decode([104, 257, 105]) == "h<eos>i"
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token_id == 257
    with pytest.raises(ValueError, match="pad_token"):
        tok.pad_token = "[PAD]"
