"""Dataset preparation: resize and crop a folder of training images to one size, into a new folder.

:func:`prepare_folder` reads a dataset folder (plain, or Kohya ``<repeats>_<name>`` sub-folders, mirrored in the
output) and writes, for each image, a PNG of the chosen size and optionally a mirrored copy, plus copies of its
caption files (``.txt`` / ``.caption``; a flipped copy gets the same caption). The source folder is only read; the
output folder must not be it nor lie inside it. Every file is written atomically (temp file + rename).

Crop modes (all sizes in pixels):

- ``"centre"``: scale so that the shorter side equals ``size``, cut the centre ``size`` x ``size`` square.
- ``"focal"``: cut the largest square around a focal point, then scale it to ``size`` x ``size``. The focal point is
  the centre of the detected faces (OpenCV Haar cascade ``haarcascade_frontalface_default.xml``, shipped in
  opencv-python's ``cv2.data``) when ``cv2`` can be imported and finds a face, else the entropy focal point
  (:func:`entropy_focal_point`, pure numpy/Pillow). The idea is the WebUI's "Auto focal point crop" preprocessor.
- ``"none"``: keep the aspect ratio and only downscale so that the longer side is at most ``size``; training buckets
  (``enable_bucket``) take care of the rest. Smaller images are copied at their size.

Background removal (:func:`rembg_status`) uses ``rembg`` only when it is installed **and** its model file is already
on disk; rembg would otherwise download the model on first use, which this module never triggers.

Importing this module imports neither torch nor cv2.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .data.captions import CAPTION_EXTENSIONS
from .data.images import list_image_files, open_image, to_rgb
from .errors import ConfigError, DatasetError
from .tags import dataset_image_folders, write_atomic

CROP_MODES = ("centre", "focal", "none")

#: Smallest output size in pixels (the smallest training resolution the trainer accepts is 64).
MIN_SIZE = 64

#: Suffix added to the stem of a mirrored copy: ``dog.png`` -> ``dog_flip.png``.
FLIP_SUFFIX = "_flip"

#: Longer side, in pixels, of the grayscale copy the entropy focal point is computed on, and the side of its square
#: cells. 128 / 8 gives at most 16 x 16 cells: fine enough to find a subject, cheap (a millisecond or two).
ENTROPY_ANALYSIS_SIDE = 128
ENTROPY_CELL = 8

#: Cells whose entropy is at least this share of the highest cell's make the focal point (their entropy-weighted
#: centroid). 0.8 keeps the most detailed region: a centroid over all cells drifts back to the image centre when the
#: background has some texture.
ENTROPY_TOP_FRACTION = 0.8

#: The rembg model used by default (``u2net.onnx``, 176 MB, general-purpose), and where rembg looks for it.
REMBG_DEFAULT_MODEL = "u2net"


# ---------------------------------------------------------------------------------------------------------------
# Focal points and crop boxes (pure)
# ---------------------------------------------------------------------------------------------------------------


def entropy_focal_point(img: Image.Image) -> tuple[float, float]:
    """The most detailed point of an image: where its local gray-level entropy is highest.

    The image is converted to gray and box-downscaled so that its longer side is :data:`ENTROPY_ANALYSIS_SIDE`
    pixels; each :data:`ENTROPY_CELL`-pixel cell gets the Shannon entropy (bits, 32-bin histogram) of its gray
    levels; the focal point is the entropy-weighted centroid of the cells at or above :data:`ENTROPY_TOP_FRACTION`
    of the highest entropy. A flat image (all cells 0 bits) gives the centre. Pure; raises nothing.

    Args:
        img: any PIL image.

    Returns:
        ``(x, y)`` in pixels of ``img`` (floats, inside the image).
    """
    w, h = img.size
    scale = min(1.0, ENTROPY_ANALYSIS_SIDE / max(w, h))
    small = img.convert("L")
    if scale < 1.0:
        small = small.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    gray = np.asarray(small, dtype=np.uint8)
    sh, sw = gray.shape
    cell = ENTROPY_CELL
    ny, nx = max(1, sh // cell), max(1, sw // cell)
    cy, cx = sh / ny, sw / nx  # cell size in analysis pixels (the last partial row/column is spread over the grid)
    ent = np.zeros((ny, nx))
    for j in range(ny):
        for i in range(nx):
            block = gray[int(j * cy) : int((j + 1) * cy), int(i * cx) : int((i + 1) * cx)]
            hist = np.bincount((block >> 3).ravel(), minlength=32).astype(np.float64)
            p = hist[hist > 0] / hist.sum()
            ent[j, i] = float(-(p * np.log2(p)).sum())
    top = ent.max()
    if top <= 0:
        return w / 2.0, h / 2.0
    weights = np.where(ent >= ENTROPY_TOP_FRACTION * top, ent, 0.0)
    ys, xs = np.mgrid[0:ny, 0:nx]
    fx = float(((xs + 0.5) * weights).sum() / weights.sum()) / nx * w
    fy = float(((ys + 0.5) * weights).sum() / weights.sum()) / ny * h
    return fx, fy


def face_focal_point(img: Image.Image) -> tuple[float, float] | None:
    """The area-weighted centre of the frontal faces OpenCV finds, or None (no face, or ``cv2`` not importable).

    Uses ``cv2.CascadeClassifier`` with ``haarcascade_frontalface_default.xml`` from ``cv2.data.haarcascades``
    (shipped inside opencv-python; nothing is downloaded), on a gray copy, ``scaleFactor=1.1``, ``minNeighbors=5``,
    faces at least 1/16 of the shorter side.

    Args:
        img: any PIL image.

    Returns:
        ``(x, y)`` in pixels of ``img``, or None.
    """
    try:
        import cv2
    except ImportError:
        return None
    cascade_path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    cascade = cv2.CascadeClassifier(cascade_path)
    if cascade.empty():
        return None
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    side = max(16, min(img.size) // 16)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    if len(faces) == 0:
        return None
    faces = np.asarray(faces, dtype=np.float64)
    areas = faces[:, 2] * faces[:, 3]
    fx = float(((faces[:, 0] + faces[:, 2] / 2) * areas).sum() / areas.sum())
    fy = float(((faces[:, 1] + faces[:, 3] / 2) * areas).sum() / areas.sum())
    return fx, fy


def focal_point(img: Image.Image) -> tuple[tuple[float, float], str]:
    """The focal point used by the ``"focal"`` crop: faces (:func:`face_focal_point`) first, else entropy
    (:func:`entropy_focal_point`).

    Returns:
        ``((x, y) in pixels, method)`` with method ``"face"`` or ``"entropy"``.
    """
    face = face_focal_point(img)
    if face is not None:
        return face, "face"
    return entropy_focal_point(img), "entropy"


def square_box(size: tuple[int, int], centre: tuple[float, float]) -> tuple[int, int, int, int]:
    """The largest square inside an image of ``size`` = ``(width, height)`` pixels, centred on ``centre`` as
    far as the image edges allow. Pure.

    Returns:
        ``(left, top, right, bottom)`` in pixels (PIL crop box).
    """
    w, h = size
    side = min(w, h)
    left = int(round(min(max(centre[0] - side / 2, 0), w - side)))
    top = int(round(min(max(centre[1] - side / 2, 0), h - side)))
    return left, top, left + side, top + side


def fit_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """``(width, height)`` scaled down so that the longer side is at most ``longest`` pixels (never up; each side at
    least 1). Pure."""
    w, h = size
    scale = min(1.0, longest / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_image(img: Image.Image, size: int, crop: str = "centre") -> tuple[Image.Image, str]:
    """Resizes one RGB image for :func:`prepare_folder` (Lanczos).

    Args:
        img: an RGB image.
        size: output side in pixels (``"centre"``/``"focal"``: ``size`` x ``size``; ``"none"``: longer side at
            most ``size``).
        crop: one of :data:`CROP_MODES`.

    Returns:
        ``(image, how)`` where ``how`` is ``"centre"``, ``"face"``, ``"entropy"`` or ``"fit"``.

    Raises:
        ConfigError: unknown ``crop``.
    """
    if crop == "none":
        target = fit_size(img.size, size)
        out = img if target == img.size else img.resize(target, Image.Resampling.LANCZOS)
        return out, "fit"
    if crop == "centre":
        box, how = square_box(img.size, (img.size[0] / 2, img.size[1] / 2)), "centre"
    elif crop == "focal":
        point, how = focal_point(img)
        box = square_box(img.size, point)
    else:
        raise ConfigError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    out = img.crop(box)
    if out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.LANCZOS)
    return out, how


# ---------------------------------------------------------------------------------------------------------------
# Background removal (optional: rembg with a local model)
# ---------------------------------------------------------------------------------------------------------------


def rembg_model_path(model: str = REMBG_DEFAULT_MODEL) -> Path:
    """Where rembg keeps ``<model>.onnx``: ``$U2NET_HOME``, else ``$XDG_DATA_HOME/.u2net``, else ``~/.u2net``
    (rembg's own rule)."""
    home = os.environ.get("U2NET_HOME") or os.path.join(os.environ.get("XDG_DATA_HOME", "~"), ".u2net")
    return Path(os.path.expanduser(home)) / f"{model}.onnx"


def rembg_status(model: str = REMBG_DEFAULT_MODEL) -> tuple[bool, str]:
    """Whether background removal can run without downloading anything.

    Returns:
        ``(True, "")`` when ``rembg`` is importable and ``<model>.onnx`` exists (see :func:`rembg_model_path`);
        else ``(False, message)`` saying what is missing and how to enable it.
    """
    path = rembg_model_path(model)
    if importlib.util.find_spec("rembg") is None:
        return False, ("background removal needs the rembg package, which is not installed: run "
                       "`pip install rembg` in the WebUI's Python environment, then put the model file at "
                       f"{path} (download {model}.onnx from the rembg releases on GitHub, or set U2NET_HOME to the "
                       "folder that holds it); nothing is downloaded automatically")
    if not path.is_file():
        return False, (f"background removal needs the rembg model file {path}, which is missing: download "
                       f"{model}.onnx from the rembg releases on GitHub into that folder (or set U2NET_HOME to the "
                       "folder that holds it); it is never downloaded automatically")
    return True, ""


def _background_remover(model: str) -> Callable[[Image.Image], Image.Image]:
    ok, message = rembg_status(model)
    if not ok:
        raise ConfigError(message)
    from rembg import new_session, remove

    session = new_session(model)

    def run(img: Image.Image) -> Image.Image:
        return to_rgb(remove(img, session=session))  # RGBA with the background transparent -> composited on white

    return run


# ---------------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    """What :func:`prepare_folder` wrote and left out.

    Attributes:
        written: the files written (images and captions), in order.
        skipped: ``(source file relative to the source folder, reason)`` for each image left out.
        notes: ``(source file, note)``, e.g. an image that was upscaled or cropped around a face.
        images: output images written (flipped copies included).
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0

    def to_dict(self) -> dict:
        """JSON-ready: ``{"images", "written", "skipped": [{"file", "reason"}], "notes": [{"file", "note"}]}``."""
        return {"images": self.images, "written": [str(p) for p in self.written],
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "notes": [{"file": f, "note": n} for f, n in self.notes]}

    def to_text(self) -> str:
        """One line per skipped file and note, then a summary line."""
        lines = [f"skipped {f}: {r}" for f, r in self.skipped] + [f"note {f}: {n}" for f, n in self.notes]
        lines.append(f"wrote {self.images} image(s) and {len(self.written) - self.images} caption file(s), "
                     f"skipped {len(self.skipped)}")
        return "\n".join(lines)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def prepare_folder(
    src: Path,
    dst: Path,
    size: int = 512,
    crop: str = "centre",
    flip: bool = False,
    remove_background: bool = False,
    rembg_model: str = REMBG_DEFAULT_MODEL,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    """Writes a resized (and optionally cropped, flipped, background-free) copy of a dataset folder.

    For each image of ``src`` and of its ``<repeats>_<name>`` sub-folders (found by content, as training does), the
    output ``dst/<same sub-folder>/<stem>.png`` is written (PNG: lossless, no second JPEG loss), and with ``flip``
    also ``<stem>_flip.png`` (mirrored left-right). Each caption file next to the image (``<stem>.txt``,
    ``<stem>.caption``) is copied byte for byte beside each output (the flipped copy gets the same caption).
    Originals are never modified.

    Skipped with a reason in the report: files that do not decode, a second image with the same stem in one folder
    (``a.jpg`` and ``a.png`` would both become ``a.png``), outputs that already exist in ``dst`` (unless
    ``overwrite``). Images smaller than ``size`` are upscaled by the crops (noted in the report); ``crop="none"``
    never upscales.

    Args:
        src: the dataset folder (read only).
        dst: the output folder, created if needed; must not be ``src`` nor inside it.
        size: output size in pixels, at least :data:`MIN_SIZE` (64); the square side, or the longest side for
            ``crop="none"``.
        crop: ``"centre"``, ``"focal"`` or ``"none"`` (see the module docstring).
        flip: also write a mirrored copy of each image.
        remove_background: replace the background by white with rembg (see :func:`rembg_status`).
        rembg_model: the rembg model name (``<name>.onnx`` must be present locally).
        overwrite: replace files already in ``dst``.
        progress: called as ``progress(done, total)`` after each source image.

    Returns:
        A :class:`PrepareReport`.

    Raises:
        ConfigError: bad ``size`` or ``crop``; ``dst`` is ``src`` or inside it; background removal asked for but
            rembg or its model file is missing (nothing is written then).
        DatasetError: ``src`` is not a folder, or a file cannot be written.
    """
    if crop not in CROP_MODES:
        raise ConfigError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ConfigError(f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DatasetError(f"source folder {src} does not exist or is not a folder")
    src_r, dst_r = src.resolve(), dst.resolve()
    if _inside(dst_r, src_r):
        raise ConfigError(f"the output folder {dst} is the source folder or inside it; choose a new folder so that "
                          "the originals stay untouched and are not trained on twice")
    remover = _background_remover(rembg_model) if remove_background else None

    jobs: list[tuple[Path, Path]] = []  # (source image, output folder)
    for folder in dataset_image_folders(src):
        images, _ = list_image_files(folder, (".txt", ".caption", ".npz", ".json", ".toml"))
        jobs.extend((p, dst / folder.relative_to(src)) for p in images)

    report = PrepareReport()
    claimed: set[Path] = set()
    for n, (path, out_dir) in enumerate(jobs, 1):
        rel = path.relative_to(src).as_posix()
        stems = [path.stem] + ([path.stem + FLIP_SUFFIX] if flip else [])
        outputs = [out_dir / f"{stem}.png" for stem in stems]
        clash = next((o for o in outputs if o in claimed), None)
        if clash is not None:
            report.skipped.append((rel, f"another image of the folder is written as {clash.name}; rename one"))
        elif not overwrite and any(o.exists() for o in outputs):
            existing = next(o for o in outputs if o.exists())
            report.skipped.append((rel, f"{existing} exists already (use overwrite to replace it)"))
        else:
            try:
                img = open_image(path)
            except DatasetError as e:
                report.skipped.append((rel, str(e)))
                img = None
            if img is not None:
                claimed.update(outputs)
                if crop != "none" and min(img.size) < size:
                    report.notes.append((rel, f"upscaled from {img.size[0]}x{img.size[1]} to {size} px"))
                if remover is not None:
                    img = remover(img)
                out, how = resize_image(img, size, crop)
                if how == "face":
                    report.notes.append((rel, "cropped around the detected face(s)"))
                variants = [out] + ([ImageOps.mirror(out)] if flip else [])
                captions = [(ext, path.with_name(path.stem + ext)) for ext in CAPTION_EXTENSIONS]
                captions = [(ext, p) for ext, p in captions if p.is_file()]
                out_dir.mkdir(parents=True, exist_ok=True)
                for variant, target in zip(variants, outputs):
                    write_atomic(target, _png_bytes(variant))
                    report.written.append(target)
                    report.images += 1
                    for ext, caption in captions:
                        try:
                            data = caption.read_bytes()
                        except OSError as e:
                            raise DatasetError(f"cannot read caption file {caption}: {e}") from e
                        write_atomic(target.with_suffix(ext), data)
                        report.written.append(target.with_suffix(ext))
        if progress is not None:
            progress(n, len(jobs))
    return report
