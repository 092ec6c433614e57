"""`pdmd eval` (pdmd/eval/): exact checks of each metric on synthetic frames (identical videos: DINO similarity
1 and LPIPS 0; a textured square moving k px a frame: flow ~k through a RAFT-shaped stand-in; VBench's dynamic
degree of a static and a moving clip), offline networks named in clear errors, and the command end to end
on the tiny export (generation through `pdmd sample`, a random tiny DINOv2, random LPIPS weights).
Torchvision's RAFT itself needs torchvision, which has no build for this CPU torch: its test runs where
PDMD_RAFT_WEIGHTS names the weights and torchvision imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdmd.eval import metrics as m
from pdmd.eval.command import contact_sheet, judge, read_media
from pdmd.eval.networks import LPIPS, DinoFeatures, EvalError
from tests.conftest import subprocess_env


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """A random tiny DINOv2 folder and a random LPIPS weights file (the real ones are downloads)."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("eval_networks")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(root / "dino")
    lpips = LPIPS()
    with torch.no_grad():
        for i in range(5):  # lpips' learned weights are non-negative
            getattr(lpips, f"lin{i}")[1].weight.abs_()
    save_file({k: v.contiguous() for k, v in lpips.state_dict().items() if k not in ("shift", "scale")},
              str(root / "lpips.safetensors"))
    return DinoFeatures(root / "dino", size=56), LPIPS.from_file(root / "lpips.safetensors"), root


def _square_clip(frames: int, k: int, side: int = 32, size: int = 10, seed: int = 0) -> torch.Tensor:
    """A textured square moving k px right per frame on a flat grey background, [F, 3, side, side]."""
    g = torch.Generator().manual_seed(seed)
    texture = torch.rand(3, size, size, generator=g)
    clip = torch.full((frames, 3, side, side), 0.5)
    for f in range(frames):
        clip[f, :, 8:8 + size, 2 + f * k:2 + f * k + size] = texture
    return clip


