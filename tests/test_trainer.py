"""Trainer end to end on real parts: the embedded ``tiny-sd1`` model (real ldm/HF CLIP classes at tiny width), real
dog photos (DreamBooth, CC BY 4.0) copied into temp Kohya folders, real safetensors files, sidecars and logs.

What is proved here (the resume and stop-request checks are in ``test_trainer_resume.py``):

- learning: 300 steps at 256 px lower the denoising loss on the photos by >= 30% and pull a fixed-seed sample
  towards the training latents (``slow``; the numbers are printed, run with ``pytest -s`` to see them);
- non-finite loss: a diverging run stops with a TrainingError giving fixes and leaves the last good file intact;
  the "skip" policy skips a non-finite step and finishes;
- saves: Kohya file names, sidecars, ``save_last_n`` pruning, ``ss_*`` metadata, TensorBoard and JSONL logs;
  gradient checkpointing gives the same LoRA gradients and trains;
- dataset problems (a truncated JPEG) are reported by name before step 1.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from _paths import dog_photos

from lib_lora import checkpointing
from lib_lora.config import TrainConfig
from lib_lora.control import TrainCallbacks
from lib_lora.demo import denoising_loss
from lib_lora.errors import DatasetError, TrainingError
from lib_lora.model.headless import load_model
from lib_lora.model.sampler import sample
from lib_lora.network import LoRANetwork
from lib_lora.safetensors_io import check_finite, load_lora_file
from lib_lora.sidecar import read_sidecar
from lib_lora.train_log import read_jsonl
from lib_lora.trainer import NONFINITE_ADVICE, Trainer, checkpoint_name, plan_steps

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TRIGGER = "sks dog"




def make_dataset(root: Path, n: int, folder: str = f"1_{TRIGGER}") -> Path:
    """Copies the first ``n`` dog photos into ``root/<folder>`` (a Kohya ``<repeats>_<tokens>`` folder); returns
    ``root`` (plain copies: the shared originals are read-only)."""
    sub = root / folder
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


def files_in(folder: Path) -> list[str]:
    """Names of the plain files anywhere under ``folder`` (sorted)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def model():
    """The embedded tiny SD1 model, loaded once for the module (seeded weights, fp32, CPU)."""
    return load_model("tiny-sd1")


# ------------------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_lora_learns_the_dog_photos(model, tmp_path):
    """Proves the trainer learns: 300 steps on the 5 dog photos (``10_sks dog``, 256 px, rank 8, alpha 8,
    lr 1e-3, batch 1, latents cached in memory) lower the denoising loss on those photos at fixed noise and
    timesteps by >= 30% against the base model, and a fixed-seed DDIM sample of the trigger prompt lands closer
    (latent MSE) to the nearest training latent with the LoRA than without it (multiplier 0)."""
    from lib_lora.data.buckets import BucketSpec
    from lib_lora.data.dataset import load_item_pixels, plan_items

    data = make_dataset(tmp_path / "data", 5, folder=f"10_{TRIGGER}")
    cfg = small_config(data, tmp_path / "out", output_name="dog", resolution=256, max_bucket_reso=512,
                       network_dim=8, network_alpha=8.0, learning_rate=1e-3, max_train_steps=300,
                       cache_latents="memory", save_precision="fp16")
    losses: list[float] = []
    trainer = Trainer(cfg, model, TrainCallbacks(on_progress=lambda info: losses.append(info.loss)))
    start = time.monotonic()
    result = trainer.run()
    train_s = time.monotonic() - start
    assert result.status == "completed" and result.global_step == 300
    assert Path(result.last_file).name == "dog.safetensors"

    # The training photos' latents, planned exactly as the trainer plans them (one 256x256 bucket).
    plans = plan_items(trainer.report.images, BucketSpec(resolution=(256, 256), min_reso=64, max_reso=512))
    pixels = torch.stack([torch.from_numpy(load_item_pixels(p)) for p in plans])
    latents = model.encode_images(pixels, generator=torch.Generator("cpu").manual_seed(0))
    assert latents.shape == (5, 4, 32, 32)

    net, _ = LoRANetwork.from_weights(load_lora_file(result.last_file)[0], model.unet, model.text_encoders,
                                      model.arch)
    start = time.monotonic()
    base_loss = denoising_loss(model, net, latents, TRIGGER, 0.0)
    lora_loss = denoising_loss(model, net, latents, TRIGGER, 1.0)
    reduction = 1 - lora_loss / base_loss

    mse = {}
    for multiplier in (0.0, 1.0):
        net.set_multiplier(multiplier)
        with net.applied():
            z = sample(model, TRIGGER, steps=20, cfg_scale=7.0, width=256, height=256, seed=7)
        mse[multiplier] = float(((latents - z) ** 2).mean(dim=(1, 2, 3)).min())  # nearest training latent
    net.set_multiplier(1.0)
    eval_s = time.monotonic() - start

    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    print(f"\n[learning] train {train_s:.1f} s for 300 steps ({train_s / 300:.2f} s/step), eval {eval_s:.1f} s; "
          f"training loss (mean of 25) {first:.4f} -> {last:.4f}\n"
          f"[learning] denoising loss base {base_loss:.4f}, LoRA {lora_loss:.4f}: {reduction:.1%} lower\n"
          f"[learning] sample latent MSE to nearest training latent: base {mse[0.0]:.3f}, LoRA {mse[1.0]:.3f}")
    assert reduction >= 0.30, f"denoising loss only {reduction:.1%} lower ({base_loss:.4f} -> {lora_loss:.4f})"
    assert mse[1.0] < mse[0.0], f"LoRA sample is not closer to the photos: base {mse[0.0]}, LoRA {mse[1.0]}"


