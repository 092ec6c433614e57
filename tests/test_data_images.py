"""Image-conditioned shards: stored conditioning equals diffusers' WanImageToVideoPipeline's own, bad images
are skipped and counted, and the loader serves single-bucket batches with the conditioning tensors."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data.format import COND_KEYS, cond_from_bytes, embeds_from_bytes
from data.images import choose_bucket, parse_buckets
from data.loader import PromptDataConfig, PromptLoader
from data.plan import EpochPlan, GroupedEpochPlan, ResamplePlan, local_indices
from data.tiny_encoders import save_tiny_encoder

BUCKETS = "32x64,64x32,32x32"  # HEIGHTxWIDTH; multiples of 32 = 16x VAE (TI2V-style) x 2x2 patch
NUM_FRAMES = 5  # two latent frames
MEAN, STD = [0.3, -0.2, 0.1, 0.5], [1.7, 0.6, 2.2, 1.1]  # not 0/1, so the normalisation is exercised
# name -> (width, height, mode) of the good images and where they go
GOOD = {"wide.png": (70, 36, "RGB"), "tall.jpg": (40, 80, "RGB"), "square.png": (50, 50, "RGB"),
        "rgba.png": (66, 34, "RGBA"), "gray.png": (36, 36, "L"), "slim.png": (33, 70, "RGB")}
BUCKET_OF = {"wide.png": "32x64", "tall.jpg": "64x32", "square.png": "32x32", "rgba.png": "32x64",
             "gray.png": "32x32", "slim.png": "64x32", "exif.jpg": "64x32", "abs.png": "32x32"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _vae(kind: str):
    """A tiny AutoencoderKLWan: Wan2.1-style (8x, I2V-A14B) or Wan2.2-style residual with 2x2 patch (16x, TI2V-5B)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if kind == "i2v":
        return AutoencoderKLWan(base_dim=8, z_dim=4, latents_mean=MEAN, latents_std=STD).eval()
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=MEAN,
                            latents_std=STD).eval()


