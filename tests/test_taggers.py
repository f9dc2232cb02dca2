"""``lib_lora.taggers``: the Tagger protocol, WD14 tag selection and input, caption modes skip / overwrite / prepend
/ append written atomically, and clear messages when onnxruntime or the model files are missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora import taggers
from lib_lora.cli import main as cli_main
from lib_lora.errors import ConfigError


class FakeTagger:
    """A stand-in for a real tagger (WD14, BLIP, DeepBooru): tags an image by its dominant colour with fixed
    scores, so the tests exercise the caption logic without a model."""

    def __init__(self):
        self.calls = 0

    def tag(self, image: Image.Image) -> dict[str, float]:
        self.calls += 1
        r, g, b = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
        colour = "red" if r >= max(g, b) else "green" if g >= b else "blue"
        return {f"{colour} background": 0.9, "simple background": 0.6}


@pytest.fixture
def folder(tmp_path) -> Path:
    """``red.png`` without caption, ``blue.png`` captioned ``sks, blue background, hat`` (BOM, CRLF, second line),
    ``green.png`` with an empty caption file."""
    d = tmp_path / "data"
    d.mkdir()
    for name, rgb in (("red", (250, 0, 0)), ("blue", (0, 0, 250)), ("green", (0, 250, 0))):
        Image.new("RGB", (32, 32), rgb).save(d / f"{name}.png")
    (d / "blue.txt").write_bytes("\ufeffsks, blue background, hat\r\nnote\r\n".encode())
    (d / "green.txt").write_bytes(b"")
    return d


def test_fake_tagger_implements_the_protocol():
    """Proves the protocol is structural: the stand-in counts as a Tagger."""
    assert isinstance(FakeTagger(), taggers.Tagger)


def test_skip_mode_never_replaces_a_caption(folder):
    """Proves mode ``skip`` writes the uncaptioned and empty-captioned images (trigger first), leaves the
    captioned one byte-identical and does not even run the tagger on it."""
    before = (folder / "blue.txt").read_bytes()
    fake = FakeTagger()
    result = taggers.tag_folder(folder, fake, mode="skip", trigger="sks")
    assert fake.calls == 2
    assert (folder / "blue.txt").read_bytes() == before
    assert (folder / "red.txt").read_text(encoding="utf-8") == "sks, red background, simple background\n"
    assert (folder / "green.txt").read_text(encoding="utf-8") == "sks, green background, simple background\n"
    assert [p.name for p in result.kept] == ["blue.png"]


@pytest.mark.parametrize("mode, expected", [
    ("overwrite", "blue background, simple background"),
    ("prepend", "blue background, simple background, sks, hat"),
    ("append", "sks, blue background, hat, simple background"),
])
def test_modes_rewrite_only_the_caption_line(folder, mode, expected):
    """Proves overwrite / prepend / append (repeats dropped) change only the caption line: the second line is
    kept, the BOM and CRLF are cleaned."""
    taggers.tag_folder(folder, FakeTagger(), mode=mode)
    assert (folder / "blue.txt").read_bytes() == f"{expected}\nnote\n".encode()


def test_dry_run_and_exclude(folder):
    """Proves a dry run writes nothing and ``exclude`` keeps a tag out."""
    result = taggers.tag_folder(folder, FakeTagger(), mode="overwrite", exclude=("simple_background",),
                                dry_run=True)
    assert result.written[folder / "red.txt"] == "red background"
    assert not (folder / "red.txt").exists()
    with pytest.raises(ConfigError, match="mode"):
        taggers.tag_folder(folder, FakeTagger(), mode="replace")


def test_select_tags_thresholds_and_csv(tmp_path):
    """Proves WD14 selection: ratings dropped, general tags at >= 0.35, character tags only at >= 0.85, sorted by
    score; underscores become spaces except in kaomojis."""
    csv = tmp_path / "selected_tags.csv"
    csv.write_text("tag_id,name,category,count\n1,general,9,1\n2,long_hair,0,1\n3,^_^,0,1\n4,hatsune_miku,4,1\n"
                   "5,smile,0,1\n", encoding="utf-8")
    tags = taggers.read_selected_tags(csv)
    assert tags == [("general", 9), ("long hair", 0), ("^_^", 0), ("hatsune miku", 4), ("smile", 0)]
    probs = np.array([0.99, 0.5, 0.36, 0.8, 0.2])
    assert taggers.select_tags(probs, tags) == {"long hair": 0.5, "^_^": 0.36}
    assert list(taggers.select_tags(probs, tags, 0.1, 0.7)) == ["hatsune miku", "long hair", "^_^", "smile"]
    with pytest.raises(ConfigError, match="differ"):
        taggers.select_tags(probs[:3], tags)


def test_wd14_input_is_white_padded_bgr():
    """Proves the WD14 input: a 20x10 red image becomes a (1, 8, 8, 3) float32 BGR square padded with white."""
    x = taggers.wd14_input(Image.new("RGB", (20, 10), (255, 0, 0)), 8)
    assert x.shape == (1, 8, 8, 3) and x.dtype == np.float32
    assert x[0, 4, 4].tolist() == [0.0, 0.0, 255.0] and x[0, 0, 4].tolist() == [255.0, 255.0, 255.0]


def test_wd14_missing_files_and_runtime_messages(tmp_path):
    """Proves a folder without the model files is refused naming both files and where to get them, and (where
    onnxruntime is not installed) a complete folder is refused with the pip command."""
    with pytest.raises(ConfigError, match="model.onnx and selected_tags.csv missing.*TaggerOnnx"):
        taggers.WD14Tagger(tmp_path)
    if importlib.util.find_spec("onnxruntime") is None:
        model = tmp_path / "TaggerOnnx" / "wd-v1-4-moat-tagger-v2"
        model.mkdir(parents=True)
        (model / "model.onnx").write_bytes(b"x")
        (model / "selected_tags.csv").write_text("tag_id,name,category,count\n", encoding="utf-8")
        with pytest.raises(ConfigError, match="pip install onnxruntime"):
            taggers.WD14Tagger(tmp_path / "TaggerOnnx")  # one level above the model folder is accepted
        assert cli_main(["autotag", str(tmp_path), "--wd14", str(tmp_path / "TaggerOnnx")]) == 2


WD14_TINY = Path(__file__).parent / "data" / "wd14-tiny"


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_wd14_tagger_runs_a_tiny_onnx_model(tmp_path, folder):
    """Proves the WD14 path end to end with the real onnxruntime on ``tests/data/wd14-tiny`` (a WD14-shaped model
    of four logistic units on the mean colour, see its README): input side read from the model, underscores become
    spaces, the rating is never written, the character threshold (0.85) is stricter than the general one (0.35),
    and ``tag_folder`` writes the tags after the trigger word, skipping the captioned image."""
    tagger = taggers.WD14Tagger(WD14_TINY)
    assert tagger.side == 32 and tagger.input_name == "input_1"
    red = tagger.tag(Image.new("RGB", (16, 16), (250, 0, 0)))
    assert list(red) == ["red background"] and red["red background"] > 0.99
    # A 40x20 red image is padded to a square with white: B and G means reach 0.5, sigmoid(0) = 0.5 >= 0.35.
    assert set(tagger.tag(Image.new("RGB", (40, 20), (250, 0, 0)))) == {"red background", "blue background"}
    assert "general" not in red  # rating category
    green = tagger.tag(Image.new("RGB", (16, 16), (0, 250, 0)))
    assert list(green) == ["green character"]  # sigmoid(10 * (0.98 - 0.5)) ~ 0.99 >= 0.85
    strict = taggers.WD14Tagger(WD14_TINY, character_threshold=0.999)
    assert strict.tag(Image.new("RGB", (16, 16), (0, 250, 0))) == {}

    result = taggers.tag_folder(folder, tagger, mode="skip", trigger="sks")
    assert (folder / "red.txt").read_text(encoding="utf-8").strip() == "sks, red background"
    assert (folder / "green.txt").read_text(encoding="utf-8").strip() == "sks, green character"
    assert (folder / "blue.txt").read_bytes().startswith("\ufeffsks, blue background, hat".encode())  # kept
    assert len(result.written) == 2 and result.kept == [folder / "blue.png"] and not result.failed
    # The command line on the same model: overwrite mode rewrites the blue caption from the image.
    assert cli_main(["autotag", str(folder), "--wd14", str(WD14_TINY), "--mode", "overwrite"]) == 0
    assert (folder / "blue.txt").read_text(encoding="utf-8-sig").splitlines()[0] == "blue background"
