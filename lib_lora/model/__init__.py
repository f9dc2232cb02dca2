"""Headless Stable Diffusion models for lib_lora: the ldm/HF/open_clip module trees the WebUI runs, built from
config tables (:mod:`.configs`, :mod:`.build`), loaded from LDM single-file checkpoints or embedded tiny models
(:mod:`.headless`), with the CLIP tokenizer shipped as data (:mod:`.tokenizer`) and a DDIM sampler (:mod:`.sampler`).

Importing this package has no side effects: ldm, open_clip and transformers are imported when first used.
"""

from .build import build_hf_clip_text, build_openclip_text, build_unet, build_vae
from .configs import EMBEDDED_MODELS, MODEL_CONFIGS, get_model_config
from .headless import HeadlessModel, ModelLoadError, load_model, save_checkpoint
from .sampler import latents_to_pil, sample, txt2img
from .tokenizer import get_clip_tokenizer, tokenize_prompts

__all__ = [
    "EMBEDDED_MODELS", "MODEL_CONFIGS", "HeadlessModel", "ModelLoadError", "build_hf_clip_text",
    "build_openclip_text", "build_unet", "build_vae", "get_clip_tokenizer", "get_model_config", "latents_to_pil",
    "load_model", "sample", "save_checkpoint", "tokenize_prompts", "txt2img",
]