def block_matching_flow(first: torch.Tensor, second: torch.Tensor, radius: int = 4, patch: int = 5) -> torch.Tensor:
    """A RAFT-shaped stand-in ([n, 3, H, W] pairs -> [n, 2, H, W] pixel flow): for each pixel, the integer
    shift within ``radius`` whose patch in ``second`` matches best, ties to the smallest shift."""
    n, _, h, w = first.shape
    pad = radius + patch // 2
    a = torch.nn.functional.pad(first, (patch // 2,) * 4, mode="replicate")
    b = torch.nn.functional.pad(second, (pad,) * 4, mode="replicate")
    shifts = sorted(((dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)),
                    key=lambda d: d[0] ** 2 + d[1] ** 2)
    costs = []
    for dy, dx in shifts:
        moved = b[..., radius + dy:radius + dy + h + patch - 1, radius + dx:radius + dx + w + patch - 1]
        diff = (a - moved).abs().sum(1, keepdim=True)
        costs.append(torch.nn.functional.avg_pool2d(diff, patch, stride=1))
    best = torch.stack(costs).argmin(0)[:, 0]  # first minimum = smallest shift
    table = torch.tensor(shifts, dtype=torch.float32)
    return table[best].permute(0, 3, 1, 2)[:, [1, 0]]  # (dx, dy)


def test_identical_videos_are_similarity_one_and_lpips_zero(networks):
    dino, lpips, _ = networks
    clip = _square_clip(5, 1)
    same = judge({0: {0: clip, 1: clip.clone(), 2: clip.clone()}}, dino, lpips, None, fps=8)["overall"]
    assert same["dino_similarity"] == pytest.approx(1.0, abs=1e-6) and same["lpips_distance"] == pytest.approx(0.0, abs=1e-7)
    other = judge({0: {0: clip, 1: _square_clip(5, 1, seed=1), 2: torch.rand(5, 3, 32, 32)}}, dino, lpips, None,
                  fps=8)["overall"]
    assert other["dino_similarity"] < 1 - 1e-4 and other["lpips_distance"] > 1e-4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_square_moving_k_pixels_has_flow_k(k):
    clip = _square_clip(4, k)
    flow = block_matching_flow(clip[:-1], clip[1:])
    mean, pair_scores = m.flow_scores(flow)
    assert all(score == pytest.approx(k, rel=0.05) for score in pair_scores)  # the top 5%: the square
    moving = (flow.pow(2).sum(1).sqrt() > 0).float().mean().item()
    assert mean == pytest.approx(k * moving, rel=0.1) and 0 < moving < 0.3  # the square and its border


def test_dynamic_degree_tells_a_static_clip_from_a_moving_one(networks):
    dino, lpips, _ = networks
    static, moving = _square_clip(8, 0), _square_clip(8, 2)
    # 32 px frames at 8 fps: threshold 6 x 32 / 256 = 0.75 px; round(4 x 8 / 16) = 2 moving pairs needed
    result = judge({0: {0: static, 1: static}, 1: {0: moving, 1: moving}}, dino, lpips, block_matching_flow, fps=8)
    assert result["prompts"][0]["dynamic_degree"] == 0 and result["prompts"][0]["flow_magnitude"] == 0
    assert result["prompts"][1]["dynamic_degree"] == 1
    assert m.vbench_is_dynamic([1.0, 0.0, 0.0, 0.0], frames=8, short_side=32) is False  # one pair of 2 needed
    assert m.vbench_frames(torch.zeros(16, 3, 4, 4), fps=16).shape[0] == 8  # sampled to ~8 fps


def test_colour_metrics_by_hand():
    grey = torch.full((2, 3, 4, 4), 0.5)
    assert m.saturation(grey) == 0 and m.contrast(grey) == pytest.approx(0.0, abs=1e-7)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    assert m.saturation(red) == 1.0
    half = torch.zeros(1, 3, 2, 2)
    half[..., 0, :] = 1.0  # two white pixels, two black: luma std (unbiased) of [1, 1, 0, 0]
    assert m.contrast(half) == pytest.approx(torch.tensor([1.0, 1.0, 0.0, 0.0]).std().item())


def test_missing_networks_are_named(tmp_path):
    with pytest.raises(EvalError, match="--dino is needed"):
        DinoFeatures(None)
    with pytest.raises(EvalError, match=f"--lpips {tmp_path / 'no.safetensors'}: no such file"):
        LPIPS.from_file(tmp_path / "no.safetensors")


def test_eval_command_on_the_tiny_export(tiny_wan_run, networks, tmp_path):
    """Generation through `pdmd sample` (2 prompts x 3 seeds), a reference folder judged beside it, the files
    it promises; then the same model with motion through the stand-in flow."""
    root, _ = tiny_wan_run
    _, _, nets = networks
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na lighthouse at dusk\n")
    reference = tmp_path / "teacher_40_steps"
    reference.mkdir()
    from PIL import Image

    for p in range(2):
        for s in range(3):
            frames = [Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()) for _ in range(5)]
            frames[0].save(reference / f"p{p:03d}_s{s}.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "eval"
    export = root / "export_full"
    cmd = [sys.executable, "-m", "pdmd.cli", "eval", "--export", str(export), "--prompts", str(prompts), "--seeds", "0",
           "1", "2", "--encoder-path", str(root / "base"), "--vae", str(root / "base"), "--height", "64", "--width",
           "64", "--num-frames", "5", "--dino", str(nets / "dino"), "--lpips", str(nets / "lpips.safetensors"),
           "--no-motion", "--against", str(reference), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["model", "teacher_40_steps"]
    for r in results["models"].values():
        assert set(r["prompts"]) == {"0", "1"} and r["overall"]["lpips_distance"] > 0
        assert -1 <= r["overall"]["dino_similarity"] <= 1
    assert sorted(p.name for p in (out / "media" / "model").iterdir()) == [
        f"p{p:03d}_s{s}.gif" for p in range(2) for s in range(3)]
    assert len(list((out / "contact_sheets").glob("*.png"))) == 4
    assert (out / "results.md").read_text().count("\n") == 4  # header, rule, two models
    media = read_media(out / "media" / "model")
    assert media[0][0].shape == (5, 3, 64, 64)
    sheet = contact_sheet(media[0], tmp_path / "sheet.png")
    from PIL import Image as PILImage

    assert PILImage.open(sheet).size == (64 * 4, 64 * 3)  # 4 frames a row, one row a seed


@pytest.mark.skipif(not os.environ.get("PDMD_RAFT_WEIGHTS"), reason="needs torchvision and RAFT-large weights "
                    "(PDMD_RAFT_WEIGHTS=FILE): torchvision has no build for this CPU torch")
def test_real_raft_on_a_moving_square():
    from pdmd.eval.networks import RaftFlow

    clip = _square_clip(4, 2, side=128, size=40)
    _, pair_scores = m.flow_scores(RaftFlow(Path(os.environ["PDMD_RAFT_WEIGHTS"]))(clip[:-1], clip[1:]))
    assert all(score == pytest.approx(2, rel=0.25) for score in pair_scores)
