"""The original package's names (inl_llm.models / .core / .optimizations): their signatures (the
original's parameter names and defaults, read from its source), their return shapes, and their
math against hand-written float64 code of SPEC §2."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import inl_llm
from inl_llm import core, models, optimizations

# (name, [(parameter, default or REQUIRED)]) as the original declares them, in order
REQUIRED = inspect.Parameter.empty
ORIGINAL = {
    models.UltraOptimizedIntegratorLanguageModel: [
        ("vocab_size", REQUIRED), ("d_model", 512), ("num_layers", 6), ("num_heads", 8),
        ("num_iterations_per_layer", 5), ("feedforward_dim", None), ("max_seq_len", 2048), ("dropout", 0.1),
        ("use_lowrank_embeddings", True), ("lowrank_ratio", 0.125), ("use_gradient_checkpointing", True),
        ("use_shared_controllers", True), ("use_adaptive_stopping", True), ("adaptive_convergence_threshold", 0.001),
        ("hierarchical_group_size", 64), ("excitation_sparsity", 0.1)],
    models.OptimizedIntegratorLanguageModel: [
        ("vocab_size", REQUIRED), ("d_model", 512), ("num_layers", 6), ("num_heads", 8),
        ("num_iterations_per_layer", 5), ("feedforward_dim", None), ("max_seq_len", 2048), ("dropout", 0.1),
        ("tie_weights", True), ("use_attention", True), ("use_lowrank_embeddings", True), ("lowrank_ratio", 0.125),
        ("use_gradient_checkpointing", False), ("use_adaptive_stopping", True), ("convergence_threshold", 0.01)],
    models.create_ultra_optimized_model: [("size", "small"), ("vocab_size", 50000)],
    models.create_optimized_model: [("size", "small"), ("vocab_size", 50000), ("enable_all_optimizations", True)],
    core.IntegratorNeuronLayer: [
        ("hidden_dim", REQUIRED), ("output_dim", 1), ("target_value", 5.0), ("dt", 0.1), ("hidden_controller", 64),
        ("init_alpha", 0.8), ("init_beta", 0.5), ("init_gate", 0.5), ("velocity_scale", 1.0),
        ("excitation_amplitude", 0.03), ("learnable_mu", True), ("mu_adaptation_rate", 1e-4), ("dynamic_alpha", True),
        ("alpha_kappa", 1.0)],
    core.IntegratorModel: [("input_dim", REQUIRED), ("hidden_dim", 128), ("num_layers", 2), ("num_iterations", 10),
                           ("output_dim", 1), ("target_value", 5.0)],
    core.IntegratorLoss: [
        ("target_value", 5.0), ("lambda_mean_init", 1.0), ("lambda_speed", 0.1), ("lambda_energy", 0.01),
        ("energy_p", 2.0), ("annealing_schedule", "exponential"), ("annealing_factor", 0.1), ("annealing_epochs", 100),
        ("variance_weighted", True), ("exploration_phase", False), ("exploration_lambda_mean", 0.05),
        ("exploration_lambda_energy", 0.001), ("task_loss_type", "mse")],
    core.compute_convergence_metrics: [("x_trajectory", REQUIRED), ("target_value", 5.0), ("epsilon", 0.1)],
    core.create_cycle_scheduler: [("preset", "balanced")],
    optimizations.LowRankEmbedding: [("vocab_size", REQUIRED), ("d_model", REQUIRED), ("rank", None),
                                     ("rank_ratio", 0.125)],
    optimizations.AdaptiveIntegratorNeuronLayer: [("inl_layer", REQUIRED), ("convergence_threshold", 0.01),
                                                  ("min_iterations", 3), ("max_iterations", 10), ("check_interval", 1)],
    optimizations.AdaptiveHierarchicalINL: [("inl_layer", REQUIRED), ("convergence_threshold", 0.001),
                                            ("min_iterations", 3), ("max_iterations", 12), ("check_interval", 1)],
    optimizations.GradientCheckpointedINL: [("inl_layer", REQUIRED)],
    optimizations.SharedController: [("hidden_dim", REQUIRED), ("output_dim", REQUIRED), ("num_layers", REQUIRED),
                                     ("hidden_controller", 64)],
    optimizations.SparseHarmonicINL: [("hidden_dim", REQUIRED), ("output_dim", REQUIRED), ("sparsity", 0.1),
                                      ("target_value", 5.0), ("dt", 0.1), ("excitation_amplitude", 0.03)],
    optimizations.HierarchicalEquilibriumINL: [("hidden_dim", REQUIRED), ("output_dim", REQUIRED),
                                               ("group_size", 64), ("target_value", 5.0), ("dt", 0.1)],
    optimizations.MixtureOfIntegrators: [("hidden_dim", REQUIRED), ("output_dim", REQUIRED), ("num_experts", 8),
                                         ("top_k", 2), ("target_value", 5.0), ("dt", 0.1)],
    optimizations.compute_parameter_reduction: [("vocab_size", REQUIRED), ("d_model", REQUIRED),
                                                ("rank_ratio", 0.125)],
    optimizations.print_optimization_summary: [("vocab_size", REQUIRED), ("d_model", REQUIRED),
                                               ("num_layers", REQUIRED), ("rank_ratio", 0.125)],
    optimizations.compute_advanced_optimization_gains: [("d_model", 2048), ("num_layers", 24),
                                                        ("hidden_controller", 64)],
}
METHODS = {
    (models.UltraOptimizedIntegratorLanguageModel, "forward"): [("input_ids", REQUIRED), ("attention_mask", None),
                                                                ("return_aux", False)],
    (models.UltraOptimizedIntegratorLanguageModel, "generate"): [
        ("input_ids", REQUIRED), ("max_new_tokens", 100), ("temperature", 1.0), ("top_k", None), ("top_p", None),
        ("do_sample", True)],
    (core.IntegratorLoss, "forward"): [("predictions", REQUIRED), ("targets", REQUIRED), ("trajectory", None),
                                       ("epoch", 0), ("learned_mu", None)],
    (core.IntegratorModel, "forward"): [("inputs", REQUIRED), ("return_trajectory", False)],
    (optimizations.AdaptiveIntegratorNeuronLayer, "forward"): [("h", REQUIRED), ("num_iterations", None),
                                                               ("use_early_stopping", None),
                                                               ("return_trajectory", False)],
    (optimizations.AdaptiveHierarchicalINL, "forward_adaptive"): [
        ("h", REQUIRED), ("initial_x", REQUIRED), ("initial_v", REQUIRED), ("num_iterations", None),
        ("use_early_stopping", None), ("return_trajectory", False)],
    (optimizations.SharedController, "forward"): [("h", REQUIRED), ("x", REQUIRED), ("v", REQUIRED),
                                                  ("layer_idx", REQUIRED)],
    (optimizations.MixtureOfIntegrators, "forward"): [("h", REQUIRED), ("x", REQUIRED), ("v", REQUIRED),
                                                      ("step", 0)],
}


def _leading(fn, drop_self):
    params = list(inspect.signature(fn).parameters.values())
    params = params[1:] if drop_self else params
    return [(p.name, p.default) for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


@pytest.mark.parametrize("obj", list(ORIGINAL), ids=lambda o: o.__name__)
def test_original_signature(obj):
    expected = ORIGINAL[obj]
    got = _leading(obj.__init__ if inspect.isclass(obj) else obj, inspect.isclass(obj))
    assert got[:len(expected)] == expected
    # anything beyond the original's parameters is ours and has a default
    assert all(default is not REQUIRED for _, default in got[len(expected):])


@pytest.mark.parametrize("key", list(METHODS), ids=lambda k: f"{k[0].__name__}.{k[1]}")
def test_original_method_signature(key):
    cls, name = key
    expected = METHODS[key]
    got = _leading(getattr(cls, name), True)
    assert got[:len(expected)] == expected


def test_module_paths():
    from inl_llm.core.integrator_losses import IntegratorLoss  # noqa: F401
    from inl_llm.core.integrator_neuron_layer import IntegratorModel  # noqa: F401
    from inl_llm.core.integrator_scheduler_v2 import create_cycle_scheduler  # noqa: F401
    from inl_llm.models.integrator_language_model import UltraOptimizedIntegratorLanguageModel
    from inl_llm.models.integrator_language_model_optimized import create_optimized_model  # noqa: F401
    from inl_llm.models.integrator_language_model_ultra import create_ultra_optimized_model  # noqa: F401
    from inl_llm.optimizations.advanced_optimizations import MixtureOfIntegrators  # noqa: F401
    from inl_llm.optimizations.optimizations import LowRankEmbedding  # noqa: F401
    assert models.IntegratorLanguageModel is UltraOptimizedIntegratorLanguageModel
    assert models.create_model is models.create_ultra_optimized_model
    # our own top-level API is untouched: INLConfig constructor, three return values
    assert inl_llm.IntegratorLanguageModel is not models.IntegratorLanguageModel
    assert list(inspect.signature(inl_llm.IntegratorLanguageModel.__init__).parameters)[1:] == ["config"]


def small_lm(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_iterations_per_layer=4, dropout=0.0,
                hierarchical_group_size=16)
    return models.UltraOptimizedIntegratorLanguageModel(**{**args, **kw})


def test_forward_returns_the_originals_shapes():
    model = small_lm(adaptive_convergence_threshold=10.0)  # a large tolerance: rows stop at min_iterations
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    model.train()
    logits, aux = model(ids, return_aux=True)
    assert logits.shape == (2, 5, 97) and len(aux) == 2
    for layer_aux in aux:
        assert layer_aux["x"].shape == layer_aux["v"].shape == (10, 5, 32)
        assert layer_aux["mu"].shape == (32,) and layer_aux["mu_offsets"].shape == (2,)
    assert model(ids)[1] is None and len(model(ids)) == 2
    logits3, aux3, cache = model(ids, use_cache=True, return_aux=True)  # the v3 document's form
    assert cache.length == 5 and len(aux3) == 2

    model.eval()
    with torch.no_grad():
        _, aux = model(ids, return_aux=True)
    # every row stopped after min_iterations = 3 steps; the first eval forward sets the average
    assert torch.equal(aux[0]["iterations_used"], torch.full((10,), 3.0))
    assert [layer.inl.avg_iterations.item() for layer in model.layers] == [3.0, 3.0]
    with torch.no_grad():
        model(ids)
    assert model.layers[1].inl.avg_iterations.item() == pytest.approx(3.0)


def test_trajectory_ends_where_the_block_output_starts():
    """aux['x'][:, -1] is the integrator's output x_T, aux['x'][:, 0] its input (the normed
    residual stream), read independently through forward hooks."""
    model = small_lm()
    seen = {}
    block = model.blocks[1]
    block.integrator_norm.register_forward_hook(lambda m, i, out: seen.update(x0=out[0].detach()))
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    model.train()
    _, aux = model(ids, return_aux=True)
    stats = aux.aux["integrators"][1]
    torch.testing.assert_close(aux[1]["x"][:, 0], seen["x0"].reshape(-1, 32))
    torch.testing.assert_close(aux[1]["x"][:, -1], stats.x)
    torch.testing.assert_close(aux[1]["v"][:, -1].pow(2).mean(-1), stats.energy[:, -1].float())


def test_generate_get_num_params_and_stats():
    model = small_lm()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, temperature=0.8, top_p=0.9)
    assert out.shape == (1, 9) and torch.equal(out[:, :3], torch.tensor([[1, 2, 3]]))
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert model.get_num_params() == sum(distinct.values())
    stats = model.get_inference_stats()
    assert {"num_params", "num_layers", "d_model", "optimizations_enabled"} <= set(stats)
    opt = models.OptimizedIntegratorLanguageModel(vocab_size=97, d_model=32, num_layers=2, num_heads=4,
                                                 num_iterations_per_layer=3)
    opt.eval()
    with torch.no_grad():
        opt(torch.tensor([[1, 2, 3]]))
    assert set(opt.get_inference_stats()) == {"layer_0_avg_iterations", "layer_1_avg_iterations"}


def test_create_functions_use_the_originals_sizes():
    with torch.device("meta"):
        m7 = models.create_ultra_optimized_model("7B", vocab_size=50000)
        m5 = models.create_optimized_model("5B", vocab_size=50000)
    c = m7.config
    assert (c.d_model, c.num_layers, c.num_heads, c.num_iterations, c.feedforward_dim) == (4096, 32, 32, 10, 16384)
    assert m5.config.shared_controller is False and m5.config.gradient_checkpointing is True
    with pytest.raises(ValueError, match="size"):
        models.create_ultra_optimized_model("5B")
    with pytest.raises(TypeError, match="unknown_field"):
        small_lm(unknown_field=1)


def test_attention_mask_is_passed_through():
    """The original's causal [S, S] mask changes nothing (our attention is causal); a [B, S]
    padding mask reaches the model: a left-padded row gives the logits of the row alone."""
    model = small_lm()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    model.eval()
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=causal)[0], model(ids)[0], rtol=0, atol=0)
        torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 5))[0], model(ids)[0], rtol=0, atol=0)
        padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        logits, _ = model(ids, attention_mask=padded)
        alone, _ = model(ids[:1, 2:])
    torch.testing.assert_close(logits[0, 2:], alone[0], rtol=1e-5, atol=1e-5)


# ---- core: the integrator layers against float64 SPEC §2 ---------------------------------------

def spec_iterate(h, x, v, layer, T, step=0):
    """SPEC §2 in float64 with the context of its own width: c uses h·w_hᵀ for any h width."""
    c_ = layer.controller
    d = x.shape[1]
    W = {k: p.detach().double() for k, p in c_.weights().items()}
    mu = layer.get_mu().detach().double()
    gamma, phi = layer.excitation_gamma.detach().double(), layer.excitation_phi.detach().double()
    xs, vs = x.double(), v.double()
    hw = h.double() @ W["w_h"].t() + W["b_h"]
    for t in range(T):
        c = torch.relu(hw + xs @ W["w_x"].t() + W["b_x"] + vs @ W["w_v"].t() + W["b_v"])
        a, b, g, u = (c @ W["w_o"].t() + W["b_o"]).split(d, dim=-1)
        err = xs - mu
        alpha = torch.sigmoid(a) * (1 - torch.exp(-layer.alpha_kappa * err.pow(2).mean(-1, keepdim=True).sqrt()))
        exc = torch.zeros(d, dtype=torch.float64)
        exc[layer.excited_indices] = layer.excitation_amplitude * torch.sin(gamma * (t + step) + phi)
        vs = alpha * vs + (1 - alpha) * u - F.softplus(b) * err + exc
        xs = xs + layer.dt * layer.velocity_scale * torch.sigmoid(g) * vs
    return xs, vs


@pytest.mark.parametrize("hidden_dim,output_dim", [(12, 12), (40, 8), (12, 3)])
def test_integrator_layer_matches_spec(hidden_dim, output_dim):
    """Same widths; a wider context; a state narrower than the controller (padded inside)."""
    torch.manual_seed(0)
    layer = core.IntegratorNeuronLayer(hidden_dim=hidden_dim, output_dim=output_dim, hidden_controller=16,
                                       velocity_scale=1.5, excitation_amplitude=0.2)
    with torch.no_grad():
        layer.controller.out.weight.normal_(0, 0.3)
    h = torch.randn(5, hidden_dim)
    x, v = torch.randn(5, output_dim), torch.randn(5, output_dim)
    x_ref, v_ref = spec_iterate(h, x, v, layer, 1, step=2)
    x1, v1, aux = layer(h, x, v, step=2)
    torch.testing.assert_close(x1.double(), x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v1.double(), v_ref, rtol=1e-5, atol=1e-6)
    assert aux["gate"].shape == (5, output_dim)
    x4, info = layer.iterate(h, x, v, 4, return_trajectory=True)
    x_ref4, _ = spec_iterate(h, x, v, layer, 4)
    torch.testing.assert_close(x4.double(), x_ref4, rtol=1e-5, atol=1e-6)
    assert info.trajectory_x.shape == (5, 5, output_dim)
    # distance is a mean over the real dims only (padding rescaled away)
    torch.testing.assert_close(info.distance[:, -1].double(), (x_ref4 - layer.get_mu().double()).abs().mean(-1),
                               rtol=1e-5, atol=1e-6)


def test_integrator_model_and_loss():
    torch.manual_seed(0)
    model = core.IntegratorModel(input_dim=6, hidden_dim=10, num_iterations=5)
    inputs, targets = torch.randn(4, 6), torch.randn(4, 1)
    out, traj = model(inputs, return_trajectory=True)
    assert out.shape == (4, 1) and traj["x"].shape == (4, 6, 1) and len(traj["aux"]) == 5
    torch.testing.assert_close(traj["x"][:, 0], model.get_learned_mu().expand(4, 1))
    torch.testing.assert_close(out, traj["x"][:, -1])  # identity readout at initialisation
    loss = core.IntegratorLoss(target_value=5.0, lambda_mean_init=1.0, lambda_energy=0.01)
    terms = loss(predictions=out, targets=targets, trajectory=traj, epoch=0, learned_mu=model.get_learned_mu())
    assert set(terms) == {"L_task", "L_mean", "L_speed", "L_energy", "total", "lambda_mean"}
    xs, vs, mu = traj["x"].detach().double(), traj["v"].detach().double(), model.get_learned_mu().detach().double()
    x_T = xs[:, -1]
    w = 1 / (1 + x_T.var(0, unbiased=False))
    torch.testing.assert_close(terms["L_mean"].double(), (w * (x_T.mean(0) - mu) ** 2).sum(), rtol=1e-5, atol=1e-9)
    decay = torch.exp(-torch.arange(5, dtype=torch.float64) / 2.0)
    torch.testing.assert_close(terms["L_speed"].double(), 0.1 * (decay * (xs[:, 1:] - mu).abs().mean((0, 2))).sum(),
                               rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(terms["L_energy"].double(), 0.01 * vs[:, 1:].pow(2).mean(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(terms["L_task"], F.mse_loss(out, targets))
    terms["total"].backward()
    loss.set_exploration_phase(True)
    assert loss(out.detach(), targets, traj, epoch=50)["lambda_mean"].item() == pytest.approx(0.05)
    loss.set_exploration_phase(False)
    assert loss.get_lambda_mean(50) == pytest.approx(0.1 ** 0.5)


def test_compat_loss_equals_our_loss_on_the_model():
    """The compat IntegratorLoss on the model's trajectories and inl_llm.IntegratorLoss on the
    iterate's own statistics are the same terms."""
    model = small_lm()
    model.train()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    logits, aux = model(ids, return_aux=True)
    ours = inl_llm.IntegratorLoss(lambda_mean_init=1.0, lambda_speed=0.1, lambda_energy=0.01)
    ours_terms = ours.integrator_terms(aux.aux["integrators"], epoch=0)
    compat = core.IntegratorLoss(lambda_mean_init=1.0, lambda_speed=0.1, lambda_energy=0.01, task_loss_type="ce")
    terms = compat(logits.view(-1, 97), ids.view(-1), trajectory=list(aux), epoch=0)
    for name in ("L_mean", "L_speed", "L_energy"):
        torch.testing.assert_close(terms[name], ours_terms[name], rtol=1e-5, atol=1e-8)


