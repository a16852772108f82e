"""Kernel-level profiling: where one step of the INL-LLM model, or one op at a given shape,
spends its time, op by op and layer by layer, against this machine's own roofline.

    python -m inl_kernels.profile model --size tiny --mode train --batch 4 --seq 128
    python -m inl_kernels.profile model --size small --mode decode --prompt 32 --steps 8
    python -m inl_kernels.profile model --size medium --mode prefill --device cuda --dtype bf16 --memory
    python -m inl_kernels.profile op iterate --shape 2048x512x5 --backward
    inl-profile op attention --shape 1,8,2,1024,64          (the console script, same arguments)

What it does:

* Runs `--warmup` steps, then `--steps` steps under torch.profiler (the CPU activity, and the
  device's on a GPU) and writes a Chrome / Perfetto trace (`--trace`; open it in
  https://ui.perfetto.dev or chrome://tracing).
* Named ranges: every public op of inl_kernels records itself as `inl::<op>` (in no-grad and in
  grad code, whichever backend runs it, the C++ kernels included); this tool adds one range per
  module call named after the module's path (`blocks.3.integrator`), from forward hooks it
  installs on the model from the outside, one per phase (`phase:forward`, `phase:backward`,
  `phase:optimizer`) and one per step (`step`).
* The per-op table counts every microsecond of the profiled steps once. A range of one of our
  ops (`inl::…`, or the autograd backward node of one) or an aten op takes its whole subtree;
  what the ranges around them (steps, phases, modules, autograd nodes) spend outside any op is
  the `(between ops)` row: Python, hooks, autograd and dispatch. Times are CPU wall times on a
  CPU. On a GPU they are kernel times on the device, `(kernels outside ops)` holds the kernels
  launched outside any op, and `(device idle)` the rest of the steps' wall time (launch gaps,
  host work the device waits for); on a CPU `(outside the step ranges)` holds the wall time
  the profiler's step ranges do not cover (entering and leaving them). Shares are of the steps'
  wall time, measured around each step (perf_counter after a device synchronisation), so they
  sum to 100 %; that the rows other than these last add up to the profiler's own step ranges
  (nothing counted twice or missed) is what tests/test_profile.py checks.
* Roofline: the peaks are measured in the same run, before the profile: a torch.mm GEMM
  (2048³ on a CPU, 8192³ on a GPU, in the run's dtype) and a device copy (bytes read + written).
  Each op's FLOPs and bytes come from a small cost model of its shapes: `op_cost` for ours, from
  the arguments of every call (counted in the last warm-up step; the iterate counts the steps
  its rows actually ran when it returns them), `aten_cost` for aten ops, from the shapes the
  profiler records (matmuls exactly, element-wise ops as one FLOP per output element and every
  operand read or written once). floor = max(FLOPs / GEMM rate, bytes / copy bandwidth);
  `roofline %` = floor / time (100 %: the op runs at its floor). The copy is measured far beyond
  the caches, so a memory-bound op whose operands stay in cache (an optimizer step on small
  tensors) can pass 100 %; the GEMM is one large square product, so skinny matmuls sit below it.
* `--memory`: the peak memory of each phase above what was allocated when the phase began (the
  largest over the profiled steps). On a GPU torch.cuda.max_memory_allocated (tensors in the
  caching allocator); on a CPU the profiler's allocation events, i.e. tensors from PyTorch's
  CPU allocator (a C++ kernel's own scratch buffers, Python objects and what the system
  allocator keeps cached are not seen).
* On a CPU, the minor page faults of the last warm-up step (getrusage; unprofiled, since the
  profiler's own buffers fault too) and how malloc treats freed memory: thousands a step mean
  the step's buffers come back from the OS as fresh pages every time (see
  inl_kernels.cpu.keep_freed_memory, which this entry point applies, as the inl_llm CLI does;
  INL_KERNELS_KEEP_FREED_MEMORY=0 leaves malloc alone).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import os
import platform
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.autograd.profiler import record_function

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("iterate", "rms_norm", "rope", "attention", "swiglu")
# public functional op -> its op name (the `inl::<name>` range and the dispatch table's key)
FUNCTIONAL_OPS = {"inl_iterate": "iterate", "rms_norm": "rms_norm", "rope": "rope", "gqa_attention": "attention",
                  "swiglu": "swiglu", "linear": "linear", "low_rank_embedding": "embedding"}
BETWEEN_OPS = "(between ops)"
OUTSIDE_OPS = "(kernels outside ops)"
DEVICE_IDLE = "(device idle)"
OUTSIDE_STEPS = "(outside the step ranges)"  # CPU: wall time the profiler's step ranges do not cover
EXTRA_ROWS = (BETWEEN_OPS, OUTSIDE_OPS, DEVICE_IDLE, OUTSIDE_STEPS)


# ---- the machine ------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, as lscpu shows it), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


@dataclass
class Peaks:
    """This machine's peaks, measured now: the denominators of the roofline."""

    gemm_flops: float  # FLOP/s of one square torch.mm in `dtype`
    copy_bytes: float  # bytes/s of a device copy, read + written
    gemm_n: int
    dtype: str

    def floor_ms(self, flops: Optional[float], nbytes: Optional[float]) -> Optional[float]:
        if flops is None and nbytes is None:
            return None
        return max((flops or 0) / self.gemm_flops, (nbytes or 0) / self.copy_bytes) * 1e3


