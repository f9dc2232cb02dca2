"""Automatic tagging: a :class:`Tagger` protocol, a local WD14 tagger (ONNX) and :func:`tag_folder`.

A tagger turns one image into ``{tag: score}`` (score in [0, 1], only the tags above its thresholds, highest first).
:class:`WD14Tagger` runs SmilingWolf's WD14 models with ``onnxruntime`` from files already on disk (``model.onnx``
and ``selected_tags.csv``, the layout of the Hugging Face repositories ``SmilingWolf/wd-v1-4-*-tagger-v2`` and of
the wd14-tagger WebUI extension's ``models/TaggerOnnx/<model>/`` folders); nothing is downloaded. The WebUI adapter
plugs the WebUI's own interrogators (BLIP, DeepBooru) in through the same protocol.

:func:`tag_folder` writes the tags into the caption files of a dataset folder with a mode: ``skip`` (default; never
touch an image that already has a caption), ``overwrite``, ``prepend`` or ``append``; files are written atomically
as UTF-8 (see :func:`lib_lora.tags.write_atomic`).

Importing this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from .data.captions import DEFAULT_CAPTION_EXTENSION, DEFAULT_SEPARATOR, caption_path, join_tags, split_tags
from .data.images import list_image_files, open_image
from .errors import ConfigError, DatasetError
from .tags import KAOMOJIS, dataset_image_folders, dedupe, parse_caption_bytes, prepend_trigger, write_atomic

MODES = ("skip", "overwrite", "prepend", "append")

#: Default thresholds of the WD14 models (SmilingWolf's demo and the wd14-tagger extension): a general tag is kept
#: at a score of 0.35 or more, a character tag (a named character, category 4) at 0.85 or more, because a wrong
#: character name is worse than a missing one.
WD14_GENERAL_THRESHOLD = 0.35
WD14_CHARACTER_THRESHOLD = 0.85

#: ``selected_tags.csv`` categories (Danbooru): 0 general, 4 character, 9 rating (ratings are never written).
WD14_CATEGORY_GENERAL = 0
WD14_CATEGORY_CHARACTER = 4
WD14_CATEGORY_RATING = 9

WD14_MODEL_FILE = "model.onnx"
WD14_TAGS_FILE = "selected_tags.csv"


@runtime_checkable
class Tagger(Protocol):
    """Anything that tags one image.

    ``tag(image)`` takes an RGB PIL image and returns ``{tag: score}`` with scores in [0, 1], already thresholded,
    highest score first. Tags are written as given (prompt spelling, e.g. ``"long hair"``).
    """

    def tag(self, image: Image.Image) -> dict[str, float]: ...


def _find_model_dir(folder: Path) -> Path:
    if (folder / WD14_MODEL_FILE).is_file() and (folder / WD14_TAGS_FILE).is_file():
        return folder
    if not folder.is_dir():
        raise ConfigError(f"WD14 model folder {folder} does not exist")
    candidates = sorted(p for p in folder.iterdir()
                        if p.is_dir() and (p / WD14_MODEL_FILE).is_file() and (p / WD14_TAGS_FILE).is_file())
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(p.name for p in candidates)
        raise ConfigError(f"{folder} holds several WD14 models ({names}); pass one of these folders")
    missing = [n for n in (WD14_MODEL_FILE, WD14_TAGS_FILE) if not (folder / n).is_file()]
    raise ConfigError(
        f"no WD14 model in {folder}: {' and '.join(missing)} missing. Download model.onnx and selected_tags.csv "
        "from a SmilingWolf/wd-v1-4-*-tagger-v2 repository on Hugging Face into one folder (the wd14-tagger "
        "extension keeps them in models/TaggerOnnx/<model>/) and pass that folder")


def read_selected_tags(path: Path, underscores_to_spaces: bool = True) -> list[tuple[str, int]]:
    """Reads a WD14 ``selected_tags.csv`` (columns ``tag_id,name,category,count``).

    Args:
        path: the CSV file.
        underscores_to_spaces: write ``long_hair`` as ``long hair`` (prompt spelling), except the kaomojis of
            :data:`lib_lora.tags.KAOMOJIS`.

    Returns:
        ``[(tag, category)]`` in the model's output order.

    Raises:
        ConfigError: the file cannot be read or lacks the ``name`` / ``category`` columns.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"cannot read WD14 tag list {path}: {e}") from e
    out = []
    for row in rows:
        try:
            name, category = row["name"], int(row["category"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path} is not a WD14 selected_tags.csv (needs name and category columns)") from e
        if underscores_to_spaces and name not in KAOMOJIS:
            name = name.replace("_", " ")
        out.append((name, category))
    return out


def select_tags(
    probs: np.ndarray,
    tags: list[tuple[str, int]],
    general_threshold: float = WD14_GENERAL_THRESHOLD,
    character_threshold: float = WD14_CHARACTER_THRESHOLD,
) -> dict[str, float]:
    """Keeps the general tags at or above ``general_threshold`` and the character tags at or above
    ``character_threshold``; ratings are dropped. Pure.

    Args:
        probs: one score in [0, 1] per tag, in the order of ``tags``.
        tags: ``[(tag, category)]`` from :func:`read_selected_tags`.

    Returns:
        ``{tag: score}``, highest score first.

    Raises:
        ConfigError: ``probs`` and ``tags`` differ in length.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(probs) != len(tags):
        raise ConfigError(f"the model gives {len(probs)} scores for {len(tags)} tags: model and tag list differ")
    out = {}
    for (name, category), p in zip(tags, probs):
        if category == WD14_CATEGORY_RATING:
            continue
        threshold = character_threshold if category == WD14_CATEGORY_CHARACTER else general_threshold
        if p >= threshold:
            out[name] = float(p)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def wd14_input(image: Image.Image, side: int) -> np.ndarray:
    """The WD14 input for one image: padded to a square on white, resized to ``side`` pixels (bicubic), BGR,
    float32 in 0-255, shape ``(1, side, side, 3)`` (SmilingWolf's preprocessing). Pure."""
    image = image.convert("RGB")
    w, h = image.size
    square = max(w, h)
    canvas = Image.new("RGB", (square, square), (255, 255, 255))
    canvas.paste(image, ((square - w) // 2, (square - h) // 2))
    if square != side:
        canvas = canvas.resize((side, side), Image.Resampling.BICUBIC)
    arr = np.asarray(canvas, dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(arr)[None]


class WD14Tagger:
    """A WD14 tagger run with onnxruntime on the CPU, from local files only.

    Args:
        model_dir: a folder holding ``model.onnx`` and ``selected_tags.csv``, or a folder with exactly one such
            sub-folder (e.g. the wd14-tagger extension's ``models/TaggerOnnx``).
        general_threshold: score (0-1) from which a general tag is kept (default 0.35).
        character_threshold: score (0-1) from which a character tag is kept (default 0.85).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).

    Raises:
        ConfigError: a threshold outside [0, 1]; onnxruntime is not installed; the files are missing or do not
            match (the message says how to get them).
    """

    def __init__(self, model_dir: Path, general_threshold: float = WD14_GENERAL_THRESHOLD,
                 character_threshold: float = WD14_CHARACTER_THRESHOLD, providers: list[str] | None = None):
        for name, value in (("general_threshold", general_threshold), ("character_threshold", character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        folder = _find_model_dir(Path(model_dir))
        if importlib.util.find_spec("onnxruntime") is None:
            raise ConfigError("WD14 tagging needs the onnxruntime package, which is not installed: run "
                              "`pip install onnxruntime` (or onnxruntime-gpu) in the WebUI's Python environment")
        import onnxruntime

        self.folder = folder
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.tags = read_selected_tags(folder / WD14_TAGS_FILE)
        try:
            self.session = onnxruntime.InferenceSession(str(folder / WD14_MODEL_FILE),
                                                        providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ConfigError(f"cannot load {folder / WD14_MODEL_FILE}: {e}") from e
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        side = inp.shape[1]
        self.side = side if isinstance(side, int) and side > 0 else 448

    def tag(self, image: Image.Image) -> dict[str, float]:
        """``{tag: score}`` above the thresholds, highest first (see :func:`select_tags`)."""
        probs = self.session.run(None, {self.input_name: wd14_input(image, self.side)})[0]
        return select_tags(probs[0], self.tags, self.general_threshold, self.character_threshold)


# ---------------------------------------------------------------------------------------------------------------
# Writing captions
# ---------------------------------------------------------------------------------------------------------------


def merge_caption(existing: str, new_tags: list[str], mode: str, trigger: str | None = None,
                  separator: str = DEFAULT_SEPARATOR) -> str | None:
    """The caption to write for one image. Pure.

    - ``skip``: None when ``existing`` has any tag (leave it), else the new tags.
    - ``overwrite``: the new tags.
    - ``prepend``: new tags, then the existing ones; ``append``: existing, then new. Repeats are dropped
      (:func:`lib_lora.tags.dedupe`, first spelling kept).
    - ``trigger``: put first (:func:`lib_lora.tags.prepend_trigger`).

    Returns:
        The caption line, or None for "do not write".

    Raises:
        ConfigError: unknown ``mode`` or a bad trigger.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    old = split_tags(existing, separator)
    if mode == "skip" and old:
        return None
    tags = new_tags if mode in ("skip", "overwrite") else new_tags + old if mode == "prepend" else old + new_tags
    tags = dedupe(tags)
    if trigger:
        tags = prepend_trigger(tags, trigger)
    return join_tags(tags, separator)


@dataclass
class TagResult:
    """What :func:`tag_folder` did.

    Attributes:
        written: ``{caption file: caption}`` written (or, for a dry run, that would be).
        kept: images whose existing caption was left alone (mode ``skip``).
        failed: ``(image, reason)`` for images that could not be read.
        dry_run: nothing was written.
    """

    written: dict[Path, str] = field(default_factory=dict)
    kept: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"dry_run": self.dry_run, "written": {str(k): v for k, v in self.written.items()},
                "kept": [str(p) for p in self.kept], "failed": [{"file": str(p), "reason": r} for p, r in self.failed]}

    def to_text(self) -> str:
        """One line per caption written and per failure, then a summary."""
        lines = [f"{p}: {c}" for p, c in self.written.items()] + [f"failed {p}: {r}" for p, r in self.failed]
        verb = "would write" if self.dry_run else "wrote"
        lines.append(f"{verb} {len(self.written)} caption(s), kept {len(self.kept)} existing, "
                     f"{len(self.failed)} failed")
        return "\n".join(lines)


def tag_folder(
    folder: Path,
    tagger: Tagger,
    mode: str = "skip",
    trigger: str | None = None,
    caption_extension: str = DEFAULT_CAPTION_EXTENSION,
    separator: str = DEFAULT_SEPARATOR,
    exclude: tuple[str, ...] = (),
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> TagResult:
    """Tags every image of a dataset folder (and its ``<repeats>_<name>`` sub-folders) into its caption file.

    In ``skip`` mode images whose caption file already holds a caption are not even decoded. Only the caption line
    (first non-empty line) of an existing file changes; the file is written as UTF-8 without BOM, atomically.

    Args:
        folder: the dataset folder.
        tagger: any :class:`Tagger`.
        mode: ``"skip"``, ``"overwrite"``, ``"prepend"`` or ``"append"`` (see :func:`merge_caption`).
        trigger: trigger word put first in every caption written, or None.
        caption_extension: ``".txt"`` or ``".caption"``.
        separator: the tag separator.
        exclude: tags never written (compared by :func:`lib_lora.tags.tag_key`).
        dry_run: compute, write nothing.
        progress: called as ``progress(done, total)`` after each image.

    Returns:
        A :class:`TagResult`.

    Raises:
        ConfigError: bad mode or trigger.
        DatasetError: the folder cannot be listed, a caption file is not UTF-8 or cannot be written.
    """
    from .tags import remove_tags

    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    result = TagResult(dry_run=dry_run)
    images = []
    for sub in dataset_image_folders(folder):
        images.extend(list_image_files(sub, (".txt", ".caption", ".npz", caption_extension.lower()))[0])
    for n, image in enumerate(images, 1):
        cap = caption_path(image, caption_extension)
        try:
            data = cap.read_bytes() if cap.is_file() else b""
        except OSError as e:
            raise DatasetError(f"cannot read caption file {cap}: {e}") from e
        parsed = parse_caption_bytes(data, f"caption file {cap}")
        if mode == "skip" and split_tags(parsed.caption, separator):
            result.kept.append(image)
        else:
            try:
                scores: Mapping[str, float] = tagger.tag(open_image(image))
            except DatasetError as e:
                result.failed.append((image, str(e)))
                scores = None
            if scores is not None:
                new_tags = remove_tags(list(scores), exclude) if exclude else list(scores)
                caption = merge_caption(parsed.caption, new_tags, mode, trigger, separator)
                if caption is not None:
                    result.written[cap] = caption
                    if not dry_run:
                        write_atomic(cap, parsed.with_caption(caption) if data else (caption + "\n").encode())
        if progress is not None:
            progress(n, len(images))
    return result