# --------------------------------------------------------------------------------------------------- non-finite
@pytest.fixture(scope="module")
def diverged_run(model, tmp_path_factory):
    """lr=1e3 in fp32, 20 steps, a checkpoint every step; returns the exception (or None), the per-step losses, the
    output folder and the messages."""
    tmp = tmp_path_factory.mktemp("diverge")
    data = make_dataset(tmp / "data", 2)
    out = tmp / "out"
    cfg = small_config(data, out, output_name="nf", learning_rate=1e3, mixed_precision="no", max_train_steps=20,
                       save_every_n_steps=1, on_nonfinite_loss="stop")
    losses: list[float] = []
    messages: list[str] = []
    torch.manual_seed(0)  # the trainer leaves network init and the VAE posterior sample to the global RNG
    error = None
    try:
        Trainer(cfg, model, TrainCallbacks(on_progress=lambda info: losses.append(info.loss),
                                           on_message=messages.append)).run()
    except TrainingError as exc:
        error = exc
    print(f"\n[non-finite] lr=1e3 losses per completed step: {losses}; error: {error}")
    return error, losses, out, messages


def test_diverging_run_stops_and_keeps_the_last_good_file(diverged_run):
    """Proves that lr=1e3 (fp32) diverges within 20 steps, the run stops with a TrainingError that gives the
    fixes, and every file written (at least one, from before the divergence) loads and holds only finite
    tensors; nothing is left half-written."""
    error, losses, out, _ = diverged_run
    if error is None:
        pytest.fail(f"lr=1e3 did not diverge within 20 steps; losses: {losses}")
    assert NONFINITE_ADVICE in str(error)
    assert "lower the learning rate" in str(error)
    saved = sorted(out.glob("nf-step*.safetensors"))
    assert saved, f"no checkpoint before the divergence; losses {losses}, files {files_in(out)}"
    for path in saved:
        tensors, meta = load_lora_file(path)
        check_finite(tensors)  # raises on NaN/Inf
        assert meta["ss_steps"] == str(int(path.stem.removeprefix("nf-step")))
        assert path.with_suffix(".json").is_file()
    last_good = int(saved[-1].stem.removeprefix("nf-step"))
    assert last_good <= len(losses) < 20
    assert not (out / "nf.safetensors").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_diverging_run_message_says_the_loss_is_nonfinite(diverged_run):
    """Proves that the divergence is caught as a non-finite step (loss or gradients), not later as NaN weights
    refused at save time: the message says the loss/gradient is non-finite and names the step."""
    error, losses, _, _ = diverged_run
    assert error is not None, f"no divergence; losses {losses}"
    text = str(error)
    assert not text.startswith("not saving"), text
    assert re.search(r"(loss|gradient)s?\b[^;]*\b(nan|inf|non-finite)", text, re.IGNORECASE), text


class _NanAtCall(Trainer):
    """The real trainer, with the loss of the ``nan_call``-th micro-batch replaced by NaN before backward (a
    controlled non-finite loss on an otherwise real run)."""

    nan_call = 2

    def _train_step(self, batch, generator, scaler, train_te):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.nan_call:
            return float("nan")
        return super()._train_step(batch, generator, scaler, train_te)


