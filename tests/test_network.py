"""Tests of lib_lora.network / lib_lora.lora_module on real module trees.

The models are the real ldm ``UNetModel``, HF ``CLIPTextModel`` and open_clip ``CLIP`` text tower at tiny sizes with
seeded random weights (:mod:`lib_lora.model.build`), built once per module; files are real safetensors files. Every
equality that would pass trivially with zero-initialised ``lora_up`` weights is checked with random non-zero ones.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from lib_lora.errors import ConfigError, FormatError
from lib_lora.lora_module import LoRAModule
from lib_lora.model.build import build_hf_clip_text, build_openclip_text, build_unet
from lib_lora.model.configs import HF_CLIP_TINY, OPENCLIP_TINY, UNET_TINY_SD1, UNET_TINY_SD2
from lib_lora.model_api import TextEncoderRoot
from lib_lora.network import LoadReport, LoRANetwork, find_targets
from lib_lora.safetensors_io import load_lora_file, save_lora_file

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SEED = 0
RANK = 4
OPENCLIP_LAYERS_USED = 2  # SD2 style: the tiny 3-layer tower runs to its penultimate layer


# ------------------------------------------------------------------------------------------------------- models


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _sd1_parts() -> tuple[nn.Module, nn.Module]:
    return _frozen(build_unet(UNET_TINY_SD1, seed=SEED)), _frozen(build_hf_clip_text(HF_CLIP_TINY, seed=SEED))


def _sd2_parts() -> tuple[nn.Module, nn.Module]:
    return _frozen(build_unet(UNET_TINY_SD2, seed=SEED)), _frozen(build_openclip_text(OPENCLIP_TINY, seed=SEED))


def _sd1_roots(te: nn.Module) -> list[TextEncoderRoot]:
    return [TextEncoderRoot(te, "lora_te")]


def _sd2_roots(te: nn.Module) -> list[TextEncoderRoot]:
    return [TextEncoderRoot(te, "lora_te", layers_used=OPENCLIP_LAYERS_USED)]


@pytest.fixture(scope="module")
def inputs() -> SimpleNamespace:
    """Seeded inputs: latents (2, 4, 16, 16) (16 so that the 1/8 level and the middle block are 2x2, not 1x1),
    timesteps, a short context for the UNet, HF token ids and 77-token OpenCLIP tokens."""
    g = torch.Generator().manual_seed(1234)
    return SimpleNamespace(
        x=torch.randn(2, 4, 16, 16, generator=g),
        t=torch.tensor([10, 700]),
        ctx=torch.randn(2, 8, 32, generator=g),
        ids=torch.randint(0, 49408, (2, 8), generator=g),
        tokens=torch.randint(0, 49408, (2, 77), generator=g),
    )


@pytest.fixture(scope="module")
def sd1() -> SimpleNamespace:
    """The tiny SD1 model (conv proj_in/proj_out, HF CLIP text encoder), frozen, eval mode."""
    unet, te = _sd1_parts()
    return SimpleNamespace(unet=unet, te=te, roots=_sd1_roots(te), arch="sd1")


@pytest.fixture(scope="module")
def sd2() -> SimpleNamespace:
    """The tiny SD2 model (Linear proj_in/proj_out, OpenCLIP text tower with fused attention), frozen, eval mode."""
    unet, te = _sd2_parts()
    return SimpleNamespace(unet=unet, te=te, roots=_sd2_roots(te), arch="sd2")


@pytest.fixture(scope="module")
def base(sd1, sd2, inputs) -> dict[str, torch.Tensor]:
    """The base models' outputs on ``inputs`` (no network attached)."""
    with torch.no_grad():
        return {"sd1_unet": run_unet(sd1.unet, inputs), "hf_clip": run_hf(sd1.te, inputs),
                "sd2_unet": run_unet(sd2.unet, inputs), "openclip": run_openclip(sd2.te, inputs)}


def run_unet(unet: nn.Module, inp: SimpleNamespace) -> torch.Tensor:
    return unet(inp.x, inp.t, context=inp.ctx)


def run_hf(te: nn.Module, inp: SimpleNamespace) -> torch.Tensor:
    return te(input_ids=inp.ids).last_hidden_state


def run_openclip(m: nn.Module, inp: SimpleNamespace) -> torch.Tensor:
    """As ldm's FrozenOpenCLIPEmbedder runs the tower (sequence-first)."""
    x = m.token_embedding(inp.tokens) + m.positional_embedding
    x = x.permute(1, 0, 2)
    return m.transformer(x, attn_mask=m.attn_mask)


def run_te(model: SimpleNamespace, inp: SimpleNamespace) -> torch.Tensor:
    return run_hf(model.te, inp) if model.arch == "sd1" else run_openclip(model.te, inp)


def randomize_(net: LoRANetwork, seed: int = 7, up_std: float = 0.1) -> LoRANetwork:
    """Seeded random non-zero lora_down (kaiming-like) and lora_up (N(0, up_std)) for every module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.lora_modules():
            down = m.lora_down.weight
            fan_in = down[0].numel()
            down.copy_(torch.randn(down.shape, generator=g) / math.sqrt(fan_in))
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * up_std)
    return net


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    bad = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert not bad, f"base weights changed: {bad[:5]}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def loss_of(out: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """A scalar with a random (fixed) weight per output element, so that no gradient cancels by symmetry."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out.float() * w).sum()


# Three kinds of network whose output is a single model part.
KINDS = ("sd1_unet", "hf_clip", "openclip")


def _part(kind: str, sd1: SimpleNamespace, sd2: SimpleNamespace):
    """(network factory kwargs, forward callable) for one model part."""
    if kind == "sd1_unet":
        return dict(unet=sd1.unet, text_encoders=[], arch="sd1"), lambda inp: run_unet(sd1.unet, inp)
    if kind == "hf_clip":
        return dict(unet=None, text_encoders=sd1.roots, arch="sd1"), lambda inp: run_hf(sd1.te, inp)
    return dict(unet=None, text_encoders=sd2.roots, arch="sd2"), lambda inp: run_openclip(sd2.te, inp)


# ------------------------------------------------------------------------------------------------ structure


