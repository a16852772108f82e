"""What every backend shares: the iterate's argument bundle and result, the compute dtype, the
folded parameters the fused kernels take, dtype names. No backend imports another backend; they
all import this module.

The iterate has 22 arguments. `inl_iterate` validates them once and packs them here: the
tensors of the controller and the dynamics into `IterateParams`, the scalars into the frozen
`IterateSettings`. Every backend's `iterate(h, x, v, params, settings)` and
`supports(h, x, v, params, settings)` take exactly these.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import NamedTuple, Optional

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype for an input dtype: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class IterateInfo(NamedTuple):
    """What `inl_iterate(..., return_info=True)` returns beside x_T."""

    v: torch.Tensor  # [N, d] final velocity, dtype of x
    iterations: torch.Tensor  # [N] int32: steps each row ran (T without early exit)
    energy: torch.Tensor  # [N, T] mean_j v² after each step (compute dtype)
    distance: torch.Tensor  # [N, T] mean_j |x - mu| after each step (compute dtype)
    trajectory_x: Optional[torch.Tensor] = None  # [N, T+1, d], initial state first
    trajectory_v: Optional[torch.Tensor] = None


class IterateParams(NamedTuple):
    """The iterate's tensors besides h, x, v: the controller (nn.Linear layout), the per-layer
    modulation, the equilibrium and the sparse excitation (SPEC §2)."""

    w_h: torch.Tensor  # [H, d]
    b_h: torch.Tensor  # [H]
    w_x: torch.Tensor  # [H, d]
    b_x: torch.Tensor  # [H]
    w_v: torch.Tensor  # [H, d]
    b_v: torch.Tensor  # [H]
    w_o: torch.Tensor  # [4d, H]
    b_o: torch.Tensor  # [4d]
    mod_scale: torch.Tensor  # [4]
    mod_bias: torch.Tensor  # [4]
    mu: torch.Tensor  # [d]
    exc_index: torch.Tensor  # [E] int, sorted and unique
    gamma: torch.Tensor  # [E]
    phi: torch.Tensor  # [E]

    @property
    def hidden(self) -> int:
        return self.w_h.shape[0]


@dataclasses.dataclass(frozen=True)
class IterateSettings:
    """The iterate's scalars (SPEC §2). `tol` None: no early exit; `kappa` None: no dynamic alpha."""

    amplitude: float
    dt: float
    kappa: Optional[float]
    num_iterations: int
    tol: Optional[float] = None
    min_iterations: int = 3
    return_trajectory: bool = False


# the largest step count any backend takes: a count is an int32 in every kernel, and a larger one
# is a typo (2**33 steps would run for days), so it is refused before anything launches
MAX_ITERATIONS = 2**20

# the names of inl_iterate's arguments, in the order of IterateParams and IterateSettings
PARAM_NAMES = IterateParams._fields
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(IterateSettings))


def iterate_bundle(h, x, v=None, **kwargs):
    """(h, x, v, IterateParams, IterateSettings) from inl_iterate's keyword arguments, without
    checking them (`inl_iterate` checks first; tests and benchmarks that call a backend directly
    use this to build its arguments)."""
    params = IterateParams(**{k: kwargs.pop(k) for k in PARAM_NAMES})
    settings = IterateSettings(**kwargs)
    return h, x, v, params, settings


def needs_grad(*values) -> bool:
    """True when autograd will want gradients of any of these values (tensors, or tuples of
    them such as IterateParams), with grad mode on. It switches early exit off in every backend."""
    if not torch.is_grad_enabled():
        return False
    for t in values:
        if isinstance(t, tuple):
            if needs_grad(*t):
                return True
        elif isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(values) -> bool:
    for t in values:
        if isinstance(t, tuple):
            if not _plain(t):
                return False
        elif isinstance(t, torch.Tensor) and (type(t) not in _PLAIN or t.requires_grad and torch.is_grad_enabled()):
            return False
    return True


class _Direct(threading.local):
    established = False


_direct = _Direct()


@contextlib.contextmanager
def direct_calls():
    """Within it, `eager_direct` answers True without checking: for a caller that has checked
    once that a whole sequence of calls is plain eager inference (eager_direct on every tensor
    they will see, all made inside the block on this thread) and then makes many small calls, as
    the lean decode step of inl_llm does for each token. Everything the calls run is what they
    run without it; only the per-call check is skipped."""
    before = _direct.established
    _direct.established = True
    try:
        yield
    finally:
        _direct.established = before


