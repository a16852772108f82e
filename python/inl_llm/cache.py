"""A static KV cache: per layer, K and V buffers [B, Hkv, max_len, D] allocated once, and the
filled length kept on the device.

Keys are stored unrotated: the attention op rotates each key at its position as it reads it
(SPEC §3), so the cache never depends on RoPE. A forward of S tokens writes their keys and
values at indices [L, L + S) of every layer (L: the filled length, the same for every row) and
hands the attention the whole buffers with `kv_lens` = L + S per row, a device tensor: no
shape and no host value changes from one token to the next, so a decode step can be captured
once in a CUDA graph (or compiled once) and replayed for every token (gpt-fast's design).

Left padding (batched prompts of different lengths, aligned at their ends) is kept per row in
`starts`: row b's keys begin at starts[b], and the attention counts positions from there, so a
padded row computes what it computes alone.

The buffers hold the activations' dtype, which under autocast is not the weights' (bf16 keys
from fp32 projections): `IntegratorLanguageModel.new_cache` passes the dtype the model computes
in, and a cache made with dtype=None takes it from the first keys written. Keys of another
dtype are an error, never cast silently (the attention op wants q, k and v in one dtype).
"""
from __future__ import annotations

from typing import Optional

import torch


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class LayerKVCache:
    """One layer's buffers. `update(k, v)` writes [B, Hkv, S, D] at the cache's current write
    indices and returns (k_buffer, v_buffer, kv_lens, kv_starts) for the attention op."""

    def __init__(self, owner: "KVCache", k: Optional[torch.Tensor], v: Optional[torch.Tensor], shape: tuple):
        self.owner = owner
        self.k, self.v = k, v
        self.shape = tuple(shape)

    @property
    def length(self) -> int:
        return self.owner.length

    def update(self, k: torch.Tensor, v: torch.Tensor):
        batch = self.shape[0]
        if k.shape[0] != batch:
            raise ValueError(f"the KV cache was allocated for batch {batch}, got batch {k.shape[0]}")
        if v.dtype != k.dtype:
            raise TypeError(f"k and v must share a dtype, got k {_name(k.dtype)} and v {_name(v.dtype)}")
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
        if k.dtype != self.k.dtype:
            raise TypeError(f"k has dtype {_name(k.dtype)}, but the KV cache holds {_name(self.k.dtype)}: make the "
                            f"cache in the dtype the model computes in (model.new_cache under the same autocast "
                            f"as the forward, or dtype=None to take it from the first keys)")
        if k.device != self.k.device:
            raise ValueError(f"k is on {k.device}, but the KV cache is on {self.k.device}")
        index, kv_lens = self.owner.pending(k.shape[2])
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v, kv_lens, self.owner.starts


class KVCache:
    """The cache of a whole model: `layers[i]` is passed to block i's attention. dtype=None
    allocates each layer's buffers at its first update, in the dtype of the keys written.

    The model drives it: `begin(S)` before the blocks (the write indices and the lengths after
    this forward, computed on the device once for all layers), `commit()` after them. `lens`
    [B] (device, int32) is the filled length, `length` its host copy, kept by eager forwards (a
    compiled or graph-replayed decode step leaves it to its caller, as `generate` does)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: Optional[torch.dtype] = None, device=None):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        if dtype is None:
            self.layers = [LayerKVCache(self, None, None, shape) for _ in range(num_layers)]
        else:
            self.layers = [LayerKVCache(self, torch.zeros(shape, dtype=dtype, device=device),
                                        torch.zeros(shape, dtype=dtype, device=device), shape)
                           for _ in range(num_layers)]
        self.max_len, self.batch_size = max_len, batch_size
        self.lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.starts = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.length = 0
        self._pending = None

    def begin(self, num_tokens: int, kv_starts: Optional[torch.Tensor] = None):
        """Prepares a forward of `num_tokens` tokens: they go to indices [L, L + num_tokens).
        kv_starts [B] (a prefill's left padding) is recorded for every later step."""
        if not torch.compiler.is_compiling() and self.length + num_tokens > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; writing {num_tokens} more at position "
                             f"{self.length} overflows it (allocate a longer cache)")
        if kv_starts is not None:
            self.starts.copy_(kv_starts)
        index = self.lens[:1].long() + torch.arange(num_tokens, device=self.lens.device)
        self._pending = (index, self.lens + num_tokens)

    def pending(self, num_tokens: int):
        """(write indices [S], kv_lens [B] after the write) of the forward in progress."""
        if self._pending is None or self._pending[0].shape[0] != num_tokens:
            raise RuntimeError("KVCache.begin(num_tokens) must be called before the layers write to the cache "
                               "(the model does it; a GQAttention used alone needs cache.begin(S) first)")
        return self._pending

    def commit(self):
        """Ends the forward: the written tokens become part of the cache."""
        index, lens = self._pending
        self.lens.copy_(lens)
        self._pending = None
        if not torch.compiler.is_compiling():
            self.length += index.shape[0]

    def reset(self):
        self.lens.zero_()
        self.starts.zero_()
        self.length = 0
        self._pending = None