def test_tiny_module_counts_and_kohya_state_dict(sd1, sd2):
    """A new network has sd-scripts' module set on the tiny models (16 transformer blocks x 12 = 192 UNet modules,
    2 HF layers x 6, 2 used OpenCLIP layers x 6), its state_dict holds exactly the Kohya keys
    (down, up, alpha per module), and creating it adds nothing to the base models' state_dicts."""
    before1, before_te = snapshot(sd1.unet), snapshot(sd1.te)
    net1 = LoRANetwork.create(sd1.unet, sd1.roots, "sd1", network_dim=RANK, network_alpha=2)
    assert (len(net1.names("unet")), len(net1.names("te"))) == (192, 12)
    net2 = LoRANetwork.create(sd2.unet, sd2.roots, "sd2", network_dim=RANK)
    assert (len(net2.names("unet")), len(net2.names("te"))) == (192, 12)
    assert not any("layers_2_" in n for n in net2.names("te")), "the unused last OpenCLIP layer got modules"

    keys = set(net1.state_dict())
    expected = {f"{n}.{p}" for n in net1.names() for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected
    assert set(net1.kohya_state_dict()) == expected
    m = net1.get_submodule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    assert tuple(m.lora_down.weight.shape) == (RANK, 32) and tuple(m.lora_up.weight.shape) == (32, RANK)
    assert m.alpha.item() == 2.0 and m.scale == 0.5
    # SD1's proj_in is a 1x1 conv: its LoRA is conv-shaped.
    p = net1.get_submodule("lora_unet_down_blocks_0_attentions_0_proj_in")
    assert tuple(p.lora_down.weight.shape) == (RANK, 32, 1, 1) and tuple(p.lora_up.weight.shape) == (32, RANK, 1, 1)
    # SD2's proj_in is Linear.
    p2 = net2.get_submodule("lora_unet_down_blocks_0_attentions_0_proj_in")
    assert tuple(p2.lora_down.weight.shape) == (RANK, 32)
    assert_state_equal(sd1.unet, before1)
    assert_state_equal(sd1.te, before_te)


def test_conv_dim_adds_locon_modules(sd1):
    """With conv_dim, ResBlock/Downsample/Upsample layers get modules: 3x3 convs at conv_dim/conv_alpha (default
    alpha 1.0), their Linear/1x1 children at network_dim; without conv_dim none of them exist."""
    plain = LoRANetwork.create(sd1.unet, [], "sd1", network_dim=RANK, conv_dim=None)
    assert not any("resnets" in n or "samplers" in n for n in plain.names())
    net = LoRANetwork.create(sd1.unet, [], "sd1", network_dim=RANK, network_alpha=2, conv_dim=3)
    names = set(net.names())
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
                 "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_up_blocks_1_upsamplers_0_conv",
                 "lora_unet_mid_block_resnets_1_time_emb_proj", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"):
        assert name in names
    conv1 = net.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1")
    assert tuple(conv1.lora_down.weight.shape) == (3, 32, 3, 3) and conv1.scale == pytest.approx(1.0 / 3)
    down = net.get_submodule("lora_unet_down_blocks_0_downsamplers_0_conv")
    assert down.lora_down.stride == (2, 2)
    emb = net.get_submodule("lora_unet_mid_block_resnets_1_time_emb_proj")
    assert emb.lora_dim == RANK and emb.scale == 0.5
    shortcut = net.get_submodule("lora_unet_down_blocks_1_resnets_0_conv_shortcut")
    assert shortcut.lora_dim == RANK and tuple(shortcut.lora_down.weight.shape[2:]) == (1, 1)


@pytest.mark.parametrize("kwargs", [dict(network_dim=0), dict(conv_dim=-1),
                                    dict(train_unet=False, train_text_encoder=False)])
def test_create_rejects_bad_config(sd1, kwargs):
    """Bad network settings raise ConfigError naming the setting."""
    with pytest.raises(ConfigError):
        LoRANetwork.create(sd1.unet, sd1.roots, "sd1", **kwargs)


def test_unknown_arch_is_config_error(sd1):
    """An unknown architecture name raises ConfigError listing the known ones."""
    with pytest.raises(ConfigError, match="sd1"):
        find_targets(sd1.unet, [], "sd3", include_conv=False)


def test_train_flags_and_optimizer_groups(sd1):
    """train_unet/train_text_encoder leave out a part; prepare_optimizer_params gives one group per part, None lr
    means the default, lr 0 drops the part from the optimizer (as sd-scripts)."""
    te_only = LoRANetwork.create(sd1.unet, sd1.roots, "sd1", network_dim=RANK, train_unet=False)
    assert te_only.names("unet") == [] and len(te_only.names("te")) == 12
    net = LoRANetwork.create(sd1.unet, sd1.roots, "sd1", network_dim=RANK)
    groups, descs = net.prepare_optimizer_params(text_encoder_lr=None, unet_lr=1e-3, default_lr=5e-4)
    assert descs == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-4, 1e-3]
    assert [len(g["params"]) for g in groups] == [12 * 2, 192 * 2]
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert all_ids == {id(p) for p in net.parameters()}
    groups, descs = net.prepare_optimizer_params(text_encoder_lr=0.0, unet_lr=None, default_lr=1e-4)
    assert descs == ["unet"] and groups[0]["lr"] == 1e-4


# ------------------------------------------------------------------------------------ attach / detach / identity


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_is_identity_and_random_up_changes_output(kind, sd1, sd2, inputs, base):
    """Zero-initialised up: outputs are bit-identical to the base. Random non-zero up: outputs change; multiplier 0
    gives the base exactly; detach restores bit-identical outputs and an identical base state_dict."""
    kw, run = _part(kind, sd1, sd2)
    module = kw["unet"] if kw["unet"] is not None else kw["text_encoders"][0].module
    before = snapshot(module)
    base = base[kind]
    with torch.no_grad():
        assert torch.equal(run(inputs), base)
        net = LoRANetwork.create(network_dim=RANK, network_alpha=2, **kw)
        with net.applied():
            assert torch.equal(run(inputs), base)
            randomize_(net)
            out = run(inputs)
            assert rel_err(out, base) > 1e-3, "a random non-zero LoRA did not change the output"
            net.set_multiplier(0.0)
            assert torch.equal(run(inputs), base)
            net.set_multiplier(1.0)
            assert torch.equal(run(inputs), out)
        assert not net.attached
        assert torch.equal(run(inputs), base)
    assert_state_equal(module, before)


