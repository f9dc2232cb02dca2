"""Module trees from lib_lora.model.build / configs, and the CLIP tokenizer shipped as data."""

from __future__ import annotations

import json
import time

import pytest
import torch
from _paths import SHARED_DATA
from torch import nn

from lib_lora.errors import ConfigError
from lib_lora.model import build, configs
from lib_lora.model import tokenizer as tok

WEBUI_TINY_SD1 = SHARED_DATA / "webui-tiny-sd1"  # the shared WebUI test checkpoint (see conftest.py)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _count(module: nn.Module, cls_name: str) -> int:
    return sum(type(m).__name__ == cls_name for m in module.modules())


def _all_meta(module: nn.Module) -> bool:
    return all(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def test_sd1_full_size_meta_tree():
    t0 = time.perf_counter()
    unet = build.build_unet(configs.UNET_SD1, device="meta")
    assert time.perf_counter() - t0 < 10
    assert _all_meta(unet)
    assert _count(unet, "SpatialTransformer") == 16
    assert _count(unet, "BasicTransformerBlock") == 16
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5 UNet
    assert isinstance(unet.input_blocks[1][1].proj_in, nn.Conv2d)
    assert unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features == 768


def test_sd2_full_size_meta_tree():
    unet = build.build_unet(configs.UNET_SD2, device="meta")
    st = unet.input_blocks[1][1]
    assert isinstance(st.proj_in, nn.Linear) and isinstance(st.proj_out, nn.Linear)
    assert st.transformer_blocks[0].attn1.heads == 5  # 320 / 64
    assert st.transformer_blocks[0].attn2.to_k.in_features == 1024
    assert _count(unet, "SpatialTransformer") == 16


def test_sdxl_meta_tree_uses_sgm_depths_and_names():
    unet = build.build_unet(configs.UNET_SDXL, device="meta")
    assert _count(unet, "SpatialTransformer") == 11
    assert _count(unet, "BasicTransformerBlock") == 70
    names = set(unet.state_dict())
    assert "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in names
    assert not any(n.startswith("input_blocks.4.1.transformer_blocks.2.") for n in names)
    assert "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight" in names
    assert "middle_block.1.transformer_blocks.9.attn2.to_k.weight" in names
    assert "output_blocks.5.1.transformer_blocks.1.attn2.to_v.weight" in names
    assert not any(n.startswith("output_blocks.5.1.transformer_blocks.2.") for n in names)
    assert not any(n.startswith("input_blocks.1.1.") for n in names)  # no attention at level 0
    assert unet.middle_block[1].transformer_blocks[0].attn2.to_k.in_features == 2048


def test_full_size_text_encoders_and_vae_on_meta():
    clip = build.build_hf_clip_text(configs.HF_CLIP_L, device="meta")
    assert _all_meta(clip)
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480
    assert len(clip.text_model.encoder.layers) == 12
    h = build.build_openclip_text(configs.OPENCLIP_VIT_H, device="meta")
    assert not hasattr(h, "visual")
    assert len(h.transformer.resblocks) == 24 and h.token_embedding.weight.shape == (49408, 1024)
    assert isinstance(h.transformer.resblocks[0].attn, nn.MultiheadAttention)
    g = build.build_openclip_text(configs.OPENCLIP_VIT_BIGG, device="meta")
    assert len(g.transformer.resblocks) == 32 and g.ln_final.weight.shape == (1280,)
    vae = build.build_vae(configs.VAE_SD, device="meta")
    assert _all_meta(vae) and vae.quant_conv.weight.shape == (8, 8, 1, 1)


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError, match="not accepted"):
        build.build_unet({**configs.UNET_TINY_SD1, "no_such_arg": 1}, device="meta")
    with pytest.raises(ConfigError, match="transformer_depth"):
        build.build_unet({**configs.UNET_TINY_SD1, "transformer_depth": [1, 2]}, device="meta")
    with pytest.raises(ConfigError, match="ddconfig"):
        build.build_vae({"embed_dim": 4})
    with pytest.raises(ConfigError, match="tiny-sd1"):
        configs.get_model_config("sd3")


