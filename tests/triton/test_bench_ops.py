"""Smoke test of the RMSNorm, RoPE and attention benchmark CLIs: `--quick` runs end to end,
writes the JSON of benchmarks/common.py, times every implementation it lists, and ours agrees
with eager PyTorch inside the benchmark itself."""
import json

import pytest

from benchmarks import bench_attention, bench_rms_norm, bench_rope


@pytest.mark.parametrize("bench,name", [(bench_rms_norm, "rms_norm"), (bench_rope, "rope"),
                                        (bench_attention, "attention")])
def test_quick_run_writes_results(bench, name, tmp_path):
    path = tmp_path / f"{name}.json"
    bench.main(["--quick", "--no-compile", "--dtype", "float32", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["benchmark"] == name
    assert {"device", "torch", "triton", "command"} <= set(report["environment"])
    timed = [r for r in report["results"] if r.get("ms") is not None]
    failed = [r for r in report["results"] if str(r.get("note") or "").startswith("failed")]
    assert not failed, failed
    impls = {r["impl"] for r in timed}
    assert {"eager", "ours"} <= impls
    for r in timed:
        assert r["ms"] > 0 and r["ours_speedup"] > 0
        if r["impl"].startswith("ours"):
            assert r["max_err"] < 1e-4, r  # fp32 on a CPU, tiny shapes
