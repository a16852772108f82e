"""inl_kernels.profile: the profile command on a CPU (the tiny model's training step, one op),
and the pieces its table rests on: the attribution that counts every microsecond once, the
cost model of aten ops against hand-computed counts, the causal pair count against a mask, and
the CPU phase peaks against known allocations."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from inl_kernels import profile as P
from inl_kernels.cpu import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_OPS = {"inl::iterate", "inl::rms_norm", "inl::attention", "inl::swiglu", "inl::embedding"}
SMALL_PEAKS = ["--gemm-size", "128", "--copy-mib", "4"]  # peaks measured fast: their value is not checked


def _trace_names(path) -> set:
    with open(path) as f:
        trace = json.load(f)
    return {e.get("name") for e in trace["traceEvents"]}


def _assert_each_microsecond_once(report, trace_path):
    """The rows other than `(outside the step ranges)` add up exactly to the profiler's own `step`
    ranges (every microsecond counted once); that row holds the rest of the steps' wall times
    measured apart from the profiler (perf_counter around each range: entering and leaving the
    range, and a thread descheduled there on a busy machine), so the shares sum to 100 %."""
    with open(trace_path) as f:
        trace = json.load(f)
    ranges_ms = sum(e["dur"] for e in trace["traceEvents"] if e.get("name") == "step" and e.get("ph") == "X") / 1e3
    rows = {r["op"]: r["ms"] for r in report["ops"]}
    outside = rows.pop(P.OUTSIDE_STEPS)
    walls_ms = sum(report["walls_ms"])
    assert sum(rows.values()) == pytest.approx(ranges_ms, rel=1e-3)
    assert 0 <= outside <= 0.25 * walls_ms and ranges_ms <= walls_ms + 0.5
    assert report["share_sum"] == pytest.approx(100, abs=1e-6)


def test_tiny_model_training_step(tmp_path):
    import inl_llm

    trace, out = tmp_path / "trace.json", tmp_path / "report.json"
    report = P.profile_command(["model", "--size", "tiny", "--mode", "train", "--batch", "1", "--seq", "8",
                                "--warmup", "1", "--steps", "2", "--memory", "--rows", "3", "--trace", str(trace),
                                "--json", str(out)] + SMALL_PEAKS)
    assert json.loads(out.read_text())["ops"] == json.loads(json.dumps(report["ops"]))
    names = _trace_names(trace)
    # every op of ours, every layer (module path), every phase: named ranges in the trace
    assert OUR_OPS <= names, OUR_OPS - names
    assert {"blocks.0.attn", "blocks.0.integrator", "blocks.3.ffn", "lm_head", "embed"} <= names
    assert {"step", "phase:forward", "phase:backward", "phase:optimizer"} <= names

    rows = {r["op"]: r for r in report["ops"]}
    assert OUR_OPS <= set(rows)  # never folded into "(other ops)", however small (--rows 3)
    assert any(r["op"].startswith("(other ops:") for r in report["ops"])
    assert "inl::iterate (backward)" in rows  # the backward of our kernel is a row of its own
    # each microsecond once: the rows add up to the steps, measured by the profiler and apart from it
    _assert_each_microsecond_once(report, trace)

    # the iterate's work from its arguments, by hand: 4 layers × 2 steps, all T steps in training
    cfg = inl_llm.INLConfig.from_name("tiny")
    n, d, H, T = 8, cfg.d_model, cfg.controller_hidden, cfg.num_iterations
    assert rows["inl::iterate"]["calls"] == cfg.num_layers * 2
    assert rows["inl::iterate"]["flops"] == pytest.approx(cfg.num_layers * 2 * 2 * n * H * d * (1 + 6 * T))
    # page faults of the last (unprofiled) warm-up step, counted by getrusage, with the malloc setting
    assert report["minor_faults_last_warmup"] >= 0 and report["malloc"] in ("default", "keep")
    assert set(report["memory_mib"]) == {"forward", "backward", "optimizer"}
    assert report["memory_mib"]["forward"] > 0  # the activations kept for the backward
    assert any(r["layer"] == "blocks.*.integrator" and r["calls"] == cfg.num_layers * 2 for r in report["layers"])


def test_one_op_through_the_module_entry_point(tmp_path):
    trace, out = tmp_path / "trace.json", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "inl_kernels.profile", "op", "iterate", "--shape", "96x32x3", "--backward",
           "--warmup", "1", "--steps", "2", "--trace", str(trace), "--json", str(out)] + SMALL_PEAKS
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "roofline %" in proc.stdout
    report = json.loads(out.read_text())
    if memory._glibc()[0] is not None:  # the entry point keeps freed memory, as the CLI does
        assert report["malloc"] == "keep" and "minor page faults:" in proc.stdout
    names = _trace_names(trace)
    assert {"inl::iterate", "iterate", "phase:forward", "phase:backward"} <= names
    _assert_each_microsecond_once(report, trace)
    row = next(r for r in report["ops"] if r["op"] == "inl::iterate")
    assert row["calls"] == 2 and row["flops"] == pytest.approx(2 * 2 * 96 * 64 * 32 * (1 + 6 * 3))


def test_bad_shape_names_the_argument(capsys):
    with pytest.raises(SystemExit):
        P.profile_command(["op", "rms_norm", "--shape", "12x", "--no-trace"])
    assert "--shape" in capsys.readouterr().err


@pytest.mark.parametrize("argv,named", [
    (["model", "--batch", "0"], "--batch"), (["model", "--batch", "-1"], "--batch"),
    (["model", "--seq", "0"], "--seq"), (["model", "--mode", "decode", "--prompt", "0"], "--prompt"),
    (["model", "--threads", "-1"], "--threads"), (["model", "--rows", "0"], "--rows"),
    (["model", "--steps", "0"], "--steps"), (["op", "iterate", "--hidden", "0"], "--hidden"),
    (["op", "iterate", "--tol", "-1"], "--tol"),
    # the op's own checks, on its first call: a usage error too (exit 2), naming what is wrong
    (["op", "attention", "--shape", "1,3,2,8,64"], "multiple of k/v heads"), (["op", "rope", "--shape", "1,2,2,8,7"], "even"),
])
def test_bad_arguments_are_usage_errors(argv, named, capsys):
    """Every bad argument is argparse's error (exit status 2, no traceback) naming it; --batch 0
    profiled batch 4 and said so in its title, the others raised from deep inside."""
    with pytest.raises(SystemExit) as e:
        P.profile_command(argv + ["--no-trace", "--warmup", "1", "--steps", "1"] + SMALL_PEAKS)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_attribution_counts_nested_ops_once():
    """An op inside one of ours belongs to ours; the rows and `(between ops)` add up exactly to
    the step's own range."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step"):
            with record_function("blocks.0"):
                with record_function("inl::rms_norm"):
                    torch.mm(a, b).mul(2)
                a + b
    rows, layers = P.attribute(prof.events(), "cpu", {"blocks.0"})
    assert set(rows) == {"inl::rms_norm", "aten::add", P.BETWEEN_OPS}
    step = next(e for e in prof.events() if e.name == "step")
    assert sum(r.us for r in rows.values()) == pytest.approx(step.cpu_time_total, rel=1e-9)
    assert layers["blocks.0"][0] == 1


