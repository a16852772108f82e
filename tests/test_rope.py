"""RoPE reference against rotation by complex numbers."""
import pytest
import torch

from inl_kernels import rope, rope_tables


def complex_rotation(x, positions, base=10000.0):
    D = x.shape[-1]
    half = D // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    angle = positions.double()[:, None] * theta[None, :]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("D", [8, 64])
def test_rope_matches_complex_rotation(offset, D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, 1, 3, D, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(16, D, dtype=torch.float64)
    rq, rk = rope(q, k, cos, sin, position_offset=offset)
    pos = torch.arange(offset, offset + 3)
    torch.testing.assert_close(rq, complex_rotation(q, pos), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rk, complex_rotation(k, pos), rtol=1e-12, atol=1e-12)


def test_rope_preserves_norm_and_relative_position():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(64, 16, dtype=torch.float64)
    scores = []
    for p in (0, 7, 30):  # q at p + 3, k at p: the score depends on the distance only
        rq, _ = rope(q, q, cos, sin, position_offset=p + 3)
        _, rk = rope(k, k, cos, sin, position_offset=p)
        scores.append((rq * rk).sum().item())
        torch.testing.assert_close(rq.norm(), q.norm())
    assert max(scores) - min(scores) < 1e-10