def test_te_and_unet_multipliers_act_on_their_part_only(sd1, inputs, base):
    """set_multiplier(te=..., unet=...) (A1111's <lora:x:te:unet>) scales one part and leaves the other as it was."""
    with torch.no_grad():
        base_u, base_t = base["sd1_unet"], base["hf_clip"]
        net = randomize_(LoRANetwork.create(sd1.unet, sd1.roots, "sd1", network_dim=RANK))
        with net.applied():
            full_u, full_t = run_unet(sd1.unet, inputs), run_hf(sd1.te, inputs)
            net.set_multiplier(te=0.0, unet=1.0)
            assert torch.equal(run_hf(sd1.te, inputs), base_t)
            assert torch.equal(run_unet(sd1.unet, inputs), full_u)
            net.set_multiplier(te=1.0, unet=0.0)
            assert torch.equal(run_unet(sd1.unet, inputs), base_u)
            assert torch.equal(run_hf(sd1.te, inputs), full_t)
            net.set_multiplier(te=0.5)  # unet stays 0
            half_t = run_hf(sd1.te, inputs)
            assert not torch.equal(half_t, full_t) and not torch.equal(half_t, base_t)
            assert {m.multiplier for m in net.lora_modules("te")} == {0.5}
            assert {m.multiplier for m in net.lora_modules("unet")} == {0.0}


def test_applied_detaches_when_body_raises(sd1, inputs, base):
    """`with net.applied():` restores the forwards even when the body raises, and the error propagates."""
    with torch.no_grad():
        net = randomize_(LoRANetwork.create(sd1.unet, [], "sd1", network_dim=RANK))
        with pytest.raises(ZeroDivisionError), net.applied():
            assert net.attached
            _ = 1 / 0
        assert not net.attached
        assert torch.equal(run_unet(sd1.unet, inputs), base["sd1_unet"])
    layers = [m for m in sd1.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert not any("forward" in m.__dict__ for m in layers), "an instance forward was left behind"


def test_attach_is_idempotent_and_detach_restores_foreign_patch(sd1, inputs):
    """attach() twice applies the LoRA once; detach() puts back a forward another extension had patched in before."""
    layer = sd1.te.text_model.encoder.layers[0].self_attn.q_proj
    calls = []

    def foreign(x):
        calls.append(1)
        return nn.Linear.forward(layer, x)

    layer.forward = foreign
    try:
        with torch.no_grad():
            base = run_hf(sd1.te, inputs)
            net = randomize_(LoRANetwork.create(None, sd1.roots, "sd1", network_dim=RANK))
            net.attach()
            once = run_hf(sd1.te, inputs)
            net.attach()
            assert torch.equal(run_hf(sd1.te, inputs), once)
            assert calls, "the wrapped forward did not call the previously patched forward"
            net.detach()
            net.detach()
            assert layer.__dict__["forward"] is foreign
            assert torch.equal(run_hf(sd1.te, inputs), base)
    finally:
        del layer.forward


# ---------------------------------------------------------------------------------------------- merge / unmerge


def _kind_targets(kind: str, sd1: SimpleNamespace, sd2: SimpleNamespace):
    """(targets of one layer kind, forward callable, base module) for the merge tests."""
    if kind == "fused_attention":
        found = [t for t in find_targets(None, sd2.roots, "sd2", False) if t.mha_part is not None]
        return found, (lambda inp: run_openclip(sd2.te, inp)), sd2.te
    if kind == "hf_linear":
        return find_targets(None, sd1.roots, "sd1", False), (lambda inp: run_hf(sd1.te, inp)), sd1.te
    if kind == "sd2_linear_proj":
        found = [t for t in find_targets(sd2.unet, [], "sd2", False) if t.name.endswith(("proj_in", "proj_out"))]
        assert all(isinstance(t.layer, nn.Linear) for t in found)
        return found, (lambda inp: run_unet(sd2.unet, inp)), sd2.unet
    found = find_targets(sd1.unet, [], "sd1", include_conv=True)
    if kind == "linear":
        found = [t for t in found if isinstance(t.layer, nn.Linear)]
    elif kind == "conv1x1":
        found = [t for t in found if isinstance(t.layer, nn.Conv2d) and t.kernel_size == (1, 1)]
    else:  # conv3x3: ResBlock in/out convs, Downsample op, Upsample conv
        found = [t for t in found if t.is_kxk_conv]
        names = " ".join(t.name for t in found)
        assert "downsamplers_0_conv" in names and "upsamplers_0_conv" in names and "resnets_0_conv2" in names
    return found, (lambda inp: run_unet(sd1.unet, inp)), sd1.unet


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "hf_linear", "sd2_linear_proj",
                                  "fused_attention"])
def test_merge_equals_attached_and_unmerge_is_bit_exact(kind, sd1, sd2, inputs):
    """merge() (at multiplier 0.7, alpha/rank 0.5) gives the attached output within 1e-5 relative error (fp32) for
    every layer kind, and unmerge() restores the base weights and outputs bit-exactly."""
    found, run, module = _kind_targets(kind, sd1, sd2)
    assert found
    before = snapshot(module)
    net = randomize_(LoRANetwork(found, {t.name: RANK for t in found}, {t.name: RANK / 2 for t in found}))
    net.set_multiplier(0.7)
    with torch.no_grad():
        base = run(inputs)
        with net.applied():
            attached = run(inputs)
        assert rel_err(attached, base) > 1e-4
        net.merge()
        assert net.merged and not net.attached
        merged = run(inputs)
        assert rel_err(merged, attached) < 1e-5
        with pytest.raises(RuntimeError, match="unmerge"):
            net.attach()
        net.unmerge()
        assert not net.merged
        assert_state_equal(module, before)
        assert torch.equal(run(inputs), base)


def test_merge_while_attached_detaches_first(sd1, inputs, base):
    """merge() on an attached network detaches it first, so the delta is not applied twice; a second merge() is a
    no-op; after unmerge() the network attaches again with the same output as before."""
    before = snapshot(sd1.te)
    with torch.no_grad():
        net = randomize_(LoRANetwork.create(None, sd1.roots, "sd1", network_dim=RANK))
        net.attach()
        attached = run_hf(sd1.te, inputs)
        net.merge()
        try:
            assert not net.attached
            merged = run_hf(sd1.te, inputs)
            assert rel_err(merged, attached) < 1e-5
            net.merge()
            assert torch.equal(run_hf(sd1.te, inputs), merged)
        finally:
            net.unmerge()
        assert_state_equal(sd1.te, before)
        assert torch.equal(run_hf(sd1.te, inputs), base["hf_clip"])
        with net.applied():
            assert torch.equal(run_hf(sd1.te, inputs), attached)


