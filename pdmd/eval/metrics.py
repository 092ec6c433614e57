"""The paper's measurements of a few-step generator, as functions of decoded frames (float in [0, 1],
[frames, 3, H, W]) and of the networks that judge them (pdmd/eval/networks.py). Torch only.

- diversity across seeds of one prompt: the mean pairwise cosine similarity of DINO features (lower = more
  diverse) and the mean pairwise LPIPS distance (higher = more diverse);
- motion: the mean optical-flow magnitude between consecutive frames, and VBench's dynamic degree;
- colour: mean saturation (HSV) and contrast (the standard deviation of luma), since washed-out colours are
  a failure mode the paper names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# VBench (vbench/dynamic_degree.py): frames sampled at ~8 fps; a pair of consecutive frames "moves" when
# the mean of its top 5% flow magnitudes exceeds 6 px at 256 px (scaled by the frame's short side, and by
# 8 / fps below 8 fps); a video is dynamic when round(4 x frames / 16) pairs move.
VBENCH_FPS, VBENCH_THRESHOLD_PX, VBENCH_TOP = 8.0, 6.0, 0.05


def mean_pairwise(items: Sequence, score: Callable[[object, object], float]) -> float:
    """The mean of ``score(a, b)`` over every unordered pair (NaN for fewer than two items)."""
    pairs = [score(items[i], items[j]) for i in range(len(items)) for j in range(i + 1, len(items))]
    return float(sum(pairs) / len(pairs)) if pairs else float("nan")


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """[n, d] features -> the mean cosine similarity of distinct pairs (1 when all are identical)."""
    if features.shape[0] < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(features.double().flatten(1), dim=1)
    sim = unit @ unit.T
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def saturation(frames: torch.Tensor) -> float:
    """Mean HSV saturation, (max - min) / max over RGB (0 where max is 0)."""
    hi, lo = frames.amax(dim=-3), frames.amin(dim=-3)
    return float(torch.where(hi > 0, (hi - lo) / hi.clamp(min=1e-12), torch.zeros_like(hi)).mean())


def contrast(frames: torch.Tensor) -> float:
    """The standard deviation of luma (Rec. 601 weights) over each frame's pixels, averaged over frames."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=frames.dtype, device=frames.device).view(3, 1, 1)
    luma = (frames * weights).sum(dim=-3)
    return float(luma.flatten(-2).std(dim=-1).mean())


def flow_scores(flows: torch.Tensor) -> tuple[float, list[float]]:
    """[pairs, 2, H, W] flow in pixels -> (the mean magnitude over every pixel and pair, VBench's per-pair
    score: the mean of the top 5% magnitudes)."""
    magnitude = flows.double().pow(2).sum(dim=1).sqrt().flatten(1)
    top = max(1, int(magnitude.shape[1] * VBENCH_TOP))
    return float(magnitude.mean()), [float(v) for v in magnitude.topk(top, dim=1).values.mean(dim=1)]


def vbench_is_dynamic(pair_scores: Sequence[float], frames: int, short_side: int, fps: float = VBENCH_FPS) -> bool:
    """VBench's rule on the per-pair scores of ``frames`` frames sampled at ``fps``."""
    threshold = max(1.0, VBENCH_FPS / fps) * VBENCH_THRESHOLD_PX * short_side / 256.0
    needed = round(4 * frames / 16.0)
    return sum(score > threshold for score in pair_scores) >= needed


def vbench_frames(frames: torch.Tensor, fps: float) -> torch.Tensor:
    """Every round(fps / 8)-th frame, as VBench samples a video to ~8 fps."""
    return frames[:: max(1, round(fps / VBENCH_FPS))]
