"""The loss curve as a picture, drawn with Pillow only (the checkpoint x weight grid is in :mod:`lib_lora.grid`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 14):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def loss_plot(steps: Sequence[int], series: dict[str, Sequence[float]], width: int = 800, height: int = 400,
              title: str = "training loss") -> Image.Image:
    """Line chart of one or more series over optimizer steps.

    Args:
        steps: x values (optimizer steps), same length as each series.
        series: label -> y values (e.g. {"loss": ..., "average": ...}); non-finite values are skipped.
        width, height: image size in pixels.

    Returns:
        An RGB image with axes, min/max labels and a legend.

    Raises:
        ValueError: no steps, or a series of another length.
    """
    if not steps:
        raise ValueError("nothing to plot: no steps")
    for label, ys in series.items():
        if len(ys) != len(steps):
            raise ValueError(f"series {label!r} has {len(ys)} values for {len(steps)} steps")
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)
    left, right, top, bottom = 70, width - 20, 40, height - 40
    values = [y for ys in series.values() for y in ys if math.isfinite(y)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = min(steps), max(steps)
    span = max(x1 - x0, 1)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / span * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 10), title, fill="black", font=_font(16))
    for frac in (0.0, 0.5, 1.0):
        y = lo + frac * (hi - lo)
        _, py = xy(x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((5, py - 7), f"{y:.4g}", fill="black", font=font)
    for x in (x0, x1):
        px, _ = xy(x, lo)
        draw.text((px - 10, bottom + 8), str(x), fill="black", font=font)
    draw.text(((left + right) // 2 - 15, bottom + 20), "step", fill="black", font=font)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (label, ys) in enumerate(series.items()):
        color = colors[i % len(colors)]
        points = [xy(x, y) for x, y in zip(steps, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.line([right - 150, top + 12 + 16 * i, right - 130, top + 12 + 16 * i], fill=color, width=3)
        draw.text((right - 125, top + 5 + 16 * i), label, fill="black", font=font)
    return img
