"""Image lists for image-conditioned shards: {prompt, image} rows, resolution buckets, and the scan.

The scan looks at every image once, BEFORE any shard is written, and either gives it a bucket (the one
with the closest aspect ratio) or a skip reason. Bad input (a missing path, an unreadable or truncated
file, an aspect ratio no bucket fits, an image too small for its bucket) is therefore counted and
reported up front and never stops a shard set half-way. The scan's result is saved in the output
folder (``images.json``), so a resumed build neither decodes every image again nor can lay the
samples out differently from the run it resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.format import canonical_json, write_json_atomic

SCAN_FILE = "images.json"
SCAN_VERSION = 1
SKIP_REASONS = ("missing", "unreadable", "aspect", "tiny")  # report order
MAX_EXAMPLES = 5  # examples kept per skip reason


@dataclass(frozen=True)
class Bucket:
    """One training resolution, ``height x width`` in pixels (the pipelines' height/width arguments)."""

    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(spec: str | Sequence[str]) -> list[Bucket]:
    """``"480x832,832x480"`` (HEIGHTxWIDTH, comma separated) or a list of such strings -> buckets, in order."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    buckets = []
    for item in items:
        h, sep, w = item.lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
            raise ValueError(f"bucket {item!r} is not HEIGHTxWIDTH in pixels (e.g. 480x832 for landscape 480p)")
        buckets.append(Bucket(int(h), int(w)))
    if not buckets:
        raise ValueError("no resolution buckets given: pass e.g. --buckets 480x832,832x480,624x624")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"--buckets lists a resolution twice: {[b.name for b in buckets]}")
    return buckets


def check_bucket_multiples(buckets: Sequence[Bucket], multiple: int) -> None:
    """Sides must be multiples of the VAE's spatial factor times the transformer's 2x2 patch, or the
    pipeline would silently shrink the frame at inference and the latents would not line up."""
    bad = [b.name for b in buckets if b.height % multiple or b.width % multiple]
    if bad:
        raise ValueError(f"buckets {bad} have sides that are not multiples of {multiple} (the VAE's spatial factor x "
                         "the transformer's 2x2 patch): round them, e.g. 480x832 for Wan's 8x VAE")


def choose_bucket(width: int, height: int, buckets: Sequence[Bucket], tolerance: float) -> tuple[Bucket, float]:
    """The bucket with the closest aspect ratio (first wins a tie) and the mismatch ratio (>= 1).

    The image fits when the mismatch is at most ``1 + tolerance``: then the centre crop removes at
    most ``tolerance / (1 + tolerance)`` of one side.
    """
    log_ar = math.log(width / height)
    best = min(buckets, key=lambda b: abs(log_ar - math.log(b.aspect)))
    return best, math.exp(abs(log_ar - math.log(best.aspect)))


@dataclass
class ImageRow:
    """One row of the list: the prompt, the image as written, where that resolves to, its source line."""

    prompt: str
    image: str
    path: Path | None
    line: int


@dataclass
class ImageList:
    rows: list[ImageRow] = field(default_factory=list)
    blank_lines: int = 0  # rows without a prompt (skipped, as in a plain prompt file)
    sha256: str = ""  # of the list file's bytes


def read_image_list(path: str | Path, images_dir: str | Path | None = None) -> ImageList:
    """Read a ``.jsonl`` (``{"prompt": ..., "image": ...}`` a line) or ``.csv`` (header with ``prompt``
    and ``image`` columns) list. Relative image paths resolve against ``images_dir`` if given, else the
    list file's folder. Rows without an image are kept and skipped by the scan as ``missing``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist: pass --prompts a .jsonl or .csv with prompt "
                                "and image fields")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"image list {path} is not UTF-8 ({e})") from e
    base = Path(images_dir) if images_dir is not None else path.parent
    if images_dir is not None and not base.is_dir():
        raise FileNotFoundError(f"--images {base} is not a folder")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(text, str(path))
    elif suffix == ".csv":
        records = _csv_records(text, str(path))
    else:
        raise ValueError(f"{path}: image-conditioned shards need a .jsonl or .csv list with prompt and image fields "
                         "(a plain .txt list has no images)")
    out = ImageList(sha256=hashlib.sha256(raw).hexdigest())
    for line, prompt, image in records:
        if not prompt.strip():
            out.blank_lines += 1
            continue
        image = image.strip()
        resolved = (base / image) if image else None
        out.rows.append(ImageRow(prompt, image, resolved, line))
    return out


def _jsonl_records(text: str, source: str) -> list[tuple[int, str, str]]:
    rows = text.split("\n")
    records = []
    for lineno, raw in enumerate(rows, start=1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e.msg}); each line must be an object like "
                             "{\"prompt\": \"a cat\", \"image\": \"cat.jpg\"}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{source}:{lineno}: expected an object with a string \"prompt\" field, got {line[:80]!r}")
        image = obj.get("image")
        records.append((lineno, obj["prompt"], image if isinstance(image, str) else ""))
    return records


