"""The lean eager decode step on a CPU (inl_llm/lean_decode.py): the model's forward without the
per-op Python, so it must give that forward's bits.

Checked step by step against `decode_one_token` on two copies of one model: the logits, the KV
cache's buffers and length, and the model's inference statistics, bit for bit, over feature
switches (embeddings tied, untied and low-rank, fixed and dynamic alpha, per-dim mu, budgets, a
second and third dtype, dropout configured, the mu EMA, no excitation, no early exit), for
left-padded batches of up to four rows and of five (other kernel paths); `generate` uses it and
gives the tokens of the forward; fp32 steps of up to four rows run every layer in one C++ call;
it steps aside where it does not apply (hooks, a compiled or
rewired module, an adapter layer, a module in training mode, a mixture of integrators, the
reference backend, autocast, a cache longer than the RoPE tables, a profiler recording)."""
import copy

import pytest
import torch

import inl_kernels
import inl_llm
from inl_llm import lean_decode
from inl_llm.generate import decode_one_token, prefill

# one thread (tests/conftest.py): the lean step and the forward run torch's matmuls at more than
# four rows, whose bits follow the thread count, which the ops' governor lowers when another
# process takes a core
pytestmark = [pytest.mark.skipif("cpu" not in inl_kernels.backends(), reason="the C++ extension is not built"),
              pytest.mark.usefixtures("one_thread")]


def tiny(**overrides):
    return inl_llm.create_model("tiny", num_layers=2, **overrides).eval()


def left_padded(lengths, vocab=259, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 258)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


def run_both(model, ids, mask, steps):
    """The lean step on `model` and the forward on a copy, fed the same greedy tokens; asserts
    the same bits at every step and returns the lean step."""
    twin = copy.deepcopy(model)
    caches, logits = [], []
    with torch.no_grad():
        for m in (model, twin):
            m.reset_inference_stats()
            cache = m.new_cache(ids.shape[0], ids.shape[1] + steps)
            logits.append(prefill(m, ids, cache, mask))
            caches.append(cache)
        step = lean_decode.LeanDecodeStep.build(model, caches[0])
        assert step is not None, lean_decode.why_not(model, caches[0])
        lean_logits, want = logits
        for _ in range(steps):
            assert torch.equal(lean_logits, want)
            token = want.argmax(-1)[:, None]
            lean_logits = step(token)
            want = decode_one_token(twin, token, caches[1])
        assert torch.equal(lean_logits, want)
    a, b = caches
    assert a.length == b.length and torch.equal(a.lens, b.lens) and torch.equal(a.starts, b.starts)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.k, lb.k) and torch.equal(la.v, lb.v)
    assert model.get_inference_stats() == twin.get_inference_stats()
    return step


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_embeddings=True),
    dict(low_rank_embeddings=False, tie_embeddings=True),
    dict(dynamic_alpha=False, hierarchical_mu=False, shared_controller=False),
    dict(dropout=0.1, iteration_budgets=False, tol=0.05),
    dict(mu_ema_rate=0.1, learnable_mu=False, sparse_excitation=False),
    dict(adaptive_stopping=False),
])
def test_the_lean_step_gives_the_forwards_bits(overrides):
    model = tiny(**overrides)
    ids, mask = left_padded([7, 3, 5])
    step = run_both(model, ids, mask, steps=6)
    # fp32, three rows: every step was the whole model in one C++ call (_C.decode_step), with each
    # embedding (low-rank, full) and LM head (untied, tied) the feature switches give
    assert step.fused is not None and step.head is not None


def test_the_lean_step_at_a_batch_of_blocks_and_in_fp16():
    """Five rows: the iterate's block path and SwiGLU's matmul path (the few-row paths take up to
    four); fp16 activations."""
    run_both(tiny(), *left_padded([6, 2, 9, 4, 5]), steps=4)
    run_both(tiny().to(torch.float16), *left_padded([5, 3]), steps=4)


def test_the_lean_step_in_bf16_and_with_budgets_moved():
    model = tiny().to(torch.bfloat16)
    ids, mask = left_padded([6, 6])
    run_both(model, ids, mask, steps=4)
    # budgets below the step count: the iterate runs the layer's budget, as the forward does
    model = tiny()
    model.budget.average.fill_(1.0)
    model.budget.update(torch.tensor([1.0, 2.0]))
    assert model.iteration_budgets() != [model.config.num_iterations] * 2
    run_both(model, *left_padded([4]), steps=3)