def test_lora_module_alpha_rules():
    """LoRAModule: alpha None or 0 means alpha = rank (scale 1.0, alpha buffer = rank), else scale = alpha / rank;
    set_alpha applies the same rule; ranks < 1 and dropouts outside [0, 1) are refused."""
    assert LoRAModule("a", 8, 8, 4, None).scale == 1.0
    m = LoRAModule("b", 8, 8, 4, 0)
    assert m.scale == 1.0 and m.alpha.item() == 4.0
    m.set_alpha(2)
    assert m.scale == 0.5 and m.alpha.item() == 2.0
    m.set_alpha(0.0)
    assert m.scale == 1.0 and m.alpha.item() == 4.0
    assert not m.lora_up.weight.any() and m.lora_down.weight.any()
    with pytest.raises(ValueError):
        LoRAModule("c", 8, 8, 0, None)
    with pytest.raises(ValueError):
        LoRAModule("d", 8, 8, 4, None, rank_dropout=1.0)


# ------------------------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("kind", ["sd1_unet", "openclip"])
@pytest.mark.parametrize("dropout", ["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_act_only_in_train_mode(kind, dropout, sd1, sd2, inputs):
    """network_dropout, rank_dropout and module_dropout (p=0.5) change outputs in train mode only; in eval mode the
    output is deterministic and equals the same network without dropout, bit for bit."""
    kw, run = _part(kind, sd1, sd2)
    net = randomize_(LoRANetwork.create(network_dim=RANK, **kw, **{dropout: 0.5}))
    plain = LoRANetwork.create(network_dim=RANK, **kw)
    plain.load_state_dict(net.state_dict())
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with plain.applied():
            reference = run(inputs)
        with net.applied():
            net.eval()
            assert torch.equal(run(inputs), reference)
            net.train()
            first, second = run(inputs), run(inputs)
    assert not torch.equal(first, reference)
    assert not torch.equal(first, second), "train-mode dropout drew the same mask twice"


def test_rank_dropout_masks_per_sample(sd1):
    """rank_dropout draws a mask per sample (sd-scripts): in train mode two identical samples of one batch get
    different LoRA outputs, Linear (3-D input) and conv alike."""
    for module in (LoRAModule("lin", 8, 8, 16, None, rank_dropout=0.5),
                   LoRAModule("conv", 8, 8, 16, None, kernel_size=(3, 3), padding=1, rank_dropout=0.5)):
        nn.init.normal_(module.lora_up.weight)
        x = torch.randn(1, 5, 8) if not module.is_conv else torch.randn(1, 8, 4, 4)
        x = torch.cat([x, x])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = module.train().lora_output(x)
        assert not torch.equal(out[0], out[1])
        out = module.eval().lora_output(x)
        assert torch.equal(out[0], out[1])


# ---------------------------------------------------------------------------------------------------- dtypes


def test_bf16_text_encoders_keep_fp32_lora(sd1, sd2, inputs):
    """With bf16 base weights (CPU) the LoRA parameters stay fp32; HF CLIP and OpenCLIP run and return bf16, close to
    the fp32 computation, and gradients reach the fp32 LoRA parameters in fp32."""
    for arch, model in (("sd1", sd1), ("sd2", sd2)):
        te16 = copy.deepcopy(model.te).to(torch.bfloat16)
        roots = _sd1_roots(te16) if arch == "sd1" else _sd2_roots(te16)
        run = run_hf if arch == "sd1" else run_openclip
        net = randomize_(LoRANetwork.create(None, roots, arch, network_dim=RANK))
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        assert {b.dtype for b in net.buffers()} == {torch.float32}
        ref_net = LoRANetwork.create(None, model.roots, arch, network_dim=RANK)
        ref_net.load_state_dict(net.state_dict())
        with torch.no_grad(), ref_net.applied():
            ref = run(model.te, inputs)
        with net.applied():
            out = run(te16, inputs)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
            assert rel_err(out.float(), ref) < 0.05
            loss_of(out).backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        # merge into the bf16 weights: close to the attached output; unmerge restores them bit-exactly
        before = snapshot(te16)
        with torch.no_grad():
            net.merge()
            assert all(p.dtype == torch.bfloat16 for p in te16.parameters())
            assert rel_err(run(te16, inputs).float(), ref) < 0.05
            net.unmerge()
        assert_state_equal(te16, before)


def test_bf16_unet_layers_keep_fp32_lora(sd1):
    """On a bf16 UNet (CPU) the LoRA modules of a Linear, a 1x1 conv, a 3x3 conv and a stride-2 conv are fp32,
    and each wrapped layer returns bf16 close to the fp32 layer + LoRA computation. (ldm's UNetModel itself only
    runs in bf16 under the WebUI's casts, so the layers are called one by one.)"""
    unet16 = copy.deepcopy(sd1.unet).to(torch.bfloat16)
    net = randomize_(LoRANetwork.create(unet16, [], "sd1", network_dim=RANK, conv_dim=RANK))
    ref_net = LoRANetwork.create(sd1.unet, [], "sd1", network_dim=RANK, conv_dim=RANK)
    ref_net.load_state_dict(net.state_dict())
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    cases = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (2, 64, 32),
             "input_blocks.1.1.proj_in": (2, 32, 8, 8),
             "input_blocks.1.0.in_layers.2": (2, 32, 8, 8),
             "input_blocks.3.0.op": (2, 32, 8, 8)}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), net.applied(), ref_net.applied():
        for path, shape in cases.items():
            x = torch.randn(shape, generator=g)
            out = unet16.get_submodule(path)(x.bfloat16())
            ref = sd1.unet.get_submodule(path)(x)
            assert out.dtype == torch.bfloat16, path
            assert rel_err(out.float(), ref) < 0.03, path


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["sd1_unet_conv", "sd2_unet", "hf_clip", "openclip"])
def test_gradients_reach_every_module(kind, sd1, sd2, inputs):
    """From zero init, one backward gives a non-zero lora_up grad in every module (and exactly zero lora_down grads,
    as up is zero); with non-zero up, every lora_down grad is non-zero too. Through the UNet (SD1 with conv_dim:
    3x3/1x1 convs and time_emb_proj included; SD2 with Linear proj) and both text encoder kinds."""
    if kind == "sd1_unet_conv":
        net = LoRANetwork.create(sd1.unet, [], "sd1", network_dim=RANK, conv_dim=2)
        assert len(net.names()) == 277  # 192 + 22 ResBlocks x 3 + 13 shortcuts + 3 down + 3 up samplers

        def run(inp):
            return run_unet(sd1.unet, inp)
    elif kind == "sd2_unet":
        net = LoRANetwork.create(sd2.unet, [], "sd2", network_dim=RANK)

        def run(inp):
            return run_unet(sd2.unet, inp)
    else:
        kw, run = _part(kind, sd1, sd2)
        net = LoRANetwork.create(network_dim=RANK, **kw)
    net.train()
    with net.applied():
        loss_of(run(inputs)).backward()
    no_up = [m.lora_name for m in net.lora_modules() if m.lora_up.weight.grad is None
             or not m.lora_up.weight.grad.abs().sum() > 0]
    assert not no_up, f"no lora_up gradient for {no_up}"
    assert all(m.lora_down.weight.grad is None or not m.lora_down.weight.grad.any() for m in net.lora_modules())

    net.zero_grad(set_to_none=True)
    randomize_(net)
    with net.applied():
        loss_of(run(inputs)).backward()
    no_down = [m.lora_name for m in net.lora_modules() if m.lora_down.weight.grad is None
               or not m.lora_down.weight.grad.abs().sum() > 0]
    assert not no_down, f"no lora_down gradient for {no_down}"


