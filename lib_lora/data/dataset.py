"""Training data: the folder scan (Kohya layout), and the item pipeline with latent caching.

Part 1, the scan (:func:`scan_dataset`), reads the folders once, before training: it pairs images with captions,
decodes every image in full, and returns a :class:`DatasetReport` that a UI can show and that answers
``ss_dataset_dirs`` and ``ss_tag_frequency``. Everything that would make a run useless is raised here, as
:class:`~lib_lora.errors.DatasetError`, not found mid-training. Sources: sd-scripts
``config_util.generate_dreambooth_subsets_config_by_subdirs`` (``<repeats>_<class tokens>`` folders),
``DreamBoothDataset.__init__`` and ``read_caption``.

Part 2, the pipeline (:class:`TrainDataset`), turns the scanned images into training batches: bucket per image,
pixels resized and cropped, optional flip, latents from an injected ``encode`` callable, cached in memory or on
disk in sd-scripts' npz format, captions processed per epoch, batches built inside buckets in a seeded order.
Sources: sd-scripts ``BaseDataset.make_buckets`` / ``__getitem__`` / ``cache_latents`` and
``strategy_sd.SdSdxlLatentsCachingStrategy``.

Random crop and latent caching do not mix (the crop would be frozen into the cache): as in sd-scripts, asking for
both raises :class:`~lib_lora.errors.ConfigError`; ``cache="none"`` encodes every batch and allows random crop.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DatasetError
from .buckets import (
    BucketAssignment,
    BucketSpec,
    Size,
    bucket_info,
    count_epoch_batches,
    crop_offset,
    get_crop_ltrb,
    make_epoch_batches,
    predefined_buckets,
    select_bucket,
)
from .captions import (
    CAPTION_EXTENSIONS,
    DEFAULT_CAPTION_EXTENSION,
    DEFAULT_SEPARATOR,
    CaptionOptions,
    count_tags,
    find_caption_file,
    process_caption,
    read_caption_file,
)
from .images import SIDECAR_EXTENSIONS, SkippedFile, list_image_files, open_image, probe_image, resize_and_crop

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("skip", "stop")
CACHE_MODES = ("memory", "disk", "none")
Progress = Callable[[int, int], None]
Encoder = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Part 1: scan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanOptions:
    """How a dataset folder is read.

    Attributes:
        caption_extension: ``".txt"`` (default, the WebUI/GUI convention) or ``".caption"`` (sd-scripts CLI default),
            or another extension starting with a dot.
        repeats: ``num_repeats`` for a plain folder of images (Kohya ``N_name`` folders carry their own).
        class_tokens: caption for uncaptioned images of a plain folder (Kohya folders use their name's tokens).
        on_bad_image: ``"skip"`` (warn and go on) or ``"stop"`` (raise, listing the files) for corrupt or truncated
            images.
        separator: tag separator for :meth:`DatasetReport.tag_frequency`.

    Raises:
        ConfigError: a bad value; the message names it and the allowed values.
    """

    caption_extension: str = DEFAULT_CAPTION_EXTENSION
    repeats: int = 1
    class_tokens: str = ""
    on_bad_image: str = "skip"
    separator: str = DEFAULT_SEPARATOR

    def __post_init__(self):
        ext = self.caption_extension
        if not ext.startswith(".") or len(ext) < 2 or "/" in ext or "\\" in ext:
            raise ConfigError(f"caption_extension must look like '.txt' or '.caption', got {ext!r}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image (sd-scripts ``ImageInfo`` at scan time).

    Attributes:
        path: the image file.
        size: ``(width, height)`` in pixels after EXIF orientation.
        caption: the stored caption: the first non-empty line of the caption file, else the folder's class tokens.
        caption_source: ``"file"``, ``"class_tokens"`` (no caption file, or an empty one) or ``"none"`` (neither).
        subset: the subset folder's name, e.g. ``"10_sks dog"`` (the ``ss_dataset_dirs`` key).
        repeats: ``num_repeats`` of the subset.
    """

    path: Path
    size: Size
    caption: str
    caption_source: str
    subset: str
    repeats: int


@dataclass
class SubsetReport:
    """One subset folder as scanned.

    Attributes:
        name: folder name (``ss_dataset_dirs`` key), e.g. ``"10_sks dog"``.
        path: the folder.
        repeats: ``num_repeats``.
        class_tokens: e.g. ``"sks dog"``; the caption of images without a caption file.
        images: usable images, sorted by file name.
        skipped: files of this folder not used, with reasons (corrupt images included).
        caption_counts: ``{extension: images having a caption file with it}`` for ``.txt``, ``.caption`` and the
            configured extension.
    """

    name: str
    path: Path
    repeats: int
    class_tokens: str
    images: list[ImageRecord] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    caption_counts: dict[str, int] = field(default_factory=dict)

    @property
    def image_count(self) -> int:
        """Usable images, without repeats (``img_count``)."""
        return len(self.images)

    @property
    def images_with_repeats(self) -> int:
        """Usable images x repeats."""
        return len(self.images) * self.repeats


@dataclass
class DatasetReport:
    """What :func:`scan_dataset` found; everything a UI needs to show before training.

    Attributes:
        root: the folder scanned.
        layout: ``"kohya"`` (``N_name`` sub-folders), ``"subset_folder"`` (``root`` is itself an ``N_name`` folder)
            or ``"plain"`` (a folder of images, with ``ScanOptions.repeats``).
        caption_extension: the extension used.
        subsets: the subsets used.
        skipped: every file or folder not used, with the reason (across subsets and the root).
        bad_images: the corrupt or truncated images among ``skipped``.
        warnings: sentences for the user about things skipped or suspicious.
        notes: informational sentences (e.g. how the layout was understood).
    """

    root: Path
    layout: str
    caption_extension: str
    subsets: list[SubsetReport] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    bad_images: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[ImageRecord]:
        """All usable images, subset by subset."""
        return [r for s in self.subsets for r in s.images]

    @property
    def num_images(self) -> int:
        """Usable images without repeats."""
        return sum(s.image_count for s in self.subsets)

    @property
    def num_train_images(self) -> int:
        """Images x repeats (``ss_num_train_images``)."""
        return sum(s.images_with_repeats for s in self.subsets)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """``ss_dataset_dirs``: ``{"10_sks dog": {"n_repeats": 10, "img_count": 5}}``."""
        return {s.name: {"n_repeats": s.repeats, "img_count": s.image_count} for s in self.subsets}

    def tag_frequency(self, separator: str = DEFAULT_SEPARATOR) -> dict[str, dict[str, int]]:
        """``ss_tag_frequency``: ``{folder name: {tag: count}}`` over the stored captions, one per image
        (:func:`~lib_lora.data.captions.count_tags`; trigger words added at training time are not counted)."""
        return {s.name: count_tags((r.caption for r in s.images), separator) for s in self.subsets}

    def to_dict(self) -> dict:
        """A JSON-ready summary for a UI: per-subset counts, totals, skipped files with reasons, warnings."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "caption_extension": self.caption_extension,
            "subsets": [
                {
                    "name": s.name,
                    "repeats": s.repeats,
                    "class_tokens": s.class_tokens,
                    "images": s.image_count,
                    "images_with_repeats": s.images_with_repeats,
                    "captions": dict(s.caption_counts),
                    "skipped": len(s.skipped),
                }
                for s in self.subsets
            ],
            "num_images": self.num_images,
            "num_train_images": self.num_train_images,
            "skipped": [{"path": str(f.path), "reason": f.reason} for f in self.skipped],
            "bad_images": [str(f.path) for f in self.bad_images],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def parse_subset_dir_name(name: str) -> tuple[int, str] | None:
    """Splits a Kohya subset folder name ``<repeats>_<class tokens>`` (sd-scripts
    ``extract_repeats_and_class_tokens``).

    Args:
        name: the folder name, e.g. ``"10_sks dog"``.

    Returns:
        ``(repeats, class tokens)``, e.g. ``(10, "sks dog")``; everything after the first ``_`` is the class tokens
        (spaces and further underscores kept, outer spaces stripped). None when the name does not start with digits
        and ``_``.
    """
    m = re.fullmatch(r"(\d+)_(.*)", name, flags=re.DOTALL)
    if m is None:
        return None
    return int(m.group(1)), m.group(2).strip()


def caption_mismatch_message(counts: dict[str, int], configured: str, num_images: int) -> str | None:
    """The error text when the configured caption extension matches no file but another known one does.

    Args:
        counts: ``{extension: images with such a caption file}``.
        configured: the configured extension.
        num_images: usable images.

    Returns:
        E.g. ``"0 .txt captions, 5 .caption captions for 5 images: set caption_extension=.caption"``, or None
        when there is no mismatch.
    """
    if counts.get(configured, 0) > 0:
        return None
    others = [e for e in CAPTION_EXTENSIONS if e != configured and counts.get(e, 0) > 0]
    if not others:
        return None
    best = max(others, key=lambda e: counts[e])
    listed = ", ".join(f"{counts.get(e, 0)} {e} captions" for e in (configured, *others))
    return f"{listed} for {num_images} images: set caption_extension={best}"


def _subset_folders(root: Path, options: ScanOptions, report: DatasetReport) -> list[tuple[Path, int, str]]:
    """Decides the layout and returns ``[(folder, repeats, class tokens)]``; fills warnings, notes, skipped."""
    dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    kohya, others = [], []
    for d in dirs:
        if d.name == "__MACOSX" or d.name.startswith("."):
            reason = "macOS archive metadata (__MACOSX folder)" if d.name == "__MACOSX" else "hidden folder"
            report.skipped.append(SkippedFile(d, reason))
            continue
        parsed = parse_subset_dir_name(d.name)
        (kohya if parsed is not None else others).append((d, parsed))
    if kohya:
        report.layout = "kohya"
        for d, _ in others:
            report.skipped.append(SkippedFile(d, "folder name lacks the '<repeats>_' prefix (e.g. '10_sks dog')"))
        if others:
            names = ", ".join(d.name for d, _ in others)
            report.warnings.append(f"skipped folders without the '<repeats>_' prefix: {names}")
        root_images, _ = list_image_files(root, _ignored_extensions(options))
        for p in root_images:
            report.skipped.append(SkippedFile(p, "image at the dataset root next to '<repeats>_name' folders"))
        if root_images:
            names = ", ".join(p.name for p in root_images)
            report.warnings.append(f"skipped images at the root next to '<repeats>_name' folders: {names}")
        subsets = []
        for d, (repeats, tokens) in kohya:
            if repeats < 1:
                report.skipped.append(SkippedFile(d, "0 repeats"))
                report.warnings.append(f"skipped folder {d.name}: 0 repeats")
                continue
            subsets.append((d, repeats, tokens))
        return subsets
    parsed_root = parse_subset_dir_name(root.name)
    if parsed_root is not None and parsed_root[0] >= 1:
        report.layout = "subset_folder"
        repeats, tokens = parsed_root
        report.notes.append(
            f"'{root.name}' is itself a Kohya subset folder: using it as one subset with {repeats} repeats "
            f"and class tokens '{tokens}'"
        )
        folder = (root, repeats, tokens)
    else:
        report.layout = "plain"
        folder = (root, options.repeats, options.class_tokens.strip())
    if others:
        names = ", ".join(d.name for d, _ in others)
        report.warnings.append(
            f"sub-folders are not scanned: {names} (name them '<repeats>_<class tokens>' to use them as subsets)"
        )
        for d, _ in others:
            report.skipped.append(SkippedFile(d, "sub-folder of a plain image folder (not scanned)"))
    return [folder]


def _is_litter_dir(path: Path) -> bool:
    """``__MACOSX`` and hidden folders, never reported as unscanned sub-folders."""
    return path.name == "__MACOSX" or path.name.startswith(".")


def _ignored_extensions(options: ScanOptions) -> tuple[str, ...]:
    return (*SIDECAR_EXTENSIONS, options.caption_extension.lower())


def _stored_caption(image: Path, options: ScanOptions, class_tokens: str, counts: dict[str, int]) -> tuple[str, str]:
    """Finds the image's caption; counts which caption extensions exist for it. Returns ``(caption, source)``."""
    for ext in dict.fromkeys((*CAPTION_EXTENSIONS, options.caption_extension)):
        if find_caption_file(image, ext) is not None:
            counts[ext] = counts.get(ext, 0) + 1
    path = find_caption_file(image, options.caption_extension)
    caption = read_caption_file(path) if path is not None else ""
    if caption:
        return caption, "file"
    return (class_tokens, "class_tokens") if class_tokens else ("", "none")


def _scan_subset(
    folder: Path, repeats: int, tokens: str, options: ScanOptions, report: DatasetReport, progress: Progress | None
) -> SubsetReport:
    subset = SubsetReport(name=folder.name, path=folder, repeats=repeats, class_tokens=tokens)
    subset.caption_counts = {ext: 0 for ext in dict.fromkeys((*CAPTION_EXTENSIONS, options.caption_extension))}
    paths, skipped = list_image_files(folder, _ignored_extensions(options))
    subset.skipped.extend(skipped)
    if report.layout == "kohya":
        nested = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and not _is_litter_dir(p)]
        if nested:
            report.warnings.append(f"{folder.name}: sub-folders are not scanned: {', '.join(nested)}")
    for i, path in enumerate(paths):
        try:
            info = probe_image(path)
        except DatasetError as e:
            bad = SkippedFile(path, str(e).removeprefix(f"{path.name}: "))
            subset.skipped.append(bad)
            report.bad_images.append(bad)
        else:
            caption, source = _stored_caption(path, options, tokens, subset.caption_counts)
            subset.images.append(ImageRecord(path, info.size, caption, source, folder.name, repeats))
        if progress is not None:
            progress(i + 1, len(paths))
    return subset


