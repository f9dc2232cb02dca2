"""Tag cleaning for caption files: normalise, dedupe, drop conflicts, remove/replace/add, trigger word, prune hints.

A caption is a list of tags separated by ``","`` (sd-scripts ``caption_separator``). Everything here up to
:func:`edit_caption` is pure and works on tag lists or caption strings; :func:`edit_folder` applies one edit to every
caption file of a dataset folder, with a dry run, writing each file atomically (temp file + rename) as UTF-8.

Tags are compared by a *key*: :func:`normalise` with underscores read as spaces, lower-cased. So ``"Long_Hair"``,
``"long hair"`` and ``"(long hair:1.2)"`` are the same tag for :func:`dedupe`, :func:`remove_tags`,
:func:`replace_tags`, :func:`drop_conflicts` and :func:`suggest_prune`; the spelling kept is the first one seen.

Importing this module does not import torch.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data.captions import DEFAULT_CAPTION_EXTENSION, DEFAULT_SEPARATOR, caption_path, join_tags, split_tags
from .data.images import list_image_files
from .errors import ConfigError, DatasetError

#: Default share of captions a tag must appear in for :func:`suggest_prune` to suggest deleting it. At 0.5 a tag
#: describes most of the set, which is what "always true of the subject" looks like in a tagged dataset; rarer tags
#: describe variation that the captions should keep.
DEFAULT_PRUNE_THRESHOLD = 0.5

#: Kaomoji tags whose underscores are part of the tag (SmilingWolf's WD14 tagger list); ``underscores_to_spaces``
#: leaves them alone.
KAOMOJIS = frozenset(
    (
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
        "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    )
)  # fmt: skip

#: Pairs of tags that cannot both describe one image, although automatic taggers (WD14, DeepDanbooru) emit them
#: together on ambiguous pictures. The pairs follow the Danbooru tag definitions (hair length groups, expression,
#: framing, time of day, place, count of people). Kept short on purpose: only pairs that are contradictory on every
#: image belong here. :func:`drop_conflicts` keeps the first tag of a pair and drops the later one.
CONFLICTS: tuple[tuple[str, str], ...] = (
    ("long hair", "short hair"),
    ("very long hair", "short hair"),
    ("medium hair", "very long hair"),
    ("smile", "frown"),
    ("open mouth", "closed mouth"),
    ("closed eyes", "open eyes"),
    ("solo", "multiple girls"),
    ("solo", "multiple boys"),
    ("solo", "2girls"),
    ("solo", "2boys"),
    ("full body", "upper body"),
    ("full body", "portrait"),
    ("full body", "close-up"),
    ("day", "night"),
    ("indoors", "outdoors"),
    ("standing", "sitting"),
    ("monochrome", "full color"),
)

# ``(text:1.2)``, ``(text: -0.5)``; not preceded by a backslash (``\(`` is a literal parenthesis in a prompt).
_WEIGHT_RE = re.compile(r"(?<!\\)\(\s*([^()]*?)\s*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*(?<!\\)\)")
_SPACES_RE = re.compile(r"\s+")
_PAIRS = {"(": ")", "[": "]", "{": "}"}


def _outer_pair_wraps_all(tag: str) -> bool:
    """True when the tag's first character opens a bracket that its last character closes (``(a)``, ``((a))``,
    ``[a]``), so the brackets are emphasis around the whole tag; ``(a) (b)`` and ``\\(a\\)`` are not wrapped."""
    if len(tag) < 2 or tag[0] not in _PAIRS or tag[-1] != _PAIRS[tag[0]] or tag[-2] == "\\":
        return False
    depth = 0
    for i, ch in enumerate(tag):
        if ch == tag[0] and (i == 0 or tag[i - 1] != "\\"):
            depth += 1
        elif ch == tag[-1] and tag[i - 1] != "\\":
            depth -= 1
            if depth == 0 and i != len(tag) - 1:
                return False
    return depth == 0


def _strip_emphasis(tag: str) -> str:
    """Removes prompt weights ``(text:1.2)`` anywhere, then brackets wrapping the whole tag, repeatedly."""
    tag = tag.strip()
    while True:
        before = tag
        tag = _WEIGHT_RE.sub(lambda m: m.group(1), tag).strip()
        if _outer_pair_wraps_all(tag):
            tag = tag[1:-1].strip()
        if tag == before:
            return tag


def normalise(tag: str, underscores_to_spaces: bool = False) -> str:
    """Cleans one tag: prompt weights and emphasis brackets out, spaces collapsed, ends trimmed.

    - ``"(red hat:1.2)"`` -> ``"red hat"`` (a weight is prompt syntax; in a caption it is trained on as text).
      Weights are removed anywhere in the tag, so a sentence ``"a (red hat:1.2) on a man"`` loses it too.
    - ``"((red hat))"``, ``"[red hat]"``, ``"{red hat}"`` -> ``"red hat"``: only brackets wrapping the **whole** tag
      are emphasis; ``"kafka (honkai: star rail)"`` and escaped ``"\\(cosplay\\)"`` are kept as they are.
    - ``"  red   hat "`` -> ``"red hat"``.
    - with ``underscores_to_spaces``: ``"long_hair"`` -> ``"long hair"`` (Danbooru spelling to prompt spelling),
      except the kaomojis of :data:`KAOMOJIS` (``"^_^"``).

    Case is kept. Pure; raises nothing.

    Args:
        tag: one tag (not a whole comma-separated caption).
        underscores_to_spaces: turn ``_`` into spaces.

    Returns:
        The cleaned tag (``""`` when nothing is left).
    """
    tag = _strip_emphasis(_SPACES_RE.sub(" ", tag))
    if underscores_to_spaces and tag not in KAOMOJIS:
        tag = tag.replace("_", " ")
    return _SPACES_RE.sub(" ", tag).strip()


def has_weight_syntax(tag: str) -> bool:
    """True when the tag carries a prompt weight ``(tag:1.2)`` or brackets wrapping the whole tag (``((tag))``),
    i.e. when :func:`normalise` would remove syntax from it. Pure."""
    return _strip_emphasis(tag) != tag.strip()


def tag_key(tag: str) -> str:
    """The comparison key of a tag: :func:`normalise` with underscores as spaces, lower-cased. Pure."""
    return normalise(tag, underscores_to_spaces=True).lower()


def dedupe(tags: Iterable[str]) -> list[str]:
    """Drops repeated tags, keeping the first spelling at its first place.

    ``["red hat", "red hat", "1girl"]`` -> ``["red hat", "1girl"]``; ``"Red_Hat"`` and ``"(red hat:1.2)"`` count as
    repeats of ``"red hat"`` (see :func:`tag_key`). Empty tags are dropped. Pure.
    """
    seen: set[str] = set()
    out: list[str] = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def duplicate_tags(tags: Iterable[str]) -> list[str]:
    """The tags that occur more than once (by :func:`tag_key`), each once, in first-seen spelling. Pure."""
    seen: dict[str, str] = {}
    repeated: dict[str, str] = {}
    for tag in tags:
        key = tag_key(tag)
        if not key:
            continue
        if key in seen:
            repeated.setdefault(key, seen[key])
        else:
            seen[key] = tag
    return list(repeated.values())


def find_conflicts(tags: Iterable[str], conflicts: Sequence[tuple[str, str]] = CONFLICTS) -> list[tuple[str, str]]:
    """The pairs of :data:`CONFLICTS` present in ``tags``, as ``(earlier tag, later tag)`` in the tags' spelling."""
    position: dict[str, tuple[int, str]] = {}
    for i, tag in enumerate(tags):
        position.setdefault(tag_key(tag), (i, tag))
    found = []
    for a, b in conflicts:
        pa, pb = position.get(tag_key(a)), position.get(tag_key(b))
        if pa is not None and pb is not None:
            first, second = sorted((pa, pb))
            found.append((first[1], second[1]))
    return found


