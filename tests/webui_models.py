"""Builders of WebUI-shaped model objects at tiny sizes, made the way A1111 v1.10.1 makes ``shared.sd_model``.

The model classes are the real ones (``ldm.models.diffusion.ddpm.LatentDiffusion`` instantiated from an ldm yaml
with ``ldm.util.instantiate_from_config``, ldm ``FrozenCLIPEmbedder`` / ``FrozenOpenCLIPEmbedder``, HF
``CLIPTextModel``, open_clip ``CLIP``); what the WebUI adds on top of them is mirrored by small stand-ins, each
naming the WebUI file it copies:

- ``modules/sd_disable_initialization.py`` ``DisableInitialization``: ``CLIPTextModel.from_pretrained(version)``
  builds the text model from ``config.json`` only (no weights file is read; the checkpoint supplies them);
- ``modules/sd_models.py`` ``load_model`` / ``load_model_weights`` / ``set_model_type``: ``load_state_dict(...,
  strict=False)``, ``eval()``, the ``is_sd1``/``is_sd2``/``is_sdxl``/``is_sd3``, ``sd_checkpoint_info``,
  ``sd_model_hash``, ``lowvram``, ``latent_channels`` attributes (the UNet keeps ``requires_grad=True``, as ldm
  leaves it; text encoder and VAE are frozen by ldm's ``instantiate_cond_stage`` / ``instantiate_first_stage``);
- ``modules/sd_hijack.py`` ``EmbeddingsWithFixes`` (wraps the token embedding; no textual-inversion fixes here)
  and ``modules/sd_hijack_clip.py`` ``FrozenCLIPEmbedderWithCustomWords`` /
  ``modules/sd_hijack_open_clip.py`` ``FrozenOpenCLIPEmbedderWithCustomWords`` (``.wrapped`` = the ldm embedder;
  called on a list of strings it returns (B, 77k, C): 75-token chunks, ``[bos] chunk [eos] pad``, no emphasis
  parsing and no comma backtracking);
- ``extensions-builtin/Lora/networks.py`` ``assign_network_names_to_compvis_modules``: ``network_layer_mapping``
  and each module's ``network_layer_name``.

``pytorch_lightning`` (the base class of ldm's ``DDPM`` and ``AutoencoderKL``; the WebUI pins 1.9.4) is used when
installed; otherwise :func:`_ensure_pytorch_lightning` registers a minimal module providing ``LightningModule`` (an
``nn.Module`` with a ``device`` property) and ``utilities.distributed.rank_zero_only``, which is all that
``LatentDiffusion.__init__``, ``apply_model`` and the encoders use. Nothing of PL's training loop is involved.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from _paths import SHARED_DATA
from torch import nn

TINY_SD1_DIR = SHARED_DATA / "webui-tiny-sd1"
TINY_SD1_CKPT = TINY_SD1_DIR / "tiny-sd1.safetensors"
TINY_SD1_YAML = TINY_SD1_DIR / "tiny-sd1.yaml"
TINY_SD1_TEXT = TINY_SD1_DIR / "tiny-sd1-clip-text"

#: ldm yaml of the tiny SD2-shaped model (v2-inference.yaml layout at tiny widths: linear proj_in/out, per-head
#: width 16, context 32, OpenCLIP text run to the penultimate layer).
TINY_SD2_CONFIG = {
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 2],
            "num_head_channels": 16, "use_linear_in_transformer": True, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 32, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                         "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                         "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        # The real one is FrozenOpenCLIPEmbedder(arch="ViT-H-14", layer="penultimate"), whose constructor downloads
        # ViT-H; a placeholder is instantiated and replaced (see make_webui_sd2).
        "cond_stage_config": {"target": "torch.nn.Identity"},
    },
}
TINY_OPENCLIP = {"embed_dim": 32, "quick_gelu": False,
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}


# --------------------------------------------------------------------------------------------- pytorch_lightning
def _ensure_pytorch_lightning() -> None:
    """Registers a minimal ``pytorch_lightning`` module when the real one is not installed (see module doc)."""
    if "pytorch_lightning" in sys.modules or importlib.util.find_spec("pytorch_lightning") is not None:
        return

    class LightningModule(nn.Module):
        """``nn.Module`` plus the ``device`` property ldm's DDPM reads (PL's DeviceDtypeModuleMixin)."""

        @property
        def device(self) -> torch.device:
            p = next(self.parameters(), None)
            return p.device if p is not None else torch.device("cpu")

    def rank_zero_only(fn):
        return fn

    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = LightningModule
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = rank_zero_only
    utilities.distributed = distributed
    pl.utilities = utilities
    sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
                        "pytorch_lightning.utilities.distributed": distributed})


@contextlib.contextmanager
def _clip_from_config_only():
    """``modules/sd_disable_initialization.py`` ``DisableInitialization``: ``CLIPTextModel.from_pretrained(path)``
    builds the model from the folder's ``config.json`` without reading weights (the checkpoint supplies them)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    original = CLIPTextModel.__dict__.get("from_pretrained")  # None: inherited from PreTrainedModel

    def from_pretrained(cls, path, *args, **kwargs):
        return cls(CLIPTextConfig.from_pretrained(path))

    CLIPTextModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        if original is None:
            del CLIPTextModel.from_pretrained
        else:
            CLIPTextModel.from_pretrained = original


