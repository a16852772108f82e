"""The compiled CPU iterate (csrc/cpu/iterate.cpp) against the eager reference run in fp64 on the
same (rounded) inputs: forward, every gradient, early exit, trajectories, low precision, and the
invariants of the fused kernel (determinism across runs and thread counts, batch invariance)."""
import importlib

import pytest
import torch

from inl_kernels import inl_iterate
from inl_kernels._dispatch import resolve
from inl_kernels.cpu import unavailable_reason
from inl_kernels.common import iterate_bundle
from tests.iterate_cases import (call_backend, CONVERGE_TOL, GRAD_NAMES, NAN_CASES, assert_nan_where_reference, cast,
                                 converging_args, make_args, nan_case)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def case(dtype=torch.float32, **shape):
    """Arguments rounded to `dtype`, and the same values in fp64 for the oracle."""
    h, x, kw = make_args(dtype=torch.float64, **shape)
    h, x, kw = h.to(dtype), x.to(dtype), cast(kw, dtype)
    return (h, x, kw), (h.double(), x.double(), cast(kw, torch.float64))


def close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# (n, d, H, E, T, kappa, with_v): d and H off the vector and micro-kernel widths, a single row,
# a single step, no excited dim, no dynamic alpha, no initial velocity, several row blocks
SHAPES = [
    (6, 20, 16, 3, 4, 0.7, True),
    (1, 1, 3, 1, 1, None, False),
    (13, 37, 5, 0, 3, 0.5, True),
    (45, 64, 64, 6, 5, None, True),
    (33, 50, 12, 1, 2, 0.9, False),
]


@pytest.mark.parametrize("n,d,H,E,T,kappa,with_v", SHAPES)
def test_forward_matches_reference(n, d, H, E, T, kappa, with_v):
    (h, x, kw), (h64, x64, kw64) = case(n=n, d=d, H=H, E=E, T=T, kappa=kappa, with_v=with_v)
    out, info = inl_iterate(h, x, **kw, return_info=True, backend="cpu")
    ref, rinfo = inl_iterate(h64, x64, **kw64, return_info=True, backend="reference")
    assert out.dtype == torch.float32 and info.v.dtype == torch.float32
    assert info.energy.dtype == torch.float32 and info.iterations.dtype == torch.int32
    for a, b in ((out, ref), (info.v, rinfo.v), (info.energy, rinfo.energy), (info.distance, rinfo.distance)):
        close(a, b, 1e-5)
    assert info.iterations.tolist() == [T] * n


@pytest.mark.parametrize("n,d,H,E,T,kappa,with_v", SHAPES)
def test_gradients_match_reference(n, d, H, E, T, kappa, with_v):
    """Every input's gradient through x_T, v_T, energy and distance, against fp64 autograd."""
    (h, x, kw), (h64, x64, kw64) = case(n=n, d=d, H=H, E=E, T=T, kappa=kappa, with_v=with_v)
    names = ("h", "x") + (("v",) if with_v else ()) + GRAD_NAMES
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
    weights += [torch.randn(n, T, generator=g, dtype=torch.float64) for _ in range(2)]

    def grads(backend, h, x, kw):
        args = dict(kw, h=h, x=x)
        leaves = {k: args[k].detach().clone().requires_grad_(True) for k in names}
        args.update(leaves)
        out, info = inl_iterate(args.pop("h"), args.pop("x"), **args, return_info=True, backend=backend)
        loss = sum((t.double() * w).sum() for t, w in zip((out, info.v, info.energy, info.distance), weights))
        loss.backward()
        return {k: t.grad for k, t in leaves.items()}

    got, want = grads("cpu", h, x, kw), grads("reference", h64, x64, kw64)
    for k in names:
        if want[k] is None:  # gamma/phi with no excited dim
            assert got[k] is None or not got[k].any(), k
            continue
        assert got[k].dtype == kw.get(k, h).dtype, k
        scale = max(1.0, want[k].abs().max().item())
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-4 * scale, msg=k)


@pytest.mark.parametrize("name,index,T,kappa", NAN_CASES)
def test_nan_propagates_like_reference(name, index, T, kappa):
    """A NaN input gives NaN outputs and statistics exactly where the reference gives them: no
    clamp, max or relu inside the kernel may turn it into a number."""
    assert_nan_where_reference("cpu", *nan_case(name, index, T, kappa))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_propagates_in_low_precision(dtype):
    assert_nan_where_reference("cpu", *nan_case("h", (4, 0), 2, 0.7, dtype=dtype), precision=3e-2)


