"""Tokens for training: a byte-level tokenizer (no download), loaders for plain text and for
parquet files with `prompt`/`completion` columns, and the default corpus, which needs neither a
download nor committed text: the Python standard library's own source files, read at runtime
from this interpreter's `sysconfig` stdlib path.

Every loader returns one 1-D int64 tensor: the documents' tokens joined, each one BOS, its
bytes, EOS (so a prompt that starts with BOS starts the way every training document did).
"""
from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from pathlib import Path
from typing import Optional, Union

import torch


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 = BOS, 257 = EOS, 258 = PAD. Lossless on any text."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
        raw = text.encode("utf-8")
        ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
        parts = ([torch.tensor([self.bos_id])] if bos else []) + [ids] + ([torch.tensor([self.eos_id])] if eos else [])
        return torch.cat(parts) if len(parts) > 1 else ids

    def decode(self, ids) -> str:
        """Drops special tokens; a byte sequence that is not valid UTF-8 decodes to U+FFFD."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _join(docs, tokenizer: ByteTokenizer) -> torch.Tensor:
    parts = [tokenizer.encode(doc, bos=True, eos=True) for doc in docs]
    if not parts:
        raise ValueError("the corpus is empty")
    return torch.cat(parts)


def stdlib_files() -> list[Path]:
    """The standard library's .py sources on this machine, tests and site-packages left out, in a
    fixed shuffled order (seeded), so any prefix of the list samples the whole library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in skip]  # never descend into installed packages
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    files.sort()
    if not files:
        raise FileNotFoundError(f"no Python sources under the stdlib path {root}: this interpreter ships "
                                f"bytecode only; pass a text or parquet file instead")
    random.Random(0).shuffle(files)
    return files


def load_stdlib(max_bytes: Optional[int] = None, tokenizer: Optional[ByteTokenizer] = None) -> torch.Tensor:
    """The default corpus: stdlib source files, whole files until `max_bytes` is reached."""
    docs, total = [], 0
    for path in stdlib_files():
        try:
            text = _read_utf8(path)
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return _join(docs, tokenizer or ByteTokenizer())


def _read_utf8(path: Path) -> str:
    """A file's text, byte for byte: no newline translation (Path.read_text turns \r\n and \r into
    \n, which dropped every CR of a corpus)."""
    return path.read_bytes().decode("utf-8")


def load_text(path: Union[str, Path], tokenizer: Optional[ByteTokenizer] = None) -> torch.Tensor:
    """A UTF-8 text file, or every *.txt file of a directory (sorted), each one document, its bytes
    as they are (CRs included)."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no text file at {path}")

    def texts():
        for f in files:
            try:
                yield _read_utf8(f)
            except UnicodeDecodeError as e:
                raise ValueError(f"{f} is not UTF-8 text: {e}") from None
    return _join(texts(), tokenizer or ByteTokenizer())


def load_parquet(path: Union[str, Path], prompt_column: str = "prompt", completion_column: str = "completion",
                 tokenizer: Optional[ByteTokenizer] = None) -> torch.Tensor:
    """One document per row: BOS, the prompt, then the completion, EOS."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow (or the [data] extra)") from e
    schema = pq.read_schema(path)
    missing = [c for c in (prompt_column, completion_column) if c not in schema.names]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; its columns are {schema.names}")
    table = pq.read_table(path, columns=[prompt_column, completion_column])
    tok = tokenizer or ByteTokenizer()
    for column in (prompt_column, completion_column):
        kind = table.schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
                or (pa.types.is_dictionary(kind) and (pa.types.is_string(kind.value_type)
                                                      or pa.types.is_large_string(kind.value_type)))):
            raise ValueError(f"{path}: column {column!r} must hold text (strings), got {kind}")
    rows = zip(table.column(prompt_column).to_pylist(), table.column(completion_column).to_pylist())
    parts = [tok.encode((p or "") + (c or ""), bos=True, eos=True) for p, c in rows]
    if not parts:
        raise ValueError(f"{path} has no rows")
    return torch.cat(parts)


def load_corpus(source: str = "stdlib", max_bytes: Optional[int] = None) -> torch.Tensor:
    """"stdlib" (the default corpus), a .parquet file, or a text file / directory of .txt files.
    max_bytes (>= 1): for a file or directory, the first max_bytes tokens of the stream (BOS and
    EOS included; the cut may fall inside a document); for "stdlib", whole files until their text
    reaches max_bytes characters."""
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
        raise ValueError(f"max_bytes must be None or an int >= 1, got {max_bytes!r}")
    if source == "stdlib":
        return load_stdlib(max_bytes)
    tokens = load_parquet(source) if str(source).lower().endswith(".parquet") else load_text(source)
    return tokens[:max_bytes] if max_bytes is not None else tokens


def split(tokens: torch.Tensor, eval_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval): the last `eval_fraction` of the stream is held out."""
    cut = int(len(tokens) * (1 - eval_fraction))
    return tokens[:cut], tokens[cut:]


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size windows at random offsets: inputs [B, S] and next-token targets [B, S]."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


class WindowSampler:
    """The training windows of every step, a pure function of (seed, step), read shard by shard.

    The train stream is cut into `num_shards` contiguous shards. Step t's global batch is
    batch_size windows of seq_len + 1 tokens: batch_size / num_shards from each shard, in shard
    order, at offsets drawn by an RNG seeded from (seed, shard, t). Rank r of a world of W
    (W dividing num_shards) reads only shards r, r + W, ... and so holds rows of the global batch
    that no other rank reads. Hence:
    - a step's global batch is the same on every world size that divides num_shards (one
      process with num_shards=2 sees exactly what two ranks see together);
    - the data position is the step number: resuming at step t continues the stream exactly,
      on any such world size, with no iterator state to carry.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, num_shards: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_shards < 1 or batch_size % num_shards:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_shards ({num_shards})")
        if world_size < 1 or num_shards % world_size or not 0 <= rank < world_size:
            raise ValueError(f"num_shards ({num_shards}) must be a multiple of world_size ({world_size}), "
                             f"rank in [0, world_size), got rank {rank}")
        self.seq_len, self.batch_size, self.num_shards, self.seed = seq_len, batch_size, num_shards, seed
        self.rank, self.world_size = rank, world_size
        n = len(tokens)
        bounds = [n * s // num_shards for s in range(num_shards + 1)]
        self.shards = {s: tokens[bounds[s]:bounds[s + 1]] for s in range(rank, num_shards, world_size)}
        short = [s for s, shard in self.shards.items() if len(shard) < seq_len + 1]
        if short:
            raise ValueError(f"the train stream ({n} tokens) cut into {num_shards} shards leaves shard(s) {short} "
                             f"shorter than seq_len + 1 = {seq_len + 1}")

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _generator(self, shard: int, step: int) -> torch.Generator:
        digest = hashlib.sha256(f"inl_llm windows {self.seed} {shard} {step}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of step `step`'s global batch: inputs and next-token targets,
        [batch_size / world_size, seq_len] each."""
        per_shard = self.batch_size // self.num_shards
        windows = []
        for s, shard in self.shards.items():
            starts = torch.randint(0, len(shard) - self.seq_len, (per_shard,), generator=self._generator(s, step))
            windows.extend(shard[i:i + self.seq_len + 1] for i in starts.tolist())
        windows = torch.stack(windows)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        """What must match for a resume to see the same stream (the position is the step)."""
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "num_shards": self.num_shards,
                "seed": self.seed}
