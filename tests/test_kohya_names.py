"""Kohya module names for SD1, derived independently of lib_lora, and the two namings A1111 reads.

1. Full-size SD1 names equal sd-scripts'. The expected names are derived here the way sd-scripts
   ``networks/lora.py`` ``LoRANetwork.create_modules`` derives them, on the module trees sd-scripts trains:

   * UNet: diffusers' ``UNet2DConditionModel`` with SD1.5's default config (sd-scripts' ``library/original_unet.py``
     is a trimmed copy of diffusers 0.10.2's tree with the same module names), built on the meta device.
   * text encoder: HF ``CLIPTextModel`` with CLIP ViT-L/14's text config, on meta.
   * rule: for every module whose class name is in ``UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]`` (plus
     ``UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]`` when conv_dim is
     set) or ``TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPMLP"]``, every descendant whose class
     name is ``Linear`` or ``Conv2d`` becomes ``prefix + "." + parent path + "." + child path`` with every "."
     replaced by "_" (prefixes ``lora_unet``, ``lora_te``). Linear and 1x1 convs get network_dim; k x k convs get
     conv_dim and are skipped without it.
   * sd-scripts checks exact class names. diffusers 0.26 builds those layers as ``LoRACompatibleLinear`` /
     ``LoRACompatibleConv`` (subclasses of nn.Linear / nn.Conv2d that only add an optional LoRA hook), where
     ``original_unet.py`` has plain ``nn.Linear`` / ``nn.Conv2d``; we count those two subclasses as Linear / Conv2d.

   Ours come from the ldm ``UNetModel`` the WebUI runs (full size, on meta), mapped to those names by lib_lora.
   Counts: 192 UNet + 72 text-encoder modules without conv_dim, 278 UNet with it. Ranks, and the shapes of
   lora_down / lora_up (which the file stores), must also be what sd-scripts would create for each layer.

2. A1111 reads both Kohya (diffusers-style) names and LDM ("compvis") names for SD1 UNet modules. The shared
   reference files ``test_lora.safetensors`` and ``test_lora_compvis.safetensors`` (made outside this project; see
   shared ``data/webui-tiny-sd1/README.md``) hold the same tensors under the two namings: both load completely into
   the tiny SD1 checkpoint they were made for, give bit-identical outputs, and each Kohya name's LDM alias in
   lib_lora is the name the compvis file gives the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("ldm")

from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lib_lora.model_api import TextEncoderRoot  # noqa: E402
from lib_lora.network import LoRANetwork, find_targets  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# sd-scripts networks/lora.py, LoRANetwork class attributes.
SD_SCRIPTS_UNET_TARGETS = ["Transformer2DModel"]
SD_SCRIPTS_UNET_CONV_TARGETS = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
SD_SCRIPTS_TE_TARGETS = ["CLIPAttention", "CLIPMLP"]
# Class names counted as sd-scripts' "Linear" / "Conv2d" (see the module docstring for the LoRACompatible* ones).
LINEAR_CLASSES = ("Linear", "LoRACompatibleLinear")
CONV2D_CLASSES = ("Conv2d", "LoRACompatibleConv")

NETWORK_DIM, CONV_DIM = 8, 4

# SD1's ldm UNet (v1-inference.yaml unet_config) and CLIP ViT-L/14's text model.
SD1_LDM_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                    transformer_depth=1, context_dim=768, legacy=False)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, vocab_size=49408)


def sd_scripts_modules(root: nn.Module, prefix: str, target_classes: list[str],
                       conv_dim: int | None) -> dict[str, tuple[int, nn.Module]]:
    """``{lora_name: (rank, layer)}`` as sd-scripts ``create_modules`` builds them (no block dims, no weights)."""
    out: dict[str, tuple[int, nn.Module]] = {}
    for name, module in root.named_modules():
        if module.__class__.__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            is_linear = child.__class__.__name__ in LINEAR_CLASSES
            is_conv2d = child.__class__.__name__ in CONV2D_CLASSES
            is_conv2d_1x1 = is_conv2d and tuple(child.kernel_size) == (1, 1)
            if not (is_linear or is_conv2d):
                continue
            lora_name = (prefix + "." + name + "." + child_name).replace(".", "_")
            if is_linear or is_conv2d_1x1:
                dim = NETWORK_DIM
            elif conv_dim is not None:
                dim = conv_dim
            else:
                continue
            assert lora_name not in out, f"duplicated lora name: {lora_name}"
            out[lora_name] = (dim, child)
    return out


def expected_shapes(rank: int, layer: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_down, lora_up) weight shapes of sd-scripts' LoRAModule for ``layer``: Linear (r, in) / (out, r); conv
    (r, in, kh, kw) / (out, r, 1, 1)."""
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


@pytest.fixture(scope="module")
def full_size():
    """Full-size SD1 trees on meta: ours (ldm UNet + HF CLIP-L) and sd-scripts' UNet (diffusers, SD1.5 config)."""
    with torch.device("meta"):
        ldm_unet = UNetModel(**SD1_LDM_UNET)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    return ldm_unet, te


