"""``python -m lib_lora check`` and ``python -m lib_lora tags``: JSON shape, exit codes, dry run, prune suggestions.
Runs lib_lora.cli.main in-process (one subprocess test checks the module entry point) on copies of the dog photos
and small Pillow images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _paths import SHARED_DATA
from PIL import Image

from lib_lora import cli_data, doctor
from lib_lora.cli import main

DOG_DIR = SHARED_DATA / "dreambooth/dog"
REPO_ROOT = Path(__file__).resolve().parents[1]

needs_dogs = pytest.mark.skipif(not DOG_DIR.is_dir(), reason=f"{DOG_DIR} not found")


@pytest.fixture
def dogs(tmp_path) -> Path:
    folder = tmp_path / "dog"
    shutil.copytree(DOG_DIR, folder)
    return folder


def _captioned(folder: Path, captions: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for i, text in enumerate(captions):
        Image.new("RGB", (8, 8), (i * 20 % 256, 100, 50)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@needs_dogs
def test_check_json_and_warning_exit_code(dogs, capsys):
    assert main(["check", str(dogs), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"findings", "counts"}
    assert data["counts"] == {"images": 5, "error": 0, "warning": 1, "info": 0}
    (finding,) = data["findings"]
    assert set(finding) == {"check", "severity", "files", "message", "fix"}
    assert (finding["check"], finding["severity"], finding["files"]) == ("count", "warning", [])


@needs_dogs
def test_check_exit_codes(dogs, tmp_path, capsys):
    """0 for a folder that meets the guidance, 2 for an error (a 128 px image at --resolution 512), 2 for a
    missing folder (a lib_lora error, one line on stderr)."""
    assert main(["check", str(dogs), "--kind", "anime", "--resolution", "512"]) == 1  # 5 < 10
    small = tmp_path / "small"
    small.mkdir()
    with Image.open(DOG_DIR / "00.jpg") as img:
        img.convert("RGB").resize((128, 128), Image.Resampling.LANCZOS).save(small / "a.png")
    capsys.readouterr()
    assert main(["check", str(small), "--resolution", "512"]) == 2
    out = capsys.readouterr().out
    assert "[low_resolution]" in out and "a.png" in out
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@needs_dogs
def test_check_ok_exit_code_zero(tmp_path, capsys):
    """Fifteen distinct, sharp, well-exposed images make a concept set with nothing to report: exit 0."""
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(5):
        with Image.open(DOG_DIR / f"{i:02d}.jpg") as img:
            img = img.convert("RGB")
        w, h = img.size
        for j, box in enumerate([(0, 0, w // 2 + 100, h // 2 + 100), (w // 2 - 100, 0, w, h // 2 + 100),
                                 (0, h // 2 - 100, w // 2 + 100, h)]):
            img.crop(box).resize((512, 512), Image.Resampling.LANCZOS).save(folder / f"{i}_{j}.jpg", quality=95)
    assert main(["check", str(folder), "--json"]) == 0, capsys.readouterr().out
    assert json.loads(capsys.readouterr().out) == {"findings": [], "counts": {"images": 15, "error": 0, "warning": 0,
                                                                              "info": 0}}


def test_tags_suggest_prune(tmp_path, capsys):
    captions = [f"sks, brown hair, pose {i}" + (", hat" if i < 3 else "") for i in range(10)]
    folder = _captioned(tmp_path / "set", captions)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["tags", str(folder), "--trigger", "sks", "--suggest-prune", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {"captions": 10, "threshold": 0.5,
                    "suggestions": [{"tag": "brown hair", "count": 10, "fraction": 1.0}]}
    assert main(["tags", str(folder), "--trigger", "sks", "--suggest-prune", "--threshold", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "brown hair: 10 (100%)" in out and "hat: 3 (30%)" in out
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # read only


def test_tags_dry_run_then_write(tmp_path, capsys):
    folder = _captioned(tmp_path / "set", ["red hat, red hat, 1girl", "(blue eyes:1.2), sks, hat"])
    args = ["tags", str(folder), "--trigger", "sks", "--dedupe", "--normalise", "--remove", "hat",
            "--replace", "1girl=1woman"]
    assert main([*args, "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"] is True and data["unchanged"] == 0 and data["missing"] == []
    assert [c["after"] for c in data["changes"]] == ["sks, red hat, 1woman", "sks, blue eyes"]
    assert (folder / "00.txt").read_text(encoding="utf-8") == "red hat, red hat, 1girl"
    assert main(args) == 0
    assert "changed 2 caption file(s)" in capsys.readouterr().err
    assert (folder / "00.txt").read_text(encoding="utf-8") == "sks, red hat, 1woman"
    assert (folder / "01.txt").read_text(encoding="utf-8") == "sks, blue eyes"


def test_tags_bad_arguments(tmp_path, capsys):
    folder = _captioned(tmp_path / "set", ["a"])
    assert main(["tags", str(folder), "--replace", "nonsense"]) == 2
    assert "OLD=NEW" in capsys.readouterr().err
    assert main(["tags", str(folder), "--threshold", "0.3"]) == 2
    assert main(["tags", str(folder), "--suggest-prune", "--threshold", "2"]) == 2


def test_kinds_match_the_doctor():
    assert cli_data.KINDS == doctor.KINDS


@needs_dogs
def test_module_entry_point(dogs):
    """``python -m lib_lora check DIR --json`` in a fresh interpreter: exit status 1 and the JSON on stdout, the
    scan's log lines kept off stderr."""
    proc = subprocess.run([sys.executable, "-m", "lib_lora", "check", str(dogs), "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["counts"]["warning"] == 1
    assert proc.stderr == ""
