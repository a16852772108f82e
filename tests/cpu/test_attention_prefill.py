"""The CPU prefill attention (csrc/cpu/attention.cpp's prefill kernel: Sq = Skv, no gradient)
against the fp64 reference on every CPU path: GQA, MHA and MQA, causal or not, with and without
RoPE, odd lengths and head dims past any vector width, strided q and v as the model passes them;
low precision within the reference's own error; each query's bits independent of its batch, of
the thread count and of later keys; the op under torch.compile; SDPA wherever the kernel does
not apply; bad arguments."""
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


@pytest.fixture
def calls(monkeypatch):
    """The prefill kernel on every path and length, and a count of its calls."""
    from inl_kernels.cpu import attention as cpu_attention
    monkeypatch.setattr(cpu_attention, "PREFILL_KEYS", {"avx512": 1 << 20, "avx2": 1 << 20, "base": 1 << 20})
    real, count = cpu_attention._C.attention_prefill, [0]

    def spy(*args):
        count[0] += 1
        return real(*args)
    monkeypatch.setattr(cpu_attention._C, "attention_prefill", spy)
    return count


def make(B, Hq, Hkv, S, D, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if strided:  # as the model makes q, k, v: [B, S, H, D] viewed as [B, H, S, D]
        return r(B, S, Hq, D).transpose(1, 2), r(B, S, Hkv, D).transpose(1, 2), r(B, S, Hkv, D).transpose(1, 2)
    return r(B, Hq, S, D), r(B, Hkv, S, D), r(B, Hkv, S, D)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_rope", [False, True])
def test_matches_fp64_reference(case, causal, use_rope, calls):
    D = case[-1]
    if use_rope and D % 2:
        pytest.skip("RoPE needs an even head dim")
    q, k, v = make(*case, strided=case[0] == 2)
    rope = rope_tables(256, D) if use_rope else None
    with torch.no_grad():
        got = gqa_attention(q, k, v, causal=causal, rope=rope, scale=0.3, backend="cpu")
    want = gqa_attention(q.double(), k.double(), v.double(), causal=causal, scale=0.3, backend="reference",
                         rope=None if rope is None else tuple(t.double() for t in rope))
    assert calls[0] == 1
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_references_own_error(dtype, calls):
    """bf16/fp16: no worse than twice the eager reference's own error in that dtype on the same
    inputs (plus one ulp of slack)."""
    q, k, v = make(2, 8, 2, 67, 32, dtype=dtype, seed=3)
    rope = rope_tables(128, 32)
    exact = gqa_attention(q.double(), k.double(), v.double(), rope=tuple(t.double() for t in rope),
                          backend="reference")
    with torch.no_grad():
        ours = gqa_attention(q, k, v, rope=rope, backend="cpu")
    eager = gqa_attention(q, k, v, rope=rope, backend="reference")
    assert calls[0] == 1 and ours.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert (ours.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max() + ulp


def test_each_query_alone_in_its_batch_threads_and_prefix(calls):
    """A query's bits do not depend on the other rows of the batch, on the thread count, or (causal)
    on the keys after it: the first S' queries of a prefill of S are the prefill of S'."""
    from inl_kernels.cpu import _C
    q, k, v = make(3, 8, 2, 150, 64, seed=5)
    full = _C.attention_prefill(q, k, v, True, 0.125)
    for b in range(3):
        assert torch.equal(_C.attention_prefill(q[b:b + 1], k[b:b + 1], v[b:b + 1], True, 0.125), full[b:b + 1])
    for n in (1, 63, 64, 65, 100):
        short = _C.attention_prefill(q[:, :, :n].contiguous(), k[:, :, :n].contiguous(), v[:, :, :n].contiguous(),
                                     True, 0.125)
        assert torch.equal(short, full[:, :, :n])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C.attention_prefill(q, k, v, True, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


def test_sdpa_where_the_kernel_does_not_apply(calls, monkeypatch):
    """Gradients, autocast and lengths past PREFILL_KEYS take SDPA, which gives the same values
    within fp32 rounding."""
    from inl_kernels.cpu import attention as cpu_attention
    q, k, v = make(1, 4, 2, 40, 16, seed=7)
    with torch.no_grad():
        fast = gqa_attention(q, k, v, backend="cpu")
    assert calls[0] == 1
    qg = q.clone().requires_grad_()
    slow = gqa_attention(qg, k, v, backend="cpu")
    slow.sum().backward()
    assert calls[0] == 1 and qg.grad is not None
    torch.testing.assert_close(slow.detach(), fast, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        gqa_attention(q, k, v, backend="cpu")
    assert calls[0] == 1
    monkeypatch.setattr(cpu_attention, "PREFILL_KEYS", {"avx512": 39, "avx2": 39, "base": 39})
    with torch.no_grad():
        longer = gqa_attention(q, k, v, backend="cpu")
    assert calls[0] == 1
    torch.testing.assert_close(longer, fast, rtol=1e-5, atol=1e-6)


def test_the_op_under_compile_gives_the_eager_bits(calls):
    """Outside plain eager inference the kernel runs as the op inl::cpu_attention_prefill: a
    compiled inference (fullgraph, no graph break) gives the eager call's bits; the op's schema
    and fake function hold."""
    from inl_kernels.cpu.attention import cpu_attention_prefill_op
    q, k, v = make(2, 8, 2, 40, 16, seed=11)
    rope = rope_tables(64, 16)

    def f(q, k, v):
        return gqa_attention(q, k, v, rope=rope, backend="cpu")
    with torch.no_grad():
        eager = f(q, k, v)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert calls[0] == 2 and torch.equal(compiled, eager)
    torch.library.opcheck(cpu_attention_prefill_op, (q, k, v, True, 0.25), test_utils=("test_schema", "test_faketensor"))


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
