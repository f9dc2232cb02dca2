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

The same mechanism also trims what the frozen UNet itself keeps (the largest items of its saved set, measured on the
SD1.5 UNet at 32x32 latents, batch 2: 749 MiB in all), whether or not a LoRA sits on those layers:

* ``GEGLU``: ``gelu(gate)`` (kept by the product's backward, 88 MiB) is recomputed from the projection output
  ``h`` = ``cat(x, gate)``, which the GELU's and the product's backward keep anyway.
* ``GroupNorm -> SiLU -> (Dropout) -> Conv2d`` chains (ResBlock ``in_layers``/``out_layers``, the UNet's ``out``): the
  SiLU keeps the norm's output and the conv its input (the SiLU's output), two full activations (about 120 MiB)
  recomputed in backward from the norm's input, which the GroupNorm keeps anyway.

Recomputing costs elementwise work and norms in backward, well under 1% of a step (measured in BENCHMARKS.md); the
ops are the forward's own ops on the same inputs, so the results are bit-identical. A recipe also records the
autocast state it was made under and recomputes under it (as ``torch.utils.checkpoint`` does), so a norm that
autocast ran in fp32 is recomputed in fp32.

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
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

RECIPE_ATTR = "_lib_lora_recipe"

#: ``register_forward_hook(..., always_call=True)`` exists (torch >= 2.1).
_ALWAYS_CALL = "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters

#: Module classes whose output is tagged: output = module(input), recomputed by calling the module again.
_NORM_CLASSES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm)


@dataclass
class _Recipe:
    fn: Callable[..., torch.Tensor]
    args: tuple
    autocast: tuple[str, torch.dtype] | None = None

    def __call__(self) -> torch.Tensor:
        if self.autocast is None:
            return self.fn(*self.args)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            return self.fn(*self.args)


@dataclass
class _Packed:
    recipe: _Recipe
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


def _recipe(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args) -> _Recipe:
    dtype = fused.autocast_dtype(out.device.type)
    return _Recipe(fn, args, (out.device.type, dtype) if dtype is not None else None)


def _packed(recipe: _Recipe, t: torch.Tensor) -> _Packed:
    """``t`` saved as ``recipe``: its view (shape, stride, offset) of the recipe's result, and its dtype."""
    return _Packed(recipe, t.shape, t.stride(), t.storage_offset(), t.dtype)


def _tag(out: torch.Tensor, recipe: _Recipe) -> None:
    # Only fresh, contiguous results: the recomputed tensor then has the same layout and the saved view maps back.
    if isinstance(out, torch.Tensor) and out.requires_grad and out.is_contiguous() and out.storage_offset() == 0:
        setattr(out, RECIPE_ATTR, recipe)


def _norm_hook(module: nn.Module, inputs: tuple, out) -> None:
    if not torch.is_grad_enabled() or not inputs or not isinstance(inputs[0], torch.Tensor):
        return
    x = inputs[0]
    if isinstance(out, torch.Tensor):
        _tag(out, _recipe(out, module, x))


class _PackScope:
    """Forward pre/post hooks that open :func:`saving_recipe` for a module's input around its call, so what the
    module's ops save of a tagged input is packed as the input's recipe. The post hook is registered with
    ``always_call=True``: the scope is closed even when the forward raises."""

    def __init__(self, tag_output: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._open: list = []
        #: For an elementwise module (SiLU): op such that output = op(input); the output is tagged with the chained
        #: recipe op(input's recipe), so its consumers recompute both.
        self.tag_output = tag_output

    def pre(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        ctx = saving_recipe(x) if x is not None else contextlib.nullcontext()
        ctx.__enter__()
        self._open.append((ctx, x))

    def post(self, module: nn.Module, inputs: tuple, out) -> None:
        ctx, x = self._open.pop()
        ctx.__exit__(None, None, None)
        inner = getattr(x, RECIPE_ATTR, None) if x is not None else None
        if self.tag_output is not None and inner is not None and isinstance(out, torch.Tensor) and \
                torch.is_grad_enabled() and out.dtype == x.dtype:
            _tag(out, _recipe(out, _chain, self.tag_output, inner))


def _chain(op: Callable[[torch.Tensor], torch.Tensor], inner: _Recipe) -> torch.Tensor:
    return op(inner())


def _gate_gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h.chunk(2, dim=-1)[1])


def _geglu(h: torch.Tensor) -> torch.Tensor:
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)