def _write_images(d: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)

    def picture(w: int, h: int, channels: int = 3) -> np.ndarray:  # smooth-ish random content
        small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), channels), dtype=np.uint8)
        return np.asarray(Image.fromarray(small.squeeze()).resize((w, h), Image.BILINEAR))

    d.mkdir(parents=True)
    for name, (w, h, mode) in GOOD.items():
        Image.fromarray(picture(w, h, {"RGB": 3, "RGBA": 4, "L": 1}[mode])).save(d / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x40 landscape, shown rotated: 40x80 portrait (load_image applies it)
    Image.fromarray(picture(80, 40)).save(d / "exif.jpg", exif=exif)
    Image.fromarray(picture(12, 12)).save(d / "tiny.png")  # would be upscaled 2.7x to 32x32
    Image.fromarray(picture(200, 20)).save(d / "banner.png")  # aspect 10: no bucket fits
    good = (d / "square.png").read_bytes()
    (d / "corrupt.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (d / "notanimage.png").write_bytes(b"hello")


def _rows(d: Path) -> list[dict]:
    names = ["wide.png", "tall.jpg", "corrupt.png", "square.png", "missing.png", "tiny.png", "rgba.png",
             "banner.png", "gray.png", "exif.jpg", "slim.png", "notanimage.png"]
    rows = [{"prompt": f"a photo number {i}", "image": n} for i, n in enumerate(names)]
    rows.insert(3, {"prompt": "   ", "image": "square.png"})  # blank prompt: counted as blank
    rows.append({"prompt": "a row without an image"})
    rows.append({"prompt": "absolute path", "image": str((d / "square.png").resolve())})
    return rows


def _build(root: Path, kind: str, out: Path | None = None, extra: tuple[str, ...] = (),
           code: int = 0) -> tuple[Path, str]:
    """Shards through the command-line tool, which must exit with ``code``; returns (shard dir, what it printed)."""
    from tools.make_prompt_shards import main

    images, out = root / "images", out or root / f"shards-{kind}"
    args = ["--out", str(out), "--encoder", "umt5", "--encoder-path", str(root / "enc"),
            "--max-length", "16", "--dtype", "fp32", "--samples-per-shard", "2", "--no-progress",
            "--conditioning", kind, "--buckets", BUCKETS, "--num-frames", str(NUM_FRAMES), "--device", "cpu", *extra]
    if kind == "i2v":  # a diffusers pipeline folder (vae/), a JSONL list elsewhere, paths relative to --images
        args += ["--vae", str(root / "pipe"), "--prompts", str(root / "pairs.jsonl"), "--images", str(images)]
    else:  # the vae folder itself, a CSV list next to the images
        args += ["--vae", str(root / "vae-ti2v"), "--prompts", str(images / "pairs.csv")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args) == code, err.getvalue()
    return out, err.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import csv

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("images")
    _write_images(root / "images")
    rows = _rows(root / "images")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with open(root / "images" / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "image"])
        w.writeheader()
        w.writerows(rows)
    _vae("i2v").save_pretrained(root / "pipe" / "vae")
    _vae("ti2v").save_pretrained(root / "vae-ti2v")
    save_tiny_encoder("umt5", root / "enc", "pipeline")
    return {"root": root, **{k: _build(root, k) for k in ("i2v", "ti2v")}}


def _samples(shards: Path) -> list[dict]:
    urls = sorted(str(p) for p in shards.glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _pipeline(root: Path, kind: str, transformer=None):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    vae = (AutoencoderKLWan.from_pretrained(root / "pipe", subfolder="vae") if kind == "i2v"
           else AutoencoderKLWan.from_pretrained(root / "vae-ti2v"))
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                                   transformer=transformer, expand_timesteps=kind == "ti2v")


def _user_image(pipe, root: Path, image: str, h: int, w: int):
    """What a user hands the pipeline: diffusers' load_image, then its processor's crop-resize to (h, w)."""
    from diffusers.utils import load_image

    path = Path(image) if Path(image).is_absolute() else root / "images" / image
    return pipe.video_processor.resize(load_image(str(path)), h, w, resize_mode="crop")


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_stored_conditioning_equals_the_pipelines(built, kind):
    """Every stored sample against WanImageToVideoPipeline.prepare_latents on the same image (diffusers' code)."""
    root, (shards, _) = built["root"], built[kind]
    pipe = _pipeline(root, kind)
    samples = _samples(shards)
    assert len(samples) == 8
    lat_key, mask_key = COND_KEYS[kind]
    for s in samples:
        meta, cond = json.loads(s["json"]), cond_from_bytes(s["cond.safetensors"], kind)
        h, w = meta["height"], meta["width"]
        assert meta["bucket"] == f"{h}x{w}" == BUCKET_OF[Path(meta["image"]).name]
        image = pipe.video_processor.preprocess(_user_image(pipe, root, meta["image"], h, w), height=h, width=w)
        out = pipe.prepare_latents(image.to(torch.float32), 1, 4, h, w, NUM_FRAMES, torch.float32, "cpu",
                                   torch.Generator().manual_seed(0))
        assert cond[mask_key].dtype == torch.uint8 and cond[lat_key].dtype == torch.float32
        if kind == "i2v":
            _, condition = out
            assert torch.equal(torch.cat([cond[mask_key].float(), cond[lat_key]])[None], condition)
            assert cond[lat_key].shape == (4, 2, h // 8, w // 8)
        else:
            _, latent_condition, first_frame_mask = out
            assert torch.equal(cond[lat_key][None], latent_condition)
            assert torch.equal(cond[mask_key].float()[None], first_frame_mask)
            assert cond[lat_key].shape == (4, 1, h // 16, w // 16)


def test_full_i2v_call_sees_the_stored_condition(built):
    """One whole WanImageToVideoPipeline.__call__ (tiny transformer, the stored text embeddings): the
    transformer's input channels after the noise are exactly cat(cond_mask, cond_latents) as stored."""
    from diffusers import WanTransformer3DModel

    root, (shards, _) = built["root"], built["i2v"]
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=12, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32, cross_attn_norm=True).eval()
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True)
    pipe = _pipeline(root, "i2v", transformer)
    sample = next(s for s in _samples(shards) if json.loads(s["json"])["image"] == "exif.jpg")
    meta, cond = json.loads(sample["json"]), cond_from_bytes(sample["cond.safetensors"], "i2v")
    h, w = meta["height"], meta["width"]
    pipe(image=_user_image(pipe, root, meta["image"], h, w), prompt_embeds=embeds_from_bytes(sample["safetensors"])[None],
         height=h, width=w,
         num_frames=NUM_FRAMES, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert len(seen) == 1 and seen[0].shape == (1, 12, 2, h // 8, w // 8)
    assert torch.equal(seen[0][0, 4:], torch.cat([cond["cond_mask"].float(), cond["cond_latents"]]))


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_bad_images_are_skipped_counted_and_reported(built, kind):
    shards, printed = built[kind]
    index = json.loads((shards / "index.json").read_text())
    skipped = index["conditioning"]["skipped"]
    assert skipped["counts"] == {"missing": 2, "unreadable": 2, "aspect": 1, "tiny": 1}
    assert (index["count"], index["blank_lines"]) == (8, 1)
    examples = " ".join(e for v in skipped["examples"].values() for e in v)
    for name in ("missing.png", "(no image)", "corrupt.png", "notanimage.png", "banner.png", "tiny.png"):
        assert name in examples
    assert "6 image rows skipped" in printed and "unreadable: 2" in printed and "tiny: 1" in printed
    assert "32x64: 2, 64x32: 3, 32x32: 3" in printed


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_shards_hold_one_bucket_each_and_the_index_records_how(built, kind):
    shards, _ = built[kind]
    index = json.loads((shards / "index.json").read_text())
    cond = index["conditioning"]
    assert (cond["kind"], cond["num_frames"], cond["latent_frames"], cond["first_frame_only"]) == (kind, 5, 2, True)
    assert [b["name"] for b in cond["buckets"]] == BUCKETS.split(",")
    assert [b["count"] for b in cond["buckets"]] == [2, 3, 3]
    assert len(cond["vae"]["config_sha256"]) == 64 and cond["vae"]["subfolder"] == ("vae" if kind == "i2v" else None)
    assert [(s["bucket"], s["start"], s["count"]) for s in index["shards"]] == [
        ("32x64", 0, 2), ("64x32", 2, 2), ("64x32", 4, 1), ("32x32", 5, 2), ("32x32", 7, 1)]
    for s in index["shards"]:
        with tarfile.open(shards / s["name"]) as tar:
            exts = Counter(m.name.split(".", 1)[1] for m in tar.getmembers())
        assert exts == {e: s["count"] for e in ("txt", "safetensors", "json", "cond.safetensors")}
    samples = _samples(shards)
    assert [json.loads(x["json"])["bucket"] for x in samples] == ["32x64"] * 2 + ["64x32"] * 3 + ["32x32"] * 3
    assert all(embeds_from_bytes(x["safetensors"]).shape[1] == 24 for x in samples)


def test_rerun_resumes_and_changed_settings_are_refused(built, tmp_path):
    root = built["root"]
    shards = shutil.copytree(built["i2v"][0], tmp_path / "copy")
    before = json.loads((shards / "index.json").read_text())
    (shards / "shard-000002.tar").unlink()
    _build(root, "i2v", out=shards)  # the scan comes from images.json, one shard is encoded again
    assert (shards / "shard-000002.tar").is_file()
    assert json.loads((shards / "index.json").read_text())["hash"] == before["hash"]  # byte-identical rewrite
    _, err = _build(root, "i2v", out=shards, extra=("--aspect-tolerance", "0.5"), code=2)  # a user error: one line
    last = err.strip().splitlines()[-1]  # (after the encoder's own loading bar)
    assert last.startswith("make_prompt_shards: ") and re.search("other settings.*conditioning", last), err
    assert "Traceback" not in err


@pytest.mark.parametrize("dp_size", [1, 2])
def test_loader_batches_hold_one_bucket_and_the_conditioning(built, dp_size):
    shards, _ = built["i2v"]
    stored = {int(json.loads(s["json"])["index"]): cond_from_bytes(s["cond.safetensors"], "i2v")
              for s in _samples(shards)}
    batches = []
    for rank in range(dp_size):
        loader = PromptLoader(PromptDataConfig(shards=str(shards), batch_size=2, model="wan", max_length=16,
                                               seed=3, conditioning="i2v", num_frames=NUM_FRAMES),
                              dp_rank=rank, dp_size=dp_size)
        mine = list(loader)
        assert len(mine) == len(loader)
        batches.append(mine)
    for step in zip(*batches):  # every rank trains the same bucket at the same step
        assert len({b["bucket"][0] for b in step}) == 1
    real = Counter()
    for b in (b for rank in batches for b in rank):
        (h, w), n = (int(b["height"][0]), int(b["width"][0])), len(b["index"])
        assert set(b["bucket"]) == {f"{h}x{w}"}
        assert b["cond_latents"].shape == (n, 4, 2, h // 8, w // 8) and b["cond_latents"].dtype == torch.float32
        assert b["cond_mask"].shape == (n, 4, 2, h // 8, w // 8) and b["cond_mask"].dtype == torch.float32
        assert b["text_embeds"].shape == (n, 16, 24) and len(b["image"]) == n
        for i, idx in enumerate(b["index"].tolist()):
            assert torch.equal(b["cond_latents"][i], stored[idx]["cond_latents"])
            assert torch.equal(b["cond_mask"][i], stored[idx]["cond_mask"].float())
        real.update(i for i, p in zip(b["index"].tolist(), b["is_padding"].tolist()) if not p)
    assert real == Counter(range(8)), "every sample exactly once as a real sample"


def test_loader_checks_kind_frames_and_serves_ti2v(built):
    shards, _ = built["ti2v"]
    with pytest.raises(ValueError, match="hold 'ti2v' conditioning but data.conditioning is 'i2v'"):
        PromptLoader(PromptDataConfig(shards=str(shards), batch_size=2, model="wan", conditioning="i2v"))
    with pytest.raises(ValueError, match="encoded for 5 frames but data.num_frames is 81"):
        PromptLoader(PromptDataConfig(shards=str(shards), batch_size=2, model="wan", num_frames=81))
    loader = PromptLoader(PromptDataConfig(shards=str(shards), batch_size=3, model="wan", max_length=16,
                                           mode="resample"), dp_rank=0, dp_size=1)
    for _, b in zip(range(6), loader):
        h, w = int(b["height"][0]), int(b["width"][0])
        assert b["first_frame_latents"].shape == (3, 4, 1, h // 16, w // 16)
        assert b["first_frame_mask"].shape == (3, 1, 2, h // 16, w // 16)
        assert (b["first_frame_mask"][:, :, 0] == 0).all() and (b["first_frame_mask"][:, :, 1] == 1).all()
        assert len(set(b["bucket"])) == 1


def test_corrupt_shard_is_filled_from_its_own_bucket(built, tmp_path):
    shards = shutil.copytree(built["i2v"][0], tmp_path / "ds")
    bad = shards / "shard-000001.tar"  # 64x32, two samples
    bad.write_bytes(bad.read_bytes()[:1000])
    loader = PromptLoader(PromptDataConfig(shards=str(shards), batch_size=2, model="wan", max_length=16,
                                           max_bad_shard_fraction=0.5), dp_rank=0, dp_size=1)
    batches = list(loader)
    assert list(loader.corrupt_shards) == ["shard-000001.tar"]
    for b in batches:
        assert len(set(b["bucket"])) == 1 and b["cond_latents"].shape[0] == 2
    filled = [i for b in batches for i, p in zip(b["index"].tolist(), b["is_padding"].tolist()) if p]
    assert 4 in filled and not {2, 3} & {i for b in batches for i in b["index"].tolist()}


@pytest.mark.parametrize("counts, groups", [([2, 2, 1, 2, 1], [0, 1, 1, 2, 2]), ([5, 1, 7], [1, 0, 1]), ([3], [0])])
@pytest.mark.parametrize("dp_size, batch_size", [(1, 1), (2, 2), (3, 2)])
def test_grouped_plan_once_per_epoch_and_one_group_per_batch(counts, groups, dp_size, batch_size):
    starts = np.cumsum([0] + counts[:-1]).tolist()
    plan = GroupedEpochPlan(counts, groups, seed=1, epoch=0, dp_size=dp_size, batch_size=batch_size)
    real, batches_per_rank = Counter(), set()
    for rank in range(dp_size):
        stream = []
        for seg in plan.segments(rank):
            assert seg.position == len(stream)
            stream += [(starts[seg.shard] + int(i), seg.padding, groups[seg.shard]) for i in local_indices(seg, counts)]
        batches = [stream[k:k + batch_size] for k in range(0, len(stream), batch_size)]
        batches_per_rank.add(len(batches))
        for k, batch in enumerate(batches):
            assert {g for _, _, g in batch} == {plan.labels[k]}
        real.update(i for i, pad, _ in stream if not pad)
    assert batches_per_rank == {plan.batches_per_rank}
    assert real == Counter(range(sum(counts)))
    one = EpochPlan([counts[0]], seed=1, epoch=0, dp_size=1, batch_size=1)  # ungrouped plans unchanged
    assert [s.shard for s in one.segments(0)] == [0]


def test_resample_whole_batches_never_span_two_shards():
    counts, B = [3, 5, 1], 2
    it = ResamplePlan(counts, seed=0, batch_size=B, whole_batches=True).segments(0)
    pos, owner = 0, {}
    for seg in (next(it) for _ in range(40)):
        assert seg.position == pos
        for p in range(seg.position, seg.end):
            owner.setdefault(p // B, set()).add(seg.shard)
        pos = seg.end
    assert all(len(s) == 1 for k, s in owner.items() if k < pos // B)


def test_bucket_choice_and_parsing():
    buckets = parse_buckets("480x832, 832x480,624x624")
    assert [b.name for b in buckets] == ["480x832", "832x480", "624x624"]
    assert choose_bucket(1920, 1080, buckets, 0.25)[0].name == "480x832"  # 16:9 landscape
    assert choose_bucket(1080, 1920, buckets, 0.25)[0].name == "832x480"
    bucket, mismatch = choose_bucket(1024, 768, buckets, 0.25)  # 4:3: 30% off 480x832, 33% off square
    assert bucket.name == "480x832" and mismatch == pytest.approx((832 / 480) / (4 / 3)) and mismatch > 1.25
    for bad in ("480", "480x", "x832", "0x8", "480x832,480x832", ""):
        with pytest.raises(ValueError):
            parse_buckets(bad)


def test_resume_with_workers_gives_the_unstopped_batches(built):
    shards, _ = built["i2v"]

    def loader(workers: int) -> PromptLoader:
        return PromptLoader(PromptDataConfig(shards=str(shards), batch_size=2, model="wan", max_length=16, seed=5,
                                             num_workers=workers), dp_rank=0, dp_size=1)

    def ids(batches) -> list[tuple[str, list[int]]]:
        return [(b["bucket"][0], b["index"].tolist()) for b in batches]

    want = ids(loader(0))
    first = loader(0)
    got = ids(b for _, b in zip(range(2), first))
    again = loader(2)
    again.load_state_dict(first.state_dict())
    assert got + ids(again) == want and len(want) == 5  # buckets of 2, 3, 3 samples: 1 + 2 + 2 batches
    assert want != sorted(want), "buckets are interleaved in a drawn order"
