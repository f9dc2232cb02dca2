"""Recompute cheap LoRA inputs in backward instead of keeping them (a memory saving, issue 7).

A frozen Linear or conv needs only its weight to pass the gradient back to its input; the LoRA beside it needs its
input ``x`` as well, for the ``lora_down`` weight gradient, so every wrapped layer keeps one more activation alive
until backward. In the SD UNet transformer blocks most of these inputs are the output of a cheap operation whose
own inputs autograd keeps anyway:

* ``norm1``/``norm2``/``norm3`` (LayerNorm) feed attn1 q/k/v, attn2 q, ``ff.net.0.proj``; the LayerNorm keeps its
  input for its own backward.
* the SpatialTransformer's GroupNorm feeds ``proj_in`` (SD1, 1x1 conv); GroupNorm keeps its input too.
* ``GEGLU`` = ``a * gelu(gate)`` feeds ``ff.net.2`` (4x the width); the product's backward keeps ``a`` and
  ``gelu(gate)``.
* the attention output feeding ``to_out.0`` is SDPA's output with its heads merged (a transposed copy); SDPA's
  backward keeps its output (flash / memory-efficient kernels), so the merged copy is recomputed from it
  (:func:`merge_heads`, used by :mod:`lib_lora.model.attention`).

:func:`tag_recomputable_outputs` marks such outputs (forward hooks) with a recipe that names tensors autograd keeps
anyway; :func:`saving_recipe` is the ``torch.autograd.graph.saved_tensors_hooks`` pair a LoRA module wraps around
its ``lora_down`` call: a saved tensor that is the tagged input is packed as its recipe and recomputed (under
``no_grad``, bit-identical: same op, same inputs) when backward unpacks it. Nothing else changes; the gradients are
exactly those of the plain path (tests check it).

Not used under gradient checkpointing (that already drops and recomputes every activation of a block, and its own
saved-tensor hooks must see all tensors saved in the region).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

RECIPE_ATTR = "_lib_lora_recipe"

#: Module classes whose output is tagged: output = module(input), recomputed by calling the module again.
_NORM_CLASSES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm)


@dataclass
class _Recipe:
    fn: Callable[..., torch.Tensor]
    args: tuple


@dataclass
class _Packed:
    recipe: _Recipe
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


def _tag(out: torch.Tensor, recipe: _Recipe) -> None:
    # Only fresh, contiguous results: the recomputed tensor then has the same layout and the saved view maps back.
    if isinstance(out, torch.Tensor) and out.requires_grad and out.is_contiguous() and out.storage_offset() == 0:
        setattr(out, RECIPE_ATTR, recipe)


def _norm_hook(module: nn.Module, inputs: tuple, out) -> None:
    if not torch.is_grad_enabled() or not inputs or not isinstance(inputs[0], torch.Tensor):
        return
    x = inputs[0]
    _tag(out, _Recipe(module, (x,)))


def _geglu_hook(module: nn.Module, inputs: tuple, out) -> None:
    if not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
        return
    node = out.grad_fn
    # ldm GEGLU.forward ends in ``x * F.gelu(gate)``: the product's node keeps both factors (autograd's documented
    # ``_saved_self`` / ``_saved_other``). Any other ending (e.g. the WebUI's upcast wrapper adds a cast) is left alone.
    if node is None or type(node).__name__ != "MulBackward0":
        return
    a, b = node._saved_self, node._saved_other
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        _tag(out, _Recipe(torch.mul, (a, b)))


#: ldm/sgm blocks whose own norms feed LoRA'd layers (SpatialTransformer.norm -> proj_in; BasicTransformerBlock
#: norm1/2/3 -> attn1 q/k/v, attn2 q, ff.net.0). The ResBlocks' GroupNorms feed SiLU and convs, not LoRA inputs,
#: so they get no hook (no per-call cost there).
_BLOCKS_WITH_LORA_NORMS = ("SpatialTransformer", "BasicTransformerBlock")


def tag_recomputable_outputs(unet: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Registers the forward hooks that tag, in ``unet``, the outputs of the transformer blocks' own LayerNorm /
    GroupNorm children and of ldm ``GEGLU`` with their recipe. Hooks act only while grad mode is on. Returns the
    handles (``handle.remove()`` undoes it)."""
    handles = []
    for m in unet.modules():
        if type(m).__name__ in _BLOCKS_WITH_LORA_NORMS:
            handles += [c.register_forward_hook(_norm_hook) for c in m.children() if isinstance(c, _NORM_CLASSES)]
        elif type(m).__name__ == "GEGLU":
            handles.append(m.register_forward_hook(_geglu_hook))
    return handles


#: Open :func:`tagged` contexts; op outputs (not module outputs) are tagged only while one is open.
_active = 0


@contextlib.contextmanager
def tagged(unet: nn.Module, enabled: bool = True):
    """Context manager around a training step or run: :func:`tag_recomputable_outputs` on enter, removed on exit;
    :func:`merge_heads` tags its outputs meanwhile."""
    global _active
    handles = tag_recomputable_outputs(unet) if enabled else []
    _active += bool(enabled)
    try:
        yield
    finally:
        _active -= bool(enabled)
        for h in handles:
            h.remove()


def _merge_heads(out: torch.Tensor, b: int, n: int, inner: int, dtype: torch.dtype) -> torch.Tensor:
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


def merge_heads(out: torch.Tensor, b: int, n: int, inner: int, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's (B, heads, N, d) output -> (B, N, heads * d) in ``dtype``, the input of an attention's ``to_out``.

    Inside :func:`tagged`, when SDPA's backward node keeps that very output (``_saved_output``: the flash and
    memory-efficient kernels do; the math fallback does not), the result is tagged with a recipe that redoes the
    transpose + copy from it, so a LoRA on ``to_out.0`` keeps no copy of its own."""
    merged = _merge_heads(out, b, n, inner, dtype)
    if _active and torch.is_grad_enabled() and merged.requires_grad and out.grad_fn is not None:
        saved = getattr(out.grad_fn, "_saved_output", None)
        if isinstance(saved, torch.Tensor) and saved.data_ptr() == out.data_ptr() and saved.shape == out.shape:
            _tag(merged, _Recipe(_merge_heads, (saved, b, n, inner, dtype)))
    return merged


def _unpack(p):
    if isinstance(p, _Packed):
        with torch.no_grad():
            full = p.recipe.fn(*p.recipe.args)
        return full.as_strided(p.shape, p.stride, p.offset)
    return p


def saving_recipe(x: torch.Tensor):
    """The saved-tensor hooks for ops that take the tagged input ``x``: a saved tensor sharing ``x``'s storage is
    packed as ``x``'s recipe (shape, stride, offset kept) instead of being held. Returns a null context when ``x``
    carries no recipe or grad mode is off."""
    recipe = getattr(x, RECIPE_ATTR, None)
    if recipe is None or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    ptr = x.untyped_storage().data_ptr()
    nbytes = x.untyped_storage().nbytes()

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() == ptr and st.nbytes() == nbytes and t.dtype == x.dtype:
            return _Packed(recipe, t.shape, t.stride(), t.storage_offset())
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
