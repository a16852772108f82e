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

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.usefixtures("each_cpu_path")]


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



def test_gradients_over_tiles_of_several_blocks():
    """The backward sums the parameter gradients per fixed tile of row blocks, the tile's first
    block writing its sums and the others adding to them (csrc/cpu/iterate.cpp, backward_block).
    Past 16 blocks a tile holds several: 1100 rows (35 blocks of 32 rows, 69 of 16 on AVX2) against
    the fp64 reference, and the same bits on one thread as on two."""
    (h, x, kw), (h64, x64, kw64) = case(n=1100, d=19, H=6, E=2, T=3, kappa=0.6, with_v=True)
    names = ("h", "x", "v") + GRAD_NAMES
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(1100, 19, generator=g, dtype=torch.float64) for _ in range(2)]
    weights += [torch.randn(1100, 3, generator=g, dtype=torch.float64) for _ in range(2)]

    def grads(backend, h, x, kw):
        args = dict(kw, h=h, x=x)
        leaves = {k: args[k].detach().clone().requires_grad_(True) for k in names}
        args.update(leaves)
        out, info = inl_iterate(args.pop("h"), args.pop("x"), **args, return_info=True, backend=backend)
        loss = sum((t.double() * w).sum() for t, w in zip((out, info.v, info.energy, info.distance), weights))
        loss.backward()
        return {k: t.grad for k, t in leaves.items()}

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = grads("cpu", h, x, kw)
        torch.set_num_threads(1)
        single = grads("cpu", h, x, kw)
    finally:
        torch.set_num_threads(threads)
    want = grads("reference", h64, x64, kw64)
    for k in names:
        assert torch.equal(got[k], single[k]), k
        scale = max(1.0, want[k].abs().max().item())
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-4 * scale, msg=k)

@pytest.mark.parametrize("name,index,T,kappa", NAN_CASES)
def test_nan_propagates_like_reference(name, index, T, kappa):
    """A NaN input gives NaN outputs and statistics exactly where the reference gives them: no
    clamp, max or relu inside the kernel may turn it into a number."""
    assert_nan_where_reference("cpu", *nan_case(name, index, T, kappa))


# (argument, scale, T, kappa): inputs near 1e20–1e30 overflow float32 inside the step; where the
# reference (in float32) gets Inf or NaN from it (0·inf once a sigmoid saturates to 0, inf − inf),
# the kernel must get the same, and the same finite values elsewhere
OVERFLOW_CASES = [("h", 1e20, 3, 0.7), ("x", 1e20, 1, None), ("x", 1e25, 3, 0.7), ("v", 1e30, 3, 0.7),
                  ("w_h", 1e20, 3, 0.7), ("b_o", 1e20, 3, 0.7), ("mu", 1e20, 3, 0.7), ("b_h", 1e20, 3, 0.7),
                  ("w_o", 1e25, 1, None), ("mod_scale", 1e30, 3, 0.7)]


@pytest.mark.parametrize("name,scale,T,kappa", OVERFLOW_CASES)
def test_overflow_gives_the_references_inf_and_nan(name, scale, T, kappa):
    h, x, kw = make_args(n=6, d=20, H=16, E=3, T=T, kappa=kappa, dtype=torch.float32)
    kw = dict(kw, h=h, x=x)
    kw[name] = kw[name] * scale
    h, x = kw.pop("h"), kw.pop("x")
    out, info = inl_iterate(h, x, **kw, return_info=True, backend="cpu")
    ref, rinfo = inl_iterate(h, x, **kw, return_info=True, backend="reference")
    assert not all(torch.isfinite(t).all() for t in (ref, rinfo.v, rinfo.energy)), "the case does not overflow"
    for what, a, b in (("x_T", out, ref), ("v", info.v, rinfo.v), ("energy", info.energy, rinfo.energy),
                       ("distance", info.distance, rinfo.distance)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), what
        assert torch.equal(torch.isinf(a) & (a > 0), torch.isinf(b) & (b > 0)), what
        assert torch.equal(torch.isinf(a) & (a < 0), torch.isinf(b) & (b < 0)), what
        finite = torch.isfinite(b)
        if finite.any():
            scale_b = b[finite].abs().max().item()
            assert (a[finite] - b[finite]).abs().max().item() <= 1e-4 * max(scale_b, 1e-30), what


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
    with pytest.raises(RuntimeError, match=r"num_iterations must be in \[1, "):
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