def drop_conflicts(tags: Iterable[str], conflicts: Sequence[tuple[str, str]] = CONFLICTS) -> list[str]:
    """Removes the later tag of each conflicting pair (see :data:`CONFLICTS`).

    The earlier tag is kept because taggers write tags in decreasing confidence (WD14 sorts by score), so the first
    of two contradictory tags is the more likely one. ``["long hair", "smile", "short hair"]`` ->
    ``["long hair", "smile"]``. Pure.

    Args:
        tags: the caption's tags.
        conflicts: the pairs to apply (default :data:`CONFLICTS`).

    Returns:
        The tags without the dropped ones, order kept.
    """
    tags = list(tags)
    dropped = {tag_key(later) for _, later in find_conflicts(tags, conflicts)}
    return [t for t in tags if tag_key(t) not in dropped]


def remove_tags(tags: Iterable[str], remove: Iterable[str]) -> list[str]:
    """Removes every tag whose :func:`tag_key` equals that of one of ``remove``. Pure.

    ``remove_tags(["sks", "brown hair", "Brown_Hair"], ["brown hair"])`` -> ``["sks"]``.
    """
    keys = {tag_key(t) for t in remove}
    return [t for t in tags if tag_key(t) not in keys]


def replace_tags(tags: Iterable[str], mapping: Mapping[str, str]) -> list[str]:
    """Replaces tags by key: ``{"blonde hair": "yellow hair"}`` turns every spelling of ``blonde hair`` into
    ``yellow hair``. A replacement that is empty removes the tag. Repeats it creates are kept (use :func:`dedupe`).
    Pure."""
    keyed = {tag_key(old): new.strip() for old, new in mapping.items()}
    out = []
    for tag in tags:
        new = keyed.get(tag_key(tag), tag)
        if new:
            out.append(new)
    return out


