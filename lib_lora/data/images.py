"""Safe image opening for training data: format sniffing, full decode, EXIF orientation, conversion to RGB.

Kohya (sd-scripts ``train_util.load_image`` / ``glob_images``) picks files by extension and converts with
``Image.convert("RGB")``, which turns transparent pixels black and crushes 16-bit images. Here files are picked by
their first bytes, decoded in full at scan time (so a truncated JPEG is reported before training, never in the middle
of it), turned upright with the EXIF orientation, and composited on white when they carry transparency.

Pillow's ``LOAD_TRUNCATED_IMAGES`` is never enabled: a truncated file is an error, not a grey bottom half.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DatasetError

#: Formats that are trained on, as Pillow names them. GIF and animated WebP use their first frame.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")

#: Sidecar files that live next to images in a Kohya folder and are never reported as skipped.
SIDECAR_EXTENSIONS = (".txt", ".caption", ".npz")

#: What Pillow raises for a file it cannot decode (truncated data, bad headers, decompression bombs).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

#: White, the background transparent pixels are composited on.
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not used for training, and why.

    Attributes:
        path: the file or folder.
        reason: a short sentence for the user, e.g. ``"corrupt or truncated image: image file is truncated"``.
    """

    path: Path
    reason: str


@dataclass(frozen=True)
class ImageInfo:
    """What the scan learnt about one usable image.

    Attributes:
        path: the image file.
        format: the sniffed format, one of :data:`SUPPORTED_FORMATS`.
        size: ``(width, height)`` in pixels **after** the EXIF orientation is applied (a 64x32 JPEG with
            orientation 6 has size ``(32, 64)``). This is sd-scripts' ``ImageInfo.image_size``.
        mode: the Pillow mode of the file before conversion (e.g. ``"RGBA"``, ``"P"``, ``"I;16"``).
    """

    path: Path
    format: str
    size: tuple[int, int]
    mode: str


