"""Recomputed LoRA inputs (lib_lora.recompute): same gradients as keeping them, and the inputs really are packed as
recipes (fewer tensors held between forward and backward)."""

import collections
import gc
import weakref

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


def _count_packs(monkeypatch) -> collections.Counter:
    """Counts packed saved tensors by the name of the recipe's function (a module's class name for norms)."""
    packed = collections.Counter()
    orig = recompute._Packed.__init__

    def counting(self, recipe, *args, **kwargs):
        fn = recipe.fn
        packed[getattr(fn, "__name__", type(fn).__name__)] += 1
        orig(self, recipe, *args, **kwargs)

    monkeypatch.setattr(recompute._Packed, "__init__", counting)
    return packed


def test_same_gradients_and_inputs_packed(setup, monkeypatch):
    unet, net, inputs = setup
    kept = _grads(unet, net, inputs, tag=False)
    packed = _count_packs(monkeypatch)
    recomputed = _grads(unet, net, inputs, tag=True)
    assert len(kept) == len(recomputed) == 2 * 192
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)
    # LoRA inputs, per transformer block (16): proj_in (GroupNorm), attn1 q/k/v (norm1), attn2 q (norm2), ff.net.0
    # (norm3) = 6 norm outputs; ff.net.2 (GEGLU output); attn1 and attn2 to_out.0 (SDPA output, heads merged). The
    # first block's GroupNorm input does not require grad yet, so its output is not tagged.
    # The frozen UNet's own saved tensors: gelu(gate) per GEGLU (16); per GroupNorm -> SiLU -> conv chain the SiLU's
    # input (GroupNorm32 output) and the conv's input (SiLU output, a chained recipe): 22 ResBlocks x 2 chains + the
    # UNet's out, less the first ResBlock's two chains (before any LoRA: no grad there).
    chains = 22 * 2 + 1 - 2
    assert packed == {"LayerNorm": 16 * 5, "GroupNorm": 16 - 1, "_geglu": 16, "_merge_heads": 16 * 2,
                      "_gate_gelu": 16, "GroupNorm32": chains, "_chain": chains}


def test_frozen_unet_input_gradient_identical(setup, monkeypatch):
    """Without any LoRA (the benchmark floor's setting): the latent gradient is bit-identical with the frozen UNet's
    own saved tensors recomputed, and the first ResBlock's chains are packed too (its input requires grad)."""
    unet, _, (x, t, ctx) = setup

    def grad(tag: bool) -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        with recompute.tagged(unet, enabled=tag):
            unet(xi, t, context=ctx).square().mean().backward()
        return xi.grad

    kept = grad(False)
    packed = _count_packs(monkeypatch)
    recomputed = grad(True)
    assert torch.equal(kept, recomputed)
    chains = 22 * 2 + 1
    assert packed == {"_gate_gelu": 16, "GroupNorm32": chains, "_chain": chains}


def test_packed_activations_are_freed(setup):
    """What is packed as a recipe is really freed between forward and backward (the pack hook lives as long as the
    graph, so it must not hold the tensor it packs): the outputs of the norms feeding LoRA layers and of the
    GroupNorm -> SiLU chains are dead while the graph is alive, and alive without :func:`recompute.tagged`."""
    unet, net, (x, t, ctx) = setup
    refs: list = []
    watched = [m for m in unet.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.SiLU))
               or type(m).__name__ == "GroupNorm32"]

    def watch(module, inputs, out):
        refs.append(weakref.ref(out))

    handles = [m.register_forward_hook(watch) for m in watched]
    try:
        alive = {}
        for tag in (False, True):
            refs.clear()
            with net.applied(), recompute.tagged(unet, enabled=tag):
                out = unet(x, t, context=ctx)
                gc.collect()
                alive[tag] = sum(r() is not None for r in refs)
                del out
    finally:
        for h in handles:
            h.remove()
    # Kept: every LayerNorm output (48, each feeds a LoRA'd layer), the GroupNorm32 and SiLU outputs of the 45
    # chains, less the first ResBlock's two chains (before any LoRA: no grad, nothing saved there).
    assert alive[False] == 48 + 2 * 45 - 4
    assert alive[True] == 0


def test_recipe_recomputes_under_its_autocast_state():
    """A recipe made inside autocast recomputes inside it (bit-identical, same dtype), as torch.utils.checkpoint
    does; a dtype that still differs is a clear error, not a silent wrong gradient."""
    lin = torch.nn.Linear(8, 8)
    lin.requires_grad_(False)
    a = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(a)  # bf16 under autocast, fp32 outside
        recompute._tag(y, recompute._recipe(y, lin, a))
    assert y.dtype == torch.bfloat16
    w = torch.randn(8, 3, dtype=torch.bfloat16, requires_grad=True)
    with recompute.saving_recipe(y):
        z = y @ w
    z.float().sum().backward()
    assert torch.equal(w.grad, (y.detach().t() @ torch.ones(4, 3, dtype=torch.bfloat16)))

    bad = recompute._Packed(recompute._Recipe(lin, (a,)), y.shape, y.stride(), 0, torch.bfloat16)
    with pytest.raises(RuntimeError, match="recomputed activation came back as torch.float32"):
        recompute._unpack(bad)


def test_scopes_closed_when_forward_raises(setup, monkeypatch):
    """The pack scopes opened around a GEGLU / SiLU / conv call are closed even when the forward raises."""
    unet, _, _ = setup
    blk = unet.input_blocks[1][1].transformer_blocks[0]
    geglu = blk.ff.net[0]
    conv = unet.out[2]
    with recompute.tagged(unet):
        h = torch.randn(1, 3, geglu.proj.in_features, requires_grad=True)
        with pytest.raises(RuntimeError):
            geglu(h[..., :-1])  # wrong width: proj raises (no scope opened yet)
        with monkeypatch.context() as m:
            def failing_gelu(*a, **k):
                raise RuntimeError("gelu failed")

            m.setattr(torch.nn.functional, "gelu", failing_gelu)
            with pytest.raises(RuntimeError, match="gelu failed"):
                geglu(h)  # proj ran, the gelu scope is open, then the forward raises
        with pytest.raises(RuntimeError):
            conv(torch.randn(1, 1, 4, 4, requires_grad=True))  # wrong channels: the conv raises
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_hooks_removed_and_inference_untouched(setup):
    unet, net, (x, t, ctx) = setup
    with recompute.tagged(unet):
        with torch.no_grad():
            out = unet.input_blocks[1][1].norm(torch.randn(1, 32, 4, 4))
        assert not hasattr(out, recompute.RECIPE_ATTR)
    assert all(not m._forward_hooks for m in unet.modules())