def add_tags(tags: Iterable[str], add: Iterable[str]) -> list[str]:
    """Appends the tags of ``add`` that are not present yet (by key), in the order given. Pure."""
    out = list(tags)
    keys = {tag_key(t) for t in out}
    for tag in add:
        key = tag_key(tag)
        if key and key not in keys:
            keys.add(key)
            out.append(tag.strip())
    return out


def prepend_trigger(tags: Iterable[str], trigger: str) -> list[str]:
    """Puts the trigger word first, removing its other occurrences (by key).

    First place matters: with ``keep_tokens=1`` and shuffled captions, only the first tag keeps its place. Pure.

    Args:
        tags: the caption's tags.
        trigger: the trigger word or phrase (one tag, e.g. ``"sks"`` or ``"sks dog"``).

    Returns:
        ``[trigger, *other tags]``.

    Raises:
        ConfigError: ``trigger`` is empty or contains the ``","`` separator.
    """
    trigger = trigger.strip()
    if not trigger or DEFAULT_SEPARATOR in trigger:
        raise ConfigError(f"the trigger word must be one non-empty tag without ',', got {trigger!r}")
    key = tag_key(trigger)
    return [trigger, *(t for t in tags if tag_key(t) != key)]


def tag_frequency(captions: Iterable[str], separator: str = DEFAULT_SEPARATOR) -> dict[str, int]:
    """In how many captions each tag appears (a tag twice in one caption counts once).

    Unlike :func:`lib_lora.data.captions.count_tags` (``ss_tag_frequency``, which counts occurrences), this counts
    captions, which is what a share of the dataset means. Tags are grouped by :func:`tag_key` and shown in their
    first spelling. Pure.

    Returns:
        ``{tag: captions}``, most frequent first (ties in first-seen order).
    """
    counts: dict[str, int] = {}
    spelling: dict[str, str] = {}
    for caption in captions:
        for key in {tag_key(t): None for t in split_tags(caption, separator)}:
            if key:
                counts[key] = counts.get(key, 0) + 1
        for tag in split_tags(caption, separator):
            spelling.setdefault(tag_key(tag), normalise(tag))
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])
    return {spelling[k]: n for k, n in ordered}


