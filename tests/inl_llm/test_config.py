"""INLConfig rejects every field value that makes no sense, naming the field, when it is built
(not later as NaN logits or a checkpoint that cannot load)."""
import dataclasses
import math

import pytest

from inl_llm import SIZES, INLConfig

NAN, INF = float("nan"), float("inf")

# field -> values outside its domain (NaN and ±inf are added for every float field below)
BAD_VALUES = {
    "dt": [0.0, -0.1],
    "tol": [-1e-3],
    "norm_eps": [-1e-6],
    "rope_base": [0.0, -10.0],
    "init_alpha": [0.0, 1.0, 1.5],
    "init_gate": [0.0, 1.0, -0.2],
    "init_beta": [0.0, -0.5],
    "embedding_rank_ratio": [0.0, -0.125],
    "excitation_sparsity": [-0.1, 1.1],
    "excitation_amplitude": [-0.03],
    "alpha_kappa": [0.0, -1.0],
    "budget_momentum": [-0.1, 1.5],
    "mu_ema_rate": [0.0, 1.5],
    "dropout": [-0.1, 1.0],
    "mu_init": [],
}
FLOAT_FIELDS = [f.name for f in dataclasses.fields(INLConfig) if f.type in ("float", "Optional[float]")]


def test_every_float_field_is_covered():
    assert sorted(FLOAT_FIELDS) == sorted(BAD_VALUES)


@pytest.mark.parametrize("field,value", [(f, v) for f in FLOAT_FIELDS for v in BAD_VALUES[f] + [NAN, INF, -INF]])
def test_float_fields_out_of_their_domain_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        INLConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("norm_eps", 0.0), ("tol", 0.0), ("excitation_amplitude", 0.0),
                                         ("excitation_sparsity", 0.0), ("excitation_sparsity", 1.0),
                                         ("budget_momentum", 0.0), ("budget_momentum", 1.0), ("mu_ema_rate", 1.0),
                                         ("mu_ema_rate", None), ("mu_init", -2.0), ("dt", 1), ("rope_base", 500)])
def test_values_on_the_edge_of_a_domain_are_accepted(field, value):
    assert getattr(INLConfig(**{field: value}), field) == value


@pytest.mark.parametrize("field,value", [("dt", "0.1"), ("dt", True), ("tol", None), ("d_model", "128"),
                                         ("d_model", 128.0), ("num_layers", True), ("tie_embeddings", 1),
                                         ("learnable_mu", "yes"), ("backend", 3), ("seed", 1.5)])
def test_wrong_types_raise_type_error_naming_the_field(field, value):
    with pytest.raises(TypeError, match=rf"^{field} must"):
        INLConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("budget_slack", -1), ("seed", -1), ("seed", 2 ** 63), ("d_model", 0),
                                         ("min_iterations", -1)])
def test_int_fields_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        INLConfig(**{field: value})


def test_every_named_size_is_valid_and_round_trips():
    for size in SIZES:
        config = INLConfig.from_name(size)
        assert INLConfig.from_dict(config.to_dict()) == config
        assert all(math.isfinite(getattr(config, f)) for f in FLOAT_FIELDS if getattr(config, f) is not None)
