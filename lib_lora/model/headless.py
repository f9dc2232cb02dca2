"""A Stable Diffusion model without the WebUI: :class:`HeadlessModel` implements
:class:`lib_lora.model_api.DiffusionModel` with the same ldm / HF / open_clip module classes the WebUI runs.

Sources: LDM single-file checkpoint layout and yaml (CompVis ``LatentDiffusion``), the WebUI's checkpoint loading
(``modules/sd_models.py``: ``<stem>.yaml`` beside the checkpoint, ``repair_config``), ldm's text encoders
(``FrozenCLIPEmbedder``, ``FrozenOpenCLIPEmbedder`` layer "penultimate") and the WebUI's prompt chunking
(``sd_hijack_clip``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from ..model_api import Conditioning, TextEncoderRoot
from . import build, configs
from .attention import use_sdpa
from .tokenizer import tokenize_prompts

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
# Keys under the model prefixes that are skipped on load (never reported): HF position_ids (often stored as
# float or broken; rebuilt), the VAE's training loss (LPIPS/discriminator in some training checkpoints).
_IGNORED = ("cond_stage_model.transformer.text_model.embeddings.position_ids", "first_stage_model.loss.")
_OPTIONAL_OPENCLIP = ("text_projection", "logit_scale")  # not used at penultimate; filled if absent


class ModelLoadError(FormatError):
    """A checkpoint cannot be read or does not match the architecture it was taken for (names the keys)."""


def scaled_linear_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012,
                                 timesteps: int = 1000) -> torch.Tensor:
    """ldm ``make_beta_schedule("linear")`` (the "scaled linear" schedule of diffusers): betas =
    linspace(sqrt(start), sqrt(end), T)^2 in float64, alphas_cumprod = cumprod(1 - betas), returned as (T,) fp32."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class HeadlessModel:
    """An SD1/SD2 model built from ldm/HF/open_clip classes (see :class:`lib_lora.model_api.DiffusionModel`).

    Attributes (besides the protocol's ``arch``, ``prediction_type``, ``unet``, ``text_encoders``,
    ``alphas_cumprod``, ``latent_scale_factor``, ``device``, ``dtype``, ``name``):
        vae: the :class:`lib_lora.model.build.AutoencoderKL` (WebUI ``sd_model.first_stage_model``).
        text_model: the text encoder module (HF ``CLIPTextModel`` for SD1, open_clip ``CLIP`` without ``visual``
            for SD2); the same object as ``text_encoders[0].module``.
        text_kind: ``"hf_clip"`` or ``"openclip"``.
        config: ``{"unet", "vae", "text", "text_kind", "scale_factor", "schedule"}`` the modules were built from.
        vae_dtype: dtype the VAE runs in; starts as ``dtype`` and becomes fp32 for good after an fp16/bf16 VAE
            produced non-finite values (the WebUI's "automatically revert VAE to 32-bit floats").
        tokenizer_cache: cache folder for the CLIP tokenizer files (None: default, see
            :mod:`lib_lora.model.tokenizer`).

    All base weights are frozen (``requires_grad=False``) and in eval mode, as ldm's ``freeze()`` leaves them.
    """

    def __init__(self, *, arch: str, prediction_type: str, unet: nn.Module, vae: nn.Module, text_model: nn.Module,
                 text_kind: str, alphas_cumprod: torch.Tensor, config: dict, name: str,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 tokenizer_cache: str | os.PathLike | None = None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {prediction_type!r}; allowed: 'epsilon', 'v_prediction'")
        self.arch = arch
        self.prediction_type = prediction_type
        self.unet, self.vae, self.text_model = unet, vae, text_model
        self.text_kind = text_kind
        self.config = config
        self.latent_scale_factor = float(config["scale_factor"])
        self.name = name
        self.tokenizer_cache = tokenizer_cache
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32).cpu()
        for m in (unet, vae, text_model):
            m.requires_grad_(False)
            m.eval()
        use_sdpa(unet)  # the WebUI's default "sdp" attention; ldm's einsum attention is about 2x slower
        # The base key set, recorded before any network is attached (ldm_state_dict writes only these).
        self._keys = {"unet": list(unet.state_dict()), "vae": list(vae.state_dict()),
                      "text": list(text_model.state_dict())}
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.vae_dtype = torch.float32
        self.to(device, dtype)

    # -- placement -------------------------------------------------------------------------------------------------

    def to(self, device=None, dtype: torch.dtype | None = None) -> HeadlessModel:
        """Moves/casts the UNet, VAE and text encoder in place; ``alphas_cumprod`` stays fp32 (as in the WebUI).
        GroupNorm/LayerNorm affines stay fp32 (as open_clip's ``LayerNormFp32`` and the WebUI's upcast do; it also
        lets half models run on the CPU). Sets the ldm ``UNetModel.dtype`` attribute (what ldm's ``use_fp16``
        sets) to ``dtype``. Returns self."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"dtype {dtype}; allowed: torch.float32, torch.float16, torch.bfloat16")
        for m in (self.unet, self.text_model, self.vae):
            m.to(device=device, dtype=dtype)
            _norms_to_fp32(m)
        self.unet.dtype = dtype
        self.device, self.dtype, self.vae_dtype = device, dtype, dtype
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def _autocast(self, dtype: torch.dtype | None = None):
        dtype = dtype or self.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # -- protocol --------------------------------------------------------------------------------------------------

    @property
    def text_encoders(self) -> list[TextEncoderRoot]:
        """SD1: ``[TextEncoderRoot(CLIPTextModel, "lora_te")]``; SD2: ``[TextEncoderRoot(open_clip CLIP, "lora_te",
        layers_used=n_layers - 1)]`` (the penultimate layer is the last one run)."""
        if self.text_kind == "openclip":
            n = len(self.text_model.transformer.resblocks)
            return [TextEncoderRoot(module=self.text_model, prefix="lora_te", layers_used=n - 1)]
        return [TextEncoderRoot(module=self.text_model, prefix="lora_te")]

    def _check_pixels(self, x: torch.Tensor, what: str, channels: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ConfigError(f"{what} must be (B, {channels}, H, W), got {tuple(x.shape)}")

    def _vae_run(self, fn):
        """Runs fn() with the VAE; on non-finite output from a half-precision VAE, moves it to fp32 and reruns."""
        with torch.no_grad():
            with self._autocast(self.vae_dtype):
                out = fn()
            if self.vae_dtype != torch.float32 and not torch.isfinite(out).all():
                self.vae.to(torch.float32)
                self.vae_dtype = torch.float32
                out = fn()
        return out

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE-encodes pixels to scaled latents (ldm ``get_first_stage_encoding(encode_first_stage(x))``).

        Args:
            pixels: (B, 3, H, W) in [-1, 1]; H, W in pixels, multiples of 8.
            generator: RNG for the posterior sample (drawn on the generator's device); None: global RNG.

        Returns:
            (B, 4, H/8, W/8) fp32 = (mean + std * N(0, 1)) * latent_scale_factor, under no_grad.

        Raises:
            lib_lora.errors.ConfigError: wrong shape or H/W not multiples of 8.
        """
        self._check_pixels(pixels, "pixels", 3)
        if pixels.shape[2] % 8 or pixels.shape[3] % 8:
            raise ConfigError(f"image height/width must be multiples of 8 pixels, got {tuple(pixels.shape[2:])}")

        def run():
            post = self.vae.encode(pixels.to(self.device, self.vae_dtype))
            mean, std = post.mean.float(), post.std.float()
            dev = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=dev).to(mean.device)
            return (mean + std * noise) * self.latent_scale_factor

        return self._vae_run(run)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled (B, 4, h, w) latents -> (B, 3, 8h, 8w) fp32 pixels clamped to [-1, 1], under no_grad
        (ldm ``decode_first_stage``: ``decode(z / scale_factor)``)."""
        self._check_pixels(latents, "latents", 4)

        def run():
            z = latents.to(self.device, self.vae_dtype) / self.latent_scale_factor
            return self.vae.decode(z).float()

        return self._vae_run(run).clamp(-1.0, 1.0)

    def encode_prompts(self, prompts: list[str], clip_skip: int = 1,
                       sizes: list[tuple[int, int, int, int, int, int]] | None = None) -> Conditioning:
        """Text to (B, 77 x k, C) cross-attention context, k = number of 75-token chunks of the longest prompt
        (WebUI chunking, see :func:`lib_lora.model.tokenizer.tokenize_prompts`; prompts are not truncated, the
        ``(word:1.2)`` emphasis syntax is not parsed). Gradients reach LoRA modules when grad mode is on.

        SD1: HF ``CLIPTextModel``; ``clip_skip`` 1 = ``last_hidden_state``, n > 1 = ``hidden_states[-n]`` then
        ``final_layer_norm`` (WebUI ``CLIP_stop_at_last_layers``). SD2: open_clip to the penultimate layer then
        ``ln_final`` (ldm ``FrozenOpenCLIPEmbedder(layer="penultimate")``); ``clip_skip`` is ignored. ``sizes`` is
        SDXL-only and ignored. Runs under autocast when the model dtype is not fp32; the result has the model dtype.

        Raises:
            lib_lora.errors.ConfigError: empty ``prompts`` or ``clip_skip`` outside 1..number of layers (SD1).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ConfigError("encode_prompts needs at least one prompt")
        ids = torch.tensor(tokenize_prompts(list(prompts), self.text_kind, self.tokenizer_cache), device=self.device)
        b, total = ids.shape
        windows = ids.view(b * (total // 77), 77)
        with self._autocast():
            if self.text_kind == "hf_clip":
                n_layers = self.text_model.config.num_hidden_layers
                if not isinstance(clip_skip, int) or not 1 <= clip_skip <= n_layers:
                    raise ConfigError(f"clip_skip {clip_skip!r} must be an int in 1..{n_layers}")
                out = self.text_model(input_ids=windows, output_hidden_states=clip_skip > 1)
                if clip_skip == 1:
                    z = out.last_hidden_state
                else:
                    z = self.text_model.text_model.final_layer_norm(out.hidden_states[-clip_skip])
            else:
                z = _openclip_penultimate(self.text_model, windows)
        return Conditioning(z.reshape(b, total, z.shape[-1]).to(self.dtype))

    def unet_forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """UNet output (noise or v) for (B, 4, h, w) latents at integer (B,) timesteps in [0, 1000), with
        ``context=cond.crossattn`` (ldm ``DiffusionWrapper`` "crossattn"). A 0-d timestep is broadcast to B.
        Runs under autocast when the model dtype is not fp32; returns the dtype of ``noisy_latents``.

        Raises:
            lib_lora.errors.ConfigError: batch sizes of latents, timesteps and context differ, or h/w are not
                multiples of the UNet's downsampling (8 for SD1/SD2, i.e. 64 pixels).
        """
        x = noisy_latents.to(self.device)
        t = torch.as_tensor(timesteps, device=self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        ctx = cond.crossattn.to(self.device)
        f = 2 ** (len(self.unet.channel_mult) - 1)
        if x.ndim != 4 or x.shape[2] % f or x.shape[3] % f:
            raise ConfigError(f"latents must be (B, 4, h, w) with h, w multiples of {f} (the UNet's downsampling), "
                              f"got {tuple(x.shape)}")
        if t.shape[0] != x.shape[0] or ctx.shape[0] != x.shape[0]:
            raise ConfigError(f"batch mismatch: latents {tuple(x.shape)}, timesteps {tuple(t.shape)}, "
                              f"context {tuple(ctx.shape)}")
        with self._autocast():
            out = self.unet(x, t, context=ctx, **self._unet_extra_inputs(cond))
        return out.to(noisy_latents.dtype)

    def _unet_extra_inputs(self, cond: Conditioning) -> dict:
        """Keyword inputs of the UNet besides ``context`` (none for SD1/SD2; subclasses add SDXL's ``y``)."""
        return {}

    # -- checkpoint layout -----------------------------------------------------------------------------------------

    def ldm_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under LDM single-file names (``model.diffusion_model.*``, ``first_stage_model.*``,
        ``cond_stage_model.transformer.*`` or ``cond_stage_model.model.*``) plus ``alphas_cumprod``; CPU,
        contiguous, detached copies in their current dtype. Only the keys of the base modules as built are written
        (parameters a network may have added are left out)."""
        te_prefix = SD1_TE_PREFIX if self.text_kind == "hf_clip" else SD2_TE_PREFIX
        out: dict[str, torch.Tensor] = {}
        for prefix, module, expected in ((UNET_PREFIX, self.unet, self._base_keys("unet")),
                                         (VAE_PREFIX, self.vae, self._base_keys("vae")),
                                         (te_prefix, self.text_model, self._base_keys("text"))):
            sd = module.state_dict()
            for k in expected:
                out[prefix + k] = sd[k].detach().to("cpu").contiguous().clone()
        out["alphas_cumprod"] = self.alphas_cumprod.detach().cpu().clone()
        return out

    def _base_keys(self, part: str) -> list[str]:
        return self._keys[part]


def _norms_to_fp32(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            m.float()


def _openclip_penultimate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ldm ``FrozenOpenCLIPEmbedder.encode_with_transformer`` with layer_idx 1: (B, 77) ids -> (B, 77, width)."""
    x = model.token_embedding(ids) + model.positional_embedding
    x = x.permute(1, 0, 2)  # NLD -> LND (open_clip 2.20 is sequence-first)
    blocks = model.transformer.resblocks
    for r in blocks[: len(blocks) - 1]:
        x = r(x, attn_mask=model.attn_mask)
    x = x.permute(1, 0, 2)
    return model.ln_final(x)


def _build_parts(cfg: dict, device, seed: int | None = None):
    """Builds (unet, vae, text) from a model config (seeded random weights with ``seed``)."""
    text_builder = build.build_hf_clip_text if cfg["text_kind"] == "hf_clip" else build.build_openclip_text

    def s(i: int) -> int | None:
        return None if seed is None else seed + 10 * i

    return (build.build_unet(cfg["unet"], device=device, seed=s(0)),
            build.build_vae(cfg["vae"], device=device, seed=s(1)),
            text_builder(cfg["text"], device=device, seed=s(2)))


def _prediction(v_prediction: bool | None, yaml_param: str | None, default: str) -> str:
    if v_prediction is not None:
        return "v_prediction" if v_prediction else "epsilon"
    if yaml_param is not None:
        return "v_prediction" if str(yaml_param) == "v" else "epsilon"
    return default


def load_model(spec: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
               v_prediction: bool | None = None, seed: int = 0,
               tokenizer_cache: str | os.PathLike | None = None) -> HeadlessModel:
    """Loads an SD1/SD2 model without the WebUI.

    Args:
        spec: ``"tiny-sd1"`` / ``"tiny-sd2"`` (embedded: built from :mod:`configs` with seeded random weights, no
            files; tiny-sd2 is v-prediction) or the path of an SD1.x/SD2.x single-file checkpoint in the original
            LDM layout (``.safetensors``; ``.ckpt``/``.pt`` read with ``torch.load(weights_only=True)``, which
            never runs pickled code). A ``<stem>.yaml`` beside it is used as the WebUI does (ldm-style
            ``model.params``: ``unet_config``, ``first_stage_config``, ``cond_stage_config``,
            ``parameterization``, ``scale_factor``, ``linear_start``/``linear_end``/``timesteps``). Without a yaml,
            SD1 vs SD2 is detected from the keys (``cond_stage_model.transformer.*`` vs ``cond_stage_model.model.*``)
            and the full-size configs are used. The text encoder is always sized from the weights' shapes; its
            head count and activation come from the ``config.json`` of the yaml's ``version`` folder when found
            (tried as given, relative to the yaml's folder, and by its last component beside the yaml), else
            from CLIP-L / ViT-H (head width 64; 16 for widths under 64).
        device, dtype: where and in what dtype the frozen weights live (fp32, fp16 or bf16).
        v_prediction: True/False forces the prediction type; None: yaml ``parameterization: "v"`` means
            v-prediction, else epsilon (the WebUI's SD2 test forward for 768-v models is not done: pass True or a
            yaml for those), embedded models use their own type.
        seed: weight seed of the embedded models (same seed -> identical weights).
        tokenizer_cache: cache folder for the CLIP tokenizer files (default: see :mod:`lib_lora.model.tokenizer`).

    Returns:
        the :class:`HeadlessModel`; ``name`` is the file name (``ss_sd_model_name``) or the embedded name.
        ``alphas_cumprod`` is the checkpoint's ``alphas_cumprod`` when stored, else the scaled linear schedule.

    Raises:
        lib_lora.errors.ConfigError: ``spec`` is neither an embedded name nor an existing file.
        ModelLoadError: unreadable file, SDXL or unknown layout, or missing / unexpected / wrongly shaped keys
            (the message names them).
    """
    name = os.fspath(spec)
    if name in configs.EMBEDDED_MODELS:
        cfg = configs.get_model_config(name)
        unet, vae, text = _build_parts(cfg, None, seed=seed)
        pred = _prediction(v_prediction, None, cfg["prediction_type"])
        return HeadlessModel(arch=cfg["arch"], prediction_type=pred, unet=unet, vae=vae, text_model=text,
                             text_kind=cfg["text_kind"], alphas_cumprod=scaled_linear_alphas_cumprod(**cfg["schedule"]),
                             config=cfg, name=name, device=device, dtype=dtype, tokenizer_cache=tokenizer_cache)
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"model {name!r} is neither an embedded model ({', '.join(configs.EMBEDDED_MODELS)}) "
                          "nor an existing checkpoint file")
    sd = webui_key_replacements(read_state_dict(path))
    arch = detect_arch(sd, path)
    yaml_path = path.with_suffix(".yaml")
    cfg, yaml_pred = _config_for(arch, sd, yaml_path if yaml_path.is_file() else None)
    try:
        unet, vae, text = _build_parts(cfg, "meta")
    except (ConfigError, TypeError, KeyError, ValueError, AssertionError) as e:
        src = yaml_path if yaml_path.is_file() else "the full-size defaults"
        raise ModelLoadError(f"cannot build the model for {path} from {src}: {type(e).__name__}: {e}") from e
    te_prefix = SD1_TE_PREFIX if cfg["text_kind"] == "hf_clip" else SD2_TE_PREFIX
    _load_into(sd, [(UNET_PREFIX, unet), (VAE_PREFIX, vae), (te_prefix, text)], path, yaml_path)
    _fix_buffers(text, cfg)
    _check_materialised({"unet": unet, "vae": vae, "text": text})
    if "alphas_cumprod" in sd and sd["alphas_cumprod"].shape == (cfg["schedule"]["timesteps"],):
        alphas = sd["alphas_cumprod"].float()
    else:
        alphas = scaled_linear_alphas_cumprod(**cfg["schedule"])
    pred = _prediction(v_prediction, yaml_pred, "epsilon")
    return HeadlessModel(arch=arch, prediction_type=pred, unet=unet, vae=vae, text_model=text,
                         text_kind=cfg["text_kind"], alphas_cumprod=alphas, config=cfg, name=path.name,
                         device=device, dtype=dtype, tokenizer_cache=tokenizer_cache)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a checkpoint's tensors to the CPU: safetensors, or a torch pickle with ``weights_only=True`` (a
    top-level ``state_dict`` entry is unwrapped, as ldm checkpoints store it).

    Raises:
        ModelLoadError: the file cannot be read, or holds something other than a dict of tensors.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
                sd = sd["state_dict"]
    except Exception as e:  # any reader failure is reported the same way
        raise ModelLoadError(f"cannot read checkpoint {path}: {type(e).__name__}: {e} (.ckpt files are read with "
                             "weights_only=True; convert others to .safetensors)") from e
    if not isinstance(sd, dict):
        raise ModelLoadError(f"checkpoint {path} holds {type(sd).__name__}, not a dict of tensors")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# modules/sd_models.py checkpoint_dict_replacements_sd1 / _sd2_turbo: older or re-packaged layouts.
_REPLACEMENTS_SD1 = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
_REPLACEMENTS_SD2_TURBO = {"conditioner.embedders.0.": "cond_stage_model."}


def webui_key_replacements(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames keys as the WebUI's ``sd_models.get_state_dict_from_checkpoint`` does: SD1 text encoders saved
    without the ``text_model.`` level, and SD2-turbo's ``conditioner.embedders.0.`` (a single OpenCLIP embedder)."""
    if any(k.startswith("conditioner.embedders.0.model.") for k in sd) and \
            not any(k.startswith("conditioner.embedders.1.") for k in sd):
        table = _REPLACEMENTS_SD2_TURBO
    else:
        table = _REPLACEMENTS_SD1
    out = {}
    for k, v in sd.items():
        for old, new in table.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def detect_arch(sd: dict[str, torch.Tensor], path: str | os.PathLike = "checkpoint") -> str:
    """``"sd1"`` if ``cond_stage_model.transformer.*`` keys exist, ``"sd2"`` for ``cond_stage_model.model.*``
    (the WebUI's own test: SD2 if ``cond_stage_model`` has ``.model``).

    Raises:
        ModelLoadError: SDXL (``conditioner.*``) or no known text-encoder / UNet keys.
    """
    keys = sd.keys()
    if any(k.startswith("conditioner.") for k in keys):
        raise ModelLoadError(f"{path}: SDXL checkpoints (conditioner.*) are not supported by the headless loader; "
                             "use the WebUI")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
            raise ModelLoadError(f"{path}: this is a LoRA file, not a base model checkpoint; pass the checkpoint "
                                 "the LoRA is for as the model")
        raise ModelLoadError(f"{path}: no '{UNET_PREFIX}*' keys: not an LDM single-file checkpoint")
    if any(k.startswith(SD2_TE_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TE_PREFIX) for k in keys):
        return "sd1"
    raise ModelLoadError(f"{path}: no text encoder keys ('{SD1_TE_PREFIX}*' for SD1, '{SD2_TE_PREFIX}*' for SD2)")


def _heads_for(width: int) -> int:
    known = {768: 12, 1024: 16, 1280: 20}
    if width in known:
        return known[width]
    return width // 64 if width >= 64 and width % 64 == 0 else max(1, width // 16)


def _hf_text_config(sd: dict, extra: dict | None) -> dict:
    p = SD1_TE_PREFIX + "text_model."
    tok = sd.get(p + "embeddings.token_embedding.weight")
    pos = sd.get(p + "embeddings.position_embedding.weight")
    fc1 = sd.get(p + "encoder.layers.0.mlp.fc1.weight")
    if tok is None or pos is None or fc1 is None:
        missing = [k for k, v in (("embeddings.token_embedding.weight", tok), ("embeddings.position_embedding.weight",
                                   pos), ("encoder.layers.0.mlp.fc1.weight", fc1)) if v is None]
        raise ModelLoadError("missing text encoder keys: " + ", ".join(p + m for m in missing))
    layers = {int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k))}
    hidden = int(tok.shape[1])
    cfg = dict(configs.HF_CLIP_L)
    cfg.update(vocab_size=int(tok.shape[0]), hidden_size=hidden, projection_dim=hidden,
               intermediate_size=int(fc1.shape[0]), num_hidden_layers=max(layers) + 1,
               max_position_embeddings=int(pos.shape[0]), num_attention_heads=_heads_for(hidden))
    for k in ("num_attention_heads", "hidden_act", "layer_norm_eps"):
        if extra and k in extra:
            cfg[k] = extra[k]
    return cfg


