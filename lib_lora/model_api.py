"""What the trainer and the network need from a Stable Diffusion model.

Two implementations exist: the headless one in :mod:`lib_lora.model` (LDM single-file checkpoints and the embedded
tiny models, built with the real ``ldm`` classes) and the WebUI adapter in ``scripts/`` (wrapping
``shared.sd_model``). Tests may add their own. The module objects exposed here are the same objects the WebUI runs,
so the network injected into them is the one the WebUI would see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

ARCHITECTURES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Conditioning:
    """Text conditioning for one batch.

    Attributes:
        crossattn: (B, T, C) context for the UNet's cross-attention; T = 77 x number of 75-token chunks,
            C = 768 (SD1), 1024 (SD2), 2048 (SDXL).
        vector: (B, 2816) SDXL ``y`` input (pooled text embedding + size/crop embeddings); None for SD1/SD2.
    """

    crossattn: torch.Tensor
    vector: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> Conditioning:
        """Returns a copy moved to ``device`` / cast to ``dtype``."""
        vec = self.vector.to(device=device, dtype=dtype) if self.vector is not None else None
        return Conditioning(self.crossattn.to(device=device, dtype=dtype), vec)


@dataclass
class TextEncoderRoot:
    """One text encoder as the network targets it.

    Attributes:
        module: the root module walked for targets: an HF ``CLIPTextModel`` (SD1, SDXL TE1) or an open_clip
            ``CLIP``/``TextTransformer`` holding ``transformer.resblocks`` (SD2, SDXL TE2).
        prefix: Kohya key prefix, ``"lora_te"`` (SD1/SD2), ``"lora_te1"`` or ``"lora_te2"`` (SDXL).
        layers_used: number of leading transformer layers that the model actually runs; layers past it get no LoRA
            (SD2 runs OpenCLIP ViT-H to the penultimate layer, so 23 of 24; sd-scripts drops the last one too).
            None means all layers.
    """

    module: nn.Module
    prefix: str
    layers_used: int | None = None


@runtime_checkable
class DiffusionModel(Protocol):
    """The protocol the trainer talks to.

    Attributes:
        arch: one of :data:`ARCHITECTURES`.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        unet: the ``ldm``/``sgm`` ``UNetModel`` (the WebUI's ``sd_model.model.diffusion_model``).
        text_encoders: the text encoder roots, in Kohya prefix order.
        alphas_cumprod: (1000,) fp32 tensor, the DDPM schedule the model was trained with.
        latent_scale_factor: 0.18215 (SD1/SD2) or 0.13025 (SDXL).
        device, dtype: where and in what dtype the frozen base weights live.
        name: the base model's file name (for ``ss_sd_model_name``).
    """

    arch: str
    prediction_type: str
    unet: nn.Module
    text_encoders: list[TextEncoderRoot]
    alphas_cumprod: torch.Tensor
    latent_scale_factor: float
    device: torch.device
    dtype: torch.dtype
    name: str

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encodes (B, 3, H, W) pixels in [-1, 1] to (B, 4, H/8, W/8) latents already multiplied by the scale
        factor (a sample of the posterior, as sd-scripts caches). H and W are multiples of 8."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_images`: scaled latents to (B, 3, 8h, 8w) pixels in [-1, 1]."""
        ...

    def encode_prompts(self, prompts: list[str], clip_skip: int = 1,
                       sizes: list[tuple[int, int, int, int, int, int]] | None = None) -> Conditioning:
        """Text to conditioning. Gradients flow into LoRA modules on the text encoders when grad mode is on.

        Args:
            prompts: B strings.
            clip_skip: 1 = last layer; n = hidden_states[-n] then the final LayerNorm (SD1). SD2/SDXL follow
                their fixed layers, as sd-scripts does.
            sizes: SDXL only: per sample (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels.
        """
        ...

    def unet_forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Model output (noise or v prediction) for (B, 4, h, w) latents at integer (B,) timesteps in [0, 1000)."""
        ...
