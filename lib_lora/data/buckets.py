"""Aspect-ratio bucketing, as sd-scripts does it; pure functions, no I/O, RNG injected.

Sources: sd-scripts ``model_util.make_bucket_resolutions``, ``train_util.BucketManager`` (``select_bucket``,
``round_to_steps``, ``get_crop_ltrb``), ``train_util.trim_and_resize_if_required`` (the crop),
``BaseDataset.make_buckets`` / ``shuffle_buckets`` (batches inside buckets, reshuffled every epoch) and
``BaseDataset.adjust_min_max_bucket_reso_by_steps``.

Sizes are ``(width, height)`` in pixels throughout, as in sd-scripts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketSpec:
    """Bucketing settings (sd-scripts arguments of the same meaning).

    Attributes:
        resolution: ``(width, height)`` in pixels (``--resolution``); its area is the maximum bucket area.
        min_reso: smallest bucket side in pixels (``--min_bucket_reso``, default 256); snapped down to the step.
        max_reso: largest bucket side in pixels (``--max_bucket_reso``, default 1024); snapped up to the step.
        reso_steps: bucket sides are multiples of this, in pixels (``--bucket_reso_steps``, default 64). Must be a
            multiple of 8 (the VAE factor). sd-scripts asks 64 for SD1/SD2 and 32 for SDXL; the trainer checks that.
        no_upscale: ``--bucket_no_upscale``: never enlarge; buckets come from each image's size and
            ``min_reso``/``max_reso`` are ignored.
        enabled: ``--enable_bucket``. When False every image goes to the one ``resolution`` bucket, resized to cover
            it and cropped (sd-scripts instead demands images of exactly that size).

    Raises:
        ConfigError: non-positive sizes, a step that is not a multiple of 8, or min/max not bracketing the
            resolution (after snapping).
    """

    resolution: Size = (512, 512)
    min_reso: int = 256
    max_reso: int = 1024
    reso_steps: int = 64
    no_upscale: bool = False
    enabled: bool = True

    def __post_init__(self):
        res = tuple(int(v) for v in self.resolution)
        if len(res) != 2 or min(res) <= 0:
            raise ConfigError(f"resolution must be (width, height) > 0, got {self.resolution}")
        object.__setattr__(self, "resolution", res)
        if self.reso_steps <= 0 or self.reso_steps % 8:
            raise ConfigError(f"reso_steps must be a positive multiple of 8 pixels, got {self.reso_steps}")
        if self.min_reso <= 0 or self.max_reso <= 0:
            raise ConfigError(f"min_reso and max_reso must be > 0, got {self.min_reso}, {self.max_reso}")
        lo, hi = snap_min_max_reso(self.min_reso, self.max_reso, self.reso_steps)
        object.__setattr__(self, "min_reso", lo)
        object.__setattr__(self, "max_reso", hi)
        if self.enabled and not self.no_upscale and not (lo <= min(res) and max(res) <= hi):
            raise ConfigError(
                f"min_reso {lo} and max_reso {hi} (snapped to steps of {self.reso_steps}) must bracket the "
                f"resolution {res[0]}x{res[1]}"
            )

    @property
    def max_area(self) -> int:
        """Largest bucket area in pixels: ``resolution`` width x height."""
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes (sd-scripts ``ImageInfo.bucket_reso`` / ``resized_size``).

    Attributes:
        bucket: ``(width, height)`` in pixels of the training tensor; multiples of ``reso_steps``.
        resized_size: ``(width, height)`` the image is resized to before cropping; covers ``bucket``.
        ar_error: bucket aspect ratio minus image aspect ratio (width / height), signed.
    """

    bucket: Size
    resized_size: Size
    ar_error: float