def sniff_format(header: bytes) -> str | None:
    """Names the image format from a file's first bytes.

    Args:
        header: at least the first 12 bytes of the file.

    Returns:
        ``"PNG"``, ``"JPEG"``, ``"WEBP"``, ``"BMP"`` or ``"GIF"``, or None when the bytes match none of them.
        The extension plays no part: an RGBA PNG renamed ``.jpg`` is a PNG.
    """
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if header.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WEBP"
    if header[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if header[:2] == b"BM" and len(header) >= 6:
        return "BMP"
    return None


def _unsupported_format_name(header: bytes) -> str | None:
    """Names a recognised image format that is not trained on (for a clearer skip reason), else None."""
    if header[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if header[4:8] == b"ftyp":
        brand = header[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
            return "HEIC"
    if header[:4] == b"8BPS":
        return "PSD"
    if header[:2] == b"\xff\x0a" or header[4:12] == b"JXL \r\n\x87\n":
        return "JPEG XL"
    return None


def ignore_reason(path: Path, root: Path | None = None) -> str | None:
    """Says why a path is never a training image because of its name alone, or None if its name is fine.

    Covers macOS archive litter: AppleDouble files ``._name`` and anything under a ``__MACOSX/`` folder,
    plus other hidden files (``.DS_Store``).

    Args:
        path: the file.
        root: when given, only the parts of ``path`` below ``root`` are checked for ``__MACOSX``.

    Returns:
        A reason string, or None.
    """
    parts = path.relative_to(root).parts if root is not None else path.parts
    if "__MACOSX" in parts:
        return "macOS archive metadata (__MACOSX folder)"
    if path.name.startswith("._"):
        return "macOS resource fork (._* file)"
    if path.name.startswith("."):
        return "hidden file"
    return None


def read_header(path: Path, size: int = 16) -> bytes:
    """Reads the first ``size`` bytes of a file (raises OSError when it cannot be read)."""
    with open(path, "rb") as f:
        return f.read(size)


def list_image_files(
    folder: Path, ignore_extensions: Iterable[str] = SIDECAR_EXTENSIONS
) -> tuple[list[Path], list[SkippedFile]]:
    """Lists the image files directly inside a folder, chosen by content, not extension.

    Sub-folders are not entered (sd-scripts ``glob_images`` is not recursive either); a ``__MACOSX`` sub-folder is
    reported as skipped, other sub-folders are left to the caller. Files whose extension is in
    ``ignore_extensions`` (captions, latent caches) are passed over silently.

    Args:
        folder: the folder to list.
        ignore_extensions: lower-case extensions with the dot, never reported.

    Returns:
        ``(images, skipped)``: image paths sorted by name, and the other files with the reason for each.

    Raises:
        DatasetError: the folder does not exist or cannot be listed.
    """
    try:
        entries = sorted(Path(folder).iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise DatasetError(f"cannot list the folder {folder}: {e}") from e
    ignored = {ext.lower() for ext in ignore_extensions}
    images: list[Path] = []
    skipped: list[SkippedFile] = []
    for path in entries:
        if path.is_dir():
            if path.name == "__MACOSX":
                skipped.append(SkippedFile(path, "macOS archive metadata (__MACOSX folder)"))
            continue
        reason = ignore_reason(path, folder)
        if reason is None and path.suffix.lower() in ignored:
            continue
        if reason is None:
            reason = _format_skip_reason(path)
        if reason is None:
            images.append(path)
        else:
            skipped.append(SkippedFile(path, reason))
    return images, skipped


def _format_skip_reason(path: Path) -> str | None:
    """None when the file's first bytes are a supported image, else why it is skipped."""
    try:
        header = read_header(path)
    except OSError as e:
        return f"cannot be read: {e}"
    if sniff_format(header) is not None:
        return None
    other = _unsupported_format_name(header)
    if other is not None:
        return f"{other} images are not supported (use PNG, JPEG, WebP, BMP or GIF)"
    return "not an image (content is not PNG, JPEG, WebP, BMP or GIF)"


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scales a 16/32-bit integer grayscale image (modes ``I;16*``, ``I``) to 8-bit ``L``.

    Pillow's own ``convert("L")`` clips at 255, so a 16-bit scan comes out almost white. ``I;16`` is always divided
    by 257 (65535 -> 255). Mode ``I`` (how Pillow 9 opens 16-bit PNGs) is divided by 257 only when a value exceeds
    255; an ``I`` image whose values all fit in 8 bits is kept as is.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts a decoded image of any Pillow mode to 8-bit RGB, compositing transparency on white.

    - ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, and ``P``/``L``/``RGB`` carrying a ``transparency`` entry:
      alpha-composited over white (sd-scripts converts straight to RGB, which gives black).
    - ``I;16``, ``I;16B``, ``I;16L``, ``I``: scaled to 8 bits (see :func:`_sixteen_bit_to_l`), then gray to RGB.
    - ``F``: clipped to 0..255.
    - ``CMYK``, ``YCbCr``, ``L``, ``1``, ``P`` and the rest: Pillow's ``convert("RGB")``.

    Args:
        img: a loaded image.

    Returns:
        A new ``RGB`` image of the same size (or ``img`` itself when it already is RGB without transparency).
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(img).convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _open_decoded(path: Path) -> tuple[Image.Image, str, str]:
    """Opens, sniffs and fully decodes ``path``; returns ``(upright image, format, original mode)``."""
    try:
        header = read_header(path)
    except OSError as e:
        raise DatasetError(f"{path.name}: cannot be read: {e}") from e
    fmt = sniff_format(header)
    if fmt is None:
        raise DatasetError(f"{path.name}: {_format_skip_reason(path)}")
    try:
        with Image.open(path, formats=[fmt]) as img:
            img.load()  # full decode: truncated or corrupt data raises here, at scan time
            mode = img.mode
            upright = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{path.name}: corrupt or truncated {fmt} image: {e}") from e
    return upright, fmt, mode


def open_image(path: Path) -> Image.Image:
    """Opens a training image as upright 8-bit RGB: sniffed, fully decoded, EXIF-transposed, alpha on white.

    GIFs and animated WebPs give their first frame. This is what sd-scripts ``train_util.load_image`` does, made
    safe for the cases above.

    Args:
        path: the image file (any extension).

    Returns:
        A loaded ``RGB`` PIL image, size ``(width, height)`` in pixels after the EXIF orientation.

    Raises:
        DatasetError: the file cannot be read, is not a supported format, or is corrupt or truncated. The message
            starts with the file name.
    """
    img, _, _ = _open_decoded(Path(path))
    return to_rgb(img)


def probe_image(path: Path) -> ImageInfo:
    """Checks that an image decodes in full and returns its upright size; used by the folder scan.

    The whole file is decoded and converted, exactly as :func:`open_image` does at training time, so a file that
    passes here will not fail later.

    Args:
        path: the image file.

    Returns:
        An :class:`ImageInfo`.

    Raises:
        DatasetError: as :func:`open_image`.
    """
    path = Path(path)
    img, fmt, mode = _open_decoded(path)
    to_rgb(img)
    return ImageInfo(path=path, format=fmt, size=img.size, mode=mode)


def resize_and_crop(
    img: Image.Image, resized_size: tuple[int, int], bucket: tuple[int, int], offset: tuple[int, int]
) -> np.ndarray:
    """Resizes an RGB image so it covers its bucket, then cuts the bucket out at ``offset``.

    sd-scripts ``trim_and_resize_if_required`` (which uses cv2 ``INTER_AREA``/Lanczos); here Pillow Lanczos with
    antialiasing does both down- and upscaling.

    Args:
        img: an ``RGB`` image.
        resized_size: ``(width, height)`` in pixels after resizing, each >= the bucket's
            (from :func:`lib_lora.data.buckets.select_bucket`).
        bucket: ``(width, height)`` of the output in pixels.
        offset: ``(left, top)`` pixels cut from the resized image (from :func:`lib_lora.data.buckets.crop_offset`).

    Returns:
        ``uint8`` array of shape ``(bucket height, bucket width, 3)``.

    Raises:
        ValueError: the crop window does not fit inside the resized image.
    """
    left, top = offset
    if left < 0 or top < 0 or left + bucket[0] > resized_size[0] or top + bucket[1] > resized_size[1]:
        raise ValueError(f"crop {bucket} at {offset} does not fit in resized size {resized_size}")
    if img.size != tuple(resized_size):
        img = img.resize(tuple(resized_size), resample=Image.Resampling.LANCZOS)
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return np.asarray(img, dtype=np.uint8).copy()
