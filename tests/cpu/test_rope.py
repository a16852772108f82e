"""The compiled CPU RoPE (csrc/cpu/rope.cpp) against the fp64 reference rotation on the same
rounded inputs: forward and backward, q and k of different head counts, strided inputs, a head
dim with an odd half, per-row positions (left padding), every CPU path; plus the op's
registration (opcheck) and invariants (rows independent of the batch and the thread count)."""
import pytest
import torch

from inl_kernels import rope, rope_tables
from inl_kernels._dispatch import resolve
from inl_kernels.cpu import unavailable_reason
from inl_kernels.reference.rope import rotate

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.usefixtures("each_cpu_path")]

# fp32: the rotation's two products and a sum, possibly fused: a few fp32 ulps of |x|
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def qk(B, Hq, Hkv, S, D, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # [B, S, H, D] projections viewed as [B, H, S, D], as the attention module makes them
        q = torch.randn(B, S, Hq, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, S, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k


def test_auto_picks_the_cpu_rope_for_what_it_runs():
    q, k = qk(1, 2, 1, 3, 8)
    cos, sin = rope_tables(8, 8)
    assert resolve("rope", "auto", "cpu", q, k, cos, sin, 0).__module__ == "inl_kernels.cpu.rope"
    assert resolve("rope", "auto", "cpu", q.double(), k.double(), cos.double(), sin.double(), 0).__module__ == \
        "inl_kernels.reference.rope"


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 2), (2, 4, 2, 7, 8), (3, 6, 2, 13, 10), (1, 8, 8, 33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("strided", [False, True])
def test_forward_matches_the_reference(shape, dtype, offset, strided):
    B, Hq, Hkv, S, D = shape
    q, k = qk(*shape, dtype=dtype, strided=strided)
    cos, sin = rope_tables(S + offset + 3, D)
    got_q, got_k = rope(q, k, cos, sin, position_offset=offset, backend="cpu")
    want_q, want_k = rope(q.double(), k.double(), cos.double(), sin.double(), position_offset=offset,
                          backend="reference")
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 8), (1, 3, 1, 5, 6), (1, 2, 2, 0, 8)])
def test_backward_matches_the_reference(shape):
    """The gradient is the rotation back (by −θ): against autograd through the fp64 reference;
    also of an empty sequence (S = 0: the kernel refused the empty gradient's strides)."""
    q, k = qk(*shape, seed=1, strided=True)
    cos, sin = rope_tables(16, shape[-1])
    g = torch.Generator().manual_seed(2)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    grads = []
    for backend, cast in (("cpu", lambda t: t), ("reference", torch.Tensor.double)):
        a, b = cast(q).detach().requires_grad_(), cast(k).detach().requires_grad_()
        out_q, out_k = rope(a, b, cast(cos), cast(sin), position_offset=4, backend=backend)
        ((out_q * cast(dq)).sum() + (out_k * cast(dk)).sum()).backward()
        grads.append((a.grad, b.grad))
    for got, want in zip(*grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_per_row_positions_as_a_left_padded_batch_counts_them():
    """Positions [B, S]: each row at its own positions, as the reference's rotation by
    broadcast positions gives it (q and k at different lengths: queries after a cache)."""
    from inl_kernels.cpu.rope import rotate_pair

    B, Hq, Hkv, Sq, Sk, D = 3, 4, 2, 5, 9, 12
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, Hq, Sq, D, generator=g), torch.randn(B, Hkv, Sk, D, generator=g)
    cos, sin = rope_tables(32, D)
    q_pos = torch.randint(0, 32, (B, Sq), generator=g)
    k_pos = torch.randint(0, 32, (B, Sk), generator=g)
    got_q, got_k = rotate_pair(q, k, cos, sin, q_pos, k_pos)
    torch.testing.assert_close(got_q.double(), rotate(q.double(), cos.double(), sin.double(), q_pos[:, None]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k.double(), rotate(k.double(), cos.double(), sin.double(), k_pos[:, None]),
                               rtol=1e-6, atol=1e-6)
    # one row alone gives the bits it gets in the batch
    alone_q, alone_k = rotate_pair(q[1:2], k[1:2], cos, sin, q_pos[1:2], k_pos[1:2])
    assert torch.equal(alone_q, got_q[1:2]) and torch.equal(alone_k, got_k[1:2])


def test_the_same_bits_for_any_thread_count():
    q, k = qk(4, 8, 2, 64, 64, seed=4)  # enough work for the kernel to take threads
    cos, sin = rope_tables(64, 64)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(rope(q, k, cos, sin, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_op_registration():
    cos, sin = rope_tables(16, 8)
    q, k = qk(2, 4, 2, 5, 8, strided=True)
    pos = torch.arange(3, 8)
    torch.library.opcheck(torch.ops.inl.cpu_rope, (q, k, cos, sin, pos, pos, False))
    torch.library.opcheck(torch.ops.inl.cpu_rope, (q.requires_grad_(), k, cos, sin, pos, pos, True))


def test_positions_outside_the_tables_are_refused():
    from inl_kernels.cpu import _C

    cos, sin = rope_tables(4, 8)
    q, k = qk(1, 2, 1, 3, 8)
    with pytest.raises(RuntimeError, match=r"q_pos values must lie in \[0, 4\), got 4"):
        _C.rope_forward(q, k, cos, sin, torch.tensor([2, 3, 4]), torch.arange(3), False)
    with pytest.raises(RuntimeError, match="k_pos must be"):
        _C.rope_forward(q, k, cos, sin, torch.arange(3), torch.arange(2), False)
    with pytest.raises(RuntimeError, match="even head dimension"):
        _C.rope_forward(q[..., :7], k[..., :7], cos, sin, torch.arange(3), torch.arange(3), False)
