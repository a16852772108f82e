"""The model: named sizes on the meta device, the block of SPEC §4, every feature switch,
the KV cache, the mixture of integrators and the iteration budgets."""
import math

import pytest
import torch
import torch.nn.functional as F

import inl_kernels.reference as ref
from tests.iterate_cases import reference_iterate
from inl_llm import SIZES, INLConfig, KVCache, build_model, create_model
from inl_llm.model import IterationBudget, MixtureOfIntegrators


def micro(**overrides):
    """A model small enough to run every switch quickly."""
    base = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=48,
                max_seq_len=32, num_iterations=3, controller_hidden=8, min_embedding_rank=8, mu_group_size=8,
                min_iterations=1, seed=3)
    return build_model(INLConfig(**{**base, **overrides}))


def expected_params(c: INLConfig) -> int:
    """Parameter count written out from the architecture (SPEC §4), independently of the code."""
    d, H, hd = c.d_model, c.controller_hidden, c.head_dim
    r = max(c.min_embedding_rank, round(d * c.embedding_rank_ratio))
    embed = c.vocab_size * r + d * r
    attn = d * c.num_heads * hd * 2 + d * c.num_kv_heads * hd * 2
    excited = max(1, round(d * c.excitation_sparsity))
    integrator = 4 + 4 + 1 + math.ceil(d / c.mu_group_size) + 2 * excited  # modulation, mu, gamma/phi
    controller = 3 * (d * H + H) + 4 * d * H + 4 * d
    block = 3 * d + attn + integrator + 3 * d * c.feedforward_dim
    return embed + c.num_layers * block + controller + d + d * c.vocab_size


@pytest.mark.parametrize("size", list(SIZES))
def test_named_sizes_on_meta(size):
    model = create_model(size, vocab_size=32000, device="meta")
    c = model.config
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert model.num_params() == expected_params(c)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    with torch.no_grad():
        logits, aux, cache = model(ids, return_aux=True)
    assert logits.shape == (2, 16, 32000) and logits.is_meta and cache is None
    assert aux["iterations"].shape == (c.num_layers,)
    assert len(aux["integrators"]) == c.num_layers
    assert aux["energy"][0].shape == aux["distance"][0].shape == (c.num_iterations,)
    assert aux["mu"][0].shape == (c.d_model,)


def test_seed_sizes():
    # d_model × layers, iterations, FF and context as the seeds list them
    for size, (d, layers, heads, iters, ff, ctx) in {"small": (512, 6, 8, 5, 2048, 512),
                                                     "medium": (768, 12, 12, 7, 3072, 1024),
                                                     "large": (1024, 24, 16, 10, 4096, 2048)}.items():
        c = INLConfig.from_name(size)
        assert (c.d_model, c.num_layers, c.num_heads, c.num_iterations, c.feedforward_dim, c.max_seq_len) == \
            (d, layers, heads, iters, ff, ctx)
    for size, (d, layers) in {"xlarge": (1536, 32), "3B": (2048, 40), "7B": (4096, 32), "13B": (5120, 40)}.items():
        c = INLConfig.from_name(size)
        assert (c.d_model, c.num_layers) == (d, layers)
    assert INLConfig.from_name("xlarge").num_iterations == 12 and INLConfig.from_name("3B").num_iterations == 15
    assert INLConfig.from_name("small").embedding_rank == 64 and INLConfig.from_name("7B").embedding_rank == 512


def test_config_validation():
    with pytest.raises(ValueError, match="unknown size"):
        INLConfig.from_name("huge")
    with pytest.raises(ValueError, match="num_kv_heads"):
        INLConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        INLConfig(d_model=100, num_heads=8)
    with pytest.raises(ValueError, match="backend"):
        INLConfig(backend="fast")
    with pytest.raises(ValueError, match="top_k"):
        INLConfig(num_experts=2, top_k=3)


def test_parameters_are_a_function_of_the_seed():
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b, c = micro(seed=7), micro(seed=7), micro(seed=8)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # building does not touch the caller's RNG
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_block_is_spec_section_4():
    """The model's logits equal SPEC §4 written out with the reference ops (one block)."""
    model = micro(num_layers=1, adaptive_stopping=False).double()
    ids = torch.tensor([[1, 5, 7, 2, 9, 11]])
    blk, emb = model.blocks[0], model.embed
    norm = lambda x, m: ref.rms_norm(x, m.weight, m.eps)  # noqa: E731
    x = ref.embedding(ids, emb.embed_low, emb.project_up)
    B, S, d = x.shape
    att = blk.attn
    xn = norm(x, blk.attn_norm)
    q = (xn @ att.q_proj.weight.t()).view(B, S, 4, 8).transpose(1, 2)
    k = (xn @ att.k_proj.weight.t()).view(B, S, 2, 8).transpose(1, 2)
    v = (xn @ att.v_proj.weight.t()).view(B, S, 2, 8).transpose(1, 2)
    a = ref.attention(q, k, v, True, None, (att.cos, att.sin)).transpose(1, 2).reshape(B, S, d) @ att.o_proj.weight.t()
    x = x + a
    layer = blk.integrator
    s, _ = reference_iterate(a.reshape(-1, d), norm(x, blk.integrator_norm).reshape(-1, d),
                       **layer.controller.weights(), mod_scale=layer.mod_scale, mod_bias=layer.mod_bias, mu=layer.equilibrium(),
                       exc_index=layer.exc_index, gamma=layer.gamma, phi=layer.phi, amplitude=0.03, dt=0.1,
                       kappa=1.0, num_iterations=3)
    x = x + s.view(B, S, d)
    f = blk.ffn
    x = x + ref.swiglu(norm(x, blk.ffn_norm), f.gate.weight, f.up.weight, f.down.weight)
    expected = norm(x, model.norm) @ model.lm_head.weight.t()
    logits, _, _ = model(ids)
    torch.testing.assert_close(logits, expected)


