"""The training gate: ``Trainer.run`` runs the dataset doctor after the scan, refuses a dataset with errors unless
``ignore_dataset_errors`` is set, and always writes ``<output_name>.dataset-report.json`` next to the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora.config import TrainConfig
from lib_lora.control import TrainCallbacks
from lib_lora.errors import DatasetError
from lib_lora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _noise_dataset(root: Path, side: int, n: int = 2) -> Path:
    """``n`` random-noise RGB squares of ``side`` pixels in ``root/1_sks``, captioned ``sks, noise``."""
    sub = root / "1_sks"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text("sks, noise", encoding="utf-8")
    return root


def _config(data: Path, out: Path, **changes) -> TrainConfig:
    base = dict(model="tiny-sd1", train_data_dir=str(data), output_dir=str(out), output_name="t",
                trigger_words=["sks"], resolution=64, min_bucket_reso=64, max_bucket_reso=128, network_dim=4,
                network_alpha=4.0, train_batch_size=1, max_train_steps=1, save_every_n_steps=None,
                save_precision="float", seed=0, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


class _NoModel:
    """Stands in for the model in runs the gate stops before the model is touched (``Trainer.run`` reads
    nothing from it before the gate unless resuming)."""

    device = None


def test_gate_refuses_errors_and_writes_the_report(tmp_path):
    """Proves that 16 px images at a 64 px training resolution (shorter side below half: a ``low_resolution``
    error) stop the run with a DatasetError naming the check, the files and both overrides; the report is
    written (with ``ignored`` false) and no LoRA file is."""
    data = _noise_dataset(tmp_path / "data", 16)
    out = tmp_path / "out"
    messages: list[str] = []
    with pytest.raises(DatasetError) as e:
        Trainer(_config(data, out), _NoModel(), TrainCallbacks(on_message=messages.append)).run()
    text = str(e.value)
    assert "[low_resolution]" in text and "1_sks/0.png" in text
    assert "ignore_dataset_errors = true" in text and "--ignore-dataset-errors true" in text
    report = json.loads((out / "t.dataset-report.json").read_text(encoding="utf-8"))
    assert report["ignored"] is False and report["resolution"] == 64
    assert report["counts"]["error"] >= 1
    assert any(f["check"] == "low_resolution" and f["severity"] == "error" for f in report["findings"])
    assert any(m.startswith("dataset warning [count]") for m in messages), messages  # 2 < 15 images
    assert not list(out.glob("*.safetensors"))


def test_gate_override_trains_and_records_it(tmp_path):
    """Proves ``ignore_dataset_errors=True``: the same dataset trains (1 step), the error is sent to
    ``callbacks.message`` and the report says it was ignored."""
    from lib_lora.model import load_model

    data = _noise_dataset(tmp_path / "data", 16)
    out = tmp_path / "out"
    messages: list[str] = []
    cfg = _config(data, out, ignore_dataset_errors=True)
    result = Trainer(cfg, load_model("tiny-sd1"), TrainCallbacks(on_message=messages.append)).run()
    assert result.status == "completed" and result.global_step == 1
    assert any(m.startswith("dataset error [low_resolution]") for m in messages), messages
    report = json.loads((out / "t.dataset-report.json").read_text(encoding="utf-8"))
    assert report["ignored"] is True


def test_gate_passes_a_clean_dataset_without_errors(tmp_path):
    """Proves that 64 px noise images at a 64 px resolution raise no error: the gate stops nothing (the run goes
    on to build the network, which the stand-in model cannot, so a non-DatasetError is what ends it) and the
    report lists no error."""
    data = _noise_dataset(tmp_path / "data", 64)
    out = tmp_path / "out"
    with pytest.raises(Exception) as e:
        Trainer(_config(data, out), _NoModel()).run()
    assert not isinstance(e.value, DatasetError), e.value
    report = json.loads((out / "t.dataset-report.json").read_text(encoding="utf-8"))
    assert report["counts"]["error"] == 0, report
