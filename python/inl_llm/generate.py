"""Autoregressive generation: `prefill` the prompt into a static KV cache, then
`decode_one_token` per new token (gpt-fast's split), in eval mode, so every integrator exits
early once its state has converged.

The decode step reads and writes only device tensors of fixed shapes (the cache's buffers and
its filled length), so it can run three ways with the same tokens:
- eager (default); on a CPU with the C++ backend through `lean_decode.LeanDecodeStep`, the
  same kernels on the same arguments without the per-op Python (argument checks, backend
  choice, module calls) that otherwise takes more time than the kernels (`small`: ~8.3 -> ~4.7
  ms a token on 2 cores, the same logits);
- `compile=True`: torch.compile(fullgraph=True) of the step, mode "reduce-overhead" on CUDA
  (which captures a CUDA graph under the hood); on a CPU the default mode with inductor's C++
  wrapper (the generated code calls its kernels from C++ rather than Python: `small` 7.7 -> 6.4
  ms a token on 2 cores, fp32, the same tokens, ~10 s more to compile);
- `cuda_graph=True` (CUDA): the step captured once in a CUDA graph by hand and replayed per token,
  without torch.compile.
No step reads a value back to the host: end-of-sequence is tracked on the device and checked
every `eos_check_every` tokens.

Batched prompts of different lengths are left-padded, with `attention_mask` marking the real
tokens (1) and the padding (0): every row then generates what it generates alone.

Sampling, in this order: repetition penalty (CTRL rule: a seen token's logit is divided by the
penalty when positive, multiplied when negative), then greedy argmax, or temperature → top-k →
top-p (nucleus: the smallest set of tokens whose probability reaches top_p) → multinomial.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from inl_kernels.common import pin_inductor_vec_isa

from .lean_decode import LeanDecodeStep


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
               generator: Optional[torch.Generator] = None, history_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """logits [B, V] of the next position, history [B, S] the ids so far -> next ids [B].
    history_mask [B, S] (True: a token, False: padding): the repetition penalty counts only the
    ids of real tokens (a left-padded row then decodes as it does alone)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        if history_mask is None:
            seen = logits.gather(1, history)
            logits = logits.scatter(1, history, torch.where(seen > 0, seen / repetition_penalty,
                                                            seen * repetition_penalty))
        else:  # an id counts when any of its positions is a token (amax: duplicates need no order)
            present = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device).scatter_reduce(
                1, history, history_mask.to(torch.int32), reduce="amax")
            logits = torch.where(present > 0, torch.where(logits > 0, logits / repetition_penalty,
                                                          logits * repetition_penalty), logits)
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


