"""Autoregressive generation: `prefill` the prompt into a static KV cache, then
`decode_one_token` per new token (gpt-fast's split), in eval mode, so every integrator exits
early once its state has converged.

Sampling, in this order: repetition penalty (CTRL rule: a seen token's logit is divided by the
penalty when positive, multiplied when negative), then greedy argmax, or temperature → top-k →
top-p (nucleus: the smallest set of tokens whose probability reaches top_p) → multinomial.
"""
from __future__ import annotations

from typing import Optional

import torch


def _check(max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def next_token(logits: torch.Tensor, history: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, repetition_penalty: float = 1.0, do_sample: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] of the next position, history [B, S] the ids so far -> next ids [B]."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / repetition_penalty,
                                                        seen * repetition_penalty))
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Runs the prompt through the model, filling the cache; returns the last position's logits."""
    logits, _, _ = model(input_ids, past_key_values=cache, use_cache=True)
    return logits[:, -1]


def decode_one_token(model, token: torch.Tensor, cache) -> torch.Tensor:
    """token [B, 1] at position cache.length -> logits [B, V] of the position after it."""
    logits, _, _ = model(token, past_key_values=cache, use_cache=True)
    return logits[:, -1]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             do_sample: bool = True, eos_token_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """input_ids [B, S] -> [B, S + n] with n <= max_new_tokens new ids.

    Runs in eval mode (early exit on) and restores the model's mode after. Once a row emits
    eos_token_id it keeps emitting it; generation stops when every row has. Without the cache
    each step re-runs the whole sequence (same tokens as with it: the test checks greedy).
    The prompt plus the new tokens but the last must fit in max_seq_len."""
    _check(max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    batch, length = input_ids.shape
    if length < 1:
        raise ValueError("input_ids must hold at least one token (a prompt; e.g. the BOS id)")
    # the last new token is sampled, never fed back: the model sees length + max_new_tokens - 1 positions
    limit, seen = model.config.max_seq_len, length + max(max_new_tokens - 1, 0)
    if seen > limit:
        raise ValueError(f"the prompt ({length} tokens) plus max_new_tokens ({max_new_tokens}) needs {seen} positions "
                         f"(the last new token is not fed back), more than max_seq_len={limit}")
    sample = lambda logits, ids: next_token(logits, ids, temperature, top_k, top_p,  # noqa: E731
                                            repetition_penalty, do_sample, generator)
    was_training = model.training
    model.eval()
    try:
        out = input_ids
        if max_new_tokens == 0:
            return out
        cache = model.new_cache(batch, seen) if use_cache else None
        logits = prefill(model, input_ids, cache) if use_cache else model(input_ids)[0][:, -1]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = sample(logits, out)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            out = torch.cat((out, token[:, None]), dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits = decode_one_token(model, token[:, None], cache) if use_cache else model(out)[0][:, -1]
        return out
    finally:
        model.train(was_training)