def measure_peaks(device: torch.device, dtype: torch.dtype, gemm_n: Optional[int] = None,
                  copy_mib: Optional[int] = None) -> Peaks:
    """GEMM rate (torch.mm of gemm_n³ in dtype; 2048 on a CPU, 8192 on a GPU) and copy bandwidth
    (a copy of copy_mib MiB: 256 on a CPU, 1024 on a GPU, far beyond the caches)."""
    cuda = device.type == "cuda"
    n = gemm_n or (8192 if cuda else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    ms = _median_ms(lambda: torch.mm(a, b), device, warmup=2, repeat=5)
    del a, b
    numel = (copy_mib or (1024 if cuda else 256)) * 2**20 // 4
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, warmup=2, repeat=7)
    return Peaks(gemm_flops=2 * n**3 / (ms / 1e3), copy_bytes=2 * numel * 4 / (copy_ms / 1e3), gemm_n=n,
                 dtype=str(dtype).replace("torch.", ""))


# ---- the cost model of our ops ----------------------------------------------------------------

@dataclass
class Cost:
    """Work of one call: FLOPs and the bytes that must cross memory (inputs read, outputs
    written once), forward and, when the call records a gradient, backward."""

    flops: float
    bytes: float
    backward_flops: float
    backward_bytes: float


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _iterate_cost(a: dict, out) -> Cost:
    """FLOPs 2·N·H·d (h layer, once) + 2·N·H·6d per step (x and v layers, the 4d output layer)
    over the steps the rows ran (info.iterations when returned, else all T); bytes: h, x (v)
    read, x_T, v_T written, the controller's weights once. Backward: the gradients of every
    matmul (2× the forward's FLOPs at all T steps), reading h, x, the two upstream gradients and
    writing dh, dx plus the weight gradients."""
    h, x, w_h = a["h"], a["x"], a["w_h"]
    n, d = x.shape
    hidden = w_h.shape[0]
    T = int(a["num_iterations"])
    steps = float(T)
    info = out[1] if isinstance(out, tuple) and len(out) == 2 else None
    iterations = getattr(info, "iterations", None)
    if isinstance(iterations, torch.Tensor) and iterations.numel():
        steps = float(iterations.float().mean())
    weights = sum(_nbytes(a[k]) for k in ("w_h", "b_h", "w_x", "b_x", "w_v", "b_v", "w_o", "b_o"))
    activations = _nbytes(h) + 3 * _nbytes(x) + _nbytes(a.get("v"))
    flops = 2.0 * n * hidden * d * (1 + 6 * steps)
    return Cost(flops, activations + weights, 2 * 2.0 * n * hidden * d * (1 + 6 * T),
                _nbytes(h) + 6 * _nbytes(x) + 2 * weights)


def _rms_norm_cost(a: dict, out) -> Cost:
    """x·rsqrt(mean(x²)+eps)·w: ~4 FLOPs an element (5 with the residual add); bytes: x (and the
    residual) read, y (and x + residual) written, w. Backward: ~8 FLOPs an element, reading x and
    dy, writing dx."""
    x, r = a["x"], a.get("residual")
    extra = 2 * _nbytes(r) if r is not None else 0
    n = x.numel()
    return Cost((5 if r is not None else 4) * n, 2 * _nbytes(x) + extra + _nbytes(a["weight"]), 8.0 * n,
                3 * _nbytes(x) + 2 * _nbytes(a["weight"]))


def _rope_cost(a: dict, out) -> Cost:
    """Rotate-half: 3 FLOPs an element of q and k (two products and a sum); bytes: q, k read and
    written, the S rows of the cos/sin tables. The backward rotates back: the same."""
    q, k, cos = a["q"], a["k"], a["cos"]
    n = q.numel() + k.numel()
    tables = 2 * q.shape[-2] * cos.shape[-1] * cos.element_size()
    moved = 2 * (_nbytes(q) + _nbytes(k)) + tables
    return Cost(3.0 * n, moved, 3.0 * n, moved)


def _visible_pairs(sq: int, skv: int, causal: bool) -> int:
    """Query-key pairs a causal mask keeps when the queries sit at the end of the keys: query i
    (from 0) sees keys 0 … skv − sq + i."""
    if not causal:
        return sq * skv
    first = skv - sq + 1  # keys the first query sees
    if first >= 1:
        return sq * first + sq * (sq - 1) // 2
    return max(0, skv) * (max(0, skv) + 1) // 2


def _attention_cost(a: dict, out) -> Cost:
    """4·D FLOPs per visible (query, key) pair and query head (q·kᵀ and p·v), plus RoPE's 3 an
    element of q and k when it rotates inside; bytes: q, k, v read and the output written.
    Backward: 2.5× the forward's FLOPs (dq, dk, dv and the recomputed scores), reading q, k, v,
    the output and its gradient, writing dq, dk, dv."""
    q, k, v = a["q"], a["k"], a["v"]
    B, Hq, Sq, D = q.shape
    pairs = _visible_pairs(Sq, k.shape[2], bool(a.get("causal", True)))
    flops = 4.0 * D * B * Hq * pairs + (3.0 * (q.numel() + k.numel()) if a.get("rope") is not None else 0)
    moved = _nbytes(q) * 2 + _nbytes(k) + _nbytes(v)
    return Cost(flops, moved, 2.5 * flops, 2 * moved + _nbytes(q) + _nbytes(k) + _nbytes(v))


def _swiglu_cost(a: dict, out) -> Cost:
    """Three matmuls, 2·tokens·d·F each, and 3 FLOPs an element of the [tokens, F] product
    (silu and the product); bytes: x read, the output written, the three weights. Backward: the
    six gradient matmuls, reading x and dy, writing dx and the weight gradients."""
    x, wg = a["x"], a["w_gate"]
    F, d = wg.shape
    tokens = x.numel() // d
    weights = _nbytes(wg) + _nbytes(a["w_up"]) + _nbytes(a["w_down"])
    mm = 2.0 * tokens * d * F
    return Cost(3 * mm + 3.0 * tokens * F, 2 * _nbytes(x) + weights, 6 * mm, 3 * _nbytes(x) + 2 * weights)