def test_early_exit_compaction_keeps_every_rows_bits():
    """With early exit, rows that converged leave the working set and the remaining ones are
    moved into fewer blocks between steps. Every row must still give the bits of the run without
    early exit (its state after the steps it ran, its statistics, then the frozen values) and of
    itself run alone, whichever rows shared its blocks."""
    n, T = 150, 9
    h, x, kw = converging_args(n=n, d=40, H=16, T=T, dtype=torch.float32)
    kw["kappa"] = 0.7  # dynamic alpha: each row's rms(x - mu) moves with it
    order = torch.randperm(n, generator=torch.Generator().manual_seed(4))  # mix fast and slow rows
    h, x = h[order].contiguous(), x[order].contiguous()
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                _, full = inl_iterate(h, x, **kw, return_trajectory=True, backend="cpu")
                out, info = inl_iterate(h, x, **kw, tol=CONVERGE_TOL, min_iterations=0, return_info=True,
                                        backend="cpu")
            steps = info.iterations.long()
            assert len(set(steps.tolist())) >= 4 and (steps == T).any() and (steps < T).sum() > n // 2
            rows = torch.arange(n)
            assert torch.equal(out, full.trajectory_x[rows, steps])
            assert torch.equal(info.v, full.trajectory_v[rows, steps])
            ran = torch.arange(T)[None, :] < steps[:, None]
            last = (steps - 1)[:, None].expand(n, T)
            for got, want in ((info.energy, full.energy), (info.distance, full.distance)):
                assert torch.equal(got[ran], want[ran])
                assert torch.equal(got[~ran], want.gather(1, last)[~ran])
            for r in range(0, n, 13):
                with torch.no_grad():
                    alone, alone_info = inl_iterate(h[r:r + 1], x[r:r + 1], **kw, tol=CONVERGE_TOL, min_iterations=0,
                                                    return_info=True, backend="cpu")
                assert torch.equal(alone[0], out[r]) and torch.equal(alone_info.energy[0], info.energy[r])
                assert alone_info.iterations.item() == info.iterations[r].item()
    finally:
        torch.set_num_threads(threads)


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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
def test_packed_controller_is_cached_per_parameter_version(optimizer):
    """The controller packed for the kernel (and, without gradients, the folded biases, modulation
    and excitation table) is made once and reused while the parameters keep their versions (a
    decode step repacks nothing); an optimizer step changes them in place, and the next call packs
    again and computes with the new values. Also after torch's fused AdamW, which writes the
    parameters without bumping their versions (the cache counts optimizer steps too)."""
    from inl_kernels.cpu.iterate import packed_controller
    from inl_kernels.modules import Controller, IntegratorLayer

    torch.manual_seed(0)
    controller = Controller(24, 8)
    layers = [IntegratorLayer(24, controller, num_iterations=3, backend="cpu") for _ in range(2)]
    with torch.no_grad():
        layers[1].mod_scale.add_(0.5)  # two layers share the controller, each with its own modulation
    h, x = torch.randn(5, 24), torch.randn(5, 24)

    def packs():
        w = controller.weights()
        return [packed_controller(w["w_h"], w["w_x"], w["w_v"], w["w_o"],
                                  torch.cat((layer.mod_scale, layer.mod_bias)).detach(), backward=False)
                for layer in layers]

    with torch.no_grad():
        before = [layer(h, x) for layer in layers]
    first = packs()
    assert first[0] is not first[1]
    assert all(a is b for a, b in zip(first, packs()))  # reused, one per layer
    layers[0].train()
    out = layers[0](h, x)
    out.square().sum().backward()
    # every parameter moves: the controller, and layer 0's modulation, mu, excitation (gamma, phi)
    params = list(dict.fromkeys(list(controller.parameters()) + list(layers[0].parameters())))
    assert all(p.grad is not None for p in params)
    if optimizer == "sgd":
        torch.optim.SGD(params, lr=0.5).step()
    else:
        torch.optim.AdamW(params, lr=0.1, fused=True).step()
    after = packs()
    assert all(a is not b for a, b in zip(first, after))  # every layer sees the new w_o
    for layer, old in zip(layers, before):
        layer.eval()
        with torch.no_grad():
            got = layer(h, x)
        kw = dict(controller.weights(), mod_scale=layer.mod_scale, mod_bias=layer.mod_bias, mu=layer.equilibrium(),
                  exc_index=layer.exc_index, gamma=layer.gamma, phi=layer.phi, amplitude=layer.excitation_amplitude,
                  dt=layer.dt, kappa=layer.kappa, num_iterations=3)
        with torch.no_grad():
            want = inl_iterate(h.double(), x.double(), **cast(kw, torch.float64), backend="reference")
        close(got, want, 1e-5)
        assert not torch.equal(got, old)



