"""Train a small INL-LLM through the original package's API, then save it and sample from it.

The corpus is the Python standard library's own source (read from this interpreter, nothing
downloaded), as bytes. Each step runs the model with return_aux=True so that every layer's x/v
trajectory comes back, and IntegratorLoss adds its three trajectory terms to the cross-entropy.
The cycle scheduler decides, epoch by epoch, whether the run is in an equilibrium or an
exploration phase: the loss relaxes its pull toward mu in exploration, and the integrators'
excitation amplitude follows the phase. An "epoch" here is --steps-per-epoch random windows.

    python examples/simple_training.py                 # 128-wide, 2 layers: about 2 minutes on 2 CPU cores
    python examples/simple_training.py --d-model 32 --layers 1 --epochs 4 --steps-per-epoch 1

The checkpoint directory (--out) gets pytorch_model.pt (the state dict), model_args.json (the
constructor's keyword arguments) and the tokenizer's config: load_and_generate.py reads them.
"""
import argparse
import json
import os
import time

import torch

from byte_tokenizer import ByteLevelTokenizer
from inl_llm.core import IntegratorLoss, create_cycle_scheduler
from inl_llm.data import load_stdlib, random_batch, split
from inl_llm.models import UltraOptimizedIntegratorLanguageModel

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--d-model", type=int, default=128)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--iterations", type=int, default=5, help="integrator steps per layer")
p.add_argument("--seq-len", type=int, default=64)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--epochs", type=int, default=8)
p.add_argument("--steps-per-epoch", type=int, default=40)
p.add_argument("--warmup-epochs", type=int, default=2, help="the scheduler's warmup (equilibrium settings)")
p.add_argument("--phase-epochs", type=int, default=2, help="length of each equilibrium / exploration phase")
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--corpus-bytes", type=int, default=2_000_000, help="stdlib source to read (whole files)")
p.add_argument("--prompt", default="def ", help="prompt of the sample printed at the end")
p.add_argument("--sample-tokens", type=int, default=60)
p.add_argument("--out", default=os.path.join(HERE, "checkpoints", "inl_small"))
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed)
device = "cuda" if torch.cuda.is_available() else "cpu"

# data: byte tokens of stdlib files (each file between BOS and EOS), the last 5 % held out
tokenizer = ByteLevelTokenizer()
tokens = load_stdlib(max_bytes=args.corpus_bytes)
train_tokens, eval_tokens = split(tokens, eval_fraction=0.05)
print(f"corpus: {len(tokens):,} byte tokens of stdlib source ({len(train_tokens):,} train, "
      f"{len(eval_tokens):,} held out), vocab {tokenizer.vocab_size}")

# the model, with the original's keyword constructor; the arguments are saved with the weights
model_args = dict(
    vocab_size=tokenizer.vocab_size, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
    num_iterations_per_layer=args.iterations, feedforward_dim=4 * args.d_model, max_seq_len=512,
    dropout=0.0,                       # a short run on a small model does not overfit
    use_lowrank_embeddings=True, lowrank_ratio=0.125, use_shared_controllers=True,
    hierarchical_group_size=64, excitation_sparsity=0.1,
    use_adaptive_stopping=True, adaptive_convergence_threshold=1e-3,
    use_gradient_checkpointing=False,  # it trades compute for memory; a small model needs no saving
)
model = UltraOptimizedIntegratorLanguageModel(**model_args).to(device)
print(f"model: {model.get_num_params():,} parameters (d_model {args.d_model}, layers {args.layers}, "
      f"integrator steps per layer {args.iterations})")

# the integrator loss: cross-entropy plus the pull of x toward mu (annealed over the epochs),
# fast convergence along the trajectory, and a small velocity energy
loss_fn = IntegratorLoss(target_value=0.0, lambda_mean_init=0.1, lambda_speed=0.01, lambda_energy=0.001,
                         annealing_epochs=args.epochs, variance_weighted=True, task_loss_type="ce")
scheduler = create_cycle_scheduler(preset="balanced", warmup_epochs=args.warmup_epochs,
                                   equilibrium_config={"duration_epochs": args.phase_epochs},
                                   exploration_config={"duration_epochs": args.phase_epochs})
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def set_excitation(amplitude):
    for layer in model.layers:
        layer.inl.excitation_amplitude = amplitude


INFERENCE_EXCITATION = model.config.excitation_amplitude  # what a freshly built (or reloaded) model runs with


@torch.no_grad()
def held_out_loss(batches=4):
    """Cross-entropy on fixed windows of the held-out tokens (the same ones every call), at the
    inference excitation: after the last call the model runs as it will once reloaded."""
    model.eval()
    set_excitation(INFERENCE_EXCITATION)
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(batches):
        x, y = random_batch(eval_tokens, args.batch_size, args.seq_len, generator=g)
        logits, _ = model(x.to(device))
        losses.append(loss_fn.compute_L_task(logits, y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


before = held_out_loss()
print(f"held-out loss before training: {before:.4f}")
model.train()
for epoch in range(args.epochs):
    phase = scheduler.step(epoch)
    loss_fn.set_exploration_phase(phase["phase_name"] == "exploration")
    set_excitation(phase["excitation_amplitude"])

    sums = dict.fromkeys(("total", "L_task", "L_mean", "L_speed", "L_energy"), 0.0)
    start = time.perf_counter()
    for _ in range(args.steps_per_epoch):
        x, y = random_batch(train_tokens, args.batch_size, args.seq_len)
        logits, aux = model(x.to(device), return_aux=True)  # aux: one dict per layer, with 'x' and 'v'
        losses = loss_fn(predictions=logits, targets=y.to(device), trajectory=aux, epoch=epoch)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for k in sums:
            sums[k] += losses[k].item() / args.steps_per_epoch
    ms = 1000 * (time.perf_counter() - start) / args.steps_per_epoch
    print(f"epoch {epoch + 1}/{args.epochs} {phase['phase_name']:<11} lambda_mean {losses['lambda_mean'].item():.4f}"
          f" excitation {phase['excitation_amplitude']:.2f} | loss {sums['total']:.4f} = task {sums['L_task']:.4f}"
          f" + mean {sums['L_mean']:.4f} + speed {sums['L_speed']:.4f} + energy {sums['L_energy']:.4f}"
          f" | {ms:.0f} ms/step")

after = held_out_loss()
print(f"held-out loss after training: {after:.4f} (before: {before:.4f})")
stats = model.get_inference_stats()  # counts the eval-mode forwards of held_out_loss
print(f"inference: {stats['avg_iterations']:.2f} integrator steps per row on average "
      f"(at most {args.iterations}; early exit at |x' - x| < 1e-3)")

os.makedirs(args.out, exist_ok=True)
torch.save(model.state_dict(), os.path.join(args.out, "pytorch_model.pt"))
with open(os.path.join(args.out, "model_args.json"), "w") as f:
    json.dump(model_args, f, indent=1)
tokenizer.save_pretrained(args.out)
print(f"saved: {args.out} (pytorch_model.pt, model_args.json, tokenizer_config.json)")

model.eval()
torch.manual_seed(args.seed)  # load_and_generate.py --seed draws the same sample from the reloaded model
prompt_ids = tokenizer.encode(args.prompt, return_tensors="pt").to(device)
with torch.no_grad():
    out = model.generate(prompt_ids, max_new_tokens=args.sample_tokens, temperature=0.8, top_p=0.9, do_sample=True)
print(f"sample: {args.prompt!r} + {out.shape[1] - prompt_ids.shape[1]} tokens -> "
      f"{tokenizer.decode(out[0], skip_special_tokens=True)!r}")
