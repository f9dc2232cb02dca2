"""The dataset doctor: checks a training folder before training and says what to fix.

Each check returns :class:`Finding` objects: the check's name, a severity (``"info"``, ``"warning"``, ``"error"``),
the files concerned (relative to the dataset folder), a sentence saying what is wrong and one saying how to fix it.
:func:`run_checks` scans the folder (:func:`lib_lora.data.dataset.scan_dataset`), measures every image once
(:func:`analyse_image`) and runs all checks; the checks themselves are pure functions of those measurements, so they
can be tested and reused by a UI without touching the disk.

Checks: ``count``, ``duplicate``, ``near_duplicate``, ``low_resolution``, ``aspect_ratio``, ``blur``, ``exposure``,
``decode``, ``skipped``, ``shared_stem``, ``caption_extension``, ``caption_encoding``, ``caption_missing``,
``caption_empty``, ``trigger_missing``, ``duplicate_tag``, ``weight_syntax``.

The image thresholds below were calibrated on the 43 real photos of the DreamBooth data set (the folders of
``/work/shared/data/dreambooth``: 687 to 2048 pixel squares of pets, objects and one cartoon) and on damaged copies
of them; each constant says which numbers it sits between.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from .data.captions import CAPTION_EXTENSIONS, DEFAULT_CAPTION_EXTENSION, DEFAULT_SEPARATOR, split_tags
from .data.images import SkippedFile, list_image_files, open_image, probe_image
from .errors import ConfigError, DatasetError
from .tags import dataset_image_folders, duplicate_tags, has_weight_syntax, parse_caption_bytes, tag_key

SEVERITIES = ("info", "warning", "error")

#: Images wanted per LoRA kind, ``(at least, at most)``; None means no upper bound. These are the ranges of the
#: community training guides the project's issue 6 cites: a person needs 30-50 varied photos to separate the face
#: from clothes and backgrounds; an anime character 10-30 clean images (taggers describe them well); a style 100 or
#: more so that no single subject dominates; any other concept at least 15. Fewer is a warning (it can work, with
#: more repeats and a higher risk of overfitting), none is an error, more than the upper bound only an info.
KIND_IMAGE_COUNTS: dict[str, tuple[int, int | None]] = {
    "person": (30, 50),
    "anime": (10, 30),
    "style": (100, None),
    "concept": (15, None),
}
KINDS = tuple(KIND_IMAGE_COUNTS)

#: Longer side, in pixels, of the grayscale copy that sharpness and exposure are measured on (box-filtered, never
#: enlarged). Fixed so that the blur threshold means the same for a 700 px and a 4000 px photo; 512 is the smallest
#: training resolution, so blur that survives this downscale is blur the model will see.
ANALYSIS_SIDE = 512

#: An image is blurred when the variance of its Laplacian (4-neighbour kernel, 0-255 gray levels, on the
#: :data:`ANALYSIS_SIDE` copy) is below this. The 43 DreamBooth photos measure 91 (a dark, soft-lit cat) to 1511;
#: Gaussian-blurred copies (radius 4 pixels at full size) measure 1.7 to 42 (the 2048 px cartoon, whose blur shrinks
#: 4x in the downscale). 60 sits between the two with a margin of about 1.5x on each side.
BLUR_THRESHOLD = 60.0

#: Two images are near-duplicates when the Hamming distance of their 64-bit perceptual hashes
#: (``imagehash.phash``) is at most this. On the DreamBooth set, different shots of the same subject are 16 or more
#: apart (dog 02/03, cartoon 00/01); copies re-encoded as JPEG quality 70 or resized to 90 % are 0-2 apart, 12 at
#: worst (the flat cartoon on white). 12 catches those copies and keeps distinct shots apart.
NEAR_DUPLICATE_MAX_DISTANCE = 12

#: Longer side / shorter side above which an image is reported. At 2.5:1 the bucket's short side at a 512 px
#: training resolution is about 512 / sqrt(2.5) = 324 px, so the subject gets few latent pixels, and beyond it the
#: bucket range (256-1024 px by default) forces a crop that can cut the subject out.
ASPECT_RATIO_MAX = 2.5

#: Shorter side below ``resolution * LOW_RESOLUTION_ERROR_FRACTION`` is an error (the image is upscaled more than 2x,
#: which trains the LoRA on blur); below ``resolution`` a warning.
LOW_RESOLUTION_ERROR_FRACTION = 0.5

#: An image is very dark when its 99th percentile gray level (0-255) is below this: even its highlights are dark.
#: The darkest DreamBooth photos keep highlights at 128 (the black cat) and 172 (a black teapot on black); the
#: photos darkened to 10 % brightness reach 25 at most.
DARK_P99 = 50

#: Gray level counted as clipped white, and the share of clipped pixels, together with a 5th percentile above
#: :data:`BLOWN_P5` (the shadows are lifted too), that make an image blown out. A cartoon on white is 78 % clipped
#: but keeps its dark lines (5th percentile 53-66), so both conditions are needed; no DreamBooth photo has more than
#: 20 % clipped pixels, while the dog photos brightened 1.8x have 25-75 % with a 5th percentile of 118-181
#: (the three above 50 % are reported).
BLOWN_CLIPPED_LEVEL = 250
BLOWN_CLIPPED_FRACTION = 0.5
BLOWN_P5 = 100

#: Strong backlight: at least :data:`BACKLIT_FRACTION` of the pixels darker than :data:`BACKLIT_DARK_LEVEL` and as
#: many brighter than :data:`BACKLIT_BRIGHT_LEVEL` (a dark silhouette against a bright sky). The closest DreamBooth
#: photo, a dark teapot on white, has 23 % / 59 %. Reported as info, because a dark object on a white backdrop has
#: the same histogram.
BACKLIT_DARK_LEVEL = 50
BACKLIT_BRIGHT_LEVEL = 230
BACKLIT_FRACTION = 0.35

#: Files listed per finding in :meth:`Report.to_text` (JSON lists them all).
TEXT_MAX_FILES = 8

_LITTER_REASONS = ("macOS", "hidden")


@dataclass(frozen=True)
class Finding:
    """One problem found.

    Attributes:
        check: the check's name, e.g. ``"blur"``.
        severity: ``"info"`` (worth knowing), ``"warning"`` (training works, the result may suffer) or ``"error"``
            (fix before training).
        files: the files concerned, relative to the dataset folder (``/``-separated); one group for duplicates.
        message: what is wrong.
        fix: what to do.
    """

    check: str
    severity: str
    files: tuple[str, ...]
    message: str
    fix: str

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "files", tuple(self.files))

    def to_dict(self) -> dict:
        """``{"check", "severity", "files", "message", "fix"}``, JSON-ready."""
        return {
            "check": self.check,
            "severity": self.severity,
            "files": list(self.files),
            "message": self.message,
            "fix": self.fix,
        }


@dataclass
class Report:
    """All findings for one folder.

    Attributes:
        folder: the dataset folder.
        kind: the LoRA kind checked against (one of :data:`KINDS`).
        resolution: the training resolution in pixels.
        num_images: usable images (without repeats).
        findings: in check order.
    """

    folder: Path
    kind: str
    resolution: int
    num_images: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """``{"images": usable images, "error": n, "warning": n, "info": n}``."""
        out = {"images": self.num_images}
        for severity in reversed(SEVERITIES):
            out[severity] = sum(f.severity == severity for f in self.findings)
        return out

    @property
    def exit_code(self) -> int:
        """2 when there is an error, 1 when there is a warning, else 0 (infos do not count)."""
        severities = {f.severity for f in self.findings}
        return 2 if "error" in severities else 1 if "warning" in severities else 0

    def to_dict(self) -> dict:
        """``{"findings": [{"check", "severity", "files", "message", "fix"}, ...], "counts": {...}}``."""
        return {"findings": [f.to_dict() for f in self.findings], "counts": self.counts}

    def to_json(self, indent: int | None = 1) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_text(self) -> str:
        """A report for a terminal: errors, then warnings, then infos, each with its fix and files."""
        lines = [f"{self.folder}: {self.num_images} images, checked as a {self.kind} LoRA at {self.resolution} px"]
        order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            lines.append(f"{f.severity.upper():7} [{f.check}] {f.message}")
            if f.files:
                shown = ", ".join(f.files[:TEXT_MAX_FILES])
                more = len(f.files) - TEXT_MAX_FILES
                lines.append(f"        files: {shown}" + (f" (+{more} more)" if more > 0 else ""))
            if f.fix:
                lines.append(f"        fix: {f.fix}")
        c = self.counts
        verdict = "errors to fix" if c["error"] else "warnings" if c["warning"] else "ok"
        lines.append(f"{verdict}: {c['error']} error(s), {c['warning']} warning(s), {c['info']} info")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Image measurements
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageStats:
    """What the image checks need to know about one image; made by :func:`analyse_image`.

    Attributes:
        name: the file, relative to the dataset folder.
        size: ``(width, height)`` in pixels, upright.
        sha256: hex digest of the decoded RGB pixels and the size (so a PNG re-saved losslessly is a duplicate).
        phash: ``imagehash.phash`` as 16 hex digits (64 bits).
        sharpness: variance of the Laplacian on the :data:`ANALYSIS_SIDE` gray copy (NaN below 3x3 pixels).
        p5, p99: 5th and 99th percentile gray levels (0-255) of that copy.
        clipped: share of its pixels at or above :data:`BLOWN_CLIPPED_LEVEL`.
        dark: share below :data:`BACKLIT_DARK_LEVEL`.
        bright: share above :data:`BACKLIT_BRIGHT_LEVEL`.
    """

    name: str
    size: tuple[int, int]
    sha256: str
    phash: str
    sharpness: float
    p5: float
    p99: float
    clipped: float
    dark: float
    bright: float


def analysis_gray(img: Image.Image, side: int = ANALYSIS_SIDE) -> np.ndarray:
    """The image as gray levels (float64, 0-255), box-downscaled so its longer side is at most ``side`` pixels
    (never enlarged). Pure."""
    gray = img.convert("L")
    scale = side / max(gray.size)
    if scale < 1:
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        gray = gray.resize(size, Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.float64)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` over the interior pixels of a 2-D gray
    array (0-255); the usual focus measure (Pech-Pacheco et al. 2000). NaN when the array is smaller than 3x3. Pure.
    """
    if gray.ndim != 2 or min(gray.shape) < 3:
        return float("nan")
    lap = gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4.0 * gray[1:-1, 1:-1]
    return float(lap.var())


