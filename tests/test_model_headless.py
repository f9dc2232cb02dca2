"""HeadlessModel: embedded tiny models, the shared WebUI tiny checkpoint, key errors, save/load round trips."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from _paths import SHARED_DATA

from lib_lora.errors import ConfigError
from lib_lora.model import ModelLoadError, load_model, save_checkpoint
from lib_lora.model.headless import (
    HeadlessModel,
    _build_parts,
    _config_for,
    _load_into,
    detect_arch,
    scaled_linear_alphas_cumprod,
    webui_key_replacements,
)
from lib_lora.model_api import Conditioning, DiffusionModel

WEBUI_TINY_SD1 = SHARED_DATA / "webui-tiny-sd1"  # the shared WebUI test checkpoint (see conftest.py)
SHARED_CKPT = WEBUI_TINY_SD1 / "tiny-sd1.safetensors"

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tiny1(tok_cache):
    return load_model("tiny-sd1", tokenizer_cache=tok_cache)


@pytest.fixture(scope="module")
def tiny2(tok_cache):
    return load_model("tiny-sd2", tokenizer_cache=tok_cache)


@pytest.fixture(scope="module")
def shared(tok_cache):
    if not SHARED_CKPT.is_file():
        pytest.skip("shared tiny checkpoint not found")
    return load_model(SHARED_CKPT, tokenizer_cache=tok_cache)


def _pixels(b=2, h=64, w=64):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _check_finite_pipeline(m: HeadlessModel, context_dim: int):
    lat = m.encode_images(_pixels(), generator=torch.Generator().manual_seed(1))
    assert lat.shape == (2, 4, 8, 8) and lat.dtype == torch.float32 and torch.isfinite(lat).all()
    cond = m.encode_prompts(["a photo of a cat", "a dog"])
    assert cond.crossattn.shape == (2, 77, context_dim) and torch.isfinite(cond.crossattn).all()
    assert cond.vector is None
    out = m.unet_forward(lat, torch.tensor([10, 900]), cond)
    assert out.shape == lat.shape and torch.isfinite(out).all()
    dec = m.decode_latents(lat)
    assert dec.shape == (2, 3, 64, 64) and dec.min() >= -1 and dec.max() <= 1
    return lat, cond, out


def test_embedded_models_build_fast_and_deterministic(tok_cache):
    for name in ("tiny-sd1", "tiny-sd2"):
        t0 = time.perf_counter()
        a = load_model(name, tokenizer_cache=tok_cache)
        assert time.perf_counter() - t0 < 10
        b = load_model(name, tokenizer_cache=tok_cache)
        c = load_model(name, seed=1, tokenizer_cache=tok_cache)
        sa, sb, sc = a.ldm_state_dict(), b.ldm_state_dict(), c.ldm_state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.startswith("model."))


def test_protocol_and_attributes(tiny1, tiny2):
    for m in (tiny1, tiny2):
        assert isinstance(m, DiffusionModel)
        assert m.alphas_cumprod.shape == (1000,) and m.alphas_cumprod.dtype == torch.float32
        assert m.latent_scale_factor == pytest.approx(0.18215)
        assert m.device == torch.device("cpu") and m.dtype == torch.float32
        assert not any(p.requires_grad for p in m.unet.parameters())
    assert (tiny1.arch, tiny1.prediction_type, tiny1.name) == ("sd1", "epsilon", "tiny-sd1")
    assert (tiny2.arch, tiny2.prediction_type) == ("sd2", "v_prediction")
    (te1,) = tiny1.text_encoders
    assert te1.prefix == "lora_te" and te1.layers_used is None
    assert type(te1.module).__name__ == "CLIPTextModel"
    (te2,) = tiny2.text_encoders
    assert te2.prefix == "lora_te" and te2.layers_used == 2 and len(te2.module.transformer.resblocks) == 3
    torch.testing.assert_close(tiny1.alphas_cumprod, scaled_linear_alphas_cumprod())


def test_tiny_models_give_finite_outputs(tiny1, tiny2):
    _check_finite_pipeline(tiny1, 32)
    _check_finite_pipeline(tiny2, 32)


def test_shared_webui_checkpoint_loads_with_its_yaml(shared):
    assert (shared.arch, shared.prediction_type, shared.name) == ("sd1", "epsilon", "tiny-sd1.safetensors")
    assert shared.text_model.config.num_attention_heads == 2  # from tiny-sd1-clip-text/config.json
    assert shared.config["unet"]["model_channels"] == 32
    _check_finite_pipeline(shared, 32)
    from safetensors.torch import load_file

    sd = load_file(str(SHARED_CKPT))
    torch.testing.assert_close(shared.alphas_cumprod, sd["alphas_cumprod"])
    torch.testing.assert_close(shared.unet.out[2].weight, sd["model.diffusion_model.out.2.weight"])


def test_prompt_changes_unet_output(shared):
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    a = shared.unet_forward(lat, t, shared.encode_prompts(["a photo of a cat"]))
    b = shared.unet_forward(lat, t, shared.encode_prompts(["a red car"]))
    assert (a - b).abs().max() > 1e-3


def test_clip_skip(shared):
    one = shared.encode_prompts(["a photo of a cat"]).crossattn
    two = shared.encode_prompts(["a photo of a cat"], clip_skip=2).crossattn
    assert not torch.allclose(one, two)
    te = shared.text_model
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71])
    hs = te(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(two, te.text_model.final_layer_norm(hs[-2]))
    with pytest.raises(ConfigError, match="clip_skip"):
        shared.encode_prompts(["x"], clip_skip=3)


def test_sd2_encodes_to_penultimate_layer(tiny2):
    import open_clip

    m = tiny2.text_model
    ids = open_clip.tokenize(["a photo of a cat"])
    x = (m.token_embedding(ids) + m.positional_embedding).permute(1, 0, 2)
    for r in m.transformer.resblocks[:2]:
        x = r(x, attn_mask=m.attn_mask)
    expected = m.ln_final(x.permute(1, 0, 2))
    torch.testing.assert_close(tiny2.encode_prompts(["a photo of a cat"]).crossattn, expected)


def test_long_prompts_give_more_chunks(tiny1):
    cond = tiny1.encode_prompts(["cat " * 80, "dog"])
    assert cond.crossattn.shape == (2, 154, 32)
    out = tiny1.unet_forward(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), cond)
    assert torch.isfinite(out).all()


def test_gradients_reach_text_encoder_and_unet(tiny1):
    q = tiny1.text_model.text_model.encoder.layers[0].self_attn.q_proj.weight
    k = tiny1.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight
    q.requires_grad_(True)
    k.requires_grad_(True)
    try:
        cond = tiny1.encode_prompts(["a photo of a cat"])
        out = tiny1.unet_forward(torch.randn(1, 4, 8, 8), torch.tensor([300]), cond)
        out.square().mean().backward()
        assert q.grad is not None and q.grad.abs().sum() > 0
        assert k.grad is not None and k.grad.abs().sum() > 0
    finally:
        for p in (q, k):
            p.requires_grad_(False)
            p.grad = None


def test_input_validation(tiny1):
    with pytest.raises(ConfigError, match="multiples of 8"):
        tiny1.encode_images(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ConfigError, match="multiples of 8"):
        tiny1.unet_forward(torch.zeros(1, 4, 6, 8), torch.tensor([1]), tiny1.encode_prompts(["x"]))
    with pytest.raises(ConfigError, match="batch mismatch"):
        tiny1.unet_forward(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), tiny1.encode_prompts(["x"]))
    with pytest.raises(ConfigError, match="neither an embedded model"):
        load_model("tiny-sd9")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    if not SHARED_CKPT.is_file():
        pytest.skip("shared tiny checkpoint not found")
    sd = load_file(str(SHARED_CKPT))
    del sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    sd["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    shutil.copy(WEBUI_TINY_SD1 / "tiny-sd1.yaml", tmp_path / "broken.yaml")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "broken.safetensors")
    msg = str(info.value)
    assert "missing keys (1): model.diffusion_model.input_blocks.1.1.proj_in.weight" in msg
    assert "unexpected keys (1): model.diffusion_model.bogus.weight" in msg


def test_without_yaml_full_size_defaults_are_used(tiny1, tmp_path):
    path = save_checkpoint(tiny1, tmp_path / "bare.safetensors", write_yaml=False)
    assert not path.with_suffix(".yaml").exists()
    with pytest.raises(ModelLoadError, match="full-size defaults") as info:
        load_model(path)
    assert "wrong shapes" in str(info.value) and "(model (320," in str(info.value)


def test_unreadable_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(bad)
    with pytest.raises(ModelLoadError, match="SDXL"):
        detect_arch({"conditioner.embedders.0.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="text encoder"):
        detect_arch({"model.diffusion_model.x": torch.zeros(1)})


def test_ckpt_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Evil()}, str(path))
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(path)


@pytest.mark.parametrize("name,suffix", [("tiny-sd1", ".safetensors"), ("tiny-sd2", ".ckpt")])
def test_save_and_load_round_trip(name, suffix, tmp_path, tok_cache):
    m = load_model(name, tokenizer_cache=tok_cache)
    path = save_checkpoint(m, tmp_path / f"model{suffix}")
    assert path.with_suffix(".yaml").is_file()
    back = load_model(path, tokenizer_cache=tok_cache)
    assert (back.arch, back.prediction_type, back.name) == (m.arch, m.prediction_type, f"model{suffix}")
    a, b = m.ldm_state_dict(), back.ldm_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond_a, cond_b = m.encode_prompts(["a cat"]), back.encode_prompts(["a cat"])
    torch.testing.assert_close(cond_a.crossattn, cond_b.crossattn)
    torch.testing.assert_close(m.unet_forward(lat, torch.tensor([5]), cond_a),
                               back.unet_forward(lat, torch.tensor([5]), cond_b))


def test_v_prediction_flag_wins(tok_cache):
    if not SHARED_CKPT.is_file():
        pytest.skip("shared tiny checkpoint not found")
    assert load_model(SHARED_CKPT, v_prediction=True, tokenizer_cache=tok_cache).prediction_type == "v_prediction"
    assert load_model("tiny-sd2", v_prediction=False, tokenizer_cache=tok_cache).prediction_type == "epsilon"


def test_half_precision_vae_falls_back_to_fp32(tok_cache):
    m = load_model("tiny-sd1", dtype=torch.float16, tokenizer_cache=tok_cache)
    assert m.unet.input_blocks[0][0].weight.dtype == torch.float16
    encoder_forward = m.vae.encoder.forward

    def overflowing_in_fp16(x):  # what a real fp16 VAE does on some images: inf/nan activations
        out = encoder_forward(x)
        return out * float("inf") if m.vae.encoder.conv_in.weight.dtype == torch.float16 else out

    m.vae.encoder.forward = overflowing_in_fp16
    lat = m.encode_images(_pixels(1), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(lat).all() and m.vae_dtype == torch.float32
    cond = m.encode_prompts(["a cat"])
    assert cond.crossattn.dtype == torch.float16
    assert torch.isfinite(m.unet_forward(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond)).all()


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_full_size_ldm_keys_match_on_meta(arch):
    """The full-size configs accept a checkpoint holding exactly the full-size LDM key set (shapes from meta)."""
    from lib_lora.model import configs

    cfg = configs.get_model_config(arch)
    te_prefix = "cond_stage_model.transformer." if arch == "sd1" else "cond_stage_model.model."
    sd = {}
    for prefix, module in zip(("model.diffusion_model.", "first_stage_model.", te_prefix), _build_parts(cfg, "meta")):
        sd.update({prefix + k: v for k, v in module.state_dict().items()})
    assert detect_arch(sd) == arch
    derived, pred = _config_for(arch, sd, None)
    assert pred is None
    if arch == "sd1":
        assert {k: derived["text"][k] for k in configs.HF_CLIP_L} == configs.HF_CLIP_L
    else:
        assert derived["text"] == configs.OPENCLIP_VIT_H
    parts = _build_parts(derived, "meta")
    _load_into(sd, list(zip(("model.diffusion_model.", "first_stage_model.", te_prefix), parts)),
               Path("x.safetensors"), Path("x.yaml"))


def test_conditioning_to():
    c = Conditioning(torch.zeros(1, 77, 32))
    assert c.to(dtype=torch.float16).crossattn.dtype == torch.float16


def test_webui_key_replacements():
    old = {"cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight": torch.zeros(1),
           "model.diffusion_model.out.2.weight": torch.zeros(1)}
    assert set(webui_key_replacements(old)) == {
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "model.diffusion_model.out.2.weight"}
    turbo = {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1),
             "model.diffusion_model.out.2.weight": torch.zeros(1)}
    renamed = webui_key_replacements(turbo)
    assert "cond_stage_model.model.ln_final.weight" in renamed and detect_arch(renamed) == "sd2"


def test_bad_yaml_is_reported(tmp_path, tiny1):
    path = save_checkpoint(tiny1, tmp_path / "m.safetensors")
    path.with_suffix(".yaml").write_text("model:\n  params:\n    unet_config:\n      params: {bogus: 1}\n")
    with pytest.raises(ModelLoadError, match="cannot build"):
        load_model(path)
    path.with_suffix(".yaml").write_text("just text")
    with pytest.raises(ModelLoadError, match="cannot read model config"):
        load_model(path)


def test_sdpa_attention_matches_ldm_einsum_attention():
    """The headless model runs ldm's CrossAttention through torch SDPA (the WebUI's "sdp" optimisation): same
    outputs as ldm's own einsum attention within fp32 rounding, and LoRA wrappers on to_q/to_k/to_v still act."""
    import torch

    from lib_lora.model.headless import load_model

    m = load_model("tiny-sd1")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    c = m.encode_prompts(["a photo of a dog", "a cat"])
    attn = [mod for mod in m.unet.modules() if mod.__class__.__name__ == "CrossAttention"]
    assert attn and all("forward" in mod.__dict__ for mod in attn)
    with torch.no_grad():
        fast = m.unet_forward(x, t, c)
        for mod in attn:
            del mod.forward  # back to ldm's einsum attention
        slow = m.unet_forward(x, t, c)
    assert (fast - slow).abs().max().item() < 1e-4 * slow.abs().max().item()