def test_tiny_sd1_config_matches_shared_checkpoint():
    from safetensors import safe_open

    path = WEBUI_TINY_SD1 / "tiny-sd1.safetensors"
    if not path.is_file():
        pytest.skip("shared tiny checkpoint not found")
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    cfg = configs.MODEL_CONFIGS["tiny-sd1"]
    built = {}
    for prefix, module in (("model.diffusion_model.", build.build_unet(cfg["unet"], device="meta")),
                           ("first_stage_model.", build.build_vae(cfg["vae"], device="meta")),
                           ("cond_stage_model.transformer.", build.build_hf_clip_text(cfg["text"], device="meta"))):
        built.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    assert {k: v for k, v in shapes.items() if k.startswith(prefixes) and "position_ids" not in k} == \
        {k: v for k, v in built.items() if "position_ids" not in k}


def test_tiny_unet_output_depends_on_context_and_seed():
    cfg = configs.UNET_TINY_SD1
    unet = build.build_unet(cfg, seed=0).eval()
    assert unet.out[-1].weight.abs().sum() > 0
    assert all(m.proj_out.weight.abs().sum() > 0 for m in unet.modules() if hasattr(m, "transformer_blocks"))
    assert all(m.out_layers[-1].weight.abs().sum() > 0 for m in unet.modules() if hasattr(m, "out_layers"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    c1, c2 = torch.randn(2, 1, 77, 32, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        o1, o2 = unet(x, t, context=c1), unet(x, t, context=c2)
    assert torch.isfinite(o1).all()
    assert (o1 - o2).abs().max() > 1e-3
    again = build.build_unet(cfg, seed=0)
    other = build.build_unet(cfg, seed=1)
    sd, sd_again, sd_other = unet.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert not torch.equal(sd["out.2.weight"], sd_other["out.2.weight"])


def test_seeded_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build.build_hf_clip_text(configs.HF_CLIP_TINY, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_clip_layernorms_randomised():
    te = build.build_hf_clip_text(configs.HF_CLIP_TINY, seed=0)
    w = te.text_model.final_layer_norm.weight
    assert not torch.allclose(w, torch.ones_like(w))
    assert 0.5 < w.mean() < 1.5


# --- tokenizer -----------------------------------------------------------------------------------------------------


def test_tokenizer_files_match_reference_and_are_built_once(tmp_path):
    folder = tok.ensure_tokenizer_files(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab[",</w>"] == 267 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    ref = WEBUI_TINY_SD1 / "tiny-sd1-clip-text"
    if (ref / "vocab.json").is_file():
        assert vocab == json.loads((ref / "vocab.json").read_text(encoding="utf-8"))
        assert (folder / "merges.txt").read_text(encoding="utf-8") == (ref / "merges.txt").read_text(encoding="utf-8")
    mtime = (folder / "vocab.json").stat().st_mtime_ns
    tok.ensure_tokenizer_files(tmp_path)
    assert (folder / "vocab.json").stat().st_mtime_ns == mtime
    assert not list(folder.glob("*.tmp"))


def test_default_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("LIB_LORA_CACHE_DIR", str(tmp_path / "x"))
    assert tok.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LIB_LORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tok.default_cache_dir() == tmp_path / "xdg" / "lib_lora"


def test_token_ids_sd1_and_sd2(tmp_path):
    hf = tok.get_clip_tokenizer(tmp_path)
    assert hf("a photo of a cat", add_special_tokens=False)["input_ids"] == [320, 1125, 539, 320, 2368]
    ids = tok.tokenize_prompts(["a photo of a cat"], "hf_clip", tmp_path)[0]
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77
    assert set(ids[7:]) == {49407}  # SD1 pads with eos, as the WebUI does
    ids2 = tok.tokenize_prompts(["a photo of a cat"], "openclip")[0]
    assert ids2[:7] == ids[:7] and set(ids2[7:]) == {0}
    import open_clip

    assert open_clip.tokenize(["a photo of a cat"])[0].tolist() == ids2


def test_long_prompts_are_chunked_by_75(tmp_path):
    batch = tok.tokenize_prompts(["cat " * 80, "dog"], "hf_clip", tmp_path)
    assert [len(x) for x in batch] == [154, 154]
    first = batch[0]
    assert first[0] == 49406 and first[76] == 49407 and first[77] == 49406
    assert first[78:83] == [2368] * 5
    assert batch[1][77:80] == [49406, 49407, 49407]  # empty second chunk
    with pytest.raises(ConfigError, match="hf_clip"):
        tok.tokenize_prompts(["x"], "t5")
