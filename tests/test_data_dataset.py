"""lib_lora.data.dataset: folder scan and report, item pipeline, latent cache, batches.

Uses real images: small ones made with Pillow, and the five dog photos in /work/shared/data/dreambooth/dog (copied to
a temporary Kohya layout; the shared folder is read-only).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _paths import SHARED_DATA
from PIL import Image

from lib_lora.data.buckets import BucketSpec
from lib_lora.data.captions import CaptionOptions
from lib_lora.data.dataset import (
    ImageRecord,
    ScanOptions,
    TrainDataset,
    caption_mismatch_message,
    latent_cache_path,
    load_item_pixels,
    parse_subset_dir_name,
    plan_items,
    scan_dataset,
)
from lib_lora.errors import ConfigError, DatasetError

DOG_DIR = SHARED_DATA / "dreambooth/dog"
SMALL = BucketSpec(resolution=(128, 128), min_reso=64, max_reso=256, reso_steps=64)


class CountingEncoder:
    """Fake VAE: average-pool by 8, three colour channels plus their mean -> (B, 4, H/8, W/8). Counts calls."""

    def __init__(self, poison: bool = False):
        self.calls = 0
        self.images = 0
        self.poison = poison

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += pixels.shape[0]
        pooled = F.avg_pool2d(pixels, 8)
        out = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)
        if self.poison:
            out[:, :, 0, 0] = float("nan")
        return out


def _image(path: Path, size=(96, 64), color=(200, 40, 40), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = np.clip(rng.normal(0, 20, (size[1], size[0], 3)) + np.array(color), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _dog_layout(tmp_path: Path, folder: str = "10_sks dog") -> Path:
    root = tmp_path / "train"
    sub = root / folder
    sub.mkdir(parents=True)
    for f in sorted(DOG_DIR.glob("*.jpg")):
        shutil.copy(f, sub / f.name)
    return root


# --- scan -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("10_sks dog", (10, "sks dog")),
        ("3_a_b c", (3, "a_b c")),
        ("1_", (1, "")),
        ("0_x", (0, "x")),
        ("sks dog", None),
        ("10", None),
        ("x_10", None),
    ],
)
def test_parse_subset_dir_name(name, expected):
    assert parse_subset_dir_name(name) == expected


def test_kohya_layout_with_dog_photos(tmp_path):
    root = _dog_layout(tmp_path)
    (root / "10_sks dog" / "00.txt").write_text("sks dog, Sitting, grass\n")
    (root / "10_sks dog" / "01.txt").write_text("\ufeffsks dog, grass\r\n")
    report = scan_dataset(root)
    assert report.layout == "kohya"
    assert report.dataset_dirs() == {"10_sks dog": {"n_repeats": 10, "img_count": 5}}
    assert report.num_images == 5 and report.num_train_images == 50
    assert report.tag_frequency() == {"10_sks dog": {"sks dog": 5, "sitting": 1, "grass": 2}}
    captions = {r.path.name: (r.caption, r.caption_source) for r in report.images}
    assert captions["00.jpg"] == ("sks dog, Sitting, grass", "file")
    assert captions["04.jpg"] == ("sks dog", "class_tokens")
    assert {r.size for r in report.images} >= {(780, 780), (687, 687)}
    assert report.warnings == [] and report.skipped == []
    summary = report.to_dict()
    assert summary["subsets"][0]["captions"] == {".txt": 2, ".caption": 0}
    assert summary["num_train_images"] == 50


def test_siblings_without_prefix_and_root_images_are_skipped_by_name(tmp_path):
    root = tmp_path / "train"
    _image(root / "5_cat" / "a.png")
    _image(root / "misc" / "b.png")
    _image(root / "stray.png")
    (root / "notes.txt").write_text("not a caption")
    report = scan_dataset(root)
    assert report.dataset_dirs() == {"5_cat": {"n_repeats": 5, "img_count": 1}}
    joined = " ".join(report.warnings)
    assert "misc" in joined and "stray.png" in joined
    assert {f.path.name for f in report.skipped} == {"misc", "stray.png"}


def test_pointing_at_a_subset_folder_itself(tmp_path):
    root = _dog_layout(tmp_path, "3_sks dog")
    report = scan_dataset(root / "3_sks dog")
    assert report.layout == "subset_folder"
    assert report.dataset_dirs() == {"3_sks dog": {"n_repeats": 3, "img_count": 5}}
    assert all(r.caption == "sks dog" for r in report.images)
    assert any("3 repeats" in n and "sks dog" in n for n in report.notes)


def test_plain_folder_uses_repeats_option(tmp_path):
    root = tmp_path / "my photos"
    for i in range(3):
        _image(root / f"{i}.png")
    (root / "0.txt").write_text("a photo")
    _image(root / "extra" / "z.png")
    report = scan_dataset(root, ScanOptions(repeats=4, class_tokens="ohwx person"))
    assert report.layout == "plain"
    assert report.dataset_dirs() == {"my photos": {"n_repeats": 4, "img_count": 3}}
    assert [r.caption for r in report.images] == ["a photo", "ohwx person", "ohwx person"]
    assert any("extra" in w for w in report.warnings)


def test_caption_extension_mismatch_is_an_error_with_counts(tmp_path):
    root = _dog_layout(tmp_path)
    for f in (root / "10_sks dog").glob("*.jpg"):
        f.with_suffix(".caption").write_text("sks dog, photo")
    with pytest.raises(DatasetError, match=r"0 \.txt captions, 5 \.caption captions .*caption_extension=\.caption"):
        scan_dataset(root)
    report = scan_dataset(root, ScanOptions(caption_extension=".caption"))
    assert all(r.caption_source == "file" for r in report.images)


def test_caption_mismatch_message():
    assert caption_mismatch_message({".txt": 0, ".caption": 5}, ".txt", 5) == (
        "0 .txt captions, 5 .caption captions for 5 images: set caption_extension=.caption"
    )
    assert caption_mismatch_message({".txt": 1, ".caption": 5}, ".txt", 5) is None
    assert caption_mismatch_message({".txt": 0, ".caption": 0}, ".txt", 5) is None


def test_truncated_jpeg_reported_by_name_before_training(tmp_path):
    sub = tmp_path / "train" / "2_thing"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        _image(sub / name, size=(128, 96), fmt="JPEG")
    data = (sub / "c.jpg").read_bytes()
    (sub / "c.jpg").write_bytes(data[: int(len(data) * 0.6)])

    report = scan_dataset(tmp_path / "train")
    assert [f.path.name for f in report.bad_images] == ["c.jpg"]
    assert "truncated" in report.bad_images[0].reason
    assert any("c.jpg" in w for w in report.warnings)
    assert sorted(r.path.name for r in report.images) == ["a.jpg", "b.jpg", "d.jpg"]

    with pytest.raises(DatasetError, match=r"1 corrupt or truncated image\(s\): 2_thing/c\.jpg"):
        scan_dataset(tmp_path / "train", ScanOptions(on_bad_image="stop"))


def test_macos_litter_is_skipped(tmp_path):
    sub = tmp_path / "train" / "1_x"
    _image(sub / "a.png")
    _image(sub / "._a.png")
    _image(tmp_path / "train" / "__MACOSX" / "1_x" / "a.png")
    report = scan_dataset(tmp_path / "train")
    assert [r.path.name for r in report.images] == ["a.png"]
    assert report.dataset_dirs() == {"1_x": {"n_repeats": 1, "img_count": 1}}
    reasons = {f.path.name: f.reason for f in report.skipped}
    assert "resource fork" in reasons["._a.png"]
    assert "__MACOSX" in reasons["__MACOSX"]


def test_no_usable_images(tmp_path):
    root = tmp_path / "train"
    (root / "empty").mkdir(parents=True)
    (root / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no usable images"):
        scan_dataset(root)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "missing")


def test_empty_caption_file_falls_back_to_class_tokens(tmp_path):
    sub = tmp_path / "train" / "2_sks cat"
    _image(sub / "a.png")
    (sub / "a.txt").write_text("\n  \n")
    (report_image,) = scan_dataset(tmp_path / "train").images
    assert (report_image.caption, report_image.caption_source) == ("sks cat", "class_tokens")


def test_same_stem_warning(tmp_path):
    sub = tmp_path / "train" / "1_x"
    _image(sub / "a.png")
    _image(sub / "a.jpg", fmt="JPEG")
    report = scan_dataset(tmp_path / "train")
    assert any("share the name 'a'" in w for w in report.warnings)


@pytest.mark.parametrize(
    "kwargs", [{"caption_extension": "txt"}, {"repeats": 0}, {"on_bad_image": "ignore"}, {"caption_extension": "."}]
)
def test_scan_options_validation(kwargs):
    with pytest.raises(ConfigError):
        ScanOptions(**kwargs)


# --- pipeline -------------------------------------------------------------------------------------------------


def _records(tmp_path: Path, sizes, repeats=1) -> list[ImageRecord]:
    out = []
    for i, size in enumerate(sizes):
        path = _image(tmp_path / "1_x" / f"{i}.png", size=size)
        out.append(ImageRecord(path, size, f"tag{i}, b, c", "file", "1_x", repeats))
    return out


def test_load_item_pixels_shape_range_and_flip(tmp_path):
    path = tmp_path / "half.png"
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, 96:] = 255
    Image.fromarray(arr).save(path)
    (plan,) = plan_items([ImageRecord(path, (192, 64), "", "none", "x", 1)], SMALL)
    assert plan.assignment.bucket == (192, 64)
    x = load_item_pixels(plan)
    assert x.shape == (3, 64, 192) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x[:, :, :96].max() == -1.0 and x[:, :, 96:].min() == 1.0
    np.testing.assert_array_equal(load_item_pixels(plan, flip=True), x[:, :, ::-1])


def test_memory_cache_encodes_once_per_image_across_epochs(tmp_path):
    root = _dog_layout(tmp_path)
    report = scan_dataset(root)
    enc = CountingEncoder()
    ds = TrainDataset(report.images, enc, buckets=SMALL, batch_size=2, seed=1)
    assert len(ds) == 25 and ds.num_train_images == 50
    seen = Counter()
    for epoch in range(2):
        for batch in ds.batches(epoch):
            assert batch.latents.shape == (len(batch.captions), 4, 16, 16)
            assert batch.target_sizes_hw == [(128, 128)] * len(batch.captions)
            seen.update(p.name for p in batch.paths)
        assert enc.images == 5 and enc.calls == 5  # first epoch encodes, second reuses
    assert seen == Counter({f"0{i}.jpg": 20 for i in range(5)})


def test_cached_latents_match_encoder_and_flip(tmp_path):
    records = _records(tmp_path, [(96, 64), (64, 96)], repeats=4)
    enc = CountingEncoder()
    ds = TrainDataset(records, enc, buckets=SMALL, batch_size=4, flip_aug=True, vae_batch_size=8)
    assert ds.cache_latents() == 2 and enc.calls == 2 and enc.images == 4  # each image + its flip, per bucket
    assert ds.cache_latents() == 0
    flips = Counter()
    for batch in ds.batches(0):
        for i, path in enumerate(batch.paths):
            plan = next(p for p in ds.items if p.record.path == path)
            expected = enc(torch.from_numpy(load_item_pixels(plan, flip=batch.flipped[i]))[None])[0]
            torch.testing.assert_close(batch.latents[i], expected)
            flips[batch.flipped[i]] += 1
    assert flips[True] > 0 and flips[False] > 0


def test_batches_reproducible_and_reshuffled(tmp_path):
    records = _records(tmp_path, [(64, 64)] * 6, repeats=2)
    opts = CaptionOptions(shuffle=True, keep_tokens=1, trigger_words=("sks",))

    def run(seed, epoch):
        ds = TrainDataset(records, CountingEncoder(), buckets=SMALL, captions=opts, batch_size=3, seed=seed)
        return [([p.name for p in b.paths], b.captions) for b in ds.batches(epoch)]

    assert run(7, 0) == run(7, 0)
    assert run(7, 0) != run(7, 1)
    for _, captions in run(7, 0):
        assert all(c.startswith("sks, ") for c in captions)


def test_crop_top_left_mirrors_for_flips(tmp_path):
    # 140x50 (AR 2.8) goes to bucket (192, 64) (AR 3): the fitted box is 64 * 2.8 = 179.2 wide,
    # left = (192 - 179.2) // 2 = 6, right = int(6 + 179.2) = 185; flipped left = 192 - 185 = 7.
    records = _records(tmp_path, [(140, 50)], repeats=8)
    ds = TrainDataset(records, CountingEncoder(), buckets=SMALL, batch_size=8, flip_aug=True)
    assert ds.items[0].assignment.bucket == (192, 64)
    assert ds.items[0].crop_ltrb == (6, 0, 185, 64)
    (batch,) = list(ds.batches(3))
    for flipped, top_left in zip(batch.flipped, batch.crop_top_lefts):
        assert top_left == ((0, 7) if flipped else (0, 6))
    assert batch.original_sizes_hw == [(50, 140)] * 8
    assert batch.target_sizes_hw == [(64, 192)] * 8


def test_disk_cache_next_to_images_and_reused(tmp_path):
    root = _dog_layout(tmp_path)
    report = scan_dataset(root)
    enc = CountingEncoder()
    ds = TrainDataset(report.images, enc, buckets=SMALL, flip_aug=True, cache="disk")
    ds.cache_latents()
    assert enc.images == 10
    npz = root / "10_sks dog" / "00_0128x0128_sd.npz"
    assert npz.is_file()
    with np.load(npz) as data:
        assert set(data.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
        assert data["latents"].shape == (4, 16, 16)
        assert tuple(data["original_size"]) == (780, 780)
        assert tuple(data["crop_ltrb"]) == (0, 0, 128, 128)
    assert scan_dataset(root).num_images == 5  # npz files are not images and not reported

    enc2 = CountingEncoder()
    ds2 = TrainDataset(report.images, enc2, buckets=SMALL, flip_aug=True, cache="disk")
    for epoch in range(2):
        assert sum(len(b.paths) for b in ds2.batches(epoch)) == 50
    assert enc2.calls == 0

    # An image edited after its cache was written is encoded again.
    img = root / "10_sks dog" / "00.jpg"
    later = npz.stat().st_mtime + 10
    os.utime(img, (later, later))
    enc3 = CountingEncoder()
    assert TrainDataset(report.images, enc3, buckets=SMALL, flip_aug=True, cache="disk").cache_latents() == 1


def test_disk_cache_in_cache_dir(tmp_path):
    records = _records(tmp_path / "data", [(64, 64)])
    ds = TrainDataset(records, CountingEncoder(), buckets=SMALL, cache="disk", cache_dir=tmp_path / "cache")
    ds.cache_latents()
    assert (tmp_path / "cache" / "1_x" / "0_0128x0128_sd.npz").is_file()
    assert not list((tmp_path / "data").rglob("*.npz"))
    assert latent_cache_path(Path("/d/a.png"), (832, 1216), "_sdxl") == Path("/d/a_0832x1216_sdxl.npz")


def test_random_crop_needs_no_cache(tmp_path):
    records = _records(tmp_path, [(100, 64)], repeats=2)
    for mode in ("memory", "disk"):
        with pytest.raises(ConfigError, match="random_crop"):
            TrainDataset(records, CountingEncoder(), buckets=SMALL, random_crop=True, cache=mode)
    enc = CountingEncoder()
    ds = TrainDataset(records, enc, buckets=SMALL, random_crop=True, cache="none", batch_size=2)
    assert ds.cache_latents() == 0
    for epoch in range(2):
        list(ds.batches(epoch))
    assert enc.images == 4  # encoded every time


def test_non_finite_latents_use_fp32_fallback(tmp_path):
    records = _records(tmp_path, [(64, 64)])
    fp16_like, fp32 = CountingEncoder(poison=True), CountingEncoder()
    ds = TrainDataset(records, fp16_like, encode_fp32=fp32, buckets=SMALL)
    (batch,) = list(ds.batches(0))
    assert torch.isfinite(batch.latents).all()
    assert fp16_like.calls == 1 and fp32.calls == 1
    with pytest.raises(DatasetError, match="NaN/Inf latents for 0.png"):
        TrainDataset(records, CountingEncoder(poison=True), buckets=SMALL).cache_latents()


def test_train_dataset_validation(tmp_path):
    records = _records(tmp_path, [(64, 64)])
    with pytest.raises(ConfigError, match="cache"):
        TrainDataset(records, CountingEncoder(), cache="gpu")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainDataset(records, CountingEncoder(), batch_size=0)
    with pytest.raises(DatasetError):
        TrainDataset([], CountingEncoder())


def test_bucket_info_from_dataset(tmp_path):
    records = _records(tmp_path, [(64, 64), (64, 64), (150, 50)], repeats=3)
    ds = TrainDataset(records, CountingEncoder(), buckets=SMALL)
    info = ds.bucket_info()
    assert info["buckets"] == {0: {"resolution": [128, 128], "count": 6}, 1: {"resolution": [192, 64], "count": 3}}
