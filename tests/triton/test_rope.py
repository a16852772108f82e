"""Triton RoPE (q and k in one launch) against the reference, forward and backward, at position
offsets (KV-cache decode), with strided inputs, odd sequence lengths and head dims whose half
is not a power of two."""

import pytest
import torch

from inl_kernels import rope, rope_tables
from tests.triton.sm90 import compile_for_sm90, compile_in_child

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
interpreter_only = pytest.mark.skipif(GPU, reason="float64 runs through the interpreter only")


def make_inputs(B, Hq, Hkv, S, D, dtype, seed=0, layout="bshd"):
    g = torch.Generator().manual_seed(seed)

    def make(H):
        if layout == "bshd":  # transposed views of [B, S, H, D] projections, as the model passes
            return torch.randn(B, S, H, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)

    return make(Hq), make(Hkv)


def run(backend, q, k, cos, sin, offset, dq, dk):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    rq, rk = rope(q, k, cos, sin, offset, backend=backend)
    torch.autograd.backward((rq, rk), (dq, dk))
    return rq.detach(), rk.detach(), q.grad, k.grad


CASES = [  # B, Hq, Hkv, S, D, offset
    (2, 4, 1, 37, 16, 0),
    (2, 8, 2, 5, 32, 3),
    (1, 4, 4, 1, 64, 40),  # one decode step at position 40
    (1, 3, 1, 70, 2, 1),  # smallest head dim, more positions than one tile
    (1, 2, 2, 9, 40, 7),  # half = 20: not a power of two
]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_S{}_D{}_off{}".format(*c))
def test_matches_reference(case, layout, dtype):
    B, Hq, Hkv, S, D, offset = case
    q, k = make_inputs(B, Hq, Hkv, S, D, dtype, layout=layout)
    cos, sin = rope_tables(offset + S + 2, D, device=DEVICE)
    dq, dk = torch.randn(q.shape, device=DEVICE).to(dtype), torch.randn(k.shape, device=DEVICE).to(dtype)
    got = run("triton", q, k, cos, sin, offset, dq, dk)
    want = run("reference", q, k, cos, sin, offset, dq, dk)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def test_backward_is_the_inverse_rotation():
    """The rotation is orthogonal: the gradient of <rope(q), dy> w.r.t. q is dy rotated back, so
    rotating that gradient forward again returns dy."""
    q, k = make_inputs(1, 4, 2, 11, 16, torch.float32, seed=1)
    cos, sin = rope_tables(32, 16, device=DEVICE)
    dq, dk = torch.randn(q.shape, device=DEVICE), torch.randn(k.shape, device=DEVICE)
    _, _, gq, gk = run("triton", q, k, cos, sin, 5, dq, dk)
    with torch.no_grad():
        back_q, back_k = rope(gq, gk, cos, sin, 5, backend="triton")
    torch.testing.assert_close(back_q, dq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back_k, dk, rtol=1e-5, atol=1e-5)


def test_decode_steps_equal_one_pass_over_the_sequence():
    """Rotating position by position with offset = position (KV-cache decode) equals rotating the
    whole sequence at once."""
    q, k = make_inputs(2, 4, 2, 13, 32, torch.float32, seed=2, layout="bhsd")
    cos, sin = rope_tables(13, 32, device=DEVICE)
    with torch.no_grad():
        full_q, full_k = rope(q, k, cos, sin, 0, backend="triton")
        for p in (0, 6, 12):
            step_q, step_k = rope(q[:, :, p:p + 1], k[:, :, p:p + 1], cos, sin, p, backend="triton")
            assert torch.equal(step_q, full_q[:, :, p:p + 1]) and torch.equal(step_k, full_k[:, :, p:p + 1])


@interpreter_only
def test_fp64_tight_and_gradcheck():
    q, k = make_inputs(1, 2, 1, 6, 8, torch.float64, seed=3)
    cos, sin = rope_tables(12, 8, dtype=torch.float64)
    dq, dk = torch.randn(q.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64)
    for a, b in zip(run("triton", q, k, cos, sin, 4, dq, dk), run("reference", q, k, cos, sin, 4, dq, dk)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, cos, sin, 4, backend="triton"), (q, k), fast_mode=True)


def test_tables_that_require_grad_are_refused_with_a_reason():
    q, k = make_inputs(1, 2, 1, 3, 8, torch.float32)
    cos, sin = rope_tables(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin"):
        rope(q, k, cos.requires_grad_(), sin, 0, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4, 32, 8, 1000, 64), (1, 32, 8, 1, 128)])
def test_gpu_bf16(shape):
    B, Hq, Hkv, S, D = shape
    q, k = make_inputs(B, Hq, Hkv, S, D, torch.bfloat16, seed=4)
    cos, sin = rope_tables(S + 9, D, device="cuda")
    dq, dk = torch.randn(q.shape, device="cuda").bfloat16(), torch.randn(k.shape, device="cuda").bfloat16()
    for a, b in zip(run("triton", q, k, cos, sin, 9, dq, dk), run("reference", q, k, cos, sin, 9, dq, dk)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def compile_cases():
    """Child process: compiles the RoPE kernel for sm_90 (H100), bf16 q/k and fp32 tables,
    forward and inverse, at head dims 64 and 128."""
    import triton.language as tl

    from inl_kernels.triton import rope as tri_rope

    fn = tri_rope._rope_kernel
    for D, inverse in ((64, False), (128, True)):
        constexprs = dict(HALF=D // 2, BLOCK_S=64, BLOCK_H=D // 2, INVERSE=inverse, ACC=tl.float32)
        sig = {name: "constexpr" if name in constexprs else "*fp32" if name in ("COS", "SIN") else
               "*bf16" if name in ("Q", "K", "QO", "KO") else "i32" for name in fn.arg_names}
        compile_for_sm90(fn, sig, constexprs, label=D)


@pytest.mark.skipif(GPU, reason="a GPU compiles the kernels when it runs them")
def test_kernels_compile_for_sm90():
    """See tests/triton/sm90.py."""
    compile_in_child("tests.triton.test_rope:compile_cases", 2)