@pytest.fixture(scope="module")
def diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        # SD1.5's config: the class defaults (block_out_channels (320, 640, 1280, 1280), layers_per_block 2,
        # CrossAttnDownBlock2D x3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D x3, 1x1-conv projections) with
        # cross_attention_dim 768 and 8 heads.
        unet = diffusers.UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                              attention_head_dim=8, use_linear_projection=False)
    return unet


def _check_against(net: LoRANetwork, part: str, expected: dict[str, tuple[int, nn.Module]]) -> None:
    ours = set(net.names(part))
    assert ours == set(expected), (f"{part}: only ours: {sorted(ours - set(expected))[:10]}; "
                                   f"only sd-scripts': {sorted(set(expected) - ours)[:10]}")
    for m in net.lora_modules(part):
        rank, layer = expected[m.lora_name]
        down, up = expected_shapes(rank, layer)
        assert m.lora_dim == rank, m.lora_name
        assert tuple(m.lora_down.weight.shape) == down, m.lora_name
        assert tuple(m.lora_up.weight.shape) == up, m.lora_name
        if isinstance(layer, nn.Conv2d):  # a k x k down conv copies the layer's stride and padding
            assert tuple(m.lora_down.stride) == tuple(layer.stride), m.lora_name
            assert tuple(m.lora_down.padding) == tuple(layer.padding), m.lora_name


@pytest.mark.parametrize("conv_dim", [None, CONV_DIM], ids=["default", "conv_dim"])
def test_sd1_unet_names_equal_sd_scripts(full_size, diffusers_unet, conv_dim):
    """Full-size SD1 UNet: our names, ranks and tensor shapes are sd-scripts', with and without conv_dim."""
    ldm_unet, _ = full_size
    classes = SD_SCRIPTS_UNET_TARGETS + (SD_SCRIPTS_UNET_CONV_TARGETS if conv_dim else [])
    expected = sd_scripts_modules(diffusers_unet, "lora_unet", classes, conv_dim)
    assert len(expected) == (192 if conv_dim is None else 278)
    net = LoRANetwork.create(ldm_unet, [], "sd1", network_dim=NETWORK_DIM, network_alpha=1.0, conv_dim=conv_dim,
                             train_text_encoder=False)
    assert len(net.names("unet")) == len(expected)
    _check_against(net, "unet", expected)


def test_sd1_text_encoder_names_equal_sd_scripts(full_size):
    """CLIP ViT-L/14 text encoder: 12 layers x (q, k, v, out_proj, fc1, fc2) = 72 names, sd-scripts' exactly."""
    _, te = full_size
    expected = sd_scripts_modules(te, "lora_te", SD_SCRIPTS_TE_TARGETS, None)
    assert len(expected) == 72
    net = LoRANetwork.create(None, [TextEncoderRoot(te, "lora_te")], "sd1", network_dim=NETWORK_DIM,
                             network_alpha=1.0, train_unet=False)
    _check_against(net, "te", expected)


# ---------------------------------------------------------------------------------------------- reference files

def _tiny_sd1_dir() -> Path | None:
    for base in (REPO_ROOT / "shared", REPO_ROOT.parent / "shared", Path("/work/shared")):
        d = base / "data" / "webui-tiny-sd1"
        if (d / "tiny-sd1.safetensors").is_file() and (d / "lora" / "test_lora.safetensors").is_file():
            return d
    return None


TINY_SD1 = _tiny_sd1_dir()
needs_tiny_sd1 = pytest.mark.skipif(TINY_SD1 is None, reason="shared webui-tiny-sd1 checkpoint not present")


@pytest.fixture(scope="module")
def tiny_sd1():
    """The shared tiny SD1 checkpoint as the WebUI builds it: ldm UNet from its yaml's unet_config, HF CLIPTextModel
    from tiny-sd1-clip-text/config.json, weights from tiny-sd1.safetensors (UNet and text encoder only)."""
    import yaml
    from safetensors import safe_open

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared 2-core box
    cfg = yaml.safe_load((TINY_SD1 / "tiny-sd1.yaml").read_text())
    unet = UNetModel(**cfg["model"]["params"]["unet_config"]["params"])
    te = CLIPTextModel(CLIPTextConfig.from_json_file(str(TINY_SD1 / "tiny-sd1-clip-text" / "config.json")))
    unet_sd, te_sd = {}, {}
    with safe_open(str(TINY_SD1 / "tiny-sd1.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model."):
                unet_sd[k[len("model.diffusion_model."):]] = f.get_tensor(k)
            elif k.startswith("cond_stage_model.transformer."):
                te_sd[k[len("cond_stage_model.transformer."):]] = f.get_tensor(k)
    unet.load_state_dict(unet_sd, strict=True)
    missing, unexpected = te.load_state_dict(te_sd, strict=False)
    assert not missing and set(unexpected) <= {"text_model.embeddings.position_ids"}, (missing, unexpected)
    unet.eval()
    te.eval()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=gen), t=torch.tensor([10, 500]),
                  ctx=torch.randn(2, 77, 32, generator=gen), ids=torch.randint(0, 49406, (2, 77), generator=gen))
    yield unet, te, inputs
    torch.set_num_threads(threads)


