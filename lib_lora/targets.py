"""Data only: which modules get a LoRA, per model family, and their Kohya key prefixes.

Class names are those of the module trees the WebUI runs: ``ldm``/``sgm`` for the UNet (``SpatialTransformer`` is the
LDM twin of diffusers' ``Transformer2DModel``, ``ResBlock``/``Downsample``/``Upsample`` of ``ResnetBlock2D``/
``Downsample2D``/``Upsample2D``), HF ``transformers`` for CLIP text models and ``open_clip`` for OpenCLIP text towers.
The lists mirror sd-scripts ``LoRANetwork.UNET_TARGET_REPLACE_MODULE``, ``..._CONV2D_3X3`` and
``TEXT_ENCODER_TARGET_REPLACE_MODULE``.
"""

from __future__ import annotations

# Inside these blocks every nn.Linear / nn.Conv2d child is a target (proj_in/out, attn1/attn2 to_q/k/v/out.0,
# ff.net.0.proj, ff.net.2).
UNET_TARGET_CLASSES: tuple[str, ...] = ("SpatialTransformer",)

# Added only when conv_dim is set ("LoRA-C3Lier"): 3x3 convs get conv_dim, their Linear/1x1 children network_dim.
UNET_CONV_TARGET_CLASSES: tuple[str, ...] = ("ResBlock", "Downsample", "Upsample")

# HF CLIP text model (SD1, SDXL TE1): self_attn q/k/v/out_proj and mlp fc1/fc2.
HF_CLIP_TARGET_CLASSES: tuple[str, ...] = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")

# OpenCLIP text tower (SD2, SDXL TE2): the fused nn.MultiheadAttention "attn" and mlp c_fc / c_proj of each
# ResidualAttentionBlock; Kohya names them as the HF-converted model (q/k/v/out_proj, fc1/fc2).
OPENCLIP_BLOCK_CLASS = "ResidualAttentionBlock"
OPENCLIP_CHILD_TO_HF: dict[str, str] = {
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# The fused attention becomes four Kohya modules over the rows of in_proj_weight (q, k, v) and out_proj.
MHA_PARTS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

# Kohya key prefixes (sd-scripts LoRANetwork.LORA_PREFIX_*).
PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"
TE_PREFIXES: tuple[str, ...] = (PREFIX_TE, PREFIX_TE1, PREFIX_TE2)

# How each family names UNet modules in Kohya files: SD1/SD2 files use diffusers names (sd-scripts trains on
# original_unet.py, a copy of diffusers' tree); SDXL files use the sgm/LDM names themselves.
UNET_NAMING: dict[str, str] = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "ldm"}

# Text encoder prefixes per family, in the order the model lists its encoders.
TE_PREFIXES_BY_ARCH: dict[str, tuple[str, ...]] = {
    "sd1": (PREFIX_TE,),
    "sd2": (PREFIX_TE,),
    "sdxl": (PREFIX_TE1, PREFIX_TE2),
}

# Module counts sd-scripts creates at full size without conv_dim (docs: kohya-format-and-trainer.md §1.1).
FULL_SIZE_COUNTS: dict[str, dict[str, int]] = {
    "sd1": {"unet": 192, "te": 72},
    "sd2": {"unet": 192, "te": 138},
    "sdxl": {"unet": 722, "te1": 72, "te2": 192},
}
