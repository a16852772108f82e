"""The CPU SwiGLU (torch matmuls around the fused pointwise kernel of csrc/cpu/swiglu.cpp) against
an fp64 formula on the same rounded inputs, forward and backward, on every CPU path; sizes that
are not a multiple of any vector width; NaN and infinities as the formula gives them."""
import pytest
import torch

from inl_kernels import swiglu
from inl_kernels._dispatch import resolve
from inl_kernels.cpu import unavailable_reason
from tests.cpu.row_kernels import assert_each_row_alone_and_any_thread_count_give

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.usefixtures("each_cpu_path")]

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def formula(x, w_gate, w_up, w_down):
    x, w_gate, w_up, w_down = (t.double() for t in (x, w_gate, w_up, w_down))
    g, u = x @ w_gate.t(), x @ w_up.t()
    return (g * torch.sigmoid(g) * u) @ w_down.t()


def inputs(shape, F, dtype, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(*shape, generator=g).to(dtype)
    ws = [(torch.randn(*s, generator=g) / s[1] ** 0.5).to(weight_dtype or dtype) for s in ((F, d), (F, d), (d, F))]
    return x, *ws


def test_auto_picks_the_cpu_swiglu():
    x, *w = inputs((2, 8), 12, torch.float32)
    assert resolve("swiglu", "auto", "cpu", x, *w).__module__ == "inl_kernels.cpu.swiglu"


@pytest.mark.parametrize("shape,F", [((1, 1), 1), ((3, 7), 13), ((2, 5, 33), 37), ((4, 64), 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_formula(shape, F, dtype):
    x, wg, wu, wd = inputs(shape, F, dtype)
    out = swiglu(x, wg, wu, wd, backend="cpu")
    assert out.dtype == dtype and out.shape == x.shape
    # the matmuls round in the input dtype as the reference's do: judge against that reference too
    ref = swiglu(x, wg, wu, wd, backend="reference")
    exact = formula(x, wg, wu, wd)
    err, ref_err = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= max(2 * ref_err, TOL[dtype] * max(1.0, exact.abs().max().item()))


@pytest.mark.parametrize("shape,F", [((5, 1), 3), ((3, 37), 41), ((2, 4, 24), 70)])
def test_gradients_match_formula(shape, F):
    x, wg, wu, wd = inputs(shape, F, torch.float32, seed=1)
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def grads(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        (fn(*leaves).double() * gout).sum().backward()
        return [t.grad for t in leaves]

    got = grads(lambda *t: swiglu(*t, backend="cpu"), (x, wg, wu, wd))
    want = grads(formula, [t.double() for t in (x, wg, wu, wd)])
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


def test_fp32_weights_under_bf16_activations():
    x, wg, wu, wd = inputs((6, 16), 24, torch.bfloat16, seed=3, weight_dtype=torch.float32)
    wg.requires_grad_(True)
    out = swiglu(x, wg, wu, wd, backend="cpu")
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and wg.grad.dtype == torch.float32
    ref = swiglu(x, wg.detach(), wu, wd, backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_pointwise_kernel_keeps_nan_and_infinities():
    """silu(g)·u element by element: NaN stays NaN, ±inf and huge values as the formula gives."""
    from inl_kernels.cpu import _C
    g = torch.tensor([float("nan"), 1.0, float("inf"), -30.0, 30.0, 0.0, -1e30, 2.5, -0.5, 7.0, 1e-30])
    u = torch.tensor([1.0, float("nan"), 2.0, 3.0, -2.0, 5.0, 1.0, float("inf"), 4.0, 0.0, 1.0])
    got = _C.swiglu_forward(g, u)
    want = (g.double() * torch.sigmoid(g.double()) * u.double()).float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    # vexp is within |x|·5e-8 relative (csrc/cpu/simd.h): 1.5e-6 at g = -30
    torch.testing.assert_close(got[finite], want[finite], rtol=3e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pointwise_product_written_over_gate_gives_the_same_bits(dtype):
    """Eager inference writes silu(g)·u over g (no fresh buffer): the bits of the kernel writing a
    new tensor, up untouched, and an out that is a view of up refused (its elements would be read
    after being written)."""
    from inl_kernels.cpu import _C
    g = torch.Generator().manual_seed(7)
    gate = torch.randn(5, 37, generator=g).to(dtype)  # 185 elements: a partial last vector on every path
    up = torch.randn(5, 37, generator=g).to(dtype)
    want, up_before = _C.swiglu_forward(gate, up), up.clone()
    over = gate.clone()
    got = _C.swiglu_forward(over, up, over)
    assert got.data_ptr() == over.data_ptr() and torch.equal(got, want) and torch.equal(up, up_before)
    with pytest.raises(RuntimeError, match="out must be"):
        _C.swiglu_forward(gate, up, up)
    with pytest.raises(RuntimeError, match="out must be"):
        _C.swiglu_forward(gate, up, torch.empty(5, 36, dtype=dtype))
    shifted = torch.empty(5 * 37 + 1, dtype=dtype)  # gate at an offset inside out's storage
    shifted[1:] = gate.flatten()
    with pytest.raises(RuntimeError, match="out must be"):
        _C.swiglu_forward(shifted[1:].view(5, 37), up, shifted[:-1].view(5, 37))
    with pytest.raises(RuntimeError, match="out must be"):  # out = gate, but up overlaps it one element off
        _C.swiglu_forward(shifted[1:].view(5, 37), shifted[:-1].view(5, 37), shifted[1:].view(5, 37))


def test_inference_swiglu_gives_the_bits_of_the_op_path():
    """The eager path (product over gate) and the op path (a fresh product) of swiglu() agree bit
    for bit, large enough for the matmul path."""
    x, *w = inputs((9, 24), 40, torch.float32, seed=8)
    with torch.no_grad():
        eager = swiglu(x, *w, backend="cpu")
        with torch.profiler.profile():  # the profiler turns the direct call off: the op runs
            through_op = swiglu(x, *w, backend="cpu")
    assert torch.equal(eager, through_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    """The pointwise op as a torch.library op: schema, fake function, autograd registration."""
    from inl_kernels.cpu.swiglu import cpu_silu_mul_op
    g = torch.Generator().manual_seed(6)
    gate = torch.randn(3, 5, 7, generator=g).to(dtype).requires_grad_(True)
    up = torch.randn(3, 5, 7, generator=g).to(dtype).requires_grad_(True)
    torch.library.opcheck(cpu_silu_mul_op, (gate, up))


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_few_rows_run_whole_in_one_call(rows):
    """Up to 4 fp32 rows without a gradient run as matrix-vector products in one call
    (_C.swiglu_rows): within fp32 rounding of the fp64 formula (d = 45 and F = 37 leave tails in
    every dot product and output run), each row's bits independent of the other rows and of
    the thread count, and the registered op gives the direct call's bits."""
    from inl_kernels.cpu import _C
    from inl_kernels.cpu.swiglu import cpu_swiglu_rows_op
    x, wg, wu, wd = inputs((rows, 45), 37, torch.float32, seed=7)
    with torch.no_grad():
        out = swiglu(x, wg, wu, wd, backend="cpu")
    assert torch.equal(out, _C.swiglu_rows(x, wg, wu, wd))
    exact = formula(x, wg, wu, wd)
    assert (out.double() - exact).abs().max() <= 2e-6 * max(1.0, exact.abs().max().item())
    assert_each_row_alone_and_any_thread_count_give(lambda rows: _C.swiglu_rows(rows, wg, wu, wd), x, out)
    assert torch.equal(cpu_swiglu_rows_op(x, wg, wu, wd), out)
    torch.library.opcheck(cpu_swiglu_rows_op, (x, wg, wu, wd), test_utils=("test_schema", "test_faketensor"))


def test_few_rows_with_a_gradient_take_the_matmul_path():
    x, wg, wu, wd = inputs((2, 16), 24, torch.float32, seed=8)
    wg.requires_grad_(True)
    out = swiglu(x, wg, wu, wd, backend="cpu")
    out.sum().backward()
    leaf = wg.detach().double().requires_grad_(True)
    formula(x, leaf, wu, wd).sum().backward()
    torch.testing.assert_close(wg.grad.double(), leaf.grad, rtol=2e-5, atol=2e-5)
    with torch.no_grad():  # the same rows without a gradient: the one-call path, within rounding
        torch.testing.assert_close(swiglu(x, wg, wu, wd, backend="cpu"), out.detach(), rtol=2e-6, atol=2e-6)


def test_few_rows_keep_nan_in_their_row_and_check_their_arguments():
    from inl_kernels.cpu import _C
    x, wg, wu, wd = inputs((3, 20), 24, torch.float32, seed=9)
    x[1, 4] = float("nan")
    out = _C.swiglu_rows(x, wg, wu, wd)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        _C.swiglu_rows(torch.zeros(5, 20), wg, wu, wd)
    with pytest.raises(RuntimeError, match="w_down must be"):
        _C.swiglu_rows(x, wg, wu, wd.t().contiguous())
    with pytest.raises(RuntimeError, match="float32"):
        _C.swiglu_rows(x.bfloat16(), wg, wu, wd)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.swiglu_rows(x, wg, wu, wd.t().contiguous().t())


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_an_empty_hidden_layer_gives_zeros(rows):
    """F = 0 (no hidden units): zeros [N, d], as the reference gives, on every path (the few-row
    kernel refused it with an error about w_gate's shape)."""
    from inl_kernels.cpu.swiglu import prepared_inference
    x = torch.randn(rows, 6)
    wg, wu, wd = torch.randn(0, 6), torch.randn(0, 6), torch.randn(6, 0)
    want = swiglu(x.double(), wg.double(), wu.double(), wd.double(), backend="reference")
    assert torch.equal(want, torch.zeros(rows, 6, dtype=torch.float64))
    with torch.no_grad():
        for backend in ("cpu", "auto"):
            assert torch.equal(swiglu(x, wg, wu, wd, backend=backend), want.float())
        assert torch.equal(prepared_inference(wg, wu, wd, torch.float32)(x), want.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_inference_gives_the_bits_of_swiglu(dtype):
    """cpu.swiglu.prepared_inference casts and lays out the weights once and then computes what
    swiglu() computes, for few rows (the one-call kernel in fp32) and for more."""
    from inl_kernels.common import direct_calls
    from inl_kernels.cpu import swiglu as mod
    for shape in ((1, 1, 40), (3, 40), (2, 3, 40)):
        x, wg, wu, wd = inputs(shape, 24, dtype, seed=10, weight_dtype=torch.float32)
        with torch.no_grad():
            want = mod.swiglu(x, wg, wu, wd)
            run = mod.prepared_inference(wg, wu, wd, dtype)
            with direct_calls():
                got = run(x)
        assert got.dtype == want.dtype and torch.equal(got, want), shape