def _linear_cost(a: dict, out) -> Cost:
    """x·weightᵀ + bias: 2·tokens·K·O FLOPs; bytes: x and the weight read, the output written.
    Backward: dx and dweight, twice the FLOPs, reading x, the weight and the output's gradient."""
    x, w, b = a["x"], a["weight"], a.get("bias")
    O, K = w.shape
    tokens = x.numel() // K if K else 0
    flops = 2.0 * tokens * K * O
    moved = _nbytes(x) + _nbytes(w) + (0 if b is None else _nbytes(b)) + tokens * O * x.element_size()
    return Cost(flops, moved, 2 * flops, 2 * moved)


def _embedding_cost(a: dict, out) -> Cost:
    """embed_low[ids]·project_upᵀ: 2·tokens·r·d FLOPs; bytes: the ids, the gathered rows, the
    projection and the output. Backward: 2× the FLOPs, the same traffic."""
    ids, low, up = a["ids"], a["embed_low"], a["project_up"]
    d, r = up.shape
    tokens = ids.numel()
    moved = _nbytes(ids) + tokens * r * low.element_size() + _nbytes(up) + tokens * d * up.element_size()
    return Cost(2.0 * tokens * r * d, moved, 4.0 * tokens * r * d, moved)


OP_COSTS = {"iterate": _iterate_cost, "rms_norm": _rms_norm_cost, "rope": _rope_cost,
            "attention": _attention_cost, "swiglu": _swiglu_cost, "linear": _linear_cost,
            "embedding": _embedding_cost}


def op_cost(op: str, arguments: dict, out=None) -> Cost:
    """The cost of one call of our op `op` from its (bound) arguments and its output."""
    return OP_COSTS[op](arguments, out)


@dataclass
class OpWork:
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    grad_calls: int = 0
    backward_flops: float = 0.0
    backward_bytes: float = 0.0


@contextlib.contextmanager
def count_op_work():
    """Within the block, every call of a public op of inl_kernels (through `inl_kernels.functional`
    or the package namespace, which is how its modules and users call them) adds its cost to
    the yielded {op name: OpWork}. The wrapper binds the arguments by name, so the cost model
    reads them whatever the backend; it costs Python time, so it is never on while timing."""
    import inl_kernels
    import inl_kernels.functional as functional

    work: dict = defaultdict(OpWork)
    patched = []
    for fname, op in FUNCTIONAL_OPS.items():
        fn = getattr(functional, fname, None)
        if fn is None:
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue

        @functools.wraps(fn)
        def wrapper(*args, _fn=fn, _op=op, _sig=sig, **kwargs):
            out = _fn(*args, **kwargs)
            try:
                bound = _sig.bind(*args, **kwargs)
                bound.apply_defaults()
                cost = op_cost(_op, dict(bound.arguments), out)
            except Exception:  # noqa: BLE001 - a call the model cannot cost still runs
                return out
            w = work[_op]
            w.calls += 1
            w.flops += cost.flops
            w.bytes += cost.bytes
            values = list(bound.arguments.values())
            values += [t for v in values if isinstance(v, (tuple, list)) for t in v]
            if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in values):
                w.grad_calls += 1
                w.backward_flops += cost.backward_flops
                w.backward_bytes += cost.backward_bytes
            return out

        for namespace in (functional, inl_kernels):
            if getattr(namespace, fname, None) is fn:
                patched.append((namespace, fname, fn))
                setattr(namespace, fname, wrapper)
    try:
        yield work
    finally:
        for namespace, fname, fn in patched:
            setattr(namespace, fname, fn)


# ---- the cost model of aten ops, from the shapes the profiler records --------------------------

DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
               "short int": 2, "bool": 1, "unsigned char": 1, "signed char": 1, "c10::complex<float>": 8,
               "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}
NO_TRAFFIC = {"view", "t", "transpose", "reshape", "_reshape_alias", "expand", "expand_as", "permute", "as_strided",
              "unsqueeze", "squeeze", "slice", "select", "detach", "alias", "split", "split_with_sizes", "chunk",
              "unbind", "narrow", "_unsafe_view", "unflatten", "flatten", "view_as", "lift_fresh", "empty",
              "empty_like", "empty_strided", "resolve_conj", "resolve_neg", "result_type", "numpy_T", "new_empty",
              "new_empty_strided", "item", "_local_scalar_dense", "is_nonzero", "size", "stride", "dim"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "norm", "linalg_vector_norm", "all",
              "any", "std", "var", "logsumexp", "prod", "count_nonzero"}


def _tensors(ev) -> list:
    """[(shape, element bytes)] of the event's tensor inputs."""
    shapes = getattr(ev, "input_shapes", None) or []
    dtypes = getattr(ev, "input_dtypes", None) or []
    out = []
    for shape, dt in zip(shapes, dtypes):
        size = DTYPE_BYTES.get(dt)
        if size is not None and isinstance(shape, (list, tuple)) and all(isinstance(s, int) for s in shape):
            out.append((list(shape), size))
    return out