def test_our_backward_nodes_and_names():
    assert P.op_name("inl::iterate") == "inl::iterate"
    assert P.op_name("inl::gqa_attention.default") == "inl::attention"
    assert P.op_name("GeneratedBackwardFor_inl_rms_norm_defaultBackward") == "inl::rms_norm (backward)"
    # the C++ backend's registered ops and their autograd wrapper count as the public op
    assert P.op_name("inl::cpu_iterate_backward") == "inl::iterate (backward)"
    assert P.op_name("GeneratedBackwardFor_inl_cpu_iterate_defaultBackward") == "inl::iterate (backward)"
    assert P.op_name("GeneratedBackwardFor_inl_cpu_iterate_default") == "inl::iterate"
    assert P.op_name("aten::mm") == "aten::mm"
    assert P.op_name("blocks.0.integrator") is None and P.op_name("autograd::engine::evaluate_function: X") is None


def test_aten_cost_from_recorded_shapes():
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(64, 32, generator=g), torch.randn(32, 16, generator=g), torch.randn(16, generator=g)
    x, w = torch.randn(5, 7, 32, generator=g, dtype=torch.float64), torch.randn(24, 32, generator=g,
                                                                                 dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.mm(a, b)
        torch.addmm(bias, a, b)
        torch.nn.functional.linear(x, w)
        a.view(-1)
    events = {e.name: e for e in prof.events() if e.cpu_parent is None}
    assert P.aten_cost(events["aten::mm"]) == (2 * 64 * 32 * 16, 4 * (64 * 32 + 32 * 16 + 64 * 16))
    assert P.aten_cost(events["aten::addmm"]) == (2 * 64 * 32 * 16, 4 * (16 + 64 * 32 + 32 * 16 + 64 * 16))
    assert P.aten_cost(events["aten::linear"]) == (2 * 35 * 32 * 24, 8 * (35 * 32 + 24 * 32 + 35 * 24))
    assert P.aten_cost(events["aten::view"]) == (0.0, 0.0)


@pytest.mark.parametrize("sq,skv", [(1, 1), (1, 9), (5, 5), (4, 11), (7, 3)])
def test_visible_pairs_against_the_mask(sq, skv):
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    assert P._visible_pairs(sq, skv, True) == int((j <= skv - sq + i).sum())
    assert P._visible_pairs(sq, skv, False) == sq * skv


def test_cpu_phase_peaks_from_allocation_events():
    phases = P.Phases(torch.device("cpu"), memory=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with phases("first"):
            big = torch.empty(250_000)  # 1 MB
            del big
            small = torch.empty(1000)  # 4 kB, alive across the phases
        with phases("second"):
            t = torch.empty(50_000)  # 200 kB above the second phase's start
            del t
        del small
    assert P.cpu_phase_peaks(prof) == {"first": 1_000_000, "second": 200_000}


def test_layer_ranges_are_removed_after():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.ReLU()))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with P.layer_ranges(model, root="net") as names:
            model(torch.randn(2, 4))
    assert names == {"net", "0", "1", "1.0"}
    assert {"net", "0", "1", "1.0"} <= {e.name for e in prof.events()}
    assert not model._forward_pre_hooks and not model[0]._forward_hooks
