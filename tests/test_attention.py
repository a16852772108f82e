"""Attention reference against a naive per-head softmax loop, and KV-cache decode against
full recomputation."""
import math

import pytest
import torch

from inl_kernels import gqa_attention, rope, rope_tables


def naive(q, k, v, causal, scale=None):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    scale = scale or 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            kv = hq // (Hq // Hkv)
            for i in range(Sq):
                qpos = Skv - Sq + i
                s = [(q[b, hq, i].double() @ k[b, kv, j].double()).item() * scale for j in range(Skv)]
                s = [x if (not causal or j <= qpos) else -math.inf for j, x in enumerate(s)]
                m = max(s)
                p = [math.exp(x - m) for x in s]
                z = sum(p)
                out[b, hq, i] = sum(p[j] / z * v[b, kv, j].double() for j in range(Skv))
    return out


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("Sq,Skv", [(5, 5), (1, 7), (3, 9)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_naive(Hq, Hkv, Sq, Skv, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Hq, Sq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, Skv, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, Skv, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gqa_attention(q, k, v, causal=causal), naive(q, k, v, causal), rtol=1e-10, atol=1e-10)


def test_decode_equals_full_recomputation():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 12, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(32, 16, dtype=torch.float64)
    full = gqa_attention(q, k, v, rope=(cos, sin))
    for Sq in (1, 4):
        dec = gqa_attention(q[:, :, -Sq:], k, v, rope=(cos, sin))
        torch.testing.assert_close(dec, full[:, :, -Sq:], rtol=1e-12, atol=1e-12)


def test_rope_inside_equals_rope_outside():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(8, 8, dtype=torch.float64)
    rq, rk = rope(q, k, cos, sin)
    torch.testing.assert_close(gqa_attention(q, k, v, rope=(cos, sin)), gqa_attention(rq, rk, v))


def test_attention_gradcheck():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(8, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: gqa_attention(a, b, c, rope=(cos, sin)), (q, k, v))