def test_nonfinite_loss_stop_policy(model, tmp_path):
    """Proves on_nonfinite_loss="stop": a NaN loss at step 3 raises a TrainingError saying the loss is nan, with
    the fixes; the checkpoints of steps 1-2 are intact and finite and nothing is saved for step 3."""
    data = make_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    cfg = small_config(data, out, max_train_steps=6, save_every_n_steps=1, on_nonfinite_loss="stop")
    trainer = _NanAtCall(cfg, model)
    trainer.nan_call = 3
    with pytest.raises(TrainingError, match=r"step 3: loss is nan") as info:
        trainer.run()
    assert NONFINITE_ADVICE in str(info.value)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t-step00000001.safetensors",
                                                                 "t-step00000002.safetensors"]
    for path in out.glob("*.safetensors"):
        check_finite(load_lora_file(path)[0])


def test_nonfinite_loss_skip_policy(model, tmp_path):
    """Proves on_nonfinite_loss="skip": a NaN loss is skipped (no optimizer step, a message and a
    ``skipped_step`` log event) and the run still completes its planned steps with a finite file."""
    data = make_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    messages: list[str] = []
    cfg = small_config(data, out, max_train_steps=3, on_nonfinite_loss="skip")
    trainer = _NanAtCall(cfg, model, TrainCallbacks(on_message=messages.append))
    result = trainer.run()
    assert result.status == "completed" and result.global_step == 3
    assert trainer.calls == 4  # one extra micro-batch replaced the skipped one
    assert any(re.fullmatch(r"step 2: loss is nan; step skipped", m) for m in messages), messages
    events = [r for r in read_jsonl(Path(result.log_dir) / "train_log.jsonl") if r.get("event") == "skipped_step"]
    assert len(events) == 1 and "loss is nan" in events[0]["message"]
    check_finite(load_lora_file(out / "t.safetensors")[0])


# -------------------------------------------------------------------------------------------------------- saves
def test_checkpoint_names():
    """Proves the Kohya stems: ``name-000001`` per epoch, ``name-step00000002`` per step, ``name`` at the end."""
    assert checkpoint_name("t", epoch=1) == "t-000001"
    assert checkpoint_name("t", step=2) == "t-step00000002"
    assert checkpoint_name("t") == "t"
    assert plan_steps(5, TrainConfig(max_train_steps=None, max_train_epochs=3, gradient_accumulation_steps=2)) \
        == (3, 9, 3)


@pytest.fixture(scope="module")
def saves_run(model, tmp_path_factory):
    """2 images, batch 1, 6 steps (3 epochs), a step save every 2 steps and an epoch save every epoch."""
    tmp = tmp_path_factory.mktemp("saves")
    data = make_dataset(tmp / "data", 2)
    out = tmp / "out"
    cfg = small_config(data, out, max_train_steps=6, save_every_n_steps=2, save_every_n_epochs=1,
                       network_dim=4, network_alpha=2.0)
    result = Trainer(cfg, model).run()
    return result, out


