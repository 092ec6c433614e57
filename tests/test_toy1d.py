"""The paper's 1-D toy: training only on (0.5, 1] from x_s, the subinterval target recovers the field and
the naive target does not. Plus checks of the toy's analytic side and of `pdmd toy-1d`."""

import pytest
import torch

from pdmd.bench.toy1d import (
    ATOMS,
    ToyConfig,
    atom_velocity,
    atom_weights,
    euler,
    run_toy,
    sample_marginal,
    time_grid,
    wasserstein_1d,
)
from pdmd.cli import main

torch.set_num_threads(1)

# Tolerance for "matches in distribution" at t = 0.5: W1 to the analytic field's Euler end points from the
# same noise. The marginal there has std ~0.75, so 0.03 is 4% of its spread; the naive model sits ~0.12 away.
W1_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def toy():
    return run_toy(ToyConfig(seed=0))


def test_subinterval_target_recovers_the_field_naive_does_not(toy):
    sub, naive = toy.rows["subinterval"], toy.rows["naive"]
    assert sub.velocity_error <= naive.velocity_error / 5, (sub.velocity_error, naive.velocity_error)
    assert sub.w1_at_s < W1_TOLERANCE
    assert naive.w1_at_s > W1_TOLERANCE  # the tolerance does tell the two apart
    # the analytic continuation from the subinterval model's t = 0.5 points keeps the atom weights
    analytic = toy.rows["analytic"].weights_at_0
    assert max(abs(a - b) for a, b in zip(sub.weights_at_0, analytic)) < 0.01


def test_trajectories_share_the_grid_and_start(toy):
    grid = toy.grid
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == toy.config.euler_steps + 1
    assert bool((grid.diff() < 0).all())
    starts = [row.trajectory[0] for row in toy.rows.values()]
    assert all(torch.equal(starts[0], x) for x in starts)


def test_atom_velocity_matches_the_score_formula():
    """v = -x/(1-t) - t/(1-t) * grad log p_t(x), the mixture's score by autograd (not by posterior weights)."""
    x = torch.linspace(-3, 4, 201, dtype=torch.float64, requires_grad=True)
    for t in (0.05, 0.5, 0.9):
        a = torch.tensor(ATOMS, dtype=torch.float64)
        log_p = torch.logsumexp(-((x[:, None] - (1 - t) * a) ** 2) / (2 * t**2), dim=1)
        (score,) = torch.autograd.grad(log_p.sum(), x)
        expected = -x.detach() / (1 - t) - t / (1 - t) * score
        assert torch.allclose(atom_velocity(x.detach(), t), expected, atol=1e-9)


def test_analytic_euler_reproduces_the_exact_marginals():
    """100-step Euler of the analytic field from pure noise: the t = 0.5 law matches exact samples and
    every atom gets its weight of 1/4 at t = 0 (the reference the models are compared with is sound)."""
    config = ToyConfig(n_trajectories=20_000)
    upper, lower = time_grid(config)
    g = torch.Generator().manual_seed(5)
    x = euler(atom_velocity, torch.randn(20_000, generator=g, dtype=torch.float64), upper)[-1]
    exact = sample_marginal(20_000, 0.5, g)
    assert wasserstein_1d(x, exact) < 0.02  # sampling noise alone is ~0.01 at this size
    end = euler(atom_velocity, x, lower)[-1]
    assert max(abs(w - 0.25) for w in atom_weights(end)) < 0.015
    assert float((end[:, None] - torch.tensor(ATOMS, dtype=torch.float64)).abs().min(dim=1).values.max()) < 0.1


def test_toy_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"s must lie in \(0, 1\); got s=1.0"):
        ToyConfig(s=1.0)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1; got steps=0"):
        ToyConfig(steps=0)
    with pytest.raises(ValueError, match=r"target must be one of"):
        from pdmd.bench.toy1d import train_velocity_model

        train_velocity_model("biased", ToyConfig())


def test_cli_prints_the_table_and_writes_a_png(tmp_path, capsys):
    png = tmp_path / "toy.png"
    assert main(["toy-1d", "--steps", "5", "--batch", "64", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "subinterval" in out and "naive" in out and "mean |v - v*|" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
