"""A static KV cache: per layer, K and V buffers [B, Hkv, max_len, D] allocated once.

Keys are stored unrotated: the attention op rotates each key at its position as it reads it
(SPEC §3), so the cache never depends on RoPE. Each step writes its new keys/values at the
current length and hands the attention the filled prefix as a view (unit stride in the last
dimension, which the attention op accepts), so decoding allocates nothing.
"""
from __future__ import annotations

import torch


class LayerKVCache:
    """One layer's buffers; `update(k, v)` appends [B, Hkv, S, D] and returns the prefix views."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"the KV cache holds {self.k.shape[2]} positions; writing {k.shape[2]} more at "
                             f"position {start} overflows it (allocate a longer cache)")
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"the KV cache was allocated for batch {self.k.shape[0]}, got batch {k.shape[0]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The cache of a whole model: `layers[i]` is passed to block i's attention."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
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
