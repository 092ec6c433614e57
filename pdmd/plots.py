"""Line plots with Pillow (installed with diffusers), so the demo needs no plotting library."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def save_loss_curves(curves: Mapping[str, Sequence[float]], path: Path | str, width: int = 900,
                     panel_h: int = 200) -> Path:
    """One panel per curve (its own y range, log scale when the values span more than a decade), x = step."""
    path = Path(path)
    names = [n for n, v in curves.items() if any(math.isfinite(x) for x in v)]
    image = Image.new("RGB", (width, max(1, len(names)) * panel_h), "white")
    draw = ImageDraw.Draw(image)
    margin_l, margin_r, margin_y = 70, 20, 24
    for row, name in enumerate(names):
        values = [float(v) for v in curves[name]]
        finite = [v for v in values if math.isfinite(v)]
        lo, hi = min(finite), max(finite)
        log = lo > 0 and hi / lo > 10
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        a, b = f(lo), f(hi)
        b = b if b > a else a + 1e-12
        top, bottom = row * panel_h + margin_y, (row + 1) * panel_h - margin_y
        right = width - margin_r
        draw.rectangle([margin_l, top, right, bottom], outline=(150, 150, 150))
        draw.text((margin_l, top - 16), f"{name} ({'log ' if log else ''}y)", fill="black")
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.3g}", fill="black")
        n = max(len(values) - 1, 1)
        points = [(margin_l + (right - margin_l) * i / n, bottom - (bottom - top) * (f(v) - a) / (b - a))
                  for i, v in enumerate(values) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=COLOURS[row % len(COLOURS)], width=2)
        draw.text((right - 60, bottom + 4), f"{len(values)} steps", fill="black")
    image.save(path)
    return path
