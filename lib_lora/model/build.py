"""Builders for the module trees the WebUI runs: ldm UNet, ldm VAE, HF CLIP text model, OpenCLIP text model.

Every builder takes a config dict from :mod:`lib_lora.model.configs` (or parsed from a checkpoint's yaml) and a
``device``; ``device="meta"`` builds the full-size trees in seconds with no weights (for naming and target tests).
``seed`` builds on the CPU under a private RNG state (the global one is left untouched) and then re-randomises what
ldm/HF initialise to constants (see :func:`randomize_zero_layers`, :func:`randomize_layernorms`), so that tiny
random models depend on the prompt and every LoRA target gets a gradient.

ldm, open_clip and transformers are imported inside the functions: importing this module has no side effects (ldm
prints at import and while building; that output is swallowed).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError

# ldm UNetModel keys that only sgm understands; handled here (see build_unet).
_SGM_ONLY_UNET_KEYS = ("transformer_depth_middle", "adm_in_channels")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallows stdout (ldm prints "making attention of type ..." for every VAE attention block)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _build_context(device, seed: int | None) -> Iterator[None]:
    """Device context for module construction; with a seed, a forked and seeded CPU RNG."""
    if seed is None:
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx, _quiet():
            yield
    else:
        with torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(seed)
            yield


def _finish(module: nn.Module, device, seed: int | None, randomize) -> nn.Module:
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            randomize(module)
        if device is not None:
            module = module.to(device)
    return module


def _level_of_blocks(cfg: dict) -> tuple[dict[int, int], dict[int, int]]:
    """Maps ``input_blocks`` / ``output_blocks`` indices to their UNet level, following UNetModel.__init__."""
    mult = cfg["channel_mult"]
    nrb = cfg["num_res_blocks"]
    nrb = [nrb] * len(mult) if isinstance(nrb, int) else list(nrb)
    inputs, outputs = {}, {}
    i = 1
    for level in range(len(mult)):
        for _ in range(nrb[level]):
            inputs[i] = level
            i += 1
        if level != len(mult) - 1:
            i += 1  # downsample
    o = 0
    for level in reversed(range(len(mult))):
        for _ in range(nrb[level] + 1):
            outputs[o] = level
            o += 1
    return inputs, outputs


def build_unet(cfg: dict, device=None, seed: int | None = None) -> nn.Module:
    """Builds ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (the WebUI's ``sd_model.model.diffusion_model``).

    Args:
        cfg: UNetModel kwargs (ldm yaml ``unet_config.params``). sgm-style per-level ``transformer_depth`` lists
            (SDXL: ``[0, 2, 10]`` with ``transformer_depth_middle`` 10) are supported: the tree is built at the
            largest depth and each level's ``SpatialTransformer.transformer_blocks`` is then truncated to its depth,
            which gives the sgm module names (``input_blocks.4.1.transformer_blocks.1...``). ``adm_in_channels``
            (SDXL ``label_emb``) is dropped: no LoRA targets it. Note that ldm's ``SpatialTransformer.forward``
            needs a list context for depth > 1, so such trees are for structure and naming (meta), not forward.
        device: where to build (``"meta"``: no storage). Ignored while building when ``seed`` is given (CPU), then
            moved.
        seed: build with seeded random weights and re-randomise the zero-initialised layers (tiny models).

    Returns:
        the UNetModel in fp32 (or on meta), in train mode as constructed.

    Raises:
        lib_lora.errors.ConfigError: a kwarg the ldm UNetModel does not accept, or a bad depth list.
    """
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    kwargs = {k: v for k, v in cfg.items() if k not in _SGM_ONLY_UNET_KEYS}
    depth = kwargs.get("transformer_depth", 1)
    per_level = None
    if isinstance(depth, (list, tuple)):
        per_level = [int(d) for d in depth]
        if len(per_level) != len(kwargs["channel_mult"]):
            raise ConfigError(f"transformer_depth {per_level} needs one entry per channel_mult level "
                              f"{kwargs['channel_mult']}")
        middle = int(cfg.get("transformer_depth_middle", per_level[-1]))
        max_depth = max(per_level + [middle])
        kwargs["transformer_depth"] = max_depth
        if max_depth > 1 and kwargs.get("context_dim") is not None and not isinstance(kwargs["context_dim"], list):
            kwargs["context_dim"] = [kwargs["context_dim"]] * max_depth
    try:
        with _build_context(device, seed):
            unet = UNetModel(**kwargs)
    except TypeError as e:
        raise ConfigError(f"UNet config not accepted by ldm UNetModel: {e}") from e

    if per_level is not None:
        inputs, outputs = _level_of_blocks(kwargs)
        for blocks, levels in ((unet.input_blocks, inputs), (unet.output_blocks, outputs)):
            for idx, level in levels.items():
                for sub in blocks[idx]:
                    if hasattr(sub, "transformer_blocks"):
                        sub.transformer_blocks = sub.transformer_blocks[: per_level[level]]
        for sub in unet.middle_block:
            if hasattr(sub, "transformer_blocks"):
                sub.transformer_blocks = sub.transformer_blocks[:middle]
    return _finish(unet, device, seed, randomize_zero_layers)


def build_hf_clip_text(cfg: dict, device=None, seed: int | None = None) -> nn.Module:
    """Builds ``transformers.CLIPTextModel`` (SD1's ``cond_stage_model.wrapped.transformer``) from config kwargs.

    Args:
        cfg: ``CLIPTextConfig`` kwargs (see ``configs.HF_CLIP_L``).
        device: where to build; ``"meta"`` for no storage.
        seed: seeded random weights, LayerNorm affines randomised (weights 1+N(0, 0.1), biases N(0, 0.1)).

    Returns:
        the ``CLIPTextModel``; its state dict keys are ``text_model.*`` (checkpoint prefix
        ``cond_stage_model.transformer.``). Input ids (B, 77) -> last_hidden_state (B, 77, hidden).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    with _build_context(device, seed):
        model = CLIPTextModel(CLIPTextConfig(**cfg))
    return _finish(model, device, seed, randomize_layernorms)


def build_openclip_text(cfg: dict, device=None, seed: int | None = None) -> nn.Module:
    """Builds an open_clip ``CLIP`` without its vision tower (what ldm's ``FrozenOpenCLIPEmbedder`` holds as
    ``.model``), without any download.

    The model is ``open_clip.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu)`` with a minimal vision tower that
    is deleted right away (``del model.visual``), exactly as ldm does after ``create_model_and_transforms``. open_clip
    2.20 is sequence-first: ``transformer.resblocks[i]`` take (T, B, C); ``resblocks[i].attn`` is
    ``torch.nn.MultiheadAttention`` (fused ``in_proj_weight``), the MLP ``mlp.c_fc``/``mlp.c_proj``.

    Args:
        cfg: ``{"embed_dim", "quick_gelu", "text_cfg": CLIPTextCfg fields}`` (see ``configs.OPENCLIP_VIT_H``).
        device: where to build; ``"meta"`` for no storage.
        seed: seeded random weights, LayerNorm affines randomised.

    Returns:
        the open_clip ``CLIP`` module; state dict keys ``token_embedding.weight``, ``positional_embedding``,
        ``transformer.resblocks.N.*``, ``ln_final.*``, ``text_projection``, ``logit_scale`` (checkpoint prefix
        ``cond_stage_model.model.``).
    """
    import open_clip

    vision_cfg = {"layers": 1, "width": 64, "head_width": 64, "image_size": 14, "patch_size": 14}
    with _build_context(device, seed):
        model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=dict(cfg["text_cfg"]),
                               quick_gelu=bool(cfg.get("quick_gelu", False)))
        del model.visual
    return _finish(model, device, seed, randomize_layernorms)


class AutoencoderKL(nn.Module):
    """ldm's ``AutoencoderKL`` without its pytorch_lightning base (the WebUI's ``sd_model.first_stage_model``).

    Same submodules and state dict keys (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``) and
    the same ``encode`` / ``decode``, built from ldm's own ``Encoder`` / ``Decoder``; the training-only parts
    (loss, EMA, logging) are left out so pytorch_lightning is not needed.
    """

    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        if not ddconfig.get("double_z", True):
            raise ConfigError("VAE ddconfig double_z must be true (AutoencoderKL)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor):
        """(B, 3, H, W) pixels in [-1, 1] -> ldm ``DiagonalGaussianDistribution`` over (B, z, H/f, W/f)."""
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, h, w) unscaled latents -> (B, 3, h*f, w*f) pixels, nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def build_vae(cfg: dict, device=None, seed: int | None = None) -> nn.Module:
    """Builds :class:`AutoencoderKL` from ``{"embed_dim", "ddconfig"}`` (ldm yaml ``first_stage_config.params``).

    Args:
        cfg: see ``configs.VAE_SD``; ``lossconfig``/``monitor`` keys are ignored.
        device: where to build; ``"meta"`` for no storage.
        seed: seeded random weights (nothing in the VAE is zero-initialised).

    Raises:
        lib_lora.errors.ConfigError: missing ``ddconfig``/``embed_dim`` or ``double_z`` false.
    """
    if "ddconfig" not in cfg or "embed_dim" not in cfg:
        raise ConfigError(f"VAE config needs 'ddconfig' and 'embed_dim', got keys {sorted(cfg)}")
    with _build_context(device, seed):
        vae = AutoencoderKL(dict(cfg["ddconfig"]), int(cfg["embed_dim"]))
    return _finish(vae, device, seed, lambda m: None)


def randomize_zero_layers(unet: nn.Module) -> None:
    """Re-initialises, with the default PyTorch init and the current RNG, the layers ldm creates with
    ``zero_module``: the UNet ``out`` conv, every ``SpatialTransformer.proj_out`` and every ``ResBlock``'s last
    ``out_layers`` conv. Without this a random UNet ignores its context and LoRA-B gradients are zero."""
    todo = [unet.out[-1]]
    for m in unet.modules():
        if hasattr(m, "proj_out") and hasattr(m, "transformer_blocks"):
            todo.append(m.proj_out)
        if hasattr(m, "out_layers") and hasattr(m, "emb_layers"):
            todo.append(m.out_layers[-1])
    with torch.no_grad():
        for layer in todo:
            layer.reset_parameters()


def randomize_layernorms(module: nn.Module, std: float = 0.1) -> None:
    """Sets every ``nn.LayerNorm`` affine to weight 1 + N(0, std), bias N(0, std) with the current RNG (CLIP
    LayerNorms start at 1/0, which makes a random text encoder's output nearly prompt-independent)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.normal_(1.0, std)
                m.bias.normal_(0.0, std)
