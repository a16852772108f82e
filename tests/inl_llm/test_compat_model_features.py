"""The model's per-layer x/v trajectories (return_trajectories) and dropout (a config field)."""
import pytest
import torch

import inl_llm
from inl_kernels import inl_iterate


def tiny(**kw):
    return inl_llm.create_model("tiny", d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=64,
                                controller_hidden=8, mu_group_size=16, **kw)


IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("train", [False, True])
def test_trajectories_are_the_iterates_own(train):
    """Layer l's trajectory equals inl_iterate(..., return_trajectory=True) on the inputs the
    layer received (captured by a hook), and asking for it leaves the logits unchanged."""
    model = tiny()
    model.train(train)
    inputs = {}
    model.blocks[1].integrator_norm.register_forward_hook(lambda m, i, out: inputs.update(x=out[0].detach()))
    model.blocks[1].attn.register_forward_hook(lambda m, i, out: inputs.update(h=out[0].detach()))
    with torch.set_grad_enabled(train):
        plain, _, _ = model(IDS)
        logits, aux, _ = model(IDS, return_trajectories=True)
    torch.testing.assert_close(logits, plain, rtol=1e-6, atol=1e-6)
    assert len(aux["trajectory_x"]) == 2 and aux["trajectory_x"][1].shape == (2, 7, 5, 32)
    layer = model.blocks[1].integrator
    with torch.no_grad():
        _, ref = inl_iterate(inputs["h"].reshape(-1, 32), inputs["x"].reshape(-1, 32), **layer.controller.weights(),
                             mod_scale=layer.mod_scale, mod_bias=layer.mod_bias, mu=layer.equilibrium(),
                             exc_index=layer.exc_index, gamma=layer.gamma, phi=layer.phi,
                             amplitude=layer.excitation_amplitude, dt=layer.dt, kappa=layer.kappa, num_iterations=4,
                             tol=None if train else layer.tol, min_iterations=layer.min_iterations,
                             backend="reference", return_trajectory=True)
    torch.testing.assert_close(aux["trajectory_x"][1].reshape(-1, 5, 32).detach(), ref.trajectory_x,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["trajectory_v"][1].reshape(-1, 5, 32).detach(), ref.trajectory_v,
                               rtol=1e-5, atol=1e-5)
    if train:  # gradients reach the parameters through the trajectory
        aux["trajectory_x"][0][..., 2, :].square().sum().backward()
        assert model.blocks[0].integrator.mod_scale.grad.abs().sum() > 0


def test_trajectories_not_stored_by_default():
    _, aux, _ = tiny()(IDS, return_aux=True)
    assert "trajectory_x" not in aux and "trajectory_v" not in aux


def test_mixture_trajectory_is_the_routing_weighted_sum():
    model = tiny(mixture_of_integrators=True, num_experts=3, top_k=2)
    out = {}
    model.blocks[0].integrator.register_forward_hook(lambda m, i, o: out.update(s=o[0].detach()))
    model.eval()
    with torch.no_grad():
        _, aux, _ = model(IDS, return_trajectories=True)
    traj = aux["trajectory_x"][0].reshape(-1, 5, 32)
    torch.testing.assert_close(traj[:, -1], out["s"], rtol=1e-6, atol=1e-6)


def test_dropout_off_by_default_and_active_only_in_training():
    assert inl_llm.INLConfig().dropout == 0.0
    plain, dropped = tiny(), tiny(dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    dropped.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(IDS)[0], plain(IDS)[0], rtol=0, atol=0)  # same seed, same weights
    dropped.train()
    torch.manual_seed(1)
    a = dropped(IDS)[0]
    torch.manual_seed(2)
    b = dropped(IDS)[0]
    assert not torch.allclose(a, b)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            inl_llm.INLConfig(dropout=bad)


def test_dropout_is_a_runtime_field(tmp_path):
    model = tiny(dropout=0.2)
    inl_llm.save_checkpoint(model, tmp_path / "ck")
    loaded = inl_llm.load_checkpoint(tmp_path / "ck", dropout=0.0)
    assert loaded.config.dropout == 0.0
