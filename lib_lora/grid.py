"""The checkpoint x weight grid, without the WebUI: axis parsing, Prompt S/R, the cell plan, a size guard and a
labelled renderer. Pure apart from Pillow.

Source conventions (A1111 v1.10.1 ``scripts/xyz_grid.py``, see docs/webui-internals.md §1.7):

- axis values are comma-separated (``csv`` with quotes, as ``csv_string_to_list_strip``); number axes expand
  ranges ``a-b`` (step 1), ``a-b (+s)`` (``np.arange``) and ``a-b [n]`` (``np.linspace``). Here the ranges are
  computed in :class:`decimal.Decimal`, so ``0.1-1.0 (+0.1)`` and ``0.1-1.0 [10]`` give exactly the floats
  0.1, 0.2, ..., 1.0 (labels ``"0.1"``, ``"0.3"``, never ``"0.30000000000000004"``), the end is never overshot
  (``np.arange(a, b + s, s)`` can add one value past ``b``), and a step is taken towards the end when it has no
  sign;
- Prompt S/R: the first value of the WebUI's list is the search text. The WebUI replaces it with ``str.replace``
  everywhere, so searching ``0.1`` also hits ``0.15``. Here a placeholder is replaced only where it stands as a
  whole token (see :func:`substitute`), all placeholders in one pass, in the prompt and the negative prompt;
- the grid puts X (checkpoints) across and Y (weights) down; the checkpoint axis is the costly one and is the
  outer loop (``cost`` in xyz_grid);
- LoRA files are named by file stem (A1111 ``networks.py`` looks them up by stem; ``ss_output_name`` is shared by
  every epoch of a run, so it cannot pick one).

Sizes are in pixels. Pillow refuses to open images above ``2 * Image.MAX_IMAGE_PIXELS`` pixels and warns above
``Image.MAX_IMAGE_PIXELS`` (decompression-bomb guard); JPEG stores at most 65,535 px per side, WebP 16,383 px.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from functools import cached_property
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import ConfigError
from .prompt_syntax import (
    EXTRA_NETWORK_RE,
    LORA_KINDS,
    add_trigger_words,
    format_lora_tag,
    format_number,
    validate_lora_name,
)

__all__ = [
    "DEFAULT_PLACEHOLDERS",
    "FORMAT_SIDE_LIMITS",
    "MAX_AXIS_VALUES",
    "GridCell",
    "GridLayout",
    "GridPage",
    "GridPlan",
    "SizeDecision",
    "check_grid_size",
    "check_placeholders",
    "count_placeholder",
    "format_weight",
    "grid_layout",
    "lora_name",
    "parse_axis_values",
    "parse_weights",
    "plan_grid",
    "render_grid",
    "save_format",
    "substitute",
]

#: Placeholders of the S/R mode: (checkpoint, weight).
DEFAULT_PLACEHOLDERS: tuple[str, str] = ("NUM", "STRENGTH")

#: Largest number of values one axis may expand to (guards against ``0-1 (+0.0001)``).
MAX_AXIS_VALUES = 1000

#: Largest side in pixels each save format can store; None = no side limit (PNG: 2^31 - 1).
FORMAT_SIDE_LIMITS: dict[str, int | None] = {"png": None, "jpeg": 65535, "webp": 16383}

_FORMAT_ALIASES = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE_RE = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*({_NUM})\s*\)|\[\s*(\d+)\s*\])?\s*$")
_COUNT_PLACES = 4  # decimals kept for linspace values that are not exact (0-1 [4] -> 0.3333)


# ----------------------------------------------------------------------------------------------------------------------
# Axis values
# ----------------------------------------------------------------------------------------------------------------------


def parse_axis_values(spec: str | Iterable[str], placeholder: str | None = None) -> list[str]:
    """Text axis values (checkpoints, S/R values): comma-separated with csv quoting, each stripped, empties dropped.

    Args:
        spec: ``'000001, 000002, "a, b"'`` or a list of strings (taken as they are, stripped).
        placeholder: when the first value equals it (the WebUI S/R form ``NUM,000001,...``), it is dropped: no
            cell is ever made for the search text itself.

    Raises:
        ConfigError: no value left, a duplicate value, or the placeholder at another place than first.
    """
    if isinstance(spec, str):
        rows = csv.reader(io.StringIO(spec), skipinitialspace=True)
        values = [v.strip() for row in rows for v in row]
    else:
        values = [str(v).strip() for v in spec]
    values = [v for v in values if v]
    if placeholder is not None and values and values[0] == placeholder:
        values = values[1:]
    if placeholder is not None and placeholder in values:
        raise ConfigError(f"the placeholder {placeholder!r} may only be the first value, as the search text")
    if not values:
        raise ConfigError(f"no axis values in {spec!r}")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ConfigError(f"duplicate axis values {dup}")
    return values


def _decimal(text: str, what: str) -> Decimal:
    try:
        d = Decimal(text.replace(" ", ""))
    except InvalidOperation as exc:
        raise ConfigError(f"{what} {text!r} is not a number") from exc
    if not d.is_finite():
        raise ConfigError(f"{what} {text!r} is not a finite number")
    return d


def _places(d: Decimal) -> int:
    return max(0, -d.as_tuple().exponent)


def _expand_range(m: re.Match, item: str) -> list[Decimal]:
    start, end = _decimal(m.group(1), "range start"), _decimal(m.group(2), "range end")
    step_text, count_text = m.group(3), m.group(4)
    if count_text is not None:
        n = int(count_text)
        if not 1 <= n <= MAX_AXIS_VALUES:
            raise ConfigError(f"{item!r}: count must be 1..{MAX_AXIS_VALUES}, got {n}")
        if n == 1:
            return [start]
        places = max(_COUNT_PLACES, _places(start), _places(end))
        quantum = Decimal(1).scaleb(-places)
        with localcontext() as ctx:
            ctx.prec = 50
            return [(start + (end - start) * i / (n - 1)).quantize(quantum) for i in range(n)]
    direction = 1 if end >= start else -1
    if step_text is None:
        step = Decimal(direction)
    else:
        step = _decimal(step_text, "range step")
        if step == 0:
            raise ConfigError(f"{item!r}: the step must not be 0")
        if step_text.strip()[0] not in "+-":
            step = abs(step) * direction
        elif (step > 0) != (direction > 0) and start != end:
            raise ConfigError(f"{item!r}: a step of {step_text} never goes from {m.group(1)} to {m.group(2)}")
    count = int((end - start) / step) + 1
    if count > MAX_AXIS_VALUES:
        raise ConfigError(f"{item!r} expands to {count} values (at most {MAX_AXIS_VALUES})")
    return [start + step * i for i in range(count)]


def parse_weights(spec: str | Iterable[float | str], placeholder: str | None = None) -> list[float]:
    """LoRA weights (multipliers, no unit) from an axis text.

    Accepts comma-separated numbers and ranges: ``"0.2,0.5,1"``, ``"0.1-1.0 [10]"`` (10 evenly spaced values,
    ends included; inexact values rounded to 4 decimals or the ends' own decimals), ``"0.1-1.0 (+0.1)"`` (step;
    the end is included when a step lands on it and never passed), ``"0-1"`` (step 1). Items can be mixed:
    ``"0, 0.5-1 [3]"``. Arithmetic is decimal, so each value is the float of its shortest decimal text and
    :func:`format_weight` prints it cleanly.

    Args:
        spec: the text, or a list of numbers / number strings.
        placeholder: an S/R search text accepted (and dropped) as the first value (``"STRENGTH,0.5,1"``).

    Returns:
        The weights in order.

    Raises:
        ConfigError: a value that is not a finite number or range, a zero or wrong-signed step, more than
            :data:`MAX_AXIS_VALUES` values, duplicates, or nothing at all.
    """
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")]
    else:
        items = [format_number(v) if isinstance(v, (int, float)) else str(v).strip() for v in spec]
    items = [s for s in items if s]
    if placeholder is not None and items and items[0] == placeholder:
        items = items[1:]
    values: list[Decimal] = []
    for item in items:
        m = _RANGE_RE.match(item)
        if m:
            values.extend(_expand_range(m, item))
        else:
            values.append(_decimal(item, "weight"))
        if len(values) > MAX_AXIS_VALUES:
            raise ConfigError(f"{spec!r} expands to more than {MAX_AXIS_VALUES} weights")
    if not values:
        raise ConfigError(f"no weights in {spec!r}")
    floats = [float(v) for v in values]
    dup = sorted({format_weight(x) for x in floats if floats.count(x) > 1})
    if dup:
        raise ConfigError(f"duplicate weights {dup} in {spec!r}")
    return floats


def format_weight(value: float) -> str:
    """A weight as label / prompt text: the shortest decimal that reads back to the same float (``"0.3"``,
    ``"1"``, ``"-0.5"``, ``"0.00001"``), as :func:`lib_lora.prompt_syntax.format_number`.

    Raises:
        ConfigError: NaN or infinite.
    """
    return format_number(value)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt S/R
# ----------------------------------------------------------------------------------------------------------------------


def _joined(a: str, b: str) -> bool:
    """True when characters a|b would run into one token: both alphanumeric, or both parts of a number."""
    return (a.isalnum() and b.isalnum()) or (_numeric(a) and _numeric(b))


def _numeric(c: str) -> bool:
    return c.isdigit() or c == "."


def _whole(text: str, start: int, end: int) -> bool:
    if start > 0 and _joined(text[start - 1], text[start]):
        return False
    return not (end < len(text) and _joined(text[end - 1], text[end]))


def check_placeholders(placeholders: Sequence[str]) -> None:
    """Placeholders must be non-empty, unique, and none a substring of another (``NUM`` and ``NUMBER`` clash).

    Raises:
        ConfigError: otherwise (the message names the pair).
    """
    for i, a in enumerate(placeholders):
        if not a or not a.strip():
            raise ConfigError("a placeholder must not be empty")
        for b in placeholders[i + 1:]:
            if a == b:
                raise ConfigError(f"placeholder {a!r} is given twice; each axis needs its own")
            if a in b or b in a:
                raise ConfigError(f"placeholders {a!r} and {b!r} overlap: one is part of the other")


def _matches(text: str, placeholders: Sequence[str]) -> list[tuple[int, int, str]]:
    """Whole-token occurrences (start, end, placeholder), left to right, not overlapping."""
    pattern = re.compile("|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True)))
    out = []
    pos = 0
    while True:
        m = pattern.search(text, pos)
        if m is None:
            return out
        if _whole(text, m.start(), m.end()):
            out.append((m.start(), m.end(), m.group(0)))
            pos = m.end()
        else:
            pos = m.start() + 1


def count_placeholder(text: str, placeholder: str) -> int:
    """How many whole-token occurrences of ``placeholder`` ``text`` holds (see :func:`substitute`)."""
    return len(_matches(text, [placeholder]))


def substitute(text: str, replacements: Mapping[str, str]) -> str:
    """Replaces whole-token occurrences of each placeholder, all in one pass.

    An occurrence counts only when it does not run into a neighbouring character: letters/digits on both sides
    of an edge join (``NUM`` is not found in ``NUMBER`` or ``xNUM``), and so do digits/dots (``0.1`` is not found
    in ``0.15``, ``10.1`` or ``0.1.2``). Separators such as ``-``, ``_``, ``:``, ``,``, spaces and ``<>`` do not
    join, so ``mylora-NUM``, ``my_lora_NUM`` and ``:STRENGTH>`` match. Replacement texts are never searched again,
    so a value containing another placeholder stays as it is.

    Raises:
        ConfigError: overlapping placeholders (:func:`check_placeholders`).
    """
    keys = list(replacements)
    if not keys:
        return text
    check_placeholders(keys)
    parts, last = [], 0
    for start, end, key in _matches(text, keys):
        parts.append(text[last:start])
        parts.append(str(replacements[key]))
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _strip_tags_with(text: str, placeholders: Sequence[str]) -> str:
    """Removes the LoRA tags that hold one of the placeholders (the baseline row of the S/R mode)."""

    def drop(m: re.Match) -> str:
        if m.group(1) in LORA_KINDS and _matches(m.group(0), placeholders):
            return ""
        return m.group(0)

    return EXTRA_NETWORK_RE.sub(drop, text)


# ----------------------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------------------


def lora_name(checkpoint: str | os.PathLike[str]) -> str:
    """The name a prompt uses for a LoRA file: its stem (``dir/立绘 style v1-000002.safetensors`` ->
    ``立绘 style v1-000002``). Text without a LoRA extension is taken as a stem already (``"model.v2"`` stays).

    Raises:
        ConfigError: a name the tag syntax cannot carry (``:``, ``>``, ``=``).
    """
    text = os.fspath(checkpoint)
    name = os.path.basename(text)
    root, ext = os.path.splitext(name)
    if ext.lower() in (".safetensors", ".pt", ".ckpt"):
        name = root
    return validate_lora_name(name)


@dataclass(frozen=True)
class GridCell:
    """One image of the grid.

    Attributes:
        row, col: position (0-based; the baseline row, when asked for, is row 0); page: index into the seeds.
        seed: the sampling seed (same for every cell of a page).
        checkpoint: the column's value (file stem, or S/R text); None for a baseline cell.
        weight: the row's weight; None for a baseline cell.
        prompt, negative_prompt: what to generate (LoRA tags included, as the WebUI gets them).
        row_label, col_label: the axis texts of the cell's row and column (for infotext / file names).
    """

    row: int
    col: int
    page: int
    seed: int
    checkpoint: str | None
    weight: float | None
    prompt: str
    negative_prompt: str = ""
    row_label: str = ""
    col_label: str = ""

    @property
    def baseline(self) -> bool:
        """True for a cell of the no-LoRA row."""
        return self.weight is None

    @property
    def key(self) -> tuple[str, str, int]:
        """(prompt, negative, seed): cells with the same key give the same image (the baseline row)."""
        return (self.prompt, self.negative_prompt, self.seed)


@dataclass(frozen=True)
class GridPlan:
    """Every cell of a checkpoint (X, columns) x weight (Y, rows) grid, one page per seed.

    ``cells`` is in run order: page, then column (the checkpoint is loaded once per column), then row.
    """

    mode: str
    checkpoints: tuple[str, ...]
    weights: tuple[float, ...]
    seeds: tuple[int, ...]
    baseline: bool
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    cells: tuple[GridCell, ...]

    @cached_property
    def _index(self) -> dict[tuple[int, int, int], GridCell]:
        return {(c.row, c.col, c.page): c for c in self.cells}

    @property
    def rows(self) -> int:
        """Number of rows (weights, plus the baseline row)."""
        return len(self.row_labels)

    @property
    def cols(self) -> int:
        """Number of columns (checkpoints)."""
        return len(self.col_labels)

    def cell(self, row: int, col: int, page: int = 0) -> GridCell:
        """The cell at (row, col) of page ``page``. Raises KeyError outside the grid."""
        return self._index[(row, col, page)]

    def page_cells(self, page: int = 0) -> list[list[GridCell]]:
        """``cells[row][col]`` of one page."""
        return [[self.cell(r, c, page) for c in range(self.cols)] for r in range(self.rows)]


def _weight_tag(name: str, weight: float, part: str, other: float) -> str:
    if part == "both":
        return format_lora_tag(name, weight)
    if part == "te":
        return format_lora_tag(name, te=weight, unet=other, named=True)
    return format_lora_tag(name, te=other, unet=weight, named=True)


def plan_grid(checkpoints: Sequence[str | os.PathLike[str]] | str, weights: Sequence[float] | str, prompt: str,
              mode: str = "plain", *, seeds: Sequence[int] = (0,), baseline: bool = False,
              trigger_words: str | Sequence[str] | None = None, negative_prompt: str = "",
              placeholders: Sequence[str] = DEFAULT_PLACEHOLDERS, part: str = "both", other_weight: float = 1.0,
              col_labels: Sequence[str] | None = None) -> GridPlan:
    """Plans a checkpoint x weight grid.

    Modes:
        ``"plain"``: each LoRA cell's prompt is ``prompt`` + ``" <lora:STEM:w>"`` (``part="te"``/``"unet"``: the
        named form ``<lora:STEM:te=w:unet=other_weight>`` / ``<lora:STEM:te=other_weight:unet=w>``). ``checkpoints``
        are file paths or stems; they are named by stem (:func:`lora_name`).
        ``"sr"``: Prompt S/R. ``prompt`` (and/or ``negative_prompt``) holds the placeholders, e.g.
        ``"photo <lora:mylora-NUM:STRENGTH>"``; each cell replaces the checkpoint placeholder with the column's
        text and the weight placeholder with the weight's text (:func:`substitute`). ``checkpoints`` are those
        texts (``"000001"``...); a first value equal to the placeholder (the WebUI form ``NUM,000001,...``) is
        dropped.

    Args:
        checkpoints: column values, a list or a comma-separated text (see :func:`parse_axis_values`).
        weights: row values, a list or an axis text (see :func:`parse_weights`).
        prompt: the prompt; negative_prompt: the negative prompt (S/R applies to it too).
        seeds: one page per seed; resolve the WebUI's -1 to a fixed seed first so every cell shares it.
        baseline: add a first row "no LoRA": the prompt without the LoRA (plain: without the added tag; S/R:
            without the tags that hold a placeholder), same seed, one per column (all the same image).
        trigger_words: phrases put in front of every prompt where missing (:func:`add_trigger_words`), baseline
            included so that it differs from the LoRA rows only by the LoRA; e.g. the sidecar's activation text.
        placeholders: (checkpoint placeholder, weight placeholder) of the S/R mode.
        part: ``"both"``, ``"te"`` or ``"unet"``: which multiplier the weight sets (plain mode).
        other_weight: the multiplier of the other part when ``part`` is not "both".
        col_labels: column label texts (default: the stems / S/R values).

    Returns:
        The :class:`GridPlan`; row labels are the weights' texts (``"0.5"``, ``"unet 0.5"``) and ``"no LoRA"``.

    Raises:
        ConfigError: unknown mode or part, empty or duplicate axes, bad weights, negative seeds, a stem the tag
            syntax cannot carry, overlapping placeholders, a placeholder found in neither prompt (the WebUI's
            "Prompt S/R did not find ..."), a baseline in S/R mode with a placeholder outside LoRA tags, wrong
            number of column labels.
    """
    if mode not in ("plain", "sr"):
        raise ConfigError(f"grid mode {mode!r} is not one of 'plain', 'sr'")
    if part not in ("both", "te", "unet"):
        raise ConfigError(f"part {part!r} is not one of 'both', 'te', 'unet'")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be one or more integers >= 0 (resolve -1 first), got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"duplicate seeds {list(seeds)}")
    ph_ckpt = ph_weight = None
    if mode == "sr":
        if len(placeholders) != 2:
            raise ConfigError(f"S/R needs two placeholders (checkpoint, weight), got {list(placeholders)}")
        ph_ckpt, ph_weight = placeholders
        check_placeholders([ph_ckpt, ph_weight])
        for ph in (ph_ckpt, ph_weight):
            if not count_placeholder(prompt, ph) and not count_placeholder(negative_prompt, ph):
                raise ConfigError(f"Prompt S/R did not find {ph!r} in the prompt or negative prompt (as a whole "
                                  "word)")
    if isinstance(checkpoints, str):
        values = parse_axis_values(checkpoints, ph_ckpt)
    else:
        values = parse_axis_values([os.fspath(c) for c in checkpoints], ph_ckpt)
    names = [lora_name(v) for v in values] if mode == "plain" else values
    if mode == "plain" and len(set(names)) != len(names):
        raise ConfigError(f"two checkpoints share a stem: {names} (the WebUI could not tell them apart)")
    ws = parse_weights(weights, ph_weight)
    labels = tuple(col_labels) if col_labels is not None else tuple(names)
    if len(labels) != len(names):
        raise ConfigError(f"{len(labels)} column labels for {len(names)} checkpoints")

    base_prompt = add_trigger_words(prompt, trigger_words) if trigger_words else prompt
    rows: list[float | None] = ([None] if baseline else []) + list(ws)
    prefix = "" if part == "both" else f"{part} "
    row_labels = tuple("no LoRA" if w is None else prefix + format_weight(w) for w in rows)

    baseline_pos = baseline_neg = None
    if baseline and mode == "sr":
        baseline_pos = _strip_tags_with(base_prompt, [ph_ckpt, ph_weight])
        baseline_neg = _strip_tags_with(negative_prompt, [ph_ckpt, ph_weight])
        left = [p for p in (ph_ckpt, ph_weight) if count_placeholder(baseline_pos + "\n" + baseline_neg, p)]
        if left:
            raise ConfigError(f"baseline row: {left} also occur outside <lora:...> tags, so a prompt without the "
                              "LoRA cannot be made")

    cells = []
    for page, seed in enumerate(seeds):
        for col, name in enumerate(names):
            for row, w in enumerate(rows):
                if w is None:
                    pos = base_prompt if mode == "plain" else baseline_pos
                    neg = negative_prompt if mode == "plain" else baseline_neg
                    cells.append(GridCell(row, col, page, seed, None, None, pos, neg, row_labels[row], labels[col]))
                    continue
                if mode == "plain":
                    tag = _weight_tag(name, w, part, other_weight)
                    pos = f"{base_prompt} {tag}" if base_prompt.strip() else tag
                    neg = negative_prompt
                else:
                    subs = {ph_ckpt: name, ph_weight: format_weight(w)}
                    pos, neg = substitute(base_prompt, subs), substitute(negative_prompt, subs)
                cells.append(GridCell(row, col, page, seed, name, w, pos, neg, row_labels[row], labels[col]))
    return GridPlan(mode=mode, checkpoints=tuple(names), weights=tuple(ws), seeds=seeds, baseline=baseline,
                    row_labels=row_labels, col_labels=labels, cells=tuple(cells))


# ----------------------------------------------------------------------------------------------------------------------
# Size guard
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridPage:
    """One image to save: rows ``rows`` and columns ``cols`` of the grid (ranges), and its size in pixels."""

    rows: range
    cols: range
    width: int
    height: int


@dataclass(frozen=True)
class SizeDecision:
    """What :func:`check_grid_size` decided.

    Attributes:
        action: ``"ok"`` (save as asked), ``"png"`` (too wide/tall for the format: save as PNG) or ``"split"``
            (too many pixels for one image: save ``pages``).
        fmt: the format to save in (``"png"``, ``"jpeg"``, ``"webp"``).
        width, height: the whole grid in pixels; pixels: width x height.
        pages: the images to save (one page covering everything unless split); each repeats the labels.
        message: one line for the user (empty for "ok").
    """

    action: str
    fmt: str
    width: int
    height: int
    pixels: int
    pages: tuple[GridPage, ...]
    message: str = ""


def _normal_format(fmt: str) -> str:
    key = str(fmt).lower().lstrip(".")
    if key not in _FORMAT_ALIASES:
        raise ConfigError(f"grid format {fmt!r} is not one of png, jpg/jpeg, webp")
    return _FORMAT_ALIASES[key]


def _even_chunks(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` consecutive ranges whose lengths differ by at most one."""
    q, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = q + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def check_grid_size(cols: int, rows: int, cell_w: int, cell_h: int, *, label_w: int = 0, label_h: int = 0,
                    fmt: str = "png", max_pixels: int | None = -1) -> SizeDecision:
    """Checks a grid's size before anything is generated.

    The grid is ``label_w + cols * cell_w`` by ``label_h + rows * cell_h`` pixels (``label_w``: the row-label
    column; ``label_h``: title and column-label band). Rules, in order:

    1. more than ``max_pixels`` pixels -> ``"split"``: pages of whole rows (all columns side by side, so the
       checkpoints stay comparable), of fewer columns as well only when one full row is already too big; the
       pages are balanced (sizes differ by at most one row / column), each repeats the labels and fits both the
       pixel limit and the format's side limit;
    2. a side above the format's limit (JPEG 65,535 px, WebP 16,383 px) -> ``"png"``;
    3. otherwise ``"ok"``.

    Args:
        cols, rows: cells across and down (>= 1); cell_w, cell_h: one cell in pixels (>= 1).
        label_w, label_h: label sizes in pixels (>= 0), e.g. from :func:`grid_layout`.
        fmt: the format the user asked for (png, jpg/jpeg, webp).
        max_pixels: pixel limit of one image; -1 (default) = ``PIL.Image.MAX_IMAGE_PIXELS`` read at call time (the
            decompression-bomb limit, 89,478,485 unless changed; the WebUI's ``img_max_size_mp`` can be passed
            as megapixels x 1e6); None = no pixel limit.

    Raises:
        ConfigError: a count or size below its minimum, an unknown format, or a single cell with its labels that
            already exceeds the limits (nothing can be saved).
    """
    fmt = _normal_format(fmt)
    for name, value, low in (("cols", cols, 1), ("rows", rows, 1), ("cell_w", cell_w, 1), ("cell_h", cell_h, 1),
                             ("label_w", label_w, 0), ("label_h", label_h, 0)):
        if int(value) != value or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_pixels == -1:
        max_pixels = Image.MAX_IMAGE_PIXELS
    width, height = label_w + cols * cell_w, label_h + rows * cell_h
    pixels = width * height
    side = FORMAT_SIDE_LIMITS[fmt]
    whole = (GridPage(range(rows), range(cols), width, height),)
    if max_pixels is None or pixels <= max_pixels:
        if side is not None and max(width, height) > side:
            return SizeDecision("png", "png", width, height, pixels, whole,
                                f"grid is {width}x{height} px, more than {fmt.upper()} allows ({side} px per side): "
                                "saving it as PNG")
        return SizeDecision("ok", fmt, width, height, pixels, whole)

    def fits(c: int, r: int) -> bool:
        w, h = label_w + c * cell_w, label_h + r * cell_h
        return w * h <= max_pixels and (side is None or max(w, h) <= side)

    if not fits(1, 1):
        raise ConfigError(f"one {cell_w}x{cell_h} px cell with its labels is already over the limit of {max_pixels} "
                          f"pixels{f' or {side} px per side' if side else ''}: use smaller images")
    cols_pp = cols
    if not fits(cols, 1):
        cols_pp = max(c for c in range(1, cols + 1) if fits(c, 1))
    col_chunks = _even_chunks(cols, math.ceil(cols / cols_pp))
    cols_pp = max(len(c) for c in col_chunks)
    rows_pp = max(r for r in range(1, rows + 1) if fits(cols_pp, r))
    row_chunks = _even_chunks(rows, math.ceil(rows / rows_pp))
    rows_pp = max(len(r) for r in row_chunks)
    pages = [GridPage(rr, cc, label_w + len(cc) * cell_w, label_h + len(rr) * cell_h)
             for rr in row_chunks for cc in col_chunks]
    return SizeDecision("split", fmt, width, height, pixels, tuple(pages),
                        f"grid would be {width}x{height} px = {pixels:,} pixels, over the limit of {max_pixels:,} "
                        f"(Pillow's decompression-bomb guard): split into {len(pages)} pages of up to {rows_pp} rows "
                        f"x {cols_pp} columns")


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------

