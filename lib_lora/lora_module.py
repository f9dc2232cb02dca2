"""The LoRA module (Linear, 1x1 conv, k x k conv) and the adapter for OpenCLIP's fused attention.

Injection is Kohya-style (sd-scripts ``LoRAModule.apply_to``): the original layer stays where it is in the model and
keeps its weights; only its ``forward`` is replaced by an instance attribute, and removal puts back exactly what was
there. The LoRA parameters are fp32 whatever the base dtype: inputs are cast to fp32 for the low-rank path and the
result is cast back to the layer's output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, fused, recompute


class LoRAModule(nn.Module):
    """One Kohya LoRA module: ``out = org(x) + up(dropouts(down(x))) * multiplier * alpha / rank``.

    State-dict keys (relative to the module): ``lora_down.weight`` (r, in) or (r, in, k, k), ``lora_up.weight``
    (out, r) or (out, r, 1, 1), ``alpha`` (0-dim float). Init: down kaiming-uniform (a = sqrt(5), Microsoft LoRA),
    up zeros, so a new module changes nothing.

    Args:
        lora_name: the Kohya key, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``.
        in_dim, out_dim: features (Linear) or channels (conv) of the target layer.
        rank: network_dim (Linear, 1x1 conv) or conv_dim (k x k conv).
        alpha: network_alpha / conv_alpha; None or 0 means alpha = rank (scale 1).
        kernel_size, stride, padding: None for a Linear target; for a conv target the target's values (the down
            conv copies them, the up conv is 1x1).
        dropout: network_dropout, ``F.dropout`` on down(x), training only.
        rank_dropout: per-sample, per-rank Bernoulli mask on down(x), scale multiplied by 1 / (1 - p), training only.
        module_dropout: probability of skipping the whole module for one forward, training only.
        device: where to create the parameters (the target's device).

    Raises:
        ValueError: rank < 1 or a dropout outside [0, 1).
    """

    def __init__(self, lora_name: str, in_dim: int, out_dim: int, rank: int, alpha: float | None,
                 kernel_size: tuple[int, int] | None = None, stride: tuple[int, int] | int = 1,
                 padding: tuple[int, int] | int | str = 0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {rank}")
        for label, p in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"{lora_name}: {label} must be in [0, 1), got {p}")
        self.lora_name = lora_name
        self.lora_dim = rank
        self.is_conv = kernel_size is not None
        if self.is_conv:
            self.lora_down = nn.Conv2d(in_dim, rank, kernel_size, stride, padding, bias=False, device=device)
            self.lora_up = nn.Conv2d(rank, out_dim, 1, 1, bias=False, device=device)
        else:
            self.lora_down = nn.Linear(in_dim, rank, bias=False, device=device)
            self.lora_up = nn.Linear(rank, out_dim, bias=False, device=device)
        self.float()
        if self.lora_down.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_up.weight)
        alpha = float(rank if alpha is None or float(alpha) == 0.0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self.scale = alpha / rank
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Set by the network on attach: the wrapped layer's forward as it was (kept out of the module tree), and
        # (layer,) when that layer may take the fused path (a tuple, so nn.Module does not register the layer).
        self.org_forward: Callable | None = None
        self.fused_target: tuple[nn.Linear] | tuple = ()

    def set_alpha(self, alpha: float | None) -> None:
        """Sets alpha (None/0 = rank) and recomputes the scale; used when loading a file."""
        alpha = float(self.lora_dim if alpha is None or float(alpha) == 0.0 else alpha)
        self.alpha.fill_(alpha)
        self.scale = alpha / self.lora_dim

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """``up(dropouts(down(x))) * multiplier * scale`` in fp32, for x shaped as the target layer's input."""
        w = self.lora_down.weight
        if x.dtype != w.dtype and fused.autocast_dtype(x.device.type) is None:
            x = x.to(w.dtype)
        # A tagged input (a norm or GEGLU output, see lib_lora.recompute) is recomputed in backward, not kept.
        with recompute.saving_recipe(x):
            lx = self.lora_down(x)
        scale = self.scale
        if self.training:
            if self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                mask = (torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout).to(lx.dtype)
                if self.is_conv:
                    mask = mask[:, :, None, None]
                elif lx.dim() == 3:
                    mask = mask[:, None, :]
                lx = lx * mask
                scale = scale / (1.0 - self.rank_dropout)
        # Scale the rank-r intermediate, not the full-width output: one small temporary instead of a large one.
        return self.lora_up(lx * (self.multiplier * scale))

    def skipped(self) -> bool:
        """True when this forward must return the base output alone (multiplier 0 or module dropout)."""
        if self.multiplier == 0.0:
            return True
        return bool(self.training and self.module_dropout and torch.rand(()) < self.module_dropout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The replacement forward of the target layer. x: the layer's input, any leading dims.

        A plain frozen ``nn.Linear`` target without dropouts takes :mod:`lib_lora.fused` (same maths, fewer
        full-width temporaries); everything else runs ``org(x) + lora_output(x)``."""
        if self.skipped():
            return self.org_forward(x, *args, **kwargs)
        if self.fused_target and not args and not kwargs and not (
                self.training and (self.dropout or self.rank_dropout)):
            with recompute.saving_recipe(x):
                out = fused.lora_linear(x, self.fused_target[0], self.lora_down.weight, self.lora_up.weight,
                                        self.multiplier * self.scale)
            if out is not None:
                return out
        org = self.org_forward(x, *args, **kwargs)
        return org + self.lora_output(x).to(org.dtype)

    def delta(self, target_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """``multiplier * scale * up @ down`` in fp32, shaped as the target weight (:func:`functional.delta_weight`)."""
        return functional.delta_weight(self.lora_down.weight, self.lora_up.weight, target_shape) * (
            self.multiplier * self.scale)


class FusedAttentionAdapter:
    """Wraps an ``nn.MultiheadAttention`` (OpenCLIP's fused attention) with four LoRA modules: q, k, v and out_proj.

    The forward adds each module's delta to its rows of ``in_proj_weight`` (q = rows [0, E), k = [E, 2E),
    v = [2E, 3E)) and to ``out_proj.weight``, then runs ``F.multi_head_attention_forward``, the function the original
    forward runs (open_clip's text tower is sequence-first, so torch's fused fast path never applies). With zero
    deltas the weights are the originals and outputs are bit-identical. This is the same maths as sd-scripts
    training q/k/v/out_proj Linears on the HF-converted model, and as A1111 stacking the q/k/v deltas into
    ``in_proj_weight``.

    Dropouts: module_dropout acts as usual; dropout and rank_dropout cannot act per sample on a weight delta, so
    here they mask ranks once per forward (shared by the batch), with the same 1 / (1 - p) rescale.

    Args:
        mha: the attention layer (``embed_dim`` E, ``num_heads``).
        parts: {"q_proj", "k_proj", "v_proj", "out_proj"} -> LoRAModule of in = out = E (Linear kind).
    """

    def __init__(self, mha: nn.MultiheadAttention, parts: dict[str, LoRAModule]):
        self.mha = mha
        self.parts = parts
        self.org_forward: Callable | None = None

    def _delta(self, lora: LoRAModule, shape: tuple[int, int]) -> torch.Tensor | None:
        if lora.skipped():
            return None
        down, up = lora.lora_down.weight, lora.lora_up.weight
        scale = lora.scale
        if lora.training:
            p = max(lora.dropout or 0.0, lora.rank_dropout or 0.0)
            if p:
                mask = (torch.rand(lora.lora_dim, device=down.device) > p).to(down.dtype)
                down = down * mask[:, None]
                scale = scale / (1.0 - p)
        return functional.delta_weight(down, up, shape) * (lora.multiplier * scale)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Same signature and return value as ``nn.MultiheadAttention.forward``."""
        mha = self.mha
        e = mha.embed_dim
        deltas = {name: self._delta(lora, (e, e)) for name, lora in self.parts.items()}
        if all(d is None for d in deltas.values()):
            return self.org_forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                    attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                    is_causal=is_causal)
        w = mha.in_proj_weight
        zero = None
        qkv = []
        for name in ("q_proj", "k_proj", "v_proj"):
            d = deltas.get(name)
            if d is None:
                zero = zero if zero is not None else torch.zeros((e, e), dtype=w.dtype, device=w.device)
                d = zero
            qkv.append(d.to(w.dtype))
        in_w = w + torch.cat(qkv, dim=0)
        out_w = mha.out_proj.weight
        if deltas.get("out_proj") is not None:
            out_w = out_w + deltas["out_proj"].to(out_w.dtype)
        if mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, e, mha.num_heads, in_w, mha.in_proj_bias, mha.bias_k, mha.bias_v,
            mha.add_zero_attn, mha.dropout, out_w, mha.out_proj.bias, training=mha.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if mha.batch_first:
            out = out.transpose(0, 1)
        return out, weights
