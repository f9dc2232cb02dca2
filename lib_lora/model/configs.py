"""Architecture tables: ldm ``UNetModel`` kwargs, VAE ``ddconfig``s and text-encoder configs as plain dicts.

Sources of the numbers:

* SD1: ``configs/stable-diffusion/v1-inference.yaml`` (CompVis/ldm), the config the WebUI ships.
* SD2: ``configs/stable-diffusion/v2-inference(-v).yaml`` (Stability-AI/stablediffusion).
* SDXL: ``configs/inference/sd_xl_base.yaml`` (Stability-AI/generative-models, ``sgm``); the sgm-only keys
  (per-level ``transformer_depth``, ``transformer_depth_middle``, ``adm_in_channels``) are kept in the table and
  handled by :func:`lib_lora.model.build.build_unet`, because the ldm ``UNetModel`` takes one int depth.
* HF CLIP-L: ``openai/clip-vit-large-patch14`` ``config.json`` (text part). OpenCLIP ViT-H-14 and ViT-bigG-14:
  open_clip's ``model_configs/*.json`` (text part).
* ``tiny-sd1``: exactly the architecture of the shared WebUI test checkpoint ``webui-tiny-sd1`` (its yaml and its
  ``tiny-sd1-clip-text/config.json``). ``tiny-sd2``: the same UNet block layout with SD2's linear projections and
  per-head width, and a 3-layer OpenCLIP text tower run to the penultimate layer.

Every value is a plain ``dict``/``list``/``int``; callers copy before changing (:func:`get_model_config` does).
"""

from __future__ import annotations

import copy

# --- UNets (ldm.modules.diffusionmodules.openaimodel.UNetModel kwargs) ------------------------------------------

UNET_SD1 = {
    "image_size": 32,  # unused by the model
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": False,
    "legacy": False,
}

UNET_SD2 = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 1024,
    "use_checkpoint": False,
    "legacy": False,
}

# sgm names: transformer_depth per level (0 = no attention at level 0), transformer_depth_middle, adm_in_channels
# (the ``y`` vector: pooled bigG text 1280 + 6 size/crop Fourier embeddings x 256). build_unet() builds the ldm
# UNetModel at depth 10 and truncates level 1 to 2 blocks; label_emb (adm) is not built (no LoRA targets it).
UNET_SDXL = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 2, 10],
    "transformer_depth_middle": 10,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "use_checkpoint": False,
    "legacy": False,
}

UNET_TINY_SD1 = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2, 2],
    "num_heads": 2,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 32,
    "use_checkpoint": False,
    "legacy": False,
}

UNET_TINY_SD2 = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2, 2],
    "num_head_channels": 16,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 32,
    "use_checkpoint": False,
    "legacy": False,
}

# --- VAEs (ldm.models.autoencoder.AutoencoderKL: embed_dim + ddconfig) --------------------------------------------

VAE_SD = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

VAE_TINY = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

# --- Text encoders -----------------------------------------------------------------------------------------------

# transformers.CLIPTextConfig kwargs (openai/clip-vit-large-patch14, text part).
HF_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# The shared webui-tiny-sd1 text encoder (tiny-sd1-clip-text/config.json).
HF_CLIP_TINY = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

# open_clip.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu) arguments; text_cfg = open_clip.CLIPTextCfg fields.
# The vision tower is deleted after construction (as ldm's FrozenOpenCLIPEmbedder does), so build.py replaces
# vision_cfg by a minimal one.
OPENCLIP_VIT_H = {
    "embed_dim": 1024,
    "quick_gelu": False,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

OPENCLIP_VIT_BIGG = {
    "embed_dim": 1280,
    "quick_gelu": False,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32},
}

OPENCLIP_TINY = {
    "embed_dim": 32,
    "quick_gelu": False,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}

# --- Whole models ------------------------------------------------------------------------------------------------

# DDPM schedule of LatentDiffusion (ldm ``register_schedule``: "linear" = scaled linear, sqrt-space).
SCHEDULE_SD = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}

MODEL_CONFIGS: dict[str, dict] = {
    "sd1": {
        "arch": "sd1", "unet": UNET_SD1, "vae": VAE_SD, "text_kind": "hf_clip", "text": HF_CLIP_L,
        "prediction_type": "epsilon", "scale_factor": 0.18215, "schedule": SCHEDULE_SD,
    },
    "sd2": {
        "arch": "sd2", "unet": UNET_SD2, "vae": VAE_SD, "text_kind": "openclip", "text": OPENCLIP_VIT_H,
        "prediction_type": "epsilon", "scale_factor": 0.18215, "schedule": SCHEDULE_SD,
    },
    "sdxl": {
        "arch": "sdxl", "unet": UNET_SDXL, "vae": VAE_SD, "text_kind": "sdxl", "text": [HF_CLIP_L, OPENCLIP_VIT_BIGG],
        "prediction_type": "epsilon", "scale_factor": 0.13025, "schedule": SCHEDULE_SD,
    },
    "tiny-sd1": {
        "arch": "sd1", "unet": UNET_TINY_SD1, "vae": VAE_TINY, "text_kind": "hf_clip", "text": HF_CLIP_TINY,
        "prediction_type": "epsilon", "scale_factor": 0.18215, "schedule": SCHEDULE_SD,
    },
    "tiny-sd2": {
        "arch": "sd2", "unet": UNET_TINY_SD2, "vae": VAE_TINY, "text_kind": "openclip", "text": OPENCLIP_TINY,
        "prediction_type": "v_prediction", "scale_factor": 0.18215, "schedule": SCHEDULE_SD,
    },
}

#: Names :func:`lib_lora.model.headless.load_model` builds without any file.
EMBEDDED_MODELS = ("tiny-sd1", "tiny-sd2")


def get_model_config(name: str) -> dict:
    """Returns a deep copy of ``MODEL_CONFIGS[name]``.

    Args:
        name: one of ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"tiny-sd1"``, ``"tiny-sd2"``.

    Raises:
        lib_lora.errors.ConfigError: unknown name (the message lists the known ones).
    """
    from ..errors import ConfigError

    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model config {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    return copy.deepcopy(MODEL_CONFIGS[name])
