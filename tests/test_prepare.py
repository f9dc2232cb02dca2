"""``lib_lora.prepare``: uniform-size copies of a dataset folder (centre / focal / keep-aspect), flipped copies,
captions copied along, originals untouched, background removal only with a local rembg model, and the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora import prepare
from lib_lora.cli import main as cli_main
from lib_lora.errors import ConfigError


def _flat_with_patch(w: int, h: int, patch_x: int, side: int = 40) -> Image.Image:
    """A flat gray ``w`` x ``h`` image with a ``side``-pixel square of random noise whose left edge is at
    ``patch_x`` (vertically centred): the only detailed region."""
    arr = np.full((h, w, 3), 120, dtype=np.uint8)
    rng = np.random.default_rng(1)
    top = (h - side) // 2
    arr[top : top + side, patch_x : patch_x + side] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path) -> Path:
    """``src/1_sks``: a 300x100 image with detail at the right end (captioned, with a BOM) and a 50x80 JPEG."""
    sub = tmp_path / "src" / "1_sks"
    sub.mkdir(parents=True)
    _flat_with_patch(300, 100, 250).save(sub / "wide.png")
    (sub / "wide.txt").write_bytes("\ufeffsks, patch\r\n".encode())
    Image.new("RGB", (50, 80), (200, 10, 10)).save(sub / "small.jpg", quality=95)
    (sub / "notes.md").write_text("not an image", encoding="utf-8")
    return tmp_path / "src"


def test_entropy_focal_point_finds_the_detailed_region():
    """Proves the entropy focal point of a flat 300x100 image with a noise square at x 250-290 lies on the square
    (x within 240-300), and a flat image gives its centre."""
    x, y = prepare.entropy_focal_point(_flat_with_patch(300, 100, 250))
    assert 240 <= x <= 300 and 30 <= y <= 70
    assert prepare.entropy_focal_point(Image.new("RGB", (90, 30), (5, 5, 5))) == (45.0, 15.0)


def test_square_box_and_fit_size():
    """Proves the crop square is as large as the shorter side and clamped to the edges, and ``fit_size`` only
    downscales."""
    assert prepare.square_box((300, 100), (150, 50)) == (100, 0, 200, 100)
    assert prepare.square_box((300, 100), (290, 50)) == (200, 0, 300, 100)
    assert prepare.square_box((100, 300), (50, 0)) == (0, 0, 100, 100)
    assert prepare.fit_size((2000, 1000), 512) == (512, 256)
    assert prepare.fit_size((300, 100), 512) == (300, 100)


def test_prepare_focal_crop_flip_and_captions(src, tmp_path, monkeypatch):
    """Proves ``crop="focal"`` (entropy path: cv2 hidden) writes 64x64 PNGs cut around the detail, mirrored copies
    with the same caption bytes, notes the upscaled 50x80 JPEG, skips nothing, and leaves the source
    byte-identical."""
    monkeypatch.setattr(prepare, "face_focal_point", lambda img: None)
    before = _tree_digest(src)
    dst = tmp_path / "dst"
    report = prepare.prepare_folder(src, dst, size=64, crop="focal", flip=True)
    assert _tree_digest(src) == before
    out = dst / "1_sks"
    assert sorted(p.name for p in out.iterdir()) == [
        "small.png", "small_flip.png", "wide.png", "wide.txt", "wide_flip.png", "wide_flip.txt"]
    assert report.images == 4 and report.skipped == []
    for name in ("wide.png", "wide_flip.png", "small.png"):
        assert Image.open(out / name).size == (64, 64)
    assert (out / "wide_flip.txt").read_bytes() == (src / "1_sks" / "wide.txt").read_bytes()
    wide = np.asarray(Image.open(out / "wide.png").convert("L"), dtype=np.float64)
    # the crop is x 200-300 of the source: flat left part, the noise square at columns 32-58 of 64
    assert wide[:, :28].std() < 1 and wide[22:42, 35:56].std() > 15
    flipped = np.asarray(Image.open(out / "wide_flip.png").convert("L"), dtype=np.float64)
    assert np.array_equal(flipped, wide[:, ::-1])
    assert any(f == "1_sks/small.jpg" and "upscaled" in n for f, n in report.notes)


def test_prepare_centre_and_keep_aspect(src, tmp_path):
    """Proves ``crop="centre"`` gives the flat middle of the wide image, and ``crop="none"`` keeps the aspect
    (300x100 at size 150 -> 150x50; the 50x80 image is not upscaled)."""
    report = prepare.prepare_folder(src, tmp_path / "c", size=64, crop="centre")
    assert report.images == 2
    assert np.asarray(Image.open(tmp_path / "c/1_sks/wide.png").convert("L")).std() < 5
    prepare.prepare_folder(src, tmp_path / "n", size=150, crop="none")
    assert Image.open(tmp_path / "n/1_sks/wide.png").size == (150, 50)
    assert Image.open(tmp_path / "n/1_sks/small.png").size == (50, 80)


def test_prepare_refuses_source_and_skips_existing_and_bad(src, tmp_path):
    """Proves the output folder cannot be the source or inside it; existing outputs are skipped with a reason
    unless ``overwrite``; an undecodable image is skipped with its reason; bad size/crop are refused."""
    for dst in (src, src / "1_sks", src / "out"):
        with pytest.raises(ConfigError, match="source folder"):
            prepare.prepare_folder(src, dst, size=64)
    with pytest.raises(ConfigError, match="size"):
        prepare.prepare_folder(src, tmp_path / "d", size=32)
    with pytest.raises(ConfigError, match="crop"):
        prepare.prepare_folder(src, tmp_path / "d", crop="middle")
    (src / "1_sks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    dst = tmp_path / "d"
    first = prepare.prepare_folder(src, dst, size=64)
    assert [f for f, _ in first.skipped] == ["1_sks/broken.png"]
    again = prepare.prepare_folder(src, dst, size=64)
    assert again.images == 0 and all("exists" in r for f, r in again.skipped if f != "1_sks/broken.png")
    assert prepare.prepare_folder(src, dst, size=64, overwrite=True).images == 2


def test_background_removal_explains_when_unavailable(src, tmp_path, monkeypatch):
    """Proves background removal without rembg (or without its model file under ``U2NET_HOME``) is refused with
    a message saying how to enable it, before anything is written."""
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "models"))
    assert prepare.rembg_model_path() == tmp_path / "models" / "u2net.onnx"
    ok, message = prepare.rembg_status()
    assert not ok
    if importlib.util.find_spec("rembg") is None:
        assert "pip install rembg" in message
    assert str(tmp_path / "models" / "u2net.onnx") in message
    assert "never" in message or "nothing" in message
    with pytest.raises(ConfigError, match="rembg"):
        prepare.prepare_folder(src, tmp_path / "d", size=64, remove_background=True)
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="opencv-python is not installed")
def test_face_focal_point_runs_with_opencv():
    """Proves (only where cv2 is installed) that the Haar cascade loads and a face-less image gives None, so the
    focal crop falls back to entropy."""
    img = _flat_with_patch(300, 100, 250)
    assert prepare.face_focal_point(img) is None
    assert prepare.focal_point(img)[1] == "entropy"


def test_cli_prepare(src, tmp_path, capsys):
    """Proves ``python -m lib_lora prepare SRC DST --size 64 --crop none --flip`` writes the copies and exits 0,
    and ``--remove-background`` without rembg exits 2 with the explanation."""
    assert cli_main(["prepare", str(src), str(tmp_path / "o"), "--size", "64", "--crop", "none", "--flip"]) == 0
    assert (tmp_path / "o/1_sks/wide_flip.png").is_file()
    assert "wrote 4 image(s)" in capsys.readouterr().out
    if importlib.util.find_spec("rembg") is None:
        assert cli_main(["prepare", str(src), str(tmp_path / "p"), "--remove-background"]) == 2
        assert "rembg" in capsys.readouterr().err
