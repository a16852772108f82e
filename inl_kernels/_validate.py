"""Argument checks shared by every public op, run before any backend is chosen.

They read shapes, dtypes, devices and strides only. The exceptions read values, and run in
eager mode only (torch.compile traces them away: a compiled graph keeps the metadata checks):
- `exc_index` must be sorted, unique and in range. On CPU tensors reading it costs no device
  sync, so it is checked on every call. On a GPU reading it synchronises, so the result is
  remembered on the tensor, keyed on its version counter: a buffer that is not modified in
  place is read once, ever. An in-place edit that bypasses the version counter (writing
  through a numpy view or `.data`) is then not seen on a GPU. During CUDA graph capture the
  check is skipped.
- token ids are range-checked on CPU tensors always, on GPU tensors only when debugging.
- NaN/Inf checks on every input run only when debugging is on (`set_debug(True)` or
  `INL_KERNELS_DEBUG=1`).
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from .common import MAX_ITERATIONS, IterateSettings

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_debug = os.environ.get("INL_KERNELS_DEBUG", "0") not in ("", "0", "false", "False")


def set_debug(enabled: bool = True) -> None:
    """Turns value checks (NaN/Inf in every input) on or off. They synchronise the device."""
    global _debug
    _debug = bool(enabled)


def _eager() -> bool:
    """Value checks run only here: while torch.compile traces, reading a tensor's values would
    break the graph (the compiled graph keeps the metadata checks)."""
    return not torch.compiler.is_compiling()


def _shape(t):
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def tensor(name, t, shape=None, dtypes=FLOAT_DTYPES, device=None, contiguous=True):
    """Checks one tensor argument. `shape` entries may be None (any size). `contiguous="last"`
    asks only for a unit stride in the last dimension (kernels that take strides)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {_shape(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if contiguous == "last":
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                             f"{tuple(t.stride())}")
    elif contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {tuple(t.stride())}")
    if _debug and t.is_floating_point() and _eager() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def param_dtype(name, t, act_dtype):
    """Weights may share the activations' dtype, or be fp32 under fp16/bf16 activations
    (fp32 master weights). fp64 activations need fp64 weights (the reference's gradcheck mode)."""
    if t.dtype == act_dtype or (t.dtype == torch.float32 and act_dtype in (torch.float16, torch.bfloat16)):
        return
    raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, but the activations are "
                    f"{str(act_dtype).replace('torch.', '')}: weights must match them (or be float32 "
                    f"under float16/bfloat16 activations)")