# --------------------------------------------------------------------------------------------- save / load


def _outputs(net: LoRANetwork, model: SimpleNamespace, inp: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), net.applied():
        return run_unet(model.unet, inp), run_te(model, inp)


def _fresh(arch: str) -> SimpleNamespace:
    unet, te = _sd1_parts() if arch == "sd1" else _sd2_parts()
    return SimpleNamespace(unet=unet, te=te, roots=_sd1_roots(te) if arch == "sd1" else _sd2_roots(te), arch=arch)


@pytest.fixture(scope="module")
def trained(sd1, sd2, inputs, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """A randomised network per arch (SD1 with conv_dim), saved in fp32 with save_lora_file, and its outputs."""
    out = {}
    folder = tmp_path_factory.mktemp("lora")
    for arch, model, kwargs in (("sd1", sd1, dict(conv_dim=2, conv_alpha=1)), ("sd2", sd2, {})):
        net = randomize_(LoRANetwork.create(model.unet, model.roots, arch, network_dim=RANK, network_alpha=2,
                                            **kwargs))
        path = save_lora_file(folder / f"{arch}.safetensors", net.kohya_state_dict(), {"ss_network_dim": RANK},
                              torch.float32)
        unet_out, te_out = _outputs(net, model, inputs)
        out[arch] = SimpleNamespace(net=net, path=path, unet_out=unet_out, te_out=te_out, model=model)
    return out


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_save_then_load_into_fresh_model_gives_identical_outputs(arch, trained, inputs):
    """save_lora_file(fp32) then from_weights into a freshly built model (same seed): report.ok, every module
    loaded with its rank and alpha, and UNet and text-encoder outputs identical (torch.equal)."""
    src = trained[arch]
    fresh = _fresh(arch)
    assert_state_equal(fresh.unet, snapshot(src.model.unet))
    sd, metadata = load_lora_file(src.path)
    assert metadata["ss_network_dim"] == str(RANK)
    net, report = LoRANetwork.from_weights(sd, fresh.unet, fresh.roots, arch)
    assert isinstance(report, LoadReport)
    assert report.ok, report.summary()
    assert sorted(report.loaded) == sorted(src.net.names()) and report.missing_alpha == []
    assert net.names("unet") == src.net.names("unet") and net.names("te") == src.net.names("te")
    got, want = net.kohya_state_dict(), src.net.kohya_state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    unet_out, te_out = _outputs(net, fresh, inputs)
    assert torch.equal(unet_out, src.unet_out)
    assert torch.equal(te_out, src.te_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_save_loads_with_small_error(dtype, trained, sd1, inputs, base, tmp_path):
    """An fp16/bf16 file loads into fp32 LoRA parameters equal to the cast tensors, and the outputs differ from the
    fp32 network's by a small fraction of the LoRA's own effect."""
    src = trained["sd1"]
    path = save_lora_file(tmp_path / "half.safetensors", src.net.kohya_state_dict(), None, dtype)
    sd, _ = load_lora_file(path)
    assert {t.dtype for t in sd.values()} == {dtype}
    net, report = LoRANetwork.from_weights(sd, sd1.unet, sd1.roots, "sd1")
    assert report.ok, report.summary()
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    for k, v in net.kohya_state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    base_u, base_t = base["sd1_unet"], base["hf_clip"]
    unet_out, te_out = _outputs(net, sd1, inputs)
    tol = 0.01 if dtype == torch.float16 else 0.05
    assert (unet_out - src.unet_out).abs().max() <= tol * (src.unet_out - base_u).abs().max()
    assert (te_out - src.te_out).abs().max() <= tol * (src.te_out - base_t).abs().max()


# ------------------------------------------------------------------------------------------------ field cases


def _write(path, tensors: dict[str, torch.Tensor]) -> str:
    """Writes a file the way other tools might (no validation), returns its path."""
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_nan_file_is_rejected_naming_the_key(trained, sd1, tmp_path):
    """A file with one NaN in a lora_up is refused by from_weights and load_weights with FormatError naming that key,
    and load_weights leaves the network's weights untouched."""
    sd = trained["sd1"].net.kohya_state_dict()
    key = "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_v.lora_up.weight"
    sd[key][3, 1] = float("nan")
    loaded, _ = load_lora_file(_write(tmp_path / "nan.safetensors", sd))
    with pytest.raises(FormatError, match=key):
        LoRANetwork.from_weights(loaded, sd1.unet, sd1.roots, "sd1")
    net = LoRANetwork.create(sd1.unet, sd1.roots, "sd1", network_dim=RANK, conv_dim=2)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(FormatError, match=key):
        net.load_weights(loaded)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("extra, field", [
    ({"lora_te2_text_projection.weight": torch.randn(32, 32)}, "unknown_keys"),
    ({"lora_te2_text_projection.lora_down.weight": torch.randn(RANK, 32),
      "lora_te2_text_projection.lora_up.weight": torch.randn(32, RANK)}, "unmatched"),
    ({"emb_params": torch.randn(2, 32)}, "unknown_keys"),
    ({"lora_unet_conv_in.lora_down.weight": torch.randn(RANK, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.randn(32, RANK, 1, 1),
      "lora_unet_conv_in.alpha": torch.tensor(1.0)}, "unmatched"),
])
def test_extra_keys_are_reported_and_the_rest_loads(extra, field, trained, tmp_path, inputs):
    """Extra keys (a ``lora_te2_text_projection`` weight or module, a bundled embedding, a module on a layer sd-scripts
    never targets) are listed in report.unknown_keys / report.unmatched; every other module loads with the clean
    file's exact tensors (and so its outputs: see the round-trip test), the text encoder's output checked here."""
    src = trained["sd1"]
    sd = {**src.net.kohya_state_dict(), **extra}
    loaded, _ = load_lora_file(_write(tmp_path / "extra.safetensors", sd))
    net, report = LoRANetwork.from_weights(loaded, src.model.unet, src.model.roots, "sd1")
    expected = sorted(extra) if field == "unknown_keys" else sorted({k.split(".")[0] for k in extra})
    assert getattr(report, field) == expected
    other = "unmatched" if field == "unknown_keys" else "unknown_keys"
    assert getattr(report, other) == [] and report.shape_errors == []
    assert not report.ok and expected[0] in report.summary()
    assert sorted(report.loaded) == sorted(src.net.names())
    got, want = net.kohya_state_dict(), src.net.kohya_state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad(), net.applied():
        assert torch.equal(run_hf(src.model.te, inputs), src.te_out)


def test_shape_mismatches_are_reported_not_raised(trained, tmp_path):
    """A module whose tensors do not fit its layer (wrong in-features; a rank other than the network's) is listed in
    report.shape_errors with the reason; the other modules still load."""
    src = trained["sd1"]
    sd = src.net.kohya_state_dict()
    bad = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd[f"{bad}.lora_down.weight"] = torch.randn(RANK, 99)
    net, report = LoRANetwork.from_weights(sd, src.model.unet, src.model.roots, "sd1")
    assert len(report.shape_errors) == 1 and report.shape_errors[0].startswith(bad)
    assert bad not in report.loaded and len(report.loaded) == len(src.net.names()) - 1
    assert not report.ok
    # The module that did not load is not in the network, so saving it back never invents a module.
    assert bad not in net.names() and f"{bad}.lora_down.weight" not in net.kohya_state_dict()
    # Loading a rank-8 file into an existing rank-4 network.
    rank8 = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 32),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 8)}
    report = LoRANetwork.create(None, src.model.roots, "sd1", network_dim=RANK).load_weights(rank8)
    assert report.loaded == [] and len(report.shape_errors) == 1 and "rank 8" in report.shape_errors[0]


