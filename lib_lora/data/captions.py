"""Caption files and caption processing, as sd-scripts does it, with every random choice on an injected RNG.

sd-scripts ``BaseDataset.process_caption`` uses the global ``random``; here each function that draws takes a
``random.Random``, so a caption's processing for a given seed and epoch is reproducible and unit-testable.

Only :func:`find_caption_file` and :func:`read_caption_file` touch the disk; everything else is pure.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DatasetError

#: Caption extensions the folder scan knows. The WebUI/kohya_ss GUI default is ``.txt``; the sd-scripts CLI
#: default is ``.caption``; a mismatch silently trains on class tokens only, so the scan checks both.
CAPTION_EXTENSIONS = (".txt", ".caption")

DEFAULT_CAPTION_EXTENSION = ".txt"
DEFAULT_SEPARATOR = ","


def caption_path(image_path: Path, extension: str = DEFAULT_CAPTION_EXTENSION) -> Path:
    """The caption file name sd-scripts pairs with an image: ``<image stem><extension>`` in the same folder.

    Args:
        image_path: the image file.
        extension: the caption extension with its dot, e.g. ``".txt"`` or ``".caption"``.

    Returns:
        The path (which may not exist).
    """
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + extension)


def find_caption_file(image_path: Path, extension: str = DEFAULT_CAPTION_EXTENSION) -> Path | None:
    """Returns the image's caption file if it exists as a file, else None (sd-scripts ``read_caption``)."""
    path = caption_path(image_path, extension)
    return path if path.is_file() else None


def first_caption_line(text: str) -> str:
    """The caption sd-scripts trains on: the first line of the file, stripped (here the first **non-empty** one).

    A leading UTF-8 BOM is removed and CRLF / CR line ends are handled.

    Args:
        text: the whole caption file.

    Returns:
        The stripped first non-empty line, or ``""`` when there is none.
    """
    text = text.removeprefix("\ufeff")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def read_caption_file(path: Path) -> str:
    """Reads a caption file as UTF-8 (BOM allowed) and returns :func:`first_caption_line` of it.

    Raises:
        DatasetError: the file cannot be read or is not valid UTF-8; the message names the file.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read caption file {path}: {e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"caption file {path} is not UTF-8 text ({e}); save it as UTF-8") from e
    return first_caption_line(text)


def split_tags(caption: str, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    """Splits a caption into stripped, non-empty tags on ``separator`` (sd-scripts ``caption_separator``)."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def join_tags(tags: Iterable[str], separator: str = DEFAULT_SEPARATOR) -> str:
    """Joins tags with ``separator`` plus one space: ``", "`` for ``","``, ``"; "`` for ``";"``.

    sd-scripts always re-joins with ``", "``; joining with the configured separator keeps a ``;``-separated caption
    ``;``-separated.
    """
    return (separator.rstrip() + " ").join(tags)


