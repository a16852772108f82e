"""The integrator iterate side by side in one process: eager PyTorch (the reference),
torch.compile of it, and every other backend this machine runs (triton on a GPU, the C++ `cpu`
backend on a CPU once it exists: found through `inl_kernels.backends()`), forward and
forward+backward, early exit off and on, with speedups, peak memory (CUDA) and the fraction of
the physical floor reached.

    python benchmarks/bench_iterate.py --device cuda --dtype bf16 fp32 --json benchmarks/results/iterate.json
    python benchmarks/bench_iterate.py --device cpu                 # 2048×512 T5 fp32, and the early-exit case
    python benchmarks/bench_iterate.py --quick --device cpu         # seconds: a smoke run
    pytest benchmarks/bench_iterate.py --benchmark-enable           # the same through pytest-benchmark

Inputs are a real `IntegratorLayer` (its Controller init, hierarchical mu, 10 % excitation,
kappa = 1, dt = 0.1, H = 64) and no initial velocity, as the model block calls it. For early
exit the rows are spread from near equilibrium to far from it, and tol is chosen from the
reference's own step norms on a sample of rows so that rows stop at different steps; the
"note" column gives the mean step count.

CPU: the same shapes plus the early-exit case of issue 15 (2048 × 512, T = 8: 75 % of rows
converge after 2 steps, 25 % run all 8, 3.5 steps on average), where each backend is timed with
early exit on and off on the same inputs ("vs_exit_off": time on / time off). The floor is the
FLOPs below (with early exit, at the steps the rows run) at the rate of `torch.mm` on 2048³ fp32
measured in the same run ("floor_frac", "gemm_gflops"). On a CPU the implementations of a mode (and the GEMM) are timed in interleaved
rounds, so that the shared machine's slow periods hit them alike.
The run pins the thread count (INL_KERNELS_ADAPTIVE_THREADS=0 unless set: the C++ ops would
otherwise drop to one thread on a contended machine, csrc/cpu/entry.cpp) and records the CPU path
(AVX-512, AVX2 or base: INL_KERNELS_CPU_CAPABILITY pins one; to compare a path with a torch.mm
on the same instructions, also set MKL_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=avx2).

Floor (CUDA): max(FLOPs / peak, bytes / bandwidth) with FLOPs = 2·N·H·(d + 6d·T) for the
forward (the h layer once, x and v layers and the 4d output layer per step; 3× that for
forward+backward) and bytes = read h, x and write x_T, v_T (forward; forward+backward adds
the upstream gradients read and dh, dx written). Peak defaults to the bf16 GEMM rate of
benchmarks/README.md (792 TFLOP/s); the bandwidth is a copy measured in the same run. "floor_frac" is
floor / time (1.0 = at the floor; on a CPU at the GEMM rate above). "vs_eager", "vs_compile":
eager (compile) time over this row's time (> 1: faster). "max_err": max |out − ref| / max |ref|
against the fp64 reference, of x_T (fwd) or of the worst input gradient (fwd+bwd).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the C++ ops would drop to one thread on a contended machine: a benchmark keeps the count it set
os.environ.setdefault("INL_KERNELS_ADAPTIVE_THREADS", "0")
# inductor compiles in worker processes that stay busy after the first compile: on a small CPU
# they take the cores from the calls being timed (eager timed 15× slower beside them)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

COLUMNS = ["shape", "dtype", "mode", "early_exit", "impl", "ms", "vs_eager", "vs_compile", "vs_exit_off",
           "floor_frac", "max_err", "peak_mib", "note"]
CUDA_SHAPES = ("16384x2048x5", "8192x768x7", "64x2048x5")
CPU_SHAPES = ("2048x512x5",)
CPU_SPLIT_SHAPE = "2048x512x8"  # early exit: 75 % of rows stop after 2 steps, 25 % run all 8
QUICK_SHAPES = ("260x24x2", "5x40x2")  # the tile and the decode path (the interpreter is slow: two steps)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEAK_TFLOPS = 792.0  # bf16 GEMM 8192³ measured on the H100 (benchmarks/README.md)


def parse_shape(text):
    n, d, T = (int(s) for s in text.lower().split("x"))
    return n, d, T


def make_inputs(n, d, T, dtype, device, hidden=64, early_exit=False, seed=0):
    """(h, x, kwargs) for inl_iterate from a real IntegratorLayer; with `early_exit`, rows
    spread in distance from mu and a `tol` that makes them stop at different steps."""
    from inl_kernels.modules import Controller, IntegratorLayer

    torch.manual_seed(seed)
    layer = IntegratorLayer(d, Controller(d, hidden), num_iterations=T)
    with torch.no_grad():  # give every parameter some spread, as after training
        layer.mod_scale.add_(0.1 * torch.randn(4))
        layer.mod_bias.add_(0.1 * torch.randn(4))
        layer.mu_local.normal_(0, 0.1)
    kw = dict(layer.controller.weights(), mod_scale=layer.mod_scale, mod_bias=layer.mod_bias,
              mu=layer.equilibrium(), exc_index=layer.exc_index, gamma=layer.gamma, phi=layer.phi,
              amplitude=layer.excitation_amplitude, dt=layer.dt, kappa=layer.kappa, num_iterations=T)
    kw = {k: (t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
              if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    h = torch.randn(n, d).to(device, dtype)
    x = torch.randn(n, d)
    if early_exit:
        x = x * torch.logspace(-2.5, 0.5, n)[torch.randperm(n)][:, None]
    x = (kw["mu"].float().cpu() + x).to(device, dtype)
    if early_exit:
        kw["tol"] = _spread_tol(h, x, kw)
        kw["min_iterations"] = 1
    return h, x, kw


def _spread_tol(h, x, kw, sample=256):
    """A tol that stops about half of the rows by the middle step, from the reference's step
    norms on a sample of rows."""
    rows = torch.linspace(0, x.shape[0] - 1, min(sample, x.shape[0])).long().to(x.device)
    with torch.no_grad():
        _, info = reference_iterate(h[rows], x[rows], **kw, return_trajectory=True)
    steps = (info.trajectory_x[:, 1:].float() - info.trajectory_x[:, :-1].float()).norm(dim=-1)
    middle = steps[:, (kw["num_iterations"] - 1) // 2].sort().values
    if middle.numel() == 1:
        return float(middle[0]) * 1.5
    k = middle.numel() // 2  # halfway between two rows: no row sits on the boundary
    return float(middle[k - 1] + middle[k]) / 2


def make_split_inputs(n, d, T, dtype, device, hidden=64, fast=0.75, fast_steps=2, seed=0):
    """(h, x, kwargs with tol) where a `fast` share of rows (shuffled) starts next to mu and stops
    after `fast_steps` steps, and the rest starts far away and runs all T: tol sits between the
    fast rows' step norms at step `fast_steps` and the slow rows' smallest, from the reference on
    a sample of rows."""
    h, x, kw = make_inputs(n, d, T, dtype, device, hidden=hidden, seed=seed)
    g = torch.Generator().manual_seed(seed + 5)
    is_fast = torch.zeros(n, dtype=torch.bool)
    is_fast[torch.randperm(n, generator=g)[: int(n * fast)]] = True
    scale = torch.where(is_fast, 0.003, 3.0)[:, None]
    x = (kw["mu"].float().cpu() + torch.randn(n, d, generator=g) * scale).to(device, dtype)
    rows = torch.arange(0, n, max(1, n // 256))
    with torch.no_grad():
        _, info = reference_iterate(h[rows.to(device)], x[rows.to(device)], **kw, return_trajectory=True)
    steps = (info.trajectory_x[:, 1:].float() - info.trajectory_x[:, :-1].float()).norm(dim=-1).cpu()
    sample_fast = is_fast[rows]
    upper = steps[sample_fast, fast_steps - 1].max()
    lower = steps[~sample_fast].min()
    assert upper < lower, "fast and slow rows overlap: no tol separates them"
    kw["tol"] = float((upper * lower).sqrt())
    kw["min_iterations"] = fast_steps
    return h, x, kw


def bench_split(n, d, T, dtype, device, impls, hidden, warmup, repeat):
    """Forward with early exit on and off on the early-exit case's inputs, each backend but eager
    and compile (whose early exit saves nothing: they run every step on every row)."""
    from benchmarks.common import interleaved_ms

    h, x, kw = make_split_inputs(n, d, T, dtype, device, hidden=hidden)
    off = {k: v for k, v in kw.items() if k not in ("tol", "min_iterations")}
    rows = []
    for name, fn in impls.items():
        if name in ("eager", "compile"):
            continue
        try:
            with torch.no_grad():
                _, info = fn(h, x, **kw)
            note = f"tol {kw['tol']:.3g}, mean steps {info.iterations.float().mean().item():.2f} of {T}"

            def run(args):
                with torch.no_grad():
                    return fn(h, x, **args)
            off_ms, on, gemm_ms = interleaved_ms([lambda: run(off), lambda: run(kw), _gemm_call()], warmup, repeat)
            rate = 2 * 2048**3 / (gemm_ms / 1e3)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(shape=f"{n}x{d}x{T}", dtype=str(dtype).replace("torch.", ""), mode="fwd",
                             early_exit="split", impl=name, note=f"failed: {type(e).__name__}: {str(e)[:160]}"))
            continue
        base = dict(shape=f"{n}x{d}x{T}", dtype=str(dtype).replace("torch.", ""), mode="fwd", impl=name)
        steps = info.iterations.float().mean().item()
        for early_exit, t, ran in (("off", off_ms, T), ("split", on, steps)):
            flops = 2.0 * n * hidden * (d + 6 * d * ran)  # the steps the rows run
            row = dict(base, early_exit=early_exit, ms=t, note=note if early_exit == "split" else None,
                       floor_frac=flops / rate * 1e3 / t, gemm_gflops=rate / 1e9)
            if early_exit == "split":
                row["vs_exit_off"] = t / off_ms
            rows.append(row)
    return rows


def _gemm_call():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    return lambda: a @ b


def floor_ms(n, d, T, hidden, dtype, mode, bandwidth_gbs, peak_tflops):
    flops = 2.0 * n * hidden * (d + 6 * d * T)
    moved = 4 * n * d * torch.tensor([], dtype=dtype).element_size()
    if mode == "fwd+bwd":
        flops, moved = 3 * flops, 2 * moved
    return max(flops / (peak_tflops * 1e12), moved / (bandwidth_gbs * 1e9)) * 1e3


def reference_iterate(h, x, **kw):
    """The eager reference with inl_iterate's keyword arguments (what "eager" times)."""
    from inl_kernels import reference
    from inl_kernels.common import iterate_bundle

    return reference.iterate(*iterate_bundle(h, x, **kw))


