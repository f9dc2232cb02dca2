"""Training on the model the WebUI has loaded: :class:`WebUIModel` implements
:class:`lib_lora.model_api.DiffusionModel` over an A1111 ``shared.sd_model``, plus the checks and the
save-and-restore wrapper the tab and the API run around a training job.

Nothing here imports the WebUI's ``modules``: the caller passes the WebUI object and the WebUI functions
(``devices.autocast``, ``sd_hijack.undo_optimizations`` ...). Sources: ``shared/docs/webui-internals.md`` sections
2.4 (Lora's merged weights), 3.3/3.4 (checkpointing, --medvram/--lowvram), 4 (model objects) and 5 (attention
hijack, precision), i.e. A1111 v1.10.1 ``modules/sd_models.py``, ``sd_models_xl.py``, ``sd_hijack*.py``,
``lowvram.py`` and sgm's ``GeneralConditioner`` / ``FrozenOpenCLIPEmbedder2``.

Where the parts are (SD1 / SD2 / SDXL):

- UNet: ``sd_model.model.diffusion_model`` (ldm ``UNetModel``; sgm for SDXL, which also takes ``y``);
- text: ``cond_stage_model.wrapped.transformer`` (HF ``CLIPTextModel``) / ``cond_stage_model.wrapped.model``
  (open_clip, penultimate layer then ``ln_final``) / ``conditioner.embedders[0].wrapped.transformer`` (CLIP-L,
  ``lora_te1``) and ``embedders[1].wrapped.model`` (open_clip bigG, ``lora_te2``);
- VAE: ``sd_model.first_stage_model``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, TrainingError
from .model.headless import HeadlessModel
from .model.tokenizer import tokenize_prompts
from .model_api import Conditioning, TextEncoderRoot

#: SDXL micro-conditioning used when ``encode_prompts`` gets no ``sizes`` (``sd_models_xl.get_learned_conditioning``
#: defaults: 1024 x 1024, no crop).
SDXL_DEFAULT_SIZE = (1024, 1024, 0, 0, 1024, 1024)


class WeightsChangedError(TrainingError):
    """The base model's UNet / text-encoder weights differ after training from before (the checksum changed)."""


# ------------------------------------------------------------------------------------------------- detection
def _text_embedder(sd_model):
    """``cond_stage_model.wrapped`` (hijacked) or ``cond_stage_model`` itself (not hijacked)."""
    cond = getattr(sd_model, "cond_stage_model", None)
    return getattr(cond, "wrapped", cond)


def _sdxl_embedders(sd_model) -> list:
    conditioner = getattr(sd_model, "conditioner", None)
    return list(getattr(conditioner, "embedders", None) or [])