def test_fp32_steps_of_up_to_four_rows_run_every_layer_in_one_call(monkeypatch):
    """fp32, at most four rows, the model's own projections: the layers are bound once for
    `_C.decode_layers` and the embedding, final norm and LM head for `_C.decode_step`
    (csrc/cpu/decode.cpp), which every step then calls, with the forward's bits (run_both); without
    the head the Python runs those around `_C.decode_layers`, and with that path switched off the
    Python loop, both with the same bits. Five rows, fp16, or a plain nn.Linear projection bind
    nothing and run the Python loop; a plain nn.Linear LM head or a subclass's own _logits bind
    the layers but not the head."""
    model = tiny()
    ids, mask = left_padded([7, 3, 5])
    calls = []
    build = lean_decode.LeanDecodeStep.build

    def counted(cls, model, cache):
        step = build.__func__(cls, model, cache)
        if step is not None and step.fused is not None:
            for name in ("_decode_layers", "_decode_step"):
                run = getattr(step, name)
                setattr(step, name, lambda *args, run=run, name=name: calls.append(name) or run(*args))
        return step
    monkeypatch.setattr(lean_decode.LeanDecodeStep, "build", classmethod(counted))
    step = run_both(model, ids, mask, steps=5)
    assert step.fused is not None and len(step.fused) == len(model.blocks) and step.head is not None
    assert calls == ["_decode_step"] * 5
    with monkeypatch.context() as m:  # no head: the Python embeds and projects around the layers
        m.setattr(lean_decode, "_fused_head", lambda model, B: None)
        calls.clear()
        assert run_both(model, ids, mask, steps=4).head is None
        assert calls == ["_decode_layers"] * 4
    calls.clear()
    monkeypatch.setattr(lean_decode, "_FUSED_ROWS", 0)
    run_both(model, ids, mask, steps=5)
    assert calls == []  # bound, not called
    monkeypatch.setattr(lean_decode, "_FUSED_ROWS", 4)
    # where the Python step would not run the decode attention kernel, neither does the fused one
    from inl_kernels.cpu import attention as cpu_attention
    monkeypatch.setattr(cpu_attention, "DECODE_QUERIES", 0)
    run_both(model, ids, mask, steps=3)
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setattr(lean_decode.LeanDecodeStep, "build", classmethod(counted))
    assert run_both(tiny(), *left_padded([6, 2, 9, 4, 5]), steps=2).fused is None
    assert run_both(tiny().to(torch.float16), *left_padded([5, 3]), steps=2).fused is None
    plain = tiny()
    old = plain.blocks[1].attn.o_proj
    plain.blocks[1].attn.o_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    plain.blocks[1].attn.o_proj.load_state_dict(old.state_dict())
    assert run_both(plain.eval(), ids, mask, steps=2).fused is None
    assert calls == []
    plain_head = tiny()
    old = plain_head.lm_head
    plain_head.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    plain_head.lm_head.load_state_dict(old.state_dict())
    step = run_both(plain_head.eval(), ids, mask, steps=2)
    assert step.fused is not None and step.head is None and calls == ["_decode_layers"] * 2

    class OwnLogits(type(model)):
        def _logits(self, x):
            return super()._logits(x) * 1.0
    own = tiny()
    own.__class__ = OwnLogits
    calls.clear()
    step = run_both(own, ids, mask, steps=2)
    assert step.fused is not None and step.head is None and calls == ["_decode_layers"] * 2


def test_generate_runs_the_lean_step_and_gives_the_forwards_tokens(monkeypatch):
    model = tiny()
    ids, mask = left_padded([8, 5])
    calls = []
    step = lean_decode.LeanDecodeStep._step
    monkeypatch.setattr(lean_decode.LeanDecodeStep, "_step", lambda self, token: calls.append(1) or step(self, token))
    lean = model.generate(ids, 7, do_sample=False, attention_mask=mask)
    assert len(calls) == 6  # every new token but the first, which the prefill gives
    monkeypatch.setattr(lean_decode.LeanDecodeStep, "build", classmethod(lambda cls, model, cache: None))
    assert torch.equal(model.generate(ids, 7, do_sample=False, attention_mask=mask), lean)


