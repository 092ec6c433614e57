"""`pdmd eval`: diversity across seeds, motion and colour of a distilled generator's outputs, side by side
with references (docs/eval.md).

    pdmd eval --export DIR | --run DIR --prompts F [--seeds 0 1 ... 7] [--vae DIR] [sampling options]
              [--videos DIR] [--against DIR ...] --dino DIR --lpips FILE (--raft FILE | --no-motion) --out DIR

Generated samples go through `pdmd sample` (the same sampler, VAE-decoded) into OUT/media/model/; any folder
of media named ``p<prompt>_s<seed>.(gif|png|mp4)`` (``--videos`` for the model, ``--against`` for references,
e.g. the teacher at 40 steps with CFG) is read as it is. Writes OUT/results.json, OUT/results.md (one row per
model) and a contact sheet per model and prompt (rows = seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pdmd.eval import metrics as m
from pdmd.eval.networks import LPIPS, DinoFeatures, EvalError, RaftFlow

MEDIA = re.compile(r"p(\d+)_s(\d+)\.(gif|png|mp4)$")
DIVERSITY_FRAMES = 3  # first, middle and last frame of each video (one for an image)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--export", help="a folder written by `pdmd export`: sample it with `pdmd sample`")
    src.add_argument("--run", help="a finished run directory: sample its experts with `pdmd sample`")
    src.add_argument("--videos", help="a folder of media p<prompt>_s<seed>.(gif|png|mp4) to judge as they are")
    p.add_argument("--against", nargs="+", default=[], metavar="DIR", help="reference media folders (same names)")
    p.add_argument("--prompts", help="prompts, one a line (with --export/--run)")
    p.add_argument("--embeds", help="safetensors prompt_embeds [B, L, D] instead of --prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="noise seeds (default 0..7)")
    p.add_argument("--encoder-path", help="pipeline folder with tokenizer/ and text_encoder/ (default: the export's)")
    p.add_argument("--vae", help="AutoencoderKLWan folder, or a pipeline folder with vae/ (default: the export's)")
    for flag in ("--height", "--width", "--num-frames"):
        p.add_argument(flag, type=int, help="as pdmd sample (default: the run's latent shape)")
    p.add_argument("--dino", help="a local DINOv2/DINOv3 transformers folder (diversity)")
    p.add_argument("--lpips", help="LPIPS AlexNet weights, one safetensors file (diversity; docs/eval.md)")
    p.add_argument("--raft", help="torchvision RAFT-large weights (motion)")
    p.add_argument("--no-motion", action="store_true", help="skip the optical-flow metrics")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate of the videos (Wan2.2: 16)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled",
                   help="also log the table and contact sheets to W&B (project phased-dmd-eval)")


def read_media(folder: Path) -> dict[int, dict[int, torch.Tensor]]:
    """prompt -> seed -> frames [F, 3, H, W] in [0, 1] of every p<prompt>_s<seed> file in ``folder``."""
    import numpy as np
    from PIL import Image, ImageSequence

    if not folder.is_dir():
        raise EvalError(f"{folder}: no such folder of media")
    out: dict[int, dict[int, torch.Tensor]] = {}
    for path in sorted(folder.iterdir()):
        found = MEDIA.match(path.name)
        if not found:
            continue
        prompt, seed, ext = int(found.group(1)), int(found.group(2)), found.group(3)
        if ext == "mp4":
            import imageio.v3 as iio  # lazy: only MP4 needs it (diffusers' export_to_video writes with it)

            frames = [torch.from_numpy(f) for f in iio.imread(path)]
        else:
            with Image.open(path) as img:
                frames = [torch.from_numpy(np.array(f.convert("RGB"))) for f in ImageSequence.Iterator(img)]
        out.setdefault(prompt, {})[seed] = torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0
    if not out:
        raise EvalError(f"{folder} holds no p<prompt>_s<seed>.gif|png|mp4 files (pdmd eval --export writes them)")
    return out


def generate(args: argparse.Namespace, out: Path) -> Path:
    """Every prompt at every seed through `pdmd sample`, media renamed p<prompt>_s<seed>.*; returns the folder."""
    # lazy: judging given --videos needs neither Megatron nor the sampler
    from pdmd.sample import add_arguments as sample_arguments
    from pdmd.sample import run as sample

    media = out / "media" / "model"
    media.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        parser = argparse.ArgumentParser()
        sample_arguments(parser)
        argv = ["--export" if args.export else "--run", args.export or args.run, "--seed", str(seed),
                "--out", str(media / f"seed{seed}.safetensors")]
        for flag, value in (("--prompts", args.prompts), ("--embeds", args.embeds), ("--encoder-path", args.encoder_path),
                            ("--vae", args.vae or (args.export if args.export else None)), ("--height", args.height),
                            ("--width", args.width), ("--num-frames", args.num_frames)):
            if value is not None:
                argv += [flag, str(value)]
        if sample(parser.parse_args(argv)) != 0:
            raise EvalError(f"pdmd sample failed for seed {seed} (its message is above)")
        for path in media.glob(f"seed{seed}_*.*"):
            if path.suffix in (".gif", ".png", ".mp4"):
                prompt = int(path.stem.rsplit("_", 1)[1])
                path.rename(media / f"p{prompt:03d}_s{seed}{path.suffix}")
        (media / f"seed{seed}.safetensors").unlink(missing_ok=True)
    return media


def _diversity_frames(frames: torch.Tensor) -> torch.Tensor:
    n = frames.shape[0]
    return frames[sorted({0, n // 2, n - 1})] if n >= DIVERSITY_FRAMES else frames


def judge(media: dict[int, dict[int, torch.Tensor]], dino: DinoFeatures, lpips: LPIPS, flow, fps: float
          ) -> dict[str, Any]:
    """Per prompt and overall: DINO similarity and LPIPS distance across seeds (mean over the documented
    frames), mean flow magnitude and VBench dynamic share, saturation and contrast."""
    prompts = {}
    for prompt, by_seed in sorted(media.items()):
        videos = [by_seed[s] for s in sorted(by_seed)]
        picked = [_diversity_frames(v) for v in videos]
        rows = {"seeds": len(videos)}
        if len({tuple(v.shape) for v in picked}) != 1:
            raise EvalError(f"prompt {prompt}: the seeds' media have different sizes {[tuple(v.shape) for v in picked]}")
        per_frame = range(picked[0].shape[0])
        rows["dino_similarity"] = sum(m.mean_pairwise_cosine(dino(torch.stack([v[f] for v in picked])))
                                      for f in per_frame) / len(per_frame)
        rows["lpips_distance"] = sum(m.mean_pairwise([v[f:f + 1] for v in picked], lambda a, b: float(lpips(a, b)[0]))
                                     for f in per_frame) / len(per_frame)
        rows["saturation"] = sum(m.saturation(v) for v in videos) / len(videos)
        rows["contrast"] = sum(m.contrast(v) for v in videos) / len(videos)
        if flow is not None and videos[0].shape[0] > 1:
            magnitudes, dynamic = [], []
            for v in videos:
                sampled = m.vbench_frames(v, fps)
                mean, pair_scores = m.flow_scores(flow(sampled[:-1], sampled[1:]))
                magnitudes.append(mean)
                dynamic.append(m.vbench_is_dynamic(pair_scores, sampled.shape[0], min(v.shape[-2:]), fps))
            rows["flow_magnitude"] = sum(magnitudes) / len(magnitudes)
            rows["dynamic_degree"] = sum(dynamic) / len(dynamic)
        prompts[prompt] = rows
    keys = [k for k in next(iter(prompts.values())) if k != "seeds"]
    overall = {k: sum(p[k] for p in prompts.values()) / len(prompts) for k in keys if all(k in p for p in prompts.values())}
    return {"overall": overall, "prompts": prompts}


def contact_sheet(by_seed: dict[int, torch.Tensor], path: Path, columns: int = 4) -> Path:
    """Rows = seeds, columns = evenly spaced frames."""
    from PIL import Image

    tiles = []
    for seed in sorted(by_seed):
        v = by_seed[seed]
        idx = torch.linspace(0, v.shape[0] - 1, min(columns, v.shape[0])).round().long().unique()
        tiles.append(torch.cat(list(v[idx]), dim=-1))  # [3, H, W * columns]
    width = max(t.shape[-1] for t in tiles)
    sheet = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tiles], dim=-2)
    Image.fromarray((sheet.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(path)
    return path


METRICS = (("dino_similarity", "DINO similarity (lower = more diverse)"), ("lpips_distance", "LPIPS (higher = more diverse)"),
           ("flow_magnitude", "optical flow (px)"), ("dynamic_degree", "dynamic degree"), ("saturation", "saturation"),
           ("contrast", "contrast"))


def results_markdown(results: dict[str, Any]) -> str:
    present = [(k, label) for k, label in METRICS if any(k in r["overall"] for r in results["models"].values())]
    lines = ["| model | " + " | ".join(label for _, label in present) + " |", "|---|" + "---|" * len(present)]
    for name, r in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['overall'][k]:.4g}" if k in r["overall"] else "-" for k, _ in present)
                     + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not (args.export or args.run or args.videos):
        raise EvalError("give what to judge: --export DIR or --run DIR (with --prompts), or --videos DIR")
    if (args.export or args.run) and not (args.prompts or args.embeds):
        raise EvalError("--export/--run need --prompts FILE (one prompt a line) or --embeds FILE")
    # every network before any sampling: a missing path fails in a second, not after an hour of videos
    dino, lpips = DinoFeatures(args.dino), LPIPS.from_file(args.lpips)
    flow = None if args.no_motion else RaftFlow(args.raft)
    out.mkdir(parents=True, exist_ok=True)
    sources = {"model": Path(args.videos) if args.videos else generate(args, out)}
    for folder in args.against:
        sources[Path(folder).name] = Path(folder)
    results: dict[str, Any] = {"settings": {"seeds": args.seeds, "fps": args.fps, "diversity_frames": "first, middle, last",
                                            "motion": not args.no_motion}, "models": {}}
    sheets = out / "contact_sheets"
    shutil.rmtree(sheets, ignore_errors=True)
    sheets.mkdir()
    for name, folder in sources.items():
        media = read_media(folder)
        results["models"][name] = {"folder": str(folder), **judge(media, dino, lpips, flow, args.fps)}
        for prompt, by_seed in media.items():
            contact_sheet(by_seed, sheets / f"{name}_p{prompt:03d}.png")
    table = results_markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    print(table + f"\n{out / 'results.json'}, {out / 'results.md'}, contact sheets in {sheets}")
    if args.wandb != "disabled":
        _log_wandb(results, sheets, args.wandb, out)
    return 0


def _log_wandb(results: dict[str, Any], sheets: Path, mode: str, out: Path) -> None:
    import wandb

    run = wandb.init(mode=mode, project="phased-dmd-eval", dir=str(out), config=results["settings"])
    keys = [k for k, _ in METRICS]
    table = wandb.Table(columns=["model", *keys])
    for name, r in results["models"].items():
        table.add_data(name, *(r["overall"].get(k) for k in keys))
    run.log({"results": table, **{f"contact/{p.stem}": wandb.Image(str(p)) for p in sorted(sheets.glob("*.png"))}})
    run.finish()
