"""Bad input raises a ValueError/TypeError that names the argument, before any backend runs."""
import pytest
import torch

import inl_kernels
from inl_kernels import gqa_attention, inl_iterate, low_rank_embedding, rms_norm, rope, rope_tables, swiglu
from tests.iterate_cases import make_args


def iterate_call(**changes):
    h, x, kw = make_args(n=3, d=8, H=4, E=2, T=2, dtype=torch.float32)
    args = dict(kw, h=h, x=x)
    args.update(changes)
    return inl_iterate(args.pop("h"), args.pop("x"), **args)


def base(name):
    h, x, kw = make_args(n=3, d=8, H=4, E=2, T=2, dtype=torch.float32)
    return dict(kw, h=h, x=x)[name]


@pytest.mark.parametrize("changes,error,match", [
    (dict(h=torch.randn(3, 8, 1)), ValueError, r"h must have shape \[\*, \*\]"),
    (dict(x=torch.randn(3, 9)), ValueError, r"x must have shape \[3, 8\]"),
    (dict(v=torch.randn(2, 8)), ValueError, r"v must have shape \[3, 8\]"),
    (dict(w_x=torch.randn(4, 7)), ValueError, r"w_x must have shape \[4, 8\]"),
    (dict(w_o=torch.randn(31, 4)), ValueError, r"w_o must have shape \[32, 4\]"),
    (dict(b_o=torch.randn(33)), ValueError, r"b_o must have shape \[32\]"),
    (dict(mod_scale=torch.ones(3)), ValueError, r"mod_scale must have shape \[4\]"),
    (dict(mu=torch.zeros(7)), ValueError, r"mu must have shape \[8\]"),
    (dict(gamma=torch.ones(3)), ValueError, r"gamma must have shape \[2\]"),
    (dict(h=torch.randint(0, 3, (3, 8))), TypeError, "h must have dtype"),
    (dict(x=torch.randn(3, 8, dtype=torch.float64)), TypeError, "x must have dtype"),
    (dict(w_h=torch.randn(4, 8, dtype=torch.float16)), TypeError, "w_h has dtype float16"),
    (dict(exc_index=torch.tensor([1.0, 2.0])), TypeError, "exc_index must have dtype"),
    (dict(exc_index=torch.tensor([3, 1])), ValueError, "exc_index must be sorted and unique"),
    (dict(exc_index=torch.tensor([2, 2])), ValueError, "exc_index must be sorted and unique"),
    (dict(exc_index=torch.tensor([1, 8])), ValueError, r"exc_index values must lie in \[0, 8\)"),
    (dict(exc_index=torch.tensor([-1, 3])), ValueError, r"exc_index values must lie in \[0, 8\)"),
    (dict(num_iterations=0), ValueError, "num_iterations must be >= 1"),
    (dict(num_iterations=2.0), TypeError, "num_iterations must be an int"),
    (dict(min_iterations=-1), ValueError, "min_iterations must be >= 0"),
    (dict(tol=-1e-3), ValueError, "tol must be >= 0"),
    (dict(dt=float("nan")), ValueError, "dt must be finite"),
    (dict(kappa="1"), TypeError, "kappa must be a real number"),
    (dict(amplitude=torch.tensor(1.0)), TypeError, "amplitude must be a real number"),
    (dict(h="tensor"), TypeError, "h must be a torch.Tensor"),
    (dict(return_info=1), TypeError, "return_info must be a bool"),
])
def test_iterate_argument_errors(changes, error, match):
    with pytest.raises(error, match=match):
        iterate_call(**changes)


def test_iterate_needs_columns():
    with pytest.raises(ValueError, match=r"h must have at least one column \(d >= 1\)"):
        iterate_call(h=torch.randn(3, 0), x=torch.randn(3, 0))


