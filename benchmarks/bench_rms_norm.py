"""RMSNorm side by side: eager PyTorch (the reference), torch.compile of it, Liger-Kernel's
RMSNorm (when `liger_kernel` imports) and ours (Triton), forward and forward+backward, at the
baseline shape of benchmarks/README.md (16384 × 2048, bf16), with the fraction of the bandwidth floor.

    python -m benchmarks.bench_rms_norm [--json benchmarks/results/rms_norm.json]
    python -m benchmarks.bench_rms_norm --quick     # seconds-long smoke run (CPU: interpreter)

The floor is the bytes the op must move at the copy bandwidth measured in the same run
(forward: read x, write y; forward+backward adds read dy, x and write dx). "x_floor" is time
over floor; "ours_speedup" is this row's time over ours (> 1: ours is faster).
"""
from __future__ import annotations

import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: ours runs on the CPU

from benchmarks.common import (add_speedups, copy_bandwidth, op_parser, op_settings, peak_memory_mib,  # noqa: E402
                               print_table, time_fn, write_json)
from inl_kernels import rms_norm  # noqa: E402
from inl_kernels.reference import rms_norm as eager_rms_norm  # noqa: E402

COLUMNS = ["shape", "dtype", "mode", "impl", "ms", "GB/s", "x_floor", "ours_speedup", "max_err", "peak_mib", "note"]


def liger_rms_norm():
    """Liger-Kernel's RMSNorm function, or None with the reason."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception as e:  # not installed, or it fails to import here
        return None, f"liger_kernel unavailable: {type(e).__name__}: {e}"
    return (lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)), None


def implementations(eps, use_compile):
    impls = {"eager": lambda x, w: eager_rms_norm(x, w, eps)}
    notes = {}
    if use_compile:
        compiled = torch.compile(eager_rms_norm)
        impls["compile"] = lambda x, w: compiled(x, w, eps)
    liger, why = liger_rms_norm()
    if liger is not None:
        impls["liger"] = lambda x, w: liger(x, w, eps)
    else:
        notes["liger"] = why
    impls["ours"] = lambda x, w: rms_norm(x, w, eps, backend="triton")
    return impls, notes


def bench(M, N, dtype, device, use_compile, warmup, repeat, bandwidth):
    eps = 1e-6
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, N, generator=g, device=device, dtype=torch.float32).to(dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g, device=device, dtype=torch.float32)).to(dtype)
    dy = torch.randn(M, N, generator=g, device=device, dtype=torch.float32).to(dtype)
    r = torch.randn(M, N, generator=g, device=device, dtype=torch.float32).to(dtype)
    esize = x.element_size()
    floor_bytes = {"fwd": 2 * M * N * esize, "fwd+bwd": 5 * M * N * esize, "fwd residual": 4 * M * N * esize}
    impls, notes = implementations(eps, use_compile)
    want = eager_rms_norm(x, w, eps).float()
    rows = []
    for mode in ("fwd", "fwd+bwd", "fwd residual"):
        timed = {}
        for name, fn in impls.items():
            row = dict(shape=f"{M}x{N}", dtype=str(dtype).replace("torch.", ""), mode=mode, impl=name)
            try:
                if mode == "fwd":
                    err = (fn(x, w).float() - want).abs().max().item()
                    call = lambda: fn(x, w)  # noqa: E731
                elif mode == "fwd+bwd":
                    xg, wg, dyc = x.detach().requires_grad_(), w.detach().requires_grad_(), dy.clone()
                    err = (fn(xg, wg).float() - want).abs().max().item()
                    call = lambda: torch.autograd.grad(fn(xg, wg), (xg, wg), dyc)  # noqa: E731
                else:  # the pre-norm block's `h, x = rms_norm(a, w, residual=x)`
                    if name in ("liger",):
                        continue
                    want_r = eager_rms_norm(x + r, w, eps).float()
                    if name == "ours":
                        call = lambda: rms_norm(x, w, eps, residual=r, backend="triton")  # noqa: E731
                        err = (call()[0].float() - want_r).abs().max().item()
                    else:
                        def call(fn=fn):
                            s = x + r
                            return fn(s, w), s
                        err = (call()[0].float() - want_r).abs().max().item()
                ms = time_fn(call, device=device, warmup=warmup, repeat=repeat)
            except Exception as e:  # one failing implementation must not hide the others
                rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e)[:120]}"})
                continue
            floor_ms = floor_bytes[mode] / bandwidth / 1e6
            row.update(ms=ms, **{"GB/s": floor_bytes[mode] / ms / 1e6}, x_floor=ms / floor_ms, max_err=err,
                       peak_mib=peak_memory_mib(call, device) if mode == "fwd+bwd" else None)
            timed[name] = row
            rows.append(row)
        add_speedups(timed)
    for name, why in notes.items():
        rows.append(dict(shape=f"{M}x{N}", dtype=str(dtype).replace("torch.", ""), mode="-", impl=name, note=why))
    return rows


def main(argv=None):
    p = op_parser(__doc__, shape_default="16384x2048", shape_help="M x N (default: benchmarks/README.md)")
    args = p.parse_args(argv)
    device, dtype, use_compile, warmup, repeat = op_settings(p, args)
    M, N = (64, 200) if args.quick else map(int, args.shape.lower().split("x"))
    bandwidth = copy_bandwidth(device, mib=8 if args.quick else 512, repeat=2 if args.quick else 10)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s on {device}")
    rows = bench(M, N, dtype, device, use_compile, warmup, repeat, bandwidth)
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, "rms_norm", [dict(r, copy_gbs=bandwidth) for r in rows])
    return rows


if __name__ == "__main__":
    main()
