"""Triton SwiGLU (torch matmuls around the fused pointwise kernels of inl_kernels/triton/swiglu.py)
against the reference, forward and backward: sizes that are not a multiple of the block, one
element, an empty batch, fp32/fp16 and fp64 (interpreter) and gradcheck; the kernels compile for
sm_90 without a GPU."""
import pytest
import torch

from inl_kernels import swiglu
from tests.triton.sm90 import compile_for_sm90, compile_in_child

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
interpreter_only = pytest.mark.skipif(GPU, reason="float64 runs through the interpreter only")


def make_inputs(shape, F, dtype, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt).to(DEVICE)  # noqa: E731
    x = r(*shape)
    ws = [r(*s, dt=weight_dtype or dtype) / s[1] ** 0.5 for s in ((F, d), (F, d), (d, F))]
    return x, *ws


def run(backend, x, wg, wu, wd, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, wg, wu, wd)]
    out = swiglu(*leaves, backend=backend)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,F", [((1, 1), 1), ((3, 7), 13), ((2, 5, 33), 37), ((9, 40), 300)])
def test_matches_reference(shape, F, dtype):
    """(9, 40) × F 300: 2700 elements, two programs of 1024 and a partial one. fp32 within 1e-5
    of the reference; fp16 no worse than twice the eager fp16 model's own error against fp64 (it
    rounds silu and the product separately, the kernel once)."""
    x, wg, wu, wd = make_inputs(shape, F, dtype, weight_dtype=torch.float32 if dtype == torch.float16 else None)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    got, want = run("triton", x, wg, wu, wd, dout), run("reference", x, wg, wu, wd, dout)
    exact = run("reference", *(t.double() for t in (x, wg, wu, wd, dout)))
    for a, b, e in zip(got, want, exact):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
        else:
            eps = torch.finfo(torch.float16).eps * max(1.0, e.abs().max().item())
            assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + eps


@interpreter_only
def test_fp64_tight_and_gradcheck():
    x, wg, wu, wd = make_inputs((4, 6), 10, torch.float64, seed=2)
    dout = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for a, b in zip(run("triton", x, wg, wu, wd, dout), run("reference", x, wg, wu, wd, dout)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    leaves = [t.requires_grad_(True) for t in (x, wg, wu, wd)]
    assert torch.autograd.gradcheck(lambda *t: swiglu(*t, backend="triton"), leaves)


def test_empty_batch():
    x, wg, wu, wd = make_inputs((0, 8), 12, torch.float32)
    x.requires_grad_(True)
    wg.requires_grad_(True)
    out = swiglu(x, wg, wu, wd, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 8) and torch.equal(wg.grad, torch.zeros_like(wg))


@pytest.mark.cuda
@pytest.mark.parametrize("shape,F", [((4096, 512), 2048), ((7, 768), 3072)])
def test_gpu_bf16(shape, F):
    x, wg, wu, wd = make_inputs(shape, F, torch.bfloat16, weight_dtype=torch.float32, seed=4)
    dout = torch.randn(x.shape, device=DEVICE).to(torch.bfloat16)
    exact = run("reference", x.double(), wg.double(), wu.double(), wd.double(), dout.double())
    ours, eager = run("triton", x, wg, wu, wd, dout), run("reference", x, wg, wu, wd, dout)
    for a, b, e in zip(ours, eager, exact):
        # no worse than twice the eager bf16 model's own error on the same inputs
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-2


def compile_cases():
    """Child process: compiles both SwiGLU kernels for sm_90, bf16 and fp32 activations."""
    import triton.language as tl

    from inl_kernels.triton import swiglu as tri_swiglu

    for dtype in ("bf16", "fp32"):
        for fn in (tri_swiglu._swiglu_forward, tri_swiglu._swiglu_backward):
            constexprs = dict(BLOCK=tri_swiglu.BLOCK, ACC=tl.float32)
            sig = {name: "constexpr" if name in constexprs else "i32" if name == "n" else f"*{dtype}"
                   for name in fn.arg_names}
            compile_for_sm90(fn, sig, constexprs, 4, label=dtype)


@pytest.mark.skipif(GPU, reason="a GPU compiles the kernels when it runs them")
def test_kernels_compile_for_sm90():
    """See tests/triton/sm90.py."""
    compile_in_child("tests.triton.test_swiglu:compile_cases", 4)


@pytest.mark.cuda
def test_opcheck():
    """The pointwise op as a torch.library op (triton_op): schema, fake function, autograd (on a
    GPU: the interpreter cannot run opcheck's fake-tensor pass)."""
    from inl_kernels.triton.swiglu import triton_silu_mul_op
    g = torch.Generator().manual_seed(7)
    gate = torch.randn(4, 37, generator=g).to(DEVICE).requires_grad_(True)
    up = torch.randn(4, 37, generator=g).to(DEVICE).requires_grad_(True)
    torch.library.opcheck(triton_silu_mul_op, (gate, up))
