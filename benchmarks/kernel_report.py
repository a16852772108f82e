"""What the compiler gives every Triton kernel we launch: registers per thread, spill bytes,
shared memory, and the programs per multiprocessor those allow on an H100/H200 (sm_90).

Two sources:

* static (default, no GPU needed): compiles each kernel ahead of time for sm_90 at the
  configurations the dispatch picks (`_tile_config`, the decode block, `_backward_config`) for
  d ∈ {768, 2048, 4096}, H ∈ {32, 64, 128} and bf16, fp16, fp32 activations, runs Triton's
  bundled ptxas with -v on the PTX and reads its report. For the iterate it adds the
  global-memory bytes per step and row that the tile shape implies (`bytes_per_row_step`).
* driver (`--driver`, on a GPU): launches the ops at the benchmark shapes and reads what the
  CUDA driver reports for each kernel Triton loaded (registers, local memory per thread).

    python -m benchmarks.kernel_report --json benchmarks/results/kernel-report-sm90.json
    python -m benchmarks.kernel_report --kernels _iterate_fwd_tile --d 2048 --hidden 64 --dtype bf16
    python -m benchmarks.kernel_report --driver --json report-driver.json      # on a GPU

Run it after touching a kernel: a row with spills is flagged, and `--fail-on-spill` makes the
command fail (tests/triton/test_kernel_report.py does that for one bf16 configuration each).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# sm_90 (H100 / H200): the limits that decide how many programs fit on one multiprocessor
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are handed to a warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024

# pointer arguments of the iterate kernels that carry the activations' dtype; the rest are fp32
ACTIVATION_POINTERS = ("h_ptr", "x0_ptr", "v0_ptr", "xo_ptr", "vo_ptr", "w_h_ptr", "w_x_ptr", "w_v_ptr",
                       "w_o_ptr", "b_o_ptr", "mu_ptr", "trajx_ptr", "trajv_ptr", "gxT_ptr", "gvT_ptr", "dx_ptr",
                       "dv_ptr", "c_dot_ptr", "gpre_dot_ptr", "gq_ptr")
FLOAT_ARGS = ("dt", "kappa", "tol", "zero")
INT_POINTERS = ("iters_ptr", "list_ptr", "count_ptr", "flag_ptr")
COLUMNS = ["kernel", "dtype", "d", "H", "config", "registers", "spill_stores", "spill_loads", "shared_kib",
           "programs_per_sm", "warps_per_sm", "bytes_per_row_step", "flag"]


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs (thread blocks) of this kernel that fit on one sm_90 multiprocessor at once."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // (per_warp * num_warps) if registers else MAX_BLOCKS_PER_SM
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_shared = SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK)
    return max(0, min(by_registers, by_warps, by_shared, MAX_BLOCKS_PER_SM))


def bytes_per_row_step(kernel: str, d: int, H: int, BM: int, act_bytes: int, save: bool = False) -> Optional[int]:
    """Global-memory bytes one step moves per row on the iterate's tile paths: the fp32 state read
    and written, the weights re-read once per tile of BM rows (shared by its rows), and the
    activations saved for the backward. None for kernels this does not model."""
    weights = (6 * d * H + 4 * d) * act_bytes + 2 * d * act_bytes  # w_x, w_v, w_o; b_o; mu and the table row
    if kernel == "_iterate_fwd_tile":
        state = 4 * d * 4  # x, v read and written in fp32
        saved = (H + 1) * 4 if save else 0
        return state + weights // BM + saved
    if kernel == "_decode_step":
        return 4 * d * 4 + weights // BM + 4 * H * 4  # + the per-slice partials of the pre-activation
    return None


def signature(fn, constexprs: dict, activation_ptr: str) -> dict:
    """Triton's signature of an iterate-style kernel: activations in `activation_ptr`'s type,
    every other pointer fp32, iters int32, dt/kappa/tol fp32, other scalars int32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = activation_ptr if name in ACTIVATION_POINTERS else "*fp32"
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def attributes(fn, constexprs: dict, divisible=("N", "D")) -> dict:
    """What Triton's launcher specializes at the benchmark shapes: every pointer (torch's
    allocations) and the integer sizes in `divisible` (N, d multiples of 16) are known to be
    divisible by 16, which is what lets the compiler vectorize the loads and stores. Compiling
    without it reports the scalar-access code the GPU never runs (more address registers)."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        if name.endswith("_ptr") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _dtypes():
    import triton.language as tl

    # (name, pointer type, element bytes, DOT, PREC, CAST_OUT): what `_dot_types` picks on a GPU
    return (("bf16", "*bf16", 2, tl.bfloat16, "ieee", True), ("fp16", "*fp16", 2, tl.float16, "ieee", True),
            ("fp32", "*fp32", 4, tl.float32, "tf32x3", False))


def iterate_cases(ds=(768, 2048, 4096), hiddens=(32, 64, 128), dtypes=("bf16", "fp16", "fp32"), kernels=None):
    """(kernel name, label, constexprs, launch options, pointer type, d, H, BM, bytes) for every
    iterate kernel at the configuration the dispatch picks, as the model calls it (no initial
    velocity, excitation and dynamic alpha on, early exit at inference, every upstream gradient)."""
    import triton
    import triton.language as tl

    from inl_kernels.triton import iterate as it

    out = []
    for name, ptr, nbytes, dot, prec, cast_out in _dtypes():
        if name not in dtypes:
            continue
        types = dict(DOT=dot, PREC=prec, ACC=tl.float32)
        flags = dict(HAS_V=False, HAS_EXC=True, USE_KAPPA=True, **types)
        grads = dict(HAS_GX=True, HAS_GV=True, HAS_GE=True, HAS_GD=True)
        for d in ds:
            for H in hiddens:
                tile = it._tile_config(d, H)
                launch = {k: tile.pop(k) for k in ("num_warps", "num_stages")}
                decode = dict(BM=16, BD=it._decode_block(d))
                bwd = it._backward_config(4 * 4096, d, H, _cpu(), None)
                bwd.pop("SPLITS")
                bwd_launch = {k: bwd.pop(k) for k in ("num_warps", "num_stages") if k in bwd}
                rows = [
                    ("_iterate_fwd_tile", "inference", dict(H=H, **tile, EARLY_EXIT=True, SAVE=False, TRAJ=False,
                                                            CAST_OUT=cast_out, **flags), launch, tile["BM"], False),
                    ("_iterate_fwd_tile", "training", dict(H=H, **tile, EARLY_EXIT=False, SAVE=True, TRAJ=False,
                                                           CAST_OUT=cast_out, **flags), launch, tile["BM"], True),
                    ("_decode_prologue", "", dict(H=H, **decode, HAS_V=False, TRAJ=False, **types),
                     dict(num_warps=4, num_stages=1), 16, False),
                    ("_decode_step", "", dict(H=H, **decode, EARLY_EXIT=True, TRAJ=False, CAST_OUT=cast_out, **flags),
                     dict(num_warps=4, num_stages=1), 16, False),
                    ("_iterate_bwd_rows", "", dict(H=H, **bwd, **flags, **grads), dict(bwd_launch), bwd["BM"], False),
                    ("_iterate_bwd_cols", "", dict(H=H, **bwd, TP=triton.next_power_of_2(5), **flags, **grads),
                     dict(bwd_launch), bwd["BM"], False),
                ]
                for kernel, label, constexprs, opts, bm, save in rows:
                    if kernels and kernel not in kernels:
                        continue
                    opts = dict(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 1))
                    out.append(dict(kernel=kernel, label=label, constexprs=constexprs, options=opts, ptr=ptr,
                                    dtype=name, d=d, H=H,
                                    bytes=bytes_per_row_step(kernel, d, H, bm, nbytes, save)))
    return out


def _cpu():
    import torch
    return torch.device("cpu")


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict:
    """Runs Triton's bundled ptxas -v on `ptx`; returns registers, spill stores/loads, stack."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "kernel.o")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-500:]}")

    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack=number(r"(\d+) bytes stack frame"))