def real(name, value, *, minimum=None, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def integer(name, value, *, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def sorted_unique_index(name, index, size):
    """index values must be strictly increasing and in [0, size): on every call for CPU tensors,
    once per tensor version on a GPU (see the module docstring)."""
    if index.numel() == 0 or index.is_meta or not _eager():
        return
    if index.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    # a CPU check costs no sync: done every time. On a GPU the result is remembered per version
    # (an inference tensor has no version counter: it is checked on every call)
    key = None if (index.device.type == "cpu" or index.is_inference()) else (index._version, size)
    if key is not None and getattr(index, "_inl_checked", None) == key:
        return
    if index.device.type == "cpu" and index.numel() <= 1024:  # a list: cheaper than four small ops
        values = index.tolist()
        lo, hi = min(values), max(values)
        increasing = all(a < b for a, b in zip(values, values[1:]))
    else:
        lo, hi = int(index.min()), int(index.max())
        increasing = index.numel() < 2 or bool((index[1:] > index[:-1]).all())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} values must lie in [0, {size}), got values in [{lo}, {hi}]")
    if not increasing:
        raise ValueError(f"{name} must be sorted and unique (strictly increasing)")
    if key is not None:
        index._inl_checked = key


def iterate_args(h, x, v, params, amplitude, dt, kappa, num_iterations, tol, min_iterations, return_info,
                 return_trajectory) -> IterateSettings:
    """Checks inl_iterate's arguments; returns its scalars as a normalised IterateSettings."""
    tensor("h", h, shape=(None, None))
    n, d = h.shape
    if d < 1:
        raise ValueError(f"h must have at least one column (d >= 1), got shape {_shape(h)}")
    dev, act = h.device, h.dtype
    acts = (act,)
    tensor("x", x, shape=(n, d), dtypes=acts, device=dev)
    if v is not None:
        tensor("v", v, shape=(n, d), dtypes=acts, device=dev)
    tensor("w_h", params.w_h, shape=(None, d), device=dev)
    H = params.w_h.shape[0]
    if H < 1:
        raise ValueError("w_h must have at least one row (controller hidden size H >= 1)")
    shapes = dict(b_h=(H,), w_x=(H, d), b_x=(H,), w_v=(H, d), b_v=(H,), w_o=(4 * d, H), b_o=(4 * d,),
                  mod_scale=(4,), mod_bias=(4,), mu=(d,))
    for name, shape in shapes.items():
        tensor(name, getattr(params, name), shape=shape, device=dev)
    for name in ("w_h",) + tuple(shapes):
        param_dtype(name, getattr(params, name), act)
    tensor("exc_index", params.exc_index, shape=(None,), dtypes=INDEX_DTYPES, device=dev)
    E = params.exc_index.shape[0]
    for name in ("gamma", "phi"):
        tensor(name, getattr(params, name), shape=(E,), device=dev)
        param_dtype(name, getattr(params, name), act)
    real("amplitude", amplitude)
    real("dt", dt)
    real("kappa", kappa, allow_none=True)
    integer("num_iterations", num_iterations, minimum=1, maximum=MAX_ITERATIONS)
    real("tol", tol, minimum=0, allow_none=True)
    integer("min_iterations", min_iterations, minimum=0)
    flag("return_info", return_info)
    flag("return_trajectory", return_trajectory)
    sorted_unique_index("exc_index", params.exc_index, d)
    return IterateSettings(amplitude=float(amplitude), dt=float(dt), kappa=None if kappa is None else float(kappa),
                           num_iterations=int(num_iterations), tol=None if tol is None else float(tol),
                           min_iterations=int(min_iterations), return_trajectory=return_trajectory)


def token_ids(name, ids, vocab_size):
    """Token ids must lie in [0, vocab_size): an id outside would fault the device in the
    embedding gather. Checked always for CPU tensors (no sync) and, for device tensors, only
    when debugging (it synchronises)."""
    if ids.numel() == 0 or ids.is_meta or (ids.device.type != "cpu" and not _debug) or not _eager():
        return
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} values must lie in [0, {vocab_size}) (the vocabulary), got values in [{lo}, {hi}]")


def swiglu_args(x, w_gate, w_up, w_down):
    tensor("x", x, contiguous=False)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the model width last), got a 0-dim tensor")
    d = x.shape[-1]
    tensor("w_gate", w_gate, shape=(None, d), device=x.device, contiguous=False)
    f = w_gate.shape[0]
    tensor("w_up", w_up, shape=(f, d), device=x.device, contiguous=False)
    tensor("w_down", w_down, shape=(d, f), device=x.device, contiguous=False)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        param_dtype(name, w, x.dtype)


def linear_args(x, weight, bias):
    """What F.linear / nn.Linear accept: weight [O, K] with K x's last dimension, bias [O] or
    None, on x's device, in x's dtype (any dtype under autocast, which casts them)."""
    tensor("x", x, contiguous=False)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the input features last), got a 0-dim tensor")
    try:
        same_dtype = not torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type without autocast (meta)
        same_dtype = True
    tensor("weight", weight, shape=(None, x.shape[-1]), device=x.device, contiguous=False,
           dtypes=(x.dtype,) if same_dtype else FLOAT_DTYPES)
    if bias is not None:
        tensor("bias", bias, shape=(weight.shape[0],), device=x.device, contiguous=False,
               dtypes=(x.dtype,) if same_dtype else FLOAT_DTYPES)


