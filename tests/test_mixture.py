"""The toy benchmark's ground truth (pdmd/bench/mixture.py): the mixture's density and sampling are exact, and
each metric gives the value computed by hand on exact, collapsed, mis-weighted and shifted sample sets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pdmd.bench.mixture import (
    COVERAGE_SHARE,
    METRICS,
    THREE_SIGMA_MASS,
    MixtureTask,
    chi2_quantile,
    evaluate,
    load_task,
    projection_basis,
    save_task,
)
from pdmd.bench.plots import plot_metric_bars, plot_projection, save_loss_curves

torch.set_num_threads(1)
SHAPE = [4, 1, 8, 8]


@pytest.fixture(scope="module")
def task() -> MixtureTask:
    return MixtureTask.make(3, 5, SHAPE, seed=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hand_task() -> MixtureTask:
    """2 prompts, 3 modes, D = 8, parameters written out (for exact hand computations)."""
    D = 8
    means = torch.zeros(2, 3, D, dtype=torch.float64)
    means[:, 0, 0], means[:, 1, 1], means[:, 2, 2] = 10.0, 10.0, 10.0
    means[1] *= -1
    stds = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64).view(1, 3, 1).expand(2, 3, D).clone()
    stds[1, :, ::2] *= 2  # prompt 1: a per-dimension profile
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]], dtype=torch.float64)
    return MixtureTask((2, 1, 2, 2), weights, means, stds)


def _entropy_analytic(task: MixtureTask, p: int) -> float:
    """H(w) + sum_m w_m H(N_m): the mixture entropy when modes do not overlap, per dimension."""
    w = task.weights[p]
    gauss = 0.5 * task.dim * math.log(2 * math.pi * math.e) + task.stds[p].log().sum(-1)
    return float(-(w * w.log()).sum() + w @ gauss) / task.dim


def _pairwise_analytic(task: MixtureTask, p: int) -> float:
    """E||x - y|| ~ sum_ij w_i w_j sqrt(||mu_i - mu_j||^2 + tr S_i + tr S_j) (concentration in high D)."""
    w, mu, var = task.weights[p], task.means[p], task.stds[p].pow(2).sum(-1)
    d2 = torch.cdist(mu, mu).pow(2) + var[:, None] + var[None, :]
    return float(w @ d2.sqrt() @ w)


# ---------------------------------------------------------------------------------------------------
# chi-square quantile
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p, dof, expected", [
    (0.95, 1, 3.841459), (0.99, 10, 23.209251), (0.999, 5, 20.515006), (0.95, 100, 124.342113),
    (0.95, 2, -2 * math.log(0.05)), (THREE_SIGMA_MASS, 1, 9.0),
])
def test_chi2_quantile_known_values(p: float, dof: int, expected: float) -> None:
    assert chi2_quantile(p, dof) == pytest.approx(expected, rel=1e-6)


def test_chi2_quantile_agrees_with_wilson_hilferty_in_high_dimension() -> None:
    z = math.sqrt(2) * float(torch.erfinv(torch.tensor(2 * THREE_SIGMA_MASS - 1, dtype=torch.float64)))
    for dof in (64, 256, 512):
        wh = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
        assert chi2_quantile(THREE_SIGMA_MASS, dof) == pytest.approx(wh, rel=2e-3)
    with pytest.raises(ValueError, match="p must lie"):
        chi2_quantile(1.0, 3)


# ---------------------------------------------------------------------------------------------------
# the drawn task
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_modes", [4, 5, 6])
def test_make_draws_documented_parameters(num_modes: int) -> None:
    t = MixtureTask.make(4, num_modes, SHAPE, seed=7)
    assert t.dim == 256 and tuple(t.means.shape) == (4, num_modes, 256)
    assert torch.allclose(t.weights.sum(1), torch.ones(4, dtype=torch.float64))
    assert float(t.weights.min()) >= 0.08
    w = t.weights.sort(1, descending=True).values
    assert torch.allclose(w[:, 0] / w[:, -1], torch.full((4,), 3.0, dtype=torch.float64))
    assert not torch.equal(t.weights[0], t.weights[1]) or not torch.equal(t.weights[1], t.weights[2])
    assert torch.allclose(t.means.pow(2).mean(-1).sqrt(), torch.full((4, num_modes), 0.8, dtype=torch.float64))
    assert float(t.stds.min()) >= 0.15 * 0.8 and float(t.stds.max()) <= 0.35 * 1.2
    for p in range(4):
        d = torch.cdist(t.means[p], t.means[p]) / math.sqrt(t.dim)
        assert float((d + 9 * torch.eye(num_modes)).min()) >= 0.9
    # smooth patterns: all energy at spatial frequencies |k| <= 2 (white noise would put 7/16 above)
    power = torch.fft.fft2(t.means.reshape(-1, 8, 8)).abs().pow(2)
    high = torch.zeros(8, 8, dtype=torch.bool)
    high[3:6, :], high[:, 3:6] = True, True
    assert float(power[:, high].sum() / power.sum()) < 1e-20
    x, _ = t.sample(torch.arange(4).repeat(100), _gen(0))
    assert 0.75 < float(x.pow(2).mean().sqrt()) < 0.95  # about unit scale
    again = MixtureTask.make(4, num_modes, SHAPE, seed=7)
    assert torch.equal(again.means, t.means) and torch.equal(again.stds, t.stds)
    assert not torch.equal(MixtureTask.make(4, num_modes, SHAPE, seed=8).means, t.means)


def test_make_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_modes"):
        MixtureTask.make(2, 1, SHAPE, 0)
    with pytest.raises(ValueError, match="unknown option"):
        MixtureTask.make(2, 3, SHAPE, 0, colour="red")
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureTask((8,), torch.tensor([[0.5, 0.6]]), torch.zeros(1, 2, 8), torch.ones(1, 2, 8))


def test_log_prob_and_posterior_match_torch_distributions() -> None:
    t = MixtureTask.make(2, 3, [2, 1, 2, 2], seed=3, min_separation=0.3)
    x = torch.randn(6, 2, 1, 2, 2, generator=_gen(1), dtype=torch.float64)
    idx = torch.tensor([0, 1, 0, 1, 1, 0])
    expected, post = [], []
    for i in range(6):
        p = int(idx[i])
        comps = torch.distributions.MultivariateNormal(t.means[p], scale_tril=torch.diag_embed(t.stds[p]))
        mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(t.weights[p]), comps)
        expected.append(mix.log_prob(x[i].flatten()))
        joint = t.weights[p].log() + comps.log_prob(x[i].flatten())
        post.append(torch.softmax(joint, 0))
    torch.testing.assert_close(t.log_prob(x, idx), torch.stack(expected), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(t.posterior(x, idx), torch.stack(post), rtol=1e-10, atol=1e-12)
    assert torch.equal(t.assign(x, idx), torch.stack(post).argmax(1))
    torch.testing.assert_close(t.log_prob(x.flatten(1).float(), idx), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_law_at_time_gives_the_exact_velocity_through_the_score() -> None:
    """Tweedie: E[eps | x_t] = -t grad log p_t(x_t) and x_t = (1 - t) E[x0 | x_t] + t E[eps | x_t], so the
    velocity is (-t grad log p_t(x) - x) / (1 - t): ``at_time`` (p_t) and ``velocity`` checked against each
    other, the gradient by central differences."""
    t_task = MixtureTask.make(2, 3, [2, 1, 2, 2], seed=3, min_separation=0.3)
    idx = torch.tensor([0, 1, 0, 1])
    x = torch.randn(4, 2, 1, 2, 2, generator=_gen(2), dtype=torch.float64)
    h = 1e-5
    for t in (0.1, 0.5, 0.9):
        law = t_task.at_time(t)
        grad = torch.zeros(4, t_task.dim, dtype=torch.float64)
        for d in range(t_task.dim):
            step = torch.zeros(t_task.dim, dtype=torch.float64)
            step[d] = h
            up, down = (law.log_prob(x.flatten(1) + sgn * step, idx) for sgn in (1, -1))
            grad[:, d] = (up - down) / (2 * h)
        expected = (-t * grad - x.flatten(1)) / (1 - t)
        torch.testing.assert_close(t_task.velocity(x, t, idx).flatten(1), expected, rtol=1e-6, atol=1e-6)
    same = t_task.at_time(0.0)
    assert torch.equal(same.means, t_task.means) and torch.equal(same.stds, t_task.stds)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\)"):
        t_task.at_time(1.0)


def test_sampled_mode_frequencies_match_weights(task: MixtureTask) -> None:
    n, p = 8000, 1
    x, mode = task.sample(torch.full((n,), p), _gen(2))
    assert x.shape == (n, *SHAPE) and x.dtype == torch.float32
    counts = torch.bincount(mode, minlength=task.num_modes).double()
    expected = n * task.weights[p]
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < chi2_quantile(0.999, task.num_modes - 1)
    assert torch.equal(task.assign(x, torch.full((n,), p)), mode)  # modes never overlap
    m = int(task.weights[p].argmax())
    xm = x.flatten(1).double()[mode == m]
    assert float(((xm.mean(0) - task.means[p, m]) / task.stds[p, m]).abs().max()) < 5 / math.sqrt(len(xm)) * 1.2
    torch.testing.assert_close(xm.std(0) / task.stds[p, m], torch.ones(task.dim, dtype=torch.float64), atol=0.1, rtol=0)


def test_to_dict_round_trips_through_json(task: MixtureTask, tmp_path) -> None:
    full = MixtureTask.from_dict(json.loads(json.dumps(task.to_dict())))
    compact = MixtureTask.from_dict(json.loads(json.dumps(task.to_dict(include_params=False))))
    for other in (full, compact, load_task(save_task(task, tmp_path / "task.json"))):
        assert other.latent_shape == task.latent_shape and other.recipe == task.recipe
        for name in ("weights", "means", "stds"):
            assert torch.equal(getattr(other, name), getattr(task, name))
    assert "means" not in task.to_dict(include_params=False)
    hand = _hand_task()
    assert torch.equal(MixtureTask.from_dict(json.loads(json.dumps(hand.to_dict(False)))).stds, hand.stds)
    with pytest.raises(ValueError, match="format"):
        MixtureTask.from_dict({"format": 99})


def test_describe_lists_every_prompt(task: MixtureTask) -> None:
    text = task.describe()
    assert "D = 256" in text and "seed 0" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == task.num_prompts
    assert f"{float(task.weights[2, 0]):.3f}" in rows[2]


# ---------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------
def test_references_match_hand_formulas(task: MixtureTask) -> None:
    for p in range(task.num_prompts):
        ref = task.reference(p)
        assert ref["entropy_per_dim"] == pytest.approx(_entropy_analytic(task, p), abs=2e-3)
        assert ref["pairwise"] == pytest.approx(_pairwise_analytic(task, p), rel=5e-3)
    assert task.reference(0) is task.reference(0)  # cached


# ---------------------------------------------------------------------------------------------------
# metrics on exact samples
# ---------------------------------------------------------------------------------------------------
def test_metrics_on_exact_samples(task: MixtureTask) -> None:
    n = 256
    idx = torch.arange(task.num_prompts).repeat_interleave(n)
    x, _ = task.sample(idx, _gen(3))
    r = evaluate(task, x, idx)
    assert set(METRICS) <= set(r) and r["num_samples"] == len(idx) and r["num_prompts"] == task.num_prompts
    assert r["coverage"] == 1.0
    for row in r["per_prompt"]:
        w = torch.tensor(row["true_weights"], dtype=torch.float64)
        assert sum(row["counts"]) == n == row["n"]
        assert row["tv"] <= 0.5 * float((4 * (w * (1 - w) / n).sqrt()).sum())  # 4 sigma per mode
        assert row["spread_ratio"] == pytest.approx(1.0, abs=0.03)
        assert row["pairwise_ratio"] == pytest.approx(1.0, abs=0.06)
        assert row["precision"] >= 0.98
        # -log p(x)/D of exact samples: mean nll ~ entropy, per-dimension sd sqrt(D/2)/D/sqrt(n) = 0.003
        assert row["nll_per_dim"] == pytest.approx(row["nll_per_dim_true"], abs=0.015)
    assert r["precision_threshold"] == pytest.approx(chi2_quantile(THREE_SIGMA_MASS, 256))


def test_precision_of_exact_samples_is_three_sigma_mass(task: MixtureTask) -> None:
    n = 4096
    x, _ = task.sample(torch.zeros(n, dtype=torch.long), _gen(4))
    r = evaluate(task, x, torch.zeros(n, dtype=torch.long))
    assert r["precision"] == pytest.approx(THREE_SIGMA_MASS, abs=0.003)  # sd 0.0008
    assert r["num_prompts"] == 1 and r["per_prompt"][0]["prompt"] == 0


# ---------------------------------------------------------------------------------------------------
# metrics on deliberately wrong sample sets
# ---------------------------------------------------------------------------------------------------
def test_metrics_collapsed_onto_one_mode(task: MixtureTask) -> None:
    n, p = 256, 2
    m = int(task.weights[p].argmax())
    idx, mode = torch.full((n,), p), torch.full((n,), m)
    x = task.sample_given_mode(idx, mode, _gen(5))
    r = evaluate(task, x, idx)
    w = task.weights[p]
    assert r["coverage"] == pytest.approx(1 / task.num_modes)
    assert r["tv"] == pytest.approx(1 - float(w[m]), abs=1e-12)
    assert r["spread_ratio"] == pytest.approx(1.0, abs=0.03)
    within = math.sqrt(2 * float(task.stds[p, m].pow(2).sum()))  # E||x - y|| inside mode m
    assert r["pairwise_ratio"] == pytest.approx(within / task.reference(p)["pairwise"], rel=0.02)
    assert r["pairwise_ratio"] < 0.5
    assert r["precision"] >= 0.98
    gauss = (0.5 * task.dim * math.log(2 * math.pi * math.e) + float(task.stds[p, m].log().sum())) / task.dim
    assert r["nll_per_dim"] == pytest.approx(gauss - math.log(float(w[m])) / task.dim, abs=0.015)


def test_metrics_at_the_means_without_spread(task: MixtureTask) -> None:
    p, n = 0, 200
    w = task.weights[p]
    counts = torch.round(w * n).long()
    counts[0] += n - int(counts.sum())
    mode = torch.repeat_interleave(torch.arange(task.num_modes), counts)
    idx = torch.full((n,), p)
    r = evaluate(task, task.means[p, mode], idx)
    q = counts.double() / n
    assert r["coverage"] == 1.0
    assert r["tv"] == pytest.approx(0.5 * float((q - w).abs().sum()), abs=1e-12)
    assert r["spread_ratio"] == 0.0
    assert r["precision"] == 1.0
    d = torch.cdist(task.means[p], task.means[p])
    pair_sum = 0.5 * float(counts.double() @ d @ counts.double())  # pairs inside a mode are at distance 0
    assert r["pairwise_ratio"] == pytest.approx(pair_sum / (n * (n - 1) / 2) / task.reference(p)["pairwise"], rel=1e-7)
    assert r["pairwise_ratio"] < 1
    # log p(mu_m) = log w_m - sum log std_m - D/2 log 2 pi (the other modes add ~e^-1000)
    log_peak = w.log() - task.stds[p].log().sum(-1) - 0.5 * task.dim * math.log(2 * math.pi)
    assert r["nll_per_dim"] == pytest.approx(-float(q @ log_peak) / task.dim, rel=1e-9)
    assert r["nll_per_dim"] < r["nll_per_dim_true"] - 0.4  # 0.5 per dimension below the entropy


def test_metrics_with_wrong_weights_and_dropped_modes(task: MixtureTask) -> None:
    p, M = 1, task.num_modes
    w = task.weights[p]
    uniform = torch.arange(M).repeat(60)
    x = task.sample_given_mode(torch.full((len(uniform),), p), uniform, _gen(6))
    r = evaluate(task, x, torch.full((len(uniform),), p))
    assert r["coverage"] == 1.0
    assert r["tv"] == pytest.approx(0.5 * float((1 / M - w).abs().sum()), abs=1e-12)
    assert r["per_prompt"][0]["counts"] == [60] * M
    assert r["spread_ratio"] == pytest.approx(1.0, abs=0.03)

    top2 = w.argsort(descending=True)[:2]
    mode = top2.repeat(100)
    x = task.sample_given_mode(torch.full((200,), p), mode, _gen(7))
    r = evaluate(task, x, torch.full((200,), p))
    q = torch.zeros(M, dtype=torch.float64)
    q[top2] = 0.5
    assert r["coverage"] == pytest.approx(2 / M)
    assert r["tv"] == pytest.approx(0.5 * float((q - w).abs().sum()), abs=1e-12)


def test_coverage_threshold_is_a_quarter_of_the_true_share() -> None:
    t = _hand_task()  # prompt 0 weights 0.5, 0.3, 0.2: thresholds 0.125, 0.075, 0.05
    assert COVERAGE_SHARE == 0.25
    for counts, coverage in (([85, 11, 4], 2 / 3), ([85, 6, 9], 2 / 3), ([80, 10, 10], 1.0), ([100, 0, 0], 1 / 3)):
        mode = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
        r = evaluate(t, t.means[0, mode], torch.zeros(100, dtype=torch.long))
        assert r["coverage"] == pytest.approx(coverage)
        assert r["per_prompt"][0]["counts"] == counts


def test_precision_at_a_known_mahalanobis_distance() -> None:
    t = _hand_task()
    q = chi2_quantile(THREE_SIGMA_MASS, t.dim)
    # x = mu + c * std (every dimension): squared Mahalanobis distance c^2 D to its own mode
    for c, expected in ((math.sqrt(q / t.dim) * 0.999, 1.0), (math.sqrt(q / t.dim) * 1.001, 0.0)):
        idx = torch.tensor([0, 0, 0, 1, 1, 1])
        mode = torch.tensor([0, 1, 2, 0, 1, 2])
        x = t.means[idx, mode] + c * t.stds[idx, mode]
        r = evaluate(t, x, idx)
        assert r["precision"] == expected
        assert [row["precision"] for row in r["per_prompt"]] == [expected, expected]


def test_spread_ratio_scales_with_the_deviations(task: MixtureTask) -> None:
    p, n = 0, 300
    idx = torch.full((n,), p)
    x, mode = task.sample(idx, _gen(8), dtype=torch.float64)
    mu = task.means[p, mode].view(n, *SHAPE)
    base = evaluate(task, x, idx)["spread_ratio"]
    for scale in (0.5, 1.5):
        r = evaluate(task, mu + scale * (x - mu), idx)
        assert r["spread_ratio"] == pytest.approx(scale * base, rel=1e-9)
        assert r["coverage"] == 1.0
    assert evaluate(task, mu + 1.5 * (x - mu), idx)["precision"] < 0.01  # 1.5 sigma spread: outside 3 sigma


def test_prompt_averages_and_spread() -> None:
    t = _hand_task()
    idx = torch.tensor([0] * 10 + [1] * 10)
    mode = torch.tensor([0] * 10 + [2] * 10)  # prompt 0 all in mode 0 (w .5), prompt 1 all in mode 2 (w .6)
    r = evaluate(t, t.sample_given_mode(idx, mode, _gen(9)), idx)
    assert [row["tv"] for row in r["per_prompt"]] == pytest.approx([0.5, 0.4])
    assert r["tv"] == pytest.approx(0.45) and r["tv_std"] == pytest.approx(0.05)
    one = evaluate(t, t.means[0, :1], torch.tensor([0]))
    assert math.isnan(one["spread_ratio"]) and math.isnan(one["pairwise_ratio"])


def test_evaluate_rejects_mismatched_inputs(task: MixtureTask) -> None:
    x, _ = task.sample(torch.zeros(4, dtype=torch.long), _gen(10))
    with pytest.raises(ValueError, match="prompt_idx must lie"):
        evaluate(task, x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="batch size"):
        evaluate(task, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_idx must lie"):
        task.log_prob(x, torch.tensor([0, 0, 0, 5]))
    with pytest.raises(ValueError, match="x must have shape"):
        evaluate(task, x[:, :2], torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------------------------------
def test_plots_write_pngs(task: MixtureTask, tmp_path) -> None:
    """pdmd/bench/plots.py: the projection (one panel per method), the metric bars and the loss curves are
    PNGs with content; a prompt out of range is refused."""
    from PIL import Image

    idx = torch.arange(task.num_prompts).repeat(64)
    exact, _ = task.sample(idx, _gen(11))
    m = int(task.weights[1].argmax())
    collapsed = task.sample_given_mode(torch.full((64,), 1), torch.full((64,), m), _gen(12))
    samples = {"exact": (exact, idx), "collapsed": (collapsed, torch.full((64,), 1))}
    paths = [plot_projection(task, samples, prompt=1, path=tmp_path / "sub" / "proj.png"),
             plot_metric_bars({name: evaluate(task, x, i) for name, (x, i) in samples.items()}, tmp_path / "bars.png"),
             save_loss_curves({"a": [1.0, 0.5, 0.01], "b": [2.0, 2.5, float("nan")]}, tmp_path / "loss.png")]
    for path in paths:
        image = Image.open(path)
        assert image.format == "PNG" and min(image.size) > 200
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 5  # more than a blank canvas
    assert Image.open(paths[0]).size[0] > Image.open(paths[0]).size[1]  # two panels side by side
    with pytest.raises(ValueError, match="prompt must lie"):
        plot_projection(task, samples, prompt=9, path=tmp_path / "x.png")


def test_projection_basis_is_orthonormal_even_for_two_modes() -> None:
    for t in (MixtureTask.make(1, 2, SHAPE, 0), MixtureTask.make(1, 5, SHAPE, 0)):
        _, basis = projection_basis(t, 0)
        torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)
