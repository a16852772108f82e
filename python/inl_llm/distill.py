"""Trajectory distillation: a student with fewer integrator steps (optionally a smaller model)
learns from a trained teacher's logits and from the x trajectory of the teacher's iterate.

For a batch, with teacher logits z_t, student logits z_s (temperature τ), targets y, and per
aligned layer pair (l_s, l_t) the iterate trajectories X_s [rows, T_s+1, d_s], X_t [rows, T_t+1, d_t]:

    L = α_kd · τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))
      + α_ce · cross_entropy(z_s, y)
      + λ_traj · mean_{layer pairs} mean_{k=1..T_s} mean (P·X_s[:, k] − X_t[:, round(k·T_t/T_s)])²

Student step k is aligned with the teacher step that covers the same fraction of the iterate
(half the steps: student step k with teacher step 2k). Layers pair up the same way (student
layer l with teacher layer max(0, round((l+1)·L_t/L_s) − 1)). P is the identity when the widths match,
else a learned linear map d_s → d_t per pair (discarded after training). The teacher runs in
eval mode (as at inference: early exit on, dropout off) without gradients; the student trains.

With the teacher's architecture and only fewer steps, the student starts from the teacher's
weights (its iteration budgets reset to its own step count).

    python -m inl_llm distill --teacher checkpoints/demo --iterations 2 --steps 300 --out checkpoints/student
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .checkpoint import load_checkpoint, save_checkpoint
from .config import INLConfig
from .model import IntegratorLanguageModel, build_model
from .train import evaluate, fused_adamw_runs


@dataclass
class DistillConfig:
    steps: int = 300
    time_budget: Optional[float] = None  # seconds; stops at whichever limit comes first
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    alpha_kd: float = 1.0
    alpha_ce: float = 0.0
    lambda_traj: float = 1.0
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("steps, batch_size and seq_len must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.alpha_kd, self.alpha_ce, self.lambda_traj) < 0:
            raise ValueError("alpha_kd, alpha_ce and lambda_traj must be >= 0")


def student_config(teacher: INLConfig, num_iterations: Optional[int] = None, size: Optional[str] = None,
                   **overrides) -> INLConfig:
    """The teacher's config with `num_iterations` steps (default: half the teacher's, at least 1),
    or a named size with the teacher's vocabulary; fields overridden by keyword."""
    if size is not None:
        base = INLConfig.from_name(size, vocab_size=teacher.vocab_size).to_dict()
    else:
        base = teacher.to_dict()
    steps = num_iterations if num_iterations is not None else max(1, teacher.num_iterations // 2)
    values = {**base, "num_iterations": steps, **overrides}
    values["min_iterations"] = min(values["min_iterations"], values["num_iterations"])
    return INLConfig.from_dict(values)


def same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def make_student(teacher: IntegratorLanguageModel, config: INLConfig) -> tuple[IntegratorLanguageModel, bool]:
    """(student, started_from_teacher): the teacher's weights when every parameter has the same
    shape (fewer steps only), else a fresh model of `config`."""
    student = build_model(config, device=next(teacher.parameters()).device)
    if not same_shapes(student, teacher):
        return student, False
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # the teacher's budgets count its own steps
        student.budget.average.fill_(float(config.num_iterations))
        student.budget.budgets.fill_(config.num_iterations)
    student.budget._sync()
    return student, True


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer l, teacher layer max(0, round((l+1)·L_t/L_s) − 1)) for every student layer:
    in order and in range also for a student deeper than its teacher, where round(0.5) − 1 gave
    −1 (Python's index of the teacher's last layer)."""
    return [(s, max(0, round((s + 1) * teacher_layers / student_layers) - 1)) for s in range(student_layers)]


def aligned_steps(student_steps: int, teacher_steps: int) -> list[int]:
    """Teacher trajectory index for student steps 1..T_s."""
    return [round(k * teacher_steps / student_steps) for k in range(1, student_steps + 1)]


class Distiller(nn.Module):
    """The distillation loss for a (teacher, student) pair; holds the width projections."""

    def __init__(self, teacher: IntegratorLanguageModel, student: IntegratorLanguageModel, dc: DistillConfig):
        super().__init__()
        self.dc = dc
        self.pairs = layer_pairs(student.config.num_layers, teacher.config.num_layers)
        ds, dt = student.config.d_model, teacher.config.d_model
        self.projections = nn.ModuleList(nn.Linear(ds, dt, bias=False) for _ in self.pairs) if ds != dt else None

    def forward(self, teacher_out, student_out, targets) -> dict:
        t_logits, t_aux = teacher_out
        s_logits, s_aux = student_out
        dc, V = self.dc, s_logits.shape[-1]
        tau = dc.temperature
        terms = {}
        log_p_s = F.log_softmax(s_logits.reshape(-1, V).float() / tau, dim=-1)
        p_t = F.softmax(t_logits.reshape(-1, V).float() / tau, dim=-1)
        terms["kd"] = dc.alpha_kd * tau ** 2 * F.kl_div(log_p_s, p_t, reduction="batchmean")
        if dc.alpha_ce:
            terms["ce"] = dc.alpha_ce * F.cross_entropy(s_logits.reshape(-1, V).float(), targets.reshape(-1))
        if dc.lambda_traj:
            errors = []
            for j, (ls, lt) in enumerate(self.pairs):
                xs, xt = s_aux["trajectory_x"][ls], t_aux["trajectory_x"][lt]
                xs, xt = xs.reshape(-1, *xs.shape[-2:]).float(), xt.reshape(-1, *xt.shape[-2:]).float()
                idx = aligned_steps(xs.shape[1] - 1, xt.shape[1] - 1)
                pred = xs[:, 1:]
                if self.projections is not None:
                    pred = self.projections[j](pred)
                errors.append((pred - xt[:, idx]).pow(2).mean())
            terms["traj"] = dc.lambda_traj * torch.stack(errors).mean()
        terms["total"] = sum(terms.values())
        return terms


def _lr(dc: DistillConfig, step: int, elapsed: float) -> float:
    if step < dc.warmup_steps:
        return dc.lr * (step + 1) / dc.warmup_steps
    progress = (step - dc.warmup_steps) / max(1, dc.steps - dc.warmup_steps)
    if dc.time_budget:
        progress = max(progress, elapsed / dc.time_budget)
    return dc.min_lr + 0.5 * (dc.lr - dc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def distill(teacher: IntegratorLanguageModel, student: IntegratorLanguageModel, train_tokens: torch.Tensor,
            dc: DistillConfig, log=print) -> dict:
    """Trains `student` in place on the teacher; returns {"steps", "elapsed", "last_terms"}."""
    device = next(student.parameters()).device
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss_fn = Distiller(teacher, student, dc).to(device)
    params = list(student.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=dc.lr, weight_decay=dc.weight_decay, betas=(0.9, 0.95),
                                  fused=fused_adamw_runs(params))
    generator = torch.Generator().manual_seed(dc.seed)
    student.train()
    start, step, terms = time.perf_counter(), 0, {}
    while step < dc.steps:
        elapsed = time.perf_counter() - start
        if dc.time_budget is not None and elapsed >= dc.time_budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr(dc, step, elapsed)
        x, y = data.random_batch(train_tokens, dc.batch_size, dc.seq_len, generator)
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            t_logits, t_aux, _ = teacher(x, return_trajectories=bool(dc.lambda_traj))
        s_logits, s_aux, _ = student(x, return_trajectories=bool(dc.lambda_traj))
        terms = loss_fn((t_logits, t_aux), (s_logits, s_aux), y)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, dc.grad_clip)
        optimizer.step()
        step += 1
        if step % 50 == 0 or step == 1:
            log(f"  step {step}: " + ", ".join(f"{k} {v.item():.4f}" for k, v in terms.items()))
    return {"steps": step, "elapsed": time.perf_counter() - start,
            "last_terms": {k: v.item() for k, v in terms.items()}}


@torch.no_grad()
def tokens_per_second(models: dict, tokens: torch.Tensor, batch_size: int = 8, seq_len: int = 128,
                      repeat: int = 7) -> dict:
    """Eval-mode forward throughput of each model on the same windows, the models timed in turn
    within each round (side by side, so machine load hits them alike); medians of `repeat` rounds
    after one warm-up round."""
    starts = torch.linspace(0, len(tokens) - seq_len - 1, batch_size).long().tolist()
    x = torch.stack([tokens[s:s + seq_len] for s in starts])
    times = {name: [] for name in models}
    for m in models.values():
        m.eval()
        m(x.to(next(m.parameters()).device))
    for _ in range(repeat):
        for name, m in models.items():
            xd = x.to(next(m.parameters()).device)
            t = time.perf_counter()
            m(xd)
            times[name].append(time.perf_counter() - t)
    return {name: x.numel() / statistics.median(ts) for name, ts in times.items()}


def add_subcommand(sub) -> argparse.ArgumentParser:
    """Registers `distill` on the CLI's subparsers."""
    p = sub.add_parser("distill", help="train a student with fewer integrator steps on a teacher checkpoint")
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint directory")
    p.add_argument("--iterations", type=int, default=None, help="student steps per layer (default: half the teacher's)")
    p.add_argument("--size", default=None, help="a smaller named size for the student (default: the teacher's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a student config field")
    p.add_argument("--data", default="stdlib")
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--time-budget", type=float, default=None, help="seconds")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha-kd", type=float, default=1.0, help="weight of the teacher-logit KL term")
    p.add_argument("--alpha-ce", type=float, default=0.0, help="weight of the data cross-entropy term")
    p.add_argument("--lambda-traj", type=float, default=1.0, help="weight of the aligned x-trajectory term")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--out", default=None, help="student checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def cmd_distill(args) -> dict:
    from .cli import _overrides  # the CLI's --set parser
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    teacher = load_checkpoint(args.teacher, device=device)
    config = student_config(teacher.config, args.iterations, args.size, **_overrides(args.set))
    student, warm = make_student(teacher, config)
    tokens = data.load_corpus(args.data, max_bytes=args.max_bytes)
    train_tokens, eval_tokens = data.split(tokens, args.eval_fraction)
    dc = DistillConfig(steps=args.steps, time_budget=args.time_budget, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10, temperature=args.temperature,
                       alpha_kd=args.alpha_kd, alpha_ce=args.alpha_ce, lambda_traj=args.lambda_traj,
                       eval_batches=args.eval_batches, seed=args.seed)
    ev = lambda m: evaluate(m, eval_tokens, dc.batch_size, dc.seq_len, dc.eval_batches,  # noqa: E731
                            update_budgets=False)
    print(f"teacher: {teacher.num_params():,} parameters, {teacher.config.num_iterations} steps per layer; "
          f"student: {student.num_params():,} parameters, {config.num_iterations} steps per layer, "
          f"{'started from the teacher' if warm else 'fresh'}")
    teacher_eval, before = ev(teacher), ev(student)
    print(f"eval loss: teacher {teacher_eval['loss']:.4f}, student before distillation {before['loss']:.4f}")
    result = distill(teacher, student, train_tokens, dc)
    after = ev(student)
    gap = after["loss"] / teacher_eval["loss"] - 1
    speed = tokens_per_second({"teacher": teacher, "student": student}, eval_tokens, seq_len=dc.seq_len, repeat=15)
    print(f"eval loss after {result['steps']} steps ({result['elapsed']:.0f} s): student {after['loss']:.4f} "
          f"({100 * gap:+.2f}% against the teacher)")
    print(f"forward throughput (eval mode, side by side, medians): teacher {speed['teacher']:,.0f} tokens/s, "
          f"student {speed['student']:,.0f} tokens/s ({speed['student'] / speed['teacher']:.2f}x)")
    if args.out:
        save_checkpoint(student, args.out, extra={"distilled_from": str(args.teacher), "eval_loss": after["loss"]})
        print(f"student checkpoint: {args.out}")
    return {"teacher": teacher_eval, "before": before, "after": after, "gap": gap, "speed": speed,
            "student": student, "started_from_teacher": warm, **result}
