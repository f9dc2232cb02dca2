"""Pictures for people: the loss curve and a labelled image grid, drawn with Pillow only.

The grid here is a plain labelled layout (rows x columns of equal-size images); the checkpoint x weight planning
(axis parsing, S/R, size guard) lives with the grid Script.
"""

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


def labelled_grid(images: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str],
                  col_labels: Sequence[str], title: str | None = None) -> Image.Image:
    """Rows x columns of equal-size images with labels on both axes.

    Args:
        images: ``images[r][c]``; None draws a grey "missing" cell.
        row_labels, col_labels: one text per row / column.
        title: optional line above the grid.

    Returns:
        The grid as one RGB image (cell size = the first image's size).

    Raises:
        ValueError: label counts do not match the images, or no image at all.
    """
    rows, cols = len(images), len(images[0]) if images else 0
    if rows == 0 or cols == 0 or len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"grid of {rows}x{cols} images with {len(row_labels)} row and {len(col_labels)} column "
                         "labels")
    first = next((im for row in images for im in row if im is not None), None)
    if first is None:
        raise ValueError("no image to put in the grid")
    w, h = first.size
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, t, font)[0] for t in row_labels) + 16
    title_h = 28 if title else 0
    label_h = 28
    grid = Image.new("RGB", (label_w + cols * w, title_h + label_h + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((8, 6), title, fill="black", font=_font(16))
    for c, text in enumerate(col_labels):
        tw, _ = _text_size(draw, text, font)
        draw.text((label_w + c * w + (w - tw) // 2, title_h + 6), text, fill="black", font=font)
    for r, text in enumerate(row_labels):
        _, th = _text_size(draw, text, font)
        draw.text((8, title_h + label_h + r * h + (h - th) // 2), text, fill="black", font=font)
        for c in range(cols):
            im = images[r][c]
            box = (label_w + c * w, title_h + label_h + r * h)
            if im is None:
                draw.rectangle([box[0], box[1], box[0] + w - 1, box[1] + h - 1], fill="#bbbbbb")
                draw.text((box[0] + 8, box[1] + 8), "missing", fill="black", font=font)
            else:
                grid.paste(im.convert("RGB").resize((w, h)), box)
    return grid