def _arch(sd_model) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` from the module layout (the WebUI's ``set_model_type`` tests), or None."""
    if getattr(getattr(sd_model, "model", None), "diffusion_model", None) is None:
        return None
    embedders = _sdxl_embedders(sd_model)
    if getattr(sd_model, "is_sdxl", False) or embedders:
        ok = (len(embedders) >= 5 and hasattr(getattr(embedders[0], "wrapped", None), "transformer")
              and hasattr(getattr(embedders[1], "wrapped", None), "model"))
        return "sdxl" if ok else None
    emb = _text_embedder(sd_model)
    if isinstance(getattr(emb, "model", None), nn.Module):
        return "sd2"
    if isinstance(getattr(emb, "transformer", None), nn.Module):
        return "sd1"
    return None


def detect_support(sd_model) -> str | None:
    """Whether ``sd_model`` can be trained on: None when it can, else a plain-English reason for the user.

    Refused: no model (None); Forge's engine (has ``forge_objects``; no ldm/sgm modules); SD3 (``is_sd3``); Flux
    (``is_flux`` or a class name containing "Flux"); an unknown layout; inpainting / instruct-pix2pix UNets (input
    channels other than ``latent_channels``); FP8 weight storage (Linear/Conv weights in a float8 dtype).
    """
    if sd_model is None:
        return "No Stable Diffusion model is loaded. Load an SD1, SD2 or SDXL checkpoint first."
    if hasattr(sd_model, "forge_objects"):
        return ("This WebUI is Forge: its model engine has no ldm/sgm modules to train on. Train from the command "
                "line instead (python -m lib_lora train --model <checkpoint>) and use the LoRA in Forge.")
    if getattr(sd_model, "is_sd3", False):
        return "SD3 models are not supported for training; load an SD1, SD2 or SDXL checkpoint."
    if getattr(sd_model, "is_flux", False) or "flux" in type(sd_model).__name__.lower():
        return "Flux models are not supported for training; load an SD1, SD2 or SDXL checkpoint."
    arch = _arch(sd_model)
    if arch is None:
        return (f"The loaded model ({type(sd_model).__name__}) is not a Stable Diffusion 1, 2 or XL model this "
                "trainer knows; load an SD1, SD2 or SDXL checkpoint.")
    unet = sd_model.model.diffusion_model
    channels = getattr(unet, "in_channels", None)
    latent = int(getattr(sd_model, "latent_channels", 4))
    if channels is not None and channels != latent:
        return (f"The loaded model's UNet takes {channels} input channels (an inpainting or instruct-pix2pix "
                f"model); training needs a plain text-to-image checkpoint ({latent} channels).")
    if any(p.dtype in _FP8 for p in unet.parameters()):
        return ("FP8 weight storage is on (Settings > Optimizations > FP8 weight); turn it off and reload the "
                "model to train.")
    return None


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def check_memory_flags(lowvram: bool, medvram: bool, train_text_encoder: bool) -> str | None:
    """A refusal message for the WebUI's memory modes, or None when training may start.

    ``--lowvram`` splits the UNet across CPU and GPU with forward hooks, so backward cannot run (the built-in
    trainers refuse it too). ``--medvram`` / ``--medvram-sdxl`` keep one part on the GPU at a time: the text
    encoder is evicted before backward reaches it, so text-encoder LoRA training is refused there (UNet-only
    training is fine).
    """
    if lowvram:
        return ("Training is not possible with --lowvram (the WebUI moves UNet pieces between CPU and GPU during "
                "each step). Restart the WebUI without --lowvram, or train from the command line.")
    if medvram and train_text_encoder:
        return ("With --medvram the text encoder is moved back to the CPU before its gradients are computed, so "
                "text-encoder training is not possible. Set the text-encoder learning rate to 0 (UNet only), or "
                "restart the WebUI without --medvram.")
    return None


# ------------------------------------------------------------------------------------------------- the parts
def text_modules(sd_model) -> list[tuple[str, nn.Module, str]]:
    """The text encoders as ``(kohya_prefix, module, kind)``, kind ``"hf_clip"`` or ``"openclip"``.

    Raises:
        ConfigError: the model is not supported (the :func:`detect_support` reason).
    """
    arch = _require_supported(sd_model)
    if arch == "sdxl":
        e = _sdxl_embedders(sd_model)
        return [("lora_te1", e[0].wrapped.transformer, "hf_clip"), ("lora_te2", e[1].wrapped.model, "openclip")]
    emb = _text_embedder(sd_model)
    if arch == "sd2":
        return [("lora_te", emb.model, "openclip")]
    return [("lora_te", emb.transformer, "hf_clip")]


def _require_supported(sd_model) -> str:
    reason = detect_support(sd_model)
    if reason is not None:
        raise ConfigError(reason)
    return _arch(sd_model)


def weights_checksum(sd_model) -> str:
    """sha256 (hex) over the UNet's and the text encoders' parameters: for each, in ``named_parameters()`` order,
    its name, dtype, shape and raw bytes (copied to the CPU). Buffers and the VAE are not included.

    Deterministic for the same weights; any change of a single element changes it. Cost: one pass over the
    weights through the CPU: SD1.5 in fp16 is about 2 GB (a few seconds: the GPU-to-CPU copy plus sha256 at
    roughly 1 GB/s), SDXL about 5 GB; the tiny test models take milliseconds.

    Raises:
        ConfigError: the model is not supported (see :func:`detect_support`).
    """
    h = hashlib.sha256()
    parts = [("unet", sd_model.model.diffusion_model)] + [(p, m) for p, m, _ in text_modules(sd_model)]
    with torch.no_grad():
        for part, module in parts:
            for name, p in module.named_parameters():
                t = p.detach()
                h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
                h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _first_param_device(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return p.device if p is not None else None


@dataclass
class TrainingSession:
    """What :func:`training_session` yields.

    Attributes:
        checksum: :func:`weights_checksum` at the start (after ``undo_lora``).
        checksum_after: the checksum at the end (None until then).
        error: a :class:`WeightsChangedError` when the weights changed; also raised on a normal exit, only
            recorded here when the body raised (so that the body's exception is not hidden).
    """

    checksum: str
    checksum_after: str | None = None
    error: WeightsChangedError | None = None
    devices: dict[str, torch.device] = field(default_factory=dict)


@contextlib.contextmanager
def training_session(sd_model, *, undo_lora: Callable[[], None] | None = None,
                     undo_optimizations: Callable[[], None] | None = None,
                     apply_optimizations: Callable[[], None] | None = None,
                     torch_gc: Callable[[], None] | None = None) -> Iterator[TrainingSession]:
    """Puts the WebUI model in training shape and restores it afterwards (normal exit, exception or stop).

    On enter: ``undo_lora()`` (the caller restores weights Lora merged in, section 2.4: the checksum must be of the
    base weights), records :func:`weights_checksum`, every parameter's ``requires_grad``, every module's
    ``training`` flag and the device of the UNet wrapper / text stage / VAE; calls ``undo_optimizations()``; then
    freezes every parameter and puts every module in eval mode (flags set directly: ldm's ``disabled_train``
    makes ``.train()`` a no-op on the frozen stages).

    On exit: restores the flags, modes and devices, calls ``apply_optimizations()`` and ``torch_gc()``, and
    compares the checksum: when it differs a :class:`WeightsChangedError` is raised (normal exit) or stored in
    ``session.error`` (the body raised; its exception propagates).

    Raises:
        ConfigError: the model is not supported (see :func:`detect_support`), before anything is changed.
        WeightsChangedError: see above.
    """
    _require_supported(sd_model)
    if undo_lora is not None:
        undo_lora()
    session = TrainingSession(checksum=weights_checksum(sd_model))
    grads = [(p, p.requires_grad) for p in sd_model.parameters()]
    modes = [(m, m.training) for m in sd_model.modules()]
    stages = {"model": getattr(sd_model, "model", None),
              "text": getattr(sd_model, "conditioner", None) or getattr(sd_model, "cond_stage_model", None),
              "vae": getattr(sd_model, "first_stage_model", None)}
    stages = {k: m for k, m in stages.items() if isinstance(m, nn.Module)}
    session.devices = {k: d for k, m in stages.items() if (d := _first_param_device(m)) is not None}
    failed = False
    try:
        if undo_optimizations is not None:
            undo_optimizations()
        for p, _ in grads:
            p.requires_grad_(False)
        for m, _ in modes:
            m.training = False
        yield session
    except BaseException:
        failed = True
        raise
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
        for k, device in session.devices.items():
            if _first_param_device(stages[k]) != device:
                stages[k].to(device)
        if apply_optimizations is not None:
            apply_optimizations()
        if torch_gc is not None:
            torch_gc()
        session.checksum_after = weights_checksum(sd_model)
        if session.checksum_after != session.checksum:
            session.error = WeightsChangedError(
                "the base model's weights changed during training (checksum "
                f"{session.checksum[:12]} before, {session.checksum_after[:12]} after); reload the checkpoint "
                "(Settings > Stable Diffusion > reload, or pick it again) before generating")
            if not failed:
                raise session.error


# --------------------------------------------------------------------------------------------- the adapter
class _Posterior:
    """ldm ``DiagonalGaussianDistribution`` of (B, 2z, h, w) moments: ``mean``, ``std`` (logvar clamped to
    [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


class _SGMVAE:
    """sgm's ``AutoencoderKLInferenceWrapper.encode`` returns a sample; this runs ``encoder`` + ``quant_conv``
    itself to get the posterior (same maths as its ``DiagonalGaussianRegularizer``); ``decode`` is sgm's own."""

    def __init__(self, vae: nn.Module):
        self.vae = vae

    def encode(self, x: torch.Tensor) -> _Posterior:
        return _Posterior(self.vae.quant_conv(self.vae.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def _param_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class WebUIModel(HeadlessModel):
    """:class:`lib_lora.model_api.DiffusionModel` over the WebUI's loaded model (no copies: the modules trained
    are the WebUI's own, frozen by :func:`training_session`).

    Inherits from :class:`HeadlessModel` its prompt encoding (WebUI 75-token chunking, SD1 clip skip, SD2
    penultimate layer), VAE encode/decode and UNet call; it does not run ``HeadlessModel.__init__``, which would
    cast and re-hijack the modules. Base weights keep their dtype (fp16 in a default WebUI); LoRA parameters are
    fp32 and everything runs under the ``autocast`` context the caller passes (the WebUI's ``devices.autocast``).

    Attributes (besides the protocol's): ``sd_model``; ``vae_dtype`` (the VAE's weight dtype).

    Args:
        sd_model: ``shared.sd_model``.
        autocast: a no-argument callable returning a context manager (``modules.devices.autocast``); None:
            ``torch.autocast(device.type, dtype)`` when the UNet weights are half, else no autocast.
        device: where inputs go; default the UNet weights' device. Pass ``devices.device`` under --medvram,
            where parts sit on the CPU until the WebUI's hooks move them.
        tokenizer_cache: cache folder for the CLIP tokenizer (see :mod:`lib_lora.model.tokenizer`).

    Raises:
        ConfigError: the model is not supported (the :func:`detect_support` reason).
    """

    def __init__(self, sd_model, *, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 device: torch.device | str | None = None, tokenizer_cache: str | os.PathLike | None = None):
        self.arch = _require_supported(sd_model)
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        self._texts = text_modules(sd_model)
        self.text_model = self._texts[0][1]
        self.text_kind = self._texts[0][2]
        vae = sd_model.first_stage_model
        self.vae = _SGMVAE(vae) if self.arch == "sdxl" else vae
        self.prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self.latent_scale_factor = float(sd_model.scale_factor)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        filename = getattr(info, "filename", None) or getattr(info, "model_name", None) or "unknown"
        self.name = os.path.basename(str(filename))
        self.tokenizer_cache = tokenizer_cache
        self.device = torch.device(device) if device is not None else _first_param_device(self.unet)
        self.dtype = _param_dtype(self.unet)
        self.vae_dtype = _param_dtype(vae)
        self._autocast_factory = autocast
        self.config = {"scale_factor": self.latent_scale_factor}

    # -- what HeadlessModel's methods call ----------------------------------------------------------------------

    def _autocast(self, dtype: torch.dtype | None = None):
        if self._autocast_factory is not None:
            return self._autocast_factory()
        dtype = dtype or self.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _vae_run(self, fn):
        """Runs fn() with the VAE under no_grad and autocast. Unlike the headless model, the WebUI's VAE is not
        switched to fp32 here (that is the WebUI's setting).

        Raises:
            TrainingError: the VAE produced NaN/inf.
        """
        with torch.no_grad(), self._autocast(self.vae_dtype):
            out = fn()
        if not torch.isfinite(out).all():
            raise TrainingError(f"the VAE ({self.vae_dtype}) produced NaN/inf values; restart the WebUI with "
                                "--no-half-vae (or pick an fp16-safe VAE)")
        return out

    def _unet_extra_inputs(self, cond: Conditioning) -> dict:
        return {"y": cond.vector} if self.arch == "sdxl" else {}

    def to(self, device=None, dtype=None):
        """Not available: the WebUI owns placement and dtype of its model.

        Raises:
            ConfigError: always.
        """
        raise ConfigError("the WebUI model is moved/cast by the WebUI, not by lib_lora")

    def ldm_state_dict(self):
        """Not available for the WebUI model (save the checkpoint from the WebUI).

        Raises:
            ConfigError: always.
        """
        raise ConfigError("the WebUI model's weights are not exported by lib_lora")

    # -- protocol --------------------------------------------------------------------------------------------

    @property
    def text_encoders(self) -> list[TextEncoderRoot]:
        """SD1: ``[CLIPTextModel as "lora_te"]``; SD2: ``[open_clip model as "lora_te", layers_used = n - 1]``
        (penultimate); SDXL: ``[CLIP-L as "lora_te1", open_clip bigG as "lora_te2"]``, all layers (bigG's last
        layer feeds the pooled output)."""
        if self.arch == "sdxl":
            return [TextEncoderRoot(module=m, prefix=p) for p, m, _ in self._texts]
        return super().text_encoders

    def encode_prompts(self, prompts: list[str], clip_skip: int = 1,
                       sizes: list[tuple[int, int, int, int, int, int]] | None = None) -> Conditioning:
        """SD1/SD2: :meth:`HeadlessModel.encode_prompts` on the WebUI's text encoder (crossattn (B, 77k, C)).

        SDXL (sgm ``GeneralConditioner`` as the WebUI hijacks it, ``clip_skip`` ignored): crossattn = cat(CLIP-L
        ``hidden_states[layer_idx]`` (11: penultimate, no final LayerNorm), bigG penultimate (no ``ln_final``))
        = (B, 77k, 2048); vector = cat(pooled bigG of the first chunk (``ln_final`` of the last layer at the eos
        token, times ``text_projection``), ``embedders[2..4]`` of original size, crop top-left, target size)
        = (B, 2816). ``sizes``: per prompt (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels;
        None: :data:`SDXL_DEFAULT_SIZE`.

        Raises:
            ConfigError: empty ``prompts``, bad ``clip_skip`` (SD1) or ``sizes`` of another length.
        """
        if self.arch != "sdxl":
            return super().encode_prompts(prompts, clip_skip=clip_skip)
        if not prompts:
            raise ConfigError("encode_prompts needs at least one prompt")
        sizes = list(sizes) if sizes is not None else [SDXL_DEFAULT_SIZE] * len(prompts)
        if len(sizes) != len(prompts):
            raise ConfigError(f"{len(sizes)} sizes for {len(prompts)} prompts")
        (_, te1, _), (_, te2, _) = self._texts
        layer_idx = getattr(_sdxl_embedders(self.sd_model)[0].wrapped, "layer_idx", None)
        layer_idx = -2 if layer_idx is None else layer_idx
        b = len(prompts)
        ids1 = torch.tensor(tokenize_prompts(list(prompts), "hf_clip", self.tokenizer_cache), device=self.device)
        ids2 = torch.tensor(tokenize_prompts(list(prompts), "openclip"), device=self.device)
        n1, n2 = ids1.shape[1] // 77, ids2.shape[1] // 77
        n = max(n1, n2)  # both tokenizers give the same chunk count for the same BPE; guard anyway
        ids1, ids2 = _pad_chunks(ids1, n1, n, 49407), _pad_chunks(ids2, n2, n, 0)
        with self._autocast():
            h1 = te1(input_ids=ids1.view(b * n, 77), output_hidden_states=True).hidden_states[layer_idx]
            h2, pooled = _openclip_penultimate_and_pooled(te2, ids2.view(b * n, 77))
            crossattn = torch.cat([h1, h2.to(h1.dtype)], dim=-1).reshape(b, n * 77, -1)
            pooled = pooled.view(b, n, -1)[:, 0]
            emb = _sdxl_embedders(self.sd_model)
            st = torch.tensor(sizes, dtype=torch.float32, device=self.device)
            vector = torch.cat([pooled.float()] + [emb[2 + i](st[:, 2 * i:2 * i + 2]).float() for i in range(3)],
                               dim=1)
        return Conditioning(crossattn.to(self.dtype), vector.to(self.dtype))


def _pad_chunks(ids: torch.Tensor, have: int, want: int, pad: int) -> torch.Tensor:
    """(B, 77 have) ids -> (B, 77 want) by appending ``[bos, eos, pad...]`` windows (WebUI empty chunks)."""
    if have == want:
        return ids
    empty = torch.full((ids.shape[0], 77), pad, dtype=ids.dtype, device=ids.device)
    empty[:, 0], empty[:, 1] = 49406, 49407
    return torch.cat([ids] + [empty] * (want - have), dim=1)


def _openclip_penultimate_and_pooled(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sgm ``FrozenOpenCLIPEmbedder2`` (layer "penultimate", legacy False, always_return_pooled): (N, 77) ids ->
    (penultimate output without ``ln_final`` (N, 77, width), pooled (N, embed_dim) =
    ``ln_final(last)[eos] @ text_projection``)."""
    x = model.token_embedding(ids) + model.positional_embedding
    x = x.permute(1, 0, 2)  # NLD -> LND (open_clip 2.20 is sequence-first)
    blocks = model.transformer.resblocks
    penultimate = x
    for i, r in enumerate(blocks):
        if i == len(blocks) - 1:
            penultimate = x
        x = r(x, attn_mask=model.attn_mask)
    last = model.ln_final(x.permute(1, 0, 2))
    pooled = last[torch.arange(last.shape[0], device=last.device), ids.argmax(dim=-1)] @ model.text_projection
    return penultimate.permute(1, 0, 2), pooled
