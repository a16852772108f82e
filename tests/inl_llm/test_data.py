"""Byte tokenizer, loaders and the embedded corpus."""
import sysconfig
from pathlib import Path

import pytest
import torch

from inl_llm import ByteTokenizer, load_corpus, load_parquet, load_stdlib, load_text
from inl_llm.data import random_batch, split, stdlib_files


def test_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' + \"漢\"  # ✓"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids.dtype == torch.int64
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1].tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259 and max(tok.bos_id, tok.eos_id, tok.pad_id) == tok.vocab_size - 1
    assert tok.encode("").numel() == 0
    assert tok.decode([0xE6]) == "\ufffd"  # a cut multi-byte character decodes, replaced


def test_text_loader(tmp_path):
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "a.txt").write_text("hello ")
    tok = ByteTokenizer()
    bos, eos = tok.bos_id, tok.eos_id
    single = load_text(tmp_path / "a.txt")
    assert single.tolist() == [bos] + list(b"hello ") + [eos]
    both = load_text(tmp_path)  # sorted: a.txt, then b.txt
    assert both.tolist() == [bos] + list(b"hello ") + [eos, bos] + list(b"world") + [eos]
    assert torch.equal(load_corpus(str(tmp_path / "a.txt")), single)
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")


def test_parquet_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["Q: 1+1?", "Hi"], "completion": [" 2", " there"], "x": [1, 2]}), path)
    tok = ByteTokenizer()
    ids = load_parquet(path).tolist()
    expected = [tok.bos_id] + list(b"Q: 1+1? 2") + [tok.eos_id] + [tok.bos_id] + list(b"Hi there") + [tok.eos_id]
    assert ids == expected
    assert load_corpus(str(path)).tolist() == expected
    pq.write_table(pa.table({"question": ["a"], "completion": ["b"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="prompt"):
        load_parquet(tmp_path / "bad.parquet")


def test_stdlib_corpus_is_read_from_this_machine():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files and all(root in f.parents and f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    assert files == stdlib_files()  # a fixed order
    tokens = load_stdlib(max_bytes=200_000)
    assert 200_000 <= len(tokens) < 200_000 + max(f.stat().st_size for f in files) + 1000
    text = ByteTokenizer().decode(tokens)
    assert text.count("def ") > 10 and text.count("import ") > 3
    first = files[0].read_text(encoding="utf-8")
    assert torch.equal(tokens[:len(first.encode()) + 2], ByteTokenizer().encode(first, bos=True, eos=True))


def test_batches_and_split():
    tokens = torch.arange(100)
    train, held = split(tokens, 0.1)
    assert torch.equal(torch.cat((train, held)), tokens) and len(held) == 10
    x, y = random_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # targets are the next token
    x2, _ = random_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="seq_len"):
        random_batch(tokens[:10], 1, 16)