def _csv_records(text: str, source: str) -> list[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"prompt", "image"} <= set(reader.fieldnames):
        raise ValueError(f"{source}: the CSV header must name a 'prompt' and an 'image' column, got "
                         f"{reader.fieldnames}")
    return [(reader.line_num, row["prompt"] or "", row["image"] or "") for row in reader]


def load_rgb(path: Path):
    """Decode an image exactly as diffusers' ``load_image`` does (EXIF orientation applied, RGB)."""
    from diffusers.utils import load_image

    return load_image(str(path))


@dataclass
class ScanResult:
    """Kept samples in shard order (grouped by bucket, in --buckets order, list order within) and skips."""

    samples: list[dict[str, Any]]  # {"row": row number in ImageList.rows, "bucket": name, "size": [w, h]}
    skipped: dict[str, int]
    examples: dict[str, list[str]]
    settings: dict[str, Any]

    def summary(self) -> str:
        """One line per skip reason with a few examples; what the tool prints at the end."""
        total = sum(self.skipped.values())
        if not total:
            return "no images skipped"
        lines = [f"{total} image rows skipped:"]
        for reason in SKIP_REASONS:
            if self.skipped.get(reason):
                lines.append(f"  {reason}: {self.skipped[reason]}, e.g. " + "; ".join(self.examples[reason]))
        return "\n".join(lines)

    def report(self) -> dict[str, Any]:
        """What the index records about the skipped rows."""
        return {"counts": self.skipped, "examples": self.examples}


def scan_images(images: ImageList, buckets: Sequence[Bucket], *, aspect_tolerance: float = 0.25,
                min_image_fraction: float = 0.5, cache_dir: str | Path | None = None,
                progress: bool = True) -> ScanResult:
    """Decode every image once, give it a bucket or a skip reason; reuse ``cache_dir/images.json`` if it
    was made from the same list and settings (a resumed build then lays samples out identically)."""
    if aspect_tolerance < 0 or not 0 < min_image_fraction <= 1:
        raise ValueError(f"aspect tolerance ({aspect_tolerance}) must be >= 0 and the minimum image fraction "
                         f"({min_image_fraction}) in (0, 1]")
    settings = {"list_sha256": images.sha256, "buckets": [b.name for b in buckets],
                "aspect_tolerance": aspect_tolerance, "min_image_fraction": min_image_fraction,
                "paths_sha256": hashlib.sha256(canonical_json([str(r.path) for r in images.rows])).hexdigest()}
    cache = Path(cache_dir) / SCAN_FILE if cache_dir is not None else None
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("version") == SCAN_VERSION and saved.get("settings") == settings:
            return ScanResult(saved["samples"], saved["skipped"], saved["examples"], settings)
    from tqdm import tqdm

    by_bucket: dict[str, list[dict[str, Any]]] = {b.name: [] for b in buckets}
    skipped = {r: 0 for r in SKIP_REASONS}
    examples: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}

    def skip(reason: str, row: ImageRow, why: str) -> None:
        skipped[reason] += 1
        if len(examples[reason]) < MAX_EXAMPLES:
            examples[reason].append(f"line {row.line}: {row.image or '(no image)'} ({why})")

    for i, row in enumerate(tqdm(images.rows, unit="image", desc="scanning images", disable=not progress,
                                 file=sys.stderr)):
        if row.path is None or not row.path.is_file():
            skip("missing", row, "no image field" if row.path is None else "no such file")
            continue
        try:
            width, height = load_rgb(row.path).size
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBomb...)
            skip("unreadable", row, f"{type(e).__name__}: {str(e)[:80]}")
            continue
        bucket, mismatch = choose_bucket(width, height, buckets, aspect_tolerance)
        if mismatch > 1 + aspect_tolerance:
            skip("aspect", row, f"{width}x{height} px, aspect {width / height:.2f}; closest bucket {bucket.name} "
                 f"is off by {mismatch - 1:.0%}")
            continue
        scale = max(bucket.width / width, bucket.height / height)  # resize factor that covers the bucket
        if scale * min_image_fraction > 1:
            skip("tiny", row, f"{width}x{height} px, would be upscaled {scale:.1f}x to cover {bucket.name}")
            continue
        by_bucket[bucket.name].append({"row": i, "bucket": bucket.name, "size": [width, height]})
    samples = [s for b in buckets for s in by_bucket[b.name]]
    result = ScanResult(samples, skipped, {k: v for k, v in examples.items() if v}, settings)
    if cache is not None and not cache.exists():  # another build's scan stays: its build.json refuses this one
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {"version": SCAN_VERSION, "settings": settings, "samples": samples,
                                  "skipped": skipped, "examples": result.examples})
    return result