def analyse_image(img: Image.Image, name: str) -> ImageStats:
    """Measures one decoded image for the image checks. Pure.

    Args:
        img: the upright RGB image (:func:`lib_lora.data.images.open_image`).
        name: its path relative to the dataset folder.

    Returns:
        An :class:`ImageStats`.
    """
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    gray = analysis_gray(rgb)
    p5, p99 = np.percentile(gray, [5, 99])
    return ImageStats(
        name=name,
        size=rgb.size,
        sha256=digest,
        phash=str(imagehash.phash(rgb)),
        sharpness=laplacian_variance(gray),
        p5=float(p5),
        p99=float(p99),
        clipped=float((gray >= BLOWN_CLIPPED_LEVEL).mean()),
        dark=float((gray < BACKLIT_DARK_LEVEL).mean()),
        bright=float((gray > BACKLIT_BRIGHT_LEVEL).mean()),
    )


def hamming(hex_a: str, hex_b: str) -> int:
    """Bits that differ between two hex hashes of the same length. Pure."""
    return (int(hex_a, 16) ^ int(hex_b, 16)).bit_count()


# ---------------------------------------------------------------------------------------------------------------
# Image checks (pure)
# ---------------------------------------------------------------------------------------------------------------


def check_count(num_images: int, kind: str = "concept") -> list[Finding]:
    """``count``: the number of usable images against :data:`KIND_IMAGE_COUNTS` for the kind.

    Error at 0, warning below the minimum, info above the maximum.

    Raises:
        ConfigError: unknown kind.
    """
    if kind not in KIND_IMAGE_COUNTS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    low, high = KIND_IMAGE_COUNTS[kind]
    wanted = f"{low}-{high}" if high else f"at least {low}"
    if num_images == 0:
        return [Finding("count", "error", (), "no usable images", "add images (PNG, JPEG, WebP, BMP or GIF)")]
    if num_images < low:
        return [
            Finding(
                "count",
                "warning",
                (),
                f"{num_images} images; a {kind} LoRA wants {wanted}",
                f"add {low - num_images} or more varied images, or expect overfitting (raise repeats with care)",
            )
        ]
    if high is not None and num_images > high:
        return [
            Finding(
                "count",
                "info",
                (),
                f"{num_images} images; a {kind} LoRA usually needs {wanted}",
                "keep the best and most varied ones; more images of the same kind only lengthen training",
            )
        ]
    return []


