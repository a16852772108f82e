"""The iterate (SPEC §2) on the compiled CPU backend, csrc/cpu/iterate.cpp.

The kernel takes the controller in fp32 with the three input biases already summed, the
modulation as 8 scalars (mod_scale, mod_bias) and the sparse excitation as a [T, d] table (None
without excited dims), all built here in torch (common.fold_parameters) so that autograd
carries their gradients back to b_h, b_x, b_v, gamma, phi and to weights kept in another dtype.
It computes in fp32 for fp32, bf16 and fp16 inputs.

The two C++ entry points are registered as the torch.library ops `inl::cpu_iterate` and
`inl::cpu_iterate_backward` (fake functions state their output shapes; the backward is the
forward op's registered autograd formula), so torch.compile and torch.export see one op each.

The controller's weights, packed for the kernel's micro-kernel (with mod_scale folded in), are
cached per parameter version inside the ops: a decode step, or every layer of a model that
shares one controller, reuses them until a weight or mod_scale changes. An in-place change bumps
a tensor's version, but torch's fused optimizers (AdamW(fused=True) and the like) write the
parameters without bumping it, so every step of a torch.optim optimizer also invalidates the
cache (a global step post-hook counts the steps). A parameter given new storage (`module.to()`,
`load_state_dict(assign=True)`, `param.data = ...`) misses the cache; a change written in place
through `.data` bumps nothing and is not seen. Without gradients, outside torch.compile's
tracing, the folded biases and excitation table are cached the same way. Nothing is stored on
the tensors (see `_cached`): models pickle and swap their parameters as without the cache.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..common import (IterateInfo, IterateParams, IterateSettings, dtype_name, eager_direct, fold_parameters,
                      needs_grad)
from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_CACHED = 256  # entries in all: a model's layers (one per layer sharing a controller), a few models
# torch.optim steps taken in this process: part of every cache key (see the module's docstring;
# a fused optimizer writes parameters without bumping their version counters)
_optimizer_steps = [0]


def _count_step(optimizer, args, kwargs):
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_step)

# The caches live here, not on the tensors: an attribute on a Parameter goes into its pickle
# (torch.save(model) failed once a forward had run) and a Python weakref to it makes
# torch.utils.swap_tensors refuse it (module.to() under swap_module_params_on_conversion). An
# entry holds C++-level weak references to the tensors' storages (StorageWeakRef, as torch's
# multiprocessing does): they keep no data alive, but while one is held no other storage can
# take the storage's address, so a tensor still showing that address is still on that storage
# (module.to(bf16).to(fp32) replaces `.data`, keeping the Parameter, its id and its version: by
# address alone, a new storage at a reused address passed for the old one).
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_cache_lock = threading.Lock()


def _storage_state(t: Tensor) -> tuple:
    """What identifies t's values short of reading them: its storage, view and version."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


def _cached(slot, tensors, extra, build, usable=lambda value: True):
    """build(), remembered under `slot` for tensors on these same storages, at these versions,
    with no optimizer step since, and `extra`; rebuilt when any of them changed in place or was
    given other storage. Inference tensors have no version counter: nothing is cached for them.

    An entry that can never be hit again is dropped when the next entry is made: its tensors
    were freed, an optimizer step came after it (the count only grows), or one of its storages
    is at a newer version now (a version only grows). Training thus keeps one entry per layer
    (the entries of mod_scale values of past steps went away; the LRU bound kept 256 of them,
    ~470 MiB of dead packs for `small`)."""
    if any(t.is_inference() for t in tensors):
        return build()
    states = tuple(_storage_state(t) for t in tensors)
    key = (slot, tuple(extra)) + tuple(state[:5] for state in states)
    versions = tuple(state[5] for state in states) + (_optimizer_steps[0],)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[1] == versions and usable(hit[2]) and not any(r.expired() for r in hit[0]):
            _cache.move_to_end(key)
            return hit[2]
    value = build()
    refs = tuple(StorageWeakRef(t.untyped_storage()) for t in tensors)
    now = {state[:5]: state[5] for state in states}  # the storages of this call at their versions

    def dead(entry_key, entry) -> bool:
        refs_, versions_ = entry[0], entry[1]
        if versions_[-1] != versions[-1] or any(r.expired() for r in refs_):
            return True
        return any(now.get(where, version) != version for where, version in zip(entry_key[2:], versions_))

    with _cache_lock:
        for k in [k for k, entry in _cache.items() if dead(k, entry)]:
            del _cache[k]
        _cache.pop(key, None)
        while len(_cache) >= _MAX_CACHED:
            _cache.popitem(last=False)
        _cache[key] = (refs, versions, value)
    return value


