"""benchmarks/bench_iterate.py cannot rot: its smoke run works end to end on a CPU (the Triton
kernels through the interpreter) and its numbers agree with the reference."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; a GPU runs the real benchmark")
def test_quick_cli_runs_and_agrees_with_the_reference(tmp_path):
    out = tmp_path / "iterate.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_iterate.py"), "--quick",
                           "--device", "cpu", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "iterate" and result["environment"]["torch"] == torch.__version__
    rows = result["results"]
    assert not [r for r in rows if (r.get("note") or "").startswith("failed")]
    impls = {r["impl"] for r in rows}
    assert {"eager", "triton"} <= impls
    for r in rows:
        assert r["ms"] > 0
        # every backend's x_T (fwd) and input gradients (fwd+bwd) against the fp64 reference
        assert r["max_err"] <= (1e-5 if r["mode"] == "fwd" else 1e-4), r
    # both paths (tile: 260 rows, decode: 5 rows), early exit on and off, fwd and fwd+bwd
    from benchmarks.bench_iterate import QUICK_SHAPES
    assert {(r["shape"], r["mode"], r["early_exit"]) for r in rows if r["impl"] == "triton"} == {
        (s, m, e) for s in QUICK_SHAPES for m, e in (("fwd", False), ("fwd", True), ("fwd+bwd", False))}
    assert all("mean steps" in r["note"] for r in rows if r["early_exit"])