def test_cycle_scheduler_phase_info():
    s = core.create_cycle_scheduler(preset="balanced")
    names = [s.step(e)["phase_name"] for e in range(45)]
    assert names == ["equilibrium"] * 20 + ["exploration"] * 20 + ["equilibrium"] * 5  # warmup 10, eq 10, ex 20
    info = s.step(25)
    assert info["is_exploration"] and info.is_exploration and info["excitation_amplitude"] == 0.05
    assert s.get_total_epochs() == 10 + 5 * 30 and s.step(500)["phase_name"] == "equilibrium"
    custom = core.create_cycle_scheduler(equilibrium_config={"lambda_mean": 0.5, "excitation_amplitude": 0.0,
                                                             "duration_epochs": 2},
                                         exploration_config={"lambda_mean": 0.05, "excitation_amplitude": 0.05,
                                                             "duration_epochs": 3}, num_cycles=1, warmup_epochs=1)
    assert [custom.step(e)["phase_name"][:3] for e in range(7)] == ["equ"] * 3 + ["exp"] * 3 + ["equ"]
    with pytest.raises(ValueError, match="preset"):
        core.create_cycle_scheduler(preset="equilibrium")
    # a phase dict that gives some keys takes the rest from the preset asked for (not balanced's)
    for preset in ("conservative", "aggressive"):
        full = core.create_cycle_scheduler(preset)
        part = core.create_cycle_scheduler(preset, equilibrium_config={"lambda_mean": 0.9},
                                           exploration_config={"excitation_amplitude": 0.2})
        assert part.equilibrium.lambda_mean == 0.9 and part.exploration.excitation_amplitude == 0.2
        assert (part.equilibrium.duration, part.equilibrium.excitation_amplitude, part.equilibrium.lambda_energy) == \
            (full.equilibrium.duration, full.equilibrium.excitation_amplitude, full.equilibrium.lambda_energy)
        assert (part.exploration.duration, part.exploration.lambda_mean, part.exploration.lambda_energy) == \
            (full.exploration.duration, full.exploration.lambda_mean, full.exploration.lambda_energy)


