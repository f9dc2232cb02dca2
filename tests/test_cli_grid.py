"""``python -m lib_lora grid`` on tiny-sd1 with two small random LoRA files (64 px, 4 steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.cli import main
from lib_lora.model.headless import load_model
from lib_lora.network import LoRANetwork
from lib_lora.safetensors_io import save_lora_file
from lib_lora.sidecar import write_sidecar

RUN = "立绘 style v1"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, torch_single_thread):
    """A run of two checkpoints (epoch 1 and final) with random up weights, so each visibly changes the image."""
    folder = tmp_path_factory.mktemp("runs")
    model = load_model("tiny-sd1")
    for i, stem in enumerate([f"{RUN}-000001", RUN]):
        torch.manual_seed(i)
        net = LoRANetwork.create(model.unet, model.text_encoders, model.arch, network_dim=2, network_alpha=2)
        with torch.no_grad():
            for m in net.lora_modules():
                m.lora_up.weight.normal_(0, 0.5)
        save_lora_file(folder / f"{stem}.safetensors", net.kohya_state_dict(), {"ss_output_name": "alias"}, None)
    write_sidecar(folder / f"{RUN}.safetensors", activation_text="sks dog")
    return folder


def _args(out, *source):
    return ["grid", *source, "--weights", "0.5,1", "--prompt", "a photo of a dog", "--seed", "7", "--base",
            "tiny-sd1", "--size", "64", "--steps", "4", "--output", str(out)]


def test_grid_of_a_run_is_labels_plus_2x2_cells(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(_args(out, "--run", str(run_dir / RUN))) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "grid.json").read_text(encoding="utf-8"))
    assert f"grid: {out}" in printed and "cells: 4 images" in printed
    assert summary["col_labels"] == [f"{RUN}-000001", RUN]  # file stems in training order, not ss_output_name
    assert summary["row_labels"] == ["0.5", "1"] and summary["trigger_words"] == "sks dog"
    (info,) = summary["grids"]
    grid = Image.open(out)
    assert info["label_w"] > 0 and info["label_h"] > 0
    assert grid.size == (info["label_w"] + 2 * 64, info["label_h"] + 2 * 64)
    cells = {(c["row"], c["col"]): np.asarray(Image.open(c["file"])) for c in summary["cells"]}
    assert len(cells) == 4 and all(c.shape == (64, 64, 3) for c in cells.values())
    assert all(f"<lora:{c['checkpoint']}:" in c["prompt"] and c["prompt"].startswith("sks dog, ")
               for c in summary["cells"])
    arr = np.asarray(grid.convert("RGB"))
    for (r, c), cell in cells.items():  # each cell is pasted at its place, unchanged
        y, x = info["label_h"] + r * 64, info["label_w"] + c * 64
        assert np.array_equal(arr[y:y + 64, x:x + 64], cell)
    assert not np.array_equal(cells[(0, 0)], cells[(1, 0)])  # the weight matters
    assert not np.array_equal(cells[(1, 0)], cells[(1, 1)])  # the checkpoint matters


def test_missing_and_unreadable_files_are_marked_not_fatal(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    out = tmp_path / "g.jpg"
    files = [str(run_dir / f"{RUN}.safetensors"), str(tmp_path / "nope.safetensors"), str(broken)]
    assert main(_args(out, "--files", *files, "--no-trigger")) == 1  # partial result
    err = capsys.readouterr().err
    assert "no such file" in err and "marked 'missing'" in err and "marked 'unreadable'" in err
    summary = json.loads((tmp_path / "g.json").read_text(encoding="utf-8"))
    assert [(p["col"], p["mark"]) for p in summary["problems"]] == [(1, "missing"), (2, "unreadable")]
    assert len(summary["cells"]) == 2
    (info,) = summary["grids"]
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert grid.shape == (info["label_h"] + 2 * 64, info["label_w"] + 3 * 64, 3)
    for col in (1, 2):  # grey marked cells (JPEG: nearly #bbbbbb away from the text and the cross)
        x, y = info["label_w"] + col * 64, info["label_h"] + 64
        assert np.abs(grid[y + 48:y + 56, x + 24:x + 36] - 0xBB).max() < 16


def test_bad_run_is_one_line_error(tmp_path, capsys):
    assert main(["grid", "--run", str(tmp_path / "none"), "--prompt", "p", "--output", str(tmp_path / "g.png")]) == 2
    assert "error:" in capsys.readouterr().err


def test_cells_equal_merge_then_txt2img(run_dir, tmp_path, capsys, torch_single_thread):
    """Every LoRA cell of the grid (two columns: the second loads into the first's network) is pixel-identical to
    a plain txt2img after from_weights + set_multiplier + merge() at that weight, and the base model's weights are
    bit-exactly what they were once the grid is done."""
    import lib_lora.model.headless as headless
    from lib_lora.model.sampler import txt2img
    from lib_lora.prompt_syntax import strip_lora_tags
    from lib_lora.safetensors_io import load_lora_file

    model = load_model("tiny-sd1")

    def weights():
        parts = [model.unet, *(root.module for root in model.text_encoders)]
        return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(parts) for k, v in m.state_dict().items()}

    before = weights()
    org = headless.load_model
    headless.load_model = lambda *a, **k: model  # the same model object, to check its weights afterwards
    try:
        out = tmp_path / "grid.png"
        assert main(_args(out, "--run", str(run_dir / RUN))) == 0
    finally:
        headless.load_model = org
    after = weights()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    summary = json.loads((tmp_path / "grid.json").read_text(encoding="utf-8"))
    paths = dict(zip(summary["col_labels"], summary["checkpoints"]))
    assert len(summary["cells"]) == 4
    with torch.no_grad():
        for cell in summary["cells"]:
            sd, _ = load_lora_file(paths[cell["checkpoint"]])
            net, _ = LoRANetwork.from_weights(sd, model.unet, model.text_encoders, model.arch)
            net.set_multiplier(cell["weight"])
            net.merge()
            try:
                want = txt2img(model, strip_lora_tags(cell["prompt"]).strip(), negative_prompt="", steps=4,
                               cfg_scale=7.0, width=64, height=64, seed=7)[0]
            finally:
                net.unmerge()
            assert np.array_equal(np.asarray(Image.open(cell["file"]).convert("RGB")),
                                  np.asarray(want.convert("RGB"))), cell["file"]
