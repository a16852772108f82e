"""The training loop, nanoGPT-style: windows of a token stream, AdamW, warmup + cosine learning
rate, gradient clipping, periodic evaluation and checkpoints; the cycle scheduler sets each
integrator's excitation amplitude and the IntegratorLoss weights every step.

The same loop runs one process or every rank of a torchrun job: pass the model as
`inl_llm.distributed.parallelize` returns it (DDP or FSDP2). `batch_size` is the global batch
(windows per optimizer step over all ranks and micro-batches); each rank reads its own shards of
the stream (`WindowSampler`), runs `grad_accum_steps` micro-batches, and only rank 0 logs. Two
ranks compute what one process computes with the same global batch (IntegratorLoss takes its
batch statistics over all ranks).

Evaluation runs in eval mode, as inference does: integrators exit early, their iteration
counts are recorded, and after each evaluation the per-layer iteration budgets move toward
them (IterationBudget).

A training checkpoint holds everything a run is made of (model, optimizer, step, the data
position, every RNG, the history; see checkpoint.py), so `train(..., resume_from=dir)` continues
exactly: N steps straight and N/2 + resume + N/2 end on the same bits in one process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import load_training_checkpoint, save_training_checkpoint
from .data import WindowSampler
from .distributed import drain_gloo_at_exit, memory_report
from .losses import IntegratorLoss
from .model import IntegratorLanguageModel
from .scheduler import create_cycle_scheduler

PRECISIONS = ("fp32", "bf16")
# TrainConfig fields a resumed run may change without changing what it computes (meta: the
# caller checks its own record)
_FREE_ON_RESUME = {"checkpoint_dir", "checkpoint_every", "export_weights", "progress", "meta"}


@dataclass
class TrainConfig:
    steps: int = 1000
    time_budget: Optional[float] = None  # seconds; training stops at whichever limit comes first
    batch_size: int = 16  # the global batch: windows per optimizer step, over all ranks and micro-batches
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each rank
    data_shards: Optional[int] = None  # shards of the train stream (WindowSampler); None: the world size
    precision: str = "fp32"  # "bf16": autocast (one process, DDP); under FSDP parallelize sets the policy
    eval_every: int = 100  # steps
    eval_interval_s: Optional[float] = None  # evaluate by wall clock instead (the demo)
    eval_batches: int = 8
    preset: Optional[str] = "balanced"  # cycle scheduler preset; None trains without one
    cycle_unit: str = "steps"
    cycle_scale: float = 1.0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: Optional[int] = None  # steps; a final checkpoint is always written
    export_weights: bool = True  # model.safetensors in every checkpoint (FSDP gathers it); False: the final one only
    seed: int = 0
    progress: bool = True
    # the caller's record of the run, saved in every training checkpoint and not read by train():
    # the CLI keeps its data source, eval fraction and a fingerprint of the corpus here, and checks
    # them on --resume (plain values only: str, int, float, bool, None, lists and dicts of them)
    meta: Optional[dict] = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.data_shards is not None and self.data_shards < 1:
            raise ValueError(f"data_shards must be None or >= 1, got {self.data_shards}")


def lr_at(tc: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warmup, then cosine from lr to min_lr over the run. The run's progress is the
    larger of steps done and time spent, so a time-budgeted run decays on schedule too."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    if tc.time_budget:
        progress = max(progress, elapsed / tc.time_budget)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def fused_adamw_runs(params) -> bool:
    """Whether torch's fused AdamW (one kernel over every tensor of a step) takes these parameters:
    floating point, all on CPUs or all on CUDA devices (DTensor shards too: FSDP2). On this
    project's 2-core CPU it steps `small`'s 108 tensors ~4x faster than the default loop over
    tensors (~4 % of a training step); on a GPU it is one launch instead of many."""
    params = list(params)
    types = {p.device.type for p in params}
    return bool(params) and len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def optimizer_for(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (fused_adamw_runs); matrices decay, vectors and
    scalars (norms, mu, modulation, excitation) do not. A resumed run keeps the setting its
    checkpoint was written with (the optimizer's state holds it): the exact continuation."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                             fused=fused_adamw_runs(params))


def _world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


@torch.no_grad()
def evaluate(model: IntegratorLanguageModel, tokens: torch.Tensor, batch_size: int, seq_len: int,
             batches: int, update_budgets: bool = True, process_group=None) -> dict:
    """Mean cross-entropy over `batches` × batch_size fixed windows spread evenly over `tokens`
    (the same windows every call, so evaluations compare), in eval mode; also the mean steps each
    layer ran (early exit). Then moves the iteration budgets toward those steps (unless
    update_budgets is False) and restores the model's mode. With a process_group, every rank of
    it calls this and reads every W-th window; losses and step counts are summed over the ranks,
    so every rank gets (and budgets from) the result of one process reading them all."""
    rank, world = _world(process_group)
    was_training = model.training
    model.eval()
    model.reset_inference_stats()
    count = batches * batch_size
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the eval split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    if batch_size % world:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the world size ({world})")
    starts = torch.linspace(0, len(tokens) - seq_len - 1, count).long().tolist()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(batches):
        mine = starts[b * batch_size + rank:(b + 1) * batch_size:world]
        windows = torch.stack([tokens[s:s + seq_len + 1] for s in mine]).to(device)
        logits, _, _ = model(windows[:, :-1])
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(),
                                                   reduction="sum").double()
    if process_group is not None:
        for t in (total, model._steps_run, model._rows_seen):
            torch.distributed.all_reduce(t, group=process_group)
    stats = model.get_inference_stats()
    if update_budgets:
        model.update_iteration_budgets()
    model.train(was_training)
    return {"loss": total.item() / (count * seq_len), "iterations": stats["avg_iterations_per_layer"],
            "budgets": model.iteration_budgets()}


def _unwrap(model: torch.nn.Module) -> IntegratorLanguageModel:
    """The model inside a DDP wrapper (FSDP2 shards the model in place: it is its own module)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def _gradient_sync(model: torch.nn.Module, enabled: bool):
    """Gradient accumulation: no gradient communication on the micro-batches before the last."""
    if enabled:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif _is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _micro_batches(sampler: WindowSampler, grad_accum_steps: int) -> list:
    """The rows of this rank's local batch (its shards' windows, shard after shard) that each
    micro-batch takes: the m-th slice of every shard's windows, so that micro-batch m of the
    global batch is the same set of windows on every world size (one process reading two shards
    groups them as two ranks do; the integrator loss's batch statistics see the micro-batch).
    Contiguous runs where a shard's windows do not split evenly."""
    local, shards = sampler.local_batch_size, len(sampler.shards)
    per_shard = local // shards
    if grad_accum_steps == 1:
        return [slice(None)]
    if per_shard % grad_accum_steps:
        micro = local // grad_accum_steps
        return [slice(m * micro, (m + 1) * micro) for m in range(grad_accum_steps)]
    part = per_shard // grad_accum_steps
    return [torch.cat([torch.arange(j * per_shard + m * part, j * per_shard + (m + 1) * part) for j in range(shards)])
            for m in range(grad_accum_steps)]


