"""The command line's arguments: a bad one is argparse's `error:` line naming the flag (exit
status 2, no traceback) before any training starts; `train --resume ckpt --steps N` takes every
setting the checkpoint was trained with (a run of N steps interrupted and resumed so ends where
the uninterrupted run does); a resume on another corpus is refused."""
import os
import warnings

import pytest
import torch

from inl_llm import INLConfig, build_model, load_checkpoint
from inl_llm import data as corpus_data
from inl_llm.cli import main
from inl_llm.train import TrainConfig, train

SEED = int(os.environ.get("INL_TEST_SEED", "0"))
TINY = ["--set", "d_model=32", "--set", "num_layers=1", "--set", "max_seq_len=32", "--set", "controller_hidden=8",
        "--set", "min_embedding_rank=8", "--set", "mu_group_size=8"]
RUN = ["--max-bytes", "40000", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
       "--no-progress", "--device", "cpu"]
TRAIN = ["train", "--size", "tiny", *TINY, *RUN, "--steps", "1"]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """Not under torchrun, and on the CPU whatever this machine has (--device auto picks it)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ck = tmp_path_factory.mktemp("cli_args") / "ck"
    main([*TRAIN, "--out", str(ck)])
    return ck


def _bad(checkpoint, missing):
    """{case: (the flag its error must name, argv)}"""
    ck = str(checkpoint)
    gen = ["generate", "--checkpoint", ck, "--max-new-tokens", "3", "--device", "cpu"]
    return {
        "steps -1": ("--steps", TRAIN + ["--steps", "-1"]),
        "batch-size 0": ("--batch-size", TRAIN + ["--batch-size", "0"]),
        "grad-accum 0": ("--grad-accum", TRAIN + ["--grad-accum", "0"]),
        "grad-accum 3, batch 2": ("--grad-accum", TRAIN + ["--grad-accum", "3"]),
        "data-shards 0": ("--data-shards", TRAIN + ["--data-shards", "0"]),
        "data-shards 3, batch 2": ("--data-shards", TRAIN + ["--data-shards", "3"]),
        "cycle-scale 0": ("--cycle-scale", TRAIN + ["--cycle-scale", "0"]),
        "lr nan": ("--lr", TRAIN + ["--lr", "nan"]),
        "lr inf": ("--lr", TRAIN + ["--lr", "inf"]),
        "lr 0": ("--lr", TRAIN + ["--lr", "0"]),
        "lr -0.001": ("--lr", TRAIN + ["--lr", "-0.001"]),
        "data missing": ("--data", TRAIN + ["--data", missing]),
        "seq-len 64, max_seq_len 32": ("--seq-len", TRAIN + ["--seq-len", "64"]),
        "eval-fraction 0": ("--eval-fraction", TRAIN + ["--eval-fraction", "0"]),
        "eval-fraction 1.5": ("--eval-fraction", TRAIN + ["--eval-fraction", "1.5"]),
        "resume missing": ("--resume", TRAIN + ["--resume", missing]),
        "parallel ddp, no torchrun": ("--parallel", TRAIN + ["--parallel", "ddp"]),
        "generate checkpoint missing": ("--checkpoint", ["generate", "--checkpoint", missing, "--device", "cpu"]),
        "generate temperature -0.5": ("--temperature", gen + ["--temperature", "-0.5"]),
        "generate top-p 0": ("--top-p", gen + ["--top-p", "0"]),
        "generate top-p 1.5": ("--top-p", gen + ["--top-p", "1.5"]),
        "generate top-k -1": ("--top-k", gen + ["--top-k", "-1"]),
        "generate max-new-tokens -1": ("--max-new-tokens", gen + ["--max-new-tokens", "-1"]),
        "export checkpoint missing": ("--checkpoint", ["export", "--checkpoint", missing, "--out", missing + "-out"]),
        "convert source missing": ("source", ["convert", missing, missing + "-out"]),
        "distill teacher missing": ("--teacher", ["distill", "--teacher", missing, "--steps", "1", "--device", "cpu"]),
        "distill size unknown": ("--size", ["distill", "--teacher", ck, "--size", "huge", "--steps", "1",
                                            "--device", "cpu"]),
        "demo tokens 300, max_seq_len 256": ("--tokens", ["demo", "--tokens", "300", "--seconds", "1", "--max-bytes",
                                                          "40000", "--eval-batches", "1", "--no-progress", "--out",
                                                          missing + "-demo"]),
    }


@pytest.mark.parametrize("case", list(_bad("CK", "MISSING")))
def test_a_bad_argument_is_a_usage_error_naming_the_flag(case, checkpoint, tmp_path, capsys):
    missing = str(tmp_path / "does-not-exist")
    flag, argv = _bad(checkpoint, missing)[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(argv)
    printed = capsys.readouterr()
    assert err.value.code == 2, (err.value.code, printed.err)
    line = printed.err.strip().splitlines()[-1]
    assert " error: " in line and flag in line, line
    assert "expected one argument" not in line  # the value was read as a value
    assert "Traceback" not in printed.err
    assert "step " not in printed.out and "eval loss" not in printed.out  # nothing trained
    assert not os.path.exists(missing + "-out") and not os.path.exists(missing + "-demo")


@pytest.mark.parametrize("what", ["empty directory", "a file", "hugging face directory"])
@pytest.mark.parametrize("command", ["generate", "resume", "export", "distill"])
def test_a_path_that_is_no_checkpoint_is_a_usage_error(what, command, tmp_path, capsys):
    """A directory that exists but holds no checkpoint of ours (empty, a Hugging Face export) or a
    file: argparse's error naming the flag and what the path is, not a loader's traceback."""
    path = tmp_path / "thing"
    if what == "a file":
        path.write_text("x")
    else:
        path.mkdir()
        if what == "hugging face directory":
            (path / "config.json").write_text('{"model_type": "inl_llm", "vocab_size": 259}')
    argv, flag = {"generate": (["generate", "--checkpoint", str(path), "--device", "cpu"], "--checkpoint"),
                  "resume": (TRAIN + ["--resume", str(path)], "--resume"),
                  "export": (["export", "--checkpoint", str(path), "--out", str(tmp_path / "out")], "--checkpoint"),
                  "distill": (["distill", "--teacher", str(path), "--steps", "1", "--device", "cpu"], "--teacher"),
                  }[command]
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(argv)
    printed = capsys.readouterr()
    assert err.value.code == 2 and "Traceback" not in printed.err
    line = printed.err.strip().splitlines()[-1]
    assert flag in line and ("not a checkpoint" in line or "is a file" in line), line
    if what == "hugging face directory":
        assert "convert" in line
    assert not (tmp_path / "out").exists()


def test_valid_edge_values_still_run(checkpoint, capsys):
    """--temperature 0 is greedy (as --greedy), --top-k 0 no cut, --top-p 1 no nucleus."""
    gen = ["generate", "--checkpoint", str(checkpoint), "--prompt", "de", "--max-new-tokens", "5", "--device", "cpu"]
    greedy = main(gen + ["--greedy"])
    assert torch.equal(main(gen + ["--temperature", "0"]), greedy)
    assert main(gen + ["--top-k", "0", "--top-p", "1"]).shape == greedy.shape


def _train_state(ck):
    return torch.load(ck / "train_state.pt", weights_only=True)


def test_resume_takes_the_checkpoints_settings_and_continues_exactly(tmp_path, capsys):
    """2 steps, then `--resume ck --steps 4` alone, ends on the bits of 4 steps straight: batch
    size, grad accumulation, LR, precision, seq len, eval fraction, data, cycle scale, preset, seed
    and --out all come from the checkpoint (the warmup, 20 steps, keeps the LR independent of
    --steps)."""
    settings = ["--size", "tiny", *TINY, "--max-bytes", "30000", "--batch-size", "4", "--grad-accum", "2",
                "--lr", "2e-3", "--precision", "bf16", "--seq-len", "12", "--eval-fraction", "0.1", "--eval-every",
                "2", "--eval-batches", "1", "--cycle-scale", "0.5", "--preset", "aggressive", "--seed",
                str(SEED + 3), "--no-progress"]
    straight = main(["train", *settings, "--steps", "4", "--out", str(tmp_path / "straight")])
    main(["train", *settings, "--steps", "2", "--out", str(tmp_path / "resumed")])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = main(["train", "--resume", str(tmp_path / "resumed"), "--steps", "4"])
    printed = capsys.readouterr().out
    changed = [str(w.message) for w in caught if "other settings" in str(w.message)]
    assert all("(steps 2 -> 4)" in m for m in changed), changed  # the only setting that differs
    taken = next(line for line in printed.splitlines() if "(flags not given)" in line)
    for flag in ("--batch-size 4", "--grad-accum 2", "--lr 0.002", "--precision bf16", "--seq-len 12",
                 "--eval-fraction 0.1", "--max-bytes 30000", "--preset aggressive", "--no-progress"):
        assert flag in taken, (flag, taken)
    assert "at step 2" in printed
    assert resumed["steps"] == 4
    assert resumed["step_terms"] == straight["step_terms"][2:]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    a, b = _train_state(tmp_path / "straight"), _train_state(tmp_path / "resumed")  # --out: the checkpoint's
    assert b["step"] == 4
    for config in (a["train_config"], b["train_config"]):
        config.pop("checkpoint_dir")
    assert a["train_config"] == b["train_config"] and a["data"] == b["data"]
    assert b["train_config"]["batch_size"] == 4 and b["train_config"]["precision"] == "bf16"
    assert b["train_config"]["meta"]["eval_fraction"] == 0.1
    one, two = load_checkpoint(tmp_path / "straight").state_dict(), load_checkpoint(tmp_path / "resumed").state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_an_explicit_flag_still_overrides_the_checkpoint(tmp_path, capsys):
    """A flag given on resume wins over the checkpoint's value (with train()'s warning)."""
    ck = tmp_path / "ck"
    main([*TRAIN, "--steps", "2", "--lr", "1e-3", "--out", str(ck)])
    with pytest.warns(UserWarning, match=r"lr 0\.001 -> 0\.002"):
        main(["train", "--resume", str(ck), "--steps", "3", "--lr", "2e-3", "--out", str(tmp_path / "more")])
    assert _train_state(tmp_path / "more")["train_config"]["lr"] == 2e-3
    with pytest.raises(SystemExit) as err:  # another batch would read other windows: refused
        main(["train", "--resume", str(ck), "--steps", "3", "--batch-size", "4"])
    assert err.value.code == 2 and "--batch-size 4" in capsys.readouterr().err


def test_resume_on_another_corpus_is_refused(tmp_path, capsys):
    ck = tmp_path / "ck"
    text = tmp_path / "other.txt"
    g = torch.Generator().manual_seed(SEED)
    text.write_text("".join(chr(c) for c in torch.randint(97, 123, (20000,), generator=g).tolist()))
    main([*TRAIN, "--out", str(ck)])
    capsys.readouterr()
    for flags, named in ((["--max-bytes", "90000"], "--max-bytes 90000"), (["--data", str(text)], "--data")):
        with pytest.raises(SystemExit) as err:
            main(["train", "--resume", str(ck), "--steps", "2", *flags])
        printed = capsys.readouterr()
        assert err.value.code == 2 and named in printed.err and "another corpus" in printed.err
        assert "--allow-data-change" in printed.err and "step " not in printed.out
    # the same corpus named again is no change; --allow-data-change trains on another one anyway
    main(["train", "--resume", str(ck), "--steps", "2", "--max-bytes", "40000", "--out", str(tmp_path / "same")])
    with pytest.warns(UserWarning, match="another corpus"):
        result = main(["train", "--resume", str(ck), "--steps", "2", "--data", str(text), "--allow-data-change",
                       "--out", str(tmp_path / "other")])
    assert result["steps"] == 2
    assert _train_state(tmp_path / "other")["train_config"]["meta"]["data"] == str(text)


def test_a_checkpoint_without_a_corpus_record_resumes_with_a_warning(tmp_path):
    """A training checkpoint written without the CLI's record (an older one, or train() called
    directly) is resumed; the corpus is not checked, and a warning says so."""
    config = INLConfig.from_name("tiny", d_model=32, num_layers=1, max_seq_len=32, controller_hidden=8,
                                 min_embedding_rank=8, mu_group_size=8)
    tokens = corpus_data.load_corpus("stdlib", max_bytes=40000)
    train_tokens, eval_tokens = corpus_data.split(tokens, 0.05)
    tc = TrainConfig(steps=1, batch_size=2, seq_len=16, eval_batches=1, checkpoint_dir=str(tmp_path / "ck"),
                     progress=False)
    train(build_model(config), train_tokens, eval_tokens, tc, log=lambda _: None)
    with pytest.warns(UserWarning, match="does not record the corpus"):
        result = main(["train", "--resume", str(tmp_path / "ck"), "--steps", "2", "--max-bytes", "40000"])
    assert result["steps"] == 2