def test_nan_row_never_converges():
    """A NaN row's step norm compares false with tol, in the kernel as in the reference: it runs
    all T steps while the other rows still stop early."""
    h, x, kw = converging_args(dtype=torch.float32)
    h[5, 2] = float("nan")
    _, rinfo = assert_nan_where_reference("cpu", h, x, kw, tol=CONVERGE_TOL, min_iterations=0)
    assert rinfo.iterations[5] == kw["num_iterations"] and len(set(rinfo.iterations.tolist())) >= 3


def test_empty_batch_and_zero_sizes():
    """inl_iterate sends N = 0 to the reference, but the extension itself must not divide by it:
    empty outputs and zero parameter gradients. A zero T is a named error from the extension."""
    cpu_iterate = importlib.import_module("inl_kernels.cpu.iterate").iterate
    (h, x, kw), (h64, x64, kw64) = case(n=0, d=8, H=4, E=1, T=2)
    leaves = {k: kw[k].clone().requires_grad_(True) for k in ("w_o", "mu")}
    out, info = call_backend(cpu_iterate, h, x, **dict(kw, **leaves))
    assert out.shape == (0, 8) and info.energy.shape == (0, 2) and info.iterations.shape == (0,)
    (out.sum() + info.energy.sum()).backward()
    for k, leaf in leaves.items():
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), k
    with torch.no_grad():
        out, info = call_backend(cpu_iterate, h, x, **kw, tol=1e-3)
    assert out.shape == (0, 8) and info.iterations.shape == (0,)
    with pytest.raises(RuntimeError, match="num_iterations must be at least 1"):
        call_backend(cpu_iterate, h, x, **dict(kw, num_iterations=0))


def test_early_exit_counts_and_frozen_rows():
    h, x, kw = converging_args(dtype=torch.float32)
    kw64 = cast(kw, torch.float64)
    _, full = inl_iterate(h.double(), x.double(), **kw64, return_trajectory=True, backend="reference")
    steps = (full.trajectory_x[:, 1:] - full.trajectory_x[:, :-1]).norm(dim=-1)
    assert ((steps - CONVERGE_TOL).abs() / CONVERGE_TOL).min() > 1e-3, "a row sits on the threshold"
    for min_iterations in (0, 3):
        out, info = inl_iterate(h, x, **kw, tol=CONVERGE_TOL, min_iterations=min_iterations, return_trajectory=True,
                                backend="cpu")
        ref, rinfo = inl_iterate(h.double(), x.double(), **kw64, tol=CONVERGE_TOL, min_iterations=min_iterations,
                                 return_trajectory=True, backend="reference")
        assert info.iterations.tolist() == rinfo.iterations.tolist()
        assert len(set(info.iterations.tolist())) >= 3
        for a, b in ((out, ref), (info.v, rinfo.v), (info.energy, rinfo.energy), (info.distance, rinfo.distance),
                     (info.trajectory_x, rinfo.trajectory_x), (info.trajectory_v, rinfo.trajectory_v)):
            close(a, b, 1e-5)
        T = kw["num_iterations"]
        for n, count in enumerate(info.iterations.tolist()):  # a frozen row repeats itself exactly
            assert torch.equal(out[n], info.trajectory_x[n, count])
            for t in range(count, T):
                assert torch.equal(info.trajectory_x[n, t + 1], info.trajectory_x[n, count])
                assert torch.equal(info.trajectory_v[n, t + 1], info.trajectory_v[n, count])
                assert info.energy[n, t] == info.energy[n, count - 1]
                assert info.distance[n, t] == info.distance[n, count - 1]


def test_trajectory_matches_reference():
    (h, x, kw), (h64, x64, kw64) = case(n=5, d=19, H=7, E=2, T=3)
    _, info = inl_iterate(h, x, **kw, return_trajectory=True, backend="cpu")
    _, rinfo = inl_iterate(h64, x64, **kw64, return_trajectory=True, backend="reference")
    assert info.trajectory_x.shape == (5, 4, 19)
    assert torch.equal(info.trajectory_x[:, 0], x) and torch.equal(info.trajectory_v[:, 0], kw["v"])
    close(info.trajectory_x, rinfo.trajectory_x, 1e-5)
    close(info.trajectory_v, rinfo.trajectory_v, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision_inputs(dtype, tol):
    """Inputs and outputs in bf16/fp16, state in fp32: only the final rounding is lost."""
    (h, x, kw), (h64, x64, kw64) = case(dtype=dtype, n=40, d=24, H=8, E=2, T=3)
    out, info = inl_iterate(h, x, **kw, return_info=True, backend="cpu")
    ref, rinfo = inl_iterate(h64, x64, **kw64, return_info=True, backend="reference")
    assert out.dtype == dtype and info.v.dtype == dtype and info.energy.dtype == torch.float32
    close(out, ref, tol)
    close(info.v, rinfo.v, tol)
    close(info.energy, rinfo.energy, 1e-5)  # fp32 statistics of the fp32 state


def test_fp32_weights_under_bf16_activations_and_their_gradients():
    (h, x, kw), _ = case(dtype=torch.bfloat16, n=9, d=16, H=8, E=2, T=2)
    kw32 = {k: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and k != "v" else t)
            for k, t in kw.items()}
    leaves = {k: kw32[k].clone().requires_grad_(True) for k in ("w_o", "mu")}
    out = inl_iterate(h, x, **dict(kw32, **leaves), backend="cpu")
    out.float().sum().backward()
    kw64 = cast(kw32, torch.float64)
    ref_leaves = {k: kw64[k].clone().requires_grad_(True) for k in leaves}
    ref = inl_iterate(h.double(), x.double(), **dict(kw64, **ref_leaves), backend="reference")
    ref.sum().backward()
    assert out.dtype == torch.bfloat16
    close(out, ref, 2e-2)
    for k in leaves:
        assert leaves[k].grad.dtype == torch.float32
        close(leaves[k].grad, ref_leaves[k].grad, 1e-4 * max(1.0, ref_leaves[k].grad.abs().max().item()))


