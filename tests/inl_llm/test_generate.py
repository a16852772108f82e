"""Generation: the KV cache changes nothing, sampling filters do what they say, eos, errors."""
import pytest
import torch

from inl_llm import INLConfig, build_model
from inl_llm.generate import next_token


def micro(**overrides):
    base = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=48,
                max_seq_len=40, num_iterations=5, controller_hidden=8, min_embedding_rank=8, mu_group_size=8,
                seed=11, tol=0.3, min_iterations=1)
    return build_model(INLConfig(**{**base, **overrides})).double()


def test_greedy_with_cache_equals_without_cache():
    model = micro(tol=0.15)
    with torch.no_grad():  # a controller that reacts to the context, so rows settle at different steps
        w = model.controller.out.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype) * 0.3)
    prompt = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(0))
    model.reset_inference_stats()
    cached = model.generate(prompt, 20, do_sample=False, use_cache=True)
    stats = model.get_inference_stats()
    uncached = model.generate(prompt, 20, do_sample=False, use_cache=False)
    assert cached.shape == (3, 26)
    assert torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached, uncached)
    # early exit really ran: rows stopped at different steps
    assert 1.0 < stats["avg_iterations"] < 5.0
    # prefill (3 × 6 rows), then 19 decode steps of 3 rows each
    assert stats["rows_per_layer"] == [3 * 6 + 3 * 19] * 2
    assert model.training  # generate restores the mode it found


def test_get_inference_stats_report_early_exit_per_layer():
    model = micro(tol=1e9, min_iterations=2)  # every row stops at step 2
    model.reset_inference_stats()
    model.generate(torch.tensor([[1, 2, 3]]), 4, do_sample=False)
    stats = model.get_inference_stats()
    assert stats["avg_iterations_per_layer"] == [2.0, 2.0]
    assert stats["max_iterations_per_layer"] == [5, 5]


def test_eos_stops_a_row_and_keeps_the_others_going():
    model = micro()
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    free = model.generate(prompt, 8, do_sample=False)
    eos = int(free[0, 5])  # row 0's first new token
    out = model.generate(prompt, 8, do_sample=False, eos_token_id=eos)
    assert (out[0, 5:] == eos).all()
    row1 = free[1, 5:].tolist()
    cut = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert out[1, 5:5 + cut].tolist() == row1[:cut]
    single = model.generate(prompt[:1], 8, do_sample=False, eos_token_id=eos)
    assert single.shape == (1, 6)  # stops as soon as every row has emitted eos


def test_repetition_penalty_follows_the_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.0]])
    history = torch.tensor([[0, 1, 1]])
    assert next_token(logits, history, do_sample=False).item() == 0
    assert next_token(logits, history, repetition_penalty=2.0, do_sample=False).item() == 2  # 2/2 = 1 < 1.5
    # a negative logit is multiplied: -1·3 = -3 stays below 0 -> token 3 wins once 0 and 2 are seen too
    assert next_token(torch.tensor([[0.5, -1.0, 0.2, 0.1]]), torch.tensor([[0, 2, 1]]), repetition_penalty=10.0,
                      do_sample=False).item() == 3


def _draws(logits, n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    batch = logits.expand(n, -1)
    return next_token(batch, torch.zeros(n, 1, dtype=torch.long), generator=g, **kw)


def test_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert set(_draws(logits, top_k=1).tolist()) == {0}
    assert set(_draws(logits, top_k=2).tolist()) == {0, 1}
    nucleus = _draws(logits, top_p=0.7)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1
    assert set(nucleus.tolist()) == {0, 1}
    assert (nucleus == 0).double().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(_draws(logits, top_p=0.5).tolist()) == {0}  # the first token alone reaches 0.5
    hot = _draws(logits, temperature=2.0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    p = p / p.sum()  # softmax(log p / 2)
    freq = torch.bincount(hot, minlength=4).double() / len(hot)
    torch.testing.assert_close(freq, p.double(), atol=0.03, rtol=0)


def test_bad_arguments():
    model = micro()
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 39)  # 3 + 39 - 1 = 41 positions > 40
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_a_right_padded_prompt_is_refused():
    """generate continues every row from its last position: a right-padded row would be continued
    from a pad (the forward accepts right padding; generate must not). Left padding works."""
    model = micro()
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=r"left-padded; row\(s\) \[0\]"):
            model.generate(ids, 3, do_sample=False, attention_mask=right, use_cache=use_cache)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = model.generate(torch.tensor([[0, 5, 6, 7], [5, 6, 7, 8]]), 3, do_sample=False, attention_mask=left)
    assert torch.equal(out[0, 4:], model.generate(torch.tensor([[5, 6, 7]]), 3, do_sample=False)[0, 3:])


def test_repetition_penalty_sees_tokens_not_left_padding():
    """A left-padded row decodes as it does alone also with a repetition penalty: the penalty
    counts the ids of the prompt's tokens, not of its padding (padding with the token the row
    alone picks first changed every later token)."""
    model = micro(vocab_size=40)
    alone = model.generate(torch.tensor([[3, 20]]), 6, do_sample=False, repetition_penalty=1.5)
    pad = int(alone[0, 2])
    ids = torch.tensor([[3, 10, 11, 12, 13], [pad, pad, pad, 3, 20]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    for use_cache in (True, False):
        out = model.generate(ids, 6, do_sample=False, repetition_penalty=1.5, attention_mask=mask,
                             use_cache=use_cache)
        assert torch.equal(out[1, 3:], alone[0])
    # an all-token mask changes nothing, bit for bit
    logits, history = torch.randn(3, 40), torch.randint(0, 40, (3, 9))
    for penalty in (0.7, 1.3):
        want = torch.softmax(next_token(logits, history, repetition_penalty=penalty, do_sample=False).float(), 0)
        got = torch.softmax(next_token(logits, history, repetition_penalty=penalty, do_sample=False,
                                       history_mask=torch.ones(3, 9, dtype=torch.bool)).float(), 0)
        assert torch.equal(got, want)


def test_a_mask_of_the_new_tokens_keeps_the_prompts_padding():
    """After a left-padded prefill into a cache, a step whose attention_mask covers only its new
    token keeps the padding the cache holds (it was reset to none: the padded row then attended
    to its padding); a new token marked as padding is refused."""
    model = micro().eval()
    ids = torch.tensor([[5, 10, 11, 12, 13], [7, 7, 7, 5, 20]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    steps = []
    for new_mask in (None, torch.ones(2, 1, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)):
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True, attention_mask=mask)
            if new_mask is not None and new_mask.shape[1] == 6:
                new_mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
            steps.append(model(torch.tensor([[30], [31]]), past_key_values=cache, use_cache=True,
                               attention_mask=new_mask)[0])
        assert cache.starts.tolist() == [0, 3]
    assert torch.equal(steps[1], steps[0]) and torch.equal(steps[2], steps[0])
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, attention_mask=mask)
        with pytest.raises(ValueError, match="padding goes before a prompt"):
            model(torch.tensor([[30], [31]]), past_key_values=cache, use_cache=True,
                  attention_mask=torch.tensor([[1], [0]]))