def test_convergence_metrics_by_hand():
    traj = torch.tensor([[[0.0], [3.0], [4.95], [5.0]],
                         [[0.0], [1.0], [2.0], [3.0]]])
    m = core.compute_convergence_metrics(traj, target_value=5.0, epsilon=0.1)
    assert m["time_to_converge"] == pytest.approx((2 + 3) / 2)
    assert m["final_mean"] == pytest.approx(4.0) and m["fraction_converged"] == pytest.approx(0.5)
    assert m["final_rmse"] == pytest.approx(math.sqrt((0 + 4) / 2))
    assert m["final_std"] == pytest.approx(torch.tensor([5.0, 3.0]).std().item())


# ---- optimizations -----------------------------------------------------------------------------

def test_adaptive_wrappers_stop_early_and_average():
    torch.manual_seed(0)
    base = core.IntegratorNeuronLayer(hidden_dim=8, output_dim=8)
    adaptive = optimizations.AdaptiveIntegratorNeuronLayer(inl_layer=base, convergence_threshold=1e6,
                                                           min_iterations=2, max_iterations=6).eval()
    h = torch.randn(3, 8)
    with torch.no_grad():  # early exit never runs while a gradient is needed (SPEC §2)
        x, v, info = adaptive(h, use_early_stopping=True, return_trajectory=True)
    assert torch.equal(info["iterations_used"], torch.full((3,), 2.0)) and bool(info["converged"].all())
    assert info["trajectory"]["x"].shape == (3, 7, 8) and adaptive.avg_iterations.item() == 2.0
    with torch.no_grad():
        x_full, _, info_full = adaptive(h, use_early_stopping=False)
    assert info_full["iterations_used"].mean().item() == 6.0
    assert adaptive.avg_iterations.item() == pytest.approx(0.99 * 2 + 0.01 * 6)
    hier = optimizations.HierarchicalEquilibriumINL(hidden_dim=8, output_dim=8, group_size=4, target_value=0.0)
    wrapped = optimizations.AdaptiveHierarchicalINL(inl_layer=hier, max_iterations=5).eval()
    x0, v0 = hier.init_state(3)
    with torch.no_grad():
        _, _, result = wrapped.forward_adaptive(h, x0.contiguous(), v0, return_trajectory=True)
    assert result["x_trajectory"].shape == (3, 6, 8) and result["mu_offsets"].shape == (2,)
    with pytest.raises(ValueError, match="check_interval"):
        optimizations.AdaptiveHierarchicalINL(inl_layer=hier, check_interval=2)


