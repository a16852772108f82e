"""The CPU decode attention (csrc/cpu/attention.cpp: at most DECODE_QUERIES queries per row, eager
inference, RoPE on the fly) against the fp64 reference: GQA, MHA and MQA, causal or not, with and
without RoPE, static-cache lengths and left padding (queries that see no key), strided q as the
model passes it, odd sizes; low precision within the reference's own error; the SDPA path (and
the op) wherever the kernel does not apply; bad arguments to the extension raise."""
import pytest
import torch

from inl_kernels import gqa_attention, rope_tables
from inl_kernels.cpu import unavailable_reason
from inl_kernels.cpu import attention as cpu_attention

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.usefixtures("each_cpu_path")]

CASES = [  # B, Hq, Hkv, Sq, Skv, D
    (1, 8, 2, 1, 33, 64),   # the model's decode step
    (1, 4, 4, 1, 1, 16),    # MHA, a single key
    (2, 6, 1, 3, 17, 24),   # MQA, a chunk of queries
    (3, 4, 2, 8, 8, 2),     # as many queries as keys, the smallest even D
    (2, 2, 1, 5, 40, 130),  # a head dim past any vector width
]


def make(B, Hq, Hkv, Sq, Skv, D, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if strided:  # as the model makes q: [B, S, H, D] viewed as [B, H, S, D]
        q = r(B, Sq, Hq, D).transpose(1, 2)
    else:
        q = r(B, Hq, Sq, D)
    return q, r(B, Hkv, Skv, D), r(B, Hkv, Skv, D)


def lengths(B, Sq, Skv, seed):
    """Per-row filled lengths in [Sq, Skv] and left paddings up to and past the queries."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(Sq, Skv + 1, (B,), generator=g)
    starts = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=g)[0] for n in lens])
    return lens.to(torch.int32), starts


def reference(q, k, v, rope, **kw):
    rope64 = None if rope is None else tuple(t.double() for t in rope)
    return gqa_attention(q.double(), k.double(), v.double(), rope=rope64, backend="reference", **kw)


def ours(q, k, v, rope, **kw):
    with torch.no_grad():
        assert cpu_attention._decode_kernel_runs(q, k, v, rope, kw.get("kv_lens"), kw.get("kv_starts"))
        return gqa_attention(q, k, v, rope=rope, backend="cpu", **kw)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("cache", ["none", "lens", "lens+starts"])
def test_matches_reference_fp32(case, causal, use_rope, cache):
    B, Hq, Hkv, Sq, Skv, D = case
    q, k, v = make(*case, strided=True, seed=Skv)
    rope = rope_tables(Skv + 3, D) if use_rope else None
    kw = dict(causal=causal, scale=0.7)
    if cache != "none":
        lens, starts = lengths(B, Sq, Skv, seed=D)
        kw["kv_lens"] = lens
        if cache == "lens+starts":
            kw["kv_starts"] = starts
    got = ours(q, k, v, rope, **kw)
    assert got.dtype == torch.float32 and got.shape == (B, Hq, Sq, D) and got.is_contiguous()
    torch.testing.assert_close(got.double(), reference(q, k, v, rope, **kw), rtol=2e-5, atol=2e-5)


def test_queries_that_see_no_key_are_zero():
    """Left padding past a query (causal): the reference's zeros, not NaN."""
    q, k, v = make(2, 4, 2, 3, 6, 8)
    kw = dict(kv_lens=torch.tensor([6, 4]), kv_starts=torch.tensor([5, 4]), causal=True)
    got = ours(q, k, v, rope_tables(8, 8), **kw)
    want = reference(q, k, v, rope_tables(8, 8), **kw)
    assert (want[1] == 0).all() and (want[0, :, :2] == 0).all()  # the case does what it says
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_references_own_error(dtype):
    q, k, v = make(2, 8, 2, 4, 29, 32, dtype=dtype, seed=4)
    rope = rope_tables(32, 32)
    lens, starts = lengths(2, 4, 29, seed=5)
    kw = dict(kv_lens=lens, kv_starts=starts)
    exact = reference(q, k, v, rope, **kw)
    got = ours(q, k, v, rope, **kw)
    eager = gqa_attention(q, k, v, rope=rope, backend="reference", **kw)
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert (got.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max() + ulp


def test_the_sdpa_path_runs_otherwise(monkeypatch):
    """More queries than DECODE_QUERIES, a gradient, or a RoPE table shorter than the keys: the
    kernel is not called (and the result is still the reference's)."""
    from inl_kernels.cpu import _C

    def boom(*args):
        raise AssertionError("attention_decode called")
    q, k, v = make(1, 4, 2, 9, 12, 16)
    rope = rope_tables(12, 16)
    monkeypatch.setattr(cpu_attention, "_C", type("NoDecode", (), {"attention_decode": staticmethod(boom)}))
    with torch.no_grad():
        out = gqa_attention(q, k, v, rope=rope, backend="cpu")  # 9 queries
    torch.testing.assert_close(out.double(), reference(q, k, v, rope), rtol=2e-5, atol=2e-5)
    q1 = q[:, :, -1:].clone().requires_grad_()
    gqa_attention(q1, k, v, rope=rope, backend="cpu").sum().backward()  # a gradient
    assert q1.grad is not None
    with torch.no_grad():
        assert not cpu_attention._decode_kernel_runs(q1, k, v, rope_tables(11, 16), None, None)
        assert cpu_attention._decode_kernel_runs(q1, k, v, rope, None, None)
    assert _C is not None


def test_extension_rejects_bad_arguments():
    """The entry point checks what the Python layer would have: an error, never a bad read."""
    from inl_kernels.cpu import _C
    q, k, v = make(2, 4, 2, 1, 5, 8)
    cos, sin = rope_tables(5, 8)
    with pytest.raises(RuntimeError, match="kv_lens values"):
        _C.attention_decode(q, k, v, True, 1.0, cos, sin, torch.tensor([5, 6]), None)
    with pytest.raises(RuntimeError, match="cover every key"):
        _C.attention_decode(q, k, v, True, 1.0, cos[:4], sin[:4], None, None)
    with pytest.raises(RuntimeError, match="multiple of the K/V heads"):
        _C.attention_decode(q[:, :3], k, v, True, 1.0, None, None, None, None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        _C.attention_decode(q, k.double(), v, True, 1.0, None, None, None, None)
    with pytest.raises(RuntimeError, match="kv_lens must be an integer tensor"):  # 4.7 was read as 4
        _C.attention_decode(q, k, v, True, 1.0, cos, sin, torch.tensor([4.7, 5.0]), None)
    with pytest.raises(RuntimeError, match="cos and sin must be CPU tensors"):
        _C.attention_decode(q, k, v, True, 1.0, cos.to("meta"), sin.to("meta"), None, None)
    # sizes past 2^31 (expanded views: no memory) were cut to 32 bits and attended to no key
    big = k[:, :, :1].expand(2, 2, 2**31 + 1, 8)
    with pytest.raises(RuntimeError, match="below 2"):
        _C.attention_decode(q, big, big, False, 1.0, None, None, None, None)
    heads = q[:, :1].expand(2, 2**31, 1, 8)
    with pytest.raises(RuntimeError, match="below 2"):
        _C.attention_decode(heads, k[:, :1], v[:, :1], False, 1.0, None, None, None, None)


@pytest.mark.usefixtures("one_thread")
def test_model_decode_with_the_kernel_matches_the_sdpa_path(monkeypatch):
    """Greedy generation of the tiny model on the C++ backend: the same tokens with the decode
    kernel as with the SDPA path."""
    import inl_llm
    torch.manual_seed(0)
    model = inl_llm.create_model("tiny", backend="cpu").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        fast = inl_llm.generate(model, ids, max_new_tokens=8, do_sample=False, attention_mask=mask)
        monkeypatch.setattr(cpu_attention, "DECODE_QUERIES", 0)
        sdpa = inl_llm.generate(model, ids, max_new_tokens=8, do_sample=False, attention_mask=mask)
    assert torch.equal(fast, sdpa)


def test_k_and_v_sliced_from_larger_caches():
    """k and v with strides of their own (views into bigger buffers, different from each other):
    the kernel reads each through its strides."""
    q, _, _ = make(2, 4, 2, 1, 9, 16, seed=8)
    g = torch.Generator().manual_seed(9)
    k_big = torch.randn(2, 3, 20, 16, generator=g)
    v_big = torch.randn(2, 2, 9, 40, generator=g)
    k, v = k_big[:, 1:, 5:14], v_big[:, :, :, 7:23]
    assert k.stride() != v.stride() and not k.is_contiguous() and not v.is_contiguous()
    rope = rope_tables(12, 16)
    kw = dict(kv_lens=torch.tensor([9, 6]), kv_starts=torch.tensor([0, 2]))
    torch.testing.assert_close(ours(q, k, v, rope, **kw).double(), reference(q, k, v, rope, **kw),
                               rtol=2e-5, atol=2e-5)


def test_autocast_gradients_of_the_tables_and_forward_ad_keep_the_sdpa_path():
    """Under autocast SDPA computes in the autocast dtype (so does the result, whatever the
    number of queries); a RoPE table that wants a gradient gets it; a forward-AD level keeps the
    path with a derivative rule. The kernel runs in none of these."""
    import torch.autograd.forward_ad as fwAD
    q, k, v = make(1, 4, 2, 1, 6, 8, seed=10)
    rope = rope_tables(9, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_attention._decode_kernel_runs(q, k, v, rope, None, None)
        one = gqa_attention(q, k, v, rope=rope, backend="cpu")
        nine = gqa_attention(*make(1, 4, 2, 9, 9, 8, seed=11), rope=rope, backend="cpu")
    assert one.dtype == nine.dtype == torch.bfloat16
    cos = rope[0].clone().requires_grad_()
    out = gqa_attention(q, k, v, rope=(cos, rope[1]), backend="cpu")
    assert out.requires_grad
    out.sum().backward()
    assert cos.grad is not None and cos.grad.abs().sum() > 0
    with torch.no_grad(), fwAD.dual_level():
        assert not cpu_attention._decode_kernel_runs(q, k, v, rope, None, None)