SWITCHES = ["low_rank_embeddings", "shared_controller", "hierarchical_mu", "sparse_excitation", "dynamic_alpha",
            "adaptive_stopping", "iteration_budgets", "gradient_checkpointing", "learnable_mu",
            "mixture_of_integrators", "tie_embeddings"]


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("switch", SWITCHES + ["mu_ema"])
def test_every_switch_runs_forward_and_backward(switch, on):
    overrides = {"mu_ema_rate": 0.1 if on else None} if switch == "mu_ema" else {switch: on}
    model = micro(**overrides)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, aux, _ = model(ids, return_aux=True)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None)
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    # gamma and phi only reach the loss through the excitation; the router only under a mixture
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        eval_logits, eval_aux, _ = model(ids, return_aux=True)
    assert eval_logits.shape == logits.shape and torch.isfinite(eval_logits).all()

    layers = list(model.integrator_layers())
    c = model.config
    if switch == "low_rank_embeddings":
        assert (type(model.embed).__name__ == "LowRankEmbedding") == on
    if switch == "shared_controller":
        controllers = {id(layer.controller) for layer in layers}
        assert len(controllers) == (1 if on else c.num_layers)
    if switch == "hierarchical_mu":
        assert layers[0].mu_local.numel() == (c.d_model // c.mu_group_size if on else c.d_model)
    if switch == "sparse_excitation":
        assert layers[0].exc_index.numel() == (round(0.1 * c.d_model) if on else c.d_model)
    if switch == "dynamic_alpha":
        assert (layers[0].kappa is not None) == on
    if switch == "adaptive_stopping":
        assert (layers[0].tol is not None) == on
    if switch == "learnable_mu":
        assert isinstance(layers[0].mu_local, torch.nn.Parameter) == on
    if switch == "mixture_of_integrators":
        assert isinstance(model.blocks[0].integrator, MixtureOfIntegrators) == on
        assert (aux["router_balance"] is not None) == on
        assert len(layers) == (c.num_layers * c.num_experts if on else c.num_layers)
    if switch == "tie_embeddings":
        assert (model.lm_head is None) == on


def test_gradient_checkpointing_changes_nothing_but_memory():
    grads, mus = [], []
    for ckpt, ema in ((False, None), (False, 1.0), (True, 1.0)):
        model = micro(gradient_checkpointing=ckpt, mu_ema_rate=ema).double()
        with torch.no_grad():  # attention outputs far from mu, so the EMA moves mu a lot
            for block in model.blocks:
                block.attn.o_proj.weight.mul_(50)
        ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # the second step starts by applying the first step's EMA
            model.zero_grad()
            logits, _, _ = model(ids)
            logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        mus.append(torch.stack([layer.equilibrium() for layer in model.integrator_layers()]).detach())
    assert (mus[1] - mus[0]).abs().max() > 0.05
    torch.testing.assert_close(mus[1], mus[2])  # the EMA ran once per forward either way
    for name in grads[0]:
        # the recomputation saw the mu its forward saw, so the gradients are the same
        torch.testing.assert_close(grads[1][name], grads[2][name], msg=name, rtol=1e-9, atol=1e-12)


def test_mu_ema_moves_mu_toward_the_attention_output():
    model = micro(mu_ema_rate=1.0, hierarchical_mu=False)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.blocks[0].attn.register_forward_hook(lambda m, i, out: seen.append(out[0].detach()))
    model(ids)
    hook.remove()
    before = model.blocks[0].integrator.equilibrium().detach().clone()
    model.apply_mu_ema()  # deferred to the next forward, or applied now
    # rate 1: mu becomes the batch mean of h, the attention output
    torch.testing.assert_close(model.blocks[0].integrator.equilibrium().detach(), seen[0].reshape(-1, 32).mean(0))
    assert not torch.equal(before, model.blocks[0].integrator.equilibrium())


def test_kv_cache_decoding_equals_the_full_forward():
    model = micro(adaptive_stopping=False).double().eval()
    ids = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _, none = model(ids)
        assert none is None
        cache = KVCache(2, 3, 2, 8, 16, dtype=torch.float64)
        parts = [model(ids[:, :5], past_key_values=cache, use_cache=True)[0]]
        for t in range(5, 11):
            logits, _, cache = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            parts.append(logits)
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(parts, 1), full)
    with pytest.raises(ValueError, match="overflows"):
        model(ids[:, :6], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_mixture_equals_each_token_routed_by_hand():
    """The vectorised mixture equals routing every token on its own (fp64)."""
    model = micro(mixture_of_integrators=True, num_experts=4, top_k=2, adaptive_stopping=False).double()
    moi = model.blocks[0].integrator
    g = torch.Generator().manual_seed(5)
    h, x = torch.randn(7, 32, generator=g, dtype=torch.float64), torch.randn(7, 32, generator=g, dtype=torch.float64)
    out, stats, balance = moi(h, x, 3)
    probs = torch.softmax(x @ moi.router.weight.t(), -1)
    for n in range(7):
        top = probs[n].topk(2)
        expect = sum(w / top.values.sum() * moi.experts[int(e)](h[n:n + 1], x[n:n + 1], num_iterations=3)[0]
                     for w, e in zip(top.values, top.indices))
        torch.testing.assert_close(out[n], expect)
    assert sum(s.x.shape[0] for s in stats) == 7 * 2
    share = torch.bincount(probs.topk(2).indices.flatten(), minlength=4).double() / 14
    torch.testing.assert_close(balance, 4 * (share * probs.mean(0)).sum())


def test_iteration_budget_rule():
    budget = IterationBudget(3, num_iterations=6, min_iterations=2, slack=1, momentum=0.5)
    assert [budget[i] for i in range(3)] == [6, 6, 6]
    budget.update(torch.tensor([2.0, 6.0, 1.0]))
    # average 0.5·6 + 0.5·used = [4, 6, 3.5] -> round + 1 = [5, 7, 5] -> clamp to [2, 6]
    assert [budget[i] for i in range(3)] == [5, 6, 5]
    budget.update(torch.tensor([2.0, 6.0, 1.0]))  # average [3, 6, 2.25] -> [4, 6, 3]
    assert [budget[i] for i in range(3)] == [4, 6, 3]
    clone = IterationBudget(3, 6, 2)
    clone.load_state_dict(budget.state_dict())
    assert [clone[i] for i in range(3)] == [4, 6, 3]  # the host copy follows a load


def test_budgets_follow_early_exit_and_inference_stats():
    model = micro(num_iterations=5, tol=1e9, min_iterations=2, budget_momentum=0.0).eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(6))
    model.reset_inference_stats()
    with torch.no_grad():
        _, aux, _ = model(ids, return_aux=True)
    # tol is huge: every row stops as soon as min_iterations allows
    assert aux["iterations"].tolist() == [2.0, 2.0]
    stats = model.get_inference_stats()
    assert stats["avg_iterations_per_layer"] == [2.0, 2.0] and stats["rows_per_layer"] == [18, 18]
    model.update_iteration_budgets()
    assert model.iteration_budgets() == [3, 3]  # 2 used + slack 1
    model.train()
    _, aux, _ = model(ids, return_aux=True)
    assert aux["iterations"].tolist() == [3.0, 3.0]  # training runs the whole (new) budget
    assert aux["energy"][0].shape == (3,)
    off = micro(num_iterations=5, tol=1e9, min_iterations=2, iteration_budgets=False).eval()
    with torch.no_grad():
        off(ids)
    off.update_iteration_budgets()
    assert off.iteration_budgets() == [5, 5]