def test_checkpointed_layer_gives_the_same_gradients():
    torch.manual_seed(0)
    base = core.IntegratorNeuronLayer(hidden_dim=8, output_dim=8)
    wrapped = optimizations.GradientCheckpointedINL(base).train()
    h, x, v = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    base(h, x, v)[0].square().sum().backward()
    expected = [p.grad.clone() for p in base.parameters()]
    base.zero_grad()
    wrapped(h, x, v)[0].square().sum().backward()
    for p, g in zip(base.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    assert wrapped.output_dim == 8  # attributes of the wrapped layer


def test_shared_controller_sparse_hierarchical_mixture():
    torch.manual_seed(0)
    h, x, v = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16)
    shared = optimizations.SharedController(hidden_dim=16, output_dim=16, num_layers=3, hidden_controller=8)
    with torch.no_grad():
        shared.layer_scalers[1] = torch.tensor([2.0, 0.5, 1.0, 3.0])
        shared.layer_biases[1] = torch.tensor([0.1, -0.2, 0.3, 0.4])
    alpha, beta, gate, v_cand = shared(h, x, v, layer_idx=1)
    c = shared.controller
    a, b, g, u = c.out(torch.relu(c.h_proj(h) + c.x_proj(x) + c.v_proj(v))).chunk(4, -1)
    torch.testing.assert_close(alpha, torch.sigmoid(2 * a + 0.1))
    torch.testing.assert_close(v_cand, 3 * u + 0.4)
    assert shared.num_parameters() == 3 * (16 * 8 + 8) + 8 * 64 + 64 + 2 * 3 * 4

    sparse = optimizations.SparseHarmonicINL(hidden_dim=16, output_dim=16, sparsity=0.25)
    assert sparse.num_excited == 4
    hier = optimizations.HierarchicalEquilibriumINL(hidden_dim=16, output_dim=16, group_size=8, target_value=5.0)
    with torch.no_grad():
        hier.mu_local_offsets.copy_(torch.tensor([0.5, -1.0]))
    assert torch.equal(hier.get_mu(), torch.tensor([5.5] * 8 + [4.0] * 8)) and hier.num_mu_parameters() == 3

    moi = optimizations.MixtureOfIntegrators(hidden_dim=16, output_dim=16, num_experts=4, top_k=2)
    x_next, v_next, aux = moi(h, x, v, step=1)
    assert aux["top_k_experts"].shape == (5, 2)
    torch.testing.assert_close(aux["expert_weights"].sum(-1), torch.ones(5))
    # row 0 by hand: the weighted sum of its two experts' steps under the shared mu
    expected = sum(w * moi.experts[int(e)].iterate(h[:1], x[:1], v[:1], 1, step=1, mu=moi.mu)[0]
                   for w, e in zip(aux["expert_weights"][0], aux["top_k_experts"][0]))
    torch.testing.assert_close(x_next[:1], expected)


