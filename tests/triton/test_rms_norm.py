"""Triton RMSNorm against the reference, forward and backward, with and without the fused
residual; the weight gradient's determinism; odd widths and single rows."""

import pytest
import torch

from inl_kernels import rms_norm
from inl_kernels.triton.rms_norm import MAX_WIDTH
from tests.triton.sm90 import compile_for_sm90, compile_in_child

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
interpreter_only = pytest.mark.skipif(GPU, reason="float64 runs through the interpreter only")


def make_inputs(shape, dtype, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt).to(DEVICE)  # noqa: E731
    x, res = r(*shape), r(*shape)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).to(weight_dtype or dtype).to(DEVICE)
    return x, res, w


def run(backend, x, w, res=None, dy=None, ds=None, eps=1e-5):
    """Outputs and gradients of <y, dy> (+ <s, ds> with a residual) for one backend."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    if res is None:
        y = rms_norm(x, w, eps, backend=backend)
        y.backward(dy)
        return y.detach(), x.grad, w.grad
    res = res.detach().requires_grad_()
    y, s = rms_norm(x, w, eps, residual=res, backend=backend)
    torch.autograd.backward((y, s), (dy, ds))
    return y.detach(), s.detach(), x.grad, res.grad, w.grad


SHAPES = [(1, 1), (37, 33), (2, 5, 100), (3, 1000), (67, 16)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, residual):
    x, res, w = make_inputs(shape, dtype, weight_dtype=torch.float32 if dtype == torch.float16 else None)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    args = (x, w, res if residual else None, dy, ds if residual else None)
    got, want = run("triton", *args), run("reference", *args)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = TOL[a.dtype] if a.dtype != torch.float32 or dtype == torch.float32 else 1e-4  # dw in fp32
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@interpreter_only
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fp64_tight(residual):
    x, res, w = make_inputs((11, 70), torch.float64, seed=1)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    args = (x, w, res if residual else None, dy, ds if residual else None)
    for a, b in zip(run("triton", *args), run("reference", *args)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@interpreter_only
def test_gradcheck_with_residual():
    x, res, w = make_inputs((3, 6), torch.float64, seed=2)
    x, res, w = (t.requires_grad_() for t in (x, res, w))
    fn = lambda a, b, c: rms_norm(a, c, 1e-6, residual=b, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, res, w))


def test_fused_residual_equals_unfused_bit_for_bit():
    """x + residual is rounded to x's dtype before normalising, as an unfused model computes."""
    x, res, w = make_inputs((9, 48), torch.float16, weight_dtype=torch.float32, seed=3)
    y, s = rms_norm(x, w, residual=res, backend="triton")
    assert torch.equal(s, x + res)
    assert torch.equal(y, rms_norm(x + res, w, backend="triton"))


def test_weight_gradient_is_deterministic():
    """dw is reduced through per-program partial rows summed in a fixed order: several
    programs each walk several row tiles here, and two runs give the same bits."""
    x, _, w = make_inputs((131, 40), torch.float32, seed=4)
    dy = torch.randn_like(x)
    first, second = run("triton", x, w, dy=dy), run("triton", x, w, dy=dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradients_reach_only_what_requires_them():
    x, res, w = make_inputs((5, 24), torch.float32, seed=5)
    res.requires_grad_()
    y, s = rms_norm(x, w, residual=res, backend="triton")
    (y.sum() + 2 * s.sum()).backward()
    r2 = res.detach().requires_grad_()
    y2, s2 = rms_norm(x, w, residual=r2, backend="reference")
    (y2.sum() + 2 * s2.sum()).backward()
    torch.testing.assert_close(res.grad, r2.grad, rtol=1e-5, atol=1e-5)
    assert x.grad is None and w.grad is None


def test_gradient_through_the_new_residual_only():
    """When only s = x + residual is used downstream, the normalised output gets no gradient."""
    x, res, w = make_inputs((4, 20), torch.float32, seed=6)
    x.requires_grad_()
    _, s = rms_norm(x, w, residual=res, backend="triton")
    (3 * s).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_empty_batch():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8, device=DEVICE))


def test_too_wide_rows_are_refused_with_a_reason():
    x = torch.randn(1, MAX_WIDTH + 1, device=DEVICE)
    with pytest.raises(ValueError, match="wider than"):
        rms_norm(x, torch.ones(MAX_WIDTH + 1, device=DEVICE), backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 2048), (1000, 4097), (3, 768)])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_bf16(shape, residual):
    x, res, w = make_inputs(shape, torch.bfloat16, weight_dtype=torch.float32, seed=7)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    args = (x, w, res if residual else None, dy, ds if residual else None)
    for a, b in zip(run("triton", *args), run("reference", *args)):
        assert a.dtype == b.dtype
        tol = 2e-2 if a.dtype == torch.bfloat16 else 1e-3 * max(1.0, shape[0] ** 0.5 / 8)
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def compile_cases():
    """Child process: compiles both RMSNorm kernels for sm_90 (H100), bf16 activations with fp32
    weights, with the launcher's tiles, every flag on and every flag off."""
    import triton.language as tl

    from inl_kernels.triton import rms_norm as tri_rms_norm

    fp32 = ("W", "RSTD", "DW_PART", "eps")
    for width, on in ((2048, True), (8192, False)):
        block_m, block_n, num_warps = tri_rms_norm._tiles(width)
        cases = [(tri_rms_norm._rms_norm_forward, dict(HAS_RESIDUAL=on)),
                 (tri_rms_norm._rms_norm_backward, dict(HAS_DS=on, HAS_DX=True, HAS_DR=on, HAS_DW=on))]
        for fn, flags in cases:
            constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, ACC=tl.float32, **flags)
            sig = {name: "constexpr" if name in constexprs else
                   ("*fp32" if name != "eps" else "fp32") if name in fp32 else
                   "*bf16" if name in ("X", "R", "Y", "S", "DY", "DS", "DX", "DR") else "i32" for name in fn.arg_names}
            compile_for_sm90(fn, sig, constexprs, num_warps, label=width)


@pytest.mark.skipif(GPU, reason="a GPU compiles the kernels when it runs them")
def test_kernels_compile_for_sm90():
    """See tests/triton/sm90.py."""
    compile_in_child("tests.triton.test_rms_norm:compile_cases", 4)
