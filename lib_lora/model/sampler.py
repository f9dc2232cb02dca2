"""A small DDIM sampler (eta 0) with classifier-free guidance over any :class:`lib_lora.model_api.DiffusionModel`.

Used for previews and tests without the WebUI. Conventions follow ldm's ``DDIMSampler`` (``ldm/models/diffusion/
ddim.py``): "uniform" timesteps ``t_i = i * (1000 // steps) + 1`` (exactly ``steps`` of them), the previous alpha
of the last step is ``alphas_cumprod[0]``; guidance ``uncond + scale * (cond - uncond)`` as in the WebUI's CFG
denoiser; v-prediction converted with ``alphas_cumprod`` as ldm's ``predict_eps_from_z_and_v``.
Initial noise is drawn on the CPU (the WebUI's "CPU" RNG source), so a seed gives the same image on every device.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..model_api import Conditioning, DiffusionModel


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Ascending DDIM timesteps: ldm ``make_ddim_timesteps("uniform")`` = ``range(0, T, T // steps) + 1``, cut
    to exactly ``steps`` entries.

    Raises:
        lib_lora.errors.ConfigError: steps outside 1..num_train_timesteps.
    """
    if not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"steps {steps!r} must be an int in 1..{num_train_timesteps}")
    c = num_train_timesteps // steps
    return [min(i * c + 1, num_train_timesteps - 1) for i in range(steps)]


def _as_list(x: str | list[str], n: int | None, what: str) -> list[str]:
    items = [x] if isinstance(x, str) else list(x)
    if n is not None and len(items) == 1 and n > 1:
        items = items * n
    if n is not None and len(items) != n:
        raise ConfigError(f"{what}: {len(items)} entries for a batch of {n}")
    return items


@torch.no_grad()
def sample(model: DiffusionModel, prompt: str | list[str], negative_prompt: str | list[str] = "", steps: int = 20,
           cfg_scale: float = 7.0, width: int = 512, height: int = 512, seed: int = 0,
           generator: torch.Generator | None = None, clip_skip: int = 1) -> torch.Tensor:
    """Text to latents with DDIM (eta 0) and classifier-free guidance.

    Args:
        model: any DiffusionModel (SD1/SD2; eps or v prediction).
        prompt: one prompt or B prompts.
        negative_prompt: the unconditional prompt (one, or one per prompt); "" as in the WebUI.
        steps: number of DDIM steps (model evaluations, x2 batch when cfg_scale != 1).
        cfg_scale: guidance scale; 1 skips the unconditional pass.
        width, height: image size in pixels, multiples of 8 x 2^(UNet levels - 1) (64 for SD1/SD2); latents are
            width/8 x height/8.
        seed: seed of a CPU generator for the initial noise; ignored when ``generator`` is given.
        generator: RNG for the initial noise (CPU or the model's device).
        clip_skip: passed to ``encode_prompts``.

    Returns:
        (B, 4, height/8, width/8) fp32 scaled latents on the model's device (decode with
        ``model.decode_latents`` or :func:`latents_to_pil`). Same seed and inputs -> identical output.

    Raises:
        lib_lora.errors.ConfigError: size not a multiple of 64 (SD1/SD2), bad steps, prompt/negative count mismatch.
    """
    mult = 8 * 2 ** (len(getattr(model.unet, "channel_mult", (1, 2, 4, 4))) - 1)
    if width % mult or height % mult or width <= 0 or height <= 0:
        raise ConfigError(f"width/height must be positive multiples of {mult} pixels (8 x the UNet's total "
                          f"downsampling), got {width}x{height}")
    prompts = _as_list(prompt, None, "prompt")
    negatives = _as_list(negative_prompt, len(prompts), "negative_prompt")
    b = len(prompts)
    use_cfg = float(cfg_scale) != 1.0
    texts = negatives + prompts if use_cfg else prompts
    ctx = model.encode_prompts(texts, clip_skip=clip_skip).crossattn

    ac = model.alphas_cumprod.to(device=model.device, dtype=torch.float64)
    ts = ddim_timesteps(steps, ac.shape[0])
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(int(seed))
    x = torch.randn((b, 4, height // 8, width // 8), generator=generator, device=generator.device)
    x = x.to(device=model.device, dtype=torch.float64)
    v_pred = model.prediction_type == "v_prediction"

    for i in reversed(range(len(ts))):
        a_t = ac[ts[i]]
        a_prev = ac[ts[i - 1]] if i > 0 else ac[0]
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.full((x_in.shape[0],), ts[i], device=model.device, dtype=torch.long)
        out = model.unet_forward(x_in.to(torch.float32), t_in, Conditioning(ctx)).to(torch.float64)
        if use_cfg:
            o_u, o_c = out.chunk(2)
            out = o_u + cfg_scale * (o_c - o_u)
        if v_pred:
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.to(torch.float32)


def latents_to_pil(model: DiffusionModel, latents: torch.Tensor) -> list:
    """Decodes (B, 4, h, w) scaled latents to B RGB ``PIL.Image`` of 8w x 8h pixels (pixels in [-1, 1] mapped to
    0..255 and rounded, as the WebUI saves images)."""
    from PIL import Image

    pixels = model.decode_latents(latents).float().clamp(-1, 1)
    arr = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def txt2img(model: DiffusionModel, prompt: str | list[str], **kwargs) -> list:
    """:func:`sample` then :func:`latents_to_pil`; ``kwargs`` are :func:`sample`'s."""
    return latents_to_pil(model, sample(model, prompt, **kwargs))