def _check_stems(subset: SubsetReport, report: DatasetReport) -> None:
    """Warns when two images of a folder share a stem: they share the caption file and the latent cache name."""
    seen: dict[str, str] = {}
    for r in subset.images:
        if r.path.stem in seen:
            report.warnings.append(
                f"{subset.name}: {seen[r.path.stem]} and {r.path.name} share the name '{r.path.stem}' "
                f"(and so the caption file and the disk latent cache); rename one"
            )
        seen.setdefault(r.path.stem, r.path.name)


def scan_dataset(root: Path, options: ScanOptions | None = None, progress: Progress | None = None) -> DatasetReport:
    """Scans a training folder: layout, images (decoded in full), captions, problems.

    Layouts (sd-scripts ``generate_dreambooth_subsets_config_by_subdirs``):

    - ``root`` holds ``<repeats>_<class tokens>`` folders (``10_sks dog``): each is a subset. Sibling folders
      without the prefix and images lying at the root are skipped with a warning naming them.
    - ``root`` is itself such a folder: used as one subset with its repeats and class tokens (a note says so).
    - otherwise ``root`` is a plain image folder: one subset with ``options.repeats`` and ``options.class_tokens``.

    Only files directly in a subset folder are used; ``._*`` files, ``__MACOSX/`` and hidden files are skipped.
    Images are chosen by content and decoded in full (:func:`~lib_lora.data.images.probe_image`).

    Args:
        root: the dataset folder.
        options: the scan options (defaults: ``.txt`` captions, 1 repeat, skip bad images).
        progress: called as ``progress(done, total)`` after each image of each subset.

    Returns:
        A :class:`DatasetReport`.

    Raises:
        DatasetError: ``root`` is not a folder; the configured caption extension matches no caption file while the
            other one does (``"0 .txt captions, 5 .caption captions for 5 images: set caption_extension=.caption"``);
            corrupt or truncated images with ``on_bad_image="stop"`` (listing them); no usable image.
        ConfigError: bad options.
    """
    options = options or ScanOptions()
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    report = DatasetReport(root=root, layout="plain", caption_extension=options.caption_extension)
    for folder, repeats, tokens in _subset_folders(root, options, report):
        subset = _scan_subset(folder, repeats, tokens, options, report, progress)
        report.skipped.extend(subset.skipped)
        _check_stems(subset, report)
        if subset.images:
            report.subsets.append(subset)
        else:
            report.warnings.append(f"{folder.name}: no usable images, folder skipped")
        if subset.images and all(r.caption_source == "none" for r in subset.images):
            report.warnings.append(f"{folder.name}: no captions and no class tokens; images train on an empty caption")
    _raise_on_problems(report, options)
    for w in report.warnings:
        logger.warning("%s", w)
    return report


