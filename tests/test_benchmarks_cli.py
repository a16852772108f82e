"""`python -m benchmarks --quick` runs end to end on a CPU and every PNG it says it wrote is a
valid image (the PNG signature, PIL's own check, and matplotlib reading the pixels back)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = {"speedup.png", "iterate_rows.png", "attention_seq.png", "early_exit.png", "model.png"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; a GPU runs the real benchmarks")
def test_quick_run_writes_results_and_valid_plots(tmp_path):
    import matplotlib.image
    from PIL import Image

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: --quick sets it itself, before anything reads it
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    env_record = report["environment"]
    assert env_record["torch"] == torch.__version__ and env_record["cpu_model"] and env_record["quick"] is True
    # the suite keeps freed memory by default (--malloc keep) and says so, in its sections too
    if "cpu" in env_record["backends"]:
        assert env_record["malloc"] in ("keep", "unchanged: the C library is not glibc (mallopt is glibc's)")
        assert report["sections"]["model"]["environment"]["malloc"] == env_record["malloc"]
    assert not [name for name, s in report["sections"].items() if s.get("error")]
    assert any("interpreter" in n for n in report["notes"])  # the smoke run says it measures nothing
    for name in ("iterate", "ops", "iterate_rows", "attention_seq", "early_exit", "model"):
        assert report["sections"][name]["rows"], name
    # ours ran in every row that says so: the Triton ops through the interpreter (they had all failed,
    # the interpreter switch set after inl_kernels read it, and the notes still said they ran)
    ops = [r for r in report["sections"]["ops"]["rows"] if str(r.get("impl", "")).startswith("ours")]
    assert {r["op"] for r in ops} == {"rms_norm", "rope", "attention"} and all(r["ms"] for r in ops)
    attention = {r["impl"] for r in report["sections"]["attention_seq"]["rows"] if r.get("ms")}
    assert "ours (triton, interpreter)" in attention
    if "cpu" in env_record["backends"]:
        assert "ours (cpu)" in attention

    assert {os.path.basename(p) for p in report["plots"]} == PLOTS
    markdown = (tmp_path / "results.md").read_text()
    for name in report["plots"]:
        path = tmp_path / name  # relative to the output folder
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as image:
            image.verify()
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.shape[2] in (3, 4)
        assert pixels.std() > 0  # something is drawn
        assert f"]({name})" in markdown