def snap_min_max_reso(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """Snaps ``min_reso`` down and ``max_reso`` up to multiples of ``steps`` (sd-scripts
    ``adjust_min_max_bucket_reso_by_steps``; it warns, this just returns the values)."""
    lo = min_reso - min_reso % steps
    hi = max_reso if max_reso % steps == 0 else max_reso + steps - max_reso % steps
    return lo, hi


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """The predefined bucket sizes (sd-scripts ``model_util.make_bucket_resolutions``).

    With ``area = max_reso[0] * max_reso[1]``: the square of side ``floor(sqrt(area) / divisible) * divisible``,
    then for each width ``w`` from ``min_size`` to ``max_size`` in ``divisible`` steps,
    ``h = min(max_size, floor(area / w / divisible) * divisible)``; when ``h >= min_size`` both ``(w, h)`` and
    ``(h, w)`` are added.

    Args:
        max_reso: ``(width, height)`` in pixels.
        min_size, max_size: smallest and largest side in pixels.
        divisible: the step in pixels.

    Returns:
        Sorted unique ``(width, height)`` pairs. For ``(512, 512), 256, 1024, 64`` the list has 17 entries,
        from ``(256, 1024)`` to ``(1024, 256)``.
    """
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def predefined_buckets(spec: BucketSpec) -> list[Size]:
    """The bucket list images are assigned to: :func:`make_bucket_resolutions` when bucketing is on and upscaling
    allowed, ``[resolution]`` when bucketing is off, and ``[]`` for ``no_upscale`` (buckets then come from each
    image)."""
    if not spec.enabled:
        return [spec.resolution]
    if spec.no_upscale:
        return []
    return make_bucket_resolutions(spec.resolution, spec.min_reso, spec.max_reso, spec.reso_steps)


def round_to_steps(x: float, steps: int) -> int:
    """Rounds to the nearest integer, then down to a multiple of ``steps`` (sd-scripts ``round_to_steps``)."""
    v = int(x + 0.5)
    return v - v % steps


def _cover_size(image_size: Size, bucket: Size) -> Size:
    """Scales the image so it covers ``bucket``: match height when the image is wider than the bucket, else width;
    rounded to nearest and never below the bucket side (guards float rounding)."""
    w, h = image_size
    scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
    return max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5))


def _no_upscale_size(image_size: Size, spec: BucketSpec) -> Size:
    """sd-scripts' ``no_upscale`` resize: shrink to ``max_area`` keeping aspect, rounding the side whose rounding to
    the step keeps the aspect ratio best; images within the area keep their size."""
    w, h = image_size
    if w * h <= spec.max_area:
        return w, h
    ar = w / h
    rw = math.sqrt(spec.max_area * ar)
    rh = spec.max_area / rw
    steps = spec.reso_steps
    bw = round_to_steps(rw, steps)
    bh_w = max(steps, round_to_steps(bw / ar, steps))
    bh = round_to_steps(rh, steps)
    bw_h = max(steps, round_to_steps(bh * ar, steps))
    if bw and abs(bw / bh_w - ar) < abs(bw_h / max(bh, 1) - ar):
        return bw, int(bw / ar + 0.5)
    return int(bh * ar + 0.5), bh


def select_bucket(image_size: Size, spec: BucketSpec, predefined: Sequence[Size] | None = None) -> BucketAssignment:
    """Assigns an image to a bucket (sd-scripts ``BucketManager.select_bucket``).

    - Predefined buckets (bucketing on without ``no_upscale``, or bucketing off): an exact size match wins; else
      the bucket with the smallest ``|bucket AR - image AR|`` (first in sorted order on ties). The image is scaled
      to cover it.
    - ``no_upscale``: the image is shrunk to ``max_area`` if larger (see :func:`_no_upscale_size`) and the bucket is
      that size floored to ``reso_steps``; the excess is cropped. An image smaller than one step on a side gets a
      one-step bucket and is enlarged to cover it (sd-scripts would make a 0-pixel bucket).

    Args:
        image_size: ``(width, height)`` in pixels, after EXIF orientation.
        spec: the bucket settings.
        predefined: the list from :func:`predefined_buckets`; computed when None (pass it in loops).

    Returns:
        A :class:`BucketAssignment`. E.g. 1024x768 with the default spec at 512x512 goes to bucket ``(576, 448)``,
        resized to ``(597, 448)``.

    Raises:
        ValueError: a side of ``image_size`` is not positive.
    """
    w, h = image_size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    ar = w / h
    if predefined is None:
        predefined = predefined_buckets(spec)
    if predefined:
        if (w, h) in predefined:
            bucket = (w, h)
        else:
            bucket = min(predefined, key=lambda r: abs(r[0] / r[1] - ar))
        resized = _cover_size((w, h), bucket)
    else:
        resized = _no_upscale_size((w, h), spec)
        steps = spec.reso_steps
        bucket = (max(steps, resized[0] - resized[0] % steps), max(steps, resized[1] - resized[1] % steps))
        if resized[0] < bucket[0] or resized[1] < bucket[1]:
            resized = _cover_size((w, h), bucket)
    return BucketAssignment(bucket=bucket, resized_size=resized, ar_error=bucket[0] / bucket[1] - ar)


