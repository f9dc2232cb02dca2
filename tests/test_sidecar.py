"""Tests of lib_lora.sidecar: the A1111 user-metadata ``<stem>.json`` beside a LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lib_lora import safetensors_io as sio
from lib_lora.errors import ConfigError, FormatError
from lib_lora.sidecar import SD_VERSIONS, read_sidecar, sd_version_label, sidecar_path, write_sidecar


def test_sidecar_path_is_stem_json(tmp_path):
    assert sidecar_path(tmp_path / "dog-000002.safetensors") == tmp_path / "dog-000002.json"
    assert sidecar_path(str(tmp_path / "a.b.safetensors")) == tmp_path / "a.b.json"
    assert sidecar_path(tmp_path / "old.pt") == tmp_path / "old.json"


def test_write_new_sidecar_and_read_back(tmp_path):
    lora = tmp_path / "dog.safetensors"
    path = write_sidecar(
        lora,
        description="A dog",
        sd_version="sdxl",
        activation_text=["sks dog", " photo "],
        preferred_weight=0.8,
        negative_text="blurry",
        notes="trained 10 epochs",
    )
    assert path == tmp_path / "dog.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {
        "description": "A dog",
        "sd version": "SDXL",
        "activation text": "sks dog, photo",
        "preferred weight": 0.8,
        "negative text": "blurry",
        "notes": "trained 10 epochs",
    }
    assert isinstance(data["preferred weight"], float)
    assert read_sidecar(lora) == data
    assert sorted(os.listdir(tmp_path)) == ["dog.json"]  # no temp file left, LoRA need not exist


def test_written_like_a1111(tmp_path):
    lora = tmp_path / "x.safetensors"
    write_sidecar(lora, description="chien — «beau»", preferred_weight=1)
    text = sidecar_path(lora).read_text(encoding="utf-8")
    assert text == json.dumps({"description": "chien — «beau»", "preferred weight": 1.0}, indent=4, ensure_ascii=False)


def test_only_given_keys_are_written(tmp_path):
    lora = tmp_path / "x.safetensors"
    write_sidecar(lora, activation_text="sks")
    assert read_sidecar(lora) == {"activation text": "sks"}  # no "sd version": A1111 would let it override detection


def test_update_preserves_unknown_and_untouched_keys(tmp_path):
    lora = tmp_path / "x.safetensors"
    sidecar_path(lora).write_text(
        json.dumps({"description": "old", "notes": "keep me", "custom ext key": {"a": [1, 2]}, "sd version": "SD1"}),
        encoding="utf-8",
    )
    write_sidecar(lora, description="new", preferred_weight=0, extra={"other": True})
    assert read_sidecar(lora) == {
        "description": "new",
        "notes": "keep me",
        "custom ext key": {"a": [1, 2]},
        "sd version": "SD1",
        "preferred weight": 0.0,
        "other": True,
    }


def test_read_missing_is_empty(tmp_path):
    assert read_sidecar(tmp_path / "none.safetensors") == {}


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", '"text"'])
def test_corrupt_sidecar_is_refused_and_left_untouched(tmp_path, content):
    lora = tmp_path / "x.safetensors"
    sidecar_path(lora).write_text(content, encoding="utf-8")
    with pytest.raises(FormatError, match=r"x\.json"):
        read_sidecar(lora)
    with pytest.raises(FormatError, match=r"x\.json"):
        write_sidecar(lora, notes="n")
    assert sidecar_path(lora).read_text(encoding="utf-8") == content


def test_bom_is_tolerated(tmp_path):
    lora = tmp_path / "x.safetensors"
    sidecar_path(lora).write_bytes(b"\xef\xbb\xbf" + json.dumps({"notes": "n"}).encode())
    assert read_sidecar(lora) == {"notes": "n"}


@pytest.mark.parametrize(
    "given, label",
    [
        ("sd1", "SD1"),
        ("SD2", "SD2"),
        ("sdxl", "SDXL"),
        ("SDXL", "SDXL"),
        ("unknown", "Unknown"),
        ("Unknown", "Unknown"),
    ],
)
def test_sd_version_labels(given, label):
    assert sd_version_label(given) == label
    assert label in SD_VERSIONS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sd_version": "sd3"}, "sd version 'sd3'"),
        ({"preferred_weight": float("nan")}, "not finite"),
        ({"preferred_weight": "0.8"}, "not a number"),
        ({"preferred_weight": True}, "not a number"),
        ({"description": 5}, "'description' must be a str"),
        ({"activation_text": ["a", 3]}, "'activation text'"),
        ({"extra": {1: "x"}}, "sidecar key 1"),
        ({"extra": {"k": object()}}, "not JSON-serialisable"),
    ],
)
def test_bad_values_are_config_errors(tmp_path, kwargs, match):
    lora = tmp_path / "x.safetensors"
    with pytest.raises(ConfigError, match=match):
        write_sidecar(lora, **kwargs)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_old_sidecar(tmp_path, monkeypatch):
    lora = tmp_path / "x.safetensors"
    write_sidecar(lora, notes="old")
    before = sidecar_path(lora).read_bytes()

    def boom(fh, data):
        fh.write(data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio, "_write_all", boom)
    with pytest.raises(FormatError, match="No space left"):
        write_sidecar(lora, notes="new")
    assert sidecar_path(lora).read_bytes() == before
    assert os.listdir(tmp_path) == ["x.json"]


def test_sidecar_beside_saved_lora(tmp_path):
    import torch

    from lib_lora.metadata import read_base_version

    lora = tmp_path / "sub" / "run.safetensors"
    sd = {
        "lora_unet_x.lora_down.weight": torch.ones(1, 2),
        "lora_unet_x.lora_up.weight": torch.ones(2, 1),
        "lora_unet_x.alpha": torch.tensor(1.0),
    }
    sio.save_lora_file(lora, sd, {"ss_base_model_version": "sdxl_base_v1-0"}, None)
    _, md = sio.load_lora_file(lora)
    write_sidecar(lora, sd_version=read_base_version(md), activation_text="sks")
    assert read_sidecar(lora)["sd version"] == "SDXL"
    assert sorted(p.name for p in Path(lora.parent).iterdir()) == ["run.json", "run.safetensors"]
