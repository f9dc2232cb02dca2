"""The fused LoRA Linear path (lib_lora.fused): the same maths and gradients as the plain path, and used only where it
may replace the wrapped forward."""

import pytest
import torch
from torch import nn

from lib_lora import fused
from lib_lora.lora_module import LoRAModule
from lib_lora.model import configs
from lib_lora.model.attention import use_sdpa
from lib_lora.model.build import build_unet
from lib_lora.network import LoRANetwork


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    down = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fused.LoRALinearFunction.apply(*a, 0.37, None), (x, w, b, down, up))
    assert torch.autograd.gradcheck(lambda x, w, d, u: fused.LoRALinearFunction.apply(x, w, None, d, u, 1.5, None),
                                    (x, w, down, up))


def _module(lin: nn.Linear, use_fused: bool, **kw) -> LoRAModule:
    torch.manual_seed(1)
    m = LoRAModule("lora_unet_x", lin.in_features, lin.out_features, 8, 4, **kw)
    nn.init.normal_(m.lora_up.weight)
    m.org_forward = lin.forward
    target = fused.fusable_linear(lin, m.org_forward)
    assert target is lin
    m.fused_target = (target,) if use_fused else ()
    return m


def _run(lin, use_fused, x, autocast=False, **kw):
    m = _module(lin, use_fused, **kw)
    m.multiplier = 0.7
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
    (y.float() ** 2).sum().backward()
    return y.detach(), x.grad, m.lora_down.weight.grad, m.lora_up.weight.grad


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (2, 9, 24)])
def test_same_as_plain_path_fp32(bias, shape):
    lin = nn.Linear(24, 16, bias=bias).requires_grad_(False)
    x = torch.randn(*shape)
    plain, fast = _run(lin, False, x), _run(lin, True, x)
    assert fast[0].shape == plain[0].shape == (*shape[:-1], 16)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # same maths, other summation order


def test_autocast_bf16_as_accurate_as_plain():
    lin = nn.Linear(64, 48).requires_grad_(False)
    x = torch.randn(4, 10, 64)
    ref = _run(lin, False, x)
    plain, fast = _run(lin, False, x, autocast=True), _run(lin, True, x, autocast=True)
    assert fast[0].dtype == plain[0].dtype == torch.bfloat16
    assert fast[2].dtype == fast[3].dtype == torch.float32  # fp32 LoRA weights get fp32 gradients
    for r, a, b in zip(ref, plain, fast):
        err_plain = ((a.float() - r).norm() / r.norm()).item()
        err_fast = ((b.float() - r).norm() / r.norm()).item()
        assert err_fast < 2e-2 and err_fast <= 1.5 * err_plain + 1e-3


def test_input_without_grad_and_no_grad_mode():
    lin = nn.Linear(8, 8).requires_grad_(False)
    m = _module(lin, True)
    y = m(torch.randn(3, 8))
    y.sum().backward()
    assert m.lora_down.weight.grad is not None and m.lora_up.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(m(torch.ones(2, 8)), lin(torch.ones(2, 8)) + m.lora_output(torch.ones(2, 8)))


def test_plain_path_kept_where_the_fused_one_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(fused.LoRALinearFunction, "apply", lambda *a: calls.append(1) or None)
    lin = nn.Linear(8, 8).requires_grad_(False)
    x = torch.randn(2, 8)
    _module(lin, True, dropout=0.1).train()(x)  # dropouts act on the rank-r intermediate: plain path
    assert not calls
    half = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    out = _module(half, True)(x.to(torch.bfloat16))  # bf16 layer, fp32 LoRA, no autocast: plain path (it casts)
    assert not calls and out.dtype == torch.bfloat16
    m = _module(lin, True)
    lin.weight.requires_grad_(True)  # a trained base weight: plain path
    m(x)
    assert not calls
    lin.weight.requires_grad_(False)
    m(x)
    assert len(calls) == 1


def test_fusable_linear_rules(monkeypatch):
    lin = nn.Linear(4, 4)
    assert fused.fusable_linear(lin, lin.forward) is lin

    class MyLinear(nn.Linear):
        pass

    sub = MyLinear(4, 4)
    assert fused.fusable_linear(sub, sub.forward) is None
    other = nn.Linear(4, 4)
    assert fused.fusable_linear(lin, other.forward) is None  # someone else's forward
    assert fused.fusable_linear(lin, lambda x: lin(x)) is None  # an instance-level wrapper
    h = lin.register_forward_hook(lambda *a: None)
    assert fused.fusable_linear(lin, lin.forward) is None
    h.remove()
    monkeypatch.setattr(fused, "ENABLED", False)
    assert fused.fusable_linear(lin, lin.forward) is None


def test_network_attach_sets_and_detach_clears_fused_targets():
    unet = build_unet(configs.UNET_TINY_SD1, seed=0)
    use_sdpa(unet)
    net = LoRANetwork.create(unet, [], "sd1", 4, 4, train_text_encoder=False)
    mods = list(net.lora_modules())
    with net.applied():
        linear = [m for m in mods if not m.is_conv]
        assert linear and all(m.fused_target for m in linear)
        assert all(not m.fused_target for m in mods if m.is_conv)  # SD1's proj_in/proj_out 1x1 convs
    assert all(not m.fused_target for m in mods)


def test_autocast_dtype_follows_the_open_region():
    """The one autocast query fused and recompute share: None outside autocast, the region's dtype inside, per
    device type."""
    assert fused.autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.autocast_dtype("cpu") == torch.bfloat16
        assert fused.autocast_dtype("cuda") is None
    assert fused.autocast_dtype("cpu") is None
