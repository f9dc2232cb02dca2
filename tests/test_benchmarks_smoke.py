"""Keeps ``benchmarks/run.py`` working: its smoke mode (tiny UNet, one step per variant, in-process) must produce
every JSON figure as a finite number (the PEFT figures only where peft can be imported)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from _paths import SHARED_DATA

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("floor_ratio_sd15", "floor_ratio_sd15_ckpt", "mem_floor_ratio_sd15", "epoch2_over_epoch1", "grid_cell_overhead")
PEFT_KEYS = ("peft_time_ratio_sd15", "peft_mem_ratio_sd15")


def _load_run():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_smoke_mode_writes_finite_figures(tmp_path, capsys):
    run = _load_run()
    out = tmp_path / "bench.json"
    data_dir = SHARED_DATA / "dreambooth"
    args = ["--smoke", "--json", str(out), "--data-dir", str(data_dir)]
    if not data_dir.is_dir():
        pytest.skip(f"no dreambooth photos at {data_dir}")
    assert run.main(args) == 0
    result = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), key
    assert result["vae_calls_epoch2"] == 0
    assert result["model_for_sd15_keys"] == "tiny"
    assert result["machine"]["torch"]
    if result["settings"]["peft"]:
        for key in PEFT_KEYS:
            assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), key
    else:
        for key in PEFT_KEYS:
            assert result[key] is None
    steps = result["steps_tiny"]
    assert steps["variants"]["lora"]["modules"] == steps["variants"]["peft"]["modules"] if "peft" in steps[
        "variants"] else steps["variants"]["lora"]["modules"] > 0
    assert "figure" in capsys.readouterr().out
