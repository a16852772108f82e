"""Profiler tables for the GPU run (benchmarks/gpu_suite.sh): where the time of the medium
model's forward and training step, and of the iterate's forward + backward, goes, per CUDA
kernel. Written as text (torch.profiler's key_averages tables)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def table(fn, title, rows=25):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return f"==== {title}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import inl_llm
    from benchmarks.bench_iterate import make_inputs
    from inl_kernels import inl_iterate

    text = []
    model = inl_llm.create_model("medium").to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 259, (8, 1024), device="cuda")

    def forward():
        with torch.no_grad():
            model(ids)
    text.append(table(forward, "medium forward, 8 x 1024, bf16, backend auto (eval: early exit on)"))
    del model
    model = inl_llm.create_model("medium").to("cuda").train()

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)[0]
        logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    text.append(table(train, "medium forward + backward, 8 x 1024, autocast bf16"))
    del model
    h, x, kw = make_inputs(16384, 2048, 5, torch.bfloat16, "cuda")
    params = {k: t.detach().clone().requires_grad_(True) for k, t in kw.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    xg = x.clone().requires_grad_(True)

    def iterate():
        out = inl_iterate(h, xg, **dict(kw, **params), backend="triton")
        out.float().sum().backward()
    text.append(table(iterate, "iterate forward + backward, 16384 x 2048 x 5, bf16, triton"))
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