class _GegluScope:
    """Hooks on an ldm/sgm ``GEGLU`` (``x, gate = proj(x).chunk(2, -1); return x * F.gelu(gate)``).

    After ``proj`` returns ``h``, a saved-tensor scope packs the one tensor the rest of the forward saves outside
    ``h``'s storage with ``gate``'s shape and ``h``'s dtype, ``gelu(gate)``, as a recipe on ``h``; the GELU and the
    product keep views of ``h`` anyway. The GEGLU output (input of ``ff.net.2``) is tagged with a recipe on ``h``
    too. Any other forward (the WebUI's fp32-upcast wrapper casts the result) keeps what it saves unless the tensors
    match exactly those rules."""

    def __init__(self) -> None:
        self._open: list = []

    def pre(self, module: nn.Module, inputs: tuple) -> None:
        self._open.append(None)

    def proj_post(self, module: nn.Module, inputs: tuple, h) -> None:
        if not self._open or self._open[-1] is not None or not torch.is_grad_enabled():
            return
        if not (isinstance(h, torch.Tensor) and h.requires_grad and h.dim() >= 1 and h.shape[-1] % 2 == 0):
            return
        gate_shape = h.shape[:-1] + (h.shape[-1] // 2,)
        ptr, dtype = h.untyped_storage().data_ptr(), h.dtype
        recipe = _recipe(h, _gate_gelu, h)  # holds h, which the GELU and the product keep anyway

        def pack(t: torch.Tensor):
            if t.dtype == dtype and t.shape == gate_shape and t.untyped_storage().data_ptr() != ptr and \
                    t.is_contiguous() and t.storage_offset() == 0:
                return _packed(recipe, t)
            return t

        ctx = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
        ctx.__enter__()
        self._open[-1] = (ctx, h)

    def post(self, module: nn.Module, inputs: tuple, out) -> None:
        opened = self._open.pop()
        if opened is None:
            return
        ctx, h = opened
        ctx.__exit__(None, None, None)
        node = getattr(out, "grad_fn", None)
        # The output is x * gelu(gate) itself only when the forward ends in that product, in h's dtype.
        if node is not None and type(node).__name__ == "MulBackward0" and out.dtype == h.dtype:
            _tag(out, _recipe(out, _geglu, h))


#: ldm/sgm blocks whose own norms feed LoRA'd layers (SpatialTransformer.norm -> proj_in; BasicTransformerBlock
#: norm1/2/3 -> attn1 q/k/v, attn2 q, ff.net.0).
_BLOCKS_WITH_LORA_NORMS = ("SpatialTransformer", "BasicTransformerBlock")


def _norm_silu_conv_chains(unet: nn.Module):
    """(norm, silu, conv) triples of ``nn.Sequential`` children ``GroupNorm, SiLU, [Dropout...], Conv2d`` (ldm/sgm
    ResBlock ``in_layers``/``out_layers``, the UNet's ``out``); conv None when the SiLU is not followed by one."""
    for seq in unet.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.children())
        for i in range(len(kids) - 1):
            if isinstance(kids[i], nn.GroupNorm) and isinstance(kids[i + 1], nn.SiLU):
                j = i + 2
                while j < len(kids) and isinstance(kids[j], nn.Dropout):
                    j += 1
                conv = kids[j] if j < len(kids) and isinstance(kids[j], nn.Conv2d) else None
                yield kids[i], kids[i + 1], conv


def tag_recomputable_outputs(unet: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Registers, in ``unet``, the forward hooks that tag recomputable outputs with their recipe and pack saved
    tensors as recipes: the transformer blocks' own LayerNorm / GroupNorm children, ldm/sgm ``GEGLU`` and the
    ``GroupNorm -> SiLU -> Conv2d`` chains (see the module docstring). Hooks act only while grad mode is on.
    Returns the handles (``handle.remove()`` undoes it)."""
    handles = []

    def scoped(module: nn.Module, scope) -> bool:
        # A scope left open by a forward that raised would pack unrelated tensors later: without ``always_call``
        # (torch < 2.1) these savings are not installed at all.
        if not _ALWAYS_CALL:
            return False
        handles.append(module.register_forward_pre_hook(scope.pre))
        handles.append(module.register_forward_hook(scope.post, always_call=True))
        return True

    for m in unet.modules():
        if type(m).__name__ in _BLOCKS_WITH_LORA_NORMS:
            handles += [c.register_forward_hook(_norm_hook) for c in m.children() if isinstance(c, _NORM_CLASSES)]
        elif type(m).__name__ == "GEGLU" and isinstance(getattr(m, "proj", None), nn.Module):
            scope = _GegluScope()
            if scoped(m, scope):
                handles.append(m.proj.register_forward_hook(scope.proj_post))
    for norm, silu, conv in _norm_silu_conv_chains(unet):
        if scoped(silu, _PackScope(tag_output=F.silu)):
            handles.append(norm.register_forward_hook(_norm_hook))
            if conv is not None:
                scoped(conv, _PackScope())
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
            _tag(merged, _recipe(merged, _merge_heads, saved, b, n, inner, dtype))
    return merged


def _unpack(p):
    if isinstance(p, _Packed):
        with torch.no_grad():
            full = p.recipe()
        if full.dtype != p.dtype:
            raise RuntimeError(f"lib_lora.recompute: a recomputed activation came back as {full.dtype}, saved as "
                               f"{p.dtype} ({p.recipe.fn!r}); please report this (gradient checkpointing avoids it)")
        return full.as_strided(p.shape, p.stride, p.offset)
    return p


def saving_recipe(x: torch.Tensor):
    """The saved-tensor hooks for ops that take the tagged input ``x``: a saved tensor sharing ``x``'s storage is
    packed as ``x``'s recipe (shape, stride, offset kept) instead of being held. Returns a null context when ``x``
    carries no recipe or grad mode is off."""
    recipe = getattr(x, RECIPE_ATTR, None)
    if recipe is None or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_storage_packer(x, recipe), _unpack)


def _storage_packer(x: torch.Tensor, recipe: _Recipe) -> Callable[[torch.Tensor], object]:
    # The pack hook must not hold ``x``: every SavedVariable made under the hooks keeps a reference to the pack
    # function until the graph is freed (torch's PySavedVariableHooks), so a closure over ``x`` would keep alive the
    # very tensor it packs away. Only its storage address, size and dtype are captured.
    ptr, nbytes, dtype = x.untyped_storage().data_ptr(), x.untyped_storage().nbytes(), x.dtype

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() == ptr and st.nbytes() == nbytes and t.dtype == dtype:
            return _packed(recipe, t)
        return t

    return pack
