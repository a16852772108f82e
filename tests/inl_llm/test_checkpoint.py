"""Checkpoints: save -> load gives identical logits; a mismatched config fails clearly; a
checkpoint is never half written."""
import os

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