def packed_controller(w_h, w_x, w_v, w_o, mod, backward):
    """The controller packed for the kernel (an _C.IteratePack) for these fp32 weights and the
    modulation `mod` (mod_scale is folded in), from the cache kept on w_o when these same
    tensors, at these versions, were packed before with the same mod_scale on the path in use (a
    pack made for the backward serves the forward too); None for inference tensors (the kernel
    then packs for the call)."""
    tensors = (w_h, w_x, w_v, w_o)
    if any(t.is_inference() for t in tensors):
        return None
    scale = mod.detach()[:4]

    def build():
        return _C.iterate_pack(w_h.detach(), w_x.detach(), w_v.detach(), w_o.detach(), scale, backward)
    return _cached("pack", tensors, (tuple(scale.tolist()), _C.cpu_capability()), build,
                   usable=lambda pack: pack.backward or not backward)


def hidden_numel(n: int, T: int, H: int) -> int:
    """Floats of the controller activations the training forward keeps for the backward: T·H a
    row, in the kernel's own layout of row blocks of NB = 2 vectors (iterate.cpp's Stash), the
    hidden size padded to a multiple of NB; NB is that of the CPU path in use."""
    nb = 2 * _C.cpu_vector_width()
    return -(-n // nb) * T * (-(-H // nb) * nb) * nb


@torch.library.custom_op("inl::cpu_iterate", mutates_args=(), device_types="cpu")
def cpu_iterate_op(h: Tensor, x: Tensor, v: Optional[Tensor], w_h: Tensor, w_x: Tensor, w_v: Tensor, w_o: Tensor,
                   bias: Tensor, b_o: Tensor, mod: Tensor, mu: Tensor, table: Optional[Tensor], dt: float,
                   kappa: Optional[float], num_iterations: int, tol: Optional[float], min_iterations: int,
                   trajectory: bool, save_hidden: bool, exc_index: Optional[Tensor] = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_T, v_T, iterations, energy, distance, trajectory_x, trajectory_v, hidden); the last three
    are empty unless asked for (`trajectory`, `save_hidden`). `exc_index` (the excited dims) only
    tells the backward where the table's gradient is read."""
    return _forward(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, tol,
                    min_iterations, trajectory, save_hidden)


def _forward(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, tol, min_iterations,
             trajectory, save_hidden, exc_index=None):
    """The body of `inl::cpu_iterate`, which eager inference also calls without the op's dispatch
    (`exc_index` matters only to the op's backward)."""
    pack = packed_controller(w_h, w_x, w_v, w_o, mod, backward=save_hidden)
    out = _C.iterate_forward(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, tol,
                             min_iterations, trajectory, save_hidden, pack)
    x_T, v_T, iterations, energy, distance, traj_x, traj_v, hidden = out
    # an op returns tensors only, each its own: the ones not asked for are distinct empty tensors
    return (x_T, v_T, iterations, energy, distance, x.new_empty(0) if traj_x is None else traj_x,
            x.new_empty(0) if traj_v is None else traj_v,
            x.new_empty(0, dtype=torch.float32) if hidden is None else hidden.view(-1))


@cpu_iterate_op.register_fake
def _(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, tol, min_iterations,
      trajectory, save_hidden, exc_index=None):
    n, d = x.shape
    T = num_iterations
    f32 = torch.float32
    traj = x.new_empty(n, T + 1, d) if trajectory else x.new_empty(0)
    hidden = x.new_empty(hidden_numel(n, T, w_h.shape[0]) if save_hidden else 0, dtype=f32)
    return (x.new_empty(n, d), x.new_empty(n, d), x.new_empty(n, dtype=torch.int32), x.new_empty(n, T, dtype=f32),
            x.new_empty(n, T, dtype=f32), traj, traj.clone(), hidden)


@torch.library.custom_op("inl::cpu_iterate_backward", mutates_args=(), device_types="cpu")
def cpu_iterate_backward_op(h: Tensor, x: Tensor, v: Optional[Tensor], w_h: Tensor, w_x: Tensor, w_v: Tensor,
                            w_o: Tensor, bias: Tensor, b_o: Tensor, mod: Tensor, mu: Tensor, table: Optional[Tensor],
                            dt: float, kappa: Optional[float], num_iterations: int, grad_x: Tensor, grad_v: Tensor,
                            grad_energy: Tensor, grad_distance: Tensor, hidden: Tensor,
                            exc_index: Optional[Tensor] = None) -> list[Tensor]:
    """The fp32 gradients of h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table (v and table:
    empty when the forward had none; with `exc_index`, the table's is zero outside those columns)."""
    pack = packed_controller(w_h, w_x, w_v, w_o, mod, backward=True)  # the forward's, when unchanged
    grads = _C.iterate_backward(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations,
                                grad_x, grad_v, grad_energy, grad_distance, hidden if hidden.numel() else None, pack,
                                None if exc_index is None else exc_index.long())
    return [x.new_empty(0, dtype=torch.float32) if g is None or (i == 2 and v is None) else g
            for i, g in enumerate(grads)]


@cpu_iterate_backward_op.register_fake
def _(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, grad_x, grad_v,
      grad_energy, grad_distance, hidden, exc_index=None):
    like = lambda t: t.new_empty(t.shape, dtype=torch.float32)  # noqa: E731
    empty = lambda: x.new_empty(0, dtype=torch.float32)  # noqa: E731
    return [like(h), like(x), empty() if v is None else like(v), like(w_h), like(w_x), like(w_v), like(w_o),
            like(bias), like(b_o), like(mod), like(mu), empty() if table is None else like(table)]


def _setup_context(ctx, inputs, output):
    (h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, _tol, _min, _traj,
     _save, exc_index) = inputs
    ctx.save_for_backward(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, output[7], exc_index)
    ctx.constants = (dt, kappa, num_iterations)
    ctx.has = (v is not None, table is not None)
    ctx.capability = _C.cpu_capability()  # the saved hidden activations are laid out for this path


def _backward(ctx, grad_x, grad_v, _iterations, grad_energy, grad_distance, _tx, _tv, _hidden):
    if not torch.compiler.is_compiling() and _C.cpu_capability() != ctx.capability:
        # its row blocks (32, 16 or 8 rows) differ: the backward would read the activations wrongly
        raise RuntimeError(f"the CPU path changed between the iterate's forward ({ctx.capability}) and its backward "
                           f"({_C.cpu_capability()}): call inl_kernels.cpu.set_capability only with no backward "
                           f"pending")
    h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, hidden, exc_index = ctx.saved_tensors
    gh, gx, gv, *grads = cpu_iterate_backward_op(
        h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, *ctx.constants, grad_x.contiguous(),
        grad_v.contiguous(), grad_energy.float().contiguous(), grad_distance.float().contiguous(), hidden, exc_index)
    has_v, has_table = ctx.has
    grads[-1] = grads[-1] if has_table else None
    return (gh.to(h.dtype), gx.to(x.dtype), gv.to(v.dtype) if has_v else None, *grads,
            None, None, None, None, None, None, None, None)


cpu_iterate_op.register_autograd(_backward, setup_context=_setup_context)


def supports(h, x, v, params: IterateParams, settings: IterateSettings) -> Optional[str]:
    if h.dtype not in _DTYPES:
        return f"the cpu iterate runs float32, bfloat16 and float16 inputs, got {dtype_name(h.dtype)}"
    if settings.return_trajectory and needs_grad(h, x, v, params):
        return "return_trajectory=True with gradients runs on the reference"
    return None


def _kernel_weights(params: IterateParams, settings: IterateSettings, d: int, grad: bool):
    """The op's tensor arguments after x and v: the fp32 controller, the folded bias, modulation
    and excitation table, and the excited dims where the table exists (for its gradient)."""
    p, s = params, settings

    def fold():
        return fold_parameters(params, s, d, torch.float32)
    if grad or torch.compiler.is_compiling():  # autograd carries the gradients back through the folding
        folded = fold()
    else:  # a decode step builds the excitation table once per parameter version, not per call
        folded = _cached("folded", (p.b_h, p.b_x, p.b_v, p.mod_scale, p.mod_bias, p.exc_index,
                                                         p.gamma, p.phi),
                         (s.amplitude, s.num_iterations, d), fold)
    return ((p.w_h.float(), p.w_x.float(), p.w_v.float(), p.w_o.float(), folded.bias, p.b_o.float(), folded.mod,
             p.mu.float(), folded.table), p.exc_index if folded.table is not None else None)


def iterate(h, x, v, params: IterateParams, settings: IterateSettings):
    """Runs SPEC §2 on CPU tensors; returns (x_T, IterateInfo) with the reference's dtypes."""
    s = settings
    grad = needs_grad(h, x, v, params)
    weights, exc_index = _kernel_weights(params, s, x.shape[1], grad)
    # under grad every step runs (no early exit) and the forward keeps what its backward needs;
    # eager inference calls the op's own function, without its dispatch
    run = cpu_iterate_op if grad or not eager_direct(h, x, v, params) else _forward
    x_T, v_T, iterations, energy, distance, traj_x, traj_v, _ = run(
        h, x, v, *weights, s.dt, s.kappa, s.num_iterations, None if grad else s.tol, s.min_iterations,
        s.return_trajectory and not grad, grad, exc_index)
    if s.return_trajectory and not grad:
        return x_T, IterateInfo(v_T, iterations, energy, distance, traj_x, traj_v)
    return x_T, IterateInfo(v_T, iterations, energy, distance)


def inference_arguments(params: IterateParams, settings: IterateSettings, d: int):
    """(weights, rest): what `_C.iterate_forward(h, x, None, *weights, *rest)` takes for eager
    inference with these parameters and settings, the weights folded and packed once."""
    s = settings
    weights, exc_index = _kernel_weights(params, s, d, grad=False)
    pack = packed_controller(*weights[:4], weights[6], backward=False)
    return weights, (s.dt, s.kappa, s.num_iterations, s.tol, s.min_iterations, False, False, pack)


def prepared_inference(params: IterateParams, settings: IterateSettings, d: int):
    """iterate(h, x, None, params, settings) for eager inference as a function of (h, x) alone,
    returning (x_T, IterateInfo): the weights are folded and packed here, once, for callers that
    run many small calls on unchanged parameters inside `common.direct_calls()` (a decode loop;
    the parameters must not change while it is used). The kernel call is iterate's, argument for
    argument, so the bits are too."""
    weights, rest = inference_arguments(params, settings, d)

    def run(h, x):
        x_T, v_T, iterations, energy, distance, _, _, _ = _C.iterate_forward(h, x, None, *weights, *rest)
        return x_T, IterateInfo(v_T, iterations, energy, distance)
    return run