def test_running_averages_stay_fp32_and_inputs_are_checked():
    """Casting to bf16 left the average-steps buffers in bf16, where a 0.01·Δ update rounds away
    (300 calls at 3 steps after one at 12: 4.66 instead of 3.44); the compat layers of another
    width failed under autocast (bf16 context, fp32 state); the mixture took an h of fewer rows
    than x and returned zeros for the rest."""
    torch.manual_seed(0)
    base = core.IntegratorNeuronLayer(hidden_dim=8, output_dim=8)
    adaptive = optimizations.AdaptiveIntegratorNeuronLayer(inl_layer=base).eval().to(torch.bfloat16)
    assert adaptive.avg_iterations.dtype == torch.float32
    adaptive.record(torch.full((4,), 12.0))
    for _ in range(300):
        adaptive.record(torch.full((4,), 3.0))
    assert adaptive.avg_iterations.item() == pytest.approx(3 + 9 * 0.99**300, rel=1e-5)
    model = models.UltraOptimizedIntegratorLanguageModel(vocab_size=50, d_model=32, num_layers=2, num_heads=4,
                                                         num_iterations_per_layer=3, max_seq_len=32, seed=1)
    assert model.to(torch.bfloat16)._avg_iterations.dtype == torch.float32
    wide = core.IntegratorNeuronLayer(hidden_dim=24, output_dim=8)
    h = torch.randn(4, 24)
    x, v = wide.init_state(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wide(h, x, v)[0]
    assert torch.isfinite(out).all()
    moi = optimizations.MixtureOfIntegrators(hidden_dim=12, output_dim=12, num_experts=2, top_k=1)
    x, v = moi.init_state(7)
    with pytest.raises(ValueError, match="h's rows"):
        moi(torch.randn(3, 12), x, v)


def test_parameter_reports_count_the_modules():
    r = optimizations.compute_parameter_reduction(vocab_size=1000, d_model=256)
    emb = optimizations.LowRankEmbedding(vocab_size=1000, d_model=256)
    assert r["lowrank_params"] == sum(p.numel() for p in emb.parameters()) == emb.num_parameters()
    gains = optimizations.compute_advanced_optimization_gains(d_model=32, num_layers=3, hidden_controller=8)
    one = inl_llm.create_model("tiny", d_model=32, num_layers=3, num_heads=4, controller_hidden=8).controller
    assert gains["standard_controller_params"] == 3 * sum(p.numel() for p in one.parameters())
    shared = optimizations.SharedController(hidden_dim=32, output_dim=32, num_layers=3, hidden_controller=8)
    assert gains["shared_controller_params"] == shared.num_parameters()
    hier = optimizations.HierarchicalEquilibriumINL(hidden_dim=32, output_dim=32)
    assert gains["hierarchical_mu_params"] == hier.num_mu_parameters()


@pytest.mark.parametrize("cls", ["UltraOptimizedIntegratorLanguageModel", "OptimizedIntegratorLanguageModel"])
def test_seed_keyword_makes_the_parameters_a_function_of_it(cls):
    """`seed=` (an INLConfig field the compat constructors take by keyword) was accepted and
    ignored: the weights came from the global RNG. With it they are a function of the seed alone
    and the caller's RNG is untouched; without it they come from the global RNG, as the
    original's did (torch.manual_seed before the constructor reproduces a model)."""
    make = getattr(models, cls)
    kw = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_iterations_per_layer=3, max_seq_len=32)

    def params(model):
        return [p.detach().clone() for p in model.state_dict().values()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    torch.manual_seed(123)
    a = params(make(**kw, seed=1))
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    b = params(make(**kw, seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    c = params(make(**kw, seed=2))
    assert same(a, b) and not same(a, c)
    torch.manual_seed(7)
    d = params(make(**kw))
    torch.manual_seed(7)
    assert same(d, params(make(**kw))) and not same(d, a)  # the global RNG, as the original