def test_cached_packs_follow_new_storage_and_stay_off_the_tensors():
    """module.to(bf16).to(fp32) gives the controller new storage (the Parameter keeps its id and
    version, and the allocator often hands back the old address): the next call must compute with
    the rounded weights, exactly as with an empty cache, in every trial. The cache keeps nothing on
    the tensors: a layer that ran pickles, and its parameters swap (swap_tensors)."""
    import pickle

    from inl_kernels.cpu import iterate as cpu_iterate
    from inl_kernels.modules import Controller, IntegratorLayer

    for trial in range(12):
        d, H = (24, 64, 96)[trial % 3], (8, 32, 24)[trial % 3]
        torch.manual_seed(trial)
        layer = IntegratorLayer(d, Controller(d, H), num_iterations=3, backend="cpu").eval()
        h, x = torch.randn(5, d), torch.randn(5, d)
        with torch.no_grad():
            layer(h, x)  # packs the fp32 controller
            layer.controller.out.to(torch.bfloat16).float()  # w_o rounded to bf16, on new storage
            got = layer(h, x)
            cpu_iterate._cache.clear()
            fresh = layer(h, x)
        assert torch.equal(got, fresh), trial
    assert not any(vars(p) for p in layer.parameters())
    clone = pickle.loads(pickle.dumps(layer))
    with torch.no_grad():
        assert torch.equal(clone(h, x), layer(h, x))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.double()  # swap_tensors refuses a tensor that has a Python weakref
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert layer.controller.out.weight.dtype == torch.float64


@pytest.mark.parametrize("update", ["adamw", "in place"])
def test_training_keeps_one_cached_pack_per_layer(update):
    """Every training step changes mod_scale, part of a pack's key: the packs of past steps can
    never be hit again and must go when the next is made (the LRU bound kept 256 of them, ~470
    MiB for `small`), whether the step is a torch.optim one or an in-place update (a version)."""
    from inl_kernels.cpu import iterate as cpu_iterate
    from inl_kernels.modules import Controller, IntegratorLayer

    torch.manual_seed(0)
    controller = Controller(16, 8)
    layers = [IntegratorLayer(16, controller, num_iterations=2, backend="cpu") for _ in range(3)]
    params = list(dict.fromkeys(p for layer in layers for p in layer.parameters()))
    opt = torch.optim.AdamW(params, lr=1e-2)
    cpu_iterate._cache.clear()
    h, x = torch.randn(4, 16), torch.randn(4, 16)
    for _ in range(6):
        out = x
        for layer in layers:
            out = layer(h, out)
        out.square().mean().backward()
        if update == "adamw":
            opt.step()
        else:
            with torch.no_grad():
                for p in params:
                    p.sub_(0.01 * p.grad)
        opt.zero_grad(set_to_none=True)
    assert len(cpu_iterate._cache) <= len(layers)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_decode_rows_split_over_threads_give_the_bits_of_a_block(threads):
    """Up to four rows run row by row with each step's products split by vectors of outputs over
    up to four threads (csrc/cpu/iterate.cpp, forward_small, on the weights' wide layout) and the
    update on one: whatever the thread count, every row gives the bits the block path gives it in
    a large batch (early exit, dynamic alpha, an initial velocity, trajectories; H = 37 and d = 45
    leave partial vectors and panels, and four threads some without one)."""
    n, T = 40, 7
    h, x, kw = converging_args(n=n, d=45, H=37, T=T, dtype=torch.float32)
    kw["kappa"] = 0.7
    kw["v"] = torch.randn(n, 45, generator=torch.Generator().manual_seed(6)) * 0.01
    before = torch.get_num_threads()

    def run(rows, count):
        torch.set_num_threads(count)  # each call: the ops' thread governor takes a count set just before
        with torch.no_grad():
            return inl_iterate(h[rows], x[rows], **dict(kw, v=kw["v"][rows]), tol=CONVERGE_TOL, min_iterations=1,
                               return_trajectory=True, backend="cpu")
    try:
        full, full_info = run(slice(None), 2)
        for rows in ([3], [0, 9, 17, 33], [5, 6, 7]):
            out, info = run(rows, threads)
            assert torch.equal(out, full[rows])
            for name in ("v", "iterations", "energy", "distance", "trajectory_x", "trajectory_v"):
                assert torch.equal(getattr(info, name), getattr(full_info, name)[rows]), name
    finally:
        torch.set_num_threads(before)
    assert len(set(full_info.iterations.tolist())) > 1