def test_exc_index_made_in_inference_mode():
    """Inference tensors have no version counter: they are checked on every call instead."""
    with torch.inference_mode():
        idx = torch.tensor([1, 4])
        iterate_call(exc_index=idx)
        iterate_call(exc_index=idx)
        with pytest.raises(ValueError, match="exc_index values"):
            iterate_call(exc_index=torch.tensor([1, 8]))


def test_iterate_non_contiguous():
    for name in ("h", "x", "w_h", "w_o"):
        t = base(name)
        bad = t.t().contiguous().t() if t.dim() == 2 else t
        with pytest.raises(ValueError, match=f"{name} must be contiguous"):
            iterate_call(**{name: bad})


def test_iterate_device_mismatch():
    meta = base("mu").to("meta")
    with pytest.raises(ValueError, match="mu must be on cpu"):
        iterate_call(mu=meta)


def test_exc_index_checked_again_after_in_place_change():
    idx = torch.tensor([1, 4])
    iterate_call(exc_index=idx)
    idx[1] = 9  # bumps the version counter: the cached check must not hide this
    with pytest.raises(ValueError, match="exc_index values"):
        iterate_call(exc_index=idx)


def test_debug_switch_catches_nan():
    h = base("h").clone()
    h[0, 0] = float("nan")
    iterate_call(h=h)  # values are not read on the hot path
    inl_kernels.set_debug(True)
    try:
        with pytest.raises(ValueError, match="h contains NaN"):
            iterate_call(h=h)
    finally:
        inl_kernels.set_debug(False)


def test_rms_norm_argument_errors():
    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must have shape"):
        rms_norm(x, w, residual=torch.randn(4, 7))
    with pytest.raises(TypeError, match="residual must have dtype"):
        rms_norm(x, w, residual=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="x must be contiguous"):
        rms_norm(torch.randn(8, 4).t(), w)


def test_rope_argument_errors():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = rope_tables(16, 8)
    with pytest.raises(ValueError, match="cos/sin hold 16 positions"):
        rope(q, k, cos, sin, position_offset=12)
    with pytest.raises(ValueError, match=r"cos must have shape \[\*, 4\]"):
        rope(q, k, cos[:, :3].contiguous(), sin[:, :3].contiguous())
    with pytest.raises(ValueError, match="head dim must be even"):
        rope(torch.randn(1, 4, 5, 7), torch.randn(1, 2, 5, 7), cos, sin)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rope(torch.randn(1, 4, 8, 5).transpose(-1, -2), k, cos, sin)


def test_zero_head_dim():
    with pytest.raises(ValueError, match="D >= 1"):
        gqa_attention(torch.randn(1, 2, 3, 0), torch.randn(1, 2, 3, 0), torch.randn(1, 2, 3, 0))
    cos, sin = rope_tables(8, 2)
    with pytest.raises(ValueError, match="even and >= 2"):
        rope(torch.randn(1, 2, 3, 0), torch.randn(1, 2, 3, 0), cos[:, :0].contiguous(), sin[:, :0].contiguous())


