"""Pure tensor maths of a LoRA module: scale, delta weight, merge and unmerge.

Conventions follow sd-scripts ``networks/lora.py`` (``LoRAModule``, ``LoRAInfModule.merge_to``) and A1111's
``network_lora.py``; no ``nn.Module`` state here, so each function can be checked against a dense computation.
"""

from __future__ import annotations

import torch


def lora_scale(alpha: float | torch.Tensor | None, rank: int) -> float:
    """Returns ``alpha / rank``, the factor applied to ``up(down(x))``.

    A missing alpha (None) or 0 means alpha = rank, so scale 1.0: the rule of sd-scripts
    ``create_network_from_weights``, A1111 ``NetworkModule.calc_scale`` and diffusers' ``network_alphas``.

    Raises:
        ValueError: rank < 1.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if alpha is None:
        return 1.0
    a = float(alpha.item() if isinstance(alpha, torch.Tensor) else alpha)
    if a == 0.0:
        return 1.0
    return a / rank


def delta_weight(down: torch.Tensor, up: torch.Tensor, target_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Returns ``up @ down`` shaped as the target layer's weight, without scale or multiplier.

    Args:
        down: (r, in) for Linear, (r, in, 1, 1) for 1x1 conv, (r, in, k, k) for k x k conv.
        up: (out, r) or (out, r, 1, 1).
        target_shape: the weight shape of the layer the delta is added to: (out, in) or (out, in, k, k).

    Returns:
        A tensor of ``target_shape`` in the dtype of ``down``. For k x k kernels,
        ``delta[o, i, :, :] = sum_r up[o, r] * down[r, i, :, :]`` (sd-scripts ``merge_to`` for 3x3). 2-D weights for
        a 1x1 conv target (and 4-D 1x1 weights for a Linear target) are reshaped, as A1111 and ComfyUI do: a file
        from a trainer that saw SD2's proj_in as a 1x1 conv loads into the WebUI's Linear proj_in.

    Raises:
        ValueError: the product's element count does not fit ``target_shape``.
    """
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], rank)
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        delta = torch.einsum("or,rikl->oikl", up2, down)
    else:
        delta = up2 @ down.reshape(rank, -1)
    if delta.numel() != torch.Size(target_shape).numel():
        raise ValueError(f"LoRA delta {tuple(delta.shape)} does not fit a weight of shape {tuple(target_shape)}")
    return delta.reshape(target_shape)


def merge(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, multiplier: float) -> None:
    """Adds ``multiplier * scale * delta`` to ``weight`` in place (in the weight's dtype), under no_grad.

    Args:
        weight: the frozen base weight, (out, in) or (out, in, k, k).
        down, up: as in :func:`delta_weight`.
        scale: alpha / rank (:func:`lora_scale`).
        multiplier: the user's strength, e.g. 0.7 in ``<lora:name:0.7>``.
    """
    with torch.no_grad():
        d = delta_weight(down.float(), up.float(), weight.shape) * (scale * multiplier)
        weight.copy_((weight.float() + d.to(weight.device)).to(weight.dtype))


def unmerge(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, multiplier: float) -> None:
    """Subtracts what :func:`merge` added. Exact in fp32 up to rounding; use a backup copy for bit-exact restore."""
    merge(weight, down, up, scale, -multiplier)