def test_where_it_does_not_apply():
    ids, mask = left_padded([4])
    with torch.no_grad():
        model = tiny()
        cache = model.new_cache(1, 8)
        prefill(model, ids, cache, mask)
        assert lean_decode.why_not(model, cache) is None
        handle = model.blocks[1].ffn.register_forward_hook(lambda *args: None)
        assert "hook" in lean_decode.why_not(model, cache)
        handle.remove()
        model.train()
        assert "training" in lean_decode.why_not(model, cache)
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "autocast" in lean_decode.why_not(model, cache)
        assert "cache" in lean_decode.why_not(model, None)
        # a module that would not run its class's forward when called: the step reads its tensors
        model.blocks[0].train()
        assert "training" in lean_decode.why_not(model, cache)
        model.eval()
        other = tiny()
        other.compile()
        assert "compiled" in lean_decode.why_not(other, cache)
        other = tiny()
        attn = other.blocks[1].attn
        attn.o_proj.forward = lambda x: torch.nn.functional.linear(x, attn.o_proj.weight) * 2
        assert "replaced" in lean_decode.why_not(other, cache)

        class Adapter(torch.nn.Linear):
            pass
        other = tiny()
        old = other.blocks[0].attn.q_proj
        other.blocks[0].attn.q_proj = Adapter(old.in_features, old.out_features, bias=False).eval()
        assert "nn.Linear" in lean_decode.why_not(other, cache)
        other.blocks[0].attn.q_proj = torch.nn.Linear(old.in_features, old.out_features).eval()
        assert "bias" in lean_decode.why_not(other, cache)
        short = tiny(max_seq_len=16)
        assert "RoPE" in lean_decode.why_not(short, short.new_cache(1, 64))
        assert lean_decode.why_not(short, short.new_cache(1, 16)) is None
        mixture = tiny(mixture_of_integrators=True, num_experts=2, top_k=1)
        assert "mixture" in lean_decode.why_not(mixture, mixture.new_cache(1, 8))
        # the reference backend: nothing to skip, the forward runs
        reference = tiny(backend="reference")
        cache = reference.new_cache(1, 8)
        prefill(reference, ids, cache, mask)
        assert lean_decode.LeanDecodeStep.build(reference, cache) is None
        assert "backend 'reference'" in lean_decode.why_not(reference, cache)  # it said None: "can run"
    with torch.enable_grad():
        assert "gradients" in lean_decode.why_not(model, cache)


def test_a_profiled_step_runs_the_forward_and_shows_its_ops(monkeypatch):
    model = tiny()
    ids, mask = left_padded([5])
    with torch.no_grad():
        cache = model.new_cache(1, 9)
        logits = prefill(model, ids, cache, mask)
        step = lean_decode.LeanDecodeStep.build(model, cache)
        calls = []
        inner = lean_decode.LeanDecodeStep._step
        monkeypatch.setattr(lean_decode.LeanDecodeStep, "_step", lambda self, t: calls.append(1) or inner(self, t))
        token = logits.argmax(-1)[:, None]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(token)
        assert not calls
        names = {e.name for e in prof.events()}
        assert "inl::rms_norm" in names and "inl::iterate" in names
        step(token)
        assert calls == [1]


def test_the_one_call_step_rejects_what_the_forward_rejects():
    """Token ids outside the vocabulary: the forward's ValueError, before any cache write; a k
    projection of the wrong size (a hand-edited model): an error, as the forward's, not a read
    past its output."""
    model = tiny()
    ids, mask = left_padded([4])
    with torch.no_grad():
        cache = model.new_cache(1, 12)
        prefill(model, ids, cache, mask)
        step = lean_decode.LeanDecodeStep.build(model, cache)
        assert step is not None and step.head is not None
        keys = [layer.k.clone() for layer in cache.layers]
        for bad in (model.config.vocab_size, -1):
            with pytest.raises(ValueError, match=r"input_ids values must lie in \[0, 259\)"):
                step(torch.tensor([[bad]]))
            assert all(torch.equal(layer.k, k) for layer, k in zip(cache.layers, keys))
            with pytest.raises(ValueError, match=r"values must lie in \[0, 259\)"):
                decode_one_token(copy.deepcopy(model), torch.tensor([[bad]]), copy.deepcopy(cache))
        short = tiny()
        k_proj = short.blocks[0].attn.k_proj
        k_proj.weight = torch.nn.Parameter(k_proj.weight[:-8].clone())
        cache = short.new_cache(1, 12)
        with pytest.raises(RuntimeError):
            prefill(short, ids, cache, mask)
        cache = short.new_cache(1, 12)
        cache.begin(4)
        cache.commit()
        step = lean_decode.LeanDecodeStep.build(short, cache)
        assert step is not None and step.fused is not None
        with pytest.raises(RuntimeError, match="a k/v projection gave"):
            step(torch.tensor([[3]]))
