"""WebUIModel on WebUI-shaped model objects (``tests/webui_models.py``: real ``LatentDiffusion`` from the shared
tiny SD1 checkpoint, a seeded tiny SD2 / SD2-v, the WebUI's hijack wrappers mirrored), and a duck-typed SDXL object.

What is proved: protocol conformance; prompt encoding equals the WebUI embedder's own output and the headless
model's for the same weights; ``unet_forward`` equals ``sd_model.apply_model``; a 2-step ``Trainer`` run writes a
LoRA whose keys are those of the reference Kohya file for this checkpoint (which loads in the WebUI) and leaves the
checksum unchanged; ``training_session`` restores flags and modes also when the body raises, and reports changed
weights; ``detect_support`` / ``check_memory_flags`` messages; SDXL conditioning mechanics.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _paths import REFERENCE_LORA_DIR, dog_photos
from torch import nn
from webui_models import TINY_SD1_CKPT, make_webui_sd1, make_webui_sd2

from lib_lora.config import TrainConfig
from lib_lora.errors import ConfigError
from lib_lora.model_api import DiffusionModel
from lib_lora.safetensors_io import load_lora_file
from lib_lora.trainer import Trainer
from lib_lora.webui_model import (
    WebUIModel,
    WeightsChangedError,
    check_memory_flags,
    detect_support,
    training_session,
    weights_checksum,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["a photo of a sks dog", "a dog, " * 40]  # the second one spans two 75-token chunks


@pytest.fixture(scope="module")
def sd1():
    return make_webui_sd1()


@pytest.fixture(scope="module")
def sd2v():
    return make_webui_sd2(v_prediction=True)


def _modules(kohya_file: Path) -> set[str]:
    tensors, _ = load_lora_file(kohya_file)
    return {k.split(".", 1)[0] for k in tensors}


# ------------------------------------------------------------------------------------------------ the builders
def test_builders_make_webui_shaped_objects(sd1, sd2v):
    from ldm.models.diffusion.ddpm import LatentDiffusion

    for m, flag in ((sd1, "is_sd1"), (sd2v, "is_sd2")):
        assert isinstance(m, LatentDiffusion) and getattr(m, flag) and not m.is_sdxl and not m.is_sd3
        assert not m.training and m.latent_channels == 4 and m.lowvram is False
        assert m.network_layer_mapping["diffusion_model_out_2"] is m.model.diffusion_model.out[2]
        assert m.model.diffusion_model.out[2].network_layer_name == "diffusion_model_out_2"
    assert sd1.parameterization == "eps" and sd2v.parameterization == "v"
    assert "transformer_text_model_encoder_layers_0_self_attn_q_proj" in sd1.network_layer_mapping
    assert "model_transformer_resblocks_0_attn" in sd2v.network_layer_mapping
    assert sd1.cond_stage_model(PROMPTS).shape == (2, 154, 32)
    # the checkpoint was really loaded: a tensor equals the file's
    from safetensors.torch import load_file

    ref = load_file(str(TINY_SD1_CKPT))["model.diffusion_model.out.2.weight"]
    assert torch.equal(sd1.model.diffusion_model.out[2].weight, ref)


# -------------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("which", ["sd1", "sd2v"])
def test_protocol(which, request):
    sd_model = request.getfixturevalue(which)
    m = WebUIModel(sd_model)
    assert isinstance(m, DiffusionModel)
    assert m.arch == ("sd1" if which == "sd1" else "sd2")
    assert m.prediction_type == ("epsilon" if which == "sd1" else "v_prediction")
    assert m.unet is sd_model.model.diffusion_model
    assert m.alphas_cumprod.dtype == torch.float32 and m.alphas_cumprod.shape == (1000,)
    assert torch.allclose(m.alphas_cumprod, sd_model.alphas_cumprod.float())
    assert m.latent_scale_factor == pytest.approx(0.18215)
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert m.name.endswith(".safetensors")
    te = m.text_encoders
    assert len(te) == 1 and te[0].prefix == "lora_te"
    if which == "sd1":
        assert te[0].module is sd_model.cond_stage_model.wrapped.transformer and te[0].layers_used is None
    else:
        assert te[0].module is sd_model.cond_stage_model.wrapped.model and te[0].layers_used == 2


@pytest.mark.parametrize("which", ["sd1", "sd2v"])
def test_encode_prompts_equals_the_webui_embedder(which, request):
    sd_model = request.getfixturevalue(which)
    with torch.no_grad():
        ours = WebUIModel(sd_model).encode_prompts(PROMPTS).crossattn
        theirs = sd_model.cond_stage_model(PROMPTS)
    assert ours.shape == theirs.shape == (2, 154, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_encode_prompts_equals_the_headless_model_for_the_same_checkpoint(sd1):
    from lib_lora.model.headless import load_model

    headless = load_model(TINY_SD1_CKPT)
    with torch.no_grad():
        for skip in (1, 2):
            ours = WebUIModel(sd1).encode_prompts(PROMPTS, clip_skip=skip).crossattn
            torch.testing.assert_close(ours, headless.encode_prompts(PROMPTS, clip_skip=skip).crossattn,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["sd1", "sd2v"])
def test_unet_forward_equals_apply_model(which, request):
    sd_model = request.getfixturevalue(which)
    m = WebUIModel(sd_model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        cond = m.encode_prompts(PROMPTS[:1] * 2)
        ours = m.unet_forward(x, t, cond)
        theirs = sd_model.apply_model(x, t, cond.crossattn)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_encode_decode_images_round_trip_shapes(sd1):
    m = WebUIModel(sd1)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    lat = m.encode_images(pixels, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 8, 8)
    with torch.no_grad():
        post = sd1.encode_first_stage(pixels)
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lat, (post.mean + post.std * noise) * 0.18215)
    assert m.decode_latents(lat).shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------------------------------- training
def _dataset(root: Path) -> Path:
    sub = root / "1_sks dog"
    sub.mkdir(parents=True)
    for photo in dog_photos()[:2]:
        shutil.copyfile(photo, sub / photo.name)
    return root


def _config(data: Path, out: Path, **changes) -> TrainConfig:
    base = dict(model="webui", train_data_dir=str(data), output_dir=str(out), output_name="w",
                trigger_words=["sks dog"], resolution=64, min_bucket_reso=64, max_bucket_reso=128, network_dim=4,
                network_alpha=4.0, learning_rate=1e-3, train_batch_size=1, max_train_steps=2,
                save_every_n_steps=None, save_precision="float", seed=0, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


def test_two_step_run_on_sd1_writes_builtin_names_and_leaves_the_model_unchanged(sd1, tmp_path):
    before = weights_checksum(sd1)
    grads = {n: p.requires_grad for n, p in sd1.named_parameters()}
    calls = []
    with training_session(sd1, undo_lora=lambda: calls.append("undo_lora"),
                          undo_optimizations=lambda: calls.append("undo_opt"),
                          apply_optimizations=lambda: calls.append("apply_opt"),
                          torch_gc=lambda: calls.append("gc")) as session:
        assert not any(p.requires_grad for p in sd1.parameters())
        result = Trainer(_config(_dataset(tmp_path / "data"), tmp_path / "out"), WebUIModel(sd1)).run()
    assert calls == ["undo_lora", "undo_opt", "apply_opt", "gc"]
    assert session.checksum == session.checksum_after == before == weights_checksum(sd1)
    assert {n: p.requires_grad for n, p in sd1.named_parameters()} == grads
    files = sorted((tmp_path / "out").glob("w*.safetensors"))
    assert files, result
    names = _modules(files[-1])
    assert names == _modules(REFERENCE_LORA_DIR / "test_lora.safetensors")  # loads in the WebUI (its README)
    assert any(n.startswith("lora_te_text_model_encoder_layers_") for n in names)


def test_two_step_run_on_sd2_v(sd2v, tmp_path):
    before = weights_checksum(sd2v)
    with training_session(sd2v):
        Trainer(_config(_dataset(tmp_path / "data"), tmp_path / "out"), WebUIModel(sd2v)).run()
    assert weights_checksum(sd2v) == before
    tensors, meta = load_lora_file(sorted((tmp_path / "out").glob("w*.safetensors"))[-1])
    names = {k.split(".", 1)[0] for k in tensors}
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in names)
    te = {n for n in names if n.startswith("lora_te_")}
    for layer in (0, 1):  # layers_used = 2 of 3; all four attention projections (built-in MHA rule)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}" in te
    assert not any("layers_2_" in n for n in te)
    assert meta.get("ss_v2") == "True" and meta.get("ss_base_model_version") == "sd_v2_v"


# -------------------------------------------------------------------------------------------- training_session
def test_training_session_restores_flags_and_modes_when_the_body_raises(sd1):
    sd1.model.diffusion_model.input_blocks[1].train()  # a mixed state, to see it restored exactly
    grads = {n: p.requires_grad for n, p in sd1.named_parameters()}
    modes = {n: m.training for n, m in sd1.named_modules()}
    gc = []
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with training_session(sd1, torch_gc=lambda: gc.append(1)) as session:
                sd1.model.diffusion_model.train()
                sd1.requires_grad_(True)
                raise RuntimeError("boom")
        assert session.error is None and gc == [1]
        assert {n: p.requires_grad for n, p in sd1.named_parameters()} == grads
        assert {n: m.training for n, m in sd1.named_modules()} == modes
    finally:
        sd1.model.diffusion_model.input_blocks[1].eval()


def test_training_session_reports_changed_weights(sd2v):
    w = sd2v.model.diffusion_model.out[2].weight
    original = w.detach().clone()
    try:
        with pytest.raises(WeightsChangedError, match="reload the checkpoint"):
            with training_session(sd2v):
                with torch.no_grad():
                    w.add_(1.0)
        with pytest.raises(KeyError):  # the body's own error wins; the change is recorded
            with training_session(sd2v) as session:
                with torch.no_grad():
                    w.add_(1.0)
                raise KeyError("x")
        assert isinstance(session.error, WeightsChangedError)
    finally:
        with torch.no_grad():
            w.copy_(original)


# -------------------------------------------------------------------------------------------------- refusals
def test_detect_support_messages(sd1):
    assert detect_support(sd1) is None
    assert "No Stable Diffusion model" in detect_support(None)
    forge = SimpleNamespace(forge_objects=object(), is_sd1=True, model=None, cond_stage_model=None)
    assert "Forge" in detect_support(forge)
    sd3 = SimpleNamespace(is_sd3=True, model=SimpleNamespace(diffusion_model=nn.Linear(1, 1)))
    assert "SD3" in detect_support(sd3)
    assert "Flux" in detect_support(SimpleNamespace(is_flux=True))
    assert "not a Stable Diffusion" in detect_support(SimpleNamespace(model=None))
    with pytest.raises(ConfigError, match="Forge"):
        WebUIModel(forge)


def test_check_memory_flags():
    assert "--lowvram" in check_memory_flags(True, False, False)
    assert check_memory_flags(False, True, False) is None
    assert "--medvram" in check_memory_flags(False, True, True)
    assert check_memory_flags(False, False, True) is None


# ------------------------------------------------------------------------------------------------------ SDXL
class _Wrapped(nn.Module):
    def __init__(self, **parts):
        super().__init__()
        for k, v in parts.items():
            setattr(self, k, v)


class _SizeEmbedder(nn.Module):
    """sgm ``ConcatTimestepEmbedderND`` (outdim 4 here): (B, 2) -> (B, 2 * outdim) sinusoidal embeddings."""

    def __init__(self, outdim: int = 4):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class _YUNet(nn.Module):
    """Stands in for sgm's ``UNetModel`` with ``adm_in_channels``: records ``context`` and ``y``."""

    channel_mult = (1, 2)
    in_channels = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x, timesteps, context=None, y=None):
        self.seen = (context, y)
        return self.conv(x) + context.mean() + y.mean()


