"""Stand-in for ``modules/processing.py``: ``StableDiffusionProcessing`` (+ ``Txt2Img``/``Img2Img``) with the fields
scripts read, ``Processed`` with the real constructor signature, ``create_infotext``, ``fix_seed`` and
``process_images``.

``process_images`` does NOT run a diffusion model: it draws a deterministic 8-bit RGB image per seed from

- the prompt with its extra-network tags removed, the negative prompt, the seed, width, height, steps and CFG
  (a smooth random background), and
- each ``<lora:name:te:unet>`` tag, resolved like ``ExtraNetworkLora.activate`` (te = positional[1] or 1.0, ``te=``;
  unet = positional[2] or te, ``unet=``), whose file is found by stem under ``--lora-dir`` (recursively, like
  ``networks.list_available_networks``): a pattern seeded from the file's bytes, blended in with strength
  ``0.6 * min(1, |unet|)`` and a colour shift of ``40 * te``.

So the same prompt, seed and LoRA give the same image; another weight, file or seed gives another one. As in the
WebUI, a LoRA whose file is missing is skipped (generation goes on without it; its name is added to
:data:`networks_not_found`). Rendering the tiny SD1 model per cell would cost seconds per cell on a shared CPU;
the Script's logic does not depend on the pixels. Samples are saved with ``images.save_image`` like the WebUI
(``opts.samples_save`` and not ``p.do_not_save_samples``). ``shared.state.interrupted`` before a batch gives no
image, as in the WebUI.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from modules import extra_networks, images, shared

#: every processing object process_images ran on (tests read it; not in the real module).
process_calls: list = []
#: names of LoRA tags whose file was not found (the real WebUI reports "Networks not found: ...").
networks_not_found: list = []


@dataclass(repr=False)
class StableDiffusionProcessing:
    """Mirrors ``processing.StableDiffusionProcessing`` (dataclass; a subset of its fields, same names and
    defaults)."""

    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    eta: float = None
    denoising_strength: float = None
    ddim_discretize: str = None
    s_min_uncond: float = None
    s_churn: float = None
    s_tmax: float = None
    s_tmin: float = None
    s_noise: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    token_merging_ratio = 0
    token_merging_ratio_hr = 0
    disable_extra_networks: bool = False
    comments: dict = None

    scripts_value: Any = field(default=None, init=False)
    script_args_value: list = field(default=None, init=False)
    is_using_inpainting_conditioning: bool = field(default=False, init=False)
    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    iteration: int = field(default=0, init=False)
    main_prompt: str = field(default=None, init=False)
    main_negative_prompt: str = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    user: str = field(default=None, init=False)
    sd_model_name: str = field(default=None, init=False)
    sd_model_hash: str = field(default=None, init=False)
    sd_vae_name: str = field(default=None, init=False)
    sd_vae_hash: str = field(default=None, init=False)
    is_api: bool = field(default=False, init=False)

    def __post_init__(self):
        self.comments = {}
        if self.styles is None:
            self.styles = []
        self.sampler_noise_scheduler_override = None
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.scripts = None
        self.script_args = []

    def get_token_merging_ratio(self, for_hr=False):
        return self.token_merging_ratio


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """Mirrors ``processing.StableDiffusionProcessingTxt2Img`` (hires fields only as data)."""

    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """Mirrors ``processing.StableDiffusionProcessingImg2Img`` (the init images are not used here)."""

    init_images: list = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float = None
    mask: Any = None


class Processed:
    """Mirrors ``processing.Processed`` (same constructor signature and the attributes scripts read)."""

    def __init__(self, p: StableDiffusionProcessing, images_list, seed=-1, info="", subseed=None, all_prompts=None,
                 all_negative_prompts=None, all_seeds=None, all_subseeds=None, index_of_first_image=0,
                 infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.subseed_strength = p.subseed_strength
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.width = p.width
        self.height = p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.image_cfg_scale = getattr(p, 'image_cfg_scale', None)
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.restore_faces = p.restore_faces
        self.sd_model_name = p.sd_model_name
        self.sd_model_hash = p.sd_model_hash
        self.seed_resize_from_w = p.seed_resize_from_w
        self.seed_resize_from_h = p.seed_resize_from_h
        self.denoising_strength = getattr(p, 'denoising_strength', None)
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.styles = p.styles
        self.job_timestamp = getattr(shared.state, "job_timestamp", "0")
        self.clip_skip = shared.opts.CLIP_stop_at_last_layers
        self.eta = p.eta
        self.prompt = self.prompt if not isinstance(self.prompt, list) else self.prompt[0]
        self.negative_prompt = self.negative_prompt if not isinstance(self.negative_prompt, list) \
            else self.negative_prompt[0]
        self.seed = int(self.seed if not isinstance(self.seed, list) else self.seed[0]) if self.seed is not None \
            else -1
        self.subseed = int(self.subseed if not isinstance(self.subseed, list) else self.subseed[0]) \
            if self.subseed is not None else -1
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info] * len(images_list)


def get_fixed_seed(seed):
    """Mirrors ``processing.get_fixed_seed``: -1 / "" / None -> a random seed."""
    if seed == '' or seed is None:
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except Exception:
            seed = -1
    if seed == -1:
        return int(random.randrange(4294967294))
    return seed


def fix_seed(p):
    """Mirrors ``processing.fix_seed``."""
    p.seed = get_fixed_seed(p.seed)
    p.subseed = get_fixed_seed(p.subseed)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """Mirrors ``processing.create_infotext``: ``prompt\\nNegative prompt: ...\\nSteps: .., Sampler: .., ...,
    <extra_generation_params>`` (a subset of the built-in fields; list values are indexed, callables called)."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash,
        "Model": p.sd_model_name,
        **p.extra_generation_params,
    }
    for key, value in generation_params.items():
        if isinstance(value, list):
            generation_params[key] = value[index]
        elif callable(value):
            generation_params[key] = value(**locals())
    text = ", ".join([k if k == v else f'{k}: {_quote(v)}' for k, v in generation_params.items() if v is not None])
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_prompt_text}\n{text}".strip()


