"""RMSNorm reference against an fp64 formula; fused residual form against the unfused one."""
import pytest
import torch

from inl_kernels import rms_norm


def formula(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w.double()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_matches_formula(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    y = rms_norm(x, w, eps=1e-5)
    assert y.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), formula(x, w, 1e-5), rtol=tol, atol=tol)


def test_fused_residual_equals_unfused():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(4, 16, generator=g).bfloat16(), torch.randn(4, 16, generator=g).bfloat16()
    w = torch.randn(16, generator=g).float()
    y, s = rms_norm(x, w, residual=r)
    assert torch.equal(s, x + r)
    assert torch.equal(y, rms_norm(x + r, w))


def test_rms_norm_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: rms_norm(a, c, residual=b), (x, r, w))
