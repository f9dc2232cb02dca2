"""lib_lora.data.images: sniffing, full decode, EXIF orientation, conversion to RGB, folder listing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_lora.data.images import (
    ignore_reason,
    list_image_files,
    open_image,
    probe_image,
    resize_and_crop,
    sniff_format,
    to_rgb,
)
from lib_lora.errors import DatasetError


def _save(img: Image.Image, path, fmt: str, **kwargs):
    img.save(path, format=fmt, **kwargs)
    return path


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01", "JPEG"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00", "GIF"),
        (b"BM\x3a\x00\x00\x00\x00\x00\x00\x00", "BMP"),
        (b"II*\x00\x08\x00\x00\x00\x00\x00", None),
        (b"hello world, not an image", None),
        (b"", None),
    ],
)
def test_sniff_format(header, expected):
    assert sniff_format(header) == expected


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_each_format_opens_as_rgb_whatever_the_extension(tmp_path, fmt):
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    path = _save(img, tmp_path / "picture.dat", fmt)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (40, 24)
    r, g, b = out.getpixel((20, 12))
    assert r > 150 and g < 80 and b < 80
    assert probe_image(path).format == fmt


def test_exif_orientation_6_jpeg_loads_upright(tmp_path):
    # 64 wide x 32 high, left half red, right half blue; orientation 6 = rotate 90 degrees clockwise to display.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(arr), tmp_path / "rotated.jpg", "JPEG", exif=exif.tobytes(), quality=95)

    out = open_image(path)
    assert out.size == (32, 64)  # w=32, h=64
    assert probe_image(path).size == (32, 64)
    top, bottom = out.getpixel((16, 8)), out.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_png_renamed_jpg_has_white_transparent_pixels(tmp_path):
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    img.paste((10, 200, 10, 255), (0, 0, 8, 16))
    path = _save(img, tmp_path / "looks_like.jpg", "PNG")
    out = open_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((12, 8)) == (255, 255, 255)
    assert out.getpixel((2, 8)) == (10, 200, 10)
    assert probe_image(path).format == "PNG"


def test_half_transparent_pixel_is_blended_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    out = open_image(_save(img, tmp_path / "a.png", "PNG"))
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 1)))


def test_la_and_palette_transparency_composite_on_white(tmp_path):
    la = Image.new("LA", (4, 4), (50, 0))
    assert open_image(_save(la, tmp_path / "la.png", "PNG")).getpixel((0, 0)) == (255, 255, 255)

    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    path = _save(p, tmp_path / "p.png", "PNG", transparency=1)
    out = open_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((2, 2)) == (255, 255, 255)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = open_image(path).getpixel((4, 4))
    assert r > 200 and b < 50


def test_cmyk_jpeg_and_grayscale_become_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = open_image(_save(cmyk, tmp_path / "cmyk.jpg", "JPEG", quality=95)).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    gray = Image.new("L", (8, 8), 77)
    assert open_image(_save(gray, tmp_path / "gray.png", "PNG")).getpixel((4, 4)) == (77, 77, 77)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32896, np.uint16)  # 128 * 257: mid grey in 16 bits
    arr[0, 0] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    out = open_image(path)
    assert out.getpixel((4, 4)) == (128, 128, 128)
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_i16_mode():
    img = Image.new("I;16", (2, 2), 65535)
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    full = _save(good, tmp_path / "full.jpg", "JPEG", quality=90).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full[: int(len(full) * 0.6)])
    with pytest.raises(DatasetError, match=r"^cut\.jpg: corrupt or truncated JPEG"):
        probe_image(cut)
    with pytest.raises(DatasetError, match="cut.jpg"):
        open_image(cut)


def test_not_an_image_is_an_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(DatasetError, match="not an image"):
        open_image(path)


def test_ignore_reason():
    from pathlib import Path

    assert "resource fork" in ignore_reason(Path("data/._a.png"))
    assert "__MACOSX" in ignore_reason(Path("data/__MACOSX/10_x/a.png"))
    assert ignore_reason(Path("data/__MACOSX/a.png"), root=Path("data")) is not None
    assert ignore_reason(Path("data/.DS_Store")) == "hidden file"
    assert ignore_reason(Path("data/a.png")) is None


def test_list_image_files_sniffs_and_explains(tmp_path):
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    _save(img, tmp_path / "a.png", "PNG")
    _save(img, tmp_path / "b.JPG", "JPEG")
    _save(img, tmp_path / "no_extension", "PNG")
    _save(img, tmp_path / "._a.png", "PNG")
    _save(img, tmp_path / "scan.tif", "TIFF")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "b.caption").write_text("caption")
    (tmp_path / "a_0512x0512_sd.npz").write_bytes(b"PK")
    (tmp_path / "readme.md").write_text("# notes")
    (tmp_path / "__MACOSX").mkdir()
    _save(img, tmp_path / "__MACOSX" / "a.png", "PNG")
    (tmp_path / "sub").mkdir()

    images, skipped = list_image_files(tmp_path)
    assert [p.name for p in images] == ["a.png", "b.JPG", "no_extension"]
    reasons = {f.path.name: f.reason for f in skipped}
    assert set(reasons) == {"._a.png", "scan.tif", "readme.md", "__MACOSX"}
    assert "resource fork" in reasons["._a.png"]
    assert "TIFF" in reasons["scan.tif"]
    assert "not an image" in reasons["readme.md"]
    assert "__MACOSX" in reasons["__MACOSX"]


def test_list_image_files_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="cannot list"):
        list_image_files(tmp_path / "missing")


def test_resize_and_crop_shapes_and_window():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 100:] = 255
    img = Image.fromarray(arr)
    out = resize_and_crop(img, (200, 100), (64, 100), (100, 0))
    assert out.shape == (100, 64, 3) and out.dtype == np.uint8
    assert out.min() == 255
    out = resize_and_crop(img, (128, 64), (64, 64), (32, 0))
    assert out.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="does not fit"):
        resize_and_crop(img, (128, 64), (64, 64), (100, 0))