def suggest_prune(
    captions: Sequence[str],
    threshold: float = DEFAULT_PRUNE_THRESHOLD,
    trigger: str | Iterable[str] | None = None,
    separator: str = DEFAULT_SEPARATOR,
) -> list[tuple[str, int, float]]:
    """Tags worth deleting so that the trigger word learns them.

    A tag present in at least ``threshold`` of the captions describes the subject itself (``brown hair`` on every
    picture of one person). Left in the captions, it stays a separate prompt word and the LoRA only shows it when
    prompted; deleted, the feature is bound into the trigger word. Rarer tags describe what varies (clothes,
    background) and should stay so that they remain promptable. The trigger itself is never suggested.

    Args:
        captions: one caption per image.
        threshold: share of captions in (0, 1]; default :data:`DEFAULT_PRUNE_THRESHOLD` (0.5).
        trigger: the trigger word(s) to leave out.
        separator: the tag separator.

    Returns:
        ``[(tag, captions containing it, fraction)]``, most frequent first; ``[]`` for no captions.

    Raises:
        ConfigError: ``threshold`` is outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
    if not captions:
        return []
    triggers = [trigger] if isinstance(trigger, str) else list(trigger or ())
    excluded = {tag_key(t) for t in triggers}
    total = len(captions)
    out = []
    for tag, count in tag_frequency(captions, separator).items():
        if tag_key(tag) in excluded:
            continue
        fraction = count / total
        if fraction >= threshold:
            out.append((tag, count, fraction))
    return out


@dataclass(frozen=True)
class TagEdit:
    """One edit applied to every caption, in this order: normalise, replace, remove, dedupe, drop conflicts, add,
    trigger first.

    Attributes:
        trigger: put first (see :func:`prepend_trigger`); None leaves the order alone.
        remove: tags to delete (:func:`remove_tags`).
        replace: ``{old: new}`` (:func:`replace_tags`).
        add: tags to append where missing (:func:`add_tags`).
        dedupe: drop repeated tags (:func:`dedupe`).
        normalise: clean every tag (:func:`normalise`).
        underscores_to_spaces: with ``normalise``, turn ``_`` into spaces.
        drop_conflicts: drop the later tag of conflicting pairs (:func:`drop_conflicts`).
        separator: the tag separator.
    """

    trigger: str | None = None
    remove: tuple[str, ...] = ()
    replace: Mapping[str, str] = field(default_factory=dict)
    add: tuple[str, ...] = ()
    dedupe: bool = False
    normalise: bool = False
    underscores_to_spaces: bool = False
    drop_conflicts: bool = False
    separator: str = DEFAULT_SEPARATOR


def edit_caption(caption: str, edit: TagEdit) -> str:
    """Applies a :class:`TagEdit` to one caption line and re-joins it with ``separator + " "``. Pure.

    Raises:
        ConfigError: a bad trigger word (see :func:`prepend_trigger`).
    """
    tags = split_tags(caption, edit.separator)
    if edit.normalise:
        tags = [normalise(t, edit.underscores_to_spaces) for t in tags]
        tags = [t for t in tags if t]
    if edit.replace:
        tags = replace_tags(tags, edit.replace)
    if edit.remove:
        tags = remove_tags(tags, edit.remove)
    if edit.dedupe:
        tags = dedupe(tags)
    if edit.drop_conflicts:
        tags = drop_conflicts(tags)
    if edit.add:
        tags = add_tags(tags, edit.add)
    if edit.trigger is not None:
        tags = prepend_trigger(tags, edit.trigger)
    return join_tags(tags, edit.separator)


# ---------------------------------------------------------------------------------------------------------------
# Caption files
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionFile:
    """A caption file split into the line that is trained on and the rest.

    Attributes:
        lines: the file's lines without line ends (a UTF-8 BOM removed).
        index: the index of the first non-empty line (the caption; sd-scripts trains on it), or 0 for a file
            without any.
        trailing_newline: the file ended with a line end.
    """

    lines: tuple[str, ...]
    index: int
    trailing_newline: bool

    @property
    def caption(self) -> str:
        """The caption line, stripped (``""`` for an empty file)."""
        return self.lines[self.index].strip() if self.lines else ""

    def with_caption(self, caption: str) -> bytes:
        """The file's new bytes: UTF-8 without BOM, ``\\n`` line ends, the caption line replaced."""
        lines = list(self.lines) or [""]
        lines[self.index] = caption
        text = "\n".join(lines) + ("\n" if self.trailing_newline else "")
        return text.encode("utf-8")