def prefill(model, input_ids: torch.Tensor, cache, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Runs the prompt through the model, filling the cache; returns the last position's logits."""
    logits, _, _ = model(input_ids, past_key_values=cache, use_cache=True, attention_mask=attention_mask)
    return logits[:, -1]


def decode_one_token(model, token: torch.Tensor, cache) -> torch.Tensor:
    """token [B, 1] at position cache.length -> logits [B, V] of the position after it."""
    logits, _, _ = model(token, past_key_values=cache, use_cache=True)
    return logits[:, -1]


_compiled = {}


def _compiled_step(device_type: str):
    """decode_one_token under torch.compile(fullgraph=True), made once per process and device type
    (its guards then reuse one graph for every model of the same structure)."""
    if device_type not in _compiled:
        how = {}
        if device_type == "cuda":
            how = dict(mode="reduce-overhead")
        elif device_type == "cpu":
            # a decode step's kernels are small: the wrapper's Python call per kernel is a large share
            how = dict(options={"cpp_wrapper": True})
            pin_inductor_vec_isa()  # a cache shared with another ISA's processes would run wrong code
        _compiled[device_type] = torch.compile(decode_one_token, fullgraph=True, dynamic=False, **how)
    return _compiled[device_type]


class _CompiledStep:
    """The compiled decode step of one generate call. Past torch's recompile limit (a graph per
    batch size and cache length; 8 by default) the compiled function refuses a new shape: this
    call then decodes eagerly, with a warning, instead of failing after its prefill."""

    def __init__(self, model, cache, compiled):
        self.model, self.cache, self.compiled = model, cache, compiled

    def __call__(self, token):
        if self.compiled is not None:
            try:
                return self.compiled(self.model, token, self.cache)
            except torch._dynamo.exc.FailOnRecompileLimitHit as e:
                warnings.warn(f"generate(compile=True): torch.compile's recompile limit is reached for this batch "
                              f"size and cache length ({e}); decoding this call eagerly", stacklevel=3)
                self.compiled = None
        return decode_one_token(self.model, token, self.cache)


class CudaGraphStep:
    """decode_one_token captured once in a CUDA graph and replayed for every later token: the
    token goes into a static input buffer, the graph writes the cache and the logits buffer.
    The first call runs eagerly on a side stream (Triton compiles, cuBLAS and allocator warm
    up), the second captures and replays."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graph = None
        self.token = None
        self.logits = None

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.graph is None and self.token is None:  # warm-up step, eager
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = decode_one_token(self.model, token, self.cache)
            torch.cuda.current_stream().wait_stream(stream)
            self.token = token.clone()
            return logits
        if self.graph is None:
            self.token.copy_(token)
            length = self.cache.length
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = decode_one_token(self.model, self.token, self.cache)
            self.cache.length = length  # capture ran the Python, not the step
        else:
            self.token.copy_(token)
        self.graph.replay()
        self.cache.length += token.shape[1]
        return self.logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             do_sample: bool = True, eos_token_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, attention_mask: Optional[torch.Tensor] = None,
             compile: bool = False, cuda_graph: bool = False, eos_check_every: int = 8) -> torch.Tensor:
    """input_ids [B, S] -> [B, S + n] with n <= max_new_tokens new ids.

    Runs in eval mode (early exit on) and restores the model's mode after. Once a row emits
    eos_token_id it keeps emitting it; generation stops when every row has (checked every
    `eos_check_every` tokens, the only reads back to the host). Without the cache each step
    re-runs the whole sequence (same tokens as with it: the test checks greedy). The prompt plus
    the new tokens but the last (never fed back) must fit in max_seq_len. attention_mask [B, S]:
    left padding of batched prompts (1 = token, 0 = padding; a row that ends in padding is a
    ValueError). compile / cuda_graph: see the module
    docstring (both need the cache)."""
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
    if (compile or cuda_graph) and not use_cache:
        raise ValueError("compile and cuda_graph decode through the static KV cache: use_cache must be True")
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got input_ids on {input_ids.device}")
    if not isinstance(eos_check_every, int) or eos_check_every < 1:
        raise ValueError(f"eos_check_every must be an int >= 1, got {eos_check_every!r}")
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= 1:
        # new tokens follow the last position of every row: a row whose prompt ends in padding
        # (right padding) would be continued from a pad (one read of the mask, once per call)
        ends_in_padding = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        if ends_in_padding:
            raise ValueError(f"attention_mask: generate continues every row from its last position, so prompts must "
                             f"be left-padded; row(s) {ends_in_padding[:8]} end in padding (pad on the left, e.g. a "
                             f"tokenizer's padding_side='left')")
    # the repetition penalty sees the prompt's tokens, not its left padding
    tokens_mask = None
    if attention_mask is not None and repetition_penalty != 1.0:
        tokens_mask = torch.cat((attention_mask[:, -length:].bool(),
                                 attention_mask.new_ones(batch, max(max_new_tokens, 0), dtype=torch.bool)), dim=1)
    sample = lambda logits, ids: next_token(  # noqa: E731
        logits, ids, temperature, top_k, top_p, repetition_penalty, do_sample, generator,
        None if tokens_mask is None else tokens_mask[:, :ids.shape[1]])
    was_training = model.training
    model.eval()
    try:
        if max_new_tokens == 0:
            return input_ids
        out = torch.empty(batch, length + max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
        out[:, :length] = input_ids
        # a compiled step is one graph per cache shape: its length is rounded up to a power of two
        # (at most max_seq_len), so prompts of every length share a few graphs
        cache_len = min(limit, 1 << max(seen - 1, 63).bit_length()) if compile else seen
        cache = model.new_cache(batch, cache_len) if use_cache else None
        if use_cache:
            logits = prefill(model, input_ids, cache, attention_mask)
        else:
            logits = model(input_ids, attention_mask=attention_mask)[0][:, -1]
        if cuda_graph:
            step = CudaGraphStep(model, cache)
        elif compile:
            step = _CompiledStep(model, cache, _compiled_step(input_ids.device.type))
        else:
            # eager: on a CPU the lean step (the same kernels without the Python around each one)
            step = (LeanDecodeStep.build(model, cache) if use_cache else None) or (
                lambda token: decode_one_token(model, token, cache))
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        done = torch.zeros(max_new_tokens, dtype=torch.bool, device=input_ids.device)  # every row finished at step i
        mask = attention_mask
        for i in range(max_new_tokens):
            token = sample(logits, out[:, :length + i])
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
                done[i] = finished.all()
            out[:, length + i] = token
            if i == max_new_tokens - 1:
                break
            if eos_token_id is not None and (i + 1) % eos_check_every == 0 and bool(finished.all()):
                break
            if use_cache:
                logits = step(token[:, None])
            else:
                if mask is not None:
                    mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
                logits = model(out[:, :length + i + 1], attention_mask=mask)[0][:, -1]
        if eos_token_id is not None and bool(done.any()):
            # stop right after the step at which the last row finished, as a check every step would
            first = int(done.nonzero()[0])
            return out[:, :length + first + 1]
        return out[:, :length + i + 1]
    finally:
        model.train(was_training)
