"""The CPU attention (PyTorch's fused CPU kernel behind inl_kernels/cpu/attention.py) against the
reference: causal prefill, KV-cache decode (one query, and a chunk of queries, at the end of the
keys), non-causal, GQA, RoPE inside the op, gradients, low precision against the reference's own
error, and through the attention module with and without a static KV cache."""
import pytest
import torch

from inl_kernels import GQAttention, gqa_attention, rope_tables
from inl_kernels._dispatch import resolve

ATTENTION_CASES = [  # B, Hq, Hkv, Sq, Skv, D
    (2, 8, 2, 16, 16, 32),   # prefill, GQA
    (1, 4, 4, 1, 23, 16),    # decode, MHA
    (2, 6, 3, 5, 19, 24),    # a chunk of queries after a cache
    (1, 4, 1, 7, 7, 8),      # one K/V head
]


def make(B, Hq, Hkv, Sq, Skv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(B, Hq, Sq, D), r(B, Hkv, Skv, D), r(B, Hkv, Skv, D)


def run(backend, q, k, v, grad_out=None, **kw):
    q, k, v = (t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v))
    out = gqa_attention(q, k, v, backend=backend, **kw)
    if grad_out is None:
        return [out]
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def test_auto_picks_the_cpu_attention():
    q, k, v = make(1, 4, 2, 3, 5, 8)
    assert resolve("attention", "auto", "cpu", q, k, v, True, None, None).__module__ == "inl_kernels.cpu.attention"


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_rope", [False, True])
def test_matches_reference_fp32_with_gradients(case, causal, use_rope):
    q, k, v = make(*case)
    rope = rope_tables(64, case[-1]) if use_rope else None
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    got = run("cpu", q, k, v, do, causal=causal, rope=rope, scale=0.3)
    want = run("reference", q.double(), k.double(), v.double(), do.double(), causal=causal,
               rope=None if rope is None else tuple(t.double() for t in rope), scale=0.3)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_references_own_error(dtype):
    """bf16/fp16 against the fp64 reference: no worse than twice the eager reference's own error
    in that dtype on the same inputs (plus one ulp of slack)."""
    q, k, v = make(2, 8, 2, 9, 21, 32, dtype=dtype, seed=3)
    rope = rope_tables(32, 32)
    exact = gqa_attention(q.double(), k.double(), v.double(), rope=tuple(t.double() for t in rope),
                          backend="reference")
    ours = gqa_attention(q, k, v, rope=rope, backend="cpu")
    eager = gqa_attention(q, k, v, rope=rope, backend="reference")
    assert ours.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert (ours.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max() + ulp


def test_module_with_and_without_the_kv_cache():
    """GQAttention on the cpu backend: a sequence at once, and the same sequence as a prompt then
    token by token through the model's static KV cache (unrotated keys, rotated inside the op),
    both equal to the reference module's full-sequence output."""
    from inl_llm.cache import KVCache

    torch.manual_seed(0)
    cpu = GQAttention(32, 8, 2, max_seq_len=16, backend="cpu")
    ref = GQAttention(32, 8, 2, max_seq_len=16, backend="reference")
    ref.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1))
    want, _ = ref(x)
    full, _ = cpu(x)
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    cache = KVCache(1, 2, 2, 4, 16, dtype=torch.float32)
    pieces = []
    for start, end in [(0, 6)] + [(t, t + 1) for t in range(6, 11)]:
        cache.begin(end - start)
        pieces.append(cpu(x[:, start:end], past_key_value=cache.layers[0], use_cache=True)[0])
        cache.commit()
    torch.testing.assert_close(torch.cat(pieces, dim=1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_rope", [False, True])
def test_cache_lengths_and_left_padding_match_reference(causal, use_rope):
    """kv_lens (a static cache's filled length per row, unequal here) and kv_starts (left
    padding): the masked path against the reference, forward and gradients; a query that sees no
    key (inside the padding) returns zeros and no NaN reaches any gradient."""
    q, k, v = make(3, 4, 2, 3, 12, 8, seed=4)
    kv_lens = torch.tensor([12, 7, 9], dtype=torch.int32)
    kv_starts = torch.tensor([0, 2, 7], dtype=torch.int32)  # row 2: its first query sees no key
    rope = rope_tables(16, 8) if use_rope else None
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    kw = dict(causal=causal, rope=rope, kv_lens=kv_lens, kv_starts=kv_starts)
    got = run("cpu", q, k, v, do, **kw)
    want = run("reference", q, k, v, do, **kw)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    if causal:
        assert torch.equal(got[0][2, :, 0], torch.zeros_like(got[0][2, :, 0]))
    same = run("cpu", q, k, v, do, causal=causal, rope=rope, kv_lens=torch.full((3,), 10, dtype=torch.int32))
    plain = run("cpu", q, k[:, :, :10], v[:, :, :10], do, causal=causal, rope=rope)
    torch.testing.assert_close(same[0], plain[0], rtol=0, atol=0)  # equal lengths: the cut cache