def parse_caption_bytes(data: bytes, name: str = "caption file") -> CaptionFile:
    """Splits a caption file's bytes (UTF-8, BOM allowed, LF, CRLF or CR line ends) into a :class:`CaptionFile`.

    Raises:
        DatasetError: the bytes are not UTF-8; the message names ``name``.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{name} is not UTF-8 text ({e}); save it as UTF-8") from e
    lines = tuple(text.splitlines())
    index = next((i for i, line in enumerate(lines) if line.strip()), 0)
    return CaptionFile(lines, index, text.endswith(("\n", "\r")))


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a hidden temp file in the same folder and ``os.replace``, so a crash
    leaves the old file or the new one, never half of one. The old file's permission bits are kept.

    Raises:
        DatasetError: the folder is not writable or the disk is full; the temp file is removed.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise DatasetError(f"cannot write {path}: {e}") from e


@dataclass(frozen=True)
class CaptionChange:
    """One caption file an edit changes.

    Attributes:
        path: the caption file.
        before: its caption line before.
        after: its caption line after (equal to ``before`` when only a BOM or CRLF line ends were cleaned).
    """

    path: Path
    before: str
    after: str


@dataclass
class FolderEdit:
    """What :func:`edit_folder` did (or would do, for a dry run).

    Attributes:
        changes: the caption files whose bytes change.
        unchanged: caption files left as they are.
        missing: images without a caption file (never created).
        dry_run: nothing was written.
    """

    changes: list[CaptionChange] = field(default_factory=list)
    unchanged: int = 0
    missing: list[Path] = field(default_factory=list)
    dry_run: bool = False


def dataset_image_folders(folder: Path) -> list[Path]:
    """The folders whose images a dataset uses: ``folder`` itself and its ``<repeats>_<name>`` sub-folders.

    Raises:
        DatasetError: ``folder`` is not a folder.
    """
    from .data.dataset import parse_subset_dir_name  # imports torch; only needed here

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist or is not a folder")
    subs = [p for p in sorted(folder.iterdir()) if p.is_dir() and parse_subset_dir_name(p.name) is not None]
    return [folder, *subs]


def caption_files(folder: Path, caption_extension: str = DEFAULT_CAPTION_EXTENSION) -> tuple[list[Path], list[Path]]:
    """Pairs the dataset's images with their caption files (``<image stem><caption_extension>``).

    Only captions of images count, so a ``notes.txt`` lying in the folder is never touched. Images are found by
    content in ``folder`` and its ``<repeats>_<name>`` sub-folders (see
    :func:`~lib_lora.data.images.list_image_files`).

    Returns:
        ``(caption files, images without one)``.

    Raises:
        DatasetError: ``folder`` is not a folder or cannot be listed.
    """
    found, missing = [], []
    for sub in dataset_image_folders(folder):
        images, _ = list_image_files(sub, (".txt", ".caption", ".npz", caption_extension.lower()))
        for image in images:
            path = caption_path(image, caption_extension)
            if path.is_file():
                found.append(path)
            else:
                missing.append(image)
    return found, missing


def read_captions(folder: Path, caption_extension: str = DEFAULT_CAPTION_EXTENSION) -> dict[Path, str]:
    """``{caption file: caption line}`` for every caption file of the dataset (see :func:`caption_files`).

    Raises:
        DatasetError: the folder cannot be listed, or a caption file cannot be read or is not UTF-8.
    """
    out = {}
    for path in caption_files(folder, caption_extension)[0]:
        out[path] = _read(path).caption
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read caption file {path}: {e}") from e


def _read(path: Path) -> CaptionFile:
    return parse_caption_bytes(_read_bytes(path), f"caption file {path}")


def edit_folder(
    folder: Path, edit: TagEdit, caption_extension: str = DEFAULT_CAPTION_EXTENSION, dry_run: bool = False
) -> FolderEdit:
    """Applies :func:`edit_caption` to the caption line of every caption file of a dataset folder.

    Only the caption line (the first non-empty one) changes; other lines are kept. A file is rewritten only when its
    bytes change; it is written as UTF-8 without BOM with ``\\n`` line ends (sd-scripts reads captions as plain
    ``utf-8``, so a BOM would become part of the first tag), atomically (:func:`write_atomic`). Images without a
    caption file are listed, not given one.

    Args:
        folder: the dataset folder (plain or Kohya ``<repeats>_<name>`` layout).
        edit: what to do.
        caption_extension: ``".txt"`` or ``".caption"``.
        dry_run: compute and return the changes without writing anything.

    Returns:
        A :class:`FolderEdit`.

    Raises:
        DatasetError: the folder cannot be listed, a caption file cannot be read, is not UTF-8 or cannot be written
            (files written before the failure stay written).
        ConfigError: a bad trigger word.
    """
    result = FolderEdit(dry_run=dry_run)
    paths, result.missing = caption_files(folder, caption_extension)
    planned = []
    for path in paths:
        data = _read_bytes(path)
        parsed = parse_caption_bytes(data, f"caption file {path}")
        after = edit_caption(parsed.caption, edit)
        new = parsed.with_caption(after)
        if new == data:
            result.unchanged += 1
            continue
        planned.append((path, new))
        result.changes.append(CaptionChange(path, parsed.caption, after))
    if not dry_run:
        for path, new in planned:
            write_atomic(path, new)
    return result
