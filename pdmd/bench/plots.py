"""The benchmark's figures, drawn with matplotlib (Agg: no display needed): loss curves, sample
projections against the true modes, and per-method metric bars. Each function writes one PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pdmd.bench.mixture import MixtureTask, projection_basis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_loss_curves(curves: Mapping[str, Sequence[float]], path: Path | str) -> Path:
    """One panel per curve (log y when the values span more than a decade), x = generator step."""
    plt = _pyplot()
    names = [n for n, v in curves.items() if any(math.isfinite(float(x)) for x in v)]
    fig, axes = plt.subplots(max(1, len(names)), 1, figsize=(8, 2.2 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        values = [float(v) for v in curves[name]]
        finite = [v for v in values if math.isfinite(v)]
        ax.plot(range(1, len(values) + 1), values, lw=1.2)
        if min(finite) > 0 and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_projection(task: MixtureTask, samples_by_method: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    prompt: int, path: Path | str) -> Path:
    """One panel per method: its samples of ``prompt`` projected onto the plane of the top-2 principal
    directions of the true means (same axes everywhere), coloured by the mode they are assigned to,
    over the true modes (mean, 1- and 3-sigma ellipses of the projected covariance, weight)."""
    plt = _pyplot()
    if not 0 <= prompt < task.num_prompts:
        raise ValueError(f"prompt must lie in 0..{task.num_prompts - 1}; got prompt={prompt!r}")
    centre, basis = projection_basis(task, prompt)
    mean2d = ((task.means[prompt] - centre) @ basis).numpy()
    cov2d = torch.einsum("di,md,dj->mij", basis, task.stds[prompt].pow(2), basis)
    circle = torch.stack([torch.cos(torch.linspace(0, 2 * math.pi, 65, dtype=torch.float64)),
                          torch.sin(torch.linspace(0, 2 * math.pi, 65, dtype=torch.float64))], 1)
    ellipses = [circle @ torch.linalg.cholesky(cov2d[m]).T for m in range(task.num_modes)]
    pad = 4.0 * float(torch.linalg.eigvalsh(cov2d).max().sqrt())
    lo, hi = mean2d.min(0) - pad, mean2d.max(0) + pad
    half = float((hi - lo).max()) / 2
    mid = (lo + hi) / 2
    n = max(1, len(samples_by_method))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (name, (x, pidx)) in zip(axes.flat, samples_by_method.items()):
        xf, idx = task._flat(x, pidx)
        xf = xf[idx == prompt].cpu()
        pts = ((xf - centre) @ basis).numpy()
        modes = task.assign(xf, torch.full((xf.shape[0],), prompt)).numpy() if xf.shape[0] else []
        ax.scatter(pts[:, 0], pts[:, 1], s=4, c=[colours(int(m) % 10) for m in modes], alpha=0.7, linewidths=0)
        for m in range(task.num_modes):
            for k in (1, 3):
                e = (mean2d[m] + k * ellipses[m].numpy())
                ax.plot(e[:, 0], e[:, 1], color=colours(m % 10), lw=1.0 if k == 1 else 0.6, alpha=0.9 if k == 1 else 0.5)
            ax.plot(*mean2d[m], "k+", ms=8)
            ax.annotate(f"{float(task.weights[prompt, m]):.2f}", mean2d[m], fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlim(mid[0] - half, mid[0] + half)
        ax.set_ylim(mid[1] - half, mid[1] + half)
        ax.set_aspect("equal")
        ax.set_title(f"{name}\n(n={pts.shape[0]})", fontsize=8)
        ax.set_xlabel("PC1 of the mode means", fontsize=7)
        ax.set_ylabel("PC2", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"prompt {prompt}: samples over the true modes (ellipses: 1 and 3 sigma; numbers: weights)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_metric_bars(methods: Mapping[str, Mapping[str, Any]], path: Path | str,
                     metrics: Sequence[tuple[str, str, float | None]] = (
                         ("coverage", "mode coverage", 1.0), ("spread_ratio", "spread ratio (truth = 1)", 1.0),
                         ("precision", "precision", None), ("tv", "TV to true weights", None))) -> Path:
    """One panel per metric, one bar per method (error bars: the spread over seeds), with the ideal
    value drawn as a dashed line where there is one."""
    plt = _pyplot()
    labels = list(methods)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.35 * len(labels) + 1.6), squeeze=False)
    for ax, (key, title, ideal) in zip(axes[0], metrics):
        values = [float(methods[m][key]) for m in labels]
        errors = [float(methods[m].get(f"{key}_seed_std") or 0.0) for m in labels]
        errors = [0.0 if not math.isfinite(e) else e for e in errors]
        ax.barh(range(len(labels)), values, xerr=errors, color="tab:blue", alpha=0.75)
        if ideal is not None:
            ax.axvline(ideal, color="k", ls="--", lw=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
