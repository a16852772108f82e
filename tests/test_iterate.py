"""The eager reference of the iterate held to independent values: a scalar fp64 hand
calculation, a manual early-exit loop, invariants and gradcheck. Also the public dispatch."""
import math

import pytest
import torch

import inl_kernels
from inl_kernels import inl_iterate
from inl_kernels.common import excitation_table
from tests.iterate_cases import CONVERGE_TOL, GRAD_NAMES, converging_args, make_args


def hand_iterate(h, x, v, kw):
    """SPEC §2 written with Python floats, one element at a time: no torch math at all."""
    L = lambda t: t.tolist()  # noqa: E731
    h, x, v = L(h), L(x), L(v)
    w_h, b_h, w_x, b_x, w_v, b_v = (L(kw[k]) for k in ("w_h", "b_h", "w_x", "b_x", "w_v", "b_v"))
    w_o, b_o, ms, mb, mu = L(kw["w_o"]), L(kw["b_o"]), L(kw["mod_scale"]), L(kw["mod_bias"]), L(kw["mu"])
    idx, gam, ph = L(kw["exc_index"]), L(kw["gamma"]), L(kw["phi"])
    A, dt, kappa = kw["amplitude"], kw["dt"], kw["kappa"]
    H, d = len(w_h), len(x[0])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    xs_out, vs_out = [], []
    for xr, vr, hr in zip(x, v, h):
        xr, vr = list(xr), list(vr)
        for t in range(kw["num_iterations"]):
            c = []
            for k in range(H):
                s = b_h[k] + b_x[k] + b_v[k]
                for j in range(d):
                    s += hr[j] * w_h[k][j] + xr[j] * w_x[k][j] + vr[j] * w_v[k][j]
                c.append(max(s, 0.0))
            o = [b_o[i] + sum(c[k] * w_o[i][k] for k in range(H)) for i in range(4 * d)]
            err = [xr[j] - mu[j] for j in range(d)]
            rms = math.sqrt(sum(e * e for e in err) / d)
            nx, nv = [], []
            for j in range(d):
                alpha = sig(ms[0] * o[j] + mb[0])
                if kappa is not None:
                    alpha *= 1 - math.exp(-kappa * rms)
                beta = math.log1p(math.exp(ms[1] * o[d + j] + mb[1]))
                gate = sig(ms[2] * o[2 * d + j] + mb[2])
                vc = ms[3] * o[3 * d + j] + mb[3]
                exc = sum(A * math.sin(gam[k] * t + ph[k]) for k in range(len(idx)) if idx[k] == j)
                vn = alpha * vr[j] + (1 - alpha) * vc - beta * err[j] + exc
                nv.append(vn)
                nx.append(xr[j] + dt * gate * vn)
            xr, vr = nx, nv
        xs_out.append(xr)
        vs_out.append(vr)
    return torch.tensor(xs_out, dtype=torch.float64), torch.tensor(vs_out, dtype=torch.float64)


