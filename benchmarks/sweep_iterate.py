"""Block-size sweep of the Triton iterate on a GPU: the forward's tile and decode paths and the
backward, each configuration timed side by side in one process and checked against the
dispatch's own configuration (max relative difference of x_T or of dx), so a broken
configuration shows as an error, not as a fast time. Its output is what `_tile_config` and
`_backward_config` are chosen from; the dispatch never times anything at run time.

    python -m benchmarks.sweep_iterate --shape 16384x2048x5 --dtype bf16 --json sweep.json
    python -m benchmarks.sweep_iterate --budget 60        # stop after about a minute
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def candidates(kind, n):
    """Configurations to try, most promising first (the budget may stop the sweep early). Keys:
    the forward's BM, BD (rows, columns of a block; the tile path needs BM = 64 or 128 for
    wgmma), NB (decode: column blocks per program), num_warps, num_stages; the backward's BM,
    BD, num_warps (phase 1, `_bwd_rows`) and BM2, BD2, num_warps2 (phase 2, `_bwd_cols`), SPLITS.
    A forward BD other than the dispatch's changes the reduction blocks, so its max_diff is a
    rounding difference, not an error; kernel_report says which of these spill. A backward
    configuration times forward and backward, and its BM, BD, num_warps apply to the forward too."""
    if kind == "fwd":
        for bm, bd, w, st in ((64, 16, 4, 2), (64, 32, 4, 1), (64, 32, 4, 2), (128, 16, 8, 1), (64, 8, 4, 1),
                              (128, 32, 8, 1), (64, 16, 8, 1)):
            yield dict(BM=bm, BD=bd, num_warps=w, num_stages=st)
    elif kind == "decode":
        for bm, bd, nb, w in ((64, 16, 1, 4), (64, 16, 4, 4), (16, 16, 2, 4), (64, 32, 1, 4), (16, 32, 1, 4),
                              (64, 16, 8, 4)):
            if bm <= max(64, n):
                yield dict(BM=bm, BD=bd, NB=nb, num_warps=w, num_stages=1)
    else:
        for cfg in (dict(BM=64, BD=16, num_warps=4, BM2=64, BD2=16, num_warps2=8),
                    dict(BM=128, BD=16, num_warps=8, BM2=64, BD2=32, num_warps2=8),
                    dict(BM=128, BD=16, num_warps=8, BM2=64, BD2=8, num_warps2=4),
                    dict(BM=128, BD=32, num_warps=8, BM2=64, BD2=16, num_warps2=8),
                    dict(BM=64, BD=32, num_warps=4, BM2=128, BD2=16, num_warps2=8)):
            yield cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16384x2048x5")
    p.add_argument("--decode-shape", default="64x2048x5")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--kinds", nargs="+", default=["fwd", "decode", "bwd"], choices=["fwd", "decode", "bwd"])
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the whole sweep")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the sweep needs a CUDA GPU")
    from benchmarks.bench_iterate import make_inputs, parse_shape
    from benchmarks.common import print_table, time_fn, write_json
    from inl_kernels.common import iterate_bundle
    from inl_kernels.triton import iterate as triton_iterate

    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    rows = []
    per_kind = args.budget / len(args.kinds)
    for kind in args.kinds:
        n, d, T = parse_shape(args.decode_shape if kind == "decode" else args.shape)
        h, x, kw = make_inputs(n, d, T, dtype, "cuda")
        path = "decode" if kind == "decode" else "tile"
        if kind == "bwd":
            params = {k: t.detach().clone().requires_grad_(True) for k, t in kw.items()
                      if isinstance(t, torch.Tensor) and t.is_floating_point()}
            xg = x.detach().clone().requires_grad_(True)
            dy = torch.randn_like(x)

            def run(config):
                out, _ = triton_iterate.iterate(*iterate_bundle(h, xg, **dict(kw, **params)), _config=config)
                return torch.autograd.grad(out, (xg,), dy)[0]
        else:
            def run(config):
                with torch.no_grad():
                    return triton_iterate.iterate(*iterate_bundle(h, x, **kw), _path=path, _config=config)[0]
        reference = run(None).float()
        kind_start = time.perf_counter()
        for config in [None] + list(candidates(kind, n)):
            if time.perf_counter() - kind_start > per_kind:
                rows.append(dict(kind=kind, config="(budget spent)"))
                break
            row = dict(kind=kind, shape=f"{n}x{d}x{T}", dtype=args.dtype, config="dispatch" if config is None
                       else " ".join(f"{k}={v}" for k, v in config.items()))
            try:
                out = run(config).float()
                row["max_diff"] = ((out - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()
                row["ms"] = time_fn(lambda: run(config), device="cuda", warmup=2, repeat=args.repeat)
            except Exception as e:  # a configuration that does not fit (shared memory, registers)
                row["note"] = f"{type(e).__name__}: {str(e)[:100]}"
            rows.append(row)
        timed = [r for r in rows if r["kind"] == kind and r.get("ms")]
        if timed:
            base = next((r["ms"] for r in timed if r["config"] == "dispatch"), None)
            for r in timed:
                r["vs_dispatch"] = base / r["ms"] if base else None
    print_table(rows, ["kind", "shape", "dtype", "config", "ms", "vs_dispatch", "max_diff", "note"])
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        write_json(args.json, "sweep_iterate", rows)


if __name__ == "__main__":
    main()