def _openclip_text_config(sd: dict) -> dict:
    p = SD2_TE_PREFIX
    tok, pos = sd.get(p + "token_embedding.weight"), sd.get(p + "positional_embedding")
    if tok is None or pos is None:
        raise ModelLoadError(f"missing text encoder keys: {p}token_embedding.weight / {p}positional_embedding")
    layers = {int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))}
    width = int(tok.shape[1])
    proj = sd.get(p + "text_projection")
    return {"embed_dim": int(proj.shape[1]) if proj is not None else width, "quick_gelu": False,
            "text_cfg": {"context_length": int(pos.shape[0]), "vocab_size": int(tok.shape[0]), "width": width,
                         "heads": _heads_for(width), "layers": max(layers) + 1 if layers else 0}}


def _find_text_json(version: str | None, yaml_path: Path) -> dict | None:
    import json

    if not version:
        return None
    v = Path(str(version))
    for folder in (v, yaml_path.parent / v, yaml_path.parent / v.name):
        f = folder / "config.json"
        if f.is_file():
            data = json.loads(f.read_text(encoding="utf-8"))
            return data.get("text_config", data) if isinstance(data, dict) else None
    return None


def _config_for(arch: str, sd: dict, yaml_path: Path | None) -> tuple[dict, str | None]:
    """Model config for a checkpoint: full-size defaults of ``arch``, overridden by the yaml; text from shapes."""
    cfg = configs.get_model_config(arch)
    extra_text, pred = None, None
    if yaml_path is not None:
        import yaml

        try:
            doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
            params = doc["model"]["params"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read model config {yaml_path}: {type(e).__name__}: {e}") from e
        if "unet_config" in params:
            cfg["unet"] = dict(params["unet_config"].get("params", {}))
        if "first_stage_config" in params:
            fs = params["first_stage_config"].get("params", {})
            cfg["vae"] = {"embed_dim": fs.get("embed_dim"), "ddconfig": fs.get("ddconfig")}
        for key in ("linear_start", "linear_end", "timesteps"):
            if key in params:
                cfg["schedule"][key] = params[key]
        cfg["scale_factor"] = float(params.get("scale_factor", cfg["scale_factor"]))
        pred = params.get("parameterization")
        version = (params.get("cond_stage_config") or {}).get("params", {}) or {}
        extra_text = _find_text_json(version.get("version"), yaml_path)
    # WebUI repair_config: no internal checkpointing; dtype is set on the built model instead of use_fp16.
    cfg["unet"]["use_checkpoint"] = False
    cfg["unet"].pop("use_fp16", None)
    cfg["text"] = _hf_text_config(sd, extra_text) if arch == "sd1" else _openclip_text_config(sd)
    return cfg, pred


def _fmt(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _load_into(sd: dict, parts: list[tuple[str, nn.Module]], path: Path, yaml_path: Path) -> None:
    """Checks names and shapes of every key under the parts' prefixes, then assigns the tensors (meta modules)."""
    missing, unexpected, shapes = [], [], []
    per_part: list[dict] = []
    for prefix, module in parts:
        expected = module.state_dict()
        got = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(_IGNORED)}
        if prefix == SD1_TE_PREFIX:
            expected = {k: v for k, v in expected.items() if not k.endswith("embeddings.position_ids")}
        if prefix == SD2_TE_PREFIX:
            for k in _OPTIONAL_OPENCLIP:
                if k not in got and k in expected:
                    fill = torch.zeros(expected[k].shape) if k == "text_projection" else torch.tensor(math.log(1 / .07))
                    got[k] = fill
        missing += [prefix + k for k in expected if k not in got]
        unexpected += [prefix + k for k in got if k not in expected]
        shapes += [f"{prefix}{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})" for k, v in got.items()
                   if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        per_part.append(got)
    if missing or unexpected or shapes:
        src = (f"config {yaml_path}" if yaml_path.is_file() else
               f"full-size defaults (no {yaml_path.name} beside the checkpoint; add one for other architectures)")
        lines = [f"checkpoint {path} does not match the model built from {src}:"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            lines.append(f"wrong shapes ({len(shapes)}): {_fmt(shapes)}")
        raise ModelLoadError("\n".join(lines))
    for (_, module), got in zip(parts, per_part):
        module.load_state_dict(got, strict=False, assign=True)


def _fix_buffers(text: nn.Module, cfg: dict) -> None:
    """Recreates the buffers a checkpoint does not carry (they are still on meta after an assign-load)."""
    if cfg["text_kind"] == "hf_clip":
        emb = text.text_model.embeddings
        n = emb.position_embedding.weight.shape[0]
        emb.position_ids = torch.arange(n).expand((1, -1))
    else:
        n = text.positional_embedding.shape[0]
        mask = torch.full((n, n), float("-inf")).triu_(1)
        text.register_buffer("attn_mask", mask, persistent=False)


def _check_materialised(modules: dict[str, nn.Module]) -> None:
    bad = [f"{name}.{k}" for name, m in modules.items()
           for k, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
    if bad:
        raise ModelLoadError(f"internal: tensors left uninitialised after loading: {_fmt(bad)}")


_LDM_TARGETS = {
    "model": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "unet": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "vae": "ldm.models.autoencoder.AutoencoderKL",
    "hf_clip": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "openclip": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}


def ldm_yaml(model: HeadlessModel, text_version: str = "openai/clip-vit-large-patch14") -> dict:
    """The WebUI/ldm inference config of ``model`` as a dict (the layout of ``v1-inference.yaml`` /
    ``v2-inference(-v).yaml``): schedule, ``scale_factor``, ``parameterization`` ("v" or "eps"), the UNet and
    VAE params the model was built from, and the text encoder (SD1: ``FrozenCLIPEmbedder`` with ``version =
    text_version``; SD2: ``FrozenOpenCLIPEmbedder`` ViT-H-14, layer "penultimate")."""
    cfg = model.config
    if model.text_kind == "hf_clip":
        cond = {"target": _LDM_TARGETS["hf_clip"], "params": {"version": text_version}}
    else:
        cond = {"target": _LDM_TARGETS["openclip"], "params": {"freeze": True, "layer": "penultimate"}}
    params = {
        "linear_start": cfg["schedule"]["linear_start"], "linear_end": cfg["schedule"]["linear_end"],
        "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": cfg["schedule"]["timesteps"],
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": model.latent_scale_factor, "use_ema": False,
        "parameterization": "v" if model.prediction_type == "v_prediction" else "eps",
        "unet_config": {"target": _LDM_TARGETS["unet"], "params": dict(cfg["unet"])},
        "first_stage_config": {"target": _LDM_TARGETS["vae"], "params": {
            "embed_dim": cfg["vae"]["embed_dim"], "monitor": "val/rec_loss", "ddconfig": dict(cfg["vae"]["ddconfig"]),
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": cond,
    }
    return {"model": {"base_learning_rate": 1.0e-04, "target": _LDM_TARGETS["model"], "params": params}}


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_checkpoint(model: HeadlessModel, path: str | os.PathLike, write_yaml: bool = True,
                    dtype: torch.dtype | None = None) -> Path:
    """Writes ``model`` as an LDM single-file checkpoint that :func:`load_model` (and, for SD1/SD2 shapes, the
    WebUI) loads back.

    Args:
        model: the model (its base weights; parameters added by a network are not written).
        path: ``.safetensors`` (metadata ``{"format": "pt"}``) or ``.ckpt`` (``{"state_dict": ...}`` via
            ``torch.save``). Written atomically (temp file + rename).
        write_yaml: also write ``<stem>.yaml`` (see :func:`ldm_yaml`). For an SD1 text encoder that is not CLIP-L
            (hidden 768), a ``<stem>-clip-text/`` folder (``config.json`` + tokenizer files) is written beside and
            named as the yaml's ``version``: :func:`load_model` finds it beside the yaml, the WebUI resolves it
            from its own root folder (copy it there, as for the shared tiny model).
        dtype: cast floating tensors to this dtype (default: as they are).

    Returns:
        the checkpoint path.

    Raises:
        lib_lora.errors.ConfigError: unknown extension.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".ckpt"):
        raise ConfigError(f"checkpoint extension {path.suffix!r}; allowed: '.safetensors', '.ckpt'")
    sd = model.ldm_state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() and k != "alphas_cumprod" else v for k, v in sd.items()}
    if model.text_kind == "hf_clip":  # real SD1 files carry it; loaders ignore it
        n = model.text_model.text_model.embeddings.position_embedding.weight.shape[0]
        sd[SD1_TE_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n).unsqueeze(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic(path, lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    else:
        _atomic(path, lambda p: torch.save({"state_dict": sd}, str(p)))
    if write_yaml:
        import yaml

        version = "openai/clip-vit-large-patch14"
        if model.text_kind == "hf_clip" and model.text_model.config.hidden_size != 768:
            version = f"{path.stem}-clip-text"
            folder = path.parent / version
            folder.mkdir(exist_ok=True)
            model.text_model.config.save_pretrained(str(folder))
            from .tokenizer import get_clip_tokenizer

            get_clip_tokenizer(model.tokenizer_cache).save_pretrained(str(folder))
        text = yaml.safe_dump(ldm_yaml(model, version), sort_keys=False)
        _atomic(path.with_suffix(".yaml"), lambda p: p.write_text(text, encoding="utf-8"))
    return path
