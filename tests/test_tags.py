"""lib_lora.tags: pure tag cleaning, prune suggestions, and batch edits of caption files (dry run, atomic writes,
BOM + CRLF files). Small real images are made with Pillow so that caption files pair with real images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from lib_lora import tags
from lib_lora.errors import ConfigError, DatasetError
from lib_lora.tags import (
    TagEdit,
    dedupe,
    drop_conflicts,
    edit_caption,
    edit_folder,
    has_weight_syntax,
    normalise,
    parse_caption_bytes,
    prepend_trigger,
    read_captions,
    remove_tags,
    replace_tags,
    suggest_prune,
    tag_frequency,
)


def _image(path: Path, color=(200, 30, 30)) -> Path:
    Image.new("RGB", (16, 16), color).save(path)
    return path


# ----------------------------------------------------------------------------------------------------- pure tags


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("(red hat:1.2)", "red hat"),
        ("((red hat))", "red hat"),
        ("[red hat]", "red hat"),
        ("((red hat:0.8))", "red hat"),
        ("(red hat: -.5)", "red hat"),
        ("  red   hat ", "red hat"),
        ("a (red hat:1.1) on a man", "a red hat on a man"),
        ("kafka (honkai: star rail)", "kafka (honkai: star rail)"),  # a series qualifier, not emphasis
        ("hatsune miku \\(cosplay\\)", "hatsune miku \\(cosplay\\)"),  # escaped: literal parentheses
        ("(a) (b)", "(a) (b)"),
    ],
)
def test_normalise(raw, clean):
    assert normalise(raw) == clean


def test_normalise_underscores_keeps_kaomoji():
    assert normalise("long_hair", underscores_to_spaces=True) == "long hair"
    assert normalise("long_hair") == "long_hair"
    assert normalise("^_^", underscores_to_spaces=True) == "^_^"


def test_has_weight_syntax():
    assert has_weight_syntax("(red hat:1.2)") and has_weight_syntax("((red hat))")
    assert not has_weight_syntax("red hat") and not has_weight_syntax("kafka (honkai: star rail)")


def test_dedupe_keeps_first_spelling():
    assert dedupe(["red hat", "red hat", "1girl"]) == ["red hat", "1girl"]
    assert edit_caption("red hat, red hat, 1girl", TagEdit(dedupe=True)) == "red hat, 1girl"
    assert dedupe(["Red_Hat", "(red hat:1.2)", "red hat", "1girl"]) == ["Red_Hat", "1girl"]


def test_conflicts_remove_replace_trigger():
    assert drop_conflicts(["long hair", "smile", "short hair", "frown"]) == ["long hair", "smile"]
    assert drop_conflicts(["short hair", "long hair"]) == ["short hair"]
    assert remove_tags(["sks", "brown hair", "Brown_Hair", "hat"], ["brown hair"]) == ["sks", "hat"]
    assert replace_tags(["blonde hair", "hat"], {"Blonde_Hair": "yellow hair", "hat": ""}) == ["yellow hair"]
    assert prepend_trigger(["1girl", "SKS", "hat"], "sks") == ["sks", "1girl", "hat"]
    with pytest.raises(ConfigError):
        prepend_trigger(["a"], "sks, dog")


def test_suggest_prune_default_threshold():
    """10 captions, all with brown hair, 3 with hat: only brown hair is suggested (the trigger never is)."""
    captions = [f"sks, brown hair, pose {i}" + (", hat" if i < 3 else "") for i in range(10)]
    assert suggest_prune(captions, trigger="sks") == [("brown hair", 10, 1.0)]
    assert [t for t, _, _ in suggest_prune(captions, threshold=0.3, trigger="sks")] == ["brown hair", "hat"]
    assert tag_frequency(captions)["hat"] == 3
    assert suggest_prune([], trigger="sks") == []
    with pytest.raises(ConfigError):
        suggest_prune(captions, threshold=0)


def test_tag_frequency_counts_captions_not_occurrences():
    assert tag_frequency(["a, a, b", "A"]) == {"a": 2, "b": 1}


# ----------------------------------------------------------------------------------------------------- files


def test_parse_caption_bytes_bom_crlf():
    parsed = parse_caption_bytes(b"\xef\xbb\xbf\r\nred hat, 1girl\r\nsecond line\r\n")
    assert parsed.caption == "red hat, 1girl"
    assert parsed.with_caption("sks, red hat") == b"\nsks, red hat\nsecond line\n"
    with pytest.raises(DatasetError, match="not UTF-8"):
        parse_caption_bytes(b"\xff\xfe r\x00e\x00d\x00")


def test_bom_crlf_file_round_trips_clean(tmp_path):
    """A BOM + CRLF caption is rewritten as plain UTF-8 with LF; the first tag does not carry the BOM (so the dedupe
    sees it), non-ASCII text survives, and no temp file is left behind."""
    _image(tmp_path / "a.png")
    cap = tmp_path / "a.txt"
    cap.write_bytes("\ufeffred hat, red hat, café\r\n".encode())
    result = edit_folder(tmp_path, TagEdit(trigger="sks", dedupe=True))
    assert [c.after for c in result.changes] == ["sks, red hat, café"]
    assert cap.read_bytes() == "sks, red hat, café\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.txt"]
    again = edit_folder(tmp_path, TagEdit(trigger="sks", dedupe=True))
    assert again.changes == [] and again.unchanged == 1


def test_bom_only_change_is_written(tmp_path):
    """Tags unchanged but BOM/CRLF present: the bytes change, so the file is cleaned."""
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfsks, hat\r\n")
    result = edit_folder(tmp_path, TagEdit(trigger="sks"))
    assert [(c.before, c.after) for c in result.changes] == [("sks, hat", "sks, hat")]
    assert (tmp_path / "a.txt").read_bytes() == b"sks, hat\n"


def test_edit_folder_dry_run_and_scope(tmp_path):
    """Dry run writes nothing; only captions of images are touched (notes.txt is not); images without a caption are
    listed; Kohya sub-folders are included; file permissions are kept."""
    sub = tmp_path / "10_sks dog"
    sub.mkdir()
    _image(tmp_path / "a.png")
    _image(sub / "b.png")
    _image(sub / "c.png")
    (tmp_path / "a.txt").write_text("(brown hair:1.2), hat", encoding="utf-8")
    (sub / "b.txt").write_text("brown hair, brown hair", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("brown hair", encoding="utf-8")
    os.chmod(tmp_path / "a.txt", 0o640)
    edit = TagEdit(trigger="sks", remove=("hat",), normalise=True, dedupe=True)
    dry = edit_folder(tmp_path, edit, dry_run=True)
    assert {c.path.name: c.after for c in dry.changes} == {"a.txt": "sks, brown hair", "b.txt": "sks, brown hair"}
    assert [p.name for p in dry.missing] == ["c.png"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "(brown hair:1.2), hat"
    edit_folder(tmp_path, edit)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "sks, brown hair"
    assert (sub / "b.txt").read_text(encoding="utf-8") == "sks, brown hair"
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "brown hair"
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert sorted(read_captions(tmp_path).values()) == ["sks, brown hair", "sks, brown hair"]


def test_write_atomic_failure_leaves_old_file(tmp_path, monkeypatch):
    """If the rename fails the old file is intact and the temp file is removed."""
    path = tmp_path / "a.txt"
    path.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tags.os, "replace", boom)
    with pytest.raises(DatasetError, match="disk full"):
        tags.write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_edit_folder_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        edit_folder(tmp_path / "nope", TagEdit(trigger="sks"))