def test_excitation_amplitude_reaches_every_integrator():
    model = micro(mixture_of_integrators=True, num_experts=3, top_k=1)
    model.set_excitation_amplitude(0.07)
    assert {layer.excitation_amplitude for layer in model.integrator_layers()} == {0.07}


def test_bf16_model_keeps_fp32_rope_tables_and_tracks_fp32():
    model = micro()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, _, _ = model(ids)
        half = model.to(torch.bfloat16)
        attn = half.blocks[0].attn
        assert attn.q_proj.weight.dtype == torch.bfloat16 and attn.cos.dtype == torch.float32
        cos, _ = ref.rope_tables(32, 8)
        assert torch.equal(attn.cos, cos)
        logits, _, _ = half(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, atol=0.05, rtol=0.05)


def test_iteration_budget_average_stays_fp32_when_the_model_is_cast():
    model = micro(num_iterations=5).to(torch.bfloat16)
    assert model.budget.average.dtype == torch.float32 and model.budget.budgets.dtype == torch.int64
    assert model.lm_head.weight.dtype == torch.bfloat16
    # 0.5·5 + 0.5·1.99 = 3.495 rounds to 3 (+ slack 1); a bf16 average would hold 3.5 and give 4 + 1
    model.budget.update(torch.tensor([1.99, 5.0]))
    assert model.budget.average.dtype == torch.float32
    assert model.iteration_budgets() == [4, 5]
    model.double()
    assert model.budget.average.dtype == torch.float32
    torch.testing.assert_close(model.budget.average, torch.tensor([3.495, 5.0]))
