"""A static KV cache: per layer, K and V buffers [B, Hkv, max_len, D] allocated once.

Keys are stored unrotated: the attention op rotates each key at its position as it reads it
(SPEC §3), so the cache never depends on RoPE. Each step writes its new keys/values at the
current length and hands the attention the filled prefix as a view (unit stride in the last
dimension, which the attention op accepts), so decoding allocates nothing.

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
    """One layer's buffers; `update(k, v)` appends [B, Hkv, S, D] and returns the prefix views.

    Built from the buffers themselves, or with k = v = None and `shape` [B, Hkv, max_len, D]
    to allocate them at the first update, in that update's dtype and device."""

    def __init__(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], shape: Optional[tuple] = None):
        self.k, self.v = k, v
        self.shape = tuple(k.shape) if k is not None else tuple(shape)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        batch, max_len = self.shape[0], self.shape[2]
        start, end = self.length, self.length + k.shape[2]
        if end > max_len:
            raise ValueError(f"the KV cache holds {max_len} positions; writing {k.shape[2]} more at "
                             f"position {start} overflows it (allocate a longer cache)")
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
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The cache of a whole model: `layers[i]` is passed to block i's attention. dtype=None
    allocates each layer's buffers at its first update, in the dtype of the keys written."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: Optional[torch.dtype] = None, device=None):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        if dtype is None:
            self.layers = [LayerKVCache(None, None, shape) for _ in range(num_layers)]
        else:
            self.layers = [LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def length(self) -> int:
        """Positions already cached (the position of the next token)."""
        return self.layers[0].length

    def reset(self):
        for layer in self.layers:
            layer.length = 0