def _quote(text):
    """Mirrors ``infotext_utils.quote``: JSON-quotes a value holding ``,``, ``:`` or ``"``."""
    import json

    text = str(text)
    if ',' not in text and '\n' not in text and ':' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _lora_files():
    out = {}
    root = getattr(shared.cmd_opts, "lora_dir", None)
    if root and os.path.isdir(root):
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() in (".safetensors", ".pt", ".ckpt") and stem not in out:
                    out[stem] = os.path.join(folder, f)
    return out


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth(rng, w, h):
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)


def _render(p, prompt, negative, seed, lora_data, files):
    text, _ = extra_networks.parse_prompt(prompt)
    neg, _ = extra_networks.parse_prompt(negative)
    img = _smooth(_rng(text, neg, seed, p.width, p.height, p.steps, float(p.cfg_scale)), p.width, p.height)
    for params in lora_data:
        name = params.positional[0]
        te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
        te = float(params.named.get("te", te))
        unet = float(params.positional[2]) if len(params.positional) > 2 else te
        unet = float(params.named.get("unet", unet))
        path = files.get(name)
        if path is None:
            networks_not_found.append(name)
            continue
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
        pattern = _smooth(_rng(content, seed), p.width, p.height)
        a = 0.6 * min(1.0, abs(unet))
        img = (1 - a) * img + a * pattern + 40.0 * te
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def process_images(p: StableDiffusionProcessing) -> Processed:
    """Mirrors ``processing.process_images`` (see the module docstring for how images are made here)."""
    process_calls.append(p)
    fix_seed(p)
    n = p.n_iter * p.batch_size
    p.all_prompts = [p.prompt] * n
    p.all_negative_prompts = [p.negative_prompt] * n
    p.all_seeds = [int(p.seed) + i for i in range(n)]
    p.all_subseeds = [int(p.subseed) + i for i in range(n)]
    _, p.extra_network_data = extra_networks.parse_prompts(p.all_prompts)
    lora_data = [] if p.disable_extra_networks else list(p.extra_network_data.get("lora", [])) + \
        list(p.extra_network_data.get("lyco", []))
    files = _lora_files()
    output, infotexts = [], []
    for i in range(n):
        if shared.state.interrupted or getattr(shared.state, "stopping_generation", False):
            break
        image = _render(p, p.all_prompts[i], p.all_negative_prompts[i], p.all_seeds[i], lora_data, files)
        info = create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=i)
        if images._opt("samples_save") and not p.do_not_save_samples and p.outpath_samples:
            images.save_image(image, p.outpath_samples, "", p.all_seeds[i], p.all_prompts[i],
                              images._opt("samples_format"), info=info, p=p)
        output.append(image)
        infotexts.append(info)
        shared.state.job_no = getattr(shared.state, "job_no", 0) + 1
    return Processed(p, output, p.all_seeds[0], infotexts[0] if infotexts else "", subseed=p.all_subseeds[0],
                     infotexts=infotexts)
