"""A Kohya LoRA file written by lib_lora loads through diffusers' own Kohya loader and computes what we compute.

What this proves, for a tiny SD1 model (real ldm ``UNetModel`` + HF ``CLIPTextModel`` at small widths):

* the file's key names, tensor shapes (4-D for the 1x1-conv ``proj_in``/``proj_out`` and for k x k convs) and alpha
  convention are the ones the Kohya format means, as read by an implementation that shares no code with ours:
  diffusers' ``_convert_kohya_lora_to_diffusers`` (via ``StableDiffusionPipeline.lora_state_dict``), its
  ``UNet2DConditionModel.load_attn_procs`` (``LoRACompatibleLinear``/``LoRACompatibleConv`` layers) and its
  text-encoder monkey patch (``PatchedLoraProjection``). diffusers raises on any key it cannot place, so "no
  leftover keys" is its own check; we add that every one of our modules became one diffusers LoRA layer.
* the UNet naming we map from LDM (the tree the WebUI runs) to Kohya's diffusers-style names agrees with diffusers'
  own LDM -> diffusers checkpoint converter (``convert_ldm_unet_checkpoint``): the converted diffusers UNet first has
  to reproduce the LDM UNet's output, then each LoRA lands on the diffusers layer holding the same weights, which
  only happens when the two mappings agree.
* outputs match within a relative error of 1e-4 in fp32, and differ clearly from the base outputs (the LoRA took
  effect; every ``lora_up`` is random, not the zero init).

The diffusers version matters: releases from 0.27 on load LoRAs only through PEFT, which needs transformers >= 4.34,
while the WebUI pins 4.30.2. diffusers 0.26.3 is the last release with the non-PEFT path; it imports
``huggingface_hub.cached_download`` (removed in huggingface_hub 0.26), hence the pins in
``requirements-test-interop.txt``. Without diffusers the module is skipped.
"""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("ldm")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint  # noqa: E402
from diffusers.utils import USE_PEFT_BACKEND  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lib_lora.model_api import TextEncoderRoot  # noqa: E402
from lib_lora.network import LoRANetwork  # noqa: E402

try:  # the project's saver (what the trainer writes); plain safetensors while it is not there
    from lib_lora.safetensors_io import save_lora_file
except ImportError:  # pragma: no cover - depends on the checkout
    save_lora_file = None

if USE_PEFT_BACKEND:  # pragma: no cover - needs transformers >= 4.34, which the WebUI does not run
    pytest.skip("this test reads diffusers' non-PEFT LoRA layers; install requirements-test-interop.txt "
                "(diffusers 0.26.3) without peft", allow_module_level=True)

# diffusers 0.26 announces the removal of its non-PEFT LoRA path on every load; that path is what we test.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")

TOL = 1e-4  # relative error, fp32
MIN_EFFECT = 1e-2  # the LoRA must move the outputs by at least 100x the tolerance

# The tiny SD1 UNet: SD1's block layout (channel_mult 4 levels, 2 res blocks, attention at 3 levels, 1x1-conv
# proj_in/proj_out) at width 32.
LDM_UNET_KWARGS = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32,
                       attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=2,
                       use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False)
# The same architecture in diffusers' terms (SD1.5's config at small widths). attention_head_dim is, for SD1 UNets,
# the number of heads (diffusers' historical naming); use_linear_projection False = 1x1-conv proj_in/out.
DIFFUSERS_UNET_KWARGS = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64),
                             layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
                             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                             use_linear_projection=False)
CLIP_KWARGS = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=77, vocab_size=49408)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _randomize(module: nn.Module) -> None:
    """ldm zero-initialises the UNet out conv, every proj_out and every res-block out conv; with those at zero the
    UNet ignores its context and LoRAs on them change nothing. Re-draw every all-zero parameter, and give the
    norms random affines so that the norm weights' mapping is checked too."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
        for m in module.modules():
            if (isinstance(m, nn.GroupNorm) and m.affine) or (isinstance(m, nn.LayerNorm) and m.elementwise_affine):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)


def _diffusers_lora_layers(unet: nn.Module) -> list[str]:
    """Names of the diffusers UNet layers that carry a (non-PEFT) LoRA layer after loading."""
    return [n for n, m in unet.named_modules() if getattr(m, "lora_layer", None) is not None]


def _diffusers_te_lora_layers(te: nn.Module) -> list[str]:
    """Names of the text-encoder projections diffusers' monkey patch wrapped with a LoRA."""
    return [n for n, m in te.named_modules()
            if type(m).__name__ == "PatchedLoraProjection" and getattr(m, "lora_linear_layer", None) is not None]


