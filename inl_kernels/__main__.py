"""`python -m inl_kernels`: what this machine can run, and one integrator layer at work."""
import time

import torch

import inl_kernels
from inl_kernels import Controller, IntegratorLayer


def main():
    print(f"inl_kernels {inl_kernels.__version__}  torch {torch.__version__}  "
          f"backends: {', '.join(inl_kernels.backends())}")
    torch.manual_seed(0)
    d, n = 512, 2048
    layer = IntegratorLayer(d, Controller(d, hidden=64), num_iterations=8, tol=0.3, min_iterations=2).eval()
    h = torch.randn(n, d)
    # rows start at different distances from the equilibrium, so they settle at different steps
    x = layer.equilibrium().detach() + torch.randn(n, d) * torch.logspace(-2, 0.5, n)[:, None]
    with torch.no_grad():
        layer(h, x)  # warm-up
        start = time.perf_counter()
        out, info = layer(h, x, return_info=True)
        elapsed = time.perf_counter() - start
    counts = torch.bincount(info.iterations.long(), minlength=9)[1:].tolist()
    print(f"IntegratorLayer d={d}, {n} rows, up to 8 steps, early exit at tol 0.3:")
    print(f"  rows stopping after 1..8 steps: {counts}")
    print(f"  mean steps {info.iterations.float().mean():.2f}; distance to mu from "
          f"{(x - layer.equilibrium()).abs().mean():.3f} to {info.distance[:, -1].mean():.3f}; "
          f"{elapsed * 1e3:.1f} ms on {out.device}")


if __name__ == "__main__":
    main()
