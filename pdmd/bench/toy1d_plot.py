"""The trajectory picture of `pdmd toy-1d`, drawn with Pillow (already installed with diffusers) so the
toy needs no plotting library. One panel per row of the toy's table: time runs from t = 1 (left) to
t = 0 (right); the part left of the dashed line (t > s) is the panel's field, the faded part to its
right is the analytic field carrying the t = s end points to t = 0; colour marks the atom reached."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from pdmd.bench.toy1d import ToyResult

PANEL_W, PANEL_H, MARGIN = 380, 320, 36
X_RANGE = (-2.6, 3.6)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
TITLES = {"analytic": "analytic field", "subinterval": "subinterval target", "naive": "naive target eps - x_s"}


def _fade(colour: tuple[int, int, int], amount: float = 0.6) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * amount) for c in colour)


def save_trajectory_png(result: ToyResult, path: Path | str, n_lines: int = 64) -> Path:
    """Write the panels side by side; ``n_lines`` trajectories per panel (the same noise in each)."""
    from pdmd.bench.toy1d import ATOMS  # lazy: pdmd/bench/toy1d.py imports this module

    path = Path(path)
    rows = list(result.rows.values())
    grid = result.grid.tolist()
    s = result.config.s
    image = Image.new("RGB", (PANEL_W * len(rows), PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    inner_w, inner_h = PANEL_W - 2 * MARGIN, PANEL_H - 2 * MARGIN

    for p, row in enumerate(rows):
        left = p * PANEL_W + MARGIN

        def px(t: float, x: float, left: int = left) -> tuple[float, float]:
            y = (x - X_RANGE[0]) / (X_RANGE[1] - X_RANGE[0])
            return left + (1 - t) * inner_w, MARGIN + (1 - y) * inner_h

        draw.rectangle([left, MARGIN, left + inner_w, MARGIN + inner_h], outline=(120, 120, 120))
        draw.text((left, 10), TITLES.get(row.name, row.name), fill="black")
        draw.text((left - 4, MARGIN + inner_h + 6), "t=1", fill="black")
        draw.text((left + inner_w - 16, MARGIN + inner_h + 6), "t=0", fill="black")
        for a in ATOMS:
            _, y = px(0.0, a)
            draw.text((left - 28, y - 6), f"{a:g}", fill="black")
        traj = row.trajectory[:, :n_lines]
        for j in range(traj.shape[1]):
            xs = traj[:, j].tolist()
            atom = min(range(len(ATOMS)), key=lambda i, x=xs[-1]: abs(x - ATOMS[i]))
            points = [px(t, x) for t, x in zip(grid, xs)]
            split = next(i for i, t in enumerate(grid) if t <= s)
            draw.line(points[: split + 1], fill=COLOURS[atom], width=1)
            draw.line(points[split:], fill=_fade(COLOURS[atom]), width=1)
        x_s, _ = px(s, 0.0)
        for y in range(MARGIN, MARGIN + inner_h, 8):
            draw.line([(x_s, y), (x_s, y + 4)], fill=(60, 60, 60))
        label = f"err {row.velocity_error:.3f}  W1 {row.w1_at_s:.3f}" if row.name != "analytic" else ""
        draw.text((left, MARGIN + inner_h + 20), f"t = {s:g} dashed   {label}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
