"""Pure helpers of the WebUI grid Script (``scripts/lib_lora_grid.py``) and its X/Y/Z plot axes. No WebUI import.

- runs in the Lora folder, recursively (the trainer writes into ``<Lora>/<subdir>/<name>``; the WebUI's
  ``networks.list_available_networks`` walks sub-folders and names each file by its stem);
- a cheap check that a LoRA file can be used before a cell is generated: the real WebUI does not fail on a missing
  or broken file (``networks.load_networks`` logs "Networks not found" / "Failed to load network" and generates
  without it), so the Script checks first and marks the cell instead of drawing a LoRA-less image;
- the annotation band ``modules/images.py draw_grid_annotations`` adds (for the size guard), marked-cell and
  score overlays, the infotext fields;
- the apply functions of the "LoRA checkpoint" / "LoRA weight" X/Y/Z axes (they edit ``p.prompt`` of the
  ``copy(p)`` that ``scripts/xyz_grid.py`` makes per cell).

Sizes are in pixels.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import ConfigError
from .grid import format_weight
from .prompt_syntax import LORA_KINDS, format_lora_tag, parse_lora_tags
from .runs import LORA_EXTENSIONS, Run, group_runs

__all__ = [
    "annotation_band",
    "apply_checkpoint_axis",
    "apply_weight_axis",
    "checkpoint_problem",
    "find_lora_files",
    "list_runs",
    "marked_cell",
    "score_overlay",
]


def list_runs(lora_dir: str | os.PathLike[str]) -> dict[str, Run]:
    """Every run in ``lora_dir`` and its sub-folders (hidden folders skipped), keyed ``"name"`` at the top,
    ``"sub/dir/name"`` below, and ``"sub/name"`` for a run in a folder of its own name (the trainer writes
    ``<Lora>/<subdir>/<name>/``); sorted. An absent folder gives ``{}``."""
    base = Path(os.fspath(lora_dir))
    if not base.is_dir():
        return {}
    out: dict[str, Run] = {}
    for folder, dirs, _ in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(base)
        for name, run in group_runs(folder).items():
            if rel == Path("."):
                key = name
            elif rel.name == name:  # <Lora>/<subdir>/<name>/<name>-000001.safetensors (the trainer's layout)
                key = rel.as_posix()
            else:
                key = f"{rel.as_posix()}/{name}"
            out[key] = run
    return dict(sorted(out.items()))


def find_run_by_name(runs: Mapping[str, Run], name: str) -> Run | None:
    """The run keyed ``name`` in :func:`list_runs` (``"lib_lora/mydog"``), else the only run whose key ends in
    ``/name`` or whose own name is ``name`` (the trainer tab's "Send to grid" gives the bare name); None when there
    is none or several. Pure."""
    name = str(name).strip()
    if name in runs:
        return runs[name]
    hits = [r for key, r in runs.items() if key.endswith("/" + name) or r.name == name]
    return hits[0] if len(hits) == 1 else None


def prompt_names_run(run: Run, prompt: str | None, sr_values: str | None) -> bool:
    """True when a Prompt S/R grid is about ``run``: ``<lora:NAME`` of it in the prompt, or one of its file stems in
    the prompt or among the S/R checkpoint values (then the run's trigger words belong to the grid). Pure."""
    text = f"{prompt or ''}\n{sr_values or ''}"
    return f"<lora:{run.name}" in text or any(stem in text for stem in run.stems)


def find_lora_files(lora_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """{stem: path} of the LoRA files under ``lora_dir`` (recursive, like ``networks.list_available_networks``;
    the first by sorted path wins a shared stem)."""
    out: dict[str, Path] = {}
    base = Path(os.fspath(lora_dir))
    if not base.is_dir():
        return out
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in LORA_EXTENSIONS and not f.startswith(".") and stem not in out:
                out[stem] = Path(folder) / f
    return out


def checkpoint_problem(path: str | os.PathLike[str] | None) -> str | None:
    """None when the LoRA file looks usable, else a short mark: ``"missing"`` (no such file) or ``"unreadable"``
    (cannot be opened, empty, or a ``.safetensors`` whose 8-byte length + JSON header does not parse). Reads only
    the header."""
    if path is None:
        return "missing"
    p = Path(os.fspath(path))
    if not p.is_file():
        return "missing"
    try:
        size = p.stat().st_size
        if size == 0:
            return "unreadable"
        if p.suffix.lower() != ".safetensors":
            return None
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "unreadable"
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(size - 8, 100 * 2**20):
                return "unreadable"
            header = json.loads(f.read(n).decode("utf-8"))
        return None if isinstance(header, dict) else "unreadable"
    except (OSError, ValueError, UnicodeDecodeError):
        return "unreadable"


def annotation_band(cell_w: int, cell_h: int, col_labels: Sequence[str], row_labels: Sequence[str]) -> tuple[int, int]:
    """(pad_left, pad_top) that ``images.draw_grid_annotations`` adds, estimated without a font: pad_left =
    ``cell_w * 3 // 4`` when there are row labels; font size ``(cell_w + cell_h) // 25``; column labels wrap at the
    cell width with about 0.6 x font size per character; each line ~1.2 x font size plus half a font size of
    spacing. Used for the size guard before anything is generated (an over-estimate is harmless)."""
    fs = max(1, (cell_w + cell_h) // 25)
    spacing = fs // 2
    pad_left = cell_w * 3 // 4 if any(t for t in row_labels) else 0
    per_line = max(1, int(cell_w / (0.6 * fs)))
    lines = max((max(1, -(-len(t) // per_line)) for t in col_labels), default=0)
    pad_top = 0 if not any(col_labels) else int(lines * (1.2 * fs + spacing) + 2 * spacing)
    return pad_left, pad_top


def _draw_text_box(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill: str) -> None:
    box = draw.textbbox(xy, text)
    draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill="white")
    draw.text(xy, text, fill=fill)


def marked_cell(width: int, height: int, text: str) -> Image.Image:
    """A grey ``width`` x ``height`` RGB cell with a cross and ``text`` (e.g. ``"missing"``), for a cell that
    could not be made."""
    im = Image.new("RGB", (width, height), "#bbbbbb")
    d = ImageDraw.Draw(im)
    d.line([0, 0, width - 1, height - 1], fill="#888888", width=2)
    d.line([0, height - 1, width - 1, 0], fill="#888888", width=2)
    _draw_text_box(d, (4, 4), text, "#b00000")
    return im


def score_overlay(image: Image.Image, score: float | None, best: bool = False) -> Image.Image:
    """A copy of a cell with its score written in the top-left corner and, for the best cell, a 4 px green frame
    and "best"."""
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    if best:
        w, h = im.size
        for i in range(4):
            d.rectangle([i, i, w - 1 - i, h - 1 - i], outline="#00b000")
    if score is not None:
        _draw_text_box(d, (6, 6), f"{score:.2f}" + (" best" if best else ""), "#006000" if best else "black")
    return im


# ----------------------------------------------------------------------------------------------------------------------
# X/Y/Z plot axes
# ----------------------------------------------------------------------------------------------------------------------

_AXIS_NAME = "_lib_lora_axis_name"
_AXIS_WEIGHT = "_lib_lora_axis_weight"
_AXIS_TAG = "_lib_lora_axis_tag"


def _set_axis_tag(p, name: str, weight: float) -> None:
    tag = format_lora_tag(name, weight)
    old = getattr(p, _AXIS_TAG, None)
    if old and old in p.prompt:
        p.prompt = p.prompt.replace(old, tag, 1)
    else:
        p.prompt = f"{p.prompt} {tag}" if p.prompt.strip() else tag
    setattr(p, _AXIS_TAG, tag)


def apply_checkpoint_axis(p, x: str, xs: Sequence[str], default_weight: float = 1.0) -> None:
    """"LoRA checkpoint" axis: puts ``<lora:x:w>`` into ``p.prompt`` (``x`` a file stem; a path or file name is
    reduced to its stem). ``w`` is the "LoRA weight" axis value when that axis was applied to this cell first,
    else ``default_weight``; a tag this axis added before is replaced, never doubled.

    Raises:
        ConfigError: a name the tag syntax cannot carry.
    """
    stem = os.path.basename(str(x))
    root, ext = os.path.splitext(stem)
    name = root if ext.lower() in LORA_EXTENSIONS else stem
    setattr(p, _AXIS_NAME, name)
    _set_axis_tag(p, name, getattr(p, _AXIS_WEIGHT, default_weight))


def apply_weight_axis(p, x: float, xs: Sequence[float]) -> None:
    """"LoRA weight" axis: sets the weight of the LoRA of this cell. With the "LoRA checkpoint" axis it rewrites
    that axis' tag (or, applied first, leaves the weight for it); alone, it sets both multipliers of the one
    ``<lora:...>`` tag of the prompt (the user's own).

    Raises:
        ConfigError: no checkpoint axis and more than one LoRA tag in the prompt (the message says so).
    """
    w = float(x)
    setattr(p, _AXIS_WEIGHT, w)
    name = getattr(p, _AXIS_NAME, None)
    if name is not None:
        _set_axis_tag(p, name, w)
        return
    tags = parse_lora_tags(p.prompt)
    if not tags:  # the "LoRA checkpoint" axis comes next in this cell and adds the tag with this weight
        return
    if len(tags) != 1:
        raise ConfigError(f"'LoRA weight' axis: the prompt holds {len(tags)} <lora:...> tags, not one, "
                          "or use the 'LoRA checkpoint' axis too")
    t = tags[0]
    new = format_lora_tag(t.name, w, dyn=t.dyn, kind=t.kind if t.kind in LORA_KINDS else "lora")
    p.prompt = p.prompt[:t.start] + new + p.prompt[t.end:]


def infotext_params(run: str, mode: str, checkpoints: Sequence[str], weights: Sequence[float],
                    seeds: Sequence[int], baseline: bool, part: str) -> dict[str, str]:
    """The grid's infotext fields (``p.extra_generation_params``): run, mode, checkpoints, weights, seeds."""
    out = {"LoRA grid run": run, "LoRA grid mode": mode,
           "LoRA grid checkpoints": ", ".join(checkpoints),
           "LoRA grid weights": ", ".join(format_weight(w) for w in weights),
           "LoRA grid seeds": ", ".join(str(s) for s in seeds)}
    if baseline:
        out["LoRA grid baseline"] = "True"
    if part != "both":
        out["LoRA grid part"] = part
    return out


def lora_names_in(prompt: str) -> list[str]:
    """The network names of the LoRA tags in ``prompt`` (bad tags ignored), in order."""
    try:
        return [t.name for t in parse_lora_tags(prompt)]
    except ConfigError:
        return [m.group(2).split(":")[0] for m in re.finditer(r"<(lora|lyco):([^>]+)>", prompt)]


def cell_problem(prompt: str, files: Mapping[str, Path]) -> tuple[str | None, str | None]:
    """(mark, name) for the first LoRA of ``prompt`` that is missing from ``files`` or unreadable, else
    (None, None)."""
    for name in lora_names_in(prompt):
        problem = checkpoint_problem(files.get(name))
        if problem:
            return problem, name
    return None, None