def _groups(names: Sequence[str], pairs: Iterable[tuple[int, int]]) -> list[list[str]]:
    """Connected groups (size >= 2) of the index pairs, in file order."""
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def check_duplicates(stats: Sequence[ImageStats]) -> list[Finding]:
    """``duplicate``: images with identical decoded pixels (same :attr:`ImageStats.sha256`), one warning per group.
    A duplicate trains its image twice as often as the others."""
    by_hash: dict[str, list[str]] = {}
    for s in stats:
        by_hash.setdefault(s.sha256, []).append(s.name)
    return [
        Finding(
            "duplicate",
            "warning",
            group,
            f"{len(group)} files have identical pixels",
            f"keep one of them, e.g. {group[0]}",
        )
        for group in by_hash.values()
        if len(group) > 1
    ]


def check_near_duplicates(
    stats: Sequence[ImageStats], max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE
) -> list[Finding]:
    """``near_duplicate``: groups of images whose perceptual hashes differ by at most ``max_distance`` bits
    (default :data:`NEAR_DUPLICATE_MAX_DISTANCE`), one warning per group.

    Exact duplicates are not paired with each other here (``duplicate`` reports them), but a group may hold them
    when a third, re-encoded or resized copy joins. Pairs are joined transitively. O(n^2) hash comparisons.
    """
    names = [s.name for s in stats]
    pairs = [
        (i, j)
        for i in range(len(stats))
        for j in range(i + 1, len(stats))
        if stats[i].sha256 != stats[j].sha256 and hamming(stats[i].phash, stats[j].phash) <= max_distance
    ]
    return [
        Finding(
            "near_duplicate",
            "warning",
            group,
            f"{len(group)} images look the same (re-encoded, resized or burst shots)",
            f"keep the sharpest, largest one; near-copies weigh that picture {len(group)}x and push overfitting",
        )
        for group in _groups(names, pairs)
    ]