def _sdxl_like():
    """A duck-typed A1111 SDXL object (``sd_models_xl``/sgm layout: ``conditioner.embedders`` with hijack
    ``.wrapped``: [0] HF CLIP ``.transformer`` with ``layer_idx``, [1] open_clip ``.model``, [2..4] size
    embedders; ``model.diffusion_model`` taking ``y``; ``first_stage_model`` with ``encoder``/``quant_conv``);
    tiny real HF CLIP and open_clip text models."""
    from lib_lora.model import build, configs
    from lib_lora.model.headless import scaled_linear_alphas_cumprod

    te1 = build.build_hf_clip_text(dict(configs.HF_CLIP_TINY), seed=1)
    te2 = build.build_openclip_text(dict(configs.OPENCLIP_TINY), seed=2)
    vae = build.build_vae(dict(configs.VAE_TINY), seed=3)
    conditioner = nn.Module()
    conditioner.embedders = nn.ModuleList([_Wrapped(wrapped=_Wrapped(transformer=te1, layer_idx=1)),
                                           _Wrapped(wrapped=_Wrapped(model=te2)),
                                           _SizeEmbedder(), _SizeEmbedder(), _SizeEmbedder()])
    sd = nn.Module()
    sd.conditioner = conditioner
    sd.model = _Wrapped(diffusion_model=_YUNet())
    sd.first_stage_model = vae
    sd.is_sdxl, sd.is_sd1, sd.is_sd2, sd.is_sd3, sd.latent_channels = True, False, False, False, 4
    sd.parameterization, sd.scale_factor = "eps", 0.13025
    sd.alphas_cumprod = scaled_linear_alphas_cumprod().half()
    sd.sd_checkpoint_info = SimpleNamespace(filename="/m/tiny-xl.safetensors")
    return sd, te1, te2


