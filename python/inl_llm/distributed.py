"""Data-parallel training on PyTorch's own engines, applied from outside to an unchanged model
(torchtitan's layout: the model file knows nothing of ranks).

    torchrun --nproc_per_node 2 -m inl_llm train --parallel fsdp --size small ...

- DDP: every rank holds the whole model; gradients are averaged after each backward. With the
  mu EMA on, the model itself combines each training forward's targets over the ranks (the
  mean of h over every rank's rows), so the replicas keep one mu (model.py).
- FSDP2 (`fully_shard`): parameters, gradients and optimizer state are sharded over the ranks.
  Each block is its own group (gathered for its forward and backward, freed after); the root
  group holds the embedding, the final norm, the LM head, and the controller that every block
  shares: the controller's weights are read by every block's integrator but its forward is never
  called, so it cannot be a group of its own (FSDP gathers a group in that module's forward
  hook). In the root group it is gathered once at the start of the forward and its gradient,
  summed over all blocks, is reduced once at the end of the backward. Blocks leave it out of their
  groups (`ignored_params`). FSDP2 refuses 0-dim parameters: the model keeps mu_global as [1].
- Mixed precision: under FSDP a policy (bf16 parameters for compute, fp32 gradient reduction,
  fp32 sharded master weights); under DDP or one process, autocast (train.py).
- Activation checkpointing: each block's activations are recomputed in the backward (the
  model's own `gradient_checkpointing` switch, which checkpoints per block).

With one process and world size 1 both engines run too, which is how a 2-rank checkpoint is
resumed on one process and back (checkpoint.py: DCP reshards).
"""
from __future__ import annotations

import atexit
import datetime
import os
import resource
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .model import IntegratorLanguageModel

PARALLEL_MODES = ("none", "ddp", "fsdp")


def init_from_env(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (RANK and WORLD_SIZE set) it
    joins the process group: NCCL with one GPU per local rank when CUDA is asked for or found,
    gloo on CPU. Without torchrun: (0, 1, device) and no process group."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here (torch {torch.__version__}, "
                         f"built {'with' if torch.version.cuda else 'without'} CUDA)")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=chosen if use_cuda else None)
    if not use_cuda:
        drain_gloo_at_exit()
    return dist.get_rank(), dist.get_world_size(), chosen


_GLOO_WORKER = "pt_gloo_runloop"
_drain_registered = False


def _gloo_worker_states() -> list[str]:
    """The scheduler state (R, S, D, ...) of each of this process's gloo worker threads, read from
    /proc (an empty list where there is no /proc or the threads are not named)."""
    states = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return states
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name_end = stat.rfind(")")
        if stat[stat.find("(") + 1:name_end] == _GLOO_WORKER:
            states.append(stat[name_end + 2:name_end + 3])
    return states


def wait_for_gloo_workers(timeout: float = 2.0, poll: float = 0.01) -> bool:
    """Sleep in `poll` steps (the GIL released) until every gloo worker thread of this process
    is seen asleep three polls in a row; False if `timeout` passed first.

    A gloo worker drops its last reference to a finished collective a moment after the caller's
    wait() returned, and the collective's tensors need the GIL to be released. When the process
    exits right after a collective, that moment can fall into the interpreter's finalization, where
    taking the GIL ends the thread and std::terminate aborts the process (SIGABRT after a run that
    finished and saved everything; pytorch/pytorch#190489). The process group itself cannot be
    destroyed first: DTensor's sharding caches keep FSDP's mesh, and the group, alive until then.
    This narrows the window, it does not close it: a worker waiting for the GIL also reads as
    asleep, so what helps is that each poll's sleep hands it the GIL (measured: 0 aborts in 120
    two-rank runs, against 6 in 110 without)."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 3:
        time.sleep(poll)  # releases the GIL, so a worker waiting for it can finish
        states = _gloo_worker_states()
        quiet = quiet + 1 if all(s in "SIDT" for s in states) else 0
        if time.monotonic() > deadline:
            return False
    return True


def drain_gloo_at_exit():
    """Run wait_for_gloo_workers at exit, before the interpreter starts finalizing (once)."""
    global _drain_registered
    if not _drain_registered:
        atexit.register(wait_for_gloo_workers)
        _drain_registered = True


def apply_activation_checkpointing(model: IntegratorLanguageModel):
    """Recompute each block's activations in the backward instead of keeping them."""
    model.config.gradient_checkpointing = True


def apply_fsdp(model: IntegratorLanguageModel, mesh=None, param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = torch.float32, reshard_after_forward: bool = True):
    """fully_shard per block, then the root (see the module docstring for the shared controller).
    param_dtype=torch.bfloat16 computes in bf16 (the all-gathers carry bf16 too); gradients are
    reduced in reduce_dtype; the sharded parameters the optimizer updates stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device_type = model.norm.weight.device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # FSDP warns that a module returned a view (an in-place op on it would skip the backward
    # all-gather): the blocks' integrator statistics are views, read by the loss, never written
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPBlock|FSDPIntegratorLanguageModel)\) "
                                              r"returned a view tensor")
    shared = set(model.controller.parameters()) if model.controller is not None else set()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=shared or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def parallelize(model: IntegratorLanguageModel, mode: str, precision: str = "fp32",
                activation_checkpointing: bool = False) -> nn.Module:
    """The model ready for data-parallel training under the current process group: mode "ddp"
    returns a DistributedDataParallel wrapper, "fsdp" shards the model in place and returns it,
    "none" returns it as it is. Every rank calls this with the same model (same config and
    seed, so the same initial weights)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if mode == "none":
        return model
    if not dist.is_initialized():
        raise ValueError(f"parallel={mode!r} needs a process group: launch with torchrun (or call "
                         f"torch.distributed.init_process_group first)")
    cfg = model.config
    if mode == "fsdp":
        if cfg.mixture_of_integrators:
            raise ValueError("mixture_of_integrators is not supported under FSDP: an expert that gets no rows on "
                             "one rank has no gradient there, and the ranks' reductions would not match; use "
                             "parallel='ddp'")
        if cfg.mu_ema_rate:
            raise ValueError("mu_ema_rate is not supported under FSDP (the EMA writes mu between forwards, when it "
                             "is sharded); use parallel='ddp'")
        return apply_fsdp(model, param_dtype=torch.bfloat16 if precision == "bf16" else None)
    device = model.norm.weight.device
    # an expert of a mixture that gets no rows on a rank has no gradient there
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                               find_unused_parameters=cfg.mixture_of_integrators)


def _current_rss() -> Optional[int]:
    """Resident bytes of this process now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_report(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """This rank's bytes of parameters (its shards under FSDP), gradients and optimizer state,
    and the process's resident memory now and at its peak (the peak includes the whole model
    every rank builds before sharding it)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    state = 0
    if optimizer is not None:
        state = sum(local(v) for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
    report = {"params": sum(local(p) for p in params),
              "grads": sum(local(p.grad) for p in params if p.grad is not None),
              "optimizer": state,
              "rss": _current_rss(),
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report["peak_cuda"] = torch.cuda.max_memory_allocated()
    return report