def add_trigger_words(caption: str, trigger_words: Sequence[str], separator: str = DEFAULT_SEPARATOR) -> str:
    """Prepends the trigger words the caption lacks, in the order given.

    A trigger counts as present when a tag of the caption equals it, case-insensitively (``"SKS dog"`` matches
    ``"sks dog"``); substrings do not count. The rest of the caption is left untouched.

    Args:
        caption: the caption.
        trigger_words: words or phrases, e.g. ``["sks dog"]``; empty ones are ignored.
        separator: the tag separator.

    Returns:
        The caption with the missing triggers first, e.g. ``"sks dog, a photo"``.
    """
    present = {t.lower() for t in split_tags(caption, separator)}
    missing: list[str] = []
    for word in trigger_words:
        word = word.strip()
        if word and word.lower() not in present:
            missing.append(word)
            present.add(word.lower())
    if not missing:
        return caption
    return join_tags([*missing, caption] if caption.strip() else missing, separator)


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are changed each time an item is fetched (sd-scripts subset options of the same names).

    Attributes:
        separator: tag separator (``caption_separator``), default ``","``.
        keep_tokens: number of leading tags never shuffled nor dropped (``keep_tokens``; counts tags, not CLIP
            tokens). Trigger words are prepended first, so ``keep_tokens=1`` keeps the trigger in front.
        shuffle: shuffle the other tags (``shuffle_caption``).
        tag_dropout_rate: chance in [0, 1] to drop each non-kept tag (``caption_tag_dropout_rate``).
        caption_dropout_rate: chance in [0, 1] that the whole caption becomes ``""`` (``caption_dropout_rate``).
        dropout_every_n_epochs: when > 0, the caption is ``""`` on every epoch divisible by it
            (``caption_dropout_every_n_epochs``).
        trigger_words: prepended where missing (see :func:`add_trigger_words`).

    Raises:
        ConfigError: a rate is outside [0, 1], ``keep_tokens`` or ``dropout_every_n_epochs`` is negative, or the
            separator is empty.
    """

    separator: str = DEFAULT_SEPARATOR
    keep_tokens: int = 0
    shuffle: bool = False
    tag_dropout_rate: float = 0.0
    caption_dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    trigger_words: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.separator or not self.separator.strip():
            raise ConfigError(f"caption separator must be a visible string, got {self.separator!r}")
        for name in ("tag_dropout_rate", "caption_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.keep_tokens < 0:
            raise ConfigError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if self.dropout_every_n_epochs < 0:
            raise ConfigError(f"dropout_every_n_epochs must be >= 0, got {self.dropout_every_n_epochs}")
        object.__setattr__(self, "trigger_words", tuple(self.trigger_words))


def shuffle_and_drop_tags(tags: Sequence[str], options: CaptionOptions, rng: random.Random) -> list[str]:
    """Keeps the first ``keep_tokens`` tags, shuffles the rest if asked, then drops each of them with
    ``tag_dropout_rate`` (the order of sd-scripts ``process_caption``).

    Args:
        tags: the split caption.
        options: the caption options.
        rng: the random source (one ``shuffle`` call, then one ``random()`` per non-kept tag when dropout is on).

    Returns:
        The new tag list.
    """
    fixed = list(tags[: options.keep_tokens])
    flex = list(tags[options.keep_tokens :])
    if options.shuffle:
        rng.shuffle(flex)
    if options.tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= options.tag_dropout_rate]
    return fixed + flex


def process_caption(caption: str, options: CaptionOptions, rng: random.Random, epoch: int | None = None) -> str:
    """Turns an image's stored caption into the text trained on this time (sd-scripts ``process_caption``).

    Steps: trigger words are prepended where missing; whole-caption dropout (``caption_dropout_rate``, or an epoch
    divisible by ``dropout_every_n_epochs``) returns ``""``; then, only if shuffling or tag dropout is on, the
    caption is split on the separator, :func:`shuffle_and_drop_tags` is applied and the tags are re-joined with
    ``separator + " "``. With neither on, the caption is returned as stored (``keep_tokens`` alone does nothing,
    as in sd-scripts).

    Args:
        caption: the stored caption (first line of the caption file, or the folder's class tokens).
        options: the caption options.
        rng: the random source; draws happen in a fixed order, so a seeded ``rng`` gives reproducible captions.
        epoch: the epoch number, used only by ``dropout_every_n_epochs``.

    Returns:
        The caption text.
    """
    caption = add_trigger_words(caption, options.trigger_words, options.separator)
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    if options.dropout_every_n_epochs > 0 and epoch is not None and epoch % options.dropout_every_n_epochs == 0:
        dropped = True
    if dropped:
        return ""
    if not (options.shuffle or options.tag_dropout_rate > 0):
        return caption
    tags = shuffle_and_drop_tags(split_tags(caption, options.separator), options, rng)
    return join_tags(tags, options.separator)


def count_tags(captions: Iterable[str], separator: str = DEFAULT_SEPARATOR) -> dict[str, int]:
    """Counts tags over captions the way sd-scripts fills ``ss_tag_frequency`` for one folder.

    sd-scripts ``BaseDataset.set_tag_frequency``: each caption is split (on ``","`` there; on ``separator`` here),
    tags are stripped and lower-cased, empty ones skipped. A tag is counted once per occurrence in a caption, one
    caption per image (repeats do not multiply counts).

    Args:
        captions: the raw captions, one per image.
        separator: the tag separator.

    Returns:
        ``{tag: count}`` in first-seen order.
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption, separator):
            tag = tag.lower()
            counts[tag] = counts.get(tag, 0) + 1
    return counts