_FONT_FILES = ("DejaVuSans.ttf", "NotoSansCJK-Regular.ttc", "NotoSans-Regular.ttf", "Arial.ttf", "arial.ttf")
_PAD = 6  # pixels around label text
_MAX_LABEL_LINES = 4
_MAX_ROW_LABEL_W = 200  # pixels; longer row labels wrap


def _font(size: int):
    for name in _FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = _MAX_LABEL_LINES) -> list[str]:
    """Greedy wrap at spaces; a word too long alone breaks after its last fitting ``-``/``_`` or else between
    characters; ``…`` ends a cut last line. ``width`` in pixels."""
    lines: list[str] = []
    cur = ""
    for word in text.split(" "):
        trial = f"{cur} {word}" if cur else word
        if _text_w(draw, trial, font) <= width:
            cur = trial
            continue
        if cur:
            lines.append(cur)
        cur = word
        while len(cur) > 1 and _text_w(draw, cur, font) > width:  # wider than a line alone: cut by characters
            cut = len(cur) - 1
            while cut > 1 and _text_w(draw, cur[:cut], font) > width:
                cut -= 1
            soft = max(cur.rfind("-", 0, cut), cur.rfind("_", 0, cut))
            cut = soft + 1 if soft > 0 else cut  # rather after a "-" or "_" (name-000001)
            lines.append(cur[:cut])
            cur = cur[cut:]
    if cur or not lines:
        lines.append(cur)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_w(draw, last + "…", font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return lines


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes, in pixels.

    Attributes:
        cols, rows, cell_w, cell_h: the cells.
        label_w: width of the row-label column; label_h: height of the band above the cells (title + column
            labels); title_h: the title's part of label_h.
        col_lines, row_lines: the wrapped label lines; title_lines: the wrapped title; line_h: one text line.
    """

    cols: int
    rows: int
    cell_w: int
    cell_h: int
    label_w: int
    label_h: int
    title_h: int
    line_h: int
    col_lines: tuple[tuple[str, ...], ...]
    row_lines: tuple[tuple[str, ...], ...]
    title_lines: tuple[str, ...] = ()
    font_size: int = 14

    @property
    def width(self) -> int:
        """label_w + cols x cell_w."""
        return self.label_w + self.cols * self.cell_w

    @property
    def height(self) -> int:
        """label_h + rows x cell_h."""
        return self.label_h + self.rows * self.cell_h

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell, right/bottom exclusive."""
        x, y = self.label_w + col * self.cell_w, self.label_h + row * self.cell_h
        return (x, y, x + self.cell_w, y + self.cell_h)


def grid_layout(row_labels: Sequence[str], col_labels: Sequence[str], cell_w: int, cell_h: int,
                title: str | None = None, font_size: int = 14) -> GridLayout:
    """Measures the labels of a grid (pixels): column labels wrap to the cell width (up to 4 lines, ``…`` after),
    row labels to at most 200 px, the title to the grid's width.

    Raises:
        ConfigError: no rows or columns, or a cell size below 1 px.
    """
    if not row_labels or not col_labels:
        raise ConfigError(f"a grid needs rows and columns, got {len(row_labels)} x {len(col_labels)}")
    if cell_w < 1 or cell_h < 1:
        raise ConfigError(f"cell size must be >= 1 px, got {cell_w}x{cell_h}")
    font = _font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = draw.textbbox((0, 0), "Ag立", font=font)
    line_h = bottom - top + 3
    col_lines = tuple(tuple(_wrap(draw, t, font, max(cell_w - 4, 8))) for t in col_labels)
    row_lines = tuple(tuple(_wrap(draw, t, font, _MAX_ROW_LABEL_W)) for t in row_labels)
    label_w = max(_text_w(draw, line, font) for lines in row_lines for line in lines) + 2 * _PAD
    width = label_w + len(col_labels) * cell_w
    title_lines = tuple(_wrap(draw, title, font, max(width - 2 * _PAD, 8), 3)) if title else ()
    title_h = len(title_lines) * line_h + _PAD if title_lines else 0
    label_h = title_h + max(len(lines) for lines in col_lines) * line_h + 2 * _PAD
    return GridLayout(cols=len(col_labels), rows=len(row_labels), cell_w=cell_w, cell_h=cell_h, label_w=label_w,
                      label_h=label_h, title_h=title_h, line_h=line_h, col_lines=col_lines, row_lines=row_lines,
                      title_lines=title_lines, font_size=font_size)


def render_grid(images: Sequence[Sequence[Image.Image | None]], layout: GridLayout,
                marks: Mapping[tuple[int, int], str] | None = None, rows: range | None = None,
                cols: range | None = None) -> Image.Image:
    """Draws a grid (or one page of it) with labels on both axes.

    Args:
        images: ``images[row][col]`` for the whole grid; None draws a grey cell with its mark text.
        layout: from :func:`grid_layout` (the page is ``layout.label_w + len(cols) * cell_w`` wide).
        marks: (row, col) -> short text for cells that could not be made (``"missing"``, ``"unreadable"``);
            a None image without a mark says ``"missing"``. Marks on images that exist are drawn over them.
        rows, cols: the page's rows / columns (default: all).

    Returns:
        An RGB image of exactly label + cells pixels; images of another size are resized to the cell.

    Raises:
        ConfigError: ``images`` does not match the layout's rows x columns.
    """
    if len(images) != layout.rows or any(len(r) != layout.cols for r in images):
        raise ConfigError(f"{len(images)} image rows for a {layout.rows} x {layout.cols} layout")
    rows = rows if rows is not None else range(layout.rows)
    cols = cols if cols is not None else range(layout.cols)
    marks = marks or {}
    font = _font(layout.font_size)
    w, h = layout.cell_w, layout.cell_h
    grid = Image.new("RGB", (layout.label_w + len(cols) * w, layout.label_h + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(layout.title_lines):
        draw.text((_PAD, _PAD // 2 + i * layout.line_h), line, fill="black", font=font)
    for j, c in enumerate(cols):
        lines = layout.col_lines[c]
        y0 = layout.label_h - _PAD - len(lines) * layout.line_h
        for i, line in enumerate(lines):
            tw = _text_w(draw, line, font)
            draw.text((layout.label_w + j * w + (w - tw) // 2, y0 + i * layout.line_h), line, fill="black", font=font)
    for i, r in enumerate(rows):
        lines = layout.row_lines[r]
        y0 = layout.label_h + i * h + (h - len(lines) * layout.line_h) // 2
        for k, line in enumerate(lines):
            draw.text((_PAD, y0 + k * layout.line_h), line, fill="black", font=font)
        for j, c in enumerate(cols):
            x, y = layout.label_w + j * w, layout.label_h + i * h
            im = images[r][c]
            if im is None:
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill="#bbbbbb")
                draw.line([x, y, x + w - 1, y + h - 1], fill="#888888")
                draw.line([x, y + h - 1, x + w - 1, y], fill="#888888")
            else:
                grid.paste(im.convert("RGB").resize((w, h)) if im.size != (w, h) else im.convert("RGB"), (x, y))
            text = marks.get((r, c)) or ("missing" if im is None else None)
            if text:
                for k, line in enumerate(_wrap(draw, text, font, max(w - 4, 8), 3)):
                    draw.text((x + 2, y + 2 + k * layout.line_h), line, fill="#b00000", font=font)
    return grid


def save_format(path: str | os.PathLike[str]) -> str:
    """The grid format of an output path from its extension (``.png``, ``.jpg``/``.jpeg``, ``.webp``).

    Raises:
        ConfigError: another extension.
    """
    return _normal_format(Path(os.fspath(path)).suffix or "?")