def test_saves_names_and_sidecars(saves_run):
    """Proves the files of a run and their order: step saves ``t-step00000002``, epoch saves ``t-000001``, the
    final ``t`` (no step/epoch save duplicates the final one), each with a ``.json`` sidecar holding the trigger
    words as "activation text" and "sd version" "SD1"; the resolved config is written as ``t.config.toml``."""
    result, out = saves_run
    assert result.status == "completed" and result.global_step == 6 and result.epoch == 3
    names = [Path(p).name for p in result.files]
    assert names == ["t-step00000002.safetensors", "t-000001.safetensors", "t-step00000004.safetensors",
                     "t-000002.safetensors", "t.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(names)
    assert result.last_file == str(out / "t.safetensors")
    for name in names:
        sidecar = read_sidecar(out / name)
        assert sidecar["activation text"] == TRIGGER
        assert sidecar["sd version"] == "SD1"
    assert TrainConfig.from_toml(out / "t.config.toml").max_train_steps == 6


def test_saves_metadata(saves_run):
    """Proves the ``ss_*`` metadata of each file: ``ss_output_name`` = the file's stem, rank/alpha, steps and epoch
    numbers, and ``ss_tag_frequency`` / ``ss_dataset_dirs`` as JSON describing the ``1_sks dog`` folder."""
    result, out = saves_run
    expected_steps = {"t-step00000002": "2", "t-000001": "2", "t-step00000004": "4", "t-000002": "4", "t": "6"}
    for path in map(Path, result.files):
        tensors, meta = load_lora_file(path)
        check_finite(tensors)
        assert meta["ss_output_name"] == path.stem
        assert meta["ss_network_dim"] == "4"
        assert float(meta["ss_network_alpha"]) == 2.0
        assert meta["ss_steps"] == expected_steps[path.stem]
        dirs = json.loads(meta["ss_dataset_dirs"])
        assert dirs == {f"1_{TRIGGER}": {"n_repeats": 1, "img_count": 2}}
        tags = json.loads(meta["ss_tag_frequency"])
        assert isinstance(tags, dict) and TRIGGER in json.dumps(tags)
        assert meta["ss_num_train_images"] == "2"
    assert load_lora_file(out / "t-000001.safetensors")[1]["ss_epoch"] == "1"
    assert load_lora_file(out / "t-000002.safetensors")[1]["ss_epoch"] == "2"
    assert load_lora_file(out / "t.safetensors")[1]["ss_epoch"] == "3"


def test_saves_logs(saves_run):
    """Proves the logs: TensorBoard event files in the run's log folder, and ``train_log.jsonl`` with finite
    ``loss/current``, ``loss/average``, ``lr/unet``, ``lr/textencoder`` for every step 1..6 (lr = 1e-3)."""
    result, out = saves_run
    log_dir = Path(result.log_dir)
    assert log_dir.parent == out / "logs"
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events and all(p.stat().st_size > 0 for p in events)
    records = [r for r in read_jsonl(log_dir / "train_log.jsonl") if "loss/current" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        for key in ("loss/current", "loss/average", "lr/unet", "lr/textencoder"):
            assert isinstance(r[key], float) and r[key] == r[key] and abs(r[key]) != float("inf"), (key, r)
        assert r["lr/unet"] == pytest.approx(1e-3) and r["lr/textencoder"] == pytest.approx(1e-3)
    saved = [r["message"] for r in read_jsonl(log_dir / "train_log.jsonl") if r.get("event") == "saved"]
    assert [Path(m).name for m in saved] == [Path(p).name for p in result.files]


def test_save_last_n_prunes_old_checkpoints_and_states(model, tmp_path):
    """Proves ``save_last_n=2``: of the step checkpoints 1..4 only steps 3 and 4 stay (with their sidecars and
    resume states), the final file and state are kept."""
    data = make_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    cfg = small_config(data, out, max_train_steps=5, save_every_n_steps=1, save_last_n=2, save_state=True)
    result = Trainer(cfg, model).run()
    assert result.global_step == 5
    assert len(result.files) == 5  # written during the run, pruned afterwards
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "t-step00000003.safetensors", "t-step00000004.safetensors", "t.safetensors"]
    assert sorted(p.name for p in out.glob("*.json")) == [
        "t-step00000003.json", "t-step00000004.json", "t.dataset-report.json", "t.json"]  # + the doctor's report
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "logs") == [
        "t-state", "t-step00000003-state", "t-step00000004-state"]


