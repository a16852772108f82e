"""RoPE (q and k together) side by side: eager PyTorch (the reference), torch.compile of it,
Liger-Kernel's RoPE (when `liger_kernel` imports) and ours (Triton), forward and
forward+backward, at the baseline shape of benchmarks/README.md (B4 Hq32 Hkv8 S4096 D64, bf16), with the
fraction of the bandwidth floor.

    python -m benchmarks.bench_rope [--json benchmarks/results/rope.json]
    python -m benchmarks.bench_rope --quick     # seconds-long smoke run (CPU: interpreter)

The floor is reading q, k and writing the rotated q, k once (twice for forward+backward) at
the copy bandwidth measured in the same run; the cos/sin tables are small and left out.
Inside attention (`gqa_attention(..., rope=...)`) the rotation costs no pass of its own; see
bench_attention.py.
"""
from __future__ import annotations

import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: ours runs on the CPU

from benchmarks.common import (add_speedups, copy_bandwidth, op_parser, op_settings, print_table,  # noqa: E402
                               time_fn, write_json)
from inl_kernels import rope, rope_tables  # noqa: E402
from inl_kernels.reference import rope as eager_rope  # noqa: E402

COLUMNS = ["shape", "dtype", "mode", "impl", "ms", "GB/s", "x_floor", "ours_speedup", "max_err", "note"]


def liger_rope():
    """Liger-Kernel's RoPE as f(q, k, cos, sin) over our half tables, or None with the reason.
    Liger takes full-width [1, S, D] tables (cos repeated over both halves, HF layout)."""
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception as e:
        return None, f"liger_kernel unavailable: {type(e).__name__}: {e}"

    def prepare(cos, sin, S, dtype):
        full = lambda t: torch.cat((t[:S], t[:S]), dim=-1)[None].to(dtype)  # noqa: E731
        return full(cos), full(sin)

    return (LigerRopeFunction.apply, prepare), None


def bench(B, Hq, Hkv, S, D, dtype, device, use_compile, warmup, repeat, bandwidth):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, S, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = rope_tables(S, D, device=device)
    impls = {"eager": lambda a, b: eager_rope(a, b, cos, sin, 0)}
    notes = {}
    if use_compile:
        compiled = torch.compile(eager_rope)
        impls["compile"] = lambda a, b: compiled(a, b, cos, sin, 0)
    liger, why = liger_rope()
    if liger is not None:
        apply, prepare = liger
        lcos, lsin = prepare(cos, sin, S, dtype)
        impls["liger"] = lambda a, b: apply(a, b, lcos, lsin)
    else:
        notes["liger"] = why
    impls["ours"] = lambda a, b: rope(a, b, cos, sin, 0, backend="triton")

    want = [t.float() for t in eager_rope(q, k, cos, sin, 0)]
    bytes_fwd = 2 * (q.numel() + k.numel()) * q.element_size()
    shape = f"B{B} Hq{Hq} Hkv{Hkv} S{S} D{D}"
    rows = []
    for mode, floor_bytes in (("fwd", bytes_fwd), ("fwd+bwd", 2 * bytes_fwd)):
        timed = {}
        for name, fn in impls.items():
            row = dict(shape=shape, dtype=str(dtype).replace("torch.", ""), mode=mode, impl=name, note=notes.get(name))
            try:
                # checked on copies: an implementation that rotates in place (Liger may) must not
                # change what the next one is checked on; timing does not depend on the values
                err = max((a.float() - b).abs().max().item() for a, b in zip(fn(q.clone(), k.clone()), want))
                if mode == "fwd":
                    call = lambda: fn(q, k)  # noqa: E731
                else:
                    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
                    call = lambda: torch.autograd.grad(fn(qg, kg), (qg, kg), (dq, dk))  # noqa: E731
                ms = time_fn(call, device=device, warmup=warmup, repeat=repeat)
            except Exception as e:
                rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e)[:120]}"})
                continue
            row.update(ms=ms, **{"GB/s": floor_bytes / ms / 1e6}, x_floor=ms / (floor_bytes / bandwidth / 1e6),
                       max_err=err)
            timed[name] = row
            rows.append(row)
        add_speedups(timed)
    for name, why in notes.items():
        if name not in impls:
            rows.append(dict(shape=shape, dtype=str(dtype).replace("torch.", ""), mode="-", impl=name, note=why))
    return rows


def main(argv=None):
    p = op_parser(__doc__, shape_default="4,32,8,4096,64", shape_help="B,Hq,Hkv,S,D (default: benchmarks/README.md)")
    args = p.parse_args(argv)
    device, dtype, use_compile, warmup, repeat = op_settings(p, args)
    B, Hq, Hkv, S, D = (1, 4, 2, 24, 16) if args.quick else map(int, args.shape.split(","))
    bandwidth = copy_bandwidth(device, mib=8 if args.quick else 512, repeat=2 if args.quick else 10)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s on {device}")
    rows = bench(B, Hq, Hkv, S, D, dtype, device, use_compile, warmup, repeat, bandwidth)
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, "rope", [dict(r, copy_gbs=bandwidth) for r in rows])
    return rows


if __name__ == "__main__":
    main()