def train(model: torch.nn.Module, train_tokens: torch.Tensor, eval_tokens: torch.Tensor, tc: TrainConfig,
          loss_fn: Optional[IntegratorLoss] = None, log: Callable[[str], None] = tqdm.write,
          resume_from: Optional[str] = None) -> dict:
    """Trains in place; returns {"history": [eval records], "steps", "elapsed", "last_terms",
    "step_terms": the loss terms of each step run (the global batch's), "memory": this rank's
    memory_report after the last optimizer step}.
    `model` is a plain model, or what `distributed.parallelize` returned (every rank calls
    train then). `resume_from`: a training checkpoint to continue exactly (save_training_checkpoint)."""
    raw = _unwrap(model)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    group = torch.distributed.new_group() if distributed and torch.distributed.get_world_size() > 1 else None
    if group is not None and "gloo" in str(torch.distributed.get_backend(group)):  # also "cpu:gloo,cuda:nccl"
        drain_gloo_at_exit()  # a process that exits right after train() must not abort in gloo's threads
    rank, world = _world(group)
    if rank != 0:
        log = lambda _: None  # noqa: E731
    if tc.batch_size % (world * tc.grad_accum_steps):
        raise ValueError(f"batch_size ({tc.batch_size}) must be a multiple of world size × grad_accum_steps "
                         f"({world} × {tc.grad_accum_steps})")
    device = next(raw.parameters()).device
    sampler = WindowSampler(train_tokens, tc.seq_len, tc.batch_size, tc.data_shards or world, tc.seed, rank, world)
    optimizer = optimizer_for(model, tc)
    scheduler = create_cycle_scheduler(tc.preset, unit=tc.cycle_unit, scale=tc.cycle_scale) if tc.preset else None
    loss_fn = loss_fn or IntegratorLoss()
    if group is not None and isinstance(loss_fn, IntegratorLoss) and loss_fn.process_group is None:
        loss_fn.process_group = group
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16" and not _is_fsdp(model)
                else contextlib.nullcontext())
    steps_per_epoch = max(1, len(train_tokens) // (tc.batch_size * tc.seq_len))
    history, step, elapsed, train_loss, terms, step_terms, memory = [], 0, 0.0, None, {}, [], None

    if resume_from is not None:
        state = load_training_checkpoint(raw, resume_from, optimizer)
        if state["data"] != sampler.state_dict():
            raise ValueError(f"{resume_from} was trained on windows {state['data']}; this run would read "
                             f"{sampler.state_dict()}: set the same batch_size, seq_len, data_shards and seed to resume")
        step, elapsed, train_loss, history = state["step"], state["elapsed"], state["train_loss"], state["history"]
        # the LR schedule and the cycle scheduler are functions of the step and these settings
        # alone: a change makes the continuation differ from the run that was interrupted
        before, now = dict(state["train_config"]), dataclasses.asdict(tc)
        # data_shards None means the world size: what counts is the shard count each run read (the
        # check above holds those equal), so None on 2 ranks and 2 in one process are no change
        for config, data in ((before, state["data"]), (now, sampler.state_dict())):
            if "data_shards" in config and config["data_shards"] is None:
                config["data_shards"] = data["num_shards"]
        changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now
                   if k not in _FREE_ON_RESUME and k in before and before[k] != now[k]]
        if changed:
            warnings.warn(f"resuming {resume_from} with other settings than it was trained with ({', '.join(changed)}): "
                          f"the run continues, but not as the interrupted one would have", stacklevel=2)
        log(f"resumed {resume_from} at step {step}")

    def phase_time(step):
        return step if tc.cycle_unit == "steps" else step // steps_per_epoch

    def record(step, elapsed, train_loss):
        # evaluate as inference runs: at the configured excitation, not the current phase's
        # (the scheduler sets it again before the next step; after the last one it stays)
        raw.set_excitation_amplitude(raw.config.excitation_amplitude)
        result = evaluate(raw, eval_tokens, tc.batch_size, tc.seq_len, tc.eval_batches, process_group=group)
        history.append({"step": step, "elapsed": elapsed, "train_loss": train_loss, **result})
        iters = " ".join(f"{i:.2f}" if i is not None else "-" for i in result["iterations"])
        shown = f"{train_loss:.3f}" if train_loss is not None else "-"
        log(f"step {step:5d}  {elapsed:6.1f}s  train {shown}  eval {result['loss']:.3f}  "
            f"iterations/layer [{iters}]  budgets {result['budgets']}")

    def save(step, final):
        state = {"step": step, "elapsed": elapsed, "train_loss": train_loss, "history": history,
                 "data": sampler.state_dict(), "train_config": dataclasses.asdict(tc)}
        extra = {"step": step, **({"eval_loss": history[-1]["loss"]} if final else {})}
        save_training_checkpoint(raw, tc.checkpoint_dir, optimizer, state, extra=extra,
                                 export_weights=tc.export_weights or final)

    model.train()
    if resume_from is None:
        record(0, 0.0, None)
    start = time.perf_counter() - elapsed
    next_eval_time = (math.floor(elapsed / tc.eval_interval_s) + 1) * tc.eval_interval_s if tc.eval_interval_s else None
    bar = tqdm(total=tc.steps if not tc.time_budget else None, initial=step, disable=not tc.progress or rank != 0,
               unit="step", dynamic_ncols=True)
    micro_rows = _micro_batches(sampler, tc.grad_accum_steps)
    clock_matters = bool(tc.time_budget or tc.eval_interval_s)
    while step < tc.steps:
        # what depends on the clock (the time budget, a time-driven LR decay) follows rank 0's
        # clock, so the replicas stay identical
        elapsed = _from_rank0(time.perf_counter() - start, group, device) if clock_matters else 0.0
        if tc.time_budget and elapsed >= tc.time_budget:
            break
        t = phase_time(step)
        if scheduler is not None:
            phase = scheduler.step(t)
            raw.set_excitation_amplitude(phase.excitation_amplitude)
            loss_fn.set_phase(phase.is_exploration, phase.lambda_mean, phase.lambda_energy)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(tc, step, elapsed)

        x, y = sampler.batch(step)
        sums = None
        for m, rows in enumerate(micro_rows):
            with _gradient_sync(model, m == tc.grad_accum_steps - 1), autocast:
                logits, aux, _ = model(x[rows].to(device), return_aux=True)
                terms = loss_fn(logits, y[rows].to(device), aux, epoch=t)
            (terms["total"] / tc.grad_accum_steps).backward()
            done = torch.stack([v.detach().float() for v in terms.values()])
            sums = done if sums is None else sums + done
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        memory = memory_report(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # the step's terms, averaged over micro-batches and ranks: the global batch's loss
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
        terms = dict(zip(terms, (sums / (tc.grad_accum_steps * world)).tolist()))
        step_terms.append(terms)
        task = terms["L_task"]
        train_loss = task if train_loss is None else 0.9 * train_loss + 0.1 * task
        bar.update(1)
        bar.set_postfix(loss=f"{task:.3f}", phase=scheduler.current.phase_name if scheduler else "-")
        elapsed = _from_rank0(time.perf_counter() - start, group, device) if clock_matters else \
            time.perf_counter() - start
        if tc.eval_interval_s is not None:
            due = elapsed >= next_eval_time
            if due:
                next_eval_time += tc.eval_interval_s
        else:
            due = step % tc.eval_every == 0
        if due and step < tc.steps:
            record(step, elapsed, train_loss)
        if tc.checkpoint_dir and tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
            save(step, final=False)
    bar.close()
    elapsed = time.perf_counter() - start
    if not history or history[-1]["step"] != step:
        record(step, elapsed, train_loss)
    if tc.checkpoint_dir:
        save(step, final=True)
    if group is not None:
        if loss_fn.process_group is group:
            loss_fn.process_group = None
        torch.distributed.destroy_process_group(group)
    return {"history": history, "steps": step, "elapsed": elapsed, "last_terms": terms, "step_terms": step_terms,
            "memory": memory}


def _from_rank0(value: float, group, device) -> float:
    """Rank 0's value on every rank of group (a no-op in one process)."""
    if group is None:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(box, src=torch.distributed.get_global_rank(group, 0), group=group)
    return box.item()