@pytest.mark.parametrize("kappa", [0.8, None])
@pytest.mark.parametrize("T", [1, 2])
def test_reference_matches_hand_calculation(kappa, T):
    h, x, kw = make_args(n=2, d=3, H=2, E=1, T=T, kappa=kappa)
    x_out, info = inl_iterate(h, x, **kw, return_info=True, backend="reference")
    hx, hv = hand_iterate(h, x, kw["v"], kw)
    torch.testing.assert_close(x_out, hx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(info.v, hv, rtol=1e-12, atol=1e-12)
    assert info.iterations.tolist() == [T, T]


def test_statistics_and_trajectory():
    h, x, kw = make_args(n=3, d=7, H=4, E=2, T=3)
    x_out, info = inl_iterate(h, x, **kw, return_trajectory=True, backend="reference")
    assert info.trajectory_x.shape == (3, 4, 7)
    torch.testing.assert_close(info.trajectory_x[:, 0], x, rtol=0, atol=0)
    torch.testing.assert_close(info.trajectory_v[:, 0], kw["v"], rtol=0, atol=0)
    torch.testing.assert_close(info.trajectory_x[:, -1], x_out, rtol=0, atol=0)
    for t in range(3):
        # each step's statistics are those of the state after that step, from a T = t+1 run
        kw_t = dict(kw, num_iterations=t + 1)
        xt, it = inl_iterate(h, x, **kw_t, return_info=True, backend="reference")
        torch.testing.assert_close(info.trajectory_x[:, t + 1], xt)
        torch.testing.assert_close(info.energy[:, t], it.v.pow(2).mean(-1))
        torch.testing.assert_close(info.distance[:, t], (xt - kw["mu"]).abs().mean(-1))


def test_excitation_only_touches_excited_dims():
    h, x, kw = make_args(n=2, d=9, H=4, E=2, T=1)
    with_exc = inl_iterate(h, x, **kw, return_info=True)[1].v
    without = inl_iterate(h, x, **dict(kw, amplitude=0.0), return_info=True)[1].v
    diff = with_exc - without
    idx = kw["exc_index"]
    expected = kw["amplitude"] * torch.sin(kw["phi"])  # t = 0
    torch.testing.assert_close(diff[:, idx], expected.expand(2, -1))
    mask = torch.ones(9, dtype=torch.bool)
    mask[idx] = False
    assert diff[:, mask].abs().max() == 0
    table = excitation_table(idx, kw["gamma"], kw["phi"], kw["amplitude"], 3, 9)
    for t in range(3):
        torch.testing.assert_close(table[t, idx], kw["amplitude"] * torch.sin(kw["gamma"] * t + kw["phi"]))
    assert table[:, mask].abs().max() == 0


def manual_early_exit(h, x, kw, tol, min_iterations):
    """Expected counts and states from the full trajectory, one row at a time."""
    _, full = inl_iterate(h, x, **kw, return_trajectory=True, backend="reference")
    T = kw["num_iterations"]
    counts, states = [], []
    for n in range(x.shape[0]):
        count = T
        for t in range(T):
            step = (full.trajectory_x[n, t + 1] - full.trajectory_x[n, t]).norm()
            if t + 1 >= min_iterations and step < tol:
                count = t + 1
                break
        counts.append(count)
        states.append(full.trajectory_x[n, count])
    return counts, torch.stack(states)


@pytest.mark.parametrize("min_iterations", [0, 3])
def test_early_exit_matches_manual_loop(min_iterations):
    h, x, kw = converging_args()
    tol = CONVERGE_TOL
    x_out, info = inl_iterate(h, x, **kw, tol=tol, min_iterations=min_iterations, return_trajectory=True)
    counts, states = manual_early_exit(h, x, kw, tol, min_iterations)
    assert info.iterations.tolist() == counts
    assert len(set(counts)) >= 3, "the case should make rows stop at different steps"
    torch.testing.assert_close(x_out, states, rtol=0, atol=0)
    for n, c in enumerate(counts):  # a frozen row never changes again, statistics repeat
        for t in range(c, kw["num_iterations"]):
            assert torch.equal(info.trajectory_x[n, t + 1], info.trajectory_x[n, c])
            assert torch.equal(info.trajectory_v[n, t + 1], info.trajectory_v[n, c])
            assert info.energy[n, t] == info.energy[n, c - 1]
            assert info.distance[n, t] == info.distance[n, c - 1]


def test_tol_is_ignored_when_grad_is_needed():
    h, x, kw = converging_args()
    plain = inl_iterate(h, x, **kw)
    h.requires_grad_(True)
    out, info = inl_iterate(h, x, **kw, tol=CONVERGE_TOL, min_iterations=0, return_info=True)
    assert info.iterations.tolist() == [kw["num_iterations"]] * x.shape[0]
    torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)
    with torch.no_grad():  # no grad needed under no_grad: early exit is back
        _, info = inl_iterate(h, x, **kw, tol=CONVERGE_TOL, min_iterations=0, return_info=True)
    assert min(info.iterations.tolist()) < kw["num_iterations"]


def test_batch_invariance_and_determinism():
    h, x, kw = converging_args(dtype=torch.float64)
    run = lambda rows: inl_iterate(h[rows], x[rows], **kw, tol=CONVERGE_TOL, return_info=True)  # noqa: E731
    full_x, full_info = run(slice(None))
    again_x, again_info = run(slice(None))
    assert torch.equal(full_x, again_x) and torch.equal(full_info.iterations, again_info.iterations)
    for rows in ([0], [3, 5], list(range(1, 8, 2))):
        sub_x, sub_info = run(rows)
        torch.testing.assert_close(sub_x, full_x[rows], rtol=1e-12, atol=1e-12)
        assert sub_info.iterations.tolist() == full_info.iterations[rows].tolist()