def _raise_on_problems(report: DatasetReport, options: ScanOptions) -> None:
    counts: dict[str, int] = {}
    for s in report.subsets:
        for ext, n in s.caption_counts.items():
            counts[ext] = counts.get(ext, 0) + n
    mismatch = caption_mismatch_message(counts, options.caption_extension, report.num_images)
    if mismatch is not None:
        raise DatasetError(mismatch)
    if report.bad_images:
        listed = "; ".join(f"{f.path.parent.name}/{f.path.name} ({f.reason})" for f in report.bad_images)
        if options.on_bad_image == "stop":
            raise DatasetError(f"{len(report.bad_images)} corrupt or truncated image(s): {listed}")
        report.warnings.append(f"skipped {len(report.bad_images)} corrupt or truncated image(s): {listed}")
    if report.num_images == 0:
        why = "; ".join(f"{f.path.name}: {f.reason}" for f in report.skipped[:10])
        raise DatasetError(f"no usable images in {report.root}" + (f" (skipped: {why})" if why else ""))


# ---------------------------------------------------------------------------------------------------------------
# Part 2: item pipeline and latent cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemPlan:
    """One image's fixed training geometry (sd-scripts ``ImageInfo.bucket_reso`` / ``resized_size`` /
    ``latents_crop_ltrb``).

    Attributes:
        index: position in :attr:`TrainDataset.items`.
        record: the scanned image.
        assignment: bucket and resized size.
        crop_ltrb: :func:`~lib_lora.data.buckets.get_crop_ltrb` of the bucket and original size.
    """

    index: int
    record: ImageRecord
    assignment: BucketAssignment
    crop_ltrb: tuple[int, int, int, int]