def _outputs(unet, te, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return unet(inputs["x"], inputs["t"], context=inputs["ctx"]), te(inputs["ids"]).last_hidden_state


@needs_tiny_sd1
def test_reference_files_load_under_both_namings_with_identical_outputs(tiny_sd1):
    """Kohya-named and LDM-named reference files: all 204 modules load with an empty report, the outputs with either
    attached are bit-identical (and differ from the base), and re-saving the LDM-named one gives the Kohya file."""
    from safetensors.torch import load_file

    unet, te, inputs = tiny_sd1
    roots = [TextEncoderRoot(te, "lora_te")]
    base_unet, base_te = _outputs(unet, te, inputs)
    results = {}
    for fname in ("test_lora.safetensors", "test_lora_compvis.safetensors"):
        sd = load_file(str(TINY_SD1 / "lora" / fname))
        net, report = LoRANetwork.from_weights(sd, unet, roots, "sd1")
        assert report.ok, f"{fname}: {report.summary()}"
        assert not report.missing_alpha, f"{fname}: {report.summary()}"
        assert len(report.loaded) == 204 and len(net.names("unet")) == 192 and len(net.names("te")) == 12
        with net.applied():
            results[fname] = (_outputs(unet, te, inputs), net.kohya_state_dict())
        assert torch.equal(_outputs(unet, te, inputs)[0], base_unet)  # detached again

    (kohya_unet, kohya_te), kohya_sd = results["test_lora.safetensors"]
    (ldm_unet, ldm_te), from_ldm_sd = results["test_lora_compvis.safetensors"]
    assert torch.equal(kohya_unet, ldm_unet)
    assert torch.equal(kohya_te, ldm_te)
    assert float((kohya_unet - base_unet).norm() / base_unet.norm()) > 1e-2
    assert float((kohya_te - base_te).norm() / base_te.norm()) > 1e-2
    # Loaded from either naming, the network saves the Kohya file's keys and tensors exactly.
    reference = load_file(str(TINY_SD1 / "lora" / "test_lora.safetensors"))
    for saved in (kohya_sd, from_ldm_sd):
        assert set(saved) == set(reference)
        for k, v in reference.items():
            assert torch.equal(saved[k].reshape(v.shape), v), k
            assert saved[k].shape == v.shape, k


@needs_tiny_sd1
def test_ldm_aliases_are_the_names_a1111_files_use(tiny_sd1):
    """The compvis file pairs each LDM name with the tensors the Kohya file gives a diffusers-style name; lib_lora's
    target for that Kohya name must list exactly that LDM name as its alias (A1111's diffusers -> compvis
    direction)."""
    from safetensors.torch import load_file

    unet, te, _ = tiny_sd1
    kohya = load_file(str(TINY_SD1 / "lora" / "test_lora.safetensors"))
    compvis = load_file(str(TINY_SD1 / "lora" / "test_lora_compvis.safetensors"))
    by_tensor = {compvis[k].numpy().tobytes(): k.split(".")[0] for k in compvis if k.endswith(".lora_down.weight")}
    assert len(by_tensor) == 204
    targets = {t.name: t for t in find_targets(unet, [TextEncoderRoot(te, "lora_te")], "sd1", include_conv=False)}
    pairs = 0
    for k, v in kohya.items():
        if not k.endswith(".lora_down.weight"):
            continue
        name, ldm_name = k.split(".")[0], by_tensor[v.numpy().tobytes()]
        assert name in targets, name
        if name.startswith("lora_te_"):
            assert ldm_name == name  # SD1 text-encoder names are the same in both files
        else:
            assert ldm_name.startswith("lora_unet_") and ldm_name != name
            assert ldm_name in targets[name].aliases, (name, ldm_name, targets[name].aliases)
        pairs += 1
    assert pairs == 204


@needs_tiny_sd1
def test_reference_file_with_a_bogus_module_reports_it(tiny_sd1):
    """``test_lora_bogus`` = ``test_lora`` + one module matching nothing: the 204 real ones load, the extra one is
    reported as unmatched (A1111 skips it with a warning), nothing raises."""
    from safetensors.torch import load_file

    unet, te, _ = tiny_sd1
    sd = load_file(str(TINY_SD1 / "lora" / "test_lora_bogus.safetensors"))
    net, report = LoRANetwork.from_weights(sd, unet, [TextEncoderRoot(te, "lora_te")], "sd1")
    assert len(report.loaded) == 204
    assert report.unmatched == ["lora_unet_bogus_block_0_to_q"]
    assert not report.ok