def test_gradient_checkpointing_gives_the_same_lora_grads(model, tmp_path):
    """Proves that gradient checkpointing changes memory, not maths: for the same batch, noise and timesteps,
    ``Trainer._train_step`` gives the same loss and the same gradient on every LoRA parameter (UNet and text
    encoder, up and down; max abs difference <= 1e-5) with the UNet blocks checkpointed as without."""
    data = make_dataset(tmp_path / "data", 1)
    trainer = Trainer(small_config(data, tmp_path / "out"), model)
    trainer.scan()
    dataset = trainer._build_dataset()
    dataset.cache_latents()
    batch = next(iter(dataset.batches(1)))
    net = trainer._build_network()
    g = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():  # lora_up starts at 0, which would leave every lora_down gradient 0
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = {}
    for gc in (False, True):
        net.zero_grad(set_to_none=True)
        with net.applied(), checkpointing.training_mode(model.unet, gc):
            assert ("forward" in model.unet.input_blocks[1].__dict__) == gc  # checkpoint wrappers are on
            net.train()
            loss = trainer._train_step(batch, torch.Generator("cpu").manual_seed(123), scaler, True)
        net.eval()
        results[gc] = loss, {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    assert "forward" not in model.unet.input_blocks[1].__dict__
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    assert loss0 == pytest.approx(loss1, abs=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) == len(list(net.parameters()))
    assert any("lora_te_" in n or "text" in n for n in grads0) and any("unet" in n for n in grads0)
    worst = max(float((grads0[n] - grads1[n]).abs().max()) for n in grads0)
    print(f"\n[grad ckpt] loss {loss0:.6f} vs {loss1:.6f}; max |grad difference| {worst:.2e} over {len(grads0)} "
          "parameters")
    assert worst <= 1e-5
    assert sum(int(bool(g.abs().sum() > 0)) for g in grads0.values()) == len(grads0)  # every parameter has a grad


def test_gradient_checkpointing_run_trains_like_a_plain_run(model, tmp_path):
    """Proves a run with ``gradient_checkpointing=True`` has the same first-step loss as the same run without it,
    trains (the loss changes from step to step and the LoRA moves off its zero lora_up start), and ends with
    the same weights (within 1e-4)."""
    data = make_dataset(tmp_path / "data", 2)
    runs = {}
    for gc in (False, True):
        out = tmp_path / f"out-{gc}"
        losses: list[float] = []
        torch.manual_seed(0)  # network init and VAE posterior sample use the global RNG (see report)
        result = Trainer(small_config(data, out, max_train_steps=3, gradient_checkpointing=gc), model,
                         TrainCallbacks(on_progress=lambda info, acc=losses: acc.append(info.loss))).run()
        tensors, meta = load_lora_file(result.last_file)
        assert meta["ss_gradient_checkpointing"] == str(gc)
        runs[gc] = losses, tensors
    (plain_losses, plain), (gc_losses, gc_t) = runs[False], runs[True]
    print(f"\n[grad ckpt] losses plain {plain_losses}, checkpointed {gc_losses}")
    assert gc_losses[0] == pytest.approx(plain_losses[0], abs=1e-5)
    assert len(set(gc_losses)) == 3
    ups = [t for k, t in gc_t.items() if k.endswith("lora_up.weight")]
    assert ups and all(float(t.abs().max()) > 0 for t in ups)
    assert plain.keys() == gc_t.keys()
    worst = max(float((plain[k].float() - gc_t[k].float()).abs().max()) for k in plain)
    assert worst <= 1e-4, worst


def test_same_config_and_seed_give_the_same_file(model, tmp_path):
    """Proves reproducibility: the same config (seed 0) run twice, with unrelated global RNG use in between,
    gives the same first-step loss and the same LoRA file."""
    data = make_dataset(tmp_path / "data", 1)
    results = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # stands for whatever the host did with the global RNG before
        losses: list[float] = []
        r = Trainer(small_config(data, tmp_path / f"out{i}", max_train_steps=1), model,
                    TrainCallbacks(on_progress=lambda info, acc=losses: acc.append(info.loss))).run()
        results.append((losses[0], load_lora_file(r.last_file)[0]))
    (l0, t0), (l1, t1) = results
    assert l0 == l1
    assert all(torch.equal(t0[k], t1[k]) for k in t0)


# ------------------------------------------------------------------------------------------------------ dataset
def _dataset_with_truncated_jpeg(root: Path) -> Path:
    data = make_dataset(root, 3, folder="1_dog")
    raw = dog_photos()[3].read_bytes()
    (data / "1_dog" / "cut.jpg").write_bytes(raw[: int(len(raw) * 0.6)])
    return data


def test_truncated_jpeg_stop_policy_is_reported_before_step_1(model, tmp_path):
    """Proves on_bad_image="stop": a JPEG cut to 60% of its bytes among 3 good photos raises a DatasetError naming
    ``1_dog/cut.jpg`` before step 1: no progress report, and no file written in the output folder."""
    data = _dataset_with_truncated_jpeg(tmp_path / "data")
    out = tmp_path / "out"
    steps: list[int] = []
    cfg = small_config(data, out, on_bad_image="stop", save_every_n_steps=1)
    with pytest.raises(DatasetError, match=r"1_dog/cut\.jpg") as info:
        Trainer(cfg, model, TrainCallbacks(on_progress=lambda i: steps.append(i.step))).run()
    assert "truncated" in str(info.value)
    assert steps == []
    assert not out.exists() or files_in(out) == []


def test_truncated_jpeg_skip_policy_trains_on_the_good_images(model, tmp_path):
    """Proves on_bad_image="skip": the run trains on the 3 good photos (``ss_num_train_images`` 3, 3 steps per
    epoch) and a message names ``cut.jpg`` before training starts."""
    data = _dataset_with_truncated_jpeg(tmp_path / "data")
    out = tmp_path / "out"
    events: list[str] = []
    cfg = small_config(data, out, on_bad_image="skip", max_train_steps=3)
    trainer = Trainer(cfg, model, TrainCallbacks(on_message=events.append,
                                                 on_progress=lambda i: events.append(f"progress {i.step}")))
    result = trainer.run()
    assert result.status == "completed" and result.global_step == 3 and result.epoch == 1
    named = [i for i, m in enumerate(events) if "cut.jpg" in m]
    assert named and named[0] < events.index("progress 1"), events
    assert "truncated" in events[named[0]]
    assert any("cut.jpg" in w for w in trainer.report.warnings)
    assert [r.path.name for r in trainer.report.images] == [p.name for p in dog_photos()[:3]]
    meta = load_lora_file(result.last_file)[1]
    assert meta["ss_num_train_images"] == "3"
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 3}}