def _size(s: ImageStats) -> str:
    return f"{s.name} ({s.size[0]}x{s.size[1]})"


def check_resolution(stats: Sequence[ImageStats], resolution: int = 512) -> list[Finding]:
    """``low_resolution``: shorter side below ``resolution`` pixels (warning) or below
    ``resolution * LOW_RESOLUTION_ERROR_FRACTION`` (error); one finding per severity.

    Raises:
        ConfigError: ``resolution`` is not positive.
    """
    if resolution <= 0:
        raise ConfigError(f"resolution must be > 0 pixels, got {resolution}")
    floor = resolution * LOW_RESOLUTION_ERROR_FRACTION
    errors = [s for s in stats if min(s.size) < floor]
    warnings = [s for s in stats if floor <= min(s.size) < resolution]
    out = []
    if errors:
        out.append(
            Finding(
                "low_resolution",
                "error",
                [s.name for s in errors],
                f"{len(errors)} image(s) have a shorter side below half the training resolution ({floor:g} px): "
                + ", ".join(_size(s) for s in errors[:3]),
                "replace them with larger originals or remove them; upscaling more than 2x trains the LoRA on blur",
            )
        )
    if warnings:
        out.append(
            Finding(
                "low_resolution",
                "warning",
                [s.name for s in warnings],
                f"{len(warnings)} image(s) have a shorter side below the training resolution ({resolution} px): "
                + ", ".join(_size(s) for s in warnings[:3]),
                "use larger originals, or upscale them with a good upscaler before training",
            )
        )
    return out


