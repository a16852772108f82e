"""The static KV cache, padded batches and the compiled / graph-captured decode.

Invariants checked: a left-padded row gives the logits (and the greedy tokens) of the same row
alone; right padding changes nothing for the real tokens; decoding through the cache equals the
full recompute; the compiled decode step gives the eager tokens; on a GPU the CUDA-graph decode
gives the eager tokens."""
import pytest
import torch

import inl_kernels
import inl_llm
from inl_llm.model import left_padding

BACKENDS = ["reference"] + (["auto"] if "cpu" in inl_kernels.backends() else [])


def tiny(backend="auto", **overrides):
    return inl_llm.create_model("tiny", backend=backend, num_layers=2, **overrides).eval()


def prompts(lengths, vocab=259, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def left_pad(rows, pad_id=258):
    """(ids [B, max_len], mask [B, max_len]) with each row's padding at its start."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_rows_give_the_logits_of_each_row_alone(backend):
    model = tiny(backend)
    rows = prompts([9, 4, 7])
    ids, mask = left_pad(rows)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)[0]
        for b, r in enumerate(rows):
            alone = model(r[None])[0][0]
            torch.testing.assert_close(logits[b, ids.shape[1] - len(r):], alone, rtol=1e-5, atol=1e-5)


def test_right_padding_changes_nothing_for_the_tokens():
    model = tiny("reference")
    rows = prompts([6, 3])
    ids = torch.full((2, 6), 258)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
        mask[b, :len(r)] = 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)[0]
        plain = model(ids)[0]
    for b, r in enumerate(rows):
        torch.testing.assert_close(padded[b, :len(r)], plain[b, :len(r)], rtol=0, atol=0)


def test_attention_mask_errors():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="padding at the start"):
        left_padding(torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), ids)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, seq\]"):
        left_padding(torch.ones(3, 4), ids)
    assert left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]]), ids).tolist() == [2, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_generation_with_left_padding_equals_each_row_alone(backend):
    model = tiny(backend)
    rows = prompts([5, 2, 8], seed=1)
    ids, mask = left_pad(rows)
    out = model.generate(ids, 12, do_sample=False, attention_mask=mask)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], 12, do_sample=False)
        assert out[b, ids.shape[1]:].tolist() == alone[0, len(r):].tolist(), b


def test_static_cache_keeps_its_length_on_the_device():
    model = tiny("reference")
    ids = prompts([7])[0][None]
    cache = model.new_cache(1, 12)
    with torch.no_grad():
        parts = [model(ids[:, :4], past_key_values=cache, use_cache=True)[0]]
        for t in range(4, 7):
            parts.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
        full = model(ids)[0]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 7 and cache.lens.tolist() == [7] and cache.layers[0].k.shape[2] == 12
    with pytest.raises(ValueError, match="the KV cache holds 12 positions"):
        model(torch.zeros(1, 6, dtype=torch.long), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("backend", BACKENDS[1:] + (["cpu"] if "cpu" in inl_kernels.backends() else []))
def test_compiled_decode_gives_the_eager_tokens(backend):
    """auto: the eager step runs the C++ kernels, the compiled one (decode-sized calls under
    torch.compile, `_dispatch.COMPILE_FUSE_ROWS`) the reference fused by inductor; a backend
    named "cpu" keeps its kernels inside the compiled step. Either way, the eager tokens."""
    model = tiny(backend)
    prompt = prompts([6], seed=2)[0][None]
    eager = model.generate(prompt, 10, do_sample=False)
    compiled = model.generate(prompt, 10, do_sample=False, compile=True)
    assert compiled.tolist() == eager.tolist()


@pytest.mark.skipif("cpu" not in inl_kernels.backends(), reason="the C++ extension is not built")
def test_compiled_decode_of_a_left_padded_batch_gives_the_eager_tokens():
    """A left-padded batch through the compiled step (auto: the reference fused by inductor,
    with the cache's per-row lengths and starts) gives the eager C++ kernels' tokens."""
    model = tiny("auto")
    ids, mask = left_pad(prompts([5, 2, 8], seed=3))
    eager = model.generate(ids, 8, do_sample=False, attention_mask=mask)
    compiled = model.generate(ids, 8, do_sample=False, attention_mask=mask, compile=True)
    assert compiled.tolist() == eager.tolist()


def test_compiled_decode_shares_graphs_and_survives_the_recompile_limit(monkeypatch):
    """generate(compile=True) made a graph per prompt length (the cache's length is in its shape),
    kept them all, and the 9th length failed with FailOnRecompileLimitHit after its prefill. The
    cache length is now rounded up to a power of two (at most max_seq_len), and past the limit the
    call decodes eagerly with a warning, giving the eager tokens."""
    import warnings

    import importlib

    import torch._dynamo.exc

    G = importlib.import_module("inl_llm.generate")  # the attribute inl_llm.generate is the function

    model = tiny("auto")
    lengths = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda batch, n=None: lengths.append(n) or new_cache(batch, n))

    def refusing(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached")
    monkeypatch.setitem(G._compiled, "cpu", refusing)
    for n in (3, 9, 20):
        prompt = prompts([n], seed=n)[0][None]
        eager = model.generate(prompt, 5, do_sample=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = model.generate(prompt, 5, do_sample=False, compile=True)
        assert compiled.tolist() == eager.tolist()
        assert any("recompile limit" in str(w.message) for w in caught)
    assert lengths[1::2] == [64, 64, 64]  # the compiled calls' caches: one shape for all three prompts


def test_eos_stops_where_a_check_every_step_would():
    model = tiny("reference")
    prompt = prompts([4], seed=3)[0][None]
    free = model.generate(prompt, 12, do_sample=False)
    eos = int(free[0, 4 + 2])  # the third new token
    out = model.generate(prompt, 12, do_sample=False, eos_token_id=eos, eos_check_every=5)
    assert out.tolist() == free[:, :4 + 3].tolist()


def test_decode_arguments():
    model = tiny("reference")
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="use_cache must be True"):
        model.generate(prompt, 2, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        model.generate(prompt, 2, cuda_graph=True)
    with pytest.raises(ValueError, match="eos_check_every"):
        model.generate(prompt, 2, eos_check_every=0)


@pytest.mark.cuda
@pytest.mark.parametrize("how", ["cuda_graph", "compile"])
def test_gpu_decode_in_a_cuda_graph_gives_the_eager_tokens(how):
    """The decode step captured in a CUDA graph (by hand, or by torch.compile's reduce-overhead
    mode) gives the eager greedy tokens, batched with left padding too."""
    model = inl_llm.create_model("tiny", num_layers=2).to("cuda", torch.bfloat16).eval()
    rows = [r.cuda() for r in prompts([6, 3], seed=4)]
    ids, mask = left_pad(rows)
    ids, mask = ids.cuda(), mask.cuda()
    eager = model.generate(ids, 16, do_sample=False, attention_mask=mask)
    graphed = model.generate(ids, 16, do_sample=False, attention_mask=mask, **{how: True})
    assert graphed.tolist() == eager.tolist()
