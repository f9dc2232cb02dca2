"""Named starting points for the WebUI tab's parameter panel: each preset is a dict of :class:`TrainConfig` keys.

A preset only sets the keys it names; every other field keeps its current value (or the :class:`TrainConfig`
default), so applying a preset never clears the dataset folder, the output name or the trigger words. Every preset
below is a valid config on its own (``TrainConfig.from_dict(preset).validate()``; a test checks it).

Sources for the numbers: the product's seed guidance (rank 32, alpha 16, learning rate 1e-4, batch 2, a checkpoint
every 200 steps; see :mod:`lib_lora.config`) and the common Kohya sd-scripts practice the community guides use
(min-SNR gamma 5 from Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"; a text-encoder rate
half the UNet rate; 1024 px and UNet-only training with gradient checkpointing for SDXL on small GPUs).

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "apply_preset", "preset_names", "preset_values"]


@dataclass(frozen=True)
class Preset:
    """One preset.

    Attributes:
        name: shown in the dropdown.
        description: one or two sentences saying what it is for and why its values differ from the defaults.
        values: ``{TrainConfig field: value}``; units as in :class:`lib_lora.config.TrainConfig`.
    """

    name: str
    description: str
    values: dict[str, Any] = field(default_factory=dict)


#: The seed's defaults, spelled out so that "Defaults" resets every key the other presets change.
_DEFAULTS: dict[str, Any] = {
    "network_dim": 32,  # rank 32: enough capacity for a character or a style; files of ~37 MB on SD1.5 (fp16)
    "network_alpha": 16.0,  # alpha / rank = 0.5: see lib_lora.config's module docstring
    "learning_rate": 1e-4,
    "unet_lr": None,
    "text_encoder_lr": None,
    "train_batch_size": 2,
    "save_every_n_steps": 200,
    "max_train_steps": 1600,
    "max_train_epochs": None,
    "resolution": 512,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "lr_scheduler": "constant",
    "shuffle_caption": False,
    "keep_tokens": 0,
    "flip_aug": False,
    "caption_tag_dropout_rate": 0.0,
    "min_snr_gamma": None,
    "network_train_unet_only": False,
    "gradient_checkpointing": False,
    "mixed_precision": "no",
    "cache_latents": "memory",
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "Defaults",
            "The seed's defaults: rank 32, alpha 16, learning rate 1e-4, batch 2, a checkpoint every 200 steps, "
            "1600 steps at 512 px.",
            dict(_DEFAULTS),
        ),
        Preset(
            "SD1.5 character",
            "A person or character on SD1.5 at 512 px: 10 epochs (so the step count follows the dataset size), "
            "captions shuffled with the trigger word kept first (keep_tokens 1) so it binds the subject, no flips "
            "(faces and hair partings are asymmetric), the text encoder at 5e-5 (half the default rate; Advanced > "
            "text_encoder_lr), min-SNR 5 and a "
            "cosine schedule for a stable end of training.",
            {
                **_DEFAULTS,
                "max_train_steps": None,
                "max_train_epochs": 10,
                "text_encoder_lr": 5e-5,
                "shuffle_caption": True,
                "keep_tokens": 1,
                "flip_aug": False,
                "min_snr_gamma": 5.0,
                "lr_scheduler": "cosine",
            },
        ),
        Preset(
            "SD1.5 style",
            "An art style on SD1.5 at 512 px (100+ varied images): flips double the data (a style is symmetric), "
            "10 % tag dropout so the style does not hide in single tags, shuffled captions with the trigger first, "
            "min-SNR 5, cosine schedule, 10 epochs.",
            {
                **_DEFAULTS,
                "max_train_steps": None,
                "max_train_epochs": 10,
                "shuffle_caption": True,
                "keep_tokens": 1,
                "flip_aug": True,
                "caption_tag_dropout_rate": 0.1,
                "min_snr_gamma": 5.0,
                "lr_scheduler": "cosine",
            },
        ),
        Preset(
            "SDXL low VRAM",
            "SDXL at 1024 px on a GPU with 8-12 GB: batch 1, UNet only (SDXL's two text encoders cost memory and "
            "rarely need training), gradient checkpointing, fp16 autocast, rank 16 / alpha 8 (half the file size, "
            "same alpha / rank ratio), latents cached on disk, buckets from 512 to 2048 px.",
            {
                **_DEFAULTS,
                "network_dim": 16,
                "network_alpha": 8.0,
                "train_batch_size": 1,
                "resolution": 1024,
                "min_bucket_reso": 512,
                "max_bucket_reso": 2048,
                "network_train_unet_only": True,
                "gradient_checkpointing": True,
                "mixed_precision": "fp16",
                "cache_latents": "disk",
                "min_snr_gamma": 5.0,
            },
        ),
    )
}

DEFAULT_PRESET = "Defaults"


def preset_names() -> list[str]:
    """The preset names in dropdown order (``"Defaults"`` first)."""
    return list(PRESETS)


def preset_values(name: str) -> dict[str, Any]:
    """A copy of one preset's ``{field: value}``.

    Raises:
        ConfigError: unknown preset; the message lists the known ones.
    """
    try:
        return dict(PRESETS[name].values)
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def apply_preset(config: dict[str, Any], name: str) -> dict[str, Any]:
    """``config`` (a dict of TrainConfig keys) with the preset's keys overwritten; the input is not changed.

    Raises:
        ConfigError: unknown preset.
    """
    return {**config, **preset_values(name)}