def eager_direct(*values) -> bool:
    """Whether a backend may call its compiled kernel directly instead of through its registered
    torch.library op: plain eager inference. That is no gradient wanted (reverse or forward
    mode), no torch.compile tracing, no torch.jit tracing (the tracer records only ops), no
    profiler (its trace names the op), no dispatch or function mode (FlopCounterMode,
    FakeTensorMode, ...), no functorch transform, and plain tensors only (no subclass such as
    DTensor; values may be tuples of tensors, e.g. IterateParams). The op and the direct call run
    the same function on the same arguments, so the bits are the same; the direct call skips
    the op's dispatch (~20 µs a call on a CPU), which is most of what a decode step of a small
    model spends outside its matmuls. Inside `direct_calls()` the caller has checked it already."""
    if _direct.established:
        return True
    return (not torch.compiler.is_compiling() and not torch._C._autograd._profiler_enabled()
            and torch._C._get_tracing_state() is None and torch.autograd.forward_ad._current_level < 0
            and not torch._C._len_torch_dispatch_stack() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None and _plain(values))


def excitation_table(exc_index, gamma, phi, amplitude, num_iterations, d, dtype=None):
    """[T, d] table of the sparse excitation: row t holds amplitude·sin(gamma_k·t + phi_k) at
    column exc_index[k] and zeros elsewhere. Differentiable in gamma and phi; fused kernels add
    one row of it per step instead of evaluating sines per element."""
    dtype = dtype or compute_dtype(gamma.dtype)
    steps = torch.arange(num_iterations, device=gamma.device, dtype=dtype)
    values = amplitude * torch.sin(steps[:, None] * gamma.to(dtype)[None, :] + phi.to(dtype)[None, :])
    table = torch.zeros(num_iterations, d, device=gamma.device, dtype=dtype)
    return table.index_copy(1, exc_index.long(), values)


class FoldedParams(NamedTuple):
    """What the fused kernels take instead of the small raw parameters."""

    table: Optional[torch.Tensor]  # [T, d] excitation table, None without excited dims
    bias: torch.Tensor  # [H] b_h + b_x + b_v
    mod: torch.Tensor  # [8] (mod_scale, mod_bias)


def fold_parameters(params: IterateParams, settings: IterateSettings, d: int, dtype: torch.dtype) -> FoldedParams:
    """The excitation table, the combined bias and the 8 modulation scalars in `dtype`, built in
    torch so that autograd carries their gradients back to b_h, b_x, b_v, mod_scale, mod_bias,
    gamma and phi."""
    p = params
    table = (excitation_table(p.exc_index, p.gamma, p.phi, settings.amplitude, settings.num_iterations, d,
                              dtype=dtype) if p.exc_index.numel() > 0 else None)
    bias = p.b_h.to(dtype) + p.b_x.to(dtype) + p.b_v.to(dtype)
    return FoldedParams(table, bias, torch.cat((p.mod_scale.to(dtype), p.mod_bias.to(dtype))))


__all__ = ["IterateInfo", "IterateParams", "IterateSettings", "FoldedParams", "MAX_ITERATIONS", "compute_dtype",
           "dtype_name", "excitation_table", "fold_parameters", "iterate_bundle", "needs_grad"]


def pin_inductor_vec_isa() -> Optional[str]:
    """Keys torch.compile's CPU code on the vector instruction set it is generated for.

    Inductor's on-disk FX graph cache (torch 2.13) does not include the vector ISA it generates
    C++ for (AVX-512, AVX2, none): a graph cached by a process that picked one ISA is loaded by a
    process that picks another, and its C++ source (loops that step by the first ISA's vector
    length) is compiled with the second's flags. Measured here: a softmax-and-sum compiled under
    AVX-512 and rerun with ATEN_CPU_CAPABILITY=avx2 returned half the right values, the reverse
    twice them, and the compiled decode step of `inl_llm` crashed the process (SIGSEGV). Two
    machines that share a cache directory (a home on a shared filesystem, a container image
    with a warm cache) hit the same when one has AVX-512 and the other AVX2.

    This sets `torch._inductor.config.cpp.simdlen` (part of the cache key) to the bit width of
    the ISA inductor picks now — the best the CPU has, or ATEN_CPU_CAPABILITY's — which makes it
    generate exactly what it would have, under a key of its own. Left alone when the caller set
    simdlen. Returns the picked ISA's name ("none": scalar code), or None where inductor cannot
    be imported. AVX-512 machines with and without AMX still share a key (both 512 bits); their
    code differs only in max-autotune's bf16/int8 GEMM templates.

    `inl_llm.generate(compile=True)`, the benchmarks and the test suite call it; call it before
    your own torch.compile on a CPU where caches may be shared between machines."""
    try:
        from torch._inductor import config
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except Exception:  # a torch build without inductor
        return None
    isa = pick_vec_isa()
    if config.cpp.simdlen is None:
        config.cpp.simdlen = isa.bit_width() if isa else 0
    return str(isa) if isa else "none"
