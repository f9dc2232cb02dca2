"""lib_lora.runs: grouping a folder's LoRA files into runs by their Kohya stems, in training order."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lib_lora.errors import ConfigError
from lib_lora.runs import find_run, group_runs, parse_checkpoint_stem, resolve_run
from lib_lora.trainer import checkpoint_name


def _touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def test_parse_checkpoint_stem_matches_trainer_names():
    for kwargs, expected in (({"epoch": 2}, ("立绘 style v1", 2, None)), ({"step": 200}, ("立绘 style v1", None, 200)),
                             ({}, ("立绘 style v1", None, None))):
        assert parse_checkpoint_stem(checkpoint_name("立绘 style v1", **kwargs)) == expected
    assert parse_checkpoint_stem("a-b-0000012") == ("a-b", 12, None)  # 7 digits: epoch >= 1,000,000 style
    assert parse_checkpoint_stem("v-00001") == ("v-00001", None, None)  # 5 digits: not an epoch file
    assert parse_checkpoint_stem("-000001") == ("-000001", None, None)


def test_group_runs_order_and_odd_names(tmp_path):
    _touch(tmp_path, "mylora-000010.safetensors", "mylora.safetensors", "mylora-000002.safetensors",
           "mylora-000001.safetensors", "立绘 style v1.safetensors", "立绘 style v1-000002.safetensors",
           "立绘 style v1-000001.safetensors", "other-step00000200.pt", "other-step00000100.ckpt",
           ".mylora-000003.safetensors.tmp-123-abc", ".hidden.safetensors", "mylora.json", "mylora.preview.png",
           "x.pt", "x.safetensors")
    (tmp_path / "sub.safetensors").mkdir()
    runs = group_runs(tmp_path)
    assert list(runs) == ["mylora", "other", "x", "立绘 style v1"]
    assert runs["mylora"].stems == ["mylora-000001", "mylora-000002", "mylora-000010", "mylora"]
    assert runs["立绘 style v1"].stems == ["立绘 style v1-000001", "立绘 style v1-000002", "立绘 style v1"]
    assert [f.label for f in runs["立绘 style v1"].files] == ["epoch 1", "epoch 2", "final"]
    assert runs["other"].stems == ["other-step00000100", "other-step00000200"]
    assert runs["x"].paths == [tmp_path / "x.safetensors"]  # one stem, one network: .safetensors first
    assert runs["mylora"].files[-1].final and runs["mylora"].files[0].epoch == 1


def _lora_with_steps(path, steps):
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    save_file(tensors, str(path), metadata=None if steps is None else {"ss_steps": str(steps)})


def test_mixed_epoch_and_step_files_use_the_header_steps(tmp_path):
    for stem, steps in (("r-step00000100", 100), ("r-000001", 150), ("r-step00000200", 200), ("r-000002", 300),
                        ("r", 300)):
        _lora_with_steps(tmp_path / f"{stem}.safetensors", steps)
    assert find_run(tmp_path, "r").stems == ["r-step00000100", "r-000001", "r-step00000200", "r-000002", "r"]
    _lora_with_steps(tmp_path / "r-step00000300.safetensors", None)  # no ss_steps: epochs first, then steps
    assert find_run(tmp_path, "r").stems == ["r-000001", "r-000002", "r-step00000100", "r-step00000200",
                                             "r-step00000300", "r"]


def test_find_and_resolve_run(tmp_path):
    _touch(tmp_path, "a-000001.safetensors", "a.safetensors", "b.safetensors")
    assert resolve_run(tmp_path / "a").stems == ["a-000001", "a"]
    assert resolve_run(tmp_path / "a-000001.safetensors").name == "a"
    with pytest.raises(ConfigError, match="several runs"):
        resolve_run(tmp_path)
    with pytest.raises(ConfigError, match=r"runs found: 'a', 'b'"):
        find_run(tmp_path, "c")
    with pytest.raises(ConfigError, match="not a folder"):
        group_runs(tmp_path / "nope")
    solo = tmp_path / "solo"
    solo.mkdir()
    _touch(solo, "s-000001.safetensors")
    assert resolve_run(solo).stems == ["s-000001"]
