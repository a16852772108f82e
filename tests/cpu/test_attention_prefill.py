"""The CPU prefill attention (csrc/cpu/attention.cpp's prefill kernels, forward and backward:
causal, Sq = Skv) against the fp64 reference on every CPU path: GQA, MHA and MQA, causal or not, with and without
RoPE, odd lengths and head dims past any vector width, strided q and v as the model passes them;
low precision within the reference's own error; each query's bits independent of its batch, of
the thread count and of later keys (and the gradients' of the batch and the thread count); the
ops under torch.compile; SDPA wherever the kernels do not apply; bad arguments."""
import pytest
import torch

from inl_kernels import gqa_attention, rope_tables
from inl_kernels.cpu import unavailable_reason

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.usefixtures("each_cpu_path")]

CASES = [  # B, Hq, Hkv, S, D
    (2, 8, 2, 70, 64),     # the model's heads, past one block of 64 queries
    (1, 4, 4, 9, 16),      # MHA, the fewest queries past the decode kernel's
    (3, 6, 3, 77, 24),     # an odd length, a head dim below one vector
    (1, 2, 1, 130, 130),   # MQA, a head dim past any vector width, three query blocks
    (2, 4, 2, 33, 2),      # the smallest even head dim
    (1, 3, 1, 12, 7),      # an odd head dim (no RoPE)
]
KERNELS = ("attention_prefill", "attention_prefill_lse", "attention_prefill_backward")


def spy_kernels(monkeypatch):
    """A count of each prefill kernel's calls."""
    from inl_kernels.cpu import attention as cpu_attention
    count = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        def spy(*args, _real=getattr(cpu_attention._C, name), _name=name):
            count[_name] += 1
            return _real(*args)
        monkeypatch.setattr(cpu_attention._C, name, spy)
    return count


@pytest.fixture
def calls(monkeypatch):
    """The prefill kernels on every path and length, and a count of each one's calls."""
    from inl_kernels.cpu import attention as cpu_attention
    every = {"avx512": 1 << 20, "avx2": 1 << 20, "base": 1 << 20}
    monkeypatch.setattr(cpu_attention, "PREFILL_KEYS", every)
    monkeypatch.setattr(cpu_attention, "PREFILL_TRAIN_KEYS", every)
    return spy_kernels(monkeypatch)


def make(B, Hq, Hkv, S, D, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if strided:  # as the model makes q, k, v: [B, S, H, D] viewed as [B, H, S, D]
        return r(B, S, Hq, D).transpose(1, 2), r(B, S, Hkv, D).transpose(1, 2), r(B, S, Hkv, D).transpose(1, 2)
    return r(B, Hq, S, D), r(B, Hkv, S, D), r(B, Hkv, S, D)


def with_grads(q, k, v, grad_out, **kw):
    """[out, dq, dk, dv] of gqa_attention."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = gqa_attention(q, k, v, **kw)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_rope", [False, True])
def test_matches_fp64_reference(case, causal, use_rope, calls):
    """Forward without a gradient and forward + backward against the fp64 reference; the kernels
    run under a causal mask only (non-causal: SDPA, which skips nothing there either)."""
    D = case[-1]
    if use_rope and D % 2:
        pytest.skip("RoPE needs an even head dim")
    q, k, v = make(*case, strided=case[0] == 2)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    rope = rope_tables(256, D) if use_rope else None
    with torch.no_grad():
        got = gqa_attention(q, k, v, causal=causal, rope=rope, scale=0.3, backend="cpu")
    got_grads = with_grads(q, k, v, do, causal=causal, rope=rope, scale=0.3, backend="cpu")
    want = with_grads(q.double(), k.double(), v.double(), do.double(), causal=causal, scale=0.3, backend="reference",
                      rope=None if rope is None else tuple(t.double() for t in rope))
    assert calls == dict.fromkeys(KERNELS, 1 if causal else 0)
    assert got.dtype == torch.float32 and got.shape == want[0].shape
    for a, b in zip([got] + got_grads, want[:1] + want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_references_own_error(dtype, calls):
    """bf16/fp16, output and gradients: no worse than twice the eager reference's own error in
    that dtype on the same inputs (plus one ulp of the largest value)."""
    q, k, v = make(2, 8, 2, 67, 32, dtype=dtype, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    rope = rope_tables(128, 32)
    exact = with_grads(q.double(), k.double(), v.double(), do.double(), rope=tuple(t.double() for t in rope),
                       backend="reference")
    ours = with_grads(q, k, v, do, rope=rope, backend="cpu")
    eager = with_grads(q, k, v, do, rope=rope, backend="reference")
    assert calls["attention_prefill_backward"] == 1
    for o, e, x in zip(ours, eager, exact):
        assert o.dtype == dtype
        slack = torch.finfo(dtype).eps * x.abs().max()
        assert (o.double() - x).abs().max() <= 2 * (e.double() - x).abs().max() + slack


def test_each_query_alone_in_its_batch_threads_and_prefix(calls):
    """A query's bits do not depend on the other rows of the batch, on the thread count, or (causal)
    on the keys after it: the first S' queries of a prefill of S are the prefill of S'. The
    gradients' bits do not depend on the batch or the thread count either."""
    from inl_kernels.cpu import _C
    q, k, v = make(3, 8, 2, 150, 64, seed=5)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    full = _C.attention_prefill(q, k, v, True, 0.125)
    out, lse = _C.attention_prefill_lse(q, k, v, True, 0.125)
    assert torch.equal(out, full)
    grads = _C.attention_prefill_backward(do, q, k, v, out, lse, True, 0.125)
    for b in range(3):
        one = slice(b, b + 1)
        assert torch.equal(_C.attention_prefill(q[one], k[one], v[one], True, 0.125), full[one])
        alone = _C.attention_prefill_backward(do[one], q[one], k[one], v[one], out[one], lse[one], True, 0.125)
        for a, g in zip(alone, grads):
            assert torch.equal(a, g[one])
    for n in (1, 63, 64, 65, 100):
        short = _C.attention_prefill(q[:, :, :n].contiguous(), k[:, :, :n].contiguous(), v[:, :, :n].contiguous(),
                                     True, 0.125)
        assert torch.equal(short, full[:, :, :n])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_C.attention_prefill(q, k, v, True, 0.125), full)
        for a, g in zip(_C.attention_prefill_backward(do, q, k, v, out, lse, True, 0.125), grads):
            assert torch.equal(a, g)
    finally:
        torch.set_num_threads(threads)