def aten_cost(ev) -> tuple:
    """(FLOPs, bytes) of one aten op event from its recorded input shapes and dtypes, or
    (None, None) when the shapes are not there. Matmuls (mm, addmm, bmm, baddbmm, matmul, linear)
    and SDPA exactly; embedding as a gather; views move nothing; reductions read their inputs;
    anything else is element-wise: one FLOP per output element, the inputs read and an output
    the size of the largest input written."""
    name = ev.name.split("::", 1)[-1]
    ts = _tensors(ev)
    if not ts:
        return (0.0, 0.0) if name in NO_TRAFFIC else (None, None)
    numel = lambda s: math.prod(s) if s else 1  # noqa: E731
    es = max(size for _, size in ts)
    read = sum(numel(s) * size for s, size in ts)
    try:
        if name in NO_TRAFFIC:
            return 0.0, 0.0
        if name in ("mm", "addmm", "bmm", "baddbmm", "matmul"):
            a, b = (ts[1][0], ts[2][0]) if name in ("addmm", "baddbmm") else (ts[0][0], ts[1][0])
            a2 = a if len(a) >= 2 else [1] + a
            b2 = b if len(b) >= 2 else b + [1]
            batch = math.prod(torch.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2])))
            M, K, N = a2[-2], a2[-1], b2[-1]
            return 2.0 * batch * M * K * N, read + batch * M * N * es
        if name == "linear":
            x, w = ts[0][0], ts[1][0]
            rows, N = numel(x[:-1]), w[0]
            return 2.0 * rows * x[-1] * N, read + rows * N * es
        if "scaled_dot_product" in name:
            q, k, v = ts[0][0], ts[1][0], ts[2][0]
            pairs = q[-2] * k[-2]
            concrete = getattr(ev, "concrete_inputs", None) or []
            if len(concrete) > 5 and concrete[5] is True:
                pairs = _visible_pairs(q[-2], k[-2], True)
            heads = numel(q[:-2])
            return 2.0 * heads * pairs * (q[-1] + v[-1]), read + numel(q[:-1]) * v[-1] * es
        if name == "copy_":  # dst.copy_(src): src read, dst written
            return 0.0, float(read)
        if name in ("embedding", "index_select"):
            weight, index = (ts[0], ts[1]) if name == "embedding" else (ts[0], ts[-1])
            rows = numel(index[0]) * numel(weight[0][1:])
            return 0.0, numel(index[0]) * index[1] + 2 * rows * weight[1]
    except (IndexError, RuntimeError, TypeError):
        return None, None
    largest = max(numel(s) for s, _ in ts)
    if name.rstrip("_") in REDUCTIONS:
        return float(largest), float(read)
    return float(largest), float(read + largest * es)


# ---- named ranges -----------------------------------------------------------------------------

@contextlib.contextmanager
def layer_ranges(model: torch.nn.Module, root: Optional[str] = None):
    """Within the block, every call of every submodule of `model` (and of `model` itself when
    `root` names it) runs inside a record_function range named after its path, from forward
    pre/post hooks: the model's code is untouched. Yields the set of range names."""
    stack: list = []
    handles = []
    names = set()

    def enter(name):
        def hook(module, args):
            rf = record_function(name)
            rf.__enter__()
            stack.append(rf)
        return hook

    def leave(module, args, output):
        if stack:
            stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        name = name or root
        if not name:
            continue
        names.add(name)
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield names
    finally:
        for handle in handles:
            handle.remove()


class Phases:
    """`with phases("forward"):` marks a phase of a step with a `phase:<name>` range; with
    `memory` on a GPU it also records the phase's peak allocation above its start."""

    def __init__(self, device: torch.device, memory: bool):
        self.cuda_memory = memory and device.type == "cuda"
        self.device = device
        self.peak_bytes: dict = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda_memory:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        with record_function(f"phase:{name}"):
            yield
        if self.cuda_memory:  # the caching allocator's counters are host-side: no synchronisation
            peak = torch.cuda.max_memory_allocated(self.device) - base
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)