def test_swiglu_and_embedding_arguments():
    x = torch.randn(3, 8).bfloat16()
    w, wd = torch.randn(16, 8), torch.randn(8, 16)
    # fp32 master weights under bf16 activations: the math runs in bf16, exactly as with the weights
    # cast first (a tolerance against fp64 would judge bf16's own rounding, not the op)
    want = swiglu(x, w.bfloat16(), w.bfloat16(), wd.bfloat16())
    torch.testing.assert_close(swiglu(x, w, w, wd), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        swiglu(torch.tensor(1.0), w, w, wd)
    with pytest.raises(TypeError, match="w_up has dtype float16"):
        swiglu(x, w, w.half(), wd)
    with pytest.raises(ValueError, match=r"w_down must have shape \[8, 16\]"):
        swiglu(x, w, w, wd.t())
    low, up = torch.randn(10, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"ids values must lie in \[0, 10\)"):
        low_rank_embedding(torch.tensor([[0, 10]]), low, up)
    with pytest.raises(ValueError, match=r"ids values must lie in \[0, 10\)"):
        low_rank_embedding(torch.tensor([-1]), low, up)
    with pytest.raises(TypeError, match="ids must have dtype"):
        low_rank_embedding(torch.tensor([1.0]), low, up)


def test_attention_argument_errors():
    q, k, v = torch.randn(1, 6, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"Hq % Hkv == 0"):
        gqa_attention(q, k, v)
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match=r"Sq <= Skv"):
        gqa_attention(q, k, v)
    with pytest.raises(ValueError, match=r"v must have shape \[1, 4, 5, 8\]"):
        gqa_attention(q[:, :, :5], k, v[:, :, :4])
    with pytest.raises(TypeError, match="k must have dtype"):
        gqa_attention(q[:, :, :5], k.double(), v)
    cos, sin = rope_tables(4, 8)
    with pytest.raises(ValueError, match="cos/sin hold 4 positions"):
        gqa_attention(q[:, :, :5], k, v, rope=(cos, sin))


def test_layer_and_model_inputs_name_the_argument():
    from inl_kernels import Controller, IntegratorLayer
    import inl_llm

    layer = IntegratorLayer(16, Controller(16, 8))
    with pytest.raises(ValueError, match="x must have the layer's width d=16"):
        layer(torch.randn(2, 16), torch.randn(2, 15))
    with pytest.raises(ValueError, match="h, x .* must have one shape"):
        layer(torch.randn(3, 16), torch.randn(2, 16))
    model = inl_llm.create_model("tiny", num_layers=1, low_rank_embeddings=False)
    with pytest.raises(ValueError, match=r"input_ids values must lie in \[0, 259\)"):
        model(torch.tensor([[1, 259]]))


def test_exc_index_edited_behind_the_version_counter_is_still_checked():
    """A write through a numpy view does not bump the tensor's version: on CPU the index is
    checked on every call, so a duplicate made that way is still refused."""
    from tests.iterate_cases import make_args

    h, x, kw = make_args(n=2, d=10, E=3, dtype=torch.float32)
    inl_iterate(h, x, **kw)  # checked and accepted
    kw["exc_index"].numpy()[1] = kw["exc_index"][0].item()
    with pytest.raises(ValueError, match="exc_index must be sorted and unique"):
        inl_iterate(h, x, **kw)


def test_iteration_count_has_a_documented_maximum():
    from inl_kernels import MAX_ITERATIONS
    from tests.iterate_cases import make_args

    h, x, kw = make_args(n=1, d=4, E=1, dtype=torch.float32)
    for bad in (2**33, 2**32 + 3, 2**31 + 5, MAX_ITERATIONS + 1):
        with pytest.raises(ValueError, match=f"num_iterations must be <= {MAX_ITERATIONS}"):
            inl_iterate(h, x, **dict(kw, num_iterations=bad))


@pytest.mark.parametrize("size", [8, 3000])
def test_exc_index_value_checks_short_and_long(size):
    """Short CPU indices are checked as a list, long ones by tensor reductions: both refuse an
    index out of range, a duplicate and a descent, and accept a sorted unique one."""
    from inl_kernels import _validate as check
    count = max(2, size // 2)
    good = torch.arange(0, 2 * count, 2)
    check.sorted_unique_index("exc_index", good, 2 * count)
    bad_range, dup, down = good.clone(), good.clone(), good.clone()
    bad_range[-1] = 2 * count
    dup[1] = dup[0]
    down[-2], down[-1] = down[-1], down[-2].clone()
    with pytest.raises(ValueError, match="exc_index values must lie in"):
        check.sorted_unique_index("exc_index", bad_range, 2 * count)
    for t in (dup, down):
        with pytest.raises(ValueError, match="exc_index must be sorted and unique"):
            check.sorted_unique_index("exc_index", t, 2 * count)
