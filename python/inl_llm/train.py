"""The training loop, nanoGPT-style: random windows of a token stream, AdamW, warmup + cosine
learning rate, gradient clipping, periodic evaluation and checkpoints; the cycle scheduler
sets each integrator's excitation amplitude and the IntegratorLoss weights every step.

Evaluation runs in eval mode, as inference does: integrators exit early, their iteration
counts are recorded, and after each evaluation the per-layer iteration budgets move toward
them (IterationBudget).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .data import random_batch
from .losses import IntegratorLoss
from .model import IntegratorLanguageModel
from .scheduler import create_cycle_scheduler


@dataclass
class TrainConfig:
    steps: int = 1000
    time_budget: Optional[float] = None  # seconds; training stops at whichever limit comes first
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100  # steps
    eval_interval_s: Optional[float] = None  # evaluate by wall clock instead (the demo)
    eval_batches: int = 8
    preset: Optional[str] = "balanced"  # cycle scheduler preset; None trains without one
    cycle_unit: str = "steps"
    cycle_scale: float = 1.0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: Optional[int] = None  # steps; a final checkpoint is always written
    seed: int = 0
    progress: bool = True


def lr_at(tc: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warmup, then cosine from lr to min_lr over the run. The run's progress is the
    larger of steps done and time spent, so a time-budgeted run decays on schedule too."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    if tc.time_budget:
        progress = max(progress, elapsed / tc.time_budget)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_for(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors and scalars (norms, mu, modulation, excitation) do not."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: IntegratorLanguageModel, tokens: torch.Tensor, batch_size: int, seq_len: int,
             batches: int, update_budgets: bool = True) -> dict:
    """Mean cross-entropy over `batches` fixed windows spread evenly over `tokens` (the same
    windows every call, so evaluations compare), in eval mode; also the mean steps each layer
    ran (early exit). Then moves the iteration budgets toward those steps (unless
    update_budgets is False) and restores the model's mode."""
    was_training = model.training
    model.eval()
    model.reset_inference_stats()
    count = batches * batch_size
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the eval split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = torch.linspace(0, len(tokens) - seq_len - 1, count).long().tolist()
    device = next(model.parameters()).device
    total = 0.0
    for b in range(batches):
        windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts[b * batch_size:(b + 1) * batch_size]])
        windows = windows.to(device)
        logits, _, _ = model(windows[:, :-1])
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten()).item()
    stats = model.get_inference_stats()
    if update_budgets:
        model.update_iteration_budgets()
    model.train(was_training)
    return {"loss": total / batches, "iterations": stats["avg_iterations_per_layer"],
            "budgets": model.iteration_budgets()}


def train(model: IntegratorLanguageModel, train_tokens: torch.Tensor, eval_tokens: torch.Tensor, tc: TrainConfig,
          loss_fn: Optional[IntegratorLoss] = None, log: Callable[[str], None] = tqdm.write) -> dict:
    """Trains in place; returns {"history": [eval records], "steps", "elapsed", "last_terms"}."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(tc.seed)
    optimizer = optimizer_for(model, tc)
    scheduler = create_cycle_scheduler(tc.preset, unit=tc.cycle_unit, scale=tc.cycle_scale) if tc.preset else None
    loss_fn = loss_fn or IntegratorLoss()
    steps_per_epoch = max(1, len(train_tokens) // (tc.batch_size * tc.seq_len))
    history = []

    def record(step, elapsed, train_loss):
        # evaluate as inference runs: at the configured excitation, not the current phase's
        # (the scheduler sets it again before the next step; after the last one it stays)
        model.set_excitation_amplitude(model.config.excitation_amplitude)
        result = evaluate(model, eval_tokens, tc.batch_size, tc.seq_len, tc.eval_batches)
        history.append({"step": step, "elapsed": elapsed, "train_loss": train_loss, **result})
        iters = " ".join(f"{i:.2f}" if i is not None else "-" for i in result["iterations"])
        log(f"step {step:5d}  {elapsed:6.1f}s  train {train_loss if train_loss is not None else float('nan'):.3f}  "
            f"eval {result['loss']:.3f}  iterations/layer [{iters}]  budgets {result['budgets']}")

    model.train()
    record(0, 0.0, None)
    start = time.perf_counter()
    next_eval_time = tc.eval_interval_s
    bar = tqdm(total=tc.steps if not tc.time_budget else None, disable=not tc.progress, unit="step",
               dynamic_ncols=True)
    step, terms, train_loss = 0, {}, None
    while step < tc.steps:
        elapsed = time.perf_counter() - start
        if tc.time_budget and elapsed >= tc.time_budget:
            break
        t = step if tc.cycle_unit == "steps" else step // steps_per_epoch
        if scheduler is not None:
            phase = scheduler.step(t)
            model.set_excitation_amplitude(phase.excitation_amplitude)
            loss_fn.set_phase(phase.is_exploration, phase.lambda_mean, phase.lambda_energy)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(tc, step, elapsed)

        x, y = random_batch(train_tokens, tc.batch_size, tc.seq_len, generator)
        logits, aux, _ = model(x.to(device), return_aux=True)
        terms = loss_fn(logits, y.to(device), aux, epoch=t)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        step += 1

        task = terms["L_task"].item()
        train_loss = task if train_loss is None else 0.9 * train_loss + 0.1 * task
        bar.update(1)
        bar.set_postfix(loss=f"{task:.3f}", phase=scheduler.current.phase_name if scheduler else "-")
        elapsed = time.perf_counter() - start
        if tc.eval_interval_s is not None:
            due = elapsed >= next_eval_time
            if due:
                next_eval_time += tc.eval_interval_s
        else:
            due = step % tc.eval_every == 0
        if due and step < tc.steps:
            record(step, elapsed, train_loss)
        if tc.checkpoint_dir and tc.checkpoint_every and step % tc.checkpoint_every == 0:
            save_checkpoint(model, tc.checkpoint_dir, extra={"step": step})
    bar.close()
    elapsed = time.perf_counter() - start
    if not history or history[-1]["step"] != step:
        record(step, elapsed, train_loss)
    if tc.checkpoint_dir:
        save_checkpoint(model, tc.checkpoint_dir, extra={"step": step, "eval_loss": history[-1]["loss"]})
    return {"history": history, "steps": step, "elapsed": elapsed,
            "last_terms": {k: v.item() for k, v in terms.items()}}
