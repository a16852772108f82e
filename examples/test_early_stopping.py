"""Time inference with a fixed number of integrator steps against adaptive early exit, through
the original package's API (`use_adaptive_stopping`, `adaptive_convergence_threshold`,
`model.layers[i].inl.avg_iterations`).

Both models hold the same weights; the only difference is that the adaptive one lets a row stop
once its step |x' - x| falls below the threshold (after 3 steps at least). They are timed
alternately in this process, and the medians and their ratio are printed.

An untrained model's trajectories rarely settle below the default threshold of 1e-3, so it runs
every step and the ratio stays near 1: pass --checkpoint (simple_training.py's output) to time a
trained model, or a large --threshold to see what stopping after the minimum of steps saves.

    python examples/test_early_stopping.py
    python examples/test_early_stopping.py --checkpoint examples/checkpoints/inl_small
    python examples/test_early_stopping.py --threshold 1e9      # every row stops after 3 steps
"""
import argparse
import json
import os
import statistics
import time

import torch

from inl_llm.data import load_stdlib
from inl_llm.models import UltraOptimizedIntegratorLanguageModel

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--checkpoint", default=None, help="a simple_training.py output directory (default: untrained)")
p.add_argument("--d-model", type=int, default=256, help="untrained model only")
p.add_argument("--layers", type=int, default=4, help="untrained model only")
p.add_argument("--heads", type=int, default=8, help="untrained model only")
p.add_argument("--iterations", type=int, default=10, help="integrator steps per layer (untrained model only)")
p.add_argument("--threshold", type=float, default=1e-3, help="the adaptive model's convergence threshold")
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--seq-len", type=int, default=64)
p.add_argument("--runs", type=int, default=10)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed)
device = "cuda" if torch.cuda.is_available() else "cpu"

if args.checkpoint:
    with open(os.path.join(args.checkpoint, "model_args.json")) as f:
        model_args = json.load(f)
    state = torch.load(os.path.join(args.checkpoint, "pytorch_model.pt"), map_location="cpu")
else:
    model_args = dict(vocab_size=259, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                      num_iterations_per_layer=args.iterations, feedforward_dim=4 * args.d_model)
    state = None
model_args.update(use_gradient_checkpointing=False)  # inference only

fixed = UltraOptimizedIntegratorLanguageModel(**{**model_args, "use_adaptive_stopping": False})
adaptive = UltraOptimizedIntegratorLanguageModel(**{**model_args, "use_adaptive_stopping": True,
                                                    "adaptive_convergence_threshold": args.threshold})
if state is not None:
    fixed.load_state_dict(state)
adaptive.load_state_dict(fixed.state_dict())  # the same weights: only the stopping rule differs
fixed.to(device).eval()
adaptive.to(device).eval()
steps = model_args["num_iterations_per_layer"]
print(f"model: {fixed.get_num_params():,} parameters, layers {model_args['num_layers']}, integrator steps per "
      f"layer {steps} ({'trained: ' + args.checkpoint if args.checkpoint else 'untrained'})")
print(f"input: {args.batch_size} x {args.seq_len} byte tokens of stdlib source; {args.runs} timed runs each, "
      f"alternating")

# input: consecutive windows of stdlib source, the text simple_training.py trains on
tokens = load_stdlib(max_bytes=args.batch_size * args.seq_len + 1)
x = tokens[: args.batch_size * args.seq_len].view(args.batch_size, args.seq_len).to(device)


def seconds(model):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


for model in (fixed, adaptive):  # warm-up
    seconds(model)
times = {"fixed": [], "adaptive": []}
for _ in range(args.runs):
    times["fixed"].append(seconds(fixed))
    times["adaptive"].append(seconds(adaptive))

used = {}
for name, model in (("fixed", fixed), ("adaptive", adaptive)):
    per_layer = [layer.inl.avg_iterations.item() for layer in model.layers]
    used[name] = sum(per_layer) / len(per_layer)
    print(f"{name:>8}: {1000 * statistics.median(times[name]):8.2f} ms per batch (median), "
          f"{used[name]:.2f} of {steps} steps per row (per layer: {' '.join(f'{n:.2f}' for n in per_layer)})")
ratio = statistics.median(times["fixed"]) / statistics.median(times["adaptive"])
print(f"speedup (fixed / adaptive time): {ratio:.2f}x at threshold {args.threshold:g}")
if used["adaptive"] > steps - 0.005:
    print("no row stopped early: both models ran the same steps, so the ratio is timing noise")
if not args.checkpoint:
    print("note: an untrained model rarely converges below a small threshold such as the default 1e-3; "
          "time a trained one with --checkpoint, or pass a large --threshold to see what stopping early saves")
