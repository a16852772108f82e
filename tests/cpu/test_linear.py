"""The CPU projection `inl_kernels.linear` (inl_kernels/cpu/linear.py): F.linear except for few
fp32 rows without a gradient, which run the matrix-vector kernel of csrc/cpu/linear.cpp; that one
against an fp64 hand sum on every CPU path, its bits independent of the other rows and of the
thread count; and the module `inl_kernels.Linear` as a drop-in nn.Linear."""
import pytest
import torch
import torch.nn.functional as F

import inl_kernels
from inl_kernels import linear
from inl_kernels.cpu import unavailable_reason
from tests.cpu.row_kernels import assert_each_row_alone_and_any_thread_count_give

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.usefixtures("each_cpu_path")]


def inputs(rows, K, O, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).to(dtype)
    w = (torch.randn(O, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(O, generator=g).to(dtype) if bias else None
    return x, w, b


def hand_sum(x, w, b):
    """Σ_k x[m][k]·w[o][k] (+ b[o]) in fp64, element by element."""
    x, w = x.double(), w.double()
    out = (x[:, None, :] * w[None, :, :]).sum(-1)
    return out if b is None else out + b.double()


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("K, O, bias", [(45, 37, True), (64, 5, False), (1, 3, True), (0, 4, True), (33, 0, False)])
def test_few_rows_follow_fp64_and_do_not_depend_on_their_batch_mates(rows, K, O, bias):
    """K = 45 leaves a tail after the vectors (and an odd vector on AVX-512's 16 lanes), K = 1 no
    vector at all, K = 0 the bias alone, O = 0 nothing; O = 37 and 5 split unevenly over threads."""
    from inl_kernels.cpu import _C
    from inl_kernels.cpu.linear import cpu_linear_rows_op
    x, w, b = inputs(rows, K, O, bias, seed=rows + K)
    with torch.no_grad():
        out = linear(x, w, b, backend="cpu")
    assert out.shape == (rows, O)
    assert torch.equal(out, _C.linear_rows(x, w, b))
    exact = hand_sum(x, w, b)
    if exact.numel():
        assert (out.double() - exact).abs().max() <= 2e-6 * max(1.0, exact.abs().max().item())
    assert_each_row_alone_and_any_thread_count_give(lambda rows: _C.linear_rows(rows, w, b), x, out)
    assert torch.equal(cpu_linear_rows_op(x, w, b), out)
    torch.library.opcheck(cpu_linear_rows_op, (x, w, b), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_projections_of_one_x_in_one_region_give_each_ones_bits(rows):
    """linear_rows_parts (decode's q, k and v in one parallel region): each output is the one
    linear_rows gives for its weight alone, at uneven sizes, any thread count and row by row; an
    empty part stays empty; a bias only goes with a single weight."""
    from inl_kernels.cpu import _C
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 45, generator=g)
    ws = [torch.randn(o, 45, generator=g) / 45 ** 0.5 for o in (37, 9, 0)]
    outs = _C.linear_rows_parts(x, ws)
    assert [o.shape for o in outs] == [(rows, 37), (rows, 9), (rows, 0)]
    for out, w in zip(outs, ws):
        assert torch.equal(out, _C.linear_rows(x, w))
        exact = hand_sum(x, w, None)
        if exact.numel():
            assert (out.double() - exact).abs().max() <= 2e-6 * max(1.0, exact.abs().max().item())
    for i in range(2):
        assert_each_row_alone_and_any_thread_count_give(lambda r, i=i: _C.linear_rows_parts(r, ws)[i], x, outs[i])
    b = torch.randn(37, generator=g)
    assert torch.equal(_C.linear_rows_parts(x, ws[:1], b)[0], _C.linear_rows(x, ws[0], b))
    with pytest.raises(RuntimeError, match="a bias goes with a single weight"):
        _C.linear_rows_parts(x, ws, b)
    with pytest.raises(RuntimeError, match="1 to 3 weights"):
        _C.linear_rows_parts(x, ws + ws[:1])
    with pytest.raises(RuntimeError, match=r"weight must be \[O, 45\]"):
        _C.linear_rows_parts(x, [ws[0], torch.zeros(3, 44)])


def test_every_other_call_is_f_linear_bit_for_bit():
    """More rows, a gradient, bf16, autocast: torch's F.linear itself (the same bits and the same
    autograd as nn.Linear)."""
    x, w, b = inputs(9, 24, 10, seed=1)
    with torch.no_grad():
        assert torch.equal(linear(x, w, b, backend="cpu"), F.linear(x, w, b))
        xb, wb, bb = (t.bfloat16() for t in (x[:2], w, b))
        assert torch.equal(linear(xb, wb, bb, backend="cpu"), F.linear(xb, wb, bb))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = linear(x[:2], w, b, backend="cpu"), F.linear(x[:2], w, b)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    leaf = w.clone().requires_grad_(True)
    out = linear(x[:2], leaf, b, backend="cpu")
    assert torch.equal(out, F.linear(x[:2], w, b))
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, x[:2].sum(0, keepdim=True).expand(10, -1), rtol=1e-6, atol=1e-6)


def test_few_rows_keep_nan_in_their_row_and_the_arguments_are_checked():
    from inl_kernels.cpu import _C
    x, w, b = inputs(3, 20, 7, seed=2)
    x[1, 4] = float("nan")
    out = _C.linear_rows(x, w, b)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        _C.linear_rows(torch.zeros(5, 20), w, b)
    assert _C.linear_rows(torch.zeros(0, 3, 20), w, b).shape == (0, 3, 7)  # no rows: as F.linear
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.linear_rows(x, w, b[:3])
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.linear_rows(x, w.t().contiguous().t(), b)
    # the public op names the argument before any kernel runs
    with pytest.raises(ValueError, match="weight must have shape"):
        linear(x, w.t(), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, w, b[:3])
    with pytest.raises(TypeError, match="weight must have dtype"):
        linear(x, w.double(), b)


def test_the_module_is_a_drop_in_nn_linear():
    """inl_kernels.Linear: nn.Linear's parameters, state_dict and initialisation (the same RNG
    draws), its forward's bits wherever the kernel does not run, the kernel's within rounding
    where it does; loads an nn.Linear's state_dict and back."""
    torch.manual_seed(3)
    plain = torch.nn.Linear(40, 24)
    torch.manual_seed(3)
    ours = inl_kernels.Linear(40, 24)
    assert isinstance(ours, torch.nn.Linear) and "backend='auto'" in repr(ours)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ours.state_dict().values()))
    assert list(plain.state_dict()) == list(ours.state_dict())
    x = torch.randn(2, 5, 40)
    assert torch.equal(ours(input=x), plain(input=x))  # nn.Linear's argument name
    assert torch.equal(ours(x), plain(x))  # 10 rows, with a gradient
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))  # 10 rows
        few = x[:1, :3]
        torch.testing.assert_close(ours(few), plain(few), rtol=2e-6, atol=2e-6)
        assert ours(few).shape == (1, 3, 24)
    reference = inl_kernels.Linear(40, 24, backend="reference")
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(reference(x[:1, :3]), plain(x[:1, :3]))  # the reference: F.linear itself


def test_prepared_inference_gives_the_bits_of_linear():
    from inl_kernels.common import direct_calls
    from inl_kernels.cpu import linear as mod
    for shape in ((1, 1, 40), (3, 40), (2, 3, 40)):
        g = torch.Generator().manual_seed(4)
        x, w = torch.randn(*shape, generator=g), torch.randn(24, 40, generator=g)
        with torch.no_grad():
            want = linear(x, w)
            with direct_calls():
                assert torch.equal(mod.prepared_inference(w)(x), want)
