"""Byte tokenizer, loaders and the embedded corpus."""
import sysconfig
from pathlib import Path

import pytest
import torch

from inl_llm import ByteTokenizer, load_corpus, load_parquet, load_stdlib, load_text
from inl_llm.data import WindowSampler, random_batch, split, stdlib_files


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


def test_text_keeps_every_byte_and_names_a_bad_file(tmp_path):
    """CR bytes stay (read_text's newline translation dropped them: the byte tokenizer is lossless);
    a file that is not UTF-8 is a ValueError naming it; max_bytes must be >= 1."""
    raw = b"line one\r\nline two\rend"
    (tmp_path / "crlf.txt").write_bytes(raw)
    tok = ByteTokenizer()
    assert load_text(tmp_path / "crlf.txt").tolist() == [tok.bos_id] + list(raw) + [tok.eos_id]
    bad = tmp_path / "dir"
    bad.mkdir()
    (bad / "a.txt").write_text("fine")
    (bad / "b.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="b.txt is not UTF-8"):
        load_text(bad)
    for limit in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_bytes"):
            load_corpus(str(tmp_path / "crlf.txt"), max_bytes=limit)
    assert load_corpus(str(tmp_path / "crlf.txt"), max_bytes=4).tolist() == [tok.bos_id] + list(b"lin")


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
    # a column of numbers: a ValueError naming it (it was a TypeError from string concatenation)
    pq.write_table(pa.table({"prompt": [1, 2], "completion": ["a", "b"]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="column 'prompt' must hold text"):
        load_parquet(tmp_path / "ints.parquet")
    # an upper-case suffix is still parquet (it was read as text)
    upper = tmp_path / "D.PARQUET"
    upper.write_bytes(path.read_bytes())
    assert load_corpus(str(upper)).tolist() == expected


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


def test_window_sampler_gives_every_world_size_the_same_global_batch():
    tokens = torch.arange(1000)  # a token's value is its position: windows show where they were read
    one = WindowSampler(tokens, 16, 8, num_shards=4, seed=3)
    two = [WindowSampler(tokens, 16, 8, num_shards=4, seed=3, rank=r, world_size=2) for r in range(2)]
    four = [WindowSampler(tokens, 16, 8, num_shards=4, seed=3, rank=r, world_size=4) for r in range(4)]
    for step in (0, 1, 17):
        x, y = one.batch(step)
        assert x.shape == (8, 16) and torch.equal(y, x + 1)
        # shard s holds tokens [250 s, 250 (s + 1)); one process reads its 2 windows in shard order
        assert [int(w[0]) // 250 for w in x] == [0, 0, 1, 1, 2, 2, 3, 3]
        assert all(int(w[-1]) + 1 < 250 * (int(w[0]) // 250 + 1) for w in y)  # a window never crosses a shard
        # rank r of W reads shards r, r + W, ...: together the ranks read the one global batch
        by_shard = {int(w[0]) // 250: [] for w in x}
        for w in x:
            by_shard[int(w[0]) // 250].append(w)
        for world in (two, four):
            rows = {int(w[0]) // 250: [] for sampler in world for w in sampler.batch(step)[0]}
            for sampler in world:
                local = sampler.batch(step)[0]
                assert local.shape == (8 // sampler.world_size, 16) and sampler.local_batch_size == len(local)
                for w in local:
                    rows[int(w[0]) // 250].append(w)
            assert all(torch.equal(torch.stack(rows[s]), torch.stack(by_shard[s])) for s in by_shard)
    assert not torch.equal(one.batch(0)[0], one.batch(1)[0])  # the position is the step
    assert torch.equal(one.batch(5)[0], WindowSampler(tokens, 16, 8, num_shards=4, seed=3).batch(5)[0])
    assert not torch.equal(one.batch(5)[0], WindowSampler(tokens, 16, 8, num_shards=4, seed=4).batch(5)[0])


def test_window_sampler_rejects_what_cannot_be_split():
    tokens = torch.arange(100)
    with pytest.raises(ValueError, match="batch_size .* multiple of num_shards"):
        WindowSampler(tokens, 8, 6, num_shards=4)
    with pytest.raises(ValueError, match="num_shards .* multiple of world_size"):
        WindowSampler(tokens, 8, 8, num_shards=4, rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"shard\(s\) \[0, 1, 2, 3\] shorter than seq_len"):
        WindowSampler(tokens, 30, 8, num_shards=4)