@dataclass
class Batch:
    """One training batch, all images from one bucket (sd-scripts ``__getitem__`` example dict).

    Attributes:
        latents: ``(B, 4, H/8, W/8)`` float32 on CPU, as ``encode`` returned them (not scaled here).
        captions: processed captions for this epoch (trigger, dropout, shuffle applied).
        original_sizes_hw: ``(height, width)`` of each source image in pixels (SDXL ``original_size``).
        crop_top_lefts: ``(top, left)`` in pixels from ``crop_ltrb``, mirrored for flipped items (SDXL ``crop_coords``).
        target_sizes_hw: ``(height, width)`` of the bucket in pixels (SDXL ``target_size``).
        flipped: whether each item is horizontally flipped.
        paths: the image files.
        bucket: ``(width, height)`` in pixels.
    """

    latents: torch.Tensor
    captions: list[str]
    original_sizes_hw: list[tuple[int, int]]
    crop_top_lefts: list[tuple[int, int]]
    target_sizes_hw: list[tuple[int, int]]
    flipped: list[bool]
    paths: list[Path]
    bucket: Size


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` RGB -> ``float32 (3, H, W)`` in [-1, 1] (sd-scripts ``IMAGE_TRANSFORMS``)."""
    return (pixels.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0).copy()


def load_item_pixels(plan: ItemPlan, flip: bool = False, rng: random.Random | None = None) -> np.ndarray:
    """Loads one image ready for the VAE: opened, resized to cover its bucket, cropped, optionally flipped.

    Args:
        plan: the item.
        flip: mirror horizontally (after the crop).
        rng: None for a centre crop, or the random source for a random crop.

    Returns:
        ``float32 (3, H, W)`` in [-1, 1], ``(W, H)`` the bucket size in pixels.

    Raises:
        DatasetError: the image can no longer be opened (changed since the scan).
    """
    a = plan.assignment
    offset = crop_offset(a.resized_size, a.bucket, rng)
    pixels = resize_and_crop(open_image(plan.record.path), a.resized_size, a.bucket, offset)
    if flip:
        pixels = pixels[:, ::-1]
    return to_model_input(pixels)


def latent_cache_path(
    image_path: Path, bucket: Size, suffix: str = "_sd", cache_dir: Path | None = None, subset: str | None = None
) -> Path:
    """Where a disk latent cache lives (sd-scripts ``strategy_sd`` naming): ``<stem>_<W:04d>x<H:04d><suffix>.npz``.

    Args:
        image_path: the image.
        bucket: ``(width, height)`` in pixels.
        suffix: ``"_sd"`` (SD1/SD2) or ``"_sdxl"``.
        cache_dir: None for next to the image (sd-scripts), else this folder; then ``subset`` (the subset folder
            name) is a sub-folder, so same-named images of two subsets do not collide.
        subset: see ``cache_dir``.

    Returns:
        The npz path.
    """
    name = f"{Path(image_path).stem}_{bucket[0]:04d}x{bucket[1]:04d}{suffix}.npz"
    if cache_dir is None:
        return Path(image_path).with_name(name)
    return Path(cache_dir) / (subset or "") / name


@dataclass
class CachedLatents:
    """Latents of one image: ``latents`` and ``latents_flipped`` are ``(4, H/8, W/8)`` float32 CPU tensors
    (``latents_flipped`` None without flip_aug); ``original_size`` is ``(width, height)`` and ``crop_ltrb`` as
    :func:`~lib_lora.data.buckets.get_crop_ltrb`."""

    latents: torch.Tensor
    latents_flipped: torch.Tensor | None
    original_size: Size
    crop_ltrb: tuple[int, int, int, int]


def save_latents_npz(path: Path, entry: CachedLatents) -> None:
    """Writes a latent cache in sd-scripts' npz layout (keys ``latents``, ``original_size``, ``crop_ltrb``, and
    ``latents_flipped`` when present), atomically (temporary file, then rename).

    Raises:
        DatasetError: the file cannot be written (e.g. a read-only dataset folder: use a cache folder).
    """
    arrays = {
        "latents": entry.latents.numpy(),
        "original_size": np.array(entry.original_size),
        "crop_ltrb": np.array(entry.crop_ltrb),
    }
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = entry.latents_flipped.numpy()
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        raise DatasetError(f"cannot write latent cache {path}: {e} (set a writable cache folder)") from e


def load_latents_npz(path: Path, plan: ItemPlan, need_flipped: bool) -> CachedLatents | None:
    """Reads a disk latent cache if it is valid for ``plan``, else None (sd-scripts
    ``is_disk_cached_latents_is_expected``, stricter).

    Valid means: the file is at least as new as the image, has the keys, latents of shape ``(C, H/8, W/8)`` for the
    bucket, finite values, the same ``original_size`` and ``crop_ltrb``, and ``latents_flipped`` when
    ``need_flipped``. An unreadable or partial file counts as invalid (it is rewritten).
    """
    try:
        if path.stat().st_mtime < plan.record.path.stat().st_mtime:
            return None
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError):
        return None
    w, h = plan.assignment.bucket
    keys = ("latents", "original_size", "crop_ltrb") + (("latents_flipped",) if need_flipped else ())
    if any(k not in arrays for k in keys):
        return None
    lat = arrays["latents"]
    flipped = arrays.get("latents_flipped") if need_flipped else None
    for a in (lat, flipped):
        if a is not None and (a.ndim != 3 or a.shape[1:] != (h // 8, w // 8) or not np.isfinite(a).all()):
            return None
    if tuple(int(v) for v in arrays["original_size"]) != tuple(plan.record.size):
        return None
    if tuple(int(v) for v in arrays["crop_ltrb"]) != tuple(plan.crop_ltrb):
        return None
    return CachedLatents(_to_tensor(lat), _to_tensor(flipped), plan.record.size, plan.crop_ltrb)


def _to_tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def encode_checked(
    encode: Encoder, pixels: torch.Tensor, encode_fp32: Encoder | None, names: Sequence[str]
) -> torch.Tensor:
    """Runs the VAE encoder without gradients, falling back to an fp32 encoder when the latents are not finite.

    Args:
        encode: ``(B, 3, H, W)`` float32 in [-1, 1] -> ``(B, 4, H/8, W/8)``; moves data to its device itself.
        pixels: the input batch, CPU float32.
        encode_fp32: optional second encoder (e.g. the VAE in fp32) used when ``encode`` gives NaN/Inf
            (an fp16 SD VAE overflows on some images).
        names: file names, for the error message.

    Returns:
        ``(B, C, H/8, W/8)`` float32 on CPU.

    Raises:
        DatasetError: the latents are not finite (after the fallback, if given); the message names the files.
        ValueError: the encoder returned the wrong batch size or spatial shape.
    """
    with torch.no_grad():
        latents = encode(pixels)
        if not torch.isfinite(latents).all():
            if encode_fp32 is None:
                raise DatasetError(f"the VAE gave NaN/Inf latents for {', '.join(names)}; use an fp32 VAE fallback")
            logger.warning("non-finite latents for %s; encoding again in fp32", ", ".join(names))
            latents = encode_fp32(pixels)
            if not torch.isfinite(latents).all():
                raise DatasetError(f"the VAE gave NaN/Inf latents for {', '.join(names)}, also in fp32")
    b, _, h, w = pixels.shape
    if latents.ndim != 4 or latents.shape[0] != b or tuple(latents.shape[2:]) != (h // 8, w // 8):
        raise ValueError(f"encoder returned shape {tuple(latents.shape)} for pixels {tuple(pixels.shape)}")
    return latents.detach().to("cpu", torch.float32)


class TrainDataset:
    """Scanned images -> per-epoch batches of latents and captions (sd-scripts ``DreamBoothDataset`` +
    ``cache_latents``), without a ``torch.utils.data.Dataset``: iterate :meth:`batches` once per epoch.

    Args:
        images: the usable images (:attr:`DatasetReport.images`).
        encode: ``pixels (B, 3, H, W) float32 in [-1, 1] -> latents (B, 4, H/8, W/8)``; typically the VAE's
            posterior sample (unscaled, as sd-scripts caches it; the trainer applies the scale factor).
        encode_fp32: optional fallback encoder used when ``encode`` gives non-finite latents.
        buckets: bucket settings.
        captions: caption processing, applied per item per epoch.
        batch_size: images per batch (a bucket's last batch may be short).
        seed: batch order uses ``random.Random(seed + epoch)`` (sd-scripts); flips, random crops and caption
            draws use ``random.Random(f"{seed}:{epoch}:augment")``.
        flip_aug: flip each item with probability 0.5 per epoch; cached latents then hold both versions.
        random_crop: random instead of centre crop; needs ``cache="none"``.
        cache: ``"memory"`` (encode once, keep in RAM), ``"disk"`` (npz files, read back at each use, reused across
            runs), or ``"none"`` (encode every batch).
        cache_dir: for ``"disk"``: None writes next to the images (sd-scripts), else into this folder.
        cache_suffix: ``"_sd"`` or ``"_sdxl"`` in the npz name.
        vae_batch_size: images per ``encode`` call while caching (``--vae_batch_size``); flipped copies ride along.

    Raises:
        ConfigError: ``random_crop`` with a latent cache (sd-scripts asserts the same), a bad ``cache`` mode,
            ``batch_size`` or ``vae_batch_size`` < 1.
        DatasetError: ``images`` is empty.
    """

    def __init__(
        self,
        images: Sequence[ImageRecord],
        encode: Encoder,
        *,
        encode_fp32: Encoder | None = None,
        buckets: BucketSpec | None = None,
        captions: CaptionOptions | None = None,
        batch_size: int = 1,
        seed: int = 0,
        flip_aug: bool = False,
        random_crop: bool = False,
        cache: str = "memory",
        cache_dir: Path | None = None,
        cache_suffix: str = "_sd",
        vae_batch_size: int = 1,
    ):
        if cache not in CACHE_MODES:
            raise ConfigError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if random_crop and cache != "none":
            raise ConfigError(
                f"random_crop cannot be combined with latent caching (cache={cache!r}): the crop would be frozen "
                "into the cache; use cache='none' (encode every batch) or turn random_crop off"
            )
        if batch_size < 1 or vae_batch_size < 1:
            raise ConfigError(f"batch_size and vae_batch_size must be >= 1, got {batch_size}, {vae_batch_size}")
        if not images:
            raise DatasetError("no images to train on")
        self.encode, self.encode_fp32 = encode, encode_fp32
        self.buckets = buckets or BucketSpec()
        self.captions = captions or CaptionOptions()
        self.batch_size, self.seed = batch_size, seed
        self.flip_aug, self.random_crop = flip_aug, random_crop
        self.cache, self.cache_dir, self.cache_suffix = cache, cache_dir, cache_suffix
        self.vae_batch_size = vae_batch_size
        self.items: list[ItemPlan] = plan_items(images, self.buckets)
        self._by_bucket: dict[Size, list[int]] = {}
        for p in self.items:
            self._by_bucket.setdefault(p.assignment.bucket, []).extend([p.index] * p.record.repeats)
        self._memory: dict[int, CachedLatents] = {}
        self._on_disk: set[int] = set()

    def __len__(self) -> int:
        """Batches per epoch (``ss_num_batches_per_epoch``)."""
        return count_epoch_batches({k: len(v) for k, v in self._by_bucket.items()}, self.batch_size)

    @property
    def num_train_images(self) -> int:
        """Images x repeats (``ss_num_train_images``)."""
        return sum(p.record.repeats for p in self.items)

    def bucket_info(self) -> dict:
        """``ss_bucket_info`` (see :func:`~lib_lora.data.buckets.bucket_info`)."""
        return bucket_info([p.assignment for p in self.items], [p.record.repeats for p in self.items])

    def _cache_path(self, plan: ItemPlan) -> Path:
        return latent_cache_path(
            plan.record.path, plan.assignment.bucket, self.cache_suffix, self.cache_dir, plan.record.subset
        )

    def _is_cached(self, index: int) -> bool:
        return index in self._memory or index in self._on_disk

    def cache_latents(self, progress: Progress | None = None) -> int:
        """Encodes every image not cached yet (sd-scripts ``cache_latents``); valid npz files are reused.

        Calling it before training is optional: :meth:`batches` caches what it meets. Does nothing for
        ``cache="none"``.

        Args:
            progress: called as ``progress(done, total)`` per encoded group.

        Returns:
            The number of images encoded (0 when all were cached).

        Raises:
            DatasetError: as :func:`encode_checked` and :func:`save_latents_npz`.
        """
        if self.cache == "none":
            return 0
        todo = [p for p in self.items if not self._is_cached(p.index) and not self._load_valid_disk(p)]
        todo.sort(key=lambda p: p.assignment.bucket)
        groups: list[list[ItemPlan]] = []
        for p in todo:
            if (
                groups
                and groups[-1][0].assignment.bucket == p.assignment.bucket
                and len(groups[-1]) < self.vae_batch_size
            ):
                groups[-1].append(p)
            else:
                groups.append([p])
        for i, group in enumerate(groups):
            self._encode_group(group)
            if progress is not None:
                progress(i + 1, len(groups))
        return len(todo)

    def _load_valid_disk(self, plan: ItemPlan) -> bool:
        if self.cache != "disk":
            return False
        if load_latents_npz(self._cache_path(plan), plan, self.flip_aug) is None:
            return False
        self._on_disk.add(plan.index)
        return True

    def _encode_group(self, group: Sequence[ItemPlan]) -> None:
        """Encodes same-bucket items (and their flips) in one call and stores them."""
        pixels = [load_item_pixels(p) for p in group]
        if self.flip_aug:
            pixels += [np.ascontiguousarray(x[:, :, ::-1]) for x in pixels]
        names = [p.record.path.name for p in group]
        latents = encode_checked(self.encode, torch.from_numpy(np.stack(pixels)), self.encode_fp32, names)
        n = len(group)
        for j, p in enumerate(group):
            entry = CachedLatents(
                latents[j].clone(), latents[n + j].clone() if self.flip_aug else None, p.record.size, p.crop_ltrb
            )
            if self.cache == "disk":
                save_latents_npz(self._cache_path(p), entry)
                self._on_disk.add(p.index)
            else:
                self._memory[p.index] = entry

    def _cache_missing(self, plans: Sequence[ItemPlan]) -> None:
        """Encodes the not-yet-cached items of one batch, ``vae_batch_size`` at a time (they share a bucket)."""
        missing = {p.index: p for p in plans if not self._is_cached(p.index) and not self._load_valid_disk(p)}
        todo = list(missing.values())
        for i in range(0, len(todo), self.vae_batch_size):
            self._encode_group(todo[i : i + self.vae_batch_size])

    def _cached(self, plan: ItemPlan) -> CachedLatents:
        if plan.index in self._memory:
            return self._memory[plan.index]
        entry = load_latents_npz(self._cache_path(plan), plan, self.flip_aug)
        if entry is None:
            raise DatasetError(f"latent cache {self._cache_path(plan)} disappeared or changed during training")
        return entry

    def _batch_latents(self, plans: Sequence[ItemPlan], flips: Sequence[bool], rng: random.Random) -> torch.Tensor:
        if self.cache == "none":
            crop_rng = rng if self.random_crop else None
            pixels = np.stack([load_item_pixels(p, f, crop_rng) for p, f in zip(plans, flips)])
            names = [p.record.path.name for p in plans]
            return encode_checked(self.encode, torch.from_numpy(pixels), self.encode_fp32, names)
        self._cache_missing(plans)
        entries = [self._cached(p) for p in plans]
        return torch.stack([e.latents_flipped if f else e.latents for e, f in zip(entries, flips)])

    def batches(self, epoch: int) -> Iterator[Batch]:
        """Yields one epoch's batches (sd-scripts ``shuffle_buckets`` + ``__getitem__``).

        Every image appears ``repeats`` times per epoch; batches hold one bucket each; their order, the flips,
        random crops and caption draws are reproducible for a given ``seed`` and ``epoch``. Latents not cached yet
        are encoded on the way (and cached unless ``cache="none"``).

        Args:
            epoch: the epoch number (any int; sd-scripts counts from 1).

        Yields:
            :class:`Batch` objects.

        Raises:
            DatasetError: an image can no longer be read, or the encoder fails as in :func:`encode_checked`.
        """
        rng = random.Random(f"{self.seed}:{epoch}:augment")
        for bucket, indices in make_epoch_batches(self._by_bucket, self.batch_size, self.seed, epoch):
            plans = [self.items[i] for i in indices]
            flips = [self.flip_aug and rng.random() < 0.5 for _ in plans]
            captions = [process_caption(p.record.caption, self.captions, rng, epoch) for p in plans]
            latents = self._batch_latents(plans, flips, rng)
            w, h = bucket
            tops_lefts = []
            for p, f in zip(plans, flips):
                left = w - p.crop_ltrb[2] if f else p.crop_ltrb[0]
                tops_lefts.append((p.crop_ltrb[1], left))
            yield Batch(
                latents=latents,
                captions=captions,
                original_sizes_hw=[(p.record.size[1], p.record.size[0]) for p in plans],
                crop_top_lefts=tops_lefts,
                target_sizes_hw=[(h, w)] * len(plans),
                flipped=flips,
                paths=[p.record.path for p in plans],
                bucket=bucket,
            )


def plan_items(images: Sequence[ImageRecord], spec: BucketSpec) -> list[ItemPlan]:
    """Assigns every image its bucket and crop box (sd-scripts ``BaseDataset.make_buckets``); pure.

    Args:
        images: the scanned images.
        spec: bucket settings.

    Returns:
        One :class:`ItemPlan` per image, in order.
    """
    predefined = predefined_buckets(spec)
    plans = []
    for i, r in enumerate(images):
        a = select_bucket(r.size, spec, predefined)
        plans.append(ItemPlan(i, r, a, get_crop_ltrb(a.bucket, r.size)))
    return plans