def test_sdxl_mechanics():
    sd, te1, te2 = _sdxl_like()
    assert detect_support(sd) is None
    m = WebUIModel(sd)
    assert m.arch == "sdxl" and m.latent_scale_factor == pytest.approx(0.13025)
    assert m.alphas_cumprod.dtype == torch.float32
    assert [(t.prefix, t.module) for t in m.text_encoders] == [("lora_te1", te1), ("lora_te2", te2)]
    sizes = [(64, 96, 0, 8, 64, 64), (128, 128, 0, 0, 64, 64)]
    cond = m.encode_prompts(PROMPTS, sizes=sizes)
    assert cond.crossattn.shape == (2, 154, 64)  # 32 (CLIP-L) + 32 (bigG) per token
    assert cond.vector.shape == (2, 32 + 3 * 8)
    with torch.no_grad():  # crossattn halves: CLIP-L hidden_states[layer_idx], bigG penultimate without ln_final
        ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
        h1 = te1(input_ids=ids, output_hidden_states=True).hidden_states[1]
        one = m.encode_prompts(["a photo"], sizes=sizes[:1])
        torch.testing.assert_close(one.crossattn[:, :77, :32], h1)
        emb = sd.conditioner.embedders
        st = torch.tensor(sizes[:1], dtype=torch.float32)
        torch.testing.assert_close(one.vector[:, 32:], torch.cat([emb[2](st[:, :2]), emb[3](st[:, 2:4]),
                                                                  emb[4](st[:, 4:])], 1))
    out = m.unet_forward(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), cond)
    assert out.shape == (2, 4, 8, 8) and sd.model.diffusion_model.seen[1] is cond.vector
    lat = m.encode_images(torch.zeros(1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 8, 8)
    before = weights_checksum(sd)
    with training_session(sd):
        pass
    assert weights_checksum(sd) == before
    with pytest.raises(ConfigError):
        m.encode_prompts(["a"], sizes=sizes)


def test_half_base_weights_train_an_fp32_lora_under_the_callers_autocast(tmp_path):
    """bf16 UNet/text weights (GroupNorm/LayerNorm kept fp32, as the WebUI's upcast does; CPU autocast does not
    upcast group_norm the way CUDA autocast does), fp32 LoRA, autocast passed by the caller."""
    from lib_lora.model.headless import _norms_to_fp32

    sd = make_webui_sd1()
    sd.cond_stage_model.to(torch.bfloat16)
    sd.model.to(torch.bfloat16)
    _norms_to_fp32(sd.model)
    before = weights_checksum(sd)
    m = WebUIModel(sd, autocast=lambda: torch.autocast("cpu", torch.bfloat16))
    assert m.dtype == torch.bfloat16 and m.vae_dtype == torch.float32
    with training_session(sd):
        Trainer(_config(_dataset(tmp_path / "data"), tmp_path / "out", mixed_precision="bf16"), m).run()
    assert weights_checksum(sd) == before
    tensors, _ = load_lora_file(sorted((tmp_path / "out").glob("w*.safetensors"))[-1])
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in tensors.values())