@pytest.fixture(scope="module")
def tiny():
    """The tiny LDM UNet + CLIP text model (the trees lib_lora targets), the diffusers UNet converted from the LDM
    weights by diffusers' converter, fixed inputs and the base outputs of all three."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared 2-core box and deterministic
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetModel(**LDM_UNET_KWARGS)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_KWARGS))
        _randomize(unet)
        _randomize(te)
        unet.eval()
        te.eval()
        d_unet = UNet2DConditionModel(**DIFFUSERS_UNET_KWARGS)
        converted = convert_ldm_unet_checkpoint(dict(unet.state_dict()), dict(d_unet.config),
                                                skip_extract_state_dict=True)
        d_unet.load_state_dict(converted, strict=True)
        d_unet.eval()
        x = torch.randn(2, 4, 8, 8)
        ctx = torch.randn(2, 77, 32)
        ids = torch.randint(0, 49406, (2, 77))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        base = {
            "ldm": unet(x, t, context=ctx),
            "diffusers": d_unet(x, t, encoder_hidden_states=ctx).sample,
            "te": te(ids).last_hidden_state,
        }
    yield dict(unet=unet, te=te, d_unet=d_unet, x=x, t=t, ctx=ctx, ids=ids, base=base)
    torch.set_num_threads(threads)


def test_converted_diffusers_unet_reproduces_the_ldm_unet(tiny):
    """Precondition: diffusers' LDM -> diffusers converter and the config above describe the same network (so the
    comparison below tests the LoRA file, not a mismatch of base models)."""
    err = _rel(tiny["base"]["diffusers"], tiny["base"]["ldm"])
    print(f"base UNet: diffusers (converted) vs ldm relative error {err:.2e}")
    assert err < TOL, f"converted diffusers UNet differs from the ldm UNet: relative error {err:.2e}"


@pytest.mark.parametrize("conv_dim", [None, 3], ids=["attention-only", "with-conv_dim"])
def test_our_kohya_file_loads_in_diffusers_and_matches(tiny, tmp_path, conv_dim):
    """Our rank-4 / alpha-2 network (plus, with conv_dim, the ResBlock/Downsample/Upsample layers: 3x3 convs at
    rank 3 / alpha 1, so that the two kinds have different scales; "LoRA-C3Lier") saved to a file and loaded by
    diffusers' Kohya path gives the same UNet and text-encoder outputs as our attached network, with every module
    placed and no key left over."""
    unet, te = tiny["unet"], tiny["te"]
    x, t, ctx, ids = tiny["x"], tiny["t"], tiny["ctx"], tiny["ids"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # lora_down keeps its kaiming init, drawn from the global RNG
        net = LoRANetwork.create(unet, [TextEncoderRoot(te, "lora_te")], "sd1", network_dim=4, network_alpha=2.0,
                                 conv_dim=conv_dim, conv_alpha=1.0 if conv_dim else None)
    n_unet, n_te = len(net.names("unet")), len(net.names("te"))
    assert n_te == 12  # 2 layers x (q, k, v, out_proj, fc1, fc2)
    assert n_unet == (192 if conv_dim is None else 277)  # 16 SpatialTransformers x 12 (+ 85 conv-block layers)
    gen = torch.Generator().manual_seed(1 if conv_dim is None else 2)
    with torch.no_grad():
        for m in net.lora_modules():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.1)

    with torch.no_grad(), net.applied():
        ours_unet = unet(x, t, context=ctx)
        ours_te = te(ids).last_hidden_state
    effect_unet = _rel(ours_unet, tiny["base"]["ldm"])
    effect_te = _rel(ours_te, tiny["base"]["te"])
    assert effect_unet > MIN_EFFECT and effect_te > MIN_EFFECT, (effect_unet, effect_te)

    path = tmp_path / "ours.safetensors"
    sd = net.kohya_state_dict()
    if save_lora_file is not None:
        save_lora_file(path, sd, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}, None)
    else:
        safetensors.torch.save_file(sd, str(path), {"ss_network_module": "networks.lora"})

    # diffusers' Kohya path: _convert_kohya_lora_to_diffusers raises on keys it could not rename.
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    assert network_alphas is not None, "diffusers did not recognise the file as a Kohya LoRA"
    assert len(network_alphas) == n_unet + n_te  # one alpha per module, all carried over
    assert all(k.startswith(("unet.", "text_encoder.")) for k in state_dict)
    assert len(state_dict) == 2 * (n_unet + n_te)

    d_unet = copy.deepcopy(tiny["d_unet"])
    d_te = copy.deepcopy(te)
    # low_cpu_mem_usage=False: diffusers 0.26 defaults it to True, and its text-encoder patch then needs accelerate's
    # init_empty_weights (NameError without accelerate). It only changes how the LoRA layers are allocated.
    try:
        StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, d_unet, low_cpu_mem_usage=False)
    except ValueError as exc:  # diffusers >= 0.27 without PEFT
        if "PEFT backend is required" not in str(exc):
            raise
        pytest.skip(f"diffusers {diffusers.__version__} loads LoRAs only through PEFT (needs transformers >= 4.34); "
                    "install requirements-test-interop.txt")
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, network_alphas, d_te, low_cpu_mem_usage=False)
    assert len(_diffusers_lora_layers(d_unet)) == n_unet
    assert len(_diffusers_te_lora_layers(d_te)) == n_te

    with torch.no_grad():
        theirs_unet = d_unet(x, t, encoder_hidden_states=ctx).sample
        theirs_te = d_te(ids).last_hidden_state
    err_unet = _rel(theirs_unet, ours_unet)
    err_te = _rel(theirs_te, ours_te)
    print(f"conv_dim={conv_dim}: unet rel err {err_unet:.2e} (LoRA effect {effect_unet:.3f}), "
          f"text encoder rel err {err_te:.2e} (LoRA effect {effect_te:.3f})")
    assert err_unet < TOL, f"UNet: diffusers vs lib_lora relative error {err_unet:.2e}"
    assert err_te < TOL, f"text encoder: diffusers vs lib_lora relative error {err_te:.2e}"