def implementations(device, use_compile):
    """name -> iterate(h, x, **kw) returning (x_T, info)."""
    import inl_kernels
    from inl_kernels import inl_iterate

    impls = {"eager": reference_iterate}
    if use_compile:
        inl_kernels.pin_inductor_vec_isa()  # a cache written under another vector ISA would run wrong code
        impls["compile"] = torch.compile(reference_iterate)
    for name in inl_kernels.backends():
        if name == "reference" or (name in ("cpu",) and device != "cpu") or (name == "cuda" and device != "cuda"):
            continue
        impls[name] = lambda h, x, _name=name, **kw: inl_iterate(h, x, **kw, backend=_name, return_info=True)
    return impls


def _graph_replay(fn, device):
    """fn captured in a CUDA graph: the decode path's launches without Python overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_shape(n, d, T, dtype, device, modes, early_exits, impls, hidden, warmup, repeat, bandwidth, peak):
    from benchmarks.common import interleaved_ms, peak_memory_mib, time_fn

    rows = []
    for early_exit in early_exits:
        h, x, kw = make_inputs(n, d, T, dtype, device, hidden=hidden, early_exit=early_exit)
        with torch.no_grad():
            want_x, want = impls["eager"](h.double(), x.double(), **{
                k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                for k, t in kw.items()})
        note = None
        if early_exit:
            note = f"tol {kw['tol']:.3g}, mean steps {want.iterations.float().mean().item():.2f} of {T}"
        want_grads = None
        for mode in modes:
            if mode == "fwd+bwd" and early_exit:
                continue  # training runs every step: early exit does not apply
            timed, pending = {}, []
            for name, fn in impls.items():
                row = dict(shape=f"{n}x{d}x{T}", dtype=str(dtype).replace("torch.", ""), mode=mode,
                           early_exit=early_exit, impl=name, note=note)
                try:
                    if mode == "fwd":
                        def call(fn=fn):
                            with torch.no_grad():
                                return fn(h, x, **kw)
                        out, _ = call()
                        row["max_err"] = ((out.double() - want_x).abs().max() / want_x.abs().max()).item()
                    else:
                        params = {k: t.detach().clone().requires_grad_(True) for k, t in kw.items()
                                  if isinstance(t, torch.Tensor) and t.is_floating_point()}
                        hg, xg = h.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
                        inputs = (hg, xg, *params.values())
                        args = dict(kw, **params)
                        g = torch.Generator(device=device).manual_seed(1)
                        dy = torch.randn(x.shape, generator=g, device=device).to(dtype)
                        de = torch.randn(n, T, generator=g, device=device)
                        dd = torch.randn(n, T, generator=g, device=device)

                        def call(fn=fn, hg=hg, xg=xg, inputs=inputs, args=args):
                            out, info = fn(hg, xg, **args)
                            return torch.autograd.grad((out, info.energy, info.distance), inputs,
                                                       (dy.to(out.dtype), de.to(info.energy.dtype),
                                                        dd.to(info.distance.dtype)), allow_unused=True)
                        got = call()
                        if want_grads is None:  # the fp64 reference's gradients of the same loss
                            hd, xd = h.double().requires_grad_(True), x.double().requires_grad_(True)
                            pd = {k: t.double().requires_grad_(True) for k, t in params.items()}
                            want_grads = call(impls["eager"], hd, xd, (hd, xd, *pd.values()), dict(kw, **pd))
                        row["max_err"] = max(((g.double() - w).abs().max() / w.abs().max()).item()
                                             for g, w in zip(got, want_grads) if g is not None and w is not None
                                             and w.abs().max() > 0)
                    if device == "cpu":  # timed below, interleaved with the others and the GEMM
                        pending.append((name, row, call))
                        continue
                    ms = time_fn(call, device=device, warmup=warmup, repeat=repeat)
                    row["ms"] = ms
                    row["peak_mib"] = peak_memory_mib(call, device)
                    if bandwidth is not None:
                        row["floor_frac"] = floor_ms(n, d, T, hidden, dtype, mode, bandwidth, peak) / ms
                except Exception as e:  # one failing implementation must not hide the others
                    row["note"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
                    rows.append(row)
                    continue
                timed[name] = row
                rows.append(row)
                if device == "cuda" and mode == "fwd" and name == "triton" and n <= 256:
                    graph_row = dict(row, impl="triton+graph", peak_mib=None)
                    try:
                        replay = _graph_replay(call, device)
                        graph_row["ms"] = time_fn(replay, device=device, warmup=warmup, repeat=repeat)
                        if bandwidth is not None:
                            graph_row["floor_frac"] = floor_ms(n, d, T, hidden, dtype, mode, bandwidth,
                                                               peak) / graph_row["ms"]
                        timed["triton+graph"] = graph_row
                    except Exception as e:
                        graph_row.update(ms=None, note=f"graph capture failed: {type(e).__name__}: {str(e)[:120]}")
                    rows.append(graph_row)
            if pending:
                *times, gemm_ms = interleaved_ms([c for _, _, c in pending] + [_gemm_call()], warmup, repeat)
                rate = 2 * 2048**3 / (gemm_ms / 1e3)
                ran = want.iterations.float().mean().item() if early_exit else T  # the steps rows run
                flops = 2.0 * n * hidden * (d + 6 * d * ran) * (3 if mode == "fwd+bwd" else 1)
                for (name, row, _), ms in zip(pending, times):
                    row.update(ms=ms, floor_frac=flops / rate * 1e3 / ms, gemm_gflops=rate / 1e9)
                    timed[name] = row
                    rows.append(row)
            for row in timed.values():
                for base, col in (("eager", "vs_eager"), ("compile", "vs_compile")):
                    if base in timed and row.get("ms"):
                        row[col] = timed[base]["ms"] / row["ms"]
    return rows


def main(argv=None):
    from benchmarks.common import add_malloc_argument, apply_malloc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: bf16 fp32 on cuda, fp32 on cpu")
    p.add_argument("--shapes", nargs="+", help="N x d x T, e.g. 16384x2048x5 (default: the baseline shapes of benchmarks/README.md on cuda)")
    p.add_argument("--hidden", type=int, default=64, help="controller hidden size H")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--early-exit", choices=["off", "on", "both"], default="both")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, no torch.compile on a CPU")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--no-split", action="store_true", help="CPU: skip the early-exit case (2048×512×8)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", help="write the results here (benchmarks/common.py format)")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    apply_malloc(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if device == "cpu" and args.quick:
        # the smoke run also drives the Triton kernels, through the interpreter (not a speed)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks.common import copy_bandwidth, print_table, write_json

    shapes = [parse_shape(s) for s in (args.shapes or (QUICK_SHAPES if args.quick else
                                                        CUDA_SHAPES if device == "cuda" else CPU_SHAPES))]
    dtypes = [DTYPES[s] for s in (args.dtype or (["bf16", "fp32"] if device == "cuda" else ["fp32"]))]
    early_exits = {"off": [False], "on": [True], "both": [False, True]}[args.early_exit]
    # inductor on a CPU compiles C++ for minutes: the smoke run skips it there
    use_compile = not args.no_compile and not (args.quick and device == "cpu")
    warmup, repeat = (0, 1) if args.quick else (args.warmup, args.repeat)
    bandwidth = None
    if device == "cuda":
        bandwidth = copy_bandwidth(device, mib=64 if args.quick else 512)
        print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s; peak {args.peak_tflops:.0f} TFLOP/s")
    impls = implementations(device, use_compile)
    print("implementations:", ", ".join(impls))
    machine = {}
    if device == "cpu":
        from benchmarks.common import cpu_path
        from inl_kernels.profile import cpu_model
        machine = dict(cpu_model=cpu_model(), cpu_threads=torch.get_num_threads())
        if cpu_path() is not None:
            machine["cpu_path"] = cpu_path()
        print(f"{machine}")
    rows = []
    for dtype in dtypes:
        for n, d, T in shapes:
            rows += bench_shape(n, d, T, dtype, device, args.modes, early_exits, impls, args.hidden, warmup,
                                repeat, bandwidth, args.peak_tflops)
        if device == "cpu" and not args.no_split and not args.quick and "fwd" in args.modes:
            rows += bench_split(*parse_shape(CPU_SPLIT_SHAPE), dtype, device, impls, args.hidden, warmup,
                                max(repeat, 10))
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, "iterate", [dict(r, copy_gbs=bandwidth, peak_tflops=args.peak_tflops, **machine)
                                          for r in rows])
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_iterate.py --benchmark-enable` (forward, bf16 on a
# GPU at the baseline shapes of benchmarks/README.md; a small fp32 shape on a CPU)

def _bench_cases():
    if torch.cuda.is_available():
        return [(s, "cuda", torch.bfloat16) for s in CUDA_SHAPES]
    return [("256x128x3", "cpu", torch.float32)]


try:
    import pytest
except ImportError:  # the CLI does not need pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("impl", ["eager", "compile", "triton", "cpu"])
    @pytest.mark.parametrize("shape,device,dtype", _bench_cases())
    def test_iterate_forward(benchmark, impl, shape, device, dtype):
        import inl_kernels
        from benchmarks.common import sync

        impls = implementations(device, use_compile=impl == "compile")
        if impl not in impls:
            pytest.skip(f"{impl} does not run here (backends: {inl_kernels.backends()})")
        if impl == "compile" and device == "cpu":
            pytest.skip("inductor on a CPU compiles for minutes")
        n, d, T = parse_shape(shape)
        h, x, kw = make_inputs(n, d, T, dtype, device)
        fn = impls[impl]

        def call():
            with torch.no_grad():
                fn(h, x, **kw)
            sync(device)
        call()
        benchmark(call)


if __name__ == "__main__":
    main()
