"""The compiled CPU RMSNorm (csrc/cpu/rms_norm.cpp) against an fp64 formula on the same rounded
inputs, forward and backward, with and without the fused residual."""
import importlib

import pytest
import torch

from inl_kernels import rms_norm
from inl_kernels._dispatch import resolve
from inl_kernels.cpu import unavailable_reason

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.usefixtures("each_cpu_path")]

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def formula(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def inputs(shape, dtype, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    r = torch.randn(*shape, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype)
    return x, r, w


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_formula(shape, dtype):
    x, _, w = inputs(shape, dtype)
    y = rms_norm(x, w, eps=1e-5, backend="cpu")
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), formula(x, w, 1e-5), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_equals_unfused(dtype):
    x, r, w = inputs((6, 40), dtype, weight_dtype=torch.float32)
    y, s = rms_norm(x, w, residual=r, backend="cpu")
    assert torch.equal(s, (x.float() + r.float()).to(dtype))
    assert torch.equal(y, rms_norm(s, w, backend="cpu"))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(5, 1), (3, 37), (2, 4, 64)])
def test_backward_matches_formula(shape, residual):
    x, r, w = inputs(shape, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    gy, gs = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)

    def grads(x, r, w, run):
        x, r, w = (t.clone().requires_grad_(True) for t in (x, r, w))
        if residual:
            y, s = run(x, r, w)
            loss = (y.double() * gy).sum() + (s.double() * gs).sum()
        else:
            loss = (run(x, None, w).double() * gy).sum()
        loss.backward()
        return x.grad, (r.grad if residual else None), w.grad

    def cpu(x, r, w):
        return rms_norm(x, w, eps=1e-6, residual=r, backend="cpu")

    def oracle(x, r, w):
        if r is None:
            return formula(x, w, 1e-6)
        s = x + r
        return formula(s, w, 1e-6), s

    got = grads(x, r, w, cpu)
    want = grads(x.double(), r.double(), w.double(), oracle)
    for a, b in zip(got, want):
        if b is None:
            continue
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_no_rows(residual):
    """No rows: empty outputs, a zero weight gradient, and no thread count of zero."""
    x, r, w = inputs((0, 12), torch.float32)
    w = w.clone().requires_grad_(True)
    out = rms_norm(x.requires_grad_(True), w, residual=r if residual else None, backend="cpu")
    y = out[0] if residual else out
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(12)) and x.grad.shape == (0, 12)


def test_bf16_backward_and_fp32_weight():
    x, _, w = inputs((8, 48), torch.bfloat16, seed=3, weight_dtype=torch.float32)
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    rms_norm(x, w, backend="cpu").float().square().sum().backward()
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    formula(x64, w64, 1e-6).square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=3e-2, atol=3e-2 * w64.grad.abs().max().item())


def test_weight_gradient_independent_of_thread_count():
    x, _, w = inputs((1000, 128), torch.float32, seed=4)
    gy = torch.randn(1000, 128, generator=torch.Generator().manual_seed(5))

    def grads():
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (rms_norm(xx, ww, backend="cpu") * gy).sum().backward()
        return xx.grad, ww.grad

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = grads()
        torch.set_num_threads(1)
        b = grads()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_auto_dispatch():
    cpu_rms_norm = importlib.import_module("inl_kernels.cpu.rms_norm")
    reference_rms_norm = importlib.import_module("inl_kernels.reference.rms_norm")
    x, _, w = inputs((2, 8), torch.float32)
    assert resolve("rms_norm", "auto", "cpu", x, w, 1e-6, None) is cpu_rms_norm.rms_norm
    assert resolve("rms_norm", "auto", "cpu", x.double(), w.double(), 1e-6, None) is reference_rms_norm.rms_norm
    with pytest.raises(ValueError, match="float64"):
        rms_norm(x.double(), w.double(), backend="cpu")
