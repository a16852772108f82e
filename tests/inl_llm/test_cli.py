"""The command line: resuming refuses architecture changes and applies runtime ones, devices
are checked, generate fills max_seq_len exactly, samples are escaped, and `train` runs under
torchrun with rank 0 alone printing."""
import os
import subprocess
import sys

import pytest
import torch

from inl_llm import INLConfig, build_model, load_checkpoint
from inl_llm.cli import _printable, main

TINY = ["--set", "d_model=32", "--set", "num_layers=1", "--set", "max_seq_len=32", "--set", "controller_hidden=8",
        "--set", "min_embedding_rank=8", "--set", "mu_group_size=8"]
RUN = ["--max-bytes", "40000", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
       "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ck = tmp_path_factory.mktemp("cli") / "ck"
    main(["train", "--size", "tiny", *TINY, *RUN, "--steps", "2", "--out", str(ck)])
    return ck


def test_resume_refuses_architecture_changes_and_names_them(trained, capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--resume", str(trained), "--size", "small", "--set", "d_model=256", *RUN, "--steps", "3"])
    message = str(err.value)
    assert "keeps the checkpoint's architecture" in message
    assert "--set d_model=256: the checkpoint has d_model=32" in message
    assert "--size small: the checkpoint has num_layers=1" in message
    with pytest.raises(SystemExit, match=r"--set \['d_modle'\]: not config fields"):
        main(["train", "--resume", str(trained), "--set", "d_modle=256", *RUN])


def test_resume_applies_and_prints_runtime_changes_and_continues_the_run(trained, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "more"
    with pytest.warns(UserWarning, match=r"other settings than it was trained with \(steps 2 -> 4\)"):
        result = main(["train", "--resume", str(trained), "--set", "tol=0.05", "--set", "d_model=32", *RUN,
                       "--steps", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "runtime override: tol 0.01 -> 0.05" in printed
    assert "d_model" not in printed.split("model:")[0]  # an unchanged architecture field is not an override
    assert f"resumed {trained} at step 2" in printed
    assert result["steps"] == 4 and [h["step"] for h in result["history"]] == [0, 2, 4]
    assert load_checkpoint(out).config.tol == 0.05


def test_step_zero_line_shows_no_train_loss(trained, tmp_path, capsys):
    main(["train", "--size", "tiny", *TINY, *RUN, "--steps", "2"])
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step     0"))
    assert "train -  eval" in first and "nan" not in first


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("command", ["train", "generate"])
def test_cuda_on_a_cpu_only_machine_is_a_clear_error(trained, command):
    args = ["train", *RUN[:-1], "cuda"] if command == "train" else ["generate", "--checkpoint", str(trained),
                                                                       "--device", "cuda"]
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available on this machine"):
        main(args)
    with pytest.raises(SystemExit, match="--device 'gpu' is not a device"):
        main(args[:-1] + ["gpu"])


def test_generate_fills_max_seq_len_exactly(trained, capsys):
    """A 5-token prompt (BOS + 4 bytes) at max_seq_len 32: 28 new tokens need positions 0..31 (the
    last token is sampled, never fed back), 29 would need 32."""
    model = load_checkpoint(trained)
    prompt = torch.tensor([[256, 100, 101, 102, 32]])
    cached = model.generate(prompt, 28, do_sample=False)
    assert cached.shape == (1, 33)
    assert torch.equal(cached, model.generate(prompt, 28, do_sample=False, use_cache=False))
    with pytest.raises(ValueError, match="needs 33 positions"):
        model.generate(prompt, 29, do_sample=False)
    main(["generate", "--checkpoint", str(trained), "--prompt", "def ", "--max-new-tokens", "28", "--device", "cpu"])
    with pytest.raises(ValueError, match="max_seq_len=32"):
        main(["generate", "--checkpoint", str(trained), "--prompt", "def ", "--max-new-tokens", "29", "--device",
              "cpu"])


def test_samples_are_printed_with_control_bytes_escaped(trained, capsys):
    assert _printable("a\x03b\x00\tc\n\x1b[31md\u200be") == "a\\x03b\\x00\tc\n\\x1b[31md\\u200be"
    assert _printable("héllo ✓ \ufffd") == "héllo ✓ \ufffd"
    capsys.readouterr()
    main(["generate", "--checkpoint", str(trained), "--prompt", "x\x07\x00y", "--max-new-tokens", "3", "--device",
          "cpu"])
    printed = capsys.readouterr().out
    assert "x\\x07\\x00y" in printed and "\x07" not in printed and "\x00" not in printed


def test_train_under_torchrun_with_fsdp_logs_once_and_resumes(tmp_path):
    """torchrun --nproc_per_node 2 -m inl_llm train --parallel fsdp: rank 0 alone prints, every
    rank's memory is reported, the checkpoint loads in one process and resumes on two ranks."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    ck = tmp_path / "ck"

    def torchrun(*args):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--standalone", "-m", "inl_llm", "train", "--parallel", "fsdp", "--size", "tiny",
                               *TINY, *RUN, "--out", str(ck), *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    printed = torchrun("--steps", "2")
    assert printed.count("eval loss ") == 1 and printed.count("step     0") == 1
    assert "fsdp over 2 ranks" in printed
    assert "rank 0 memory (MiB)" in printed and "rank 1 memory (MiB)" in printed
    model = load_checkpoint(ck)
    assert isinstance(model, type(build_model(INLConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2))))
    printed = torchrun("--steps", "3", "--resume", str(ck))
    assert f"resumed {ck} at step 2" in printed and "after 3 steps" in printed
