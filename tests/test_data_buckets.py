"""lib_lora.data.buckets: sd-scripts bucket list, assignment, crops and epoch batches, with hand-computed numbers."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from lib_lora.data.buckets import (
    BucketAssignment,
    BucketSpec,
    bucket_info,
    count_epoch_batches,
    crop_offset,
    get_crop_ltrb,
    make_bucket_resolutions,
    make_epoch_batches,
    predefined_buckets,
    round_to_steps,
    select_bucket,
    snap_min_max_reso,
)
from lib_lora.errors import ConfigError

SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_make_bucket_resolutions_sd15_defaults():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD15_BUCKETS


def test_make_bucket_resolutions_sdxl():
    resos = make_bucket_resolutions((1024, 1024), 512, 2048, 64)
    assert (1024, 1024) in resos
    assert (832, 1216) in resos and (1216, 832) in resos
    assert (896, 1152) in resos
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in resos)


def test_round_to_steps():
    assert round_to_steps(724.08, 64) == 704
    assert round_to_steps(639.6, 64) == 640
    assert round_to_steps(63.4, 64) == 0


@pytest.mark.parametrize(
    ("size", "bucket", "resized", "ar_error"),
    [
        # AR 1.333 -> (576, 448) AR 1.2857; wider than the bucket, so height matches: 1024 * 448/768 = 597.33.
        ((1024, 768), (576, 448), (597, 448), 576 / 448 - 1024 / 768),
        # AR 0.6 equals (384, 640): width matches, exact fit.
        ((600, 1000), (384, 640), (384, 640), 0.0),
        # An exact bucket size wins and is not resized.
        ((448, 576), (448, 576), (448, 576), 0.0),
        # Square photo of the dog set: 780x780 -> 512x512 (scale 0.6564).
        ((780, 780), (512, 512), (512, 512), 0.0),
        # Extreme panorama: clamps to the widest bucket, height matches: 3000 * 256/300 = 2560.
        ((3000, 300), (1024, 256), (2560, 256), 4.0 - 10.0),
        # A small image is upscaled to cover: 100x50 (AR 2) -> (704, 320) AR 2.2; width matches 704/100.
        ((100, 50), (704, 320), (704, 352), 704 / 320 - 2.0),
    ],
)
def test_select_bucket_predefined(size, bucket, resized, ar_error):
    a = select_bucket(size, BucketSpec())
    assert a.bucket == bucket
    assert a.resized_size == resized
    assert a.ar_error == pytest.approx(ar_error)
    assert a.resized_size[0] >= a.bucket[0] and a.resized_size[1] >= a.bucket[1]


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((300, 200), (256, 192), (300, 200)),  # within max area: kept, bucket floored to steps
        ((2000, 1000), (640, 320), (640, 320)),  # shrunk to area 512^2 keeping AR, height rounding wins
        ((512, 512), (512, 512), (512, 512)),
        ((40, 200), (64, 192), (64, 320)),  # narrower than one step: one-step bucket, enlarged to cover
    ],
)
def test_select_bucket_no_upscale(size, bucket, resized):
    spec = BucketSpec(no_upscale=True)
    assert predefined_buckets(spec) == []
    a = select_bucket(size, spec)
    assert (a.bucket, a.resized_size) == (bucket, resized)


def test_bucketing_disabled_uses_resolution_with_cover_and_crop():
    spec = BucketSpec(resolution=(512, 512), enabled=False)
    assert predefined_buckets(spec) == [(512, 512)]
    a = select_bucket((1024, 768), spec)
    assert a.bucket == (512, 512) and a.resized_size == (683, 512)


def test_crop_offset_centre_and_random():
    assert crop_offset((597, 448), (576, 448)) == (10, 0)
    assert crop_offset((512, 700), (512, 512)) == (0, 94)
    rng = random.Random(0)
    offsets = {crop_offset((600, 520), (576, 512), rng) for _ in range(200)}
    assert all(0 <= x <= 24 and 0 <= y <= 8 for x, y in offsets)
    assert len(offsets) > 20


def test_get_crop_ltrb_like_sd_scripts():
    # Image fitted inside the bucket: 1024x768 in 576x448 -> 576x432, centred vertically.
    assert get_crop_ltrb((576, 448), (1024, 768)) == (0, 8, 576, 440)
    # Same aspect ratio: the box is the whole bucket.
    assert get_crop_ltrb((384, 640), (600, 1000)) == (0, 0, 384, 640)
    # 500x1000 into 512x512: bucket is wider, 256 wide, (512-256)//2 = 128 left.
    assert get_crop_ltrb((512, 512), (500, 1000)) == (128, 0, 384, 512)


def test_spec_snapping_and_validation():
    assert snap_min_max_reso(300, 1000, 64) == (256, 1024)
    spec = BucketSpec(min_reso=300, max_reso=1000)
    assert (spec.min_reso, spec.max_reso) == (256, 1024)
    assert BucketSpec(resolution=(768, 512)).max_area == 768 * 512
    with pytest.raises(ConfigError, match="multiple of 8"):
        BucketSpec(reso_steps=60)
    with pytest.raises(ConfigError, match="bracket"):
        BucketSpec(resolution=(1024, 1024), max_reso=768)
    with pytest.raises(ConfigError, match="resolution"):
        BucketSpec(resolution=(0, 512))
    BucketSpec(resolution=(1024, 1024), max_reso=768, no_upscale=True)  # min/max ignored without upscaling


def test_select_bucket_rejects_empty_size():
    with pytest.raises(ValueError):
        select_bucket((0, 10), BucketSpec())


def test_make_epoch_batches_inside_buckets_and_seeded():
    items = {(512, 512): [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], (576, 448): [5, 5, 6, 6, 7, 7]}
    batches = make_epoch_batches(items, batch_size=4, seed=42, epoch=1)
    assert len(batches) == math.ceil(10 / 4) + math.ceil(6 / 4) == count_epoch_batches({"a": 10, "b": 6}, 4)
    for key, idx in batches:
        assert set(idx) <= set(items[key])
        assert 1 <= len(idx) <= 4
    assert Counter(i for _, idx in batches for i in idx) == Counter(i for v in items.values() for i in v)
    assert sorted(len(idx) for _, idx in batches) == [2, 2, 4, 4, 4]
    assert batches == make_epoch_batches(items, 4, seed=42, epoch=1)
    orders = {tuple((k, tuple(i)) for k, i in make_epoch_batches(items, 4, 42, e)) for e in range(6)}
    assert len(orders) > 1


def test_make_epoch_batches_bad_batch_size():
    with pytest.raises(ConfigError):
        make_epoch_batches({(64, 64): [0]}, 0, 0, 0)


def test_bucket_info_metadata_shape():
    a = [
        BucketAssignment((576, 448), (597, 448), -0.05),
        BucketAssignment((512, 512), (512, 512), 0.0),
        BucketAssignment((512, 512), (512, 512), 0.0),
    ]
    info = bucket_info(a, [10, 10, 3])
    assert info["buckets"] == {0: {"resolution": [512, 512], "count": 13}, 1: {"resolution": [576, 448], "count": 10}}
    assert info["mean_img_ar_error"] == pytest.approx(0.05 / 3)