def run_all(h, x, kw, tol=None):
    """Forward outputs and every gradient, as one list of tensors."""
    leaves = {k: kw[k].clone().requires_grad_(True) for k in GRAD_NAMES}
    hh, xx = h.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, info = inl_iterate(hh, xx, **dict(kw, **leaves), return_info=True, backend="cpu")
    (out.sum() + info.v.square().sum() + info.energy.sum() + info.distance.sum()).backward()
    with torch.no_grad():
        fwd = inl_iterate(h, x, **kw, tol=tol, return_info=True, backend="cpu")
    return [out, info.v, info.energy, hh.grad, xx.grad, *(leaves[k].grad for k in GRAD_NAMES),
            fwd[0], fwd[1].iterations, fwd[1].energy]


def test_deterministic_across_runs_and_thread_counts():
    h, x, kw = converging_args(n=100, d=40, H=16, T=6, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run_all(h, x, kw, CONVERGE_TOL), run_all(h, x, kw, CONVERGE_TOL)
        torch.set_num_threads(1)
        single = run_all(h, x, kw, CONVERGE_TOL)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_batch_invariance():
    """A row's result and iteration count do not depend on the rest of the batch, bit for bit."""
    h, x, kw = converging_args(n=70, d=30, H=16, T=8, dtype=torch.float32)
    kw["v"] = torch.randn(70, 30, generator=torch.Generator().manual_seed(3)) * 0.01

    def run(rows):
        return inl_iterate(h[rows], x[rows], **dict(kw, v=kw["v"][rows]), tol=CONVERGE_TOL, return_info=True,
                           backend="cpu")

    full, full_info = run(slice(None))
    for rows in ([0], [5, 69], list(range(3, 70, 4)), list(range(33, 70))):
        sub, sub_info = run(rows)
        assert torch.equal(sub, full[rows])
        assert torch.equal(sub_info.v, full_info.v[rows]) and torch.equal(sub_info.energy, full_info.energy[rows])
        assert sub_info.iterations.tolist() == full_info.iterations[rows].tolist()


def test_auto_dispatch_and_fallbacks():
    (h, x, kw), _ = case(n=3, d=8, H=4, E=1, T=2)
    cpu_iterate = importlib.import_module("inl_kernels.cpu.iterate")
    reference_iterate = importlib.import_module("inl_kernels.reference.iterate")
    args = dict(kw, amplitude=kw["amplitude"], return_trajectory=False)
    assert resolve("iterate", "auto", "cpu", *iterate_bundle(h, x, **args)) is cpu_iterate.iterate
    assert resolve("iterate", "auto", "cpu", *iterate_bundle(h.double(), x.double(), **cast(args, torch.float64))) \
        is reference_iterate.iterate
    x_grad = x.clone().requires_grad_(True)
    traj = dict(args, return_trajectory=True)
    assert resolve("iterate", "auto", "cpu", *iterate_bundle(h, x_grad, **traj)) is reference_iterate.iterate
    with pytest.raises(ValueError, match="cpu.*trajectory"):
        inl_iterate(h, x_grad, **kw, return_trajectory=True, backend="cpu")
    with pytest.raises(ValueError, match="float64"):
        inl_iterate(h.double(), x.double(), **cast(kw, torch.float64), backend="cpu")
    # the trajectory with gradients still works through auto (on the reference)
    _, info = inl_iterate(h, x_grad, **kw, return_trajectory=True)
    info.trajectory_x.sum().backward()
    assert x_grad.grad is not None