def test_file_without_alpha_loads_with_scale_one(sd1, tmp_path, inputs):
    """A file without `.alpha` keys loads with alpha = rank: every module's scale is 1.0, report.missing_alpha lists
    them (report.ok stays true), outputs equal the same file with alpha = rank, and a layer's LoRA output is
    exactly x @ (up @ down)^T with no alpha scaling."""
    net = randomize_(LoRANetwork.create(sd1.unet, sd1.roots, "sd1", network_dim=RANK, network_alpha=1))
    sd = net.kohya_state_dict()
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    with_rank_alpha = {**no_alpha, **{k: torch.tensor(float(RANK)) for k in sd if k.endswith(".alpha")}}
    loaded, _ = load_lora_file(_write(tmp_path / "noalpha.safetensors", no_alpha))
    net1, report = LoRANetwork.from_weights(loaded, sd1.unet, sd1.roots, "sd1")
    assert report.ok, report.summary()
    assert sorted(report.missing_alpha) == sorted(net.names())
    assert {m.scale for m in net1.lora_modules()} == {1.0}
    assert {m.alpha.item() for m in net1.lora_modules()} == {float(RANK)}
    net2, report2 = LoRANetwork.from_weights(with_rank_alpha, sd1.unet, sd1.roots, "sd1")
    assert report2.missing_alpha == []
    with torch.no_grad():
        with net1.applied():
            out1 = run_hf(sd1.te, inputs)
        with net2.applied():
            out2 = run_hf(sd1.te, inputs)
    assert torch.equal(out1, out2)
    assert {m.scale for m in net2.lora_modules()} == {1.0}

    name = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    down, up = no_alpha[f"{name}.lora_down.weight"], no_alpha[f"{name}.lora_up.weight"]
    layer = sd1.te.text_model.encoder.layers[1].self_attn.q_proj
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = layer(x)
        with net1.applied():
            got = layer(x)
    torch.testing.assert_close(got - base, x @ (up @ down).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["sd2", "sd1"])
def test_proj_tensors_in_the_other_layout_load_the_same(arch, trained, inputs):
    """SD2: sd-scripts saves proj_in/proj_out as 1x1 conv (4-D) while the WebUI's SD2 UNet has Linear proj; such a
    file loads into the Linear and gives the same outputs as the 2-D file. SD1 (conv proj) with 2-D tensors: same."""
    src = trained[arch]
    sd = src.net.kohya_state_dict()
    changed = 0
    for k in list(sd):
        if ("proj_in." in k or "proj_out." in k) and not k.endswith(".alpha"):
            t = sd[k]
            sd[k] = t.reshape(*t.shape, 1, 1) if arch == "sd2" else t.reshape(t.shape[:2])
            changed += 1
    assert changed == 2 * 2 * 16
    net, report = LoRANetwork.from_weights(sd, src.model.unet, src.model.roots, arch)
    assert report.ok, report.summary()
    unet_out, _ = _outputs(net, src.model, inputs)
    assert torch.equal(unet_out, src.unet_out)