def check_aspect_ratio(stats: Sequence[ImageStats], max_ratio: float = ASPECT_RATIO_MAX) -> list[Finding]:
    """``aspect_ratio``: images whose longer side is more than ``max_ratio`` (default :data:`ASPECT_RATIO_MAX`)
    times the shorter one; one warning."""
    wide = [s for s in stats if max(s.size) > max_ratio * min(s.size)]
    if not wide:
        return []
    return [
        Finding(
            "aspect_ratio",
            "warning",
            [s.name for s in wide],
            f"{len(wide)} image(s) are more elongated than {max_ratio:g}:1: " + ", ".join(_size(s) for s in wide[:3]),
            "crop them around the subject (or split a strip into several images)",
        )
    ]


def check_blur(stats: Sequence[ImageStats], threshold: float = BLUR_THRESHOLD) -> list[Finding]:
    """``blur``: images whose :attr:`ImageStats.sharpness` is below ``threshold`` (default :data:`BLUR_THRESHOLD`);
    one warning."""
    blurred = [s for s in stats if s.sharpness < threshold]
    if not blurred:
        return []
    listed = ", ".join(f"{s.name} ({s.sharpness:.0f})" for s in blurred[:3])
    return [
        Finding(
            "blur",
            "warning",
            [s.name for s in blurred],
            f"{len(blurred)} image(s) look blurred (Laplacian variance below {threshold:g}): {listed}",
            "remove them or replace them with sharp ones; the LoRA learns blur as part of the subject",
        )
    ]


def check_exposure(stats: Sequence[ImageStats]) -> list[Finding]:
    """``exposure``: very dark images (99th percentile below :data:`DARK_P99`: warning), blown-out ones (over
    :data:`BLOWN_CLIPPED_FRACTION` clipped white and 5th percentile above :data:`BLOWN_P5`: warning) and strongly
    backlit ones (:data:`BACKLIT_FRACTION` both very dark and very bright: info); one finding per kind."""
    dark = [s for s in stats if s.p99 < DARK_P99]
    blown = [s for s in stats if s.clipped > BLOWN_CLIPPED_FRACTION and s.p5 > BLOWN_P5]
    backlit = [
        s for s in stats if s.dark >= BACKLIT_FRACTION and s.bright >= BACKLIT_FRACTION and s not in dark + blown
    ]
    out = []
    if dark:
        out.append(
            Finding(
                "exposure",
                "warning",
                [s.name for s in dark],
                f"{len(dark)} image(s) are very dark (even the highlights are below gray level {DARK_P99}/255)",
                "brighten them (levels/curves) or replace them; dark images teach the LoRA murky colours",
            )
        )
    if blown:
        out.append(
            Finding(
                "exposure",
                "warning",
                [s.name for s in blown],
                f"{len(blown)} image(s) are blown out (over {BLOWN_CLIPPED_FRACTION:.0%} clipped white, no shadows)",
                "replace them with properly exposed ones; clipped detail cannot be learnt",
            )
        )
    if backlit:
        out.append(
            Finding(
                "exposure",
                "info",
                [s.name for s in backlit],
                f"{len(backlit)} image(s) look strongly backlit (a dark subject against a bright background)",
                "if the subject is a silhouette, lift its shadows or replace the image",
            )
        )
    return out


def check_decode(bad: Sequence[SkippedFile], root: Path) -> list[Finding]:
    """``decode``: image files that fail to decode (corrupt or truncated; the scan's ``bad_images``), one error."""
    if not bad:
        return []
    names = [_rel(f.path, root) for f in bad]
    reasons = "; ".join(f"{n}: {f.reason}" for n, f in list(zip(names, bad))[:3])
    return [
        Finding(
            "decode",
            "error",
            names,
            f"{len(bad)} image(s) cannot be decoded and are left out of training: {reasons}",
            "re-export or re-download them, or delete them",
        )
    ]


def check_skipped(skipped: Sequence[SkippedFile], root: Path) -> list[Finding]:
    """``skipped``: files and folders the scan does not use, one finding per reason: info for files that are not
    images, warning for the rest (unsupported formats such as HEIC, folders without the ``<repeats>_`` prefix,
    images at the root of a Kohya layout, ...). macOS litter and hidden files are not reported."""
    by_reason: dict[str, list[str]] = {}
    for f in skipped:
        if f.reason.startswith(_LITTER_REASONS):
            continue
        by_reason.setdefault(f.reason, []).append(_rel(f.path, root))
    out = []
    for reason, names in by_reason.items():
        not_image = reason.startswith("not an image")
        out.append(
            Finding(
                "skipped",
                "info" if not_image else "warning",
                names,
                f"{len(names)} not used for training: {reason}",
                "nothing to do" if not_image else "convert, rename or move them if they were meant for training",
            )
        )
    return out


