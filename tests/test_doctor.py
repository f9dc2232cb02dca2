"""lib_lora.doctor: the dataset checks, on copies of the five real dog photos of /work/shared/data/dreambooth/dog
(read-only; copied, re-encoded, resized, blurred or darkened into temporary folders) and on small Pillow images.
The pure checks are also driven with hand-made ImageStats / CaptionInfo values."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from _paths import SHARED_DATA
from PIL import Image, ImageEnhance, ImageFilter

from lib_lora.doctor import (
    BLUR_THRESHOLD,
    CaptionInfo,
    Finding,
    ImageStats,
    Report,
    analyse_image,
    check_aspect_ratio,
    check_captions,
    check_count,
    check_exposure,
    check_near_duplicates,
    laplacian_variance,
    run_checks,
)
from lib_lora.errors import ConfigError, DatasetError

DOG_DIR = SHARED_DATA / "dreambooth/dog"

pytestmark = pytest.mark.skipif(not DOG_DIR.is_dir(), reason=f"{DOG_DIR} not found")


def _dog(i: int) -> Image.Image:
    with Image.open(DOG_DIR / f"{i:02d}.jpg") as img:
        return img.convert("RGB")


def _by_check(report: Report) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in report.findings:
        out.setdefault(f.check, []).append(f)
    return out


def _stats(name: str, **kw) -> ImageStats:
    base = dict(size=(768, 768), sha256=name, phash="0" * 16, sharpness=500.0, p5=40.0, p99=230.0, clipped=0.0,
                dark=0.1, bright=0.1)
    return ImageStats(name=name, **{**base, **kw})


# ----------------------------------------------------------------------------------------------- real photos


def test_dog_folder_only_count_warning(tmp_path):
    """The five dog photos: fewer than 15 images is a warning, and nothing else is reported."""
    shutil.copytree(DOG_DIR, tmp_path / "dog")
    report = run_checks(tmp_path / "dog")
    assert [(f.check, f.severity) for f in report.findings] == [("count", "warning")]
    assert report.exit_code == 1
    assert report.counts == {"images": 5, "error": 0, "warning": 1, "info": 0}
    assert "5 images" in report.to_text()


def test_near_duplicate_group(tmp_path):
    """One photo, a JPEG q70 re-encode and a 90 % resize form one group; another photo stays out of it."""
    img = _dog(0)
    shutil.copy(DOG_DIR / "00.jpg", tmp_path / "a.jpg")
    img.save(tmp_path / "b_q70.jpg", quality=70)
    img.resize((round(img.width * 0.9), round(img.height * 0.9)), Image.Resampling.LANCZOS).save(tmp_path / "c.png")
    shutil.copy(DOG_DIR / "02.jpg", tmp_path / "other.jpg")
    found = _by_check(run_checks(tmp_path))
    assert [f.files for f in found["near_duplicate"]] == [("a.jpg", "b_q70.jpg", "c.png")]
    assert "duplicate" not in found


def test_exact_duplicate(tmp_path):
    """A lossless re-save (same pixels, other format) is an exact duplicate."""
    shutil.copy(DOG_DIR / "01.jpg", tmp_path / "a.jpg")
    _dog(1).save(tmp_path / "b.png")
    found = _by_check(run_checks(tmp_path))
    assert [f.files for f in found["duplicate"]] == [("a.jpg", "b.png")]
    assert "near_duplicate" not in found  # exact copies are not paired twice


def test_low_resolution_128px(tmp_path):
    """A 128 px image at resolution 512 is below half the resolution: an error; a 300 px one a warning."""
    shutil.copy(DOG_DIR / "03.jpg", tmp_path / "ok.jpg")
    _dog(3).resize((128, 128), Image.Resampling.LANCZOS).save(tmp_path / "small.png")
    _dog(3).resize((300, 300), Image.Resampling.LANCZOS).save(tmp_path / "mid.png")
    report = run_checks(tmp_path, resolution=512)
    found = {(f.severity, f.files) for f in _by_check(report)["low_resolution"]}
    assert found == {("error", ("small.png",)), ("warning", ("mid.png",))}
    assert report.exit_code == 2
    assert "low_resolution" not in _by_check(run_checks(tmp_path, resolution=128))


def test_blurred_copy_reported(tmp_path):
    """A Gaussian-blurred copy (radius 4 px) trips the blur check; the sharp original does not."""
    shutil.copy(DOG_DIR / "04.jpg", tmp_path / "sharp.jpg")
    _dog(4).filter(ImageFilter.GaussianBlur(4)).save(tmp_path / "blurred.jpg", quality=95)
    assert [f.files for f in _by_check(run_checks(tmp_path))["blur"]] == [("blurred.jpg",)]


def test_darkened_copy_reported(tmp_path):
    """A copy at 10 % brightness is reported as very dark; the original is not."""
    shutil.copy(DOG_DIR / "02.jpg", tmp_path / "normal.jpg")
    ImageEnhance.Brightness(_dog(2)).enhance(0.1).save(tmp_path / "dark.jpg", quality=95)
    found = _by_check(run_checks(tmp_path))["exposure"]
    assert [(f.severity, f.files) for f in found] == [("warning", ("dark.jpg",))]
    assert "dark" in found[0].message


def test_all_dog_photos_are_sharp_and_well_exposed():
    """Every dog photo measures well above the blur threshold and has bright highlights."""
    for i in range(5):
        stats = analyse_image(_dog(i), f"{i}.jpg")
        assert stats.sharpness > 2 * BLUR_THRESHOLD and stats.p99 > 200 and len(stats.phash) == 16


def test_decode_and_skipped(tmp_path):
    """A truncated JPEG is a decode error; a text file that is not a caption is an info; a HEIC is a warning."""
    shutil.copy(DOG_DIR / "00.jpg", tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes((DOG_DIR / "01.jpg").read_bytes()[:3000])
    (tmp_path / "readme.md").write_text("hello", encoding="utf-8")
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(20))
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS litter: never reported
    report = run_checks(tmp_path)
    found = _by_check(report)
    assert [(f.severity, f.files) for f in found["decode"]] == [("error", ("broken.jpg",))]
    assert {(f.severity, f.files) for f in found["skipped"]} == {("info", ("readme.md",)),
                                                                 ("warning", ("photo.heic",))}
    assert report.exit_code == 2 and report.num_images == 1


def test_no_usable_images_is_an_error_not_an_exception(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))
    report = run_checks(tmp_path)
    assert {(f.check, f.severity) for f in report.findings} == {("count", "error"), ("decode", "error")}
    assert report.exit_code == 2


def test_caption_checks_on_folder(tmp_path):
    """Kohya layout with captions: extension mismatch, missing, empty, trigger, repeated tag, weight syntax."""
    sub = tmp_path / "5_sks dog"
    sub.mkdir()
    for i in range(6):
        Image.new("RGB", (600, 600), (40 * i, 90, 160)).filter(ImageFilter.DETAIL).save(sub / f"{i}.png")
    captions = {"0.txt": "sks, dog", "1.txt": "dog, red hat, red hat", "2.txt": "sks, (red hat:1.2)", "3.txt": "",
                "4.caption": "sks, dog"}
    for name, text in captions.items():
        (sub / name).write_text(text, encoding="utf-8")
    found = _by_check(run_checks(tmp_path, trigger="sks"))
    files = {check: [f.files for f in fs] for check, fs in found.items() if check.startswith(("caption", "trig",
                                                                                               "dup", "weight"))}
    assert files == {
        "caption_extension": [("5_sks dog/4.caption",)],
        "caption_missing": [("5_sks dog/5.png",)],
        "caption_empty": [("5_sks dog/3.txt",)],
        "trigger_missing": [("5_sks dog/1.txt",)],
        "duplicate_tag": [("5_sks dog/1.txt",)],
        "weight_syntax": [("5_sks dog/2.txt",)],
    }
    assert found["caption_extension"][0].severity == "warning"


def test_caption_extension_mismatch_is_an_error(tmp_path):
    """All captions are .caption but training reads .txt: the scan would raise; the doctor reports an error."""
    for i in range(2):
        shutil.copy(DOG_DIR / f"0{i}.jpg", tmp_path / f"{i}.jpg")
        (tmp_path / f"{i}.caption").write_text("sks, dog, dog", encoding="utf-8")
    report = run_checks(tmp_path)
    found = _by_check(report)
    assert found["caption_extension"][0].severity == "error"
    assert "--caption-extension .caption" in found["caption_extension"][0].fix
    assert [f.files for f in found["duplicate_tag"]] == [("0.caption", "1.caption")]  # still checked
    assert report.exit_code == 2
    assert "caption_extension" not in _by_check(run_checks(tmp_path, caption_extension=".caption"))


def test_non_utf8_caption_is_reported(tmp_path):
    shutil.copy(DOG_DIR / "00.jpg", tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_bytes("sks, café".encode("latin-1"))
    found = _by_check(run_checks(tmp_path))
    assert [(f.severity, f.files) for f in found["caption_encoding"]] == [("error", ("a.txt",))]


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="kind"):
        run_checks(tmp_path, kind="furry")
    with pytest.raises(ConfigError, match="resolution"):
        run_checks(tmp_path, resolution=0)
    with pytest.raises(DatasetError, match="does not exist"):
        run_checks(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- pure checks


@pytest.mark.parametrize(
    ("kind", "n", "expected"),
    [("concept", 0, "error"), ("concept", 14, "warning"), ("concept", 15, None), ("person", 29, "warning"),
     ("person", 40, None), ("person", 51, "info"), ("anime", 10, None), ("style", 99, "warning")],
)
def test_check_count(kind, n, expected):
    found = check_count(n, kind)
    assert [f.severity for f in found] == ([expected] if expected else [])


def test_check_exposure_blown_and_backlit():
    """Blown out needs both clipped white and lifted shadows (a cartoon on white keeps its dark lines)."""
    stats = [
        _stats("blown.jpg", clipped=0.8, p5=180.0),
        _stats("cartoon.png", clipped=0.78, p5=60.0),
        _stats("backlit.jpg", dark=0.45, bright=0.4),
        _stats("fine.jpg"),
    ]
    found = [(f.severity, f.files) for f in check_exposure(stats)]
    assert found == [("warning", ("blown.jpg",)), ("info", ("backlit.jpg",))]


def test_check_aspect_ratio_and_near_duplicate_threshold():
    assert [f.files for f in check_aspect_ratio([_stats("pano.jpg", size=(2000, 700)), _stats("ok.jpg")])] == [
        ("pano.jpg",)
    ]
    a, b, c = _stats("a", phash="0" * 16), _stats("b", phash="0" * 15 + "f"), _stats("c", phash="f" * 16)
    assert [f.files for f in check_near_duplicates([a, b, c])] == [("a", "b")]
    assert check_near_duplicates([a, b, c], max_distance=3) == []


def test_laplacian_variance():
    """Zero on a flat image, large on a checkerboard, NaN below 3x3 pixels."""
    assert laplacian_variance(np.full((8, 8), 128.0)) == 0.0
    checker = np.indices((64, 64)).sum(axis=0) % 2 * 255.0
    assert laplacian_variance(checker) > 1000
    assert np.isnan(laplacian_variance(np.zeros((2, 5))))


def test_check_captions_pure():
    """No caption files at all is not reported; a natural-language caption contains the trigger as a word."""
    assert check_captions([CaptionInfo("a.png", {}), CaptionInfo("b.png", {})], ".txt", trigger="sks") == []
    infos = [CaptionInfo("a.png", {".txt": "a photo of sks dog"}), CaptionInfo("b.png", {".txt": "a photo of sksx"})]
    assert [f.files for f in check_captions(infos, ".txt", trigger="sks")] == [("b.txt",)]


def test_report_json_shape():
    report = Report(Path("x"), "concept", 512, 3, [Finding("blur", "warning", ["a.png"], "m", "f")])
    data = report.to_dict()
    assert list(data) == ["findings", "counts"]
    assert data["findings"] == [{"check": "blur", "severity": "warning", "files": ["a.png"], "message": "m",
                                 "fix": "f"}]
    assert data["counts"] == {"images": 3, "error": 0, "warning": 1, "info": 0}
    assert report.exit_code == 1 and Report(Path("x"), "concept", 512, 3).exit_code == 0
    with pytest.raises(ValueError):
        Finding("blur", "fatal", [], "m", "f")
