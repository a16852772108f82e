"""Mixed precision: the model under torch.autocast keeps fp32 parameters, computes its
activations in the autocast dtype, and stays close to the fp32 model (forward, gradients, cached
generation). The references are the same model run in fp32."""
import pytest
import torch
import torch.nn.functional as F

from inl_llm import INLConfig, KVCache, build_model, create_model


def autocast(dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype)


def close_to(low, fp32, fraction):
    """Low-precision logits within `fraction` of the fp32 logits' largest magnitude."""
    scale = fp32.abs().max().item()
    torch.testing.assert_close(low.float(), fp32, atol=fraction * scale, rtol=fraction)


@pytest.fixture(scope="module")
def tiny():
    return create_model("tiny")


def ids_of(batch, length, seed=0, vocab=259):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_tiny_forward_and_training_step_under_autocast(tiny):
    model = tiny.train()
    ids = ids_of(2, 24)
    target = ids.roll(-1, 1)
    model.zero_grad()
    logits, _, _ = model(ids)
    F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    fp32_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    seen = []  # the integrators really run in bf16 (h, x) on fp32 weights
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[1].dtype)))
             for layer in model.integrator_layers()]
    try:
        with autocast():
            low, _, _ = model(ids)
            loss = F.cross_entropy(low.flatten(0, 1), target.flatten())
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert low.dtype == torch.bfloat16
    assert seen == [(torch.bfloat16, torch.bfloat16)] * model.config.num_layers
    close_to(low, logits.detach(), 0.03)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = torch.cat([fp32_grads[n].flatten() for n, _ in model.named_parameters()])
    assert F.cosine_similarity(grads, reference, dim=0) > 0.999
    model.zero_grad()


def test_tiny_generation_under_autocast_uses_a_bf16_cache(tiny):
    model = tiny.eval()
    ids = ids_of(2, 12, seed=1)
    with torch.no_grad():
        full, _, _ = model(ids)  # fp32, no cache
        with autocast():
            cache = model.new_cache(2, 12)
            assert cache.layers[0].k.dtype == torch.bfloat16
            steps = [model(ids[:, :5], past_key_values=cache, use_cache=True)[0]]
            for t in range(5, 12):  # decode token by token through the bf16 cache
                steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
    assert model.new_cache(2, 12).layers[0].k.dtype == torch.float32  # outside autocast: the weights'
    close_to(torch.cat(steps, dim=1), full, 0.03)

    prompt = ids[:, :4]
    with autocast():
        cached = model.generate(prompt, 16, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, 16, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.train()


def test_a_cache_of_another_dtype_is_an_error_not_a_cast(tiny):
    model = tiny.eval()
    ids = ids_of(1, 6, seed=2)
    fp32_cache = model.new_cache(1, 8)
    with torch.no_grad(), autocast():
        with pytest.raises(TypeError, match="k has dtype bfloat16, but the KV cache holds float32"):
            model(ids, past_key_values=fp32_cache, use_cache=True)
        # a cache without a dtype takes the first keys' dtype
        cfg = model.config
        lazy = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, 8)
        logits, _, _ = model(ids, past_key_values=lazy, use_cache=True)
        expected, _, _ = model(ids)
    assert lazy.layers[0].k.dtype == torch.bfloat16 and lazy.length == 6
    assert torch.equal(logits, expected)
    model.train()


MICRO = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=48,
             max_seq_len=32, num_iterations=3, controller_hidden=8, min_embedding_rank=8, mu_group_size=8,
             min_iterations=1, seed=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("overrides", [{"mixture_of_integrators": True, "num_experts": 3},
                                       {"low_rank_embeddings": False, "tie_embeddings": True},
                                       {"tie_embeddings": True},
                                       {"gradient_checkpointing": True, "mu_ema_rate": 0.5}],
                         ids=["mixture", "tied-embedding", "tied-low-rank", "checkpointing-ema"])
def test_switches_under_autocast(overrides, dtype):
    ids = ids_of(2, 9, vocab=40)
    results = []
    for low in (False, True):
        model = build_model(INLConfig(**{**MICRO, **overrides}))
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            logits, _, _ = model(ids)
            loss = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        results.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (fp32, fp32_grads), (low, low_grads) = results
    assert low.dtype == dtype
    close_to(low, fp32, 0.03)
    assert F.cosine_similarity(low_grads, fp32_grads, dim=0) > 0.999
