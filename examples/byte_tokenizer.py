"""A stand-in for the hub tokenizer that scripts written for the original package load
(`transformers.AutoTokenizer.from_pretrained("gpt2")`), which cannot be downloaded here: the
same calls, over inl_llm's byte tokenizer (bytes 0-255, BOS 256, EOS 257, PAD 258; lossless).
The scripts beside it use it; a script of the original's runs with its tokenizer import
pointed here (`from byte_tokenizer import AutoTokenizer`).

Only the calls those scripts make: from_pretrained / save_pretrained, encode (max_length,
truncation, return_tensors="pt"), decode (skip_special_tokens), vocab_size and the special
tokens (the pad token can be set to the EOS token, as is usual with GPT-2's).
"""
from __future__ import annotations

import json
import os

import torch

from inl_llm import ByteTokenizer

CONFIG = "tokenizer_config.json"


class ByteLevelTokenizer:
    _bytes = ByteTokenizer()
    vocab_size = ByteTokenizer.vocab_size
    bos_token, eos_token = "<bos>", "<eos>"
    _ids = {"<bos>": ByteTokenizer.bos_id, "<eos>": ByteTokenizer.eos_id, "<pad>": ByteTokenizer.pad_id}

    def __init__(self, pad_token: str = "<pad>"):
        self.pad_token = pad_token

    @property
    def pad_token(self) -> str:
        return self._pad_token

    @pad_token.setter
    def pad_token(self, token: str):
        if token not in self._ids:
            raise ValueError(f"pad_token must be one of {sorted(self._ids)}, got {token!r}")
        self._pad_token = token

    @property
    def pad_token_id(self) -> int:
        return self._ids[self._pad_token]

    @property
    def eos_token_id(self) -> int:
        return self._ids[self.eos_token]

    @property
    def bos_token_id(self) -> int:
        return self._ids[self.bos_token]

    def encode(self, text: str, max_length: int | None = None, truncation: bool = False,
               return_tensors: str | None = None, add_special_tokens: bool = False):
        """UTF-8 bytes of `text` (with BOS first when add_special_tokens); a list of ids, or a
        [1, n] tensor with return_tensors="pt"."""
        ids = self._bytes.encode(text, bos=add_special_tokens).tolist()
        if truncation and max_length is not None:
            ids = ids[:max_length]
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            return self._bytes.decode(ids)
        names = {v: k for k, v in self._ids.items()}
        parts, run = [], []
        for i in ids:
            if i in names:
                parts += [self._bytes.decode(run), names[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self._bytes.decode(run)])

    def save_pretrained(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG)
        with open(path, "w") as f:
            json.dump({"tokenizer_class": type(self).__name__, "pad_token": self.pad_token}, f)
        return (path,)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name_or_path: str, **_) -> ByteLevelTokenizer:
        """A byte tokenizer; from a directory written by save_pretrained, with its pad token.
        Any other name (e.g. "gpt2") gives a fresh one: nothing is downloaded."""
        path = os.path.join(str(name_or_path), CONFIG)
        if os.path.isfile(path):
            with open(path) as f:
                return ByteLevelTokenizer(pad_token=json.load(f).get("pad_token", "<pad>"))
        return ByteLevelTokenizer()