def embedding_args(ids, embed_low, project_up):
    tensor("ids", ids, dtypes=INDEX_DTYPES, contiguous=False)
    tensor("embed_low", embed_low, shape=(None, None), device=ids.device, contiguous=False)
    r = embed_low.shape[1]
    tensor("project_up", project_up, shape=(None, r), device=ids.device, contiguous=False)
    param_dtype("embed_low", embed_low, project_up.dtype)
    token_ids("ids", ids, embed_low.shape[0])


def rms_norm_args(x, weight, eps, residual):
    tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension, got shape {_shape(x)}")
    tensor("weight", weight, shape=(x.shape[-1],), device=x.device)
    param_dtype("weight", weight, x.dtype)
    real("eps", eps, minimum=0)
    if residual is not None:
        tensor("residual", residual, shape=tuple(x.shape), dtypes=(x.dtype,), device=x.device)


def rope_tables_args(cos, sin, half, min_rows, device):
    tensor("cos", cos, shape=(None, half), device=device)
    tensor("sin", sin, shape=tuple(cos.shape), dtypes=(cos.dtype,), device=device)
    if cos.shape[0] < min_rows:
        raise ValueError(f"cos/sin hold {cos.shape[0]} positions but positions up to {min_rows - 1} "
                         f"are needed (build the tables with a larger max_seq_len)")


def rope_args(q, k, cos, sin, position_offset):
    tensor("q", q, shape=(None, None, None, None), contiguous="last")
    B, Hq, S, D = q.shape
    tensor("k", k, shape=(B, None, S, D), dtypes=(q.dtype,), device=q.device, contiguous="last")
    if D < 2 or D % 2:
        raise ValueError(f"q head dim must be even and >= 2 for rotate-half RoPE, got {D}")
    integer("position_offset", position_offset, minimum=0)
    rope_tables_args(cos, sin, D // 2, position_offset + S, q.device)


def attention_args(q, k, v, causal, scale, rope, kv_lens=None, kv_starts=None):
    tensor("q", q, shape=(None, None, None, None), contiguous="last")
    B, Hq, Sq, D = q.shape
    tensor("k", k, shape=(B, None, None, D), dtypes=(q.dtype,), device=q.device, contiguous="last")
    Hkv, Skv = k.shape[1], k.shape[2]
    tensor("v", v, shape=(B, Hkv, Skv, D), dtypes=(q.dtype,), device=q.device, contiguous="last")
    if D < 1:
        raise ValueError(f"q must have a head dim D >= 1, got shape {_shape(q)}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) (Hq % Hkv == 0)")
    if Sq > Skv:
        raise ValueError(f"q has {Sq} positions but k/v only {Skv}: queries sit at the end of the keys "
                         f"(Sq <= Skv)")
    flag("causal", causal)
    real("scale", scale, allow_none=True)
    if rope is not None:
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            raise TypeError("rope must be a (cos, sin) pair or None")
        if D % 2:
            raise ValueError(f"q head dim must be even for rotate-half RoPE, got {D}")
        rope_tables_args(rope[0], rope[1], D // 2, Skv, q.device)
    for name, t in (("kv_lens", kv_lens), ("kv_starts", kv_starts)):
        if t is not None:
            tensor(name, t, shape=(B,), dtypes=INDEX_DTYPES, device=q.device)
    # the values bound what the kernels index: read where that costs no sync (CPU, eager)
    # (one row per sequence: a list is cheaper to read than two reductions)
    if q.device.type == "cpu" and _eager() and B > 0:
        if kv_lens is not None:
            lens = kv_lens.tolist()
            if min(lens) < Sq or max(lens) > Skv:
                raise ValueError(f"kv_lens values must lie in [Sq, Skv] = [{Sq}, {Skv}] (the queries sit at the end "
                                 f"of each row's keys), got values in [{min(lens)}, {max(lens)}]")
        if kv_starts is not None:
            starts = kv_starts.tolist()
            if min(starts) < 0 or max(starts) > Skv:
                raise ValueError(f"kv_starts values must lie in [0, {Skv}], got values in [{min(starts)}, "
                                 f"{max(starts)}]")
