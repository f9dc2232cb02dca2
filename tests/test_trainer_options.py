"""Trainer options end to end on the embedded tiny models and real dog photos (64 px, a few steps each).

What is proved here: sample images during training; the LR drop on a loss plateau and early stopping fire, are
logged and act on the optimizer; gradient accumulation counts optimizer steps; UNet-only training saves no
text-encoder modules; SD2 (OpenCLIP text encoder, v-prediction) trains and is labelled SD2 for the WebUI; bf16
training runs on the CPU with fp32 LoRA weights; min-SNR gamma and noise offset give finite losses; the progress
callback carries step, total, epoch, loss, lr, it/s and ETA.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import TRIGGER, make_dataset, small_config

from lib_lora.control import TrainCallbacks
from lib_lora.model.headless import load_model
from lib_lora.safetensors_io import load_lora_file
from lib_lora.train_log import read_jsonl
from lib_lora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def sd1():
    """tiny-sd1, fp32, CPU, loaded once."""
    return load_model("tiny-sd1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two dog photos in ``1_sks dog``."""
    return make_dataset(tmp_path_factory.mktemp("data"), 2)


def _log(result) -> list[dict]:
    from pathlib import Path

    return read_jsonl(Path(result.log_dir) / "train_log.jsonl")


def test_samples_are_made_during_training(sd1, data, tmp_path):
    """sample_prompts with sample_every_n_steps: a PNG per prompt at step 0 and every N steps, reported through
    on_sample, made with the network as it is at that step."""
    seen = []
    cfg = small_config(data, tmp_path, max_train_steps=2, sample_prompts=[f"a photo of {TRIGGER}"],
                       sample_every_n_steps=2, sample_steps=2)
    Trainer(cfg, sd1, callbacks=TrainCallbacks(on_sample=lambda p, s, pr: seen.append((p, s)))).run()
    assert [s for _, s in seen] == [0, 2]
    for path, _ in seen:
        from PIL import Image

        with Image.open(path) as im:
            assert im.size == (64, 64)
            assert im.info["parameters"].startswith(f"a photo of {TRIGGER}\nSteps: 2, Sampler: DDIM")


def test_plateau_lr_drop_and_early_stop(sd1, data, tmp_path):
    """With a min_delta no loss change can meet, the LR drops after plateau_patience_steps (logged, and the
    optimizer's LR halves), and early stopping ends the run with status "early_stopped", a saved file and a state
    to resume from."""
    messages = []
    cfg = small_config(data, tmp_path, max_train_steps=20, lr_drop_on_plateau=True, plateau_patience_steps=2,
                       plateau_min_delta=100.0, early_stopping_patience_steps=4, learning_rate=1e-4)
    result = Trainer(cfg, sd1, callbacks=TrainCallbacks(on_message=messages.append)).run()
    assert result.status == "early_stopped"
    assert result.global_step < 20 and result.last_file and result.state_dir
    log = _log(result)
    events = [r for r in log if "event" in r]
    assert any(e["event"] == "lr_drop" for e in events) and any(e["event"] == "early_stop" for e in events)
    lrs = [r["lr/unet"] for r in log if "lr/unet" in r]
    assert lrs[0] == pytest.approx(1e-4) and min(lrs) == pytest.approx(5e-5)
    assert any("early" in m.lower() for m in messages)


def test_gradient_accumulation_counts_optimizer_steps(sd1, data, tmp_path):
    """2 images x 1 repeat, batch 1, accumulation 2: one optimizer step per epoch; 2 epochs = 2 steps."""
    cfg = small_config(data, tmp_path, max_train_steps=None, max_train_epochs=2, gradient_accumulation_steps=2)
    result = Trainer(cfg, sd1).run()
    assert (result.global_step, result.epoch) == (2, 2)
    assert [r["step"] for r in _log(result) if "loss/current" in r] == [1, 2]


def test_unet_only_saves_no_text_encoder_modules(sd1, data, tmp_path):
    """network_train_unet_only: the file holds lora_unet_ modules only, and ss_text_encoder_lr is not trained."""
    result = Trainer(small_config(data, tmp_path, network_train_unet_only=True), sd1).run()
    sd, _ = load_lora_file(result.last_file)
    assert sd and all(k.startswith("lora_unet_") for k in sd)


def test_sd2_v_prediction_trains_and_is_labelled_sd2(data, tmp_path):
    """tiny-sd2 (OpenCLIP fused attention, v-prediction): training works, the file has the OpenCLIP text-encoder
    modules under HF names and the metadata the WebUI needs to list it as SD2."""
    model = load_model("tiny-sd2")
    result = Trainer(small_config(data, tmp_path, model="tiny-sd2", max_train_steps=2), model).run()
    sd, md = load_lora_file(result.last_file)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.prediction_type"] == "v"


def test_bf16_training_keeps_fp32_lora(data, tmp_path):
    """A bf16 base model trains on the CPU (autocast), the LoRA parameters stay fp32, the loss is finite."""
    model = load_model("tiny-sd1", dtype=torch.bfloat16)
    trainer = Trainer(small_config(data, tmp_path, mixed_precision="bf16", max_train_steps=2), model)
    result = trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())
    assert all(math.isfinite(r["loss/current"]) for r in _log(result) if "loss/current" in r)


def test_min_snr_and_noise_offset_and_progress(sd1, data, tmp_path):
    """min_snr_gamma and noise_offset give finite losses; on_progress reports step/total/epoch/loss/lr/it/s/ETA."""
    infos = []
    cfg = small_config(data, tmp_path, max_train_steps=3, min_snr_gamma=5.0, noise_offset=0.05)
    Trainer(cfg, sd1, callbacks=TrainCallbacks(on_progress=infos.append)).run()
    assert [i.step for i in infos] == [1, 2, 3] and all(i.total == 3 for i in infos)
    last = infos[-1]
    assert last.epoch >= 1 and math.isfinite(last.loss) and last.lr == pytest.approx(1e-3)
    assert last.it_per_s > 0 and last.eta_s == 0
