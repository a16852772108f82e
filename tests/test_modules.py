"""The drop-in modules: they call the ops with the right tensors and hold the right state."""
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import inl_kernels.modules as modules
from inl_kernels import Controller, GQAttention, IntegratorLayer, LowRankEmbedding, RMSNorm, SwiGLU, rms_norm
from inl_kernels import reference
from tests.iterate_cases import reference_iterate
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


def test_layer_calls_the_op_with_its_parameters(monkeypatch):
    torch.manual_seed(0)
    d = 12
    layer = IntegratorLayer(d, Controller(d, 8), num_iterations=3, dt=0.2, kappa=0.7, excitation_sparsity=0.25,
                            excitation_amplitude=0.05, mu_group_size=5, mu_init=0.25, tol=1e-2, min_iterations=1)
    with torch.no_grad():
        layer.mu_local.copy_(torch.tensor([1.0, -2.0, 3.0]))
        layer.mod_scale.copy_(torch.tensor([1.1, 0.9, 1.2, 0.8]))
        layer.mod_bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.05]))
    # written out by hand: groups of 5 dims (5, 5, 2), 25 % of 12 dims excited, spread evenly
    mu = torch.tensor([1.25] * 5 + [-1.75] * 5 + [3.25] * 2)
    exc_index = torch.tensor([0, 4, 8])

    calls = []
    op = modules.F_inl.inl_iterate
    monkeypatch.setattr(modules.F_inl, "inl_iterate", lambda *a, **kw: calls.append(kw) or op(*a, **kw))
    h, x = torch.randn(2, 5, d), torch.randn(2, 5, d)
    out = layer(h, x)
    passed = calls[-1]
    assert torch.equal(passed["mu"], mu) and torch.equal(passed["exc_index"], exc_index)
    assert (passed["amplitude"], passed["dt"], passed["kappa"], passed["num_iterations"]) == (0.05, 0.2, 0.7, 3)
    assert passed["tol"] is None  # no early exit while training
    c = layer.controller
    for name, tensor in dict(w_h=c.h_proj.weight, b_h=c.h_proj.bias, w_x=c.x_proj.weight, b_x=c.x_proj.bias,
                             w_v=c.v_proj.weight, b_v=c.v_proj.bias, w_o=c.out.weight, b_o=c.out.bias,
                             mod_scale=layer.mod_scale, mod_bias=layer.mod_bias, gamma=layer.gamma,
                             phi=layer.phi).items():
        assert passed[name] is tensor, name

    # the whole layer against the fp64 reference fed the hand-written mu and excited dims
    weights = {k: w.detach().double() for k, w in c.weights().items()}
    common = dict(**weights, mod_scale=layer.mod_scale.detach().double(), mod_bias=layer.mod_bias.detach().double(),
                  mu=mu.double(), exc_index=exc_index, gamma=layer.gamma.detach().double(),
                  phi=layer.phi.detach().double(), amplitude=0.05, dt=0.2, kappa=0.7, num_iterations=3)
    expected, _ = reference_iterate(h.reshape(-1, d).double(), x.reshape(-1, d).double(), **common)
    torch.testing.assert_close(out.detach(), expected.view(2, 5, d).float(), rtol=1e-5, atol=1e-5)

    layer.eval()  # early exit switches on at inference only
    with torch.no_grad():
        out, info = layer(h, x, return_info=True, num_iterations=2)
    assert calls[-1]["tol"] == 1e-2 and calls[-1]["min_iterations"] == 1 and calls[-1]["num_iterations"] == 2
    expected, ref_info = reference_iterate(h.reshape(-1, d).double(), x.reshape(-1, d).double(),
                                           **{**common, "num_iterations": 2}, tol=1e-2, min_iterations=1)
    assert info.iterations.shape == (10,)
    assert torch.equal(info.iterations, ref_info.iterations)
    torch.testing.assert_close(out, expected.view(2, 5, d).float(), rtol=1e-5, atol=1e-5)


def test_mu_ema_is_deferred_to_the_next_forward():
    d = 6
    layer = IntegratorLayer(d, Controller(d, 4), mu_group_size=None, mu_ema_rate=0.5)
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])  # mean 2 … 7
    x = torch.zeros(2, d)
    layer(h, x)
    assert torch.equal(layer.equilibrium().detach(), torch.zeros(d))  # recorded, not applied yet
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(m.equilibrium().detach().clone()))
    layer(torch.full((2, d), 10.0), x)
    hook.remove()
    # the second forward ran with mu = 0.5·0 + 0.5·mean(h)
    torch.testing.assert_close(seen[0], torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 3.5]))
    layer.apply_mu_ema()  # the second forward's target (10), applied now
    torch.testing.assert_close(layer.equilibrium().detach(), torch.tensor([5.5, 5.75, 6.0, 6.25, 6.5, 6.75]))
    layer.apply_mu_ema()  # nothing pending any more
    torch.testing.assert_close(layer.equilibrium().detach(), torch.tensor([5.5, 5.75, 6.0, 6.25, 6.5, 6.75]))
    layer.eval()  # inference records nothing
    with torch.no_grad():
        layer(torch.full((2, d), -4.0), x)
    layer.apply_mu_ema()
    torch.testing.assert_close(layer.equilibrium().detach(), torch.tensor([5.5, 5.75, 6.0, 6.25, 6.5, 6.75]))


def test_mu_ema_hierarchical_keeps_group_structure():
    torch.manual_seed(0)
    layer = IntegratorLayer(6, Controller(6, 4), mu_group_size=4, mu_ema_rate=1.0)
    h = torch.arange(6.0).expand(3, 6)
    layer(h, torch.zeros(3, 6))
    layer.apply_mu_ema()
    # rate 1: mu becomes the group means of mean(h): (0+1+2+3)/4 and (4+5)/2
    torch.testing.assert_close(layer.equilibrium().detach(), torch.tensor([1.5] * 4 + [4.5] * 2))
    torch.testing.assert_close(layer.mu_global.detach(), torch.tensor(3.0))  # the mean of the group means


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_layer_recomputes_with_the_mu_its_forward_saw(use_reentrant):
    """Two training steps, mu moved far by the EMA between them: a checkpointed layer gets the
    gradients and the mu of a plain one (its recomputation neither applies nor records)."""
    d = 8
    h = torch.randn(5, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 2.0
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        layer = IntegratorLayer(d, Controller(d, 4), num_iterations=3, mu_group_size=4, mu_ema_rate=1.0).double()
        for step in range(2):
            layer.zero_grad()
            hs = (h * (step + 1)).requires_grad_()  # a new target every step
            if checkpointed:
                out = checkpoint(layer, hs, x, use_reentrant=use_reentrant)
            else:
                out = layer(hs, x)
            out.square().sum().backward()
        layer.apply_mu_ema()
        results.append(({n: p.grad.clone() for n, p in layer.named_parameters()}, hs.grad,
                        layer.equilibrium().detach()))
    (plain, plain_h, plain_mu), (ckpt, ckpt_h, ckpt_mu) = results
    # rate 1: mu ends at the group means of the last target, 2·mean(h)
    torch.testing.assert_close(plain_mu, (2 * h.mean(0)).view(2, 4).mean(1).repeat_interleave(4))
    torch.testing.assert_close(ckpt_mu, plain_mu)
    torch.testing.assert_close(ckpt_h, plain_h, rtol=1e-12, atol=1e-12)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-12, atol=1e-12, msg=name)


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
