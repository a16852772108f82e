"""Checkpoints: save -> load gives identical logits; a mismatched config fails clearly; a
checkpoint is never half written."""
import os
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open

import inl_llm.checkpoint as ckpt
from inl_llm import INLConfig, build_model, load_checkpoint, load_weights, save_checkpoint


def micro(**overrides):
    base = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=48,
                max_seq_len=32, num_iterations=4, controller_hidden=8, min_embedding_rank=8, mu_group_size=8,
                seed=5, tol=0.2, min_iterations=1)
    return build_model(INLConfig(**{**base, **overrides}))


def _trained(model):
    """Moves every parameter off its initial value and the budgets off their start."""
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits, _, _ = model(ids)
    logits.square().mean().backward()
    opt.step()
    model.budget.update(torch.tensor([2.0, 1.0]))
    return ids


@pytest.mark.parametrize("overrides", [{}, {"mixture_of_integrators": True, "num_experts": 3},
                                       {"shared_controller": False, "low_rank_embeddings": False}])
def test_save_load_gives_identical_logits(tmp_path, overrides):
    model = micro(**overrides)
    ids = _trained(model)
    save_checkpoint(model, tmp_path / "ck", extra={"step": 7})
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config == model.config
    # budgets: average 0.5·4 + 0.5·[2, 1] = [3, 2.5], rounded (half to even) + slack 1 = [4, 3]
    assert loaded.iteration_budgets() == model.iteration_budgets() == [4, 3]
    for m in (model, loaded):
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert ckpt.read_config(tmp_path / "ck")[1] == {"step": 7}


def test_shared_controller_is_stored_once(tmp_path):
    save_checkpoint(micro(), tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / ckpt.WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("controller.out.weight") for k in keys) == 1


