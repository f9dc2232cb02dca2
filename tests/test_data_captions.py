"""lib_lora.data.captions: caption files, tag split/join, keep_tokens, shuffle, dropouts, triggers, tag counts."""

from __future__ import annotations

import random

import pytest

from lib_lora.data.captions import (
    CaptionOptions,
    add_trigger_words,
    caption_path,
    count_tags,
    find_caption_file,
    first_caption_line,
    join_tags,
    process_caption,
    read_caption_file,
    split_tags,
)
from lib_lora.errors import ConfigError, DatasetError


def test_caption_path_and_find(tmp_path):
    image = tmp_path / "img.01.png"
    assert caption_path(image) == tmp_path / "img.01.txt"
    assert caption_path(image, ".caption") == tmp_path / "img.01.caption"
    assert find_caption_file(image) is None
    (tmp_path / "img.01.txt").write_text("x")
    assert find_caption_file(image) == tmp_path / "img.01.txt"
    assert find_caption_file(image, ".caption") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat, red hat\nsecond line", "a cat, red hat"),
        ("\ufeffa cat, red hat\r\nsecond\r\n", "a cat, red hat"),
        ("\r\n  \r\n  a cat  \r\nb", "a cat"),
        ("only\rcr", "only"),
        ("", ""),
        ("\n\n  \n", ""),
    ],
)
def test_first_caption_line(text, expected):
    assert first_caption_line(text) == expected


def test_read_caption_file_bom_crlf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffsks dog, sitting\r\nignored\r\n".encode())
    assert read_caption_file(path) == "sks dog, sitting"


def test_read_caption_file_not_utf8(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(DatasetError, match="a.txt is not UTF-8"):
        read_caption_file(path)


def test_split_and_join():
    assert split_tags(" a cat ,red hat,, on grass ,") == ["a cat", "red hat", "on grass"]
    assert split_tags("a cat; red hat", ";") == ["a cat", "red hat"]
    assert join_tags(["a", "b"]) == "a, b"
    assert join_tags(["a", "b"], ";") == "a; b"


def test_semicolon_caption_shuffled_with_keep_tokens():
    options = CaptionOptions(separator=";", keep_tokens=1, shuffle=True)
    seen = set()
    for seed in range(20):
        out = process_caption("a cat; red hat; on grass", options, random.Random(seed))
        assert out.startswith("a cat; ")
        assert "; " in out and "," not in out
        assert sorted(out.split("; ")) == ["a cat", "on grass", "red hat"]
        seen.add(out)
    assert seen == {"a cat; red hat; on grass", "a cat; on grass; red hat"}


def test_same_seed_same_caption():
    options = CaptionOptions(shuffle=True, tag_dropout_rate=0.3)
    caption = "a, b, c, d, e, f, g"
    assert process_caption(caption, options, random.Random(5)) == process_caption(caption, options, random.Random(5))


def test_keep_tokens_alone_leaves_caption_untouched():
    options = CaptionOptions(keep_tokens=2)
    assert process_caption("b ,  a,c", options, random.Random(0)) == "b ,  a,c"


def test_tag_dropout_rates():
    caption = "keep me, x1, x2, x3, x4"
    all_dropped = CaptionOptions(keep_tokens=1, tag_dropout_rate=1.0)
    assert process_caption(caption, all_dropped, random.Random(0)) == "keep me"
    none_dropped = CaptionOptions(keep_tokens=1, tag_dropout_rate=1e-9)
    assert process_caption(caption, none_dropped, random.Random(0)) == caption
    half = CaptionOptions(tag_dropout_rate=0.5)
    rng = random.Random(1)
    lengths = [len(split_tags(process_caption("a, b, c, d, e, f, g, h", half, rng))) for _ in range(400)]
    assert 3.5 < sum(lengths) / len(lengths) < 4.5


def test_caption_dropout():
    always = CaptionOptions(caption_dropout_rate=1.0, trigger_words=("sks",))
    assert process_caption("a, b", always, random.Random(0)) == ""
    rng = random.Random(3)
    some = CaptionOptions(caption_dropout_rate=0.25)
    empties = sum(process_caption("a, b", some, rng) == "" for _ in range(800))
    assert 150 < empties < 250


def test_caption_dropout_every_n_epochs():
    options = CaptionOptions(dropout_every_n_epochs=3)
    assert process_caption("a, b", options, random.Random(0), epoch=3) == ""
    assert process_caption("a, b", options, random.Random(0), epoch=4) == "a, b"


def test_trigger_words_prepended_when_missing():
    assert add_trigger_words("a photo, outdoors", ["sks dog"]) == "sks dog, a photo, outdoors"
    assert add_trigger_words("a photo, SKS Dog", ["sks dog"]) == "a photo, SKS Dog"
    assert add_trigger_words("a sks dogs photo", ["sks dog"]) == "sks dog, a sks dogs photo"
    assert add_trigger_words("", ["sks", "dog"]) == "sks, dog"
    assert add_trigger_words("dog, x", ["sks", "dog", " "]) == "sks, dog, x"
    assert add_trigger_words("a; b", ["t"], ";") == "t; a; b"


def test_trigger_then_keep_tokens_keeps_trigger_first():
    options = CaptionOptions(keep_tokens=1, shuffle=True, trigger_words=("sks",))
    for seed in range(10):
        assert process_caption("a, b, c", options, random.Random(seed)).startswith("sks, ")


def test_count_tags_like_ss_tag_frequency():
    captions = ["Sks Dog, sitting ,  grass", "sks dog, Grass", "", "sitting"]
    assert count_tags(captions) == {"sks dog": 2, "sitting": 2, "grass": 2}
    assert count_tags(["a cat; red hat", "A Cat"], ";") == {"a cat": 2, "red hat": 1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"separator": ""},
        {"separator": " "},
        {"keep_tokens": -1},
        {"tag_dropout_rate": 1.5},
        {"caption_dropout_rate": -0.1},
        {"dropout_every_n_epochs": -2},
    ],
)
def test_caption_options_validation(kwargs):
    with pytest.raises(ConfigError):
        CaptionOptions(**kwargs)