def crop_offset(resized_size: Size, bucket: Size, rng: random.Random | None = None) -> Size:
    """Where the bucket is cut out of the resized image (sd-scripts ``trim_and_resize_if_required``).

    Args:
        resized_size: ``(width, height)`` after the cover resize.
        bucket: ``(width, height)`` of the crop.
        rng: None for a centre crop (``excess // 2``), or the random source for ``random_crop``
            (``randint(0, excess)`` per axis, width first).

    Returns:
        ``(left, top)`` in pixels of the resized image.
    """
    excess_w = resized_size[0] - bucket[0]
    excess_h = resized_size[1] - bucket[1]
    if rng is None:
        return excess_w // 2, excess_h // 2
    return rng.randint(0, excess_w), rng.randint(0, excess_h)


def get_crop_ltrb(bucket: Size, image_size: Size) -> tuple[int, int, int, int]:
    """The crop box sd-scripts records for SDXL size conditioning and stores as ``crop_ltrb`` in latent caches
    (``BucketManager.get_crop_ltrb``, after Stability AI's preprocessing).

    It is the box the image would occupy if **fitted inside** the bucket, centred, regardless of the crop actually
    made (sd-scripts uses it even with random crop). Values are floored to whole pixels.

    Args:
        bucket: ``(width, height)`` in pixels.
        image_size: original ``(width, height)`` in pixels.

    Returns:
        ``(left, top, right, bottom)`` in bucket pixels. SDXL's ``crop_top_left`` is ``(top, left)``; for a
        horizontally flipped sample the left is ``bucket width - right``.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, float(bucket[1])
    else:
        rw, rh = float(bucket[0]), bucket[0] / image_ar
    left = (bucket[0] - rw) // 2
    top = (bucket[1] - rh) // 2
    return int(left), int(top), int(left + rw), int(top + rh)


def make_epoch_batches(
    items_by_bucket: Mapping[Hashable, Sequence[int]], batch_size: int, seed: int, epoch: int
) -> list[tuple[Hashable, list[int]]]:
    """Builds one epoch's batches inside buckets, in a seeded shuffled order (sd-scripts ``make_buckets`` +
    ``shuffle_buckets``).

    Each bucket's item list (item indices, already repeated ``num_repeats`` times) is shuffled, cut into
    ``ceil(len / batch_size)`` batches (the last one may be short), and the order of all batches is shuffled.
    The random source is ``random.Random(seed + epoch)``, as sd-scripts seeds ``random`` per epoch.

    Args:
        items_by_bucket: bucket key (e.g. ``(width, height)``) -> item indices with repeats.
        batch_size: items per batch, >= 1.
        seed: the training seed.
        epoch: the epoch number.

    Returns:
        ``[(bucket key, [item index, ...]), ...]``; every index appears as often as in the input.

    Raises:
        ConfigError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed + epoch)
    batches: list[tuple[Hashable, list[int]]] = []
    for key in sorted(items_by_bucket):
        items = list(items_by_bucket[key])
        rng.shuffle(items)
        batches.extend((key, items[i : i + batch_size]) for i in range(0, len(items), batch_size))
    rng.shuffle(batches)
    return batches


def count_epoch_batches(bucket_sizes: Mapping[Hashable, int], batch_size: int) -> int:
    """Batches per epoch: the sum over buckets of ``ceil(items with repeats / batch_size)``
    (``ss_num_batches_per_epoch``)."""
    return sum(math.ceil(n / batch_size) for n in bucket_sizes.values() if n > 0)


def bucket_info(assignments: Sequence[BucketAssignment], repeats: Sequence[int]) -> dict:
    """The ``ss_bucket_info`` metadata (sd-scripts ``BaseDataset.make_buckets``).

    Args:
        assignments: one per image.
        repeats: ``num_repeats`` of each image, same order.

    Returns:
        ``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}``: used buckets sorted by
        ``(width, height)``, counts including repeats, the mean absolute AR error over images without repeats.
    """
    counts: dict[Size, int] = {}
    for a, n in zip(assignments, repeats, strict=True):
        counts[a.bucket] = counts.get(a.bucket, 0) + n
    buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
    errors = [abs(a.ar_error) for a in assignments]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}