def test_mismatched_config_fails_naming_the_fields(tmp_path):
    save_checkpoint(micro(), tmp_path / "ck")
    other = micro(d_model=64, num_layers=3)
    with pytest.raises(ValueError) as err:
        load_weights(other, tmp_path / "ck")
    message = str(err.value)
    assert "d_model: checkpoint has 32, model has 64" in message
    assert "num_layers: checkpoint has 2, model has 3" in message
    with pytest.raises(ValueError, match="hierarchical_mu"):
        load_weights(micro(hierarchical_mu=False), tmp_path / "ck")
    # runtime settings may differ
    load_weights(micro(tol=0.5, backend="reference", gradient_checkpointing=True), tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck", tol=0.01).config.tol == 0.01
    with pytest.raises(ValueError, match="runtime"):
        load_checkpoint(tmp_path / "ck", d_model=64)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing")


def test_a_failed_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    first, second = micro(seed=1), micro(seed=2)
    save_checkpoint(first, tmp_path / "ck")
    save_checkpoint(second, tmp_path / "ck")  # overwriting works
    assert torch.equal(load_checkpoint(tmp_path / "ck").lm_head.weight, second.lm_head.weight)

    def broken(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(first, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["ck"]  # no temporary directory left behind
    assert torch.equal(load_checkpoint(tmp_path / "ck").lm_head.weight, second.lm_head.weight)


@pytest.mark.parametrize("foreign", ["notes.txt", "older/model.safetensors", "generation_config.json"])
def test_a_save_never_deletes_what_is_not_a_checkpoint(tmp_path, foreign):
    """A save replaces its whole target directory: one that holds anything else (another
    checkpoint inside it, a Hugging Face export, the user's notes) is refused, untouched."""
    target = tmp_path / "checkpoints"
    (target / foreign).parent.mkdir(parents=True, exist_ok=True)
    (target / foreign).write_text("the user's")
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    with pytest.raises(ckpt.CheckpointError, match=foreign.split("/")[0]):
        save_checkpoint(micro(), target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert (target / foreign).read_text() == "the user's"
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # nothing left beside it
    shutil.rmtree(target / foreign.split("/")[0]) if "/" in foreign else (target / foreign).unlink()
    # an empty directory, or a checkpoint's own, is replaced
    save_checkpoint(micro(), target)
    save_checkpoint(micro(seed=3), target)
    assert torch.equal(load_checkpoint(target).lm_head.weight, micro(seed=3).lm_head.weight)


def test_a_bf16_model_saves_an_fp32_budget_average(tmp_path):
    model = micro(num_iterations=5).to(torch.bfloat16)
    model.budget.update(torch.tensor([1.99, 5.0]))  # average 3.495: not a bf16 number
    save_checkpoint(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / ckpt.WEIGHTS), "pt") as f:
        saved = f.get_tensor("budget.average")
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert saved.dtype == torch.float32
    torch.testing.assert_close(saved, torch.tensor([3.495, 5.0]))
    for target in (micro(num_iterations=5), micro(num_iterations=5).to(torch.bfloat16)):
        load_weights(target, tmp_path / "ck")
        assert target.budget.average.dtype == torch.float32
        assert torch.equal(target.budget.average, saved)
        assert target.iteration_budgets() == [4, 5]


def test_a_checkpoint_holds_the_pending_mu_ema_update(tmp_path):
    model = micro(mu_ema_rate=1.0, hierarchical_mu=False)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.blocks[0].attn.register_forward_hook(lambda m, i, out: seen.append(out[0].detach()))
    model(ids)  # records the target; the update waits for the next forward
    hook.remove()
    save_checkpoint(model, tmp_path / "ck")
    # rate 1: mu is the batch mean of h, the attention output of that forward
    expected = seen[0].reshape(-1, 32).mean(0)
    torch.testing.assert_close(load_checkpoint(tmp_path / "ck").blocks[0].integrator.equilibrium().detach(), expected)
    torch.testing.assert_close(model.blocks[0].integrator.equilibrium().detach(), expected)


# ---- checkpoints that never lie -------------------------------------------------------------

def _flip_bit(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "middle", "last byte"])
def test_a_flipped_bit_fails_the_load_naming_the_file(tmp_path, where):
    save_checkpoint(micro(), tmp_path / "ck")
    weights = tmp_path / "ck" / ckpt.WEIGHTS
    size = weights.stat().st_size
    _flip_bit(weights, {"header": 20, "middle": size // 2, "last byte": size - 1}[where], bit=3)
    with pytest.raises(ckpt.CheckpointError, match=rf"{weights}.* is corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_a_truncated_weights_file_is_named(tmp_path):
    save_checkpoint(micro(), tmp_path / "ck")
    weights = tmp_path / "ck" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match=rf"{weights} is truncated"):
        load_checkpoint(tmp_path / "ck")
    # a checkpoint without a manifest (older than them) still names the file, not a bare SafetensorError
    (tmp_path / "ck" / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match=rf"{weights} is not a readable safetensors file"):
        load_checkpoint(tmp_path / "ck")


def test_a_corrupt_manifest_is_named(tmp_path):
    save_checkpoint(micro(), tmp_path / "ck")
    manifest = tmp_path / "ck" / ckpt.MANIFEST
    manifest.write_text(manifest.read_text().replace('"bytes": ', '"bytes": 1', 1))
    with pytest.raises(ckpt.CheckpointError, match=rf"{manifest} is corrupt"):
        load_checkpoint(tmp_path / "ck")
    manifest.write_text("{")
    with pytest.raises(ckpt.CheckpointError, match=rf"{manifest} is unreadable"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("edit,message", [
    (lambda text: text[:-5], r"is not valid JSON: .* at line \d+, column \d+"),
    (lambda text: '{"weights": 1}', r"has no \"config\" object"),
    (lambda text: "[1, 2]", r"has no \"config\" object"),
    (lambda text: text.replace('"d_model": 32', '"d_model": "32"'), r"config field d_model must be an int"),
    (lambda text: text.replace('"dt": 0.1', '"dt": NaN'), r"config field dt must be finite"),
    (lambda text: text.replace('"tol": 0.2', '"tol": -1'), r"config field tol must lie in"),
    (lambda text: text.replace('"d_model": 32', '"d_modle": 32'), r"unknown config fields \['d_modle'\]"),
    (lambda text: text.replace('"extra": {}', '"extra": 3'), r"field \"extra\" must be an object"),
    (lambda text: text.replace('"num_layers": 2', '"num_layers": 3'), r"does not fit the model its config describes"),
])
def test_an_edited_config_names_the_file_and_field(tmp_path, edit, message):
    save_checkpoint(micro(), tmp_path / "ck")
    config = tmp_path / "ck" / ckpt.CONFIG
    config.write_text(edit(config.read_text()))
    with pytest.raises(ckpt.CheckpointError, match=rf"{config} is (corrupt|truncated or altered)"):  # the checksum sees any edit
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / ckpt.MANIFEST).unlink()  # without it, each field is checked and named
    where = ckpt.WEIGHTS if "does not fit" in message else ckpt.CONFIG
    with pytest.raises(ckpt.CheckpointError, match=rf"{tmp_path / 'ck' / where}.*{message}"):
        load_checkpoint(tmp_path / "ck")


def test_a_checkpoint_saved_with_a_scalar_global_mu_still_loads(tmp_path):
    """mu_global is [1] since FSDP2 (which refuses 0-dim parameters); older files hold it as []."""
    from safetensors.torch import load_file, save_file
    model = micro()
    _trained(model)
    save_checkpoint(model, tmp_path / "ck")
    weights = tmp_path / "ck" / ckpt.WEIGHTS
    tensors = load_file(weights)
    old = {k: (v.reshape(()) if k.endswith("mu_global") else v) for k, v in tensors.items()}
    assert sum(k.endswith("mu_global") for k in old) == 2
    save_file(old, weights, metadata={"format": "pt"})
    (tmp_path / "ck" / ckpt.MANIFEST).unlink()  # an old checkpoint has none
    loaded = load_checkpoint(tmp_path / "ck")
    for a, b in zip(loaded.integrator_layers(), model.integrator_layers()):
        assert a.mu_global.shape == (1,) and torch.equal(a.mu_global, b.mu_global)



# ---- checkpoints that never vanish: saves killed with SIGKILL --------------------------------

KILLED_SAVE = r'''
import os, signal, sys, shutil
import inl_llm.checkpoint as ck
from inl_llm import INLConfig, build_model

directory, point = sys.argv[1], sys.argv[2]
def micro(seed):
    return build_model(INLConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 feedforward_dim=48, max_seq_len=32, num_iterations=4, controller_hidden=8,
                                 min_embedding_rank=8, mu_group_size=8, seed=seed, tol=0.2, min_iterations=1))
def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "loop":  # saves new models until the parent kills it
    seed = 3
    while True:
        ck.save_checkpoint(micro(seed), directory)
        print(seed, flush=True)
        seed += 1
if point == "writing weights":
    real = ck.save_model
    def save_model(model, filename, metadata=None):
        real(model, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        die()
    ck.save_model = save_model
elif point == "writing the manifest":
    def write_manifest(tmp):
        (tmp / ck.MANIFEST).write_text('{"format": 1, "files": {"model.saf')
        die()
    ck._write_manifest = write_manifest
elif point in ("before the first rename", "between the renames"):
    calls = []
    real = os.replace
    def replace(src, dst):
        calls.append(src)
        if len(calls) == (1 if point == "before the first rename" else 2):
            die()
        real(src, dst)
    ck.os.replace = replace
elif point in ("before deleting the old copy", "while deleting the old copy"):
    real = shutil.rmtree
    def rmtree(path, ignore_errors=False):
        if point == "while deleting the old copy":
            os.remove(os.path.join(path, ck.WEIGHTS))
        die()
    ck.shutil.rmtree = rmtree
ck.save_checkpoint(micro(2), directory)
print("not killed", flush=True)
'''


def _model_seed(directory, seeds=range(1, 40)):
    """Which micro(seed=s), s in `seeds`, the checkpoint holds (the weights identify it)."""
    loaded = load_checkpoint(directory).lm_head.weight
    return [s for s in seeds if torch.equal(micro(seed=s).lm_head.weight, loaded)]


def _run_child(tmp_path, point, **kwargs):
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ck"), point], env=env,
                            stdout=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("point,holds", [
    ("writing weights", 1), ("writing the manifest", 1), ("before the first rename", 1),
    ("between the renames", 2), ("before deleting the old copy", 2), ("while deleting the old copy", 2)])
def test_a_save_killed_at_any_point_leaves_a_checkpoint_that_loads(tmp_path, point, holds):
    """Old checkpoint: micro(seed=1); the killed save writes micro(seed=2). After the kill the
    path loads one of them whole (the new one once it is complete); the next save puts things
    back in place and deletes every leftover."""
    import signal
    save_checkpoint(micro(seed=1), tmp_path / "ck")
    child = _run_child(tmp_path, point)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, out
    leftovers = sorted(p for p in os.listdir(tmp_path) if p != "ck")
    assert leftovers, "the kill left nothing behind: the test did not kill where it meant to"
    if point == "between the renames":
        assert not (tmp_path / "ck").exists()
        with pytest.warns(UserWarning, match="interrupted between its renames"):
            assert _model_seed(tmp_path / "ck") == [holds]
    else:
        assert _model_seed(tmp_path / "ck") == [holds]
    save_checkpoint(micro(seed=3), tmp_path / "ck")
    assert os.listdir(tmp_path) == ["ck"]
    assert _model_seed(tmp_path / "ck") == [3]


def test_saves_killed_at_random_instants_never_lose_the_checkpoint(tmp_path):
    """A child saves new models in a loop; it is killed at seeded random instants, six times.
    After each kill the path loads a whole model (one the child saved, or the one before the
    first), and the next child's first save deletes what the killed one left."""
    import random
    import signal
    import time
    save_checkpoint(micro(seed=1), tmp_path / "ck")
    rng = random.Random(0)
    for _ in range(6):
        child = _run_child(tmp_path, "loop")
        first = child.stdout.readline()
        assert first.strip().isdigit()  # imported and saving
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=60)
        # the seeds it saved (from 3 up; ~100 saves a second here), and the one it was saving
        last = max(int(word) for word in (first + rest).split() if word.isdigit())
        with warnings.catch_warnings():  # a kill between the renames: read from the copy left aside
            warnings.simplefilter("ignore")
            assert len(_model_seed(tmp_path / "ck", seeds=[1, *range(3, last + 2)])) == 1
    save_checkpoint(micro(seed=1), tmp_path / "ck")
    assert os.listdir(tmp_path) == ["ck"]



def test_a_truncated_dcp_shard_is_a_checkpoint_error(tmp_path):
    """Without a manifest (deleted after a deliberate edit: such checkpoints load unchecked) a
    truncated DCP shard surfaces as CheckpointError naming train/, from both loaders, not as
    DCP's CheckpointException (a BaseException, past every `except Exception`)."""
    from inl_llm.checkpoint import load_training_checkpoint, save_training_checkpoint
    from inl_llm.train import TrainConfig, optimizer_for

    model = micro()
    save_training_checkpoint(model, tmp_path / "ck", optimizer_for(model, TrainConfig()), {"step": 1})
    os.remove(tmp_path / "ck" / ckpt.MANIFEST)
    os.remove(tmp_path / "ck" / ckpt.WEIGHTS)  # load_checkpoint then reads the weights from train/
    shard = sorted((tmp_path / "ck" / ckpt.TRAIN_DIR).glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 10)
    fresh = micro()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: no process group, one process assumed
        with pytest.raises(ckpt.CheckpointError, match=ckpt.TRAIN_DIR):
            load_training_checkpoint(fresh, tmp_path / "ck", optimizer_for(fresh, TrainConfig()))
        with pytest.raises(ckpt.CheckpointError, match=ckpt.TRAIN_DIR):
            load_checkpoint(tmp_path / "ck")