def compile_case(case: dict) -> dict:
    """Compiles one case for sm_90 and returns its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inl_kernels.triton import iterate as it

    fn = getattr(it, case["kernel"])
    constexprs = case["constexprs"]
    compiled = triton.compile(ASTSource(fn, signature(fn, constexprs, case["ptr"]), constexprs),
                              target=GPUTarget("cuda", 90, 32), options=case["options"])
    report = ptxas_report(compiled.asm["ptx"])
    shared = int(compiled.metadata.shared)
    warps = case["options"]["num_warps"]
    per_sm = programs_per_sm(report["registers"], warps, shared)
    shown = {k: v for k, v in constexprs.items() if k in ("BM", "BD")}
    config = " ".join(f"{k}={v}" for k, v in shown.items()) + f" w={warps}" + (f" {case['label']}" if case["label"] else "")
    return dict(kernel=case["kernel"], dtype=case["dtype"], d=case["d"], H=case["H"], config=config,
                registers=report["registers"], spill_stores=report["spill_stores"],
                spill_loads=report["spill_loads"], shared_kib=round(shared / 1024, 1), programs_per_sm=per_sm,
                warps_per_sm=per_sm * warps, bytes_per_row_step=case["bytes"],
                flag="SPILLS" if report["spill_stores"] else "")


def static_report(**selection) -> list[dict]:
    rows = []
    cache = {}
    for case in iterate_cases(**selection):
        key = (case["kernel"], case["ptr"], repr(sorted(case["constexprs"].items(), key=str)),
               repr(sorted(case["options"].items())))
        if key not in cache:  # d only enters the launch, so many cases share one binary
            cache[key] = compile_case(case)
        rows.append(dict(cache[key], d=case["d"], H=case["H"], bytes_per_row_step=case["bytes"]))
    return rows


# ---- the driver's view, on a GPU ---------------------------------------------------------------

def loaded_kernels() -> list[dict]:
    """Every Triton kernel of inl_kernels.triton loaded in this process, with what the driver
    reports for it: registers per thread, local memory (spills) per thread, shared memory."""
    import importlib

    from triton.runtime.jit import JITFunction

    rows = []
    for module_name in ("iterate", "rms_norm", "rope", "attention", "swiglu"):
        try:
            module = importlib.import_module(f"inl_kernels.triton.{module_name}")
        except ImportError:
            continue
        for name, fn in vars(module).items():
            if not isinstance(fn, JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                kernel_cache = caches[0] if isinstance(caches, tuple) else caches
                for key, kernel in kernel_cache.items():
                    meta = kernel.metadata
                    warps = int(getattr(meta, "num_warps", 0))
                    shared = int(getattr(meta, "shared", 0))
                    regs = int(getattr(kernel, "n_regs", 0) or 0)
                    spills = int(getattr(kernel, "n_spills", 0) or 0)
                    src = getattr(kernel, "src", None)
                    constants = getattr(src, "constants", None) or {}
                    names = getattr(getattr(src, "fn", None), "arg_names", fn.arg_names)
                    shown = {}
                    for k, v in constants.items():  # keyed by name, or by (argument index,)
                        k = k[0] if isinstance(k, tuple) and len(k) == 1 else k
                        shown[names[k] if isinstance(k, int) and k < len(names) else str(k)] = v
                    config = " ".join(f"{k}={shown[k]}" for k in ("BM", "BD", "BLOCK_M", "BLOCK_N", "BLOCK")
                                      if k in shown)
                    rows.append(dict(kernel=name, module=module_name, config=f"{config} w={warps}".strip(),
                                     registers=regs, spill_stores=spills, shared_kib=round(shared / 1024, 1),
                                     programs_per_sm=programs_per_sm(regs, warps, shared) if warps else None,
                                     flag="SPILLS" if spills else "", key=str(key)[:300]))
    return rows


def driver_report(dtypes=("bf16", "fp32")) -> list[dict]:
    """Runs the iterate forward (tile and decode), its backward, RMSNorm, RoPE and attention at the
    benchmark shapes, then reads the loaded kernels' attributes."""
    import torch

    from benchmarks.bench_iterate import DTYPES, make_inputs
    from inl_kernels import gqa_attention, inl_iterate, rms_norm, rope, rope_tables

    for name in dtypes:
        dtype = DTYPES[name]
        for n, d, T in ((16384, 2048, 5), (8192, 768, 7), (64, 2048, 5)):
            h, x, kw = make_inputs(n, d, T, dtype, "cuda")
            with torch.no_grad():
                inl_iterate(h, x, **kw, backend="triton")
            if n > 256:
                xg = x.clone().requires_grad_(True)
                params = {k: t.clone().requires_grad_(True) for k, t in kw.items()
                          if isinstance(t, torch.Tensor) and t.is_floating_point()}
                out = inl_iterate(h, xg, **dict(kw, **params), backend="triton")
                out.float().sum().backward()
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(16384, 2048, device="cuda", generator=g).to(dtype).requires_grad_(True)
        w = torch.ones(2048, device="cuda", dtype=dtype, requires_grad=True)
        rms_norm(x, w, backend="triton").float().sum().backward()
        q = torch.randn(1, 8, 256, 128, device="cuda", generator=g).to(dtype)
        k = torch.randn(1, 2, 256, 128, device="cuda", generator=g).to(dtype)
        cos, sin = rope_tables(256, 128, device="cuda")
        rope(q, k, cos, sin, backend="triton")
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, k))
        gqa_attention(qg, kg, vg, rope=(cos, sin), backend="triton").float().sum().backward()
        with torch.no_grad():
            gqa_attention(q[:, :, -1:], k, k, rope=(cos, sin), backend="triton")
    torch.cuda.synchronize()
    return loaded_kernels()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--driver", action="store_true", help="on a GPU: what the driver reports for the loaded kernels")
    p.add_argument("--d", type=int, nargs="+", default=[768, 2048, 4096])
    p.add_argument("--hidden", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--kernels", nargs="+", help="only these kernels (default: every iterate kernel)")
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 when any row spills")
    p.add_argument("--json", help="write the rows here (benchmarks/common.py format)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 turns kernels into Python: unset it to compile them")
    from benchmarks.common import print_table, write_json

    if args.driver:
        rows = driver_report([d for d in args.dtype if d != "fp16"])
        columns = ["kernel", "config", "registers", "spill_stores", "shared_kib", "programs_per_sm", "flag"]
    else:
        rows = static_report(ds=tuple(args.d), hiddens=tuple(args.hidden), dtypes=tuple(args.dtype),
                             kernels=args.kernels)
        columns = COLUMNS
    print_table(rows, columns)
    if args.json:
        import triton
        write_json(args.json, "kernel_report_driver" if args.driver else "kernel_report_sm90",
                   [dict(r, triton=triton.__version__) for r in rows])
    if args.fail_on_spill and any(r.get("spill_stores") for r in rows):
        print("spills found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
