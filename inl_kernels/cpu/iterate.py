"""The iterate (SPEC §2) on the compiled CPU backend, csrc/cpu/iterate.cpp.

The kernel takes the controller in fp32 with the three input biases already summed, the
modulation as 8 scalars (mod_scale, mod_bias) and the sparse excitation as a [T, d] table (None
without excited dims), all built here in torch (reference.iterate.fold_parameters) so that
autograd carries their gradients back to b_h, b_x, b_v, gamma, phi and to weights kept in
another dtype. It computes in fp32 for fp32, bf16 and fp16 inputs.

The controller's weights, packed for the kernel's micro-kernel (with mod_scale folded in), are
cached per parameter version: a decode step, or every layer of a model that shares one
controller, reuses them until a weight or mod_scale changes (an optimizer step bumps a
parameter's version; a change made through `.data` does not, and is not seen).
"""
from __future__ import annotations

import weakref

import torch

from ..reference.iterate import IterateInfo, fold_parameters, needs_grad
from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_PACKS = 64  # packs kept per w_o tensor: one per layer that shares the controller


def supports(h, x, *, v=None, return_trajectory=False, **kw):
    if h.dtype not in _DTYPES:
        return f"the cpu iterate runs float32, bfloat16 and float16 inputs, got {str(h.dtype).replace('torch.', '')}"
    if return_trajectory and needs_grad(h, x, v, *kw.values()):
        return "return_trajectory=True with gradients runs on the reference"
    return None


def _cached(holder, slot, tensors, extra, build, usable=lambda value: True):
    """build(), remembered on `holder` under `slot` for these same tensors (alive, at these
    versions) and `extra`; rebuilt when any of them changed in place. Inference tensors have no
    version counter: nothing is cached for them."""
    if any(t.is_inference() for t in tensors):
        return build()
    versions = tuple((t.data_ptr(), t._version) for t in tensors) + tuple(extra)
    cache = getattr(holder, slot, None)
    if cache is None:
        cache = {}
        setattr(holder, slot, cache)
    key = tuple(id(t) for t in tensors)
    hit = cache.get(key)
    if (hit is not None and hit[1] == versions and usable(hit[2])
            and all(r() is t for r, t in zip(hit[0], tensors))):
        return hit[2]
    value = build()
    cache.pop(key, None)
    if len(cache) >= _MAX_PACKS:
        cache.pop(next(iter(cache)))
    cache[key] = (tuple(weakref.ref(t) for t in tensors), versions, value)
    return value


def packed_controller(w_h, w_x, w_v, w_o, mod_scale, backward):
    """The controller packed for the kernel (an _C.IteratePack), from the cache kept on w_o when
    these same tensors, at these versions, were packed before on the path in use (a pack made for
    the backward serves the forward too); None for inference tensors (the kernel then packs for
    the call)."""
    tensors = (w_h, w_x, w_v, w_o, mod_scale)
    if any(t.is_inference() for t in tensors):
        return None

    def build():
        with torch.no_grad():
            return _C.iterate_pack(*(t.detach().float() for t in tensors[:4]), mod_scale.detach().float(), backward)
    return _cached(w_o, "_inl_cpu_packs", tensors, (_C.cpu_capability(),), build,
                   usable=lambda pack: pack.backward or not backward)


class _Iterate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, pack,
                exc_index):
        # hidden: the controller's hidden activations of every step (T·H floats a row), so that
        # the backward's recompute of the forward skips the controller's input layer
        x_T, v_T, iterations, energy, distance, _, _, hidden = _C.iterate_forward(
            h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, None, 0, False, True,
            pack)
        ctx.save_for_backward(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, hidden)
        ctx.constants = (dt, kappa, num_iterations)
        ctx.pack = pack
        ctx.exc_index = exc_index  # the table's gradient is read in these columns only
        ctx.mark_non_differentiable(iterations)
        return x_T, v_T, iterations, energy, distance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x, grad_v, _, grad_energy, grad_distance):
        h, x, v, *weights, hidden = ctx.saved_tensors
        gh, gx, gv, *grads = _C.iterate_backward(
            h, x, v, *weights, *ctx.constants, grad_x.contiguous(), grad_v.contiguous(),
            grad_energy.float().contiguous(), grad_distance.float().contiguous(), hidden, ctx.pack, ctx.exc_index)
        gv = gv.to(v.dtype) if v is not None else None
        return (gh.to(h.dtype), gx.to(x.dtype), gv, *grads, None, None, None, None, None)


def iterate(h, x, *, w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu, exc_index, gamma, phi,
            amplitude, dt, kappa, num_iterations, v=None, tol=None, min_iterations=3, return_trajectory=False):
    """Runs SPEC §2 on CPU tensors; returns (x_T, IterateInfo) with the reference's dtypes."""
    grad = needs_grad(h, x, v, w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu, gamma, phi)

    def fold():
        return fold_parameters(b_h, b_x, b_v, mod_scale, mod_bias, exc_index, gamma, phi, amplitude, num_iterations,
                               x.shape[1], torch.float32)
    if grad:  # autograd carries the gradients back through the folding
        table, bias, mod = fold()
    else:  # a decode step builds the excitation table once per parameter version, not per call
        table, bias, mod = _cached(mod_bias, "_inl_cpu_folded", (b_h, b_x, b_v, mod_scale, mod_bias, exc_index, gamma,
                                                                  phi), (float(amplitude), num_iterations, x.shape[1]),
                                   fold)
    weights = (w_h.float(), w_x.float(), w_v.float(), w_o.float(), bias, b_o.float(), mod, mu.float(), table)
    pack = packed_controller(w_h, w_x, w_v, w_o, mod_scale, backward=grad)
    if not grad:
        x_T, v_T, iterations, energy, distance, traj_x, traj_v, _ = _C.iterate_forward(
            h, x, v, *weights, dt, kappa, num_iterations, tol, min_iterations, return_trajectory, False, pack)
        return x_T, IterateInfo(v_T, iterations, energy, distance, traj_x, traj_v)
    x_T, v_T, iterations, energy, distance = _Iterate.apply(h, x, v, *weights, dt, kappa, num_iterations, pack,
                                                            exc_index.long())
    return x_T, IterateInfo(v_T, iterations, energy, distance)
