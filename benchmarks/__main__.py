"""`python -m benchmarks`: every benchmark this machine runs, in one process, written as one JSON
file, one Markdown report and PNG plots.

    python -m benchmarks                       # results under benchmarks/results/<cpu|cuda>/
    python -m benchmarks --quick               # a smoke run for CI (seconds; measures nothing)
    python -m benchmarks --compile --kernel-report --out /tmp/bench
    python -m benchmarks --only iterate model  # some sections

Sections (each fails alone: its error is recorded and the others run; the command then exits 1):

  iterate        benchmarks/bench_iterate.py: the iterate forward and forward + backward, early
                 exit off and on, eager vs every backend of ours (CPU: 2048×512, T 5, fp32; GPU:
                 the shapes of benchmarks/README.md)
  ops            bench_rms_norm.py, bench_rope.py, bench_attention.py: GPU benchmarks. Without a
                 GPU they run only with --quick, where ours runs through the Triton interpreter
  iterate_rows   time against work: the iterate forward from 256 to 16384 rows (d 2048 on a GPU,
                 512 on a CPU, T 5), eager vs ours
  attention_seq  time against sequence length: causal GQA attention forward, eager, SDPA and ours
                 (on a CPU ours is the cpu backend: the C++ prefill kernel where it runs, see
                 inl_kernels/cpu/attention.py, else SDPA's fused kernel; the C++ kernel for
                 decode-sized queries)
  early_exit     time against the steps actually run: the iterate forward at a range of
                 tolerances (T 8), rows spread from near the equilibrium to far from it, in random
                 order and sorted by distance
  model          benchmarks/bench_model.py: forward (prefill), training step and greedy decode
                 tokens/s and peak memory, eager (reference) vs ours, + torch.compile with
                 --compile; `tiny` and `small` on a CPU, `small` and `medium` on a GPU
  kernel_report  benchmarks/kernel_report.py (with --kernel-report): registers, spills and
                 occupancy of every Triton kernel compiled for sm_90 (no GPU needed; needs the
                 ptxas Triton ships)

Plots: speedup.png (ours against each baseline, every op and mode measured), iterate_rows.png,
attention_seq.png, early_exit.png, model.png (tokens/s). Timings are medians of repeated calls in
one process (CUDA events on a GPU); compare ratios within a run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("iterate", "ops", "iterate_rows", "attention_seq", "early_exit", "model", "kernel_report")


class Context:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.cuda = args.device == "cuda"
        self.device = args.device
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.compile = args.compile
        self.work = os.path.join(args.out, "raw")
        self.warmup, self.repeat = (1, 2) if args.quick else (2, args.repeat)
        os.makedirs(self.work, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.work, f"{name}.json")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _interpreting() -> bool:
    """Whether the Triton kernels of this process run through the interpreter (inl_kernels reads
    TRITON_INTERPRET once, when it is first imported)."""
    from inl_kernels import _dispatch
    return bool(_dispatch._INTERPRETING)


def auto_backend(device: str, op: str = "iterate") -> str:
    """What backend="auto" runs for `op` on this device (inl_kernels._dispatch.AUTO_ORDER)."""
    import inl_kernels

    native = {"iterate": ("triton",) if device == "cuda" else ("cpu",),
              "attention": ("triton",) if device == "cuda" else ("cpu",)}[op]
    return next((b for b in native if b in inl_kernels.backends()), "reference")


# ---- sections ---------------------------------------------------------------------------------

def section_iterate(ctx):
    from benchmarks import bench_iterate

    argv = ["--device", ctx.device, "--json", ctx.path("iterate"), "--malloc", ctx.args.malloc]
    # the smoke run takes the decode path only: the interpreter runs the tile path's quick shape
    # for a minute (tests/triton/test_iterate_bench.py smoke-tests that one)
    argv += ["--quick", "--shapes", "5x40x3"] if ctx.quick else ["--warmup", str(ctx.warmup),
                                                                 "--repeat", str(ctx.repeat)]
    if not ctx.compile:
        argv.append("--no-compile")
    bench_iterate.main(argv)
    result = _load(ctx.path("iterate"))
    return dict(rows=result["results"], environment=result["environment"])


def section_ops(ctx):
    if not ctx.cuda and not ctx.quick:
        return dict(rows=[], skipped="GPU benchmarks: without a GPU ours runs through the Triton interpreter, which "
                                      "measures nothing (python -m benchmarks --quick runs them as a smoke test)")
    from benchmarks import bench_attention, bench_rms_norm, bench_rope

    rows, notes = [], []
    for name, bench in (("rms_norm", bench_rms_norm), ("rope", bench_rope), ("attention", bench_attention)):
        argv = ["--json", ctx.path(name)]
        argv += ["--quick", "--dtype", "float32"] if ctx.quick else ["--repeat", str(max(ctx.repeat, 5))]
        if not ctx.compile:
            argv.append("--no-compile")
        try:
            bench.main(argv)
            rows += [dict(r, op=name) for r in _load(ctx.path(name))["results"]]
        except SystemExit as e:  # argparse's error exit: report it, keep going
            notes.append(f"{name}: exited {e.code}")
    if not ctx.cuda and _interpreting():
        notes.append("--quick on a CPU: ours ran through the Triton interpreter; these timings measure nothing")
    return dict(rows=rows, notes=notes)


def section_iterate_rows(ctx):
    from benchmarks.bench_iterate import make_inputs, reference_iterate
    from benchmarks.common import time_fn
    from inl_kernels import inl_iterate

    d, T = (64, 3) if ctx.quick else (2048, 5) if ctx.cuda else (512, 5)
    counts = (32, 64, 128) if ctx.quick else tuple(256 * 2**i for i in range(7))
    ours = auto_backend(ctx.device)
    impls = {"eager": reference_iterate, f"ours ({ours})": lambda h, x, **kw: inl_iterate(h, x, **kw, return_info=True)}
    rows = []
    for n in counts:
        h, x, kw = make_inputs(n, d, T, ctx.dtype, ctx.device)
        for name, fn in impls.items():
            def call(fn=fn):
                with torch.no_grad():
                    return fn(h, x, **kw)
            ms = time_fn(call, device=ctx.device, warmup=ctx.warmup, repeat=ctx.repeat)
            rows.append(dict(rows=n, d=d, T=T, impl=name, ms=ms, us_per_row=ms * 1e3 / n))
        print(f"  iterate {n}x{d}x{T}: " + ", ".join(f"{r['impl']} {r['ms']:.3g} ms" for r in rows[-len(impls):]))
    notes = [f"iterate forward, no early exit, N × {d}, T {T}, H 64, {str(ctx.dtype)[6:]}; ours = backend auto "
             f"({ours})"]
    return dict(rows=rows, notes=notes)


def section_attention_seq(ctx):
    import torch.nn.functional as F

    from benchmarks.bench_attention import visible_pairs
    from benchmarks.common import time_fn
    from inl_kernels import gqa_attention
    from inl_kernels.reference import attention as eager_attention

    B, Hq, Hkv, D = (1, 4, 2, 16) if ctx.quick else (1, 32, 8, 128) if ctx.cuda else (1, 8, 2, 64)
    seqs = (16, 32, 64) if ctx.quick else (512, 1024, 2048, 4096, 8192) if ctx.cuda else (128, 256, 512, 1024, 2048)
    eager_limit = 4096 if ctx.cuda else max(seqs)  # the eager S×S scores get slow and large beyond
    ours = auto_backend(ctx.device, "attention")
    notes = [f"causal GQA attention forward, B{B} Hq{Hq} Hkv{Hkv} D{D}, {str(ctx.dtype)[6:]}, Sq = Skv = S"]
    impls = {"eager": lambda q, k, v: eager_attention(q, k, v, True),
             "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    if ours != "reference":
        impls[f"ours ({ours})"] = lambda q, k, v: gqa_attention(q, k, v, causal=True, backend=ours)
    if not ctx.cuda and ctx.quick and _interpreting():
        impls["ours (triton, interpreter)"] = lambda q, k, v: gqa_attention(q, k, v, causal=True, backend="triton")
        notes.append("ours (triton) ran through the Triton interpreter: its timings measure nothing")
    if ours == "reference":
        notes.append("no attention kernel of ours runs here: backend auto runs the eager reference (the eager row)")
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for S in seqs:
        q = torch.randn(B, Hq, S, D, generator=g).to(ctx.device, ctx.dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to(ctx.device, ctx.dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(ctx.device, ctx.dtype)
        flops = 4 * D * B * Hq * visible_pairs(S, S, True)
        for name, fn in impls.items():
            if name == "eager" and S > eager_limit:
                continue
            def call(fn=fn):
                with torch.no_grad():
                    return fn(q, k, v)
            try:
                ms = time_fn(call, device=ctx.device, warmup=ctx.warmup, repeat=ctx.repeat)
            except Exception as e:  # e.g. SDPA without enable_gqa on an old torch
                rows.append(dict(seq=S, impl=name, note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
                continue
            rows.append(dict(seq=S, impl=name, ms=ms, tflops=flops / ms / 1e9))
        print(f"  attention S={S}: " + ", ".join(f"{r['impl']} {r['ms']:.3g} ms" for r in rows if r["seq"] == S
                                                 and r.get("ms")))
    if ctx.cuda:
        notes.append(f"eager measured up to S = {eager_limit}")
    return dict(rows=rows, notes=notes)


def section_early_exit(ctx):
    from benchmarks.bench_iterate import make_inputs, reference_iterate
    from benchmarks.common import time_fn
    from inl_kernels import inl_iterate

    n, d, T = (64, 32, 4) if ctx.quick else (16384, 2048, 8) if ctx.cuda else (2048, 512, 8)
    h, x, kw = make_inputs(n, d, T, ctx.dtype, ctx.device, early_exit=True)
    # tolerances from the reference's own step norms on a sample of rows: quantiles of ‖x' − x‖
    sample = torch.linspace(0, n - 1, min(256, n)).long().to(ctx.device)
    with torch.no_grad():
        _, info = reference_iterate(h[sample], x[sample], **dict(kw, tol=None), return_trajectory=True)
    norms = (info.trajectory_x[:, 1:].float() - info.trajectory_x[:, :-1].float()).norm(dim=-1).flatten()
    levels = (0.1, 0.5) if ctx.quick else (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
    tols = [None] + [float(t) for t in torch.quantile(norms.cpu(), torch.tensor(levels))]
    mu = kw["mu"].float()
    order = (x.float() - mu).norm(dim=-1).argsort()
    variants = {"random order": (h, x), "sorted by distance": (h[order].contiguous(), x[order].contiguous())}
    ours = auto_backend(ctx.device)
    impls = {"eager": reference_iterate,
             f"ours ({ours})": lambda h, x, **k: inl_iterate(h, x, **k, return_info=True)}
    rows = []
    for variant, (hv, xv) in variants.items():
        for name, fn in impls.items():
            if name == "eager" and variant != "random order":
                continue  # the reference's cost does not depend on the order of rows
            for tol in tols:
                args = dict(kw, tol=tol)

                def call(fn=fn, hv=hv, xv=xv, args=args):
                    with torch.no_grad():
                        return fn(hv, xv, **args)
                steps = float(call()[1].iterations.float().mean())
                ms = time_fn(call, device=ctx.device, warmup=ctx.warmup, repeat=ctx.repeat)
                rows.append(dict(variant=variant, impl=name, tol=tol, mean_steps=steps, ms=ms))
        print(f"  early exit, {variant}: " + ", ".join(f"{r['mean_steps']:.2f} steps {r['ms']:.3g} ms"
                                                       for r in rows if r["variant"] == variant)[:300])
    notes = [f"iterate forward {n}×{d}, T {T}, min_iterations 1, {str(ctx.dtype)[6:]}: rows spread from near the "
             "equilibrium to far from it; tol from None (every step) to the 95th percentile of the reference's step "
             "norms. 'sorted by distance' puts rows that stop at the same step into the same tile"]
    return dict(rows=rows, notes=notes)


def section_model(ctx):
    import inl_llm
    from benchmarks import bench_model

    sizes = ["tiny"] if ctx.quick else ["small", "medium"] if ctx.cuda else ["tiny", "small"]
    rows, environment = [], None
    for size in sizes:
        limit = inl_llm.INLConfig.from_name(size).max_seq_len
        seq = 16 if ctx.quick else min(1024 if ctx.cuda else 256, limit)
        argv = ["--device", ctx.device, "--size", size, "--seq", str(seq), "--json", ctx.path(f"model-{size}"),
                "--malloc", ctx.args.malloc]
        argv += ["--quick"] if ctx.quick else ["--warmup", str(ctx.warmup), "--repeat", str(ctx.repeat)]
        if ctx.compile:
            argv.append("--compile")
        bench_model.main(argv)
        result = _load(ctx.path(f"model-{size}"))
        environment = result["environment"]
        rows += [dict(r, seq=seq) for r in result["results"]]
    return dict(rows=rows, environment=environment)


def section_kernel_report(ctx):
    if not ctx.args.kernel_report:
        return dict(rows=[], skipped="not asked for (--kernel-report)")
    argv = [sys.executable, "-m", "benchmarks.kernel_report", "--json", ctx.path("kernel_report")]
    if ctx.quick:
        argv += ["--kernels", "_iterate_fwd_tile", "--d", "2048", "--hidden", "64", "--dtype", "bf16"]
    # the report compiles kernels for sm_90: it must not see the interpreter switch
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout[-3000:])
    if proc.returncode != 0:
        raise RuntimeError(f"kernel_report exited {proc.returncode}: {proc.stderr[-800:]}")
    return dict(rows=_load(ctx.path("kernel_report"))["results"])


RUNNERS = {"iterate": section_iterate, "ops": section_ops, "iterate_rows": section_iterate_rows,
           "attention_seq": section_attention_seq, "early_exit": section_early_exit, "model": section_model,
           "kernel_report": section_kernel_report}


# ---- plots and the report ---------------------------------------------------------------------

def speedup_bars(sections: dict) -> list:
    """[(label, baseline time / our time, baseline)] over every section that compares."""
    bars = []
    for r in sections.get("iterate", {}).get("rows", []):
        if r.get("impl") in ("eager", "compile") or not r.get("ms"):
            continue
        label = f"iterate {r['shape']} {r['mode']}{' early exit' if r.get('early_exit') else ''} [{r['impl']}]"
        for base in ("eager", "compile"):
            if r.get(f"vs_{base}"):
                bars.append((label, r[f"vs_{base}"], base))
    for r in sections.get("ops", {}).get("rows", []):
        if r.get("impl") in ("eager", "compile", "sdpa", "liger") and r.get("ours_speedup"):
            label = f"{r['op']} {r.get('mode')} {r.get('shape') or r.get('case')}"
            bars.append((label, r["ours_speedup"], r["impl"]))
    for r in sections.get("model", {}).get("rows", []):
        if r.get("impl") == "ours" and r.get("vs_reference"):
            bars.append((f"model {r['size']} {r['mode']}", r["vs_reference"], "reference"))
    return bars


def make_plots(sections: dict, out: str, device_label: str) -> list:
    from benchmarks import plots

    made = []
    suffix = f"\n{device_label}"
    made.append(plots.speedups(speedup_bars(sections), os.path.join(out, "speedup.png"), "speedup of ours" + suffix))
    rows = sections.get("iterate_rows", {}).get("rows", [])
    if rows:
        made.append(plots.lines(plots.by(rows, lambda r: r["rows"], lambda r: r.get("ms"), lambda r: r["impl"]),
                                os.path.join(out, "iterate_rows.png"),
                                f"iterate forward, d {rows[0]['d']}, T {rows[0]['T']}: time against rows" + suffix,
                                "rows N (log)", slopes=(1,)))
    rows = sections.get("attention_seq", {}).get("rows", [])
    if rows:
        made.append(plots.lines(plots.by(rows, lambda r: r["seq"], lambda r: r.get("ms"), lambda r: r["impl"]),
                                os.path.join(out, "attention_seq.png"),
                                "causal attention forward: time against sequence length" + suffix,
                                "sequence length S (log)", slopes=(2,)))
    rows = sections.get("early_exit", {}).get("rows", [])
    if rows:
        # each series relative to its own time with every step run, so eager and ours share a scale
        series = {}
        for name, points in plots.by(rows, lambda r: r["mean_steps"], lambda r: r.get("ms"),
                                     lambda r: f"{r['impl']}, {r['variant']}").items():
            full_steps, full_ms = max(points)
            label = f"{name} ({full_ms:.3g} ms at {full_steps:.0f} steps)"
            series[label] = [(s, ms / full_ms) for s, ms in points]
        T = max(r["mean_steps"] for r in rows)
        made.append(plots.lines(series, os.path.join(out, "early_exit.png"),
                                "iterate forward with early exit: time against the steps rows ran" + suffix,
                                "mean steps run per row", "time / time with every step", logx=False, logy=False,
                                ideal={"∝ steps run (ideal)": [(1.0, 1.0 / T), (T, 1.0)]}))
    rows = sections.get("model", {}).get("rows", [])
    groups = {}
    for r in rows:
        if r.get("tokens_per_s"):
            groups.setdefault(f"{r['size']} {r['mode']}", {})[r["impl"]] = r["tokens_per_s"]
    made.append(plots.grouped_bars(groups, os.path.join(out, "model.png"), "INL-LLM tokens/s" + suffix,
                                   "tokens/s (log)"))
    return [p for p in made if p]


COLUMNS = {
    "iterate": ["shape", "dtype", "mode", "early_exit", "impl", "ms", "vs_eager", "vs_compile", "max_err", "peak_mib",
                "note"],
    "ops": ["op", "shape", "case", "dtype", "mode", "impl", "ms", "GB/s", "TFLOP/s", "ours_speedup", "max_err", "note"],
    "iterate_rows": ["rows", "d", "T", "impl", "ms", "us_per_row"],
    "attention_seq": ["seq", "impl", "ms", "tflops", "note"],
    "early_exit": ["variant", "impl", "tol", "mean_steps", "ms"],
    "model": ["size", "mode", "impl", "dtype", "tokens", "ms", "tokens_per_s", "vs_reference", "floor_frac", "peak_mib",
              "note"],
    "kernel_report": ["kernel", "dtype", "d", "H", "config", "registers", "spill_stores", "spill_loads", "shared_kib",
                      "warps_per_sm", "flag"],
}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown(report: dict, out: str) -> str:
    env = report["environment"]
    lines = [f"# Benchmarks — {env['device_label']}", "",
             f"`{env['command']}` on {env['date']}: {env['cpu_model']}, {env['cpu_threads']} threads"
             + (f", {env['gpu']}" if env.get("gpu") else "") + f"; torch {env['torch']}, triton {env['triton']}, "
             f"python {env['python']}; backends {', '.join(env['backends'])}"
             + "".join(f"; {k}={v}" for k, v in env.get("env_vars", {}).items())
             + (f"; load average (1 min) {env['load_average_start'][0]:.1f} at the start, "
                f"{env['load_average_end'][0]:.1f} at the end" if env.get("load_average_end") else "") + ".", ""]
    lines += [f"- {n}" for n in report["notes"]] + [""]
    for name, section in report["sections"].items():
        lines += [f"## {name}", ""]
        if section.get("skipped"):
            lines += [f"Skipped: {section['skipped']}", ""]
            continue
        if section.get("error"):
            lines += [f"**Failed**: `{section['error'].splitlines()[-1]}`", ""]
        if section.get("notes"):
            lines += [f"- {n}" for n in section["notes"]] + [""]
        rows = section.get("rows", [])
        cols = [c for c in COLUMNS.get(name, []) if any(r.get(c) is not None for r in rows)]
        if rows and cols:
            lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
        lines += ["", f"({section.get('seconds', 0):.0f} s)", ""]
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def environment(args) -> dict:
    import inl_kernels
    from benchmarks.common import environment as common_environment

    env = common_environment()
    env.update(backends=inl_kernels.backends(), quick=args.quick, compile=args.compile,
               # OpenMP's waiting policy decides how threads behave on a machine shared with other jobs
               env_vars={k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                     "TRITON_INTERPRET") if k in os.environ},
               triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
               device_label=(f"{env.get('gpu')}" if args.device == "cuda" else f"CPU ({env['cpu_model']}, "
                             f"{env['cpu_threads']} threads)") + (" — quick smoke run" if args.quick else ""),
               command=" ".join(["python -m benchmarks"] + sys.argv[1:]))
    return env


def main(argv=None) -> int:
    from benchmarks.common import add_malloc_argument, apply_malloc

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke run (measures nothing)")
    p.add_argument("--compile", action="store_true", help="add torch.compile baselines (minutes of compiling)")
    p.add_argument("--kernel-report", action="store_true", help="add the static sm_90 kernel report")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (the median is kept)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<cpu|cuda>[-quick])")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    if args.device == "cpu" and args.quick:
        # before inl_kernels (and triton) is imported, which reads it once: the smoke run drives the
        # Triton kernels through the interpreter (apply_malloc below imports inl_kernels)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    apply_malloc(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", args.device + ("-quick" if args.quick else ""))
    ctx = Context(args)
    report = dict(environment=environment(args), notes=[], sections={}, plots=[])
    report["environment"]["load_average_start"] = os.getloadavg()  # 1, 5, 15 minutes: other jobs on the machine
    if args.device == "cpu":
        report["notes"].append(f"CPU run on {report['environment']['cpu_threads']} threads of a machine that may be "
                               "shared with other jobs (load average at the start: "
                               f"{os.getloadavg()[0]:.1f}): absolute times move between runs; compare the ratios "
                               "of one run")
    if _interpreting() and args.device == "cpu":
        report["notes"].append("TRITON_INTERPRET=1: Triton kernels ran through the interpreter; their timings "
                               "measure nothing")
    if args.quick:
        report["notes"].append("--quick: tiny shapes and 1-2 timed calls, a smoke run: no number here is a measurement")
    failed = []
    start = time.perf_counter()
    for name in args.only or SECTIONS:
        print(f"== {name} ({time.perf_counter() - start:.0f} s so far)", flush=True)
        t0 = time.perf_counter()
        try:
            section = RUNNERS[name](ctx)
        except BaseException as e:  # noqa: BLE001 - one failing section must not hide the others
            if isinstance(e, KeyboardInterrupt):
                raise
            traceback.print_exc()
            section = dict(rows=[], error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            failed.append(name)
        section["seconds"] = time.perf_counter() - t0
        if section.get("skipped"):
            print(f"   skipped: {section['skipped']}")
        report["sections"][name] = section
    # paths relative to the output folder: the committed results do not name the machine's folders
    report["plots"] = [os.path.relpath(p, args.out)
                       for p in make_plots(report["sections"], args.out, report["environment"]["device_label"])]
    report["seconds"] = time.perf_counter() - start
    report["environment"]["load_average_end"] = os.getloadavg()
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    md_path = os.path.join(args.out, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(report, args.out))
    print(f"wrote {json_path}, {md_path} and {len(report['plots'])} plots in {report['seconds']:.0f} s")
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