@pytest.mark.parametrize("layer_path, name", [
    ("input_blocks.1.0.in_layers.2", "lora_unet_down_blocks_0_resnets_0_conv1"),
    ("input_blocks.3.0.op", "lora_unet_down_blocks_0_downsamplers_0_conv"),
    ("output_blocks.5.2.conv", "lora_unet_up_blocks_1_upsamplers_0_conv"),
])
def test_lycoris_cp_lora_mid_loads_as_composed_convs(layer_path, name, sd1, inputs, base):
    """A 3x3 module with `lora_mid` (LyCORIS CP: down (r,in,1,1), mid (r,r,3,3), up (out,r,1,1)) loads, and the
    wrapped layer equals base(x) + scale * up(mid(down(x))) computed with three convs (mid with the layer's stride
    and padding); merging gives the same."""
    layer = sd1.unet.get_submodule(layer_path)
    assert layer.kernel_size == (3, 3)
    r, cin, cout = 3, layer.in_channels, layer.out_channels
    g = torch.Generator().manual_seed(11)
    down = torch.randn(r, cin, 1, 1, generator=g) * 0.3
    mid = torch.randn(r, r, 3, 3, generator=g) * 0.3
    up = torch.randn(cout, r, 1, 1, generator=g) * 0.3
    alpha = 1.5
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
          f"{name}.alpha": torch.tensor(alpha)}
    net, report = LoRANetwork.from_weights(sd, sd1.unet, sd1.roots, "sd1")
    assert report.ok and report.loaded == [name], report.summary()
    x = torch.randn(2, cin, 8, 8, generator=g)
    with torch.no_grad():
        expected = layer(x) + (alpha / r) * F.conv2d(
            F.conv2d(F.conv2d(x, down), mid, stride=layer.stride, padding=layer.padding), up)
        with net.applied():
            got = layer(x)
            full = run_unet(sd1.unet, inputs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(full, base["sd1_unet"])
        net.merge()
        try:
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        finally:
            net.unmerge()


def test_unmatched_names_are_listed_never_raised(sd1):
    """Modules that match no layer (wrong names, another architecture's prefixes, half modules) are listed; nothing
    raises and nothing is created for them."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name in ("lora_unet_bogus_block_0_to_q", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                 "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"):
        sd[f"{name}.lora_down.weight"] = torch.randn(RANK, 32, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(32, RANK, generator=g)
    sd["lora_unet_half_module.lora_down.weight"] = torch.randn(RANK, 32, generator=g)
    net, report = LoRANetwork.from_weights(sd, sd1.unet, sd1.roots, "sd1")
    assert report.loaded == [] and net.names() == []
    assert report.unmatched == sorted(["lora_unet_bogus_block_0_to_q", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                       "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"])
    assert report.unknown_keys == ["lora_unet_half_module.lora_down.weight"]


# --------------------------------------------------------------------------------------- shared reference files


def test_reference_files_load_fully_and_agree(reference_lora_dir, sd1, inputs, base):
    """The shared Kohya reference files: test_lora (diffusers names) and test_lora_compvis (LDM names) each load all
    204 modules into the tiny SD1 model with identical tensors and identical outputs, which differ from the base;
    multiplier 0 gives the base exactly; test_lora_bogus reports exactly its one unmatched module."""
    base_u, base_t = base["sd1_unet"], base["hf_clip"]
    nets, outs = {}, {}
    for stem in ("test_lora", "test_lora_compvis"):
        sd, _ = load_lora_file(reference_lora_dir / f"{stem}.safetensors")
        net, report = LoRANetwork.from_weights(sd, sd1.unet, sd1.roots, "sd1")
        assert report.ok, report.summary()
        assert len(report.loaded) == 204 and (len(net.names("unet")), len(net.names("te"))) == (192, 12)
        nets[stem], outs[stem] = net, _outputs(net, sd1, inputs)
    a, b = nets["test_lora"].kohya_state_dict(), nets["test_lora_compvis"].kohya_state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(outs["test_lora"][0], outs["test_lora_compvis"][0])
    assert torch.equal(outs["test_lora"][1], outs["test_lora_compvis"][1])
    assert rel_err(outs["test_lora"][0], base_u) > 1e-3 and rel_err(outs["test_lora"][1], base_t) > 1e-3
    nets["test_lora"].set_multiplier(0.0)
    zero = _outputs(nets["test_lora"], sd1, inputs)
    assert torch.equal(zero[0], base_u) and torch.equal(zero[1], base_t)

    sd, _ = load_lora_file(reference_lora_dir / "test_lora_bogus.safetensors")
    net, report = LoRANetwork.from_weights(sd, sd1.unet, sd1.roots, "sd1")
    assert report.unmatched == ["lora_unet_bogus_block_0_to_q"]
    assert report.unknown_keys == [] and report.shape_errors == [] and len(report.loaded) == 204
    assert "lora_unet_bogus_block_0_to_q" in report.summary()


@pytest.fixture(scope="module")
def reference_net(reference_lora_dir, sd1):
    """(tensors, network) of the shared test_lora.safetensors loaded into the tiny SD1 model."""
    sd, _ = load_lora_file(reference_lora_dir / "test_lora.safetensors")
    net, report = LoRANetwork.from_weights(sd, sd1.unet, sd1.roots, "sd1")
    assert report.ok, report.summary()
    return sd, net


@pytest.mark.parametrize("name, path", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "input_blocks.1.1.proj_in"),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
     "input_blocks.5.1.transformer_blocks.0.attn2.to_k"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "middle_block.1.transformer_blocks.0.ff.net.0.proj"),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "output_blocks.11.1.proj_out"),
    ("lora_te_text_model_encoder_layers_1_mlp_fc2", "te:text_model.encoder.layers.1.mlp.fc2"),
])
def test_reference_file_module_lands_on_the_right_layer(name, path, reference_net, sd1):
    """Independent check of the name mapping: the file's tensors for ``name`` act on the LDM layer ``path``
    (the delta there is exactly x -> (up @ down) x * alpha / rank), not on any other layer."""
    sd, net = reference_net
    layer = sd1.te.get_submodule(path[3:]) if path.startswith("te:") else sd1.unet.get_submodule(path)
    down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
    scale = sd[f"{name}.alpha"].item() / down.shape[0]
    g = torch.Generator().manual_seed(9)
    if isinstance(layer, nn.Conv2d):
        x = torch.randn(2, layer.in_channels, 4, 4, generator=g)
        expected_delta = F.conv2d(x, (up.flatten(1) @ down.flatten(1))[:, :, None, None]) * scale
    else:
        x = torch.randn(2, 3, layer.in_features, generator=g)
        expected_delta = x @ (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).T * scale
    with torch.no_grad():
        base = layer(x)
        with net.applied():
            got = layer(x)
    torch.testing.assert_close(got - base, expected_delta, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- weight switcher


def _merged_state(net: LoRANetwork, module: nn.Module, **mult) -> dict[str, torch.Tensor]:
    """``module``'s weights while ``net`` is merged at ``mult`` (set_multiplier kwargs); unmerged after."""
    net.set_multiplier(**mult)
    net.merge()
    try:
        return snapshot(module)
    finally:
        net.unmerge()


def _assert_same_state(module: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    bad = [k for k, v in want.items() if not torch.equal(got[k], v)]
    assert not bad, f"differs from merge(): {bad[:5]}"


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "hf_linear", "sd2_linear_proj",
                                  "fused_attention"])
