"""Tests of lib_lora.metadata: stringification, the sd-scripts ss_*/modelspec keys, and A1111 version detection."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _paths import REFERENCE_LORA_DIR

from lib_lora import __version__
from lib_lora.errors import ConfigError, FormatError
from lib_lora.metadata import (
    SS_METADATA_MINIMUM_KEYS,
    build_ss_metadata,
    finalize_for_save,
    minimal_metadata,
    parse_metadata_values,
    read_base_version,
    stringify_metadata,
    stringify_value,
    summarize,
)
from lib_lora.safetensors_io import load_lora_file, save_lora_file

REF_DIR = REFERENCE_LORA_DIR if (REFERENCE_LORA_DIR / "test_lora.safetensors").is_file() else None
needs_ref = pytest.mark.skipif(REF_DIR is None, reason="shared reference LoRA files not present")

BASE = {"base_model": "sd1", "network_dim": 8, "network_alpha": 4.0}


def tiny_sd() -> dict[str, torch.Tensor]:
    return {
        "lora_unet_x_to_q.lora_down.weight": torch.ones(2, 4),
        "lora_unet_x_to_q.lora_up.weight": torch.ones(4, 2),
        "lora_unet_x_to_q.alpha": torch.tensor(2.0),
    }


# ----------------------------------------------------------------------------------------------------------------------
# stringify
# ----------------------------------------------------------------------------------------------------------------------


class _BrokenStr:
    def __str__(self):
        raise RuntimeError("no str")


def test_stringify_values_as_sd_scripts():
    md = stringify_metadata(
        {
            "ss_network_dim": 8,
            "ss_seed": None,
            "ss_tag_frequency": {"10_sks dog": {"sks": 3, "dog": 2}},
            "ss_v2": False,
            "ss_cache_latents": True,
            "ss_learning_rate": 1e-4,
            "ss_unet_lr": 1e-05,
            "ss_network_alpha": 4.0,
            "ss_resolution": (512, 512),
            "ss_list": [1, "a", None],
            "ss_text": "as is",
        }
    )
    assert md == {
        "ss_network_dim": "8",
        "ss_seed": "None",
        "ss_tag_frequency": '{"10_sks dog": {"sks": 3, "dog": 2}}',
        "ss_v2": "False",
        "ss_cache_latents": "True",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "1e-05",
        "ss_network_alpha": "4.0",
        "ss_resolution": "(512, 512)",
        "ss_list": '[1, "a", null]',
        "ss_text": "as is",
    }
    assert json.loads(md["ss_tag_frequency"]) == {"10_sks dog": {"sks": 3, "dog": 2}}
    assert all(isinstance(v, str) for v in md.values())


def test_stringify_odd_values_never_raise():
    assert stringify_value(np.int64(7)) == "7"
    assert stringify_value(np.float32(0.5)) == "0.5"
    assert stringify_value(torch.tensor(4.0)) == "4.0"
    assert stringify_value(torch.tensor(3)) == "3"
    assert stringify_value(np.array([2.5])) == "2.5"
    assert stringify_value(Path("/a/b.safetensors")) == "/a/b.safetensors"
    assert stringify_value(float("nan")) == "nan"
    assert stringify_value({"t": torch.tensor([1.0, 2.0]), "p": Path("x")}) == '{"t": [1.0, 2.0], "p": "x"}'
    assert stringify_value({(1, 2): "tuple key"}) == "{(1, 2): 'tuple key'}"  # json refuses -> str()
    assert "_BrokenStr object at" in stringify_value(_BrokenStr())  # str() raised: repr() is used
    assert stringify_value(torch.zeros(3)).startswith("tensor(")


def test_stringify_none_and_key_check():
    assert stringify_metadata(None) == {}
    with pytest.raises(FormatError, match="metadata key 5"):
        stringify_metadata({5: "x"})


# ----------------------------------------------------------------------------------------------------------------------
# build_ss_metadata
# ----------------------------------------------------------------------------------------------------------------------


def test_build_minimal_sd1():
    md = build_ss_metadata(BASE, session_id=123, training_started_at=1700000000.5)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_session_id"] == "123"
    assert md["ss_training_started_at"] == "1700000000.5"
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "8"
    assert md["ss_network_alpha"] == "4.0"
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["ss_v2"] == "False"
    assert md["ss_learning_rate"] == "None"  # sd-scripts writes str(None) for unset always-written fields
    assert md["ss_resolution"] == "None"
    assert "ss_output_name" not in md and "ss_steps" not in md and "ss_epoch" not in md
    assert "ss_network_args" not in md and "ss_tag_frequency" not in md and "ss_sd_model_hash" not in md
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.resolution"] == "512x512"
    assert md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.implementation_version"] == f"lib_lora/{__version__}"
    assert "modelspec.title" not in md and "modelspec.encoder_layer" not in md and "modelspec.date" not in md


def test_build_defaults_session_and_start_time():
    md = build_ss_metadata(BASE)
    assert 0 <= int(md["ss_session_id"]) <= 2**32
    assert float(md["ss_training_started_at"]) > 1.6e9


@pytest.mark.parametrize(
    "base, v, version, v2, arch, impl, reso",
    [
        ("sd1", False, "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512"),
        ("sd1", True, "sd_v1_v", "False", "stable-diffusion-v1/lora", "diffusers", "512x512"),
        ("sd2", False, "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
        ("sd2", True, "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
        (
            "sdxl",
            False,
            "sdxl_base_v1-0",
            "False",
            "stable-diffusion-xl-v1-base/lora",
            "https://github.com/Stability-AI/generative-models",
            "1024x1024",
        ),
    ],
)
def test_build_base_versions(base, v, version, v2, arch, impl, reso):
    md = build_ss_metadata({**BASE, "base_model": base, "v_parameterization": v})
    assert md["ss_base_model_version"] == version
    assert md["ss_v2"] == v2
    assert md["modelspec.architecture"] == arch
    assert md["modelspec.implementation"] == impl
    assert md["modelspec.resolution"] == reso
    assert md["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert read_base_version(md) == base


def test_build_full_trainer_config():
    config = {
        **BASE,
        "session_id": 42,
        "training_started_at": 1700000000.0,
        "output_name": "my_lora",
        "network_args": {"conv_dim": 4, "conv_alpha": 1, "rank_dropout": 0.1, "module_dropout": None},
        "network_dropout": 0.05,
        "sd_model_name": "v1-5-pruned-emaonly.safetensors",
        "sd_model_hash": "e1441589",
        "new_sd_model_hash": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
        "tag_frequency": {"10_sks dog": {"sks": 10, "dog": 9}},
        "dataset_dirs": {"10_sks dog": {"n_repeats": 10, "img_count": 25}},
        "bucket_info": {"buckets": {"0": {"resolution": [512, 512], "count": 250}}, "mean_img_ar_error": 0.0},
        "resolution": (512, 768),
    }
    config.update(
        learning_rate=1e-4,
        text_encoder_lr=[5e-5, 1e-5],
        unet_lr=1e-4,
        lr_scheduler="cosine",
        lr_warmup_steps=0,
        optimizer="torch.optim.adamw.AdamW",
        max_grad_norm=1.0,
        seed=1234,
        clip_skip=2,
        min_snr_gamma=5.0,
        noise_offset=None,
        mixed_precision="fp16",
        gradient_checkpointing=True,
        gradient_accumulation_steps=1,
        num_train_images=250,
        num_batches_per_epoch=125,
        num_epochs=10,
        max_train_steps=1250,
        batch_size_per_device=2,
        total_batch_size=2,
        cache_latents=True,
        shuffle_caption=False,
        keep_tokens=1,
        caption_dropout_rate=0.0,
        caption_tag_dropout_rate=0.0,
        flip_aug=False,
        enable_bucket=True,
        min_bucket_reso=256,
        max_bucket_reso=1024,
        bucket_no_upscale=False,
        training_comment="trigger: sks",
        trigger_phrase="sks",
        author="me",
    )
    md = build_ss_metadata(config)
    expected = {
        "ss_session_id": "42",
        "ss_training_started_at": "1700000000.0",
        "ss_output_name": "my_lora",
        "ss_network_args": '{"conv_dim": "4", "conv_alpha": "1", "rank_dropout": "0.1"}',
        "ss_network_dropout": "0.05",
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
        "ss_sd_model_hash": "e1441589",
        "ss_tag_frequency": '{"10_sks dog": {"sks": 10, "dog": 9}}',
        "ss_dataset_dirs": '{"10_sks dog": {"n_repeats": 10, "img_count": 25}}',
        "ss_resolution": "(512, 768)",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "0.0001",
        "ss_lr_scheduler": "cosine",
        "ss_lr_warmup_steps": "0",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_max_grad_norm": "1.0",
        "ss_seed": "1234",
        "ss_clip_skip": "2",
        "ss_min_snr_gamma": "5.0",
        "ss_noise_offset": "None",
        "ss_mixed_precision": "fp16",
        "ss_gradient_checkpointing": "True",
        "ss_gradient_accumulation_steps": "1",
        "ss_num_train_images": "250",
        "ss_num_batches_per_epoch": "125",
        "ss_num_epochs": "10",
        "ss_max_train_steps": "1250",
        "ss_batch_size_per_device": "2",
        "ss_total_batch_size": "2",
        "ss_cache_latents": "True",
        "ss_shuffle_caption": "False",
        "ss_keep_tokens": "1",
        "ss_caption_dropout_rate": "0.0",
        "ss_caption_tag_dropout_rate": "0.0",
        "ss_flip_aug": "False",
        "ss_enable_bucket": "True",
        "ss_min_bucket_reso": "256",
        "ss_max_bucket_reso": "1024",
        "ss_bucket_no_upscale": "False",
        "ss_training_comment": "trigger: sks",
        "modelspec.resolution": "512x768",
        "modelspec.encoder_layer": "2",
        "modelspec.trigger_phrase": "sks",
        "modelspec.author": "me",
    }
    for key, value in expected.items():
        assert md[key] == value, key
    assert json.loads(md["ss_bucket_info"])["buckets"]["0"]["resolution"] == [512, 512]
    assert md["ss_new_sd_model_hash"].startswith("cc6cb271")


def test_build_accepts_ss_prefix_and_kwargs_override():
    md = build_ss_metadata({"ss_network_dim": 4, "base_model": "sdxl", "network_alpha": 1}, network_dim=16)
    assert md["ss_network_dim"] == "16"
    assert md["ss_network_alpha"] == "1"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"base_model": None}, "'base_model' is required"),
        ({"network_dim": None}, "'network_dim' is required"),
        ({"base_model": "sd3"}, "base_model 'sd3'"),
        ({"network_dim": 0}, "network_dim 0"),
        ({"network_dim": 4.0}, "network_dim 4.0"),
        ({"network_alpha": float("nan")}, "network_alpha nan"),
        ({"learning_rat": 1e-4}, "unknown metadata input.*learning_rat"),
        ({"steps": 10}, "set by finalize_for_save"),
        ({"resolution": "abc"}, "resolution 'abc'"),
        ({"network_args": "conv_dim=4"}, "network_args"),
    ],
)
def test_build_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_ss_metadata({**BASE, **bad})


# ----------------------------------------------------------------------------------------------------------------------
# finalize_for_save, minimal_metadata
# ----------------------------------------------------------------------------------------------------------------------


def test_finalize_sets_per_save_keys():
    base = build_ss_metadata(BASE, output_name="run")
    frozen = dict(base)
    md = finalize_for_save(base, Path("/out/run-000003.safetensors"), steps=300, epoch=3, finished_at=1700000123.75)
    assert base == frozen  # input untouched
    assert md["ss_output_name"] == "run-000003"
    assert md["ss_steps"] == "300"
    assert md["ss_epoch"] == "3"
    assert md["ss_training_finished_at"] == "1700000123.75"
    assert md["modelspec.title"] == "run-000003"
    assert md["modelspec.date"] == datetime.datetime.fromtimestamp(1700000123).isoformat()
    assert "." not in md["modelspec.date"]  # no microseconds, no zone
    titled = finalize_for_save(build_ss_metadata(BASE, title="My LoRA"), "x.safetensors", 1, 1)
    assert titled["modelspec.title"] == "My LoRA"
    assert float(titled["ss_training_finished_at"]) > 1.6e9


def test_finalize_drops_stale_hashes_and_skips_modelspec_when_absent():
    md = finalize_for_save({"ss_x": 1, "sshs_model_hash": "old", "sshs_legacy_hash": "old"}, "a.b.safetensors", 5, 1)
    assert md == {
        "ss_x": "1",
        "ss_output_name": "a.b",
        "ss_training_finished_at": md["ss_training_finished_at"],
        "ss_steps": "5",
        "ss_epoch": "1",
    }


def test_minimal_metadata():
    md = build_ss_metadata({**BASE, "network_args": {"conv_dim": 4}})
    small = minimal_metadata(md)
    assert {k for k in small if k.startswith("ss_")} == set(SS_METADATA_MINIMUM_KEYS)
    assert small["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_saved_file_round_trip(tmp_path):
    md = build_ss_metadata({**BASE, "base_model": "sdxl", "output_name": "run"})
    path = tmp_path / "run-000001.safetensors"
    save_lora_file(path, tiny_sd(), finalize_for_save(md, path, 10, 1), torch.float16)
    _, loaded = load_lora_file(path)
    assert loaded["ss_output_name"] == path.stem == "run-000001"
    assert loaded["ss_base_model_version"] == "sdxl_base_v1-0"
    assert read_base_version(loaded) == "sdxl"
    assert loaded["ss_network_dim"] == "8" and loaded["ss_steps"] == "10"


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "md, expected",
    [
        (None, "unknown"),
        ({}, "unknown"),
        ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "True"}, "sdxl"),
        ({"ss_base_model_version": "sd_v2", "ss_v2": "True"}, "sd2"),
        ({"ss_v2": "true"}, "sd1"),  # A1111 compares with the exact string "True"
        ({"ss_v2": True}, "sd2"),  # str(True) == "True"
        ({"ss_base_model_version": "sd_v1"}, "sd1"),
        ({"modelspec.title": "x"}, "sd1"),  # any metadata at all -> SD1
    ],
)
def test_read_base_version(md, expected):
    assert read_base_version(md) == expected


@needs_ref
def test_read_base_version_of_reference_files():
    for path in sorted(REF_DIR.glob("*.safetensors")):
        _, md = load_lora_file(path)
        assert read_base_version(md) == "sd1", path.name


def test_parse_metadata_values_like_a1111():
    parsed = parse_metadata_values({"a": '{"x": 1}', "b": "{not json", "c": "[1, 2]", "d": "8"})
    assert parsed == {"a": {"x": 1}, "b": "{not json", "c": "[1, 2]", "d": "8"}


def test_summarize():
    md = build_ss_metadata(
        {
            **BASE,
            "network_args": {"conv_dim": 4, "conv_alpha": 1},
            "dataset_dirs": {"10_sks dog": {"n_repeats": 10, "img_count": 25}, "1_reg": {"n_repeats": 1}},
            "trigger_phrase": "sks dog",
            "sd_model_name": "tiny-sd1.safetensors",
            "num_epochs": 10,
            "resolution": 512,
        }
    )
    md = finalize_for_save(md, "out/dog-000002.safetensors", 250, 2)
    md["sshs_model_hash"] = "0123456789abcdef" * 4
    summary = summarize(md)
    assert summary == {
        "output name": "dog-000002",
        "base model": "sd1 (sd_v1)",
        "trained on": "tiny-sd1.safetensors",
        "network": "networks.lora",
        "dim/alpha": "8/4.0, conv 4/1",
        "steps": "250",
        "epoch": "2/10",
        "resolution": "(512, 512)",
        "trigger words": "sks dog",
        "dataset dirs": "10_sks dog: 25 images x 10; 1_reg: ? images x 1",
        "hash": "0123456789ab",
    }
    # A1111-decoded values (dicts) work too
    assert summarize(parse_metadata_values(md))["dataset dirs"] == summary["dataset dirs"]


def test_summarize_sparse_and_odd_metadata():
    assert summarize({}) == {"base model": "unknown"}
    assert summarize(None) == {"base model": "unknown"}
    odd = summarize({"ss_dataset_dirs": "{broken", "ss_network_args": "[1]", "ss_network_dim": "4"})
    assert odd == {"base model": "sd1", "dim/alpha": "4/?"}


@needs_ref
def test_summarize_reference_file():
    _, md = load_lora_file(REF_DIR / "test_lora-000002.safetensors")
    assert summarize(md) == {
        "output name": "test_lora-000002",
        "base model": "sd1 (sd_v1)",
        "trained on": "tiny-sd1.safetensors",
        "network": "networks.lora",
        "dim/alpha": "4/4.0",
    }
