"""IntegratorLoss against values computed by hand (plain Python floats) on tiny cases."""
import math

import pytest
import torch

from inl_llm import IntegratorLoss, IntegratorStats


def _stats(x, mu, energy, distance):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    x = t(x)
    steps = torch.full((x.shape[0],), len(energy[0]), dtype=torch.int32)
    return IntegratorStats(x, t(mu), t(energy), t(distance), steps)


def _by_hand(x, mu, energy, distance, tau):
    """(Σ_i w_i (mean x_i − mu_i)², Σ_t e^{−t/τ} mean distance_t, mean energy) with plain floats."""
    n, d = len(x), len(x[0])
    mean_term = 0.0
    for i in range(d):
        col = [x[r][i] for r in range(n)]
        m = sum(col) / n
        var = sum((c - m) ** 2 for c in col) / n
        mean_term += (m - mu[i]) ** 2 / (1 + var)
    T = len(distance[0])
    speed = sum(math.exp(-t / tau) * sum(distance[r][t] for r in range(n)) / n for t in range(T))
    energy_mean = sum(sum(row) for row in energy) / (n * T)
    return mean_term, speed, energy_mean


A = ([[1.0, 2.0], [3.0, 0.0]], [0.5, -1.0], [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[0.4, 0.2, 0.1], [0.6, 0.4, 0.3]])
B = ([[0.0, 1.0], [0.5, 1.5], [1.0, -2.0]], [0.25, 0.0], [[0.5, 0.25], [0.1, 0.2], [0.3, 0.0]],
     [[1.0, 0.5], [0.8, 0.7], [0.3, 0.1]])


def test_components_match_hand_computation():
    loss = IntegratorLoss(lambda_mean_init=1.0, lambda_mean_final=0.1, annealing_epochs=100, lambda_speed=0.1,
                          tau=2.0, lambda_energy=0.01)
    stats = [_stats(*A), _stats(*B)]
    hand = [_by_hand(*A, tau=2.0), _by_hand(*B, tau=2.0)]
    # worked out for A: w = 1/(1+1) on both dims, 0.5·(2 − 0.5)² + 0.5·(1 + 1)² = 3.125
    assert hand[0][0] == pytest.approx(3.125)
    epoch = 50  # annealing factor 0.1 + 0.9 · (1 − 50/100) = 0.55
    terms = loss.integrator_terms(stats, epoch=epoch)
    assert terms["L_mean"].item() == pytest.approx(0.55 * (hand[0][0] + hand[1][0]) / 2, rel=1e-12)
    assert terms["L_speed"].item() == pytest.approx(0.1 * (hand[0][1] + hand[1][1]) / 2, rel=1e-6)
    assert terms["L_energy"].item() == pytest.approx(0.01 * (hand[0][2] + hand[1][2]) / 2, rel=1e-6)


def test_task_loss_and_total():
    loss = IntegratorLoss()
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    targets = torch.tensor([[0, 2]])
    ce = (-(2 - math.log(math.exp(2) + 2)) - (0 - math.log(math.e + 2))) / 2
    terms = loss(logits, targets, {"integrators": [_stats(*A)], "router_balance": None})
    assert terms["L_task"].item() == pytest.approx(ce, rel=1e-6)
    parts = sum(terms[k].item() for k in ("L_task", "L_mean", "L_speed", "L_energy"))
    assert terms["total"].item() == pytest.approx(parts, rel=1e-6)
    assert "L_balance" not in terms
    ignored = loss(logits, torch.tensor([[0, -100]]), {"integrators": [_stats(*A)]})
    assert ignored["L_task"].item() == pytest.approx(-(2 - math.log(math.exp(2) + 2)), rel=1e-6)
    with_balance = loss(logits, targets, {"integrators": [_stats(*A)], "router_balance": torch.tensor(1.25)})
    assert with_balance["L_balance"].item() == pytest.approx(0.01 * 1.25)


def test_lambda_mean_annealing_and_phases():
    loss = IntegratorLoss(lambda_mean_init=1.0, lambda_mean_final=0.1, annealing_epochs=100,
                          exploration_lambda_mean=0.05, lambda_energy=0.01, exploration_lambda_energy=0.001)
    assert loss.lambda_mean(0) == pytest.approx(1.0)
    assert loss.lambda_mean(100) == pytest.approx(0.1)
    assert loss.lambda_mean(1000) == pytest.approx(0.1)
    assert loss.current_lambda_energy() == 0.01
    loss.set_phase(True)
    assert loss.lambda_mean(0) == pytest.approx(0.05)
    assert loss.lambda_mean(100) == pytest.approx(0.005)
    assert loss.current_lambda_energy() == 0.001
    loss.set_phase(False, lambda_mean=0.5, lambda_energy=0.02)  # a scheduler's equilibrium phase
    assert loss.lambda_mean(50) == pytest.approx(0.5 * 0.55)
    assert loss.current_lambda_energy() == 0.02


def test_variance_weights_are_constants_in_the_gradient():
    loss = IntegratorLoss(lambda_mean_init=1.0, lambda_mean_final=1.0, lambda_speed=0.0, lambda_energy=0.0)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    stats = IntegratorStats(x, mu, torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64),
                            torch.ones(2, dtype=torch.int32))
    loss.integrator_terms([stats])["L_mean"].backward()
    # d/dx[r,i] of w_i (mean_i − mu_i)² with w fixed = 2 w_i (mean_i − mu_i) / n; w = 0.5, n = 2
    expected_x = [[0.5 * (2.0 - 0.5), 0.5 * (1.0 + 1.0)]] * 2
    torch.testing.assert_close(x.grad, torch.tensor(expected_x, dtype=torch.float64))
    torch.testing.assert_close(mu.grad, torch.tensor([-1.5, -2.0], dtype=torch.float64))


def test_unweighted_and_empty():
    loss = IntegratorLoss(lambda_mean_init=1.0, lambda_mean_final=1.0, variance_weighted=False)
    # A without weights: (2 − 0.5)² + (1 + 1)² = 6.25
    assert loss.integrator_terms([_stats(*A)])["L_mean"].item() == pytest.approx(6.25)
    with pytest.raises(ValueError, match="return_aux"):
        loss.integrator_terms([])