def test_peaked_scores(calls):
    """Scores spread over thousands: most softmax weights underflow (the kernels drop those below
    2^-64 of the row's largest, far below fp32 rounding): values and gradients still match fp64."""
    q, k, v = make(2, 4, 2, 90, 32, seed=14)
    q = q * 40
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(15))
    got = with_grads(q, k, v, do, backend="cpu")
    want = with_grads(q.double(), k.double(), v.double(), do.double(), backend="reference")
    assert calls["attention_prefill_backward"] == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5 * b.abs().max().item())


def test_an_expanded_gradient(calls):
    """out.sum().backward() hands the backward a gradient with zero strides: the same gradients as
    a dense tensor of ones."""
    q, k, v = make(1, 4, 2, 20, 16, seed=13)
    dense = with_grads(q, k, v, torch.ones(q.shape), backend="cpu")
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    gqa_attention(q, k, v, backend="cpu").sum().backward()
    assert calls["attention_prefill_backward"] == 2
    for a, b in zip((q.grad, k.grad, v.grad), dense[1:]):
        assert torch.equal(a, b)


def test_chunks_of_heads():
    """Past 16 Mi floats of laid-out keys and values the (row, K/V head) groups run in chunks
    (4100 heads of 64 × 32 here: two chunks forward and backward): each head's bits are those it
    gets in a call of its own."""
    from inl_kernels.cpu import _C
    q, k, v = make(1, 4100, 4100, 64, 32, seed=16)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(17))
    out, lse = _C.attention_prefill_lse(q, k, v, True, 0.2)
    grads = _C.attention_prefill_backward(do, q, k, v, out, lse, True, 0.2)
    for heads in (slice(0, 3), slice(4094, 4100)):
        part = [t[:, heads].contiguous() for t in (do, q, k, v)]
        o, l = _C.attention_prefill_lse(*part[1:], True, 0.2)
        assert torch.equal(o, out[:, heads]) and torch.equal(l, lse[:, heads])
        for a, g in zip(_C.attention_prefill_backward(*part, o, l, True, 0.2), grads):
            assert torch.equal(a, g[:, heads])


def test_sdpa_where_the_kernels_do_not_apply(calls, monkeypatch):
    """Autocast, lengths past PREFILL_KEYS (PREFILL_TRAIN_KEYS with a gradient) and non-causal
    attention take SDPA, which gives the same values within fp32 rounding."""
    from inl_kernels.cpu import attention as cpu_attention
    q, k, v = make(1, 4, 2, 40, 16, seed=7)
    with torch.no_grad():
        fast = gqa_attention(q, k, v, backend="cpu")
        assert calls["attention_prefill"] == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gqa_attention(q, k, v, backend="cpu")
        monkeypatch.setattr(cpu_attention, "PREFILL_KEYS", {"avx512": 39, "avx2": 39, "base": 39})
        longer = gqa_attention(q, k, v, backend="cpu")
        gqa_attention(q, k, v, causal=False, backend="cpu")
    monkeypatch.setattr(cpu_attention, "PREFILL_TRAIN_KEYS", {"avx512": 39, "avx2": 39, "base": 39})
    qg = q.clone().requires_grad_()
    gqa_attention(qg, k, v, backend="cpu").sum().backward()
    assert calls == {"attention_prefill": 1, "attention_prefill_lse": 0, "attention_prefill_backward": 0}
    torch.testing.assert_close(longer, fast, rtol=1e-5, atol=1e-6)