def cpu_phase_peaks(prof) -> dict:
    """{phase: peak bytes above the phase's start} from the profiler's CPU allocation events
    (profile_memory=True): the running sum of allocations and frees, in time order."""
    events = prof.profiler.kineto_results.events()
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    windows = [(e.name()[len("phase:"):], e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
               if e.name().startswith("phase:")]
    times, running, total = [], [], 0
    for t, n in allocs:
        total += n
        times.append(t)
        running.append(total)
    import bisect

    peaks: dict = {}
    for name, start, end in windows:
        i = bisect.bisect_left(times, start)
        base = running[i - 1] if i > 0 else 0
        j = bisect.bisect_right(times, end)
        top = max(running[i:j], default=base)
        peaks[name] = max(peaks.get(name, 0), top - base)
    return peaks


# ---- attributing the profile -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _our_backward_nodes() -> dict:
    """{autograd node name: op} for the autograd.Functions defined in inl_kernels' backends (a
    Function `_Iterate` in inl_kernels.cpu.iterate runs its backward as node `_IterateBackward`)."""
    found, todo = {}, list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        module = getattr(cls, "__module__", "") or ""
        if module.startswith("inl_kernels."):
            op = module.rsplit(".", 1)[-1]
            found[f"{cls.__name__}Backward"] = FUNCTIONAL_OPS.get(op, op)
    return found


_GENERATED = re.compile(r"^GeneratedBackwardFor_inl_(\w+?)_(default|[a-z0-9]+)(Backward)?$")
_BACKEND_PREFIX = re.compile(r"^(cpu|cuda|triton|reference)_")


def _public(op: str) -> str:
    """A registered op's public name: `cpu_iterate` (the C++ backend's op) is `iterate`."""
    op = _BACKEND_PREFIX.sub("", op)
    return FUNCTIONAL_OPS.get(op, op)


def op_name(name: str) -> Optional[str]:
    """The table row an event named `name` is attributed to as a whole, or None when it is a
    range around ops (step, phase, module, autograd node) whose children are looked at instead.
    Ours: `inl::<op>` (the public op's range, or a backend's registered op) and
    `inl::<op> (backward)` (its autograd node or registered backward op); aten ops keep their
    name."""
    if name.startswith("inl::"):
        op = name[5:].split(".", 1)[0]
        backward = re.search(r"_(backward|bwd)$", op) is not None
        op = _public(re.sub(r"_(backward|bwd)$", "", op))
        return f"inl::{op}" + (" (backward)" if backward else "")
    match = _GENERATED.match(name)  # torch.library.custom_op's autograd wrapper of an `inl::` op
    if match:
        return f"inl::{_public(match.group(1))}" + (" (backward)" if match.group(3) else "")
    ours = _our_backward_nodes().get(name)
    if ours is not None:
        return f"inl::{ours} (backward)"
    if name.startswith(("aten::", "prim::")):
        return name
    return None


@dataclass
class Row:
    name: str
    calls: int = 0
    us: float = 0.0
    flops: Optional[float] = 0.0
    bytes: Optional[float] = 0.0
    events: list = field(default_factory=list, repr=False)


def attribute(events, device_type: str, ranges: set) -> tuple:
    """Walks the profiler's event trees (every thread) and gives each microsecond to one row.

    Returns ({row name: Row}, {range name: (calls, µs)} for the module ranges in `ranges`)."""
    cuda = device_type == "cuda"

    def inclusive(ev):
        return getattr(ev, "device_time_total", None) if cuda else ev.cpu_time_total

    def own(ev):
        return getattr(ev, "self_device_time_total", None) if cuda else ev.self_cpu_time_total

    rows: dict = {}
    layers: dict = defaultdict(lambda: [0, 0.0])
    between = Row(OUTSIDE_OPS if cuda else BETWEEN_OPS, calls=None, flops=None, bytes=None)

    def visit(ev):
        name = op_name(ev.name)
        if name is not None:
            row = rows.setdefault(name, Row(name))
            row.calls += 1
            row.us += inclusive(ev)
            row.events.append(ev)
            return
        if ev.name in ranges:
            layers[ev.name][0] += 1
            layers[ev.name][1] += inclusive(ev)
        between.us += own(ev)
        for child in ev.cpu_children:
            visit(child)

    for ev in events:
        if ev.cpu_parent is None and ev.device_type == torch.autograd.DeviceType.CPU and not ev.is_async:
            visit(ev)
    rows[between.name] = between
    return rows, dict(layers)


def cost_rows(rows: dict, work: dict) -> None:
    """Fills each row's FLOPs and bytes: ours from the calls counted in `work` (per call, times
    the calls profiled), aten ops from their events' shapes. None where unknown."""
    for row in rows.values():
        if row.name.startswith("inl::"):
            op = row.name[5:].split(" ", 1)[0]
            w = work.get(op)
            backward = row.name.endswith("(backward)")
            calls = (w.grad_calls if backward else w.calls) if w else 0
            if not calls:
                row.flops = row.bytes = None
                continue
            row.flops = (w.backward_flops if backward else w.flops) / calls * row.calls
            row.bytes = (w.backward_bytes if backward else w.bytes) / calls * row.calls
        elif row.events:
            flops = nbytes = 0.0
            for ev in row.events:
                f, b = aten_cost(ev)
                if f is None:
                    flops = nbytes = None
                    break
                flops += f
                nbytes += b
            row.flops, row.bytes = flops, nbytes


# ---- what is profiled ---------------------------------------------------------------------------

@dataclass
class Target:
    """What one profiled step runs: `step(phases)`, the module to name ranges in (and the name
    of its own range), and a description."""

    step: Callable
    module: Optional[torch.nn.Module]
    root: Optional[str]
    title: str


def parse_shape(text: str, count: int, what: str) -> list:
    try:
        values = [int(s) for s in re.split(r"[x,×]", text.lower()) if s]
    except ValueError:
        values = []
    if len(values) != count or min(values) < 1:
        raise ValueError(f"--shape for {what} must be {count} positive integers separated by x or ',', got {text!r}")
    return values


DEFAULT_SHAPES = {  # (CPU, GPU): the shapes of benchmarks/README.md on a GPU, smaller on a CPU
    "iterate": ("2048x512x5", "16384x2048x5"),
    "rms_norm": ("4096x512", "16384x2048"),
    "rope": ("1,8,2,512,64", "4,32,8,4096,64"),
    "attention": ("1,8,2,512,64", "4,32,8,4096,128"),
    "swiglu": ("1024x512x2048", "8192x768x3072"),
}
SHAPE_HELP = {"iterate": "N x d x T (controller hidden: --hidden)", "rms_norm": "M x N",
              "rope": "B,Hq,Hkv,S,D", "attention": "B,Hq,Hkv,S,D (causal, Sq = Skv = S)",
              "swiglu": "tokens x d x F"}


def op_target(args, device: torch.device, dtype: torch.dtype) -> Target:
    """One op at a shape; forward (no grad), or forward and backward with --backward."""
    import inl_kernels.functional as F_inl
    from inl_kernels import Controller, IntegratorLayer, RMSNorm, SwiGLU, rope_tables

    op = args.op
    text = args.shape or DEFAULT_SHAPES[op][device.type == "cuda"]
    g = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(args.backward)  # noqa: E731
    module, call = None, None
    if op == "iterate":
        n, d, T = parse_shape(text, 3, op)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = IntegratorLayer(d, Controller(d, args.hidden), num_iterations=T, tol=args.tol,
                                     backend=args.backend)
        module = module.to(device, dtype).train(args.backward)
        h, x = randn(n, d), randn(n, d)
        call = lambda: module(h, x, return_info=True)[0]  # noqa: E731
        title = f"iterate {n}x{d}, T={T}, H={args.hidden}" + (f", tol {args.tol}" if args.tol else "")
    elif op == "rms_norm":
        m, n = parse_shape(text, 2, op)
        module = RMSNorm(n, backend=args.backend).to(device, dtype)
        x = randn(m, n)
        call = lambda: module(x)  # noqa: E731
        title = f"rms_norm {m}x{n}"
    elif op in ("rope", "attention"):
        B, Hq, Hkv, S, D = parse_shape(text, 5, op)
        q, k, v = randn(B, Hq, S, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D)
        cos, sin = rope_tables(S, D, device=device)
        if op == "rope":
            call = lambda: F_inl.rope(q, k, cos, sin, backend=args.backend)  # noqa: E731
        else:
            call = lambda: F_inl.gqa_attention(q, k, v, causal=True, rope=(cos, sin),  # noqa: E731
                                               backend=args.backend)
        title = f"{op} B{B} Hq{Hq} Hkv{Hkv} S{S} D{D}"
    elif op == "swiglu":
        t, d, f = parse_shape(text, 3, op)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = SwiGLU(d, f, backend=args.backend)
        module = module.to(device, dtype)
        x = randn(t, d)
        call = lambda: module(x)  # noqa: E731
        title = f"swiglu {t}x{d}, F={f}"
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    upstream = {}

    def step(phases):
        if not args.backward:
            with phases("forward"), torch.no_grad():
                call()
            return
        with phases("forward"):
            out = call()
        outs = list(out) if isinstance(out, tuple) else [out]
        if "g" not in upstream:  # fixed upstream gradients, drawn once
            upstream["g"] = [torch.randn(t.shape, generator=g).to(device, t.dtype) for t in outs]
        with phases("backward"):
            torch.autograd.backward(outs, upstream["g"])

    title += f", {'forward + backward' if args.backward else 'forward'}"
    return Target(step, module, op if module is not None else None, title)


def model_target(args, device: torch.device, dtype: torch.dtype) -> Target:
    """A step of the INL-LLM model: a training step (forward, cross-entropy, backward, AdamW),
    a prefill (eval forward of batch × seq tokens into a fresh KV cache) or one decode token
    (greedy, the KV cache filled by a prompt first)."""
    import torch.nn.functional as F

    import inl_llm
    from inl_llm.generate import decode_one_token, prefill

    train = args.mode == "train"
    autocast = train and dtype != torch.float32
    model = inl_llm.create_model(args.size, backend=args.backend)
    model = model.to(device=device, dtype=torch.float32 if train else dtype).train(train)
    cfg = model.config
    V = cfg.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    title = f"{args.size} ({model.num_params() / 1e6:.1f} M parameters) {args.mode}, {args.dtype}"
    if args.mode in ("train", "prefill"):
        if args.seq + (1 if train else 0) > cfg.max_seq_len:
            raise ValueError(f"--seq {args.seq} exceeds max_seq_len {cfg.max_seq_len} of {args.size}")
        ids = torch.randint(0, V, (args.batch, args.seq + 1), generator=g).to(device)
        title += f", batch {args.batch} × {args.seq} tokens"
    if train:
        from inl_llm.train import fused_adamw_runs

        # the optimizer inl_llm.train uses: fused where torch has the kernel
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw_runs(model.parameters()))
        title += (f" (autocast {args.dtype})" if autocast else "")

        def step(phases):
            with phases("forward"):
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    logits = model(ids[:, :-1])[0]
                loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            with phases("backward"):
                loss.backward()
            with phases("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
    elif args.mode == "prefill":
        def step(phases):
            with phases("forward"), torch.no_grad():
                cache = model.new_cache(args.batch, args.seq)
                prefill(model, ids[:, :-1], cache)
    elif args.mode == "decode":
        total = args.prompt + args.warmup + args.steps + 1
        if total > cfg.max_seq_len:
            raise ValueError(f"--prompt {args.prompt} + --warmup {args.warmup} + --steps {args.steps} decode "
                             f"tokens exceed max_seq_len {cfg.max_seq_len} of {args.size}")
        prompt = torch.randint(0, V, (args.batch, args.prompt), generator=g).to(device)
        cache = model.new_cache(args.batch, total)
        with torch.no_grad():
            state = {"logits": prefill(model, prompt, cache)}
        title += f", batch {args.batch}, one token per step after a {args.prompt}-token prompt"

        def step(phases):
            with phases("forward"), torch.no_grad():
                token = state["logits"].argmax(-1, keepdim=True)
                state["logits"] = decode_one_token(model, token, cache)
    else:
        raise ValueError(f"--mode must be train, prefill or decode, got {args.mode!r}")
    return Target(step, model, None, title)


# ---- the run ------------------------------------------------------------------------------------

def run_profile(target: Target, device: torch.device, warmup: int, steps: int, memory: bool,
                trace: Optional[str], progress: bool = True) -> tuple:
    """Warm-up (its last step counting our ops' work), then `steps` profiled steps. Returns
    (profiler, step wall times in ms, op work, phase peaks in bytes, module range names, minor
    page faults of the last warm-up step (unprofiled) or None)."""
    from torch.profiler import ProfilerActivity, profile
    from tqdm import tqdm

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    phases = Phases(device, memory)
    quiet = contextlib.nullcontext  # no ranges needed outside the profile
    bar = tqdm(total=warmup + steps, desc="profile", unit="step", disable=None if progress else True,
               file=sys.stderr)
    with layer_ranges(target.module, target.root) if target.module is not None else quiet() as names:
        ranges = names or set()
        for _ in range(warmup - 1):
            target.step(phases)
            synchronize(device)
            bar.update()
        faults = _minor_faults()  # over the last warm-up step: the profiler's own buffers fault too
        with count_op_work() as work:  # the last warm-up step counts our ops' work (untimed)
            target.step(phases)
            synchronize(device)
        faults = None if faults is None else _minor_faults() - faults
        bar.update()
        phases.peak_bytes.clear()
        walls = []
        with profile(activities=activities, record_shapes=True, profile_memory=memory and device.type != "cuda",
                     with_flops=False) as prof:
            for _ in range(steps):
                synchronize(device)
                t0 = time.perf_counter()
                with record_function("step"):
                    target.step(phases)
                    synchronize(device)
                walls.append((time.perf_counter() - t0) * 1e3)
                bar.update()
    bar.close()
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        prof.export_chrome_trace(trace)
    peaks = dict(phases.peak_bytes)
    if memory and device.type != "cuda":
        peaks = cpu_phase_peaks(prof)
    return prof, walls, dict(work), peaks, ranges, faults


def _minor_faults() -> Optional[int]:
    """This process's minor page faults so far (first touches of fresh pages), where getrusage
    exists."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(prof, walls: list, work: dict, peaks: Peaks, device: torch.device, ranges: set,
              top: int = 25) -> dict:
    """The per-op and per-layer tables as dicts (shares in % of the steps' wall time)."""
    rows, layers = attribute(prof.events(), device.type, ranges)
    cost_rows(rows, work)
    wall_us = sum(walls) * 1e3
    counted = sum(r.us for r in rows.values())
    # the rest of the steps' wall time: on a GPU the device's idle time; on a CPU what lies outside
    # the profiler's own step ranges (entering and leaving them: on a busy machine a descheduled
    # thread lands there, up to several % of a short step)
    rest = DEVICE_IDLE if device.type == "cuda" else OUTSIDE_STEPS
    rows[rest] = Row(rest, calls=None, us=max(0.0, wall_us - counted), flops=None, bytes=None)
    ordered = sorted((r for r in rows.values() if r.name not in EXTRA_ROWS),
                     key=lambda r: -r.us)
    # our ops always get their own row; the smallest of the rest are folded into one
    shown = [r for i, r in enumerate(ordered) if i < top or r.name.startswith("inl::")]
    rest = [r for i, r in enumerate(ordered) if not (i < top or r.name.startswith("inl::"))]
    if rest:
        folded = Row(f"(other ops: {len(rest)} more)", calls=sum(r.calls for r in rest),
                     us=sum(r.us for r in rest), flops=None, bytes=None)
        shown.append(folded)
    shown += [rows[k] for k in EXTRA_ROWS if k in rows]
    table = []
    for r in shown:
        ms = r.us / 1e3
        floor = peaks.floor_ms(r.flops, r.bytes) if r.flops is not None else None
        table.append(dict(op=r.name, calls=r.calls, ms=ms, share=100 * r.us / wall_us if wall_us else None,
                          gflops=r.flops / ms / 1e6 if r.flops and ms else None,
                          gbs=r.bytes / ms / 1e6 if r.bytes and ms else None,
                          roofline=100 * floor / ms if floor and ms else None,
                          flops=r.flops, bytes=r.bytes))
    grouped: dict = defaultdict(lambda: [0, 0.0])
    for name, (calls, us) in layers.items():
        key = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        grouped[key][0] += calls
        grouped[key][1] += us
    layer_rows = [dict(layer=k, calls=c, ms=us / 1e3, share=100 * us / wall_us if wall_us else None)
                  for k, (c, us) in sorted(grouped.items(), key=lambda kv: -kv[1][1])]
    per_layer = [dict(layer=k, calls=c, ms=us / 1e3) for k, (c, us) in sorted(layers.items())]
    return dict(ops=table, layers=layer_rows, per_layer=per_layer,
                share_sum=sum(r["share"] or 0 for r in table))


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def format_table(rows: list, columns: list) -> str:
    cells = [[_fmt(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) if cells else len(title)
              for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, ((_, t), w) in enumerate(zip(columns, widths)))]
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


OP_COLUMNS = [("op", "op"), ("calls", "calls"), ("ms", "total ms"), ("share", "share %"), ("gflops", "GFLOP/s"),
              ("gbs", "GB/s"), ("roofline", "roofline %")]
LAYER_COLUMNS = [("layer", "layer (forward)"), ("calls", "calls"), ("ms", "total ms"), ("share", "share %")]


def _malloc_setting() -> Optional[str]:
    """How malloc treats freed memory here (inl_kernels.cpu.memory_info), None without the C++ backend."""
    try:
        from inl_kernels.cpu.memory import memory_info
    except ImportError:
        return None
    return memory_info()["malloc"]


# more minor page faults than this a step: large buffers come back from the OS as fresh pages
FAULTS_HINT = 1000


def report_text(report: dict) -> str:
    p = report["peaks"]
    lines = [f"== {report['title']} on {report['device']} ({report['backend']} backend), "
             f"{report['steps']} steps, {report['step_ms']:.3g} ms a step (median)",
             f"peaks measured now: torch.mm {p['gemm_n']}³ {p['dtype']} {p['gemm_gflops']:.4g} GFLOP/s, "
             f"copy {p['copy_gbs']:.4g} GB/s",
             "", format_table(report["ops"], OP_COLUMNS),
             f"shares sum to {report['share_sum']:.1f} % of {sum(report['walls_ms']):.4g} ms of steps"
             + ("" if report["device_type"] == "cuda" else
                " (CPU wall times; the machine may be shared: compare ratios, not absolute times)")]
    load = report.get("load_average")
    if report["device_type"] == "cpu" and load and load > (os.cpu_count() or 1) and \
            report.get("omp_wait_policy") is None:
        lines.append(f"load average {load:.1f} on {os.cpu_count()} cores: OpenMP threads spin while a sibling is "
                     "descheduled; OMP_WAIT_POLICY=PASSIVE makes times on a shared machine far less distorted")
    faults = report.get("minor_faults_last_warmup")
    if faults is not None and report["device_type"] == "cpu":
        lines.append(f"minor page faults: {faults:.0f} in the last warm-up step (malloc: {report.get('malloc')})")
        if faults > FAULTS_HINT and report.get("malloc") != "keep":
            lines.append("  freed buffers go back to the OS and fault in again at every step: "
                         "inl_kernels.cpu.keep_freed_memory() keeps them (the CLI and this tool's entry point do)")
    if report["layers"]:
        lines += ["", format_table(report["layers"], LAYER_COLUMNS)]
    if report.get("memory_mib") is not None:
        lines += ["", "peak memory per phase (MiB above the phase's start): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in report["memory_mib"].items()),
                  "  " + report["memory_note"]]
    if report.get("trace"):
        lines.append(f"trace: {report['trace']} (ui.perfetto.dev or chrome://tracing)")
    return "\n".join(lines)


def _at_least_one(text: str) -> int:
    """An integer >= 1 (argparse names the flag when this refuses)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inl_kernels.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)

    def common(q):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on a CPU")
        q.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cpu", "cuda"])
        q.add_argument("--warmup", type=_at_least_one, default=2, help="steps before the profile (>= 1: the last counts work)")
        q.add_argument("--steps", type=_at_least_one, default=3, help="profiled steps")
        q.add_argument("--memory", action="store_true", help="peak memory per phase")
        q.add_argument("--trace", default=None, help="Chrome/Perfetto trace path (default: profile-<what>.json)")
        q.add_argument("--no-trace", action="store_true", help="write no trace")
        q.add_argument("--json", default=None, help="also write the report as JSON here")
        q.add_argument("--rows", type=_at_least_one, default=25,
                       help="ops shown before the rest is folded into one row (ours are always shown)")
        q.add_argument("--per-layer", action="store_true", help="list every module range, not grouped by block")
        q.add_argument("--threads", type=_at_least_one, default=None, help="CPU threads (torch.set_num_threads)")
        q.add_argument("--gemm-size", type=_at_least_one, default=None, help="n of the n³ GEMM that measures the peak")
        q.add_argument("--copy-mib", type=_at_least_one, default=None, help="MiB copied to measure the bandwidth")

    m = sub.add_parser("model", help="a step of the INL-LLM model")
    m.add_argument("--size", default="tiny")
    m.add_argument("--mode", default="train", choices=["train", "prefill", "decode"])
    m.add_argument("--batch", type=_at_least_one, default=None, help="default 4 (train, prefill), 1 (decode)")
    m.add_argument("--seq", type=_at_least_one, default=128, help="tokens per sequence (train, prefill)")
    m.add_argument("--prompt", type=_at_least_one, default=32, help="prompt tokens before decoding")
    common(m)
    o = sub.add_parser("op", help="one op at a shape")
    o.add_argument("op", choices=OPS)
    o.add_argument("--shape", default=None, help="; ".join(f"{k}: {v}" for k, v in SHAPE_HELP.items()))
    o.add_argument("--backward", action="store_true", help="forward and backward (default: forward, no grad)")
    o.add_argument("--hidden", type=_at_least_one, default=64, help="iterate: controller hidden size H")
    o.add_argument("--tol", type=_tolerance, default=None, help="iterate: early exit tolerance (forward only)")
    common(o)
    return p


def profile_command(argv=None) -> dict:
    """Parses `argv`, profiles, prints the tables; returns the report (what --json writes)."""
    p = build_parser()
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "model":
        args.batch = args.batch or (1 if args.mode == "decode" else 4)
    try:
        target = model_target(args, device, dtype) if args.what == "model" else op_target(args, device, dtype)
    except ValueError as e:
        p.error(str(e))
    label = f"{args.size}-{args.mode}" if args.what == "model" else args.op + ("-bwd" if args.backward else "")
    trace = None if args.no_trace else (args.trace or f"profile-{label}-{device.type}.json")
    peaks = measure_peaks(device, dtype, args.gemm_size, args.copy_mib)
    try:  # the first call checks the op's arguments (ValueError naming the one at fault)
        prof, walls, work, phase_peaks, ranges, faults = run_profile(target, device, args.warmup, args.steps,
                                                                     args.memory, trace)
    except ValueError as e:
        p.error(f"{args.what} {args.op if args.what == 'op' else args.size}: {e}")
    summary = summarize(prof, walls, work, peaks, device, ranges, top=args.rows)
    import inl_kernels

    report = dict(
        title=target.title, what=args.what, device=torch.cuda.get_device_name(device) if device.type == "cuda"
        else cpu_model(), device_type=device.type, backend=args.backend, dtype=args.dtype,
        backends=inl_kernels.backends(), threads=torch.get_num_threads(), torch=torch.__version__,
        steps=args.steps, walls_ms=walls, step_ms=sorted(walls)[len(walls) // 2],
        peaks=dict(gemm_gflops=peaks.gemm_flops / 1e9, copy_gbs=peaks.copy_bytes / 1e9, gemm_n=peaks.gemm_n,
                   dtype=peaks.dtype),
        ops=summary["ops"], share_sum=summary["share_sum"],
        layers=summary["per_layer"] if args.per_layer else summary["layers"], per_layer=summary["per_layer"],
        work={k: vars(v) for k, v in work.items()}, trace=trace,
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        minor_faults_last_warmup=faults, malloc=_malloc_setting(),
        command=" ".join(["python -m inl_kernels.profile"] + list(sys.argv[1:] if argv is None else argv)))
    if args.memory:
        report["memory_mib"] = {k: v / 2**20 for k, v in phase_peaks.items()}
        report["memory_note"] = ("torch.cuda.max_memory_allocated: tensors in the caching allocator"
                                 if device.type == "cuda" else
                                 "the profiler's CPU allocation events: tensors from PyTorch's CPU allocator "
                                 "(a C++ kernel's own scratch, Python objects and allocator caching not seen)")
    print(report_text(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None) -> int:
    # an entry point owns its process: freed memory is kept, as the CLI keeps it (unless
    # INL_KERNELS_KEEP_FREED_MEMORY=0), so the profile shows the step a run of ours takes
    try:
        from inl_kernels.cpu.memory import keep_unless_disabled
    except ImportError:
        pass
    else:
        keep_unless_disabled()
    profile_command(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
