"""Recomputed LoRA inputs (lib_lora.recompute): same gradients as keeping them, and the inputs really are packed as
recipes (fewer tensors held between forward and backward)."""

import pytest
import torch

from lib_lora import recompute
from lib_lora.model import headless
from lib_lora.model.attention import use_sdpa
from lib_lora.network import LoRANetwork


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = headless.load_model("tiny-sd1")
    unet = model.unet
    use_sdpa(unet)
    net = LoRANetwork.create(unet, [], "sd1", 4, 4, train_text_encoder=False)
    for m in net.lora_modules():
        torch.nn.init.normal_(m.lora_up.weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    return unet, net, (x, t, ctx)


def _grads(unet, net, inputs, tag: bool) -> list[torch.Tensor]:
    x, t, ctx = inputs
    net.zero_grad(set_to_none=True)
    with net.applied(), recompute.tagged(unet, enabled=tag):
        unet(x, t, context=ctx).square().mean().backward()
    return [p.grad.clone() for p in net.parameters()]


def test_same_gradients_and_inputs_packed(setup, monkeypatch):
    unet, net, inputs = setup
    kept = _grads(unet, net, inputs, tag=False)
    packed = []
    orig = recompute._Packed.__init__

    def counting(self, *args, **kwargs):
        packed.append(1)
        orig(self, *args, **kwargs)

    monkeypatch.setattr(recompute._Packed, "__init__", counting)
    recomputed = _grads(unet, net, inputs, tag=True)
    assert len(kept) == len(recomputed) == 2 * 192
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)
    # Per transformer block: proj_in (GroupNorm), attn1 q/k/v (norm1), attn2 q (norm2), ff.net.0 (norm3), ff.net.2
    # (GEGLU), attn1 and attn2 to_out.0 (SDPA output, heads merged) = 9; the first block's GroupNorm input does not
    # require grad yet, so its output is not tagged.
    assert len(packed) == 16 * 9 - 1


def test_hooks_removed_and_inference_untouched(setup):
    unet, net, (x, t, ctx) = setup
    with recompute.tagged(unet):
        with torch.no_grad():
            out = unet.input_blocks[1][1].norm(torch.randn(1, 32, 4, 4))
        assert not hasattr(out, recompute.RECIPE_ATTR)
    assert all(not m._forward_hooks for m in unet.modules())