def test_weight_switcher_equals_merge_bitwise_and_restores_exactly(kind, sd1, sd2, inputs):
    """For every layer kind (fused attention: q/k/v rows of in_proj_weight and out_proj), each set(w) leaves the base
    weights bit-identical to merge() at multiplier w, in any order and back again; inside, the network counts as
    merged (attach raises); on exit every base weight and the output are bit-exact again, and set() then raises."""
    found, run, module = _kind_targets(kind, sd1, sd2)
    before = snapshot(module)
    net = randomize_(LoRANetwork(found, {t.name: RANK for t in found}, {t.name: RANK / 2 for t in found}))
    with torch.no_grad():
        base = run(inputs)
        want = {w: _merged_state(net, module, multiplier=w) for w in (0.2, 0.7, 1.0)}
        assert any(not torch.equal(want[0.7][k], before[k]) for k in before)
        net.set_multiplier(0.0)
        with net.weight_switcher() as switch:
            assert net.merged
            _assert_same_state(module, before)  # nothing written before the first set()
            for w in (0.2, 1.0, 0.7, 0.2):
                switch.set(w)
                _assert_same_state(module, want[w])
                assert {m.multiplier for m in net.lora_modules()} == {w}
            with pytest.raises(RuntimeError, match="unmerge"):
                net.attach()
        assert not net.merged
        assert_state_equal(module, before)
        assert torch.equal(run(inputs), base)
        with pytest.raises(RuntimeError, match="closed"):
            switch.set(0.5)


def test_weight_switcher_te_unet_split_and_errors(sd1, inputs):
    """te/unet strengths apply per part, bit-identical to merge() after set_multiplier(te=, unet=); changing only te
    leaves the UNet's weights as they were; a merged network refuses a switcher; an error inside restores."""
    before_u, before_t = snapshot(sd1.unet), snapshot(sd1.te)
    net = randomize_(LoRANetwork.create(sd1.unet, sd1.roots, "sd1", network_dim=RANK, conv_dim=2))
    with torch.no_grad():
        want_u = {}
        want_t = {}
        for te, unet in ((0.3, 0.9), (0.8, 0.9)):
            net.set_multiplier(te=te, unet=unet)
            net.merge()
            want_u[te], want_t[te] = snapshot(sd1.unet), snapshot(sd1.te)
            net.unmerge()
        with net.weight_switcher() as switch:
            switch.set(te=0.3, unet=0.9)
            _assert_same_state(sd1.unet, want_u[0.3])
            _assert_same_state(sd1.te, want_t[0.3])
            unet_ptrs = {k: v.data_ptr() for k, v in sd1.unet.state_dict().items()}
            switch.set(te=0.8)
            _assert_same_state(sd1.unet, want_u[0.8])
            _assert_same_state(sd1.te, want_t[0.8])
            assert {k: v.data_ptr() for k, v in sd1.unet.state_dict().items()} == unet_ptrs
        net.merge()
        with pytest.raises(RuntimeError, match="merged"), net.weight_switcher():
            pass
        net.unmerge()
        with pytest.raises(ValueError, match="boom"), net.weight_switcher() as switch:
            switch.set(1.0)
            raise ValueError("boom")
    assert_state_equal(sd1.unet, before_u)
    assert_state_equal(sd1.te, before_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_switcher_half_weights_equal_merge(dtype, sd1, sd2):
    """On bf16/fp16 base weights (HF CLIP, OpenCLIP with fused attention) set(w) rounds once, as merge() does: the
    weights are bit-identical to merge(); exit restores them bit-exactly."""
    for arch, model in (("sd1", sd1), ("sd2", sd2)):
        te16 = copy.deepcopy(model.te).to(dtype)
        roots = _sd1_roots(te16) if arch == "sd1" else _sd2_roots(te16)
        net = randomize_(LoRANetwork.create(None, roots, arch, network_dim=RANK))
        before = snapshot(te16)
        with torch.no_grad():
            want = {w: _merged_state(net, te16, multiplier=w) for w in (0.4, 1.0)}
            with net.weight_switcher() as switch:
                for w in (1.0, 0.4):
                    switch.set(w)
                    _assert_same_state(te16, want[w])
        assert_state_equal(te16, before)


def test_from_weights_reuse_loads_into_a_fitting_network(trained, sd1, inputs):
    """from_weights(reuse=net) with a file of the same modules returns that network with the new file's tensors,
    alphas and multiplier 1.0 (state and outputs equal to a fresh from_weights); a file of other ranks, or an
    attached network, is not reused and the network passed is left untouched."""
    src = trained["sd1"]
    sd_a = src.net.kohya_state_dict()
    sd_b = randomize_(copy.deepcopy(src.net), seed=11).kohya_state_dict()
    sd_b = {k: (v * 0.5 if k.endswith(".alpha") else v) for k, v in sd_b.items()}
    net, _ = LoRANetwork.from_weights(sd_a, sd1.unet, sd1.roots, "sd1")
    net.set_multiplier(0.3)
    fresh, fresh_report = LoRANetwork.from_weights(sd_b, sd1.unet, sd1.roots, "sd1")
    again, report = LoRANetwork.from_weights(sd_b, sd1.unet, sd1.roots, "sd1", reuse=net)
    assert again is net
    assert report == fresh_report
    got, want = again.kohya_state_dict(), fresh.kohya_state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert [m.scale for m in again.lora_modules()] == [m.scale for m in fresh.lora_modules()]
    assert {m.multiplier for m in again.lora_modules()} == {1.0}
    assert _outputs(again, src.model, inputs)[0].equal(_outputs(fresh, src.model, inputs)[0])
    small = {k: v for k, v in sd_a.items() if k.startswith("lora_te_")}
    other, _ = LoRANetwork.from_weights(small, sd1.unet, sd1.roots, "sd1", reuse=net)
    assert other is not net and other.names() == [n for n in net.names() if n.startswith("lora_te_")]
    with net.applied():
        third, _ = LoRANetwork.from_weights(sd_a, sd1.unet, sd1.roots, "sd1", reuse=net)
    assert third is not net
    got = net.kohya_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # still sd_b's tensors
