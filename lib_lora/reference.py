"""Full-size module trees on the meta device: what sd-scripts would name, without any weights.

Used by ``python -m lib_lora keys`` and ``inspect`` (to tell which keys of a file match a real model) and by the
tests of the full-size module counts. Building SD1.5 or SDXL on the meta device takes seconds and no memory.
"""

from __future__ import annotations

from functools import lru_cache

from .errors import ConfigError
from .model_api import ARCHITECTURES, TextEncoderRoot
from .network import Target, find_targets
from .targets import TE_PREFIXES_BY_ARCH


def meta_model_roots(arch: str):
    """Builds the full-size UNet and text encoders of ``arch`` on the meta device.

    Returns:
        (unet, [TextEncoderRoot, ...]) with the WebUI's classes: ldm UNetModel, HF CLIPTextModel (SD1, SDXL TE1),
        open_clip CLIP text (SD2 with 23 of 24 layers used, SDXL TE2 with all 32).

    Raises:
        ConfigError: unknown arch.
    """
    from .model.build import build_hf_clip_text, build_openclip_text, build_unet
    from .model.configs import get_model_config

    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    cfg = get_model_config(arch)
    unet = build_unet(cfg["unet"], device="meta")
    prefixes = TE_PREFIXES_BY_ARCH[arch]
    if arch == "sd1":
        roots = [TextEncoderRoot(build_hf_clip_text(cfg["text"], device="meta"), prefixes[0])]
    elif arch == "sd2":
        layers = cfg["text"]["text_cfg"]["layers"]
        roots = [TextEncoderRoot(build_openclip_text(cfg["text"], device="meta"), prefixes[0], layers - 1)]
    else:
        te1_cfg, te2_cfg = cfg["text"]
        roots = [TextEncoderRoot(build_hf_clip_text(te1_cfg, device="meta"), prefixes[0]),
                 TextEncoderRoot(build_openclip_text(te2_cfg, device="meta"), prefixes[1])]
    return unet, roots


@lru_cache(maxsize=8)
def full_size_targets(arch: str, include_conv: bool) -> tuple[Target, ...]:
    """All LoRA targets of the full-size ``arch`` model (cached; the layers live on the meta device)."""
    unet, roots = meta_model_roots(arch)
    return tuple(find_targets(unet, roots, arch, include_conv))


def kohya_module_names(arch: str, conv_dim: int | None = None) -> dict[str, list[str]]:
    """The Kohya module names a new network gets on the full-size ``arch`` model, grouped by part.

    Args:
        arch: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        conv_dim: when set (> 0), the ResBlock/Downsample/Upsample layers are included (LoRA-C3Lier).

    Returns:
        ``{"unet": [...], "te": [...]}`` for SD1/SD2, ``{"unet": [...], "te1": [...], "te2": [...]}`` for SDXL,
        in module order. Counts without conv: SD1 192 + 72, SD2 192 + 138, SDXL 722 + 72 + 192 (as sd-scripts).
    """
    found = full_size_targets(arch, bool(conv_dim))
    out: dict[str, list[str]] = {"unet": []}
    for prefix in TE_PREFIXES_BY_ARCH[arch]:
        out[prefix.removeprefix("lora_")] = []
    for t in found:
        if t.part == "unet":
            out["unet"].append(t.name)
        else:
            out[t.name.split("_text_model_")[0].removeprefix("lora_")].append(t.name)
    return out