def check_shared_stems(names: Sequence[str]) -> list[Finding]:
    """``shared_stem``: images of one folder with the same name but another extension (``a.png`` and ``a.jpg``):
    they share one caption file and one latent cache file; one warning per stem."""
    by_stem: dict[str, list[str]] = {}
    for name in names:
        p = Path(name)
        by_stem.setdefault(str(p.parent / p.stem), []).append(name)
    return [
        Finding(
            "shared_stem",
            "warning",
            group,
            f"{len(group)} images share the name '{Path(stem).name}' and so one caption file",
            "rename all but one of them",
        )
        for stem, group in by_stem.items()
        if len(group) > 1
    ]


# ---------------------------------------------------------------------------------------------------------------
# Caption checks (pure)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionInfo:
    """The caption files of one image.

    Attributes:
        image: the image, relative to the dataset folder.
        captions: ``{extension: caption line}`` for each readable caption file (``""`` when empty).
        unreadable: ``{extension: reason}`` for caption files that cannot be read or are not UTF-8.
    """

    image: str
    captions: dict[str, str]
    unreadable: dict[str, str] = field(default_factory=dict)

    def file(self, extension: str) -> str:
        """The caption file name for ``extension``, relative to the dataset folder."""
        p = Path(self.image)
        return str(p.with_name(p.stem + extension).as_posix())


def effective_caption_extension(infos: Sequence[CaptionInfo], caption_extension: str) -> str:
    """The extension the caption checks read: the configured one when any image has such a file; else the known
    extension most images have (so a mismatch is reported once and the captions are still checked). Pure."""
    if not infos or any(caption_extension in i.captions for i in infos):
        return caption_extension
    counts = {ext: sum(ext in i.captions for i in infos) for ext in CAPTION_EXTENSIONS}
    best = max(counts, key=lambda e: counts[e])
    return best if counts[best] else caption_extension


def check_caption_extension(infos: Sequence[CaptionInfo], caption_extension: str) -> list[Finding]:
    """``caption_extension``: images with a caption file of another known extension (``.txt`` vs ``.caption``) but
    none of the configured one. Training ignores those captions: an error when no image has the configured
    extension (every caption is ignored), else a warning."""
    others = [e for e in CAPTION_EXTENSIONS if e != caption_extension]
    mismatched = [(i, e) for i in infos if caption_extension not in i.captions for e in others if e in i.captions]
    if not mismatched:
        return []
    files = [i.file(e) for i, e in mismatched]
    used = {e for _, e in mismatched}
    if not any(caption_extension in i.captions for i in infos):
        best = max(used, key=lambda e: sum(x == e for _, x in mismatched))
        return [
            Finding(
                "caption_extension",
                "error",
                files,
                f"no image has a {caption_extension} caption but {len(files)} have {'/'.join(sorted(used))} ones: "
                "training would ignore every caption",
                f"set caption_extension={best} (--caption-extension {best}) or rename the files",
            )
        ]
    return [
        Finding(
            "caption_extension",
            "warning",
            files,
            f"{len(files)} caption file(s) use {'/'.join(sorted(used))} instead of {caption_extension}: training "
            "ignores them",
            f"rename them to {caption_extension}",
        )
    ]


def _has_trigger(caption: str, trigger: str, separator: str) -> bool:
    """The trigger is a tag of the caption (by key), or a whole word/phrase inside it (``a photo of sks dog``)."""
    key = tag_key(trigger)
    if any(tag_key(t) == key for t in split_tags(caption, separator)):
        return True
    return re.search(r"(?<!\w)" + re.escape(trigger.strip()) + r"(?!\w)", caption, flags=re.IGNORECASE) is not None


