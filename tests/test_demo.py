"""The README's main job, ``python -m lib_lora demo``, end to end on its bundled photos (few steps here).

Proves: it writes checkpoints with sidecars, loss.png, a labelled checkpoint x weight grid.png and eval.json; every
LoRA file passes ``inspect`` (SD1, no unmatched keys, finite); the grid has one column per checkpoint and one row per
weight.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lib_lora.checks import inspect_file
from lib_lora.demo import DEMO_WEIGHTS, run_demo

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_demo_writes_valid_outputs(tmp_path):
    """A 3-step demo run into a temp folder; its files are complete and valid."""
    summary = run_demo(str(tmp_path / "demo"), steps=3)
    out = tmp_path / "demo"
    checkpoints = summary["checkpoints"]
    assert [p.rsplit("/", 1)[-1] for p in checkpoints] == ["demo-step00000001.safetensors",
                                                          "demo-step00000002.safetensors", "demo.safetensors"]
    for path in checkpoints:
        report = inspect_file(path)
        assert report.arch == "sd1" and report.unmatched == [] and report.non_finite is None
        assert json.loads((out / path.rsplit("/", 1)[-1].replace(".safetensors", ".json")).read_text())[
            "activation text"] == "sks dog"
    with Image.open(out / "loss.png") as im:
        assert im.size == (800, 400)
    with Image.open(out / "grid.png") as im:
        w, h = im.size
    assert w >= 128 * len(checkpoints) and h >= 128 * len(DEMO_WEIGHTS)
    data = json.loads((out / "eval.json").read_text())
    assert data["denoising_loss_base"] > 0 and data["denoising_loss_lora"] > 0