@pytest.mark.parametrize("kappa,with_v", [(0.7, True), (None, False)])
def test_gradcheck_every_input(kappa, with_v):
    h, x, kw = make_args(n=3, d=5, H=3, E=2, T=3, kappa=kappa, with_v=with_v)
    names = ("h", "x") + (("v",) if with_v else ()) + GRAD_NAMES
    tensors = dict(kw, h=h, x=x)
    inputs = tuple(tensors[k].clone().requires_grad_(True) for k in names)

    def fn(*vals):
        args = dict(kw, **dict(zip(names, vals)))
        hh, xx = args.pop("h"), args.pop("x")
        out, info = inl_iterate(hh, xx, **args, return_info=True)
        return out, info.v, info.energy, info.distance

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_a_row_at_its_equilibrium_has_finite_gradients():
    """x = mu makes rms(x − mu) = 0 at step 0, where sqrt has no derivative: the reference took
    inf·0 = NaN for all of x.grad's row and every element of mu.grad (one such row poisons a
    shared mu). It now takes the norm's convention at 0 (a zero gradient through rms), as the
    fused backends do: finite, and the CPU backend's fp32 gradients agree."""
    h, x, kw = make_args(n=3, d=5, H=4, E=2, T=3, kappa=0.7)
    kw["mu"] = torch.linspace(-0.2, 0.3, 5, dtype=torch.float64)
    x = x.clone()
    x[1] = kw["mu"]  # row 1 starts at the equilibrium
    names = ("h", "x", "mu", "w_o", "mod_scale")
    grads = {}
    for backend, dtype in [("reference", torch.float64)] + ([("cpu", torch.float32)]
                                                           if "cpu" in inl_kernels.backends() else []):
        args = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in dict(kw, h=h, x=x).items()}
        leaves = {k: args[k].clone().requires_grad_(True) for k in names}
        args.update(leaves)
        out = inl_iterate(args.pop("h"), args.pop("x"), **args, backend=backend)
        (out * torch.linspace(0.5, 1.5, out.numel(), dtype=dtype).view(out.shape)).sum().backward()
        grads[backend] = {k: t.grad for k, t in leaves.items()}
        assert all(torch.isfinite(g).all() for g in grads[backend].values()), backend
    if "cpu" in grads:
        for k in names:
            torch.testing.assert_close(grads["cpu"][k].double(), grads["reference"][k], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_follow_fp64(dtype):
    h, x, kw = make_args(n=4, d=16, H=8, E=2, T=3)
    ref = inl_iterate(h, x, **kw)
    cast = {k: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in kw.items()}
    out, info = inl_iterate(h.to(dtype), x.to(dtype), **cast, return_info=True)
    assert out.dtype == dtype and info.v.dtype == dtype and info.energy.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_fp32_weights_under_bf16_activations():
    """fp32 master weights with bf16 activations: the weights are used at fp32, so the result
    equals the fp64 computation on the bf16-rounded activations up to fp32 and output rounding."""
    h, x, kw = make_args(n=4, d=16, H=8, E=2, T=2)
    kw32 = {k: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in kw.items()}
    kw32["v"] = kw["v"].bfloat16()
    out, info = inl_iterate(h.bfloat16(), x.bfloat16(), **kw32, return_info=True)
    assert out.dtype == info.v.dtype == torch.bfloat16
    kw64 = {k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in kw32.items()}
    ref, ref_info = inl_iterate(h.bfloat16().double(), x.bfloat16().double(), **kw64, return_info=True)
    torch.testing.assert_close(out.double(), ref, rtol=8e-3, atol=8e-3)  # bf16 output rounding
    torch.testing.assert_close(info.energy.double(), ref_info.energy, rtol=1e-5, atol=1e-7)  # fp32 statistics


def test_empty_excitation_and_empty_batch():
    """No excited dims is the same dynamics as excited dims at zero amplitude."""
    h, x, kw = make_args(n=3, d=8, H=4, E=0, T=2)
    out = inl_iterate(h, x, **kw)
    _, _, kw2 = make_args(n=3, d=8, H=4, E=2, T=2)
    silent = dict(kw, exc_index=kw2["exc_index"], gamma=kw2["gamma"], phi=kw2["phi"], amplitude=0.0)
    assert torch.equal(out, inl_iterate(h, x, **silent))
    assert not torch.equal(out, inl_iterate(h, x, **dict(silent, amplitude=0.5)))
    h0, x0, kw0 = make_args(n=0, d=8, H=4, E=2, T=2)
    out, info = inl_iterate(h0, x0, **kw0, tol=CONVERGE_TOL, return_info=True)
    assert out.shape == (0, 8) and info.energy.shape == (0, 2) and info.iterations.shape == (0,)


@pytest.mark.skipif("cpu" not in inl_kernels.backends(), reason="the C++ extension is not built")
def test_auto_hands_decode_sized_calls_to_inductor_while_compiling(monkeypatch):
    """While torch.compile traces on a CPU, auto gives calls of at most COMPILE_FUSE_ROWS rows to
    the reference (inductor fuses it); larger calls, eager calls and a named backend keep the
    C++ kernels."""
    from inl_kernels import _dispatch
    from inl_kernels.common import iterate_bundle

    reference, cpu = _dispatch._TABLE[("reference", "iterate")].fn, _dispatch._TABLE[("cpu", "iterate")].fn

    def pick(rows, backend="auto"):
        h, x, kw = make_args(n=rows, d=8, H=4, E=1, T=2, dtype=torch.float32)
        return _dispatch.resolve("iterate", backend, "cpu", *iterate_bundle(h, x, **kw))

    limit = _dispatch.COMPILE_FUSE_ROWS
    assert pick(1) is cpu and pick(limit) is cpu  # eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert pick(1) is reference and pick(limit) is reference
    assert pick(limit + 1) is cpu and pick(1, backend="cpu") is cpu
    q = torch.zeros(2, 4, 1, 16)  # attention counts queries per sequence
    assert _dispatch._fuses_under_compile("attention", "cpu", (q,))
    assert not _dispatch._fuses_under_compile("attention", "cpu", (torch.zeros(1, 4, limit + 1, 16),))
    assert not _dispatch._fuses_under_compile("rms_norm", "cuda", (torch.zeros(1, 16),))


def test_dispatch():
    assert "reference" in inl_kernels.backends()
    h, x, kw = make_args(n=2, d=8, H=4, E=1, T=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        inl_iterate(h, x, **kw, backend="fastest")
    if not torch.cuda.is_available():
        with pytest.raises(inl_kernels.BackendUnavailableError, match="cuda"):
            inl_iterate(h, x, **kw, backend="cuda")
    # auto on CPU tensors: the compiled cpu backend where it is built and runs the call, else the reference
    h, x, kw = make_args(n=2, d=8, H=4, E=1, T=1, dtype=torch.float32)
    best = "cpu" if "cpu" in inl_kernels.backends() else "reference"
    assert torch.equal(inl_iterate(h, x, **kw, backend="auto"), inl_iterate(h, x, **kw, backend=best))
    # fp64 is the reference's alone: auto falls back to it, naming the cpu backend says why not
    h, x, kw = make_args(n=2, d=8, H=4, E=1, T=1, dtype=torch.float64)
    assert torch.equal(inl_iterate(h, x, **kw, backend="auto"), inl_iterate(h, x, **kw, backend="reference"))
    if best == "cpu":
        with pytest.raises(ValueError, match="backend 'cpu' cannot run this iterate"):
            inl_iterate(h, x, **kw, backend="cpu")


def test_inductor_compiled_reference_gradients_follow_fp64():
    """torch.compile (inductor) of the reference's forward and backward with every feature on, at
    T = 5: within fp32 rounding of the fp64 gradients. The excitation was once added per step with
    `index_add` of an expanded row; inductor (torch 2.13, CPU) compiled that backward wrong from
    T = 3 on, every gradient 1-5 % off with the forward right (the benchmark's `compile` baseline
    and `auto` under compile for decode-sized calls run this code)."""
    h, x, kw = make_args(n=16, d=24, H=8, E=3, T=5, seed=3)
    g = torch.Generator().manual_seed(4)
    dy, de, dd = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((16, 24), (16, 5), (16, 5)))

    def grads(fn, dtype):
        args = {k: t.to(dtype).requires_grad_(k in GRAD_NAMES or k == "v")
                if isinstance(t, torch.Tensor) and t.is_floating_point() else t for k, t in kw.items()}
        hh, xx = h.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
        out, info = fn(hh, xx, args)
        leaves = (hh, xx, args["v"], *(args[k] for k in GRAD_NAMES))
        return torch.autograd.grad((out, info.energy, info.distance),
                                   leaves, (dy.to(dtype), de.to(dtype), dd.to(dtype)))

    def run(hh, xx, args):
        return inl_iterate(hh, xx, **args, return_info=True, backend="reference")

    inl_kernels.pin_inductor_vec_isa()
    want = grads(run, torch.float64)
    got = grads(torch.compile(run, fullgraph=True), torch.float32)
    for name, a, w in zip(("h", "x", "v") + GRAD_NAMES, got, want):
        err = ((a.double() - w).abs().max() / w.abs().max()).item()
        assert err < 1e-4, (name, err)