def check_captions(
    infos: Sequence[CaptionInfo],
    caption_extension: str = DEFAULT_CAPTION_EXTENSION,
    trigger: str | None = None,
    separator: str = DEFAULT_SEPARATOR,
) -> list[Finding]:
    """The caption checks, on the captions of :func:`effective_caption_extension`:

    - ``caption_extension``: see :func:`check_caption_extension`.
    - ``caption_encoding`` (error): caption files that cannot be read or are not UTF-8 (the scan stops on them).
    - ``caption_missing`` (warning): some images have a caption file and others none. A set without any caption
      file is not reported: it trains on the folder's class tokens and trigger word, a valid choice.
    - ``caption_empty`` (warning): the caption file has no text.
    - ``trigger_missing`` (warning, only with ``trigger``): the caption lacks the trigger word as a tag or as a
      whole word.
    - ``duplicate_tag`` (warning): a tag twice in one caption (compared by :func:`lib_lora.tags.tag_key`).
    - ``weight_syntax`` (warning): prompt syntax such as ``(tag:1.2)`` or ``((tag))`` left in a caption; it is
      trained on as text.

    Pure.
    """
    out = check_caption_extension(infos, caption_extension)
    unreadable = [(i.file(e), reason) for i in infos for e, reason in i.unreadable.items()]
    if unreadable:
        out.append(
            Finding(
                "caption_encoding",
                "error",
                [name for name, _ in unreadable],
                f"{len(unreadable)} caption file(s) cannot be read: {unreadable[0][1]}",
                "save them as UTF-8 text",
            )
        )
    ext = effective_caption_extension(infos, caption_extension)
    with_file = [i for i in infos if ext in i.captions]
    mismatched = {i.image for i in infos if ext not in i.captions and any(e in i.captions for e in CAPTION_EXTENSIONS)}
    missing = [i for i in infos if ext not in i.captions and i.image not in mismatched]
    if with_file and missing:
        out.append(
            Finding(
                "caption_missing",
                "warning",
                [i.image for i in missing],
                f"{len(missing)} of {len(infos)} images have no {ext} caption file (they train on the folder's "
                "class tokens, or an empty caption)",
                f"caption them (a {ext} file with the image's name) or remove them",
            )
        )
    empty = [i for i in with_file if not i.captions[ext].strip()]
    if empty:
        out.append(
            Finding(
                "caption_empty",
                "warning",
                [i.file(ext) for i in empty],
                f"{len(empty)} caption file(s) are empty",
                "write the captions, or delete the files to train those images on the class tokens",
            )
        )
    texts = [(i, i.captions[ext]) for i in with_file if i.captions[ext].strip()]
    if trigger and trigger.strip():
        lacking = [i for i, text in texts if not _has_trigger(text, trigger, separator)]
        if lacking:
            out.append(
                Finding(
                    "trigger_missing",
                    "warning",
                    [i.file(ext) for i in lacking],
                    f"{len(lacking)} of {len(texts)} captions lack the trigger word '{trigger.strip()}'",
                    f"run: python -m lib_lora tags DIR --trigger '{trigger.strip()}' (or set trigger_words, which "
                    "prepends it at training time)",
                )
            )
    dupes = [(i, duplicate_tags(split_tags(text, separator))) for i, text in texts]
    dupes = [(i, d) for i, d in dupes if d]
    if dupes:
        example = f"'{dupes[0][1][0]}' in {dupes[0][0].file(ext)}"
        out.append(
            Finding(
                "duplicate_tag",
                "warning",
                [i.file(ext) for i, _ in dupes],
                f"{len(dupes)} caption(s) repeat a tag, e.g. {example}",
                "run: python -m lib_lora tags DIR --dedupe",
            )
        )
    weighted = [i for i, text in texts if any(has_weight_syntax(t) for t in split_tags(text, separator))]
    if weighted:
        out.append(
            Finding(
                "weight_syntax",
                "warning",
                [i.file(ext) for i in weighted],
                f"{len(weighted)} caption(s) contain prompt weights or emphasis like (tag:1.2); captions are not "
                "prompts, the syntax is trained on as text",
                "run: python -m lib_lora tags DIR --normalise",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running everything
# ---------------------------------------------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _read_caption_line(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read caption file {path}: {e}") from e
    return parse_caption_bytes(data, f"caption file {path}").caption


def caption_info(image: Path, root: Path) -> CaptionInfo:
    """Reads the caption files (every known extension) of one image; unreadable ones are recorded, not raised."""
    captions, unreadable = {}, {}
    for ext in CAPTION_EXTENSIONS:
        path = image.with_name(image.stem + ext)
        if path.is_file():
            try:
                captions[ext] = _read_caption_line(path)
            except DatasetError as e:
                unreadable[ext] = str(e)
    return CaptionInfo(_rel(image, root), captions, unreadable)


def _scan(folder: Path, caption_extension: str) -> tuple[list[Path], list[SkippedFile], list[SkippedFile]]:
    """``(usable image paths, bad images, other skipped files)`` via :func:`scan_dataset`.

    The scan raises on what the doctor must report instead: a caption-extension mismatch, a caption file that is not
    UTF-8, a folder without usable images. So it scans again with the other caption extension, then falls back to
    listing and probing the files itself (``<repeats>_<name>`` sub-folders included).
    """
    from .data.dataset import ScanOptions, scan_dataset  # imports torch

    for ext in dict.fromkeys((caption_extension, *CAPTION_EXTENSIONS)):
        try:
            report = scan_dataset(folder, ScanOptions(caption_extension=ext))
        except DatasetError:
            continue
        bad = {f.path for f in report.bad_images}
        other = [f for f in report.skipped if f.path not in bad]
        return [r.path for r in report.images], list(report.bad_images), other
    usable, bad_images, skipped = [], [], []
    for sub in dataset_image_folders(folder):
        paths, other = list_image_files(sub)
        skipped.extend(other)
        for path in paths:
            try:
                probe_image(path)
                usable.append(path)
            except DatasetError as e:
                bad_images.append(SkippedFile(path, str(e).removeprefix(f"{path.name}: ")))
    return usable, bad_images, skipped


def run_checks(
    folder: Path,
    kind: str = "concept",
    resolution: int = 512,
    trigger: str | None = None,
    caption_extension: str = DEFAULT_CAPTION_EXTENSION,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Runs every check on a dataset folder (plain, or Kohya ``<repeats>_<name>`` layout).

    Each usable image is decoded once more after the scan and measured by :func:`analyse_image` (a few tens of
    milliseconds per photo).

    Args:
        folder: the dataset folder.
        kind: ``"person"``, ``"anime"``, ``"style"`` or ``"concept"`` (see :data:`KIND_IMAGE_COUNTS`).
        resolution: the training resolution in pixels (512 for SD1, 768 for SD2, 1024 for SDXL).
        trigger: the trigger word to look for in the captions, or None.
        caption_extension: the caption extension training will use (``".txt"`` or ``".caption"``).
        progress: called as ``progress(done, total)`` after each image is measured.

    Returns:
        A :class:`Report`.

    Raises:
        ConfigError: unknown ``kind``, ``resolution`` not positive, or a bad ``caption_extension``.
        DatasetError: ``folder`` is not a folder or cannot be listed.
    """
    if kind not in KIND_IMAGE_COUNTS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if resolution <= 0:
        raise ConfigError(f"resolution must be > 0 pixels, got {resolution}")
    if not caption_extension.startswith(".") or len(caption_extension) < 2:
        raise ConfigError(f"caption_extension must look like '.txt' or '.caption', got {caption_extension!r}")
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    paths, bad, skipped = _scan(root, caption_extension)
    stats: list[ImageStats] = []
    for i, path in enumerate(paths):
        try:
            stats.append(analyse_image(open_image(path), _rel(path, root)))
        except DatasetError as e:  # changed on disk since the scan
            bad.append(SkippedFile(path, str(e).removeprefix(f"{path.name}: ")))
        if progress is not None:
            progress(i + 1, len(paths))
    ok = {s.name for s in stats}
    infos = [caption_info(p, root) for p in paths if _rel(p, root) in ok]
    findings = [
        *check_count(len(stats), kind),
        *check_decode(bad, root),
        *check_skipped(skipped, root),
        *check_shared_stems([s.name for s in stats]),
        *check_duplicates(stats),
        *check_near_duplicates(stats),
        *check_resolution(stats, resolution),
        *check_aspect_ratio(stats),
        *check_blur(stats),
        *check_exposure(stats),
        *check_captions(infos, caption_extension, trigger),
    ]
    return Report(folder=root, kind=kind, resolution=resolution, num_images=len(stats), findings=findings)