def _instantiate(config: dict) -> nn.Module:
    """``ldm.util.instantiate_from_config`` of an ldm model config (quietly: ldm prints while building)."""
    from omegaconf import OmegaConf

    _ensure_pytorch_lightning()
    from ldm.util import instantiate_from_config

    with contextlib.redirect_stdout(io.StringIO()):
        return instantiate_from_config(OmegaConf.create(config))


# -------------------------------------------------------------------------------------------- WebUI stand-ins
class EmbeddingsWithFixes(nn.Module):
    """``modules/sd_hijack.py`` ``EmbeddingsWithFixes``: wraps the token embedding (``.wrapped``) so textual
    inversion vectors can be spliced in; with no embeddings loaded it returns ``wrapped(input_ids)``."""

    def __init__(self, wrapped: nn.Embedding):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wrapped(input_ids)


class _CustomWordsBase(nn.Module):
    """``modules/sd_hijack_clip.py`` ``TextConditionalModel`` / ``FrozenCLIPEmbedderWithCustomWords`` without
    emphasis, textual inversion and comma backtracking: prompts -> 75-token chunks -> (B, 77k, C)."""

    chunk_length = 75

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = None
        self.return_pooled = False

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(list(texts))
        n = max(1, max((len(t) + self.chunk_length - 1) // self.chunk_length for t in ids))
        chunks = []
        for i in range(n):
            rows = []
            for t in ids:
                part = t[i * self.chunk_length:(i + 1) * self.chunk_length]
                row = [self.id_start] + part + [self.id_end]
                rows.append(row + [self.id_pad] * (self.chunk_length + 2 - len(row)))
            chunks.append(self.encode_with_transformers(torch.tensor(rows, device=self._device())))
        return torch.cat(chunks, dim=1)

    def _device(self) -> torch.device:
        return next(self.wrapped.parameters()).device


class FrozenCLIPEmbedderWithCustomWords(_CustomWordsBase):
    """``modules/sd_hijack_clip.py`` ``FrozenCLIPEmbedderWithCustomWords`` around ldm's ``FrozenCLIPEmbedder``
    (HF tokenizer and ``CLIPTextModel``); pads with eos; ``clip_skip`` = ``opts.CLIP_stop_at_last_layers``."""

    def __init__(self, wrapped: nn.Module, clip_skip: int = 1):
        super().__init__(wrapped)
        vocab = wrapped.tokenizer.get_vocab()
        self.id_start, self.id_end = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.id_pad = self.id_end
        self.clip_skip = clip_skip

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.clip_skip > 1)
        if self.clip_skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
        return out.last_hidden_state


class FrozenOpenCLIPEmbedderWithCustomWords(_CustomWordsBase):
    """``modules/sd_hijack_open_clip.py`` ``FrozenOpenCLIPEmbedderWithCustomWords`` around ldm's
    ``FrozenOpenCLIPEmbedder``: open_clip's tokenizer, pad id 0, ``wrapped.encode_with_transformer``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__(wrapped)
        from open_clip import tokenizer

        self._tokenizer = tokenizer._tokenizer
        self.id_start = self._tokenizer.encoder["<start_of_text>"]
        self.id_end = self._tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self._tokenizer.encode(t) for t in texts]

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.wrapped.encode_with_transformer(tokens)


def assign_network_names(sd_model: nn.Module) -> None:
    """``extensions-builtin/Lora/networks.py`` ``assign_network_names_to_compvis_modules`` for SD1/SD2: names of
    ``cond_stage_model.wrapped.named_modules()`` and of ``sd_model.model.named_modules()`` (so UNet names start
    with ``diffusion_model_``), dots replaced by ``_``; sets ``sd_model.network_layer_mapping`` and every module's
    ``network_layer_name``."""
    mapping = {}
    for name, module in sd_model.cond_stage_model.wrapped.named_modules():
        key = name.replace(".", "_")
        mapping[key] = module
        module.network_layer_name = key
    for name, module in sd_model.model.named_modules():
        key = name.replace(".", "_")
        mapping[key] = module
        module.network_layer_name = key
    sd_model.network_layer_mapping = mapping


def _set_webui_attributes(sd_model: nn.Module, *, arch: str, filename: Path, model_hash: str) -> None:
    """``modules/sd_models.py`` ``set_model_type`` and the attributes ``load_model`` sets."""
    sd_model.is_sd1, sd_model.is_sd2 = arch == "sd1", arch == "sd2"
    sd_model.is_sdxl = sd_model.is_ssd = sd_model.is_sd3 = sd_model.is_sdxl_inpaint = False
    sd_model.model_type = {"sd1": "SD1", "sd2": "SD2"}[arch]
    sd_model.latent_channels = 4
    sd_model.lowvram = False
    sd_model.sd_checkpoint_info = SimpleNamespace(
        filename=str(filename), name=filename.name, name_for_extra=filename.stem, model_name=filename.stem,
        hash=model_hash[:8], sha256=None, shorthash=model_hash[:10], title=f"{filename.name} [{model_hash[:10]}]")
    sd_model.sd_model_hash = model_hash[:8]
    sd_model.sd_model_checkpoint = str(filename)


def _hijack_embeddings(token_owner: nn.Module, attr: str) -> None:
    setattr(token_owner, attr, EmbeddingsWithFixes(getattr(token_owner, attr)))


def make_webui_sd1(device="cpu") -> nn.Module:
    """The shared tiny SD1 checkpoint loaded as A1111 v1.10.1 loads it (``--no-half``: fp32).

    ``ldm.models.diffusion.ddpm.LatentDiffusion`` from ``tiny-sd1.yaml`` (cond stage ``version`` rewritten to the
    absolute ``tiny-sd1-clip-text`` path; ``CLIPTextModel`` built from its config as
    ``sd_disable_initialization`` does), weights of ``tiny-sd1.safetensors`` loaded with ``strict=False``
    (``sd_models.load_model_weights``), ``eval()``; then ``sd_hijack.model_hijack.hijack``: the token embedding
    wrapped in :class:`EmbeddingsWithFixes` and ``cond_stage_model`` replaced by
    :class:`FrozenCLIPEmbedderWithCustomWords` (``cond_stage_model.wrapped`` = the ldm ``FrozenCLIPEmbedder``);
    then the ``set_model_type`` attributes and Lora's ``network_layer_mapping`` (:func:`assign_network_names`).

    Returns the ``LatentDiffusion`` on ``device`` (``parameterization`` "eps"). About 0.5 s.
    """
    import pytest
    import yaml

    if not TINY_SD1_CKPT.is_file():
        pytest.skip(f"shared tiny checkpoint not found: {TINY_SD1_CKPT}")
    config = yaml.safe_load(TINY_SD1_YAML.read_text(encoding="utf-8"))["model"]
    config["params"]["cond_stage_config"]["params"]["version"] = str(TINY_SD1_TEXT)
    config["params"]["cond_stage_config"]["params"]["device"] = str(device)
    with _clip_from_config_only():
        sd_model = _instantiate(config)
    from safetensors.torch import load_file

    state = load_file(str(TINY_SD1_CKPT))
    sd_model.load_state_dict(state, strict=False)
    sd_model.eval()
    wrapped = sd_model.cond_stage_model
    _hijack_embeddings(wrapped.transformer.text_model.embeddings, "token_embedding")
    sd_model.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(wrapped)
    _set_webui_attributes(sd_model, arch="sd1", filename=TINY_SD1_CKPT, model_hash="7e432a451b44" + "0" * 52)
    sd_model.to(device)
    assign_network_names(sd_model)
    return sd_model


def make_webui_sd2(device="cpu", v_prediction: bool = False, seed: int = 0) -> nn.Module:
    """A tiny SD2-shaped WebUI model with seeded random weights (no shared file exists for SD2).

    ``LatentDiffusion`` from :data:`TINY_SD2_CONFIG` (``v2-inference(-v).yaml`` layout: linear proj_in/out,
    ``parameterization`` "v" when ``v_prediction``); the cond stage is an ldm ``FrozenOpenCLIPEmbedder`` made with
    ``object.__new__`` + ``nn.Module.__init__`` (its constructor would download ViT-H) holding a tiny open_clip
    ``CLIP`` without ``visual`` (3 layers, width 32; ``layer="penultimate"``, frozen), wrapped as the WebUI's
    :class:`FrozenOpenCLIPEmbedderWithCustomWords` with the token embedding in :class:`EmbeddingsWithFixes`.
    The layers ldm zero-initialises and the LayerNorm affines are re-randomised (seeded) so that outputs depend
    on prompt and LoRA. Attributes as :func:`make_webui_sd1`. About 0.5 s.
    """
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

    from lib_lora.model.build import build_openclip_text, randomize_layernorms, randomize_zero_layers

    config = copy.deepcopy(TINY_SD2_CONFIG)
    if v_prediction:
        config["params"]["parameterization"] = "v"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sd_model = _instantiate(config)
        randomize_zero_layers(sd_model.model.diffusion_model)
    embedder = object.__new__(FrozenOpenCLIPEmbedder)
    nn.Module.__init__(embedder)
    embedder.model = build_openclip_text(TINY_OPENCLIP, seed=seed + 100)
    embedder.device, embedder.max_length = str(device), 77
    embedder.layer, embedder.layer_idx = "penultimate", 1
    embedder.freeze()
    from ldm.models.diffusion.ddpm import disabled_train

    embedder.train = types.MethodType(disabled_train, embedder)  # as ldm's instantiate_cond_stage leaves it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 200)
        randomize_layernorms(sd_model.model.diffusion_model)
    sd_model.eval()
    _hijack_embeddings(embedder.model, "token_embedding")
    sd_model.cond_stage_model = FrozenOpenCLIPEmbedderWithCustomWords(embedder)
    name = "tiny-sd2-v.safetensors" if v_prediction else "tiny-sd2.safetensors"
    _set_webui_attributes(sd_model, arch="sd2", filename=Path("/models/Stable-diffusion") / name,
                          model_hash=f"{seed:064x}")
    sd_model.to(device)
    assign_network_names(sd_model)
    return sd_model