def test_default_limits(each_cpu_path, monkeypatch):
    """As shipped: a prefill of 40 keys runs the forward kernel on every path, and with a gradient
    the training kernels everywhere but on the baseline path (whose backward is slower than SDPA's)."""
    count = spy_kernels(monkeypatch)
    q, k, v = make(1, 4, 2, 40, 16, seed=18)
    with torch.no_grad():
        gqa_attention(q, k, v, backend="cpu")
    qg = q.clone().requires_grad_()
    gqa_attention(qg, k, v, backend="cpu").sum().backward()
    trains = int(each_cpu_path != "base")
    assert count == {"attention_prefill": 1, "attention_prefill_lse": trains, "attention_prefill_backward": trains}


def test_the_ops_under_compile_give_the_eager_bits(calls):
    """Outside plain eager inference the kernels run as the ops inl::cpu_attention_prefill and
    inl::cpu_attention_prefill_train (with its backward): compiled inference and a compiled
    forward + backward (fullgraph, no graph break) give the eager bits; the ops' schemas, fake
    functions and autograd registration hold."""
    from inl_kernels.cpu.attention import (cpu_attention_prefill_backward_op, cpu_attention_prefill_op,
                                           cpu_attention_prefill_train_op)
    q, k, v = make(2, 8, 2, 40, 16, seed=11)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    rope = rope_tables(64, 16)

    def f(q, k, v):
        return gqa_attention(q, k, v, rope=rope, backend="cpu")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = f(q, k, v)
        assert torch.equal(compiled(q, k, v), eager)
    assert calls["attention_prefill"] == 2
    grads = []
    for fn in (f, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward(do)
        grads.append([t.grad for t in leaves])
    assert calls["attention_prefill_backward"] == 2
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    torch.library.opcheck(cpu_attention_prefill_op, (q, k, v, True, 0.25), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(cpu_attention_prefill_train_op, (q.requires_grad_(), k, v, True, 0.25))
    out, lse = cpu_attention_prefill_train_op(q.detach(), k, v, True, 0.25)
    torch.library.opcheck(cpu_attention_prefill_backward_op, (do, q.detach(), k, v, out, lse, True, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


def test_empty_sizes():
    """No queries, no batch rows, no head dim: empty results (with D = 0 every score is 0, so lse
    is the log of the number of keys a query sees) and zero-sized gradients."""
    from inl_kernels.cpu import _C
    q, k, v = make(2, 4, 2, 5, 8)
    for qq, kk, vv in ((q[:, :, :0], k[:, :, :0], v[:, :, :0]), (q[:0], k[:0], v[:0])):
        out, lse = _C.attention_prefill_lse(qq, kk, vv, True, 0.5)
        assert out.shape == qq.shape and lse.shape == qq.shape[:3]
        grads = _C.attention_prefill_backward(out, qq, kk, vv, out, lse, True, 0.5)
        assert [g.shape for g in grads] == [qq.shape, kk.shape, vv.shape]
    q0, k0, v0 = (t[..., :0].contiguous() for t in (q, k, v))
    out, lse = _C.attention_prefill_lse(q0, k0, v0, True, 0.5)
    assert out.shape == q0.shape
    assert torch.allclose(lse, torch.log(torch.arange(1.0, 6.0)).expand(2, 4, 5), rtol=1e-6, atol=1e-6)
    _, lse = _C.attention_prefill_lse(q0, k0, v0, False, 0.5)
    assert torch.allclose(lse, torch.full((2, 4, 5), float(torch.log(torch.tensor(5.0)))), rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise():
    from inl_kernels.cpu import _C
    q, k, v = make(1, 4, 2, 8, 16)
    with pytest.raises(RuntimeError, match="k and v must be"):
        _C.attention_prefill(q, k[:, :, :7], v[:, :, :7], True, 0.25)
    with pytest.raises(RuntimeError, match="multiple of the K/V heads"):
        _C.attention_prefill(q[:, :3], k, v, True, 0.25)
    with pytest.raises(RuntimeError, match="share a dtype"):
        _C.attention_prefill(q, k.double(), v, True, 0.25)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        _C.attention_prefill(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), True, 0.25)
    out, lse = _C.attention_prefill_lse(q, k, v, True, 0.25)
    with pytest.raises(RuntimeError, match="grad and out must be"):
        _C.attention_prefill_backward(out[:, :, :7], q, k, v, out, lse, True, 0.25)
    with pytest.raises(RuntimeError, match="lse must be"):
        _C.attention_prefill_backward(out, q, k, v, out, lse.double(), True, 0.25)
