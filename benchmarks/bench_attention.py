"""Causal GQA attention side by side: eager PyTorch (the reference), torch.compile of it,
F.scaled_dot_product_attention (with enable_gqa, and with K/V repeated to Hq heads outside the
timed call, its best case) and ours (Triton), without and with RoPE fused into the op, at the
baseline shapes of benchmarks/README.md:

    prefill  B4 Hq32 Hkv8 S4096 D128, bf16, causal: forward and forward+backward
    decode   B4 Hq32 Hkv8, 1 query against 4096 cached keys, bf16: forward

    python -m benchmarks.bench_attention [--json benchmarks/results/attention.json]
    python -m benchmarks.bench_attention --quick     # seconds-long smoke run (CPU: interpreter)

TFLOP/s counts 4·D flops per visible (query, key) pair and head, forward+backward 3.5× that.
Decode is bandwidth bound: its floor is reading K and V once at the copy bandwidth measured
in the same run. "ours_speedup" is this row's time over ours without rope (> 1: ours is
faster); on the sdpa rows it is the ratio the targets name (forward ≥ 0.9, forward+backward
≥ 0.8, decode ≥ 1).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: ours runs on the CPU

from benchmarks.common import (add_speedups, copy_bandwidth, op_parser, op_settings, peak_memory_mib,  # noqa: E402
                               print_table, time_fn, write_json)
from inl_kernels import gqa_attention, rope_tables  # noqa: E402
from inl_kernels.reference import attention as eager_attention  # noqa: E402

COLUMNS = ["case", "dtype", "mode", "impl", "ms", "TFLOP/s", "GB/s", "x_floor", "ours_speedup", "max_err",
           "peak_mib", "note"]


def implementations(B, Hq, Hkv, Sq, Skv, D, causal, rope, use_compile):
    """name -> f(q, k, v, k_rep, v_rep), each computing the same attention (rope rows rotate
    inside; the others get no rope)."""
    # SDPA's is_causal aligns the mask top-left; queries sit at the end of the keys here, which
    # is the same thing when Sq == Skv, and no mask at all for one query
    if causal and Sq not in (Skv, 1):
        raise ValueError("the SDPA baseline needs Sq == Skv or Sq == 1 under causal masking")
    sdpa_causal = causal and Sq > 1
    impls = {
        "eager": lambda q, k, v, kr, vr: eager_attention(q, k, v, causal),
        "sdpa": lambda q, k, v, kr, vr: F.scaled_dot_product_attention(q, k, v, is_causal=sdpa_causal,
                                                                        enable_gqa=True),
        "sdpa (kv repeated)": lambda q, k, v, kr, vr: F.scaled_dot_product_attention(q, kr, vr,
                                                                                      is_causal=sdpa_causal),
    }
    if use_compile:
        compiled = torch.compile(eager_attention)
        impls["compile"] = lambda q, k, v, kr, vr: compiled(q, k, v, causal)
    impls["ours"] = lambda q, k, v, kr, vr: gqa_attention(q, k, v, causal=causal, backend="triton")
    impls["ours + rope"] = lambda q, k, v, kr, vr: gqa_attention(q, k, v, causal=causal, rope=rope, backend="triton")
    return impls


def visible_pairs(Sq, Skv, causal):
    if not causal:
        return Sq * Skv
    return sum(Skv - Sq + i + 1 for i in range(Sq))


def bench_case(label, B, Hq, Hkv, Sq, Skv, D, causal, modes, dtype, device, use_compile, warmup, repeat,
               bandwidth):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    q, k, v, do = r(B, Hq, Sq, D), r(B, Hkv, Skv, D), r(B, Hkv, Skv, D), r(B, Hq, Sq, D)
    G = Hq // Hkv
    rope = rope_tables(Skv, D, device=device)
    impls = implementations(B, Hq, Hkv, Sq, Skv, D, causal, rope, use_compile)
    with torch.no_grad():
        want = eager_attention(q, k, v, causal).float()
        want_rope = eager_attention(q, k, v, causal, rope=rope).float()
    flops_fwd = 4 * D * B * Hq * visible_pairs(Sq, Skv, causal)
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    for mode in modes:
        timed = {}
        for name, fn in impls.items():
            row = dict(case=label, dtype=str(dtype).replace("torch.", ""), mode=mode, impl=name)
            try:
                if mode == "fwd":
                    kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
                    call = lambda: fn(q, k, v, kr, vr)  # noqa: E731
                    with torch.no_grad():
                        out = call()
                else:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                    kr, vr = (t.repeat_interleave(G, dim=1).detach().requires_grad_() for t in (k, v))
                    inputs = (qg, kr, vr) if "repeated" in name else (qg, kg, vg)
                    call = lambda: torch.autograd.grad(fn(qg, kg, vg, kr, vr), inputs, do)  # noqa: E731
                    with torch.no_grad():
                        out = fn(q, k, v, kr, vr)
                err = (out.float() - (want_rope if "rope" in name else want)).abs().max().item()
                ms = time_fn(call, device=device, warmup=warmup, repeat=repeat)
            except Exception as e:  # one failing implementation must not hide the others
                rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e)[:120]}"})
                continue
            flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
            row.update(ms=ms, max_err=err, **{"TFLOP/s": flops / ms / 1e9})
            if Sq == 1:
                row.update(**{"GB/s": kv_bytes / ms / 1e6}, x_floor=ms / (kv_bytes / bandwidth / 1e6))
            if mode == "fwd+bwd":
                row["peak_mib"] = peak_memory_mib(call, device)
            if "repeated" in name:
                row["note"] = "K/V repeated to Hq heads outside the timed call"
            timed[name] = row
            rows.append(row)
        add_speedups(timed)
    return rows


def main(argv=None):
    p = op_parser(__doc__)
    args = p.parse_args(argv)
    device, dtype, use_compile, warmup, repeat = op_settings(p, args)
    if args.quick:
        cases = [("prefill B1 Hq4 Hkv2 S40 D16", 1, 4, 2, 40, 40, 16, True, ("fwd", "fwd+bwd")),
                 ("decode B1 Hq4 Hkv2 1x40 D16", 1, 4, 2, 1, 40, 16, True, ("fwd",))]
    else:
        cases = [("prefill B4 Hq32 Hkv8 S4096 D128", 4, 32, 8, 4096, 4096, 128, True, ("fwd", "fwd+bwd")),
                 ("decode B4 Hq32 Hkv8 1x4096 D128", 4, 32, 8, 1, 4096, 128, True, ("fwd",))]
    bandwidth = copy_bandwidth(device, mib=8 if args.quick else 512, repeat=2 if args.quick else 10)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s on {device}")
    rows = []
    for case in cases:
        rows += bench_case(*case, dtype=dtype, device=device, use_compile=use_compile, warmup=warmup,
                           repeat=repeat, bandwidth=bandwidth)
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, "attention", [dict(r, copy_gbs=bandwidth) for r in rows])
    return rows


if __name__ == "__main__":
    main()
