"""Tests of the naming: lib_lora.keymap tables, and the full-size Kohya module names and counts that
lib_lora.reference derives from the real ldm / HF / open_clip trees on the meta device (sd-scripts' numbers)."""

from __future__ import annotations

import pytest

from lib_lora import keymap
from lib_lora.keymap import kohya_name, ldm_to_diffusers_unet_path, openclip_kohya_path, unet_block_table
from lib_lora.reference import full_size_targets, kohya_module_names

# ---------------------------------------------------------------------------------------------- keymap tables

SD1_LAYOUT = (4, 2)  # len(channel_mult), num_res_blocks: SD1, SD2 and the tiny test models
SDXL_LAYOUT = (3, 2)


@pytest.mark.parametrize("layout, ldm, diffusers", [
    (SD1_LAYOUT, "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    (SD1_LAYOUT, "input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
    (SD1_LAYOUT, "input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    (SD1_LAYOUT, "input_blocks.2.0.out_layers.3", "down_blocks.0.resnets.1.conv2"),
    (SD1_LAYOUT, "input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    (SD1_LAYOUT, "input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    (SD1_LAYOUT, "input_blocks.5.1.transformer_blocks.0.attn2.to_k",
     "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),
    (SD1_LAYOUT, "input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
    (SD1_LAYOUT, "input_blocks.11.0.emb_layers.1", "down_blocks.3.resnets.1.time_emb_proj"),
    (SD1_LAYOUT, "middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
    (SD1_LAYOUT, "middle_block.1.transformer_blocks.0.attn2.to_out.0",
     "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    (SD1_LAYOUT, "middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
    (SD1_LAYOUT, "output_blocks.0.0.skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
    (SD1_LAYOUT, "output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    (SD1_LAYOUT, "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj",
     "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    (SD1_LAYOUT, "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    (SD1_LAYOUT, "output_blocks.8.2.conv", "up_blocks.2.upsamplers.0.conv"),
    (SD1_LAYOUT, "output_blocks.11.1.transformer_blocks.0.ff.net.2",
     "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
    (SD1_LAYOUT, "output_blocks.11.0.out_layers.3", "up_blocks.3.resnets.2.conv2"),
    # SDXL: 3 levels, every up block but the last has attention, so its upsampler is always at .2.conv
    (SDXL_LAYOUT, "output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    (SDXL_LAYOUT, "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    (SDXL_LAYOUT, "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"),
    (SDXL_LAYOUT, "input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    (SDXL_LAYOUT, "input_blocks.8.0.in_layers.2", "down_blocks.2.resnets.1.conv1"),
    (SDXL_LAYOUT, "output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
])
def test_ldm_to_diffusers_unet_path(layout, ldm, diffusers):
    """LDM/sgm UNet paths map to diffusers paths with sd-scripts' block arithmetic (convert_unet_state_dict_to_sd),
    ResBlock children renamed (in_layers.2 -> conv1, out_layers.3 -> conv2, emb_layers.1 -> time_emb_proj,
    skip_connection -> conv_shortcut), including the 2-digit block indices and SDXL's 3-level layout."""
    assert ldm_to_diffusers_unet_path(ldm, *layout) == diffusers


@pytest.mark.parametrize("layout, ldm", [
    (SD1_LAYOUT, "time_embed.0"),
    (SD1_LAYOUT, "input_blocks.0.0"),  # conv_in
    (SD1_LAYOUT, "out.2"),  # conv_out
    (SD1_LAYOUT, "input_blocks.1.0.in_layers.0"),  # GroupNorm, not a LoRA target
    (SD1_LAYOUT, "input_blocks.3.0.op.weight"),
    (SD1_LAYOUT, "input_blocks.12.0.in_layers.2"),  # no such block
    (SDXL_LAYOUT, "input_blocks.9.0.in_layers.2"),
    (SDXL_LAYOUT, "output_blocks.9.0.in_layers.2"),
])
def test_ldm_paths_outside_the_table_map_to_none(layout, ldm):
    """Paths outside the mapped blocks or children that are never LoRA targets give None, not a wrong name."""
    assert ldm_to_diffusers_unet_path(ldm, *layout) is None


@pytest.mark.parametrize("layout, rows", [(SD1_LAYOUT, 52), (SDXL_LAYOUT, 39)])
def test_unet_block_table_shape(layout, rows):
    """The table has one row per block (and both upsampler positions), unique LDM prefixes, sorted longest first;
    every diffusers block prefix appears once except the two upsampler positions of each up block."""
    table = unet_block_table(*layout)
    assert len(table) == rows
    ldm = [r[0] for r in table]
    assert len(set(ldm)) == len(ldm)
    assert [len(p) for p in ldm] == sorted((len(p) for p in ldm), reverse=True)
    diff = [r[1] for r in table]
    samplers = [d for d, kind in ((r[1], r[2]) for r in table) if kind == "sampler" and d.startswith("up_blocks")]
    assert len(samplers) == 2 * (layout[0] - 1)
    assert len(set(diff)) == len(diff) - (layout[0] - 1)
    assert {r[2] for r in table} == {"resnet", "attention", "sampler"}


def test_kohya_name_and_openclip_paths():
    """Kohya names replace every '.' with '_' after the prefix; OpenCLIP children get the HF-converted paths
    sd-scripts names them by (attn parts -> self_attn.*, c_fc -> fc1, c_proj -> fc2); others raise KeyError."""
    assert kohya_name("lora_unet", "input_blocks.1.1.proj_in") == "lora_unet_input_blocks_1_1_proj_in"
    assert kohya_name("lora_te", "text_model.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert openclip_kohya_path(3, "attn.q_proj") == "text_model.encoder.layers.3.self_attn.q_proj"
    assert openclip_kohya_path(0, "attn.out_proj") == "text_model.encoder.layers.0.self_attn.out_proj"
    assert openclip_kohya_path(22, "mlp.c_fc") == "text_model.encoder.layers.22.mlp.fc1"
    assert openclip_kohya_path(31, "mlp.c_proj") == "text_model.encoder.layers.31.mlp.fc2"
    with pytest.raises(KeyError):
        openclip_kohya_path(0, "ln_1")
    assert keymap.RESNET_CHILD_TABLE[0] == ("in_layers.2", "conv1")


# ------------------------------------------------------------------------------------- full-size module names


@pytest.fixture(scope="module")
def names() -> dict[tuple[str, int | None], dict[str, list[str]]]:
    """kohya_module_names for every arch, with and without conv_dim (meta trees built once, cached)."""
    return {(arch, conv): kohya_module_names(arch, conv) for arch in ("sd1", "sd2", "sdxl") for conv in (None, 4)}


@pytest.mark.parametrize("arch, counts", [
    ("sd1", {"unet": 192, "te": 72}),
    ("sd2", {"unet": 192, "te": 138}),
    ("sdxl", {"unet": 722, "te1": 72, "te2": 192}),
])
def test_full_size_counts_equal_sd_scripts(arch, counts, names):
    """Module counts on the full-size models equal what sd-scripts creates: SD1 192 + 72, SD2 192 + 138 (23 of 24
    OpenCLIP layers), SDXL 722 + 72 + 192; names are unique."""
    got = names[(arch, None)]
    assert {part: len(v) for part, v in got.items()} == counts
    flat = [n for v in got.values() for n in v]
    assert len(set(flat)) == len(flat)


@pytest.mark.parametrize("arch, unet_count", [("sd1", 278), ("sd2", 278), ("sdxl", 788)])
def test_full_size_counts_with_conv_dim(arch, unet_count, names):
    """With conv_dim the UNet gains the ResBlock/Downsample/Upsample layers (sd-scripts LoRA-C3Lier: SD1/SD2 278,
    SDXL 788 UNet modules); the text encoders are unchanged."""
    with_conv, plain = names[(arch, 4)], names[(arch, None)]
    assert len(with_conv["unet"]) == unet_count
    assert set(plain["unet"]) < set(with_conv["unet"])
    assert {k: v for k, v in with_conv.items() if k != "unet"} == {k: v for k, v in plain.items() if k != "unet"}


@pytest.mark.parametrize("arch, part, name", [
    ("sd1", "unet", "lora_unet_down_blocks_0_attentions_0_proj_in"),
    ("sd1", "unet", "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"),
    ("sd1", "unet", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"),
    ("sd1", "te", "lora_te_text_model_encoder_layers_11_self_attn_q_proj"),
    ("sd2", "unet", "lora_unet_down_blocks_0_attentions_0_proj_in"),
    ("sd2", "te", "lora_te_text_model_encoder_layers_22_mlp_fc2"),
    ("sd2", "te", "lora_te_text_model_encoder_layers_0_self_attn_k_proj"),
    ("sdxl", "unet", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"),
    ("sdxl", "unet", "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"),
    ("sdxl", "unet", "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_v"),
    ("sdxl", "te1", "lora_te1_text_model_encoder_layers_11_mlp_fc1"),
    ("sdxl", "te2", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"),
])
def test_exact_full_size_names(arch, part, name, names):
    """A few exact sd-scripts names are present in the right part."""
    assert name in names[(arch, None)][part]


@pytest.mark.parametrize("arch, part, name", [
    ("sd2", "te", "lora_te_text_model_encoder_layers_23_mlp_fc2"),  # SD2 runs to the penultimate layer
    ("sd2", "te", "lora_te_text_model_encoder_layers_23_self_attn_q_proj"),
    ("sdxl", "unet", "lora_unet_input_blocks_1_1_proj_in"),  # SDXL level 0 has no attention
    ("sdxl", "unet", "lora_unet_down_blocks_1_attentions_0_proj_in"),  # SDXL files use LDM names
    ("sd1", "unet", "lora_unet_input_blocks_1_1_proj_in"),  # SD1 files use diffusers names
    ("sd1", "unet", "lora_unet_down_blocks_0_resnets_0_conv1"),  # only with conv_dim
])
def test_absent_full_size_names(arch, part, name, names):
    """Names sd-scripts does not create are absent: SD2's 24th OpenCLIP layer, SDXL attention at level 0, the
    other naming convention of each family, conv layers without conv_dim."""
    assert name not in names[(arch, None)][part]


@pytest.mark.parametrize("name", [
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_down_blocks_0_resnets_1_conv2",
    "lora_unet_down_blocks_0_downsamplers_0_conv",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
    "lora_unet_up_blocks_0_upsamplers_0_conv",
    "lora_unet_up_blocks_1_upsamplers_0_conv",
    "lora_unet_up_blocks_2_upsamplers_0_conv",
    "lora_unet_mid_block_resnets_1_time_emb_proj",
    "lora_unet_up_blocks_3_resnets_2_conv_shortcut",
])
def test_sd1_conv_dim_names(name, names):
    """With conv_dim, SD1 gets the ResBlock/Downsample/Upsample layers under their diffusers names."""
    assert name in names[("sd1", 4)]["unet"]


def test_sdxl_conv_dim_names(names):
    """With conv_dim, SDXL's conv layers keep LDM names, the upsampler at output_blocks.N.2.conv."""
    unet = set(names[("sdxl", 4)]["unet"])
    for name in ("lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
                 "lora_unet_output_blocks_5_2_conv", "lora_unet_input_blocks_1_0_in_layers_2",
                 "lora_unet_middle_block_2_emb_layers_1"):
        assert name in unet
    assert "lora_unet_output_blocks_2_1_conv" not in unet


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_aliases_are_a_bijection(arch):
    """Every full-size target's canonical name and its alias (the other convention) are unique across targets, so
    a file in either naming loads each module into exactly one layer."""
    found = full_size_targets(arch, True)
    owner: dict[str, str] = {}
    for t in found:
        for n in (t.name, *t.aliases):
            assert owner.setdefault(n, t.name) == t.name, f"{n} names both {owner[n]} and {t.name}"
    unet = [t for t in found if t.part == "unet"]
    assert all(len(t.aliases) == 1 for t in unet)
    if arch == "sdxl":
        assert all(t.name.startswith(("lora_unet_input", "lora_unet_middle", "lora_unet_output")) for t in unet)
    else:
        assert all(t.aliases[0].startswith(("lora_unet_input", "lora_unet_middle", "lora_unet_output")) for t in unet)


def test_tiny_models_use_full_size_names(names):
    """The tiny test models (same block layout) give a subset of the full-size names: exactly the full-size SD1
    UNet names without conv_dim; a subset with conv_dim; HF/OpenCLIP text layers 0-1 named as at full size."""
    from lib_lora.model.build import build_hf_clip_text, build_openclip_text, build_unet
    from lib_lora.model.configs import HF_CLIP_TINY, OPENCLIP_TINY, UNET_TINY_SD1, UNET_TINY_SD2
    from lib_lora.model_api import TextEncoderRoot
    from lib_lora.network import find_targets

    unet1 = build_unet(UNET_TINY_SD1, device="meta")
    unet2 = build_unet(UNET_TINY_SD2, device="meta")
    te1 = TextEncoderRoot(build_hf_clip_text(HF_CLIP_TINY, device="meta"), "lora_te")
    te2 = TextEncoderRoot(build_openclip_text(OPENCLIP_TINY, device="meta"), "lora_te", 2)
    assert [t.name for t in find_targets(unet1, [], "sd1", False)] == names[("sd1", None)]["unet"]
    assert [t.name for t in find_targets(unet2, [], "sd2", False)] == names[("sd2", None)]["unet"]
    assert {t.name for t in find_targets(unet1, [], "sd1", True)} < set(names[("sd1", 4)]["unet"])
    tiny_te1 = [t.name for t in find_targets(None, [te1], "sd1", False)]
    tiny_te2 = [t.name for t in find_targets(None, [te2], "sd2", False)]
    assert tiny_te1 == names[("sd1", None)]["te"][:12]
    assert tiny_te2 == names[("sd2", None)]["te"][:12]
