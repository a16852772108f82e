"""The drop-in modules: they call the ops with the right tensors and hold the right state."""
import math

import torch

from inl_kernels import (Controller, GQAttention, IntegratorLayer, LowRankEmbedding, RMSNorm, SwiGLU,
                         inl_iterate, rms_norm)
from inl_kernels.reference import attention


def test_controller_starts_at_the_seed_values():
    torch.manual_seed(0)
    ctrl = Controller(16, hidden=8, init_alpha=0.8, init_beta=0.5, init_gate=0.5)
    b = ctrl.out.bias.detach()
    assert torch.allclose(torch.sigmoid(b[:16]), torch.tensor(0.8))
    assert torch.allclose(torch.nn.functional.softplus(b[16:32]), torch.tensor(0.5))
    assert torch.allclose(torch.sigmoid(b[32:48]), torch.tensor(0.5))
    assert b[48:].abs().max() == 0


def test_hierarchical_mu_expands_groups():
    torch.manual_seed(0)
    layer = IntegratorLayer(10, Controller(10, 4), mu_group_size=4, mu_init=0.5)
    with torch.no_grad():
        layer.mu_local.copy_(torch.tensor([1.0, 2.0, 3.0]))
    expected = 0.5 + torch.tensor([1.0] * 4 + [2.0] * 4 + [3.0] * 2)
    assert torch.equal(layer.equilibrium(), expected)
    assert sum(p.numel() for p in (layer.mu_global, layer.mu_local)) == 1 + 3


def test_layer_calls_the_op_with_its_parameters():
    torch.manual_seed(0)
    d = 12
    layer = IntegratorLayer(d, Controller(d, 8), num_iterations=3, excitation_sparsity=0.25,
                            mu_group_size=None, tol=1e-2, min_iterations=1).double()
    assert layer.exc_index.tolist() == [0, 4, 8]
    h, x = torch.randn(2, 5, d, dtype=torch.float64), torch.randn(2, 5, d, dtype=torch.float64)
    c = layer.controller
    expected = inl_iterate(h.reshape(-1, d), x.reshape(-1, d), **c.weights(), mod_scale=layer.mod_scale,
                           mod_bias=layer.mod_bias, mu=layer.equilibrium(), exc_index=layer.exc_index,
                           gamma=layer.gamma, phi=layer.phi, amplitude=0.03, dt=0.1, kappa=1.0,
                           num_iterations=3)
    torch.testing.assert_close(layer(h, x), expected.view(2, 5, d))
    layer.eval()  # early exit switches on at inference only
    with torch.no_grad():
        _, info = layer(h, x, return_info=True)
    assert info.iterations.shape == (10,)


def test_mu_ema_moves_toward_the_batch_mean():
    torch.manual_seed(0)
    d = 6
    layer = IntegratorLayer(d, Controller(d, 4), mu_group_size=None, mu_ema_rate=0.5)
    h = torch.randn(8, d) + 3.0
    before = layer.equilibrium().detach().clone()
    layer(h, torch.zeros(8, d))
    torch.testing.assert_close(layer.equilibrium().detach(), 0.5 * before + 0.5 * h.mean(0))


def test_mu_ema_hierarchical_keeps_group_structure():
    torch.manual_seed(0)
    layer = IntegratorLayer(6, Controller(6, 4), mu_group_size=4, mu_ema_rate=1.0)
    h = torch.arange(6.0).expand(3, 6)
    layer(h, torch.zeros(3, 6))
    # rate 1: mu becomes the group means of mean(h): (0+1+2+3)/4 and (4+5)/2
    torch.testing.assert_close(layer.equilibrium().detach(), torch.tensor([1.5] * 4 + [4.5] * 2))


def test_attention_module_cache_matches_full_forward():
    torch.manual_seed(0)
    attn = GQAttention(32, num_heads=4, num_kv_heads=2, max_seq_len=16).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    full, _ = attn(x)
    out, cache = attn(x[:, :4], use_cache=True)
    steps = [out]
    for t in range(4, 7):
        o, cache = attn(x[:, t:t + 1], past_key_value=cache, use_cache=True)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache[0].shape == (2, 2, 7, 8)


def test_attention_module_is_causal_attention_of_projections():
    torch.manual_seed(1)
    attn = GQAttention(16, num_heads=2, max_seq_len=8).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    q = attn.q_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    ref = attention(q, k, v, True, None, (attn.cos.double(), attn.sin.double()))
    torch.testing.assert_close(attn(x)[0], attn.o_proj(ref.transpose(1, 2).reshape(1, 5, 16)))


def test_small_modules():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    x = torch.randn(3, 8)
    assert torch.equal(norm(x), rms_norm(x, norm.weight))
    ff = SwiGLU(8, 20)
    ref = (torch.nn.functional.silu(x @ ff.gate.weight.t()) * (x @ ff.up.weight.t())) @ ff.down.weight.t()
    torch.testing.assert_close(ff(x), ref)
    emb = LowRankEmbedding(100, 32, 8)
    ids = torch.tensor([[1, 5, 99]])
    torch.testing.assert_close(emb(ids), emb.embed_low[ids] @ emb.project_up.t())
    assert sum(p.numel() for p in emb.parameters()) == 100 * 8 + 32 * 8
    assert math.isclose(emb(ids).std().item(), 1.0, rel_tol=0.8)
