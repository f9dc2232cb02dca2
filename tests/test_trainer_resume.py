"""Resume and stop requests on real parts: ``tiny-sd1`` at 64 px, real dog photos in temp Kohya folders, real state
folders (``lib_lora.state``) and LoRA files.

Proves: a run stopped twice from ``on_epoch_end`` and resumed twice ends exactly where an uninterrupted run would
(step 10, epoch 5) with cumulative metadata across all its files; an incomplete state folder is refused before
anything loads; a stop request from ``on_progress`` at step k saves ``name-step0000000k`` and a state, and resuming
continues at step k+1 of the same total.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _paths import dog_photos

from lib_lora.config import TrainConfig
from lib_lora.control import TrainCallbacks, TrainCommands
from lib_lora.errors import TrainingError
from lib_lora.model.headless import load_model
from lib_lora.safetensors_io import check_finite, load_lora_file
from lib_lora.state import STATE_FILES, check_state_dir
from lib_lora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TRIGGER = "sks dog"




def make_dataset(root: Path, n: int) -> Path:
    """Copies the first ``n`` dog photos into ``root/1_sks dog`` (1 repeat); returns ``root``."""
    sub = root / f"1_{TRIGGER}"
    sub.mkdir(parents=True)
    for photo in dog_photos()[:n]:
        shutil.copyfile(photo, sub / photo.name)
    return root


def small_config(data: Path, out: Path, **changes) -> TrainConfig:
    """A fast run: 64 px, rank 4, batch 1, fp32 files, no saves unless asked."""
    base = dict(model="tiny-sd1", train_data_dir=str(data), output_dir=str(out), output_name="t",
                trigger_words=[TRIGGER], resolution=64, min_bucket_reso=64, max_bucket_reso=128, network_dim=4,
                network_alpha=4.0, learning_rate=1e-3, train_batch_size=1, max_train_steps=2,
                save_every_n_steps=None, save_precision="float", seed=0, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


def stop_after_epoch(n: int | None) -> tuple[TrainCallbacks, TrainCommands, list[int]]:
    """Callbacks that ask for a stop when epoch ``n`` ends, and record the steps reported by ``on_progress``."""
    commands = TrainCommands()
    steps: list[int] = []

    def on_epoch_end(epoch: int, step: int) -> None:
        if epoch == n:
            commands.stop()

    return TrainCallbacks(on_epoch_end=on_epoch_end, on_progress=lambda info: steps.append(info.step)), commands, steps


@pytest.fixture(scope="module")
def model():
    """The embedded tiny SD1 model, loaded once for the module."""
    return load_model("tiny-sd1")


def test_stop_and_resume_twice_reaches_the_planned_end(model, tmp_path):
    """Proves resume across sessions: 2 images x 1 repeat, batch 1, 5 epochs (10 steps), save_state every epoch;
    stopped after epoch 2 (step 4), resumed and stopped after epoch 3 (step 6), resumed again: the last session
    runs steps 7-10 and ends completed at step 10, epoch 5; ``t.safetensors`` says ``ss_epoch`` 5, ``ss_steps`` 10;
    ``ss_training_started_at`` and ``ss_session_id`` are the same in every file of the three sessions."""
    data = make_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    cfg = small_config(data, out, max_train_steps=None, max_train_epochs=5, save_state=True, save_every_n_epochs=1)

    cb, cmd, steps = stop_after_epoch(2)
    first = Trainer(cfg, model, cb, cmd).run()
    assert (first.status, first.global_step, first.epoch, steps) == ("stopped", 4, 2, [1, 2, 3, 4])
    assert first.state_dir and check_state_dir(first.state_dir) == []
    state = json.loads((Path(first.state_dir) / "train_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 2, 0)

    cb, cmd, steps = stop_after_epoch(3)
    second = Trainer(cfg.replace(resume=first.state_dir), model, cb, cmd).run()
    assert (second.status, second.global_step, second.epoch, steps) == ("stopped", 6, 3, [5, 6])

    cb, cmd, steps = stop_after_epoch(None)
    third = Trainer(cfg.replace(resume=second.state_dir), model, cb, cmd).run()
    assert (third.status, third.global_step, third.epoch, steps) == ("completed", 10, 5, [7, 8, 9, 10])
    assert third.last_file == str(out / "t.safetensors")

    tensors, meta = load_lora_file(out / "t.safetensors")
    check_finite(tensors)
    assert (meta["ss_epoch"], meta["ss_steps"]) == ("5", "10")
    assert meta["ss_max_train_steps"] == "10" and meta["ss_num_epochs"] == "5"

    every_file = first.files + second.files + third.files
    assert {Path(p).name for p in every_file} >= {"t-000001.safetensors", "t-000002.safetensors",
                                                   "t-000003.safetensors", "t-000004.safetensors", "t.safetensors"}
    metas = {Path(p).name: load_lora_file(p)[1] for p in every_file}
    started = {m["ss_training_started_at"] for m in metas.values()}
    sessions = {m["ss_session_id"] for m in metas.values()}
    assert len(started) == 1 and len(sessions) == 1, (started, sessions)
    assert metas["t-000004.safetensors"]["ss_epoch"] == "4" and metas["t-000004.safetensors"]["ss_steps"] == "8"


@pytest.fixture(scope="module")
def complete_state(model, tmp_path_factory) -> Path:
    """A complete state folder from a 1-step run with ``save_state`` (``t-state``)."""
    tmp = tmp_path_factory.mktemp("state")
    data = make_dataset(tmp / "data", 1)
    result = Trainer(small_config(data, tmp / "out", max_train_steps=1, save_state=True), model).run()
    assert result.state_dir == str(tmp / "out" / "t-state")
    assert check_state_dir(result.state_dir) == []
    assert sorted(p.name for p in Path(result.state_dir).iterdir()) == sorted(STATE_FILES)
    return Path(result.state_dir)


@pytest.mark.parametrize("remove", [["optimizer.pt"], ["optimizer.pt", "rng.pt"], ["train_state.json"]])
def test_incomplete_state_is_refused_before_anything_loads(model, tmp_path, complete_state, monkeypatch, remove):
    """Proves that resuming from a state folder lacking files raises a TrainingError that lists exactly what is
    missing, before any part of the state is read (no torch.load / safetensors load), before the dataset is
    scanned, and without writing anything into the output folder."""
    broken = tmp_path / "broken-state"
    shutil.copytree(complete_state, broken)
    for name in remove:
        (broken / name).unlink()
    loads: list[str] = []
    import lib_lora.state as state_mod

    monkeypatch.setattr(state_mod.torch, "load", lambda *a, **k: loads.append(str(a[0])))
    monkeypatch.setattr(state_mod.safetensors.torch, "load_file", lambda *a, **k: loads.append(str(a[0])))
    messages: list[str] = []
    out = tmp_path / "out"
    cfg = small_config(tmp_path / "no-such-dataset", out, resume=str(broken), max_train_steps=4)
    with pytest.raises(TrainingError, match="not a complete training state") as info:
        Trainer(cfg, model, TrainCallbacks(on_message=messages.append)).run()
    text = str(info.value)
    for name in remove:
        assert name in text
    for name in set(STATE_FILES) - set(remove):
        assert name not in text.split("missing", 1)[1]
    assert loads == [] and messages == []
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize("k", [2, 3])
def test_stop_request_at_step_k_saves_and_resumes_at_k(model, tmp_path, k):
    """Proves a stop request from ``on_progress`` at step k (3 images, 6 steps; k=2 mid-epoch, k=3 at the end of
    epoch 1): the run returns "stopped" at step k, writes ``t-step0000000k.safetensors`` (ss_steps k) and a
    complete state folder; resuming from it reports steps k+1..6 with the same total 6 and completes."""
    data = make_dataset(tmp_path / "data", 3)
    out = tmp_path / "out"
    cfg = small_config(data, out, max_train_steps=6)
    commands = TrainCommands()
    seen: list[tuple[int, int]] = []

    def on_progress(info) -> None:
        seen.append((info.step, info.total))
        if info.step == k:
            commands.stop()

    result = Trainer(cfg, model, TrainCallbacks(on_progress=on_progress), commands).run()
    assert result.status == "stopped" and result.global_step == k
    assert seen == [(s, 6) for s in range(1, k + 1)]
    stem = f"t-step{k:08d}"
    assert result.last_file == str(out / f"{stem}.safetensors")
    tensors, meta = load_lora_file(out / f"{stem}.safetensors")
    check_finite(tensors)
    assert meta["ss_steps"] == str(k)
    assert (out / f"{stem}.json").is_file()
    assert result.state_dir == str(out / f"{stem}-state") and check_state_dir(result.state_dir) == []
    assert f"resume={result.state_dir}" in result.message
    state = json.loads((Path(result.state_dir) / "train_state.json").read_text())
    assert state["global_step"] == k and state["epoch"] * 3 + state["step_in_epoch"] == k

    resumed: list[tuple[int, int]] = []
    final = Trainer(cfg.replace(resume=result.state_dir), model,
                    TrainCallbacks(on_progress=lambda i: resumed.append((i.step, i.total)))).run()
    assert resumed == [(s, 6) for s in range(k + 1, 7)]
    assert final.status == "completed" and final.global_step == 6 and final.epoch == 2
    assert load_lora_file(final.last_file)[1]["ss_steps"] == "6"


def test_stopped_and_resumed_run_equals_the_uninterrupted_run(model, tmp_path):
    """Proves a resume is exact: 2 images, 5 epochs, stopped after epoch 2 and resumed gives the same final
    weights as the same run without interruption (the state carries optimizer, scheduler, RNG and counters)."""
    data = make_dataset(tmp_path / "data", 2)
    base = small_config(data, tmp_path / "whole", max_train_steps=None, max_train_epochs=5)
    whole = Trainer(base, model).run()
    split_cfg = base.replace(output_dir=str(tmp_path / "split"))
    cb, cmd, _ = stop_after_epoch(2)
    stopped = Trainer(split_cfg, model, cb, cmd).run()
    resumed = Trainer(split_cfg.replace(resume=stopped.state_dir), model).run()
    assert resumed.global_step == whole.global_step == 10
    a, b = load_lora_file(whole.last_file)[0], load_lora_file(resumed.last_file)[0]
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, f"max weight difference {worst}"
