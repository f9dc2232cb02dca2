"""A fused autograd function for a LoRA on a frozen ``nn.Linear`` (a speed and memory path, issue 7).

The plain path runs ``org(x) + up(down(x) * s)`` as four autograd ops: it allocates the full-width LoRA output and
then the sum (two (N, out) temporaries) in forward, and in backward the full-width gradient of ``x`` twice (frozen
layer and LoRA) plus their sum. :class:`LoRALinearFunction` computes the same maths with the LoRA term accumulated
into the base GEMM's output and into the base input-gradient GEMM's output (``addmm_``, beta = 1): no full-width
temporaries beyond the ones the frozen layer alone needs, and the same saved tensors (``x`` for the ``lora_down``
gradient, the (N, r) intermediate for the ``lora_up`` gradient).

Gradients (y = x W^T + b + s (x D^T) U^T, x: (N, in), D = lora_down (r, in), U = lora_up (out, r), g = dL/dy)::

    dL/dmid = s g U            (N, r)
    dL/dU   = s g^T mid        (out, r)      mid = x D^T
    dL/dD   = (dL/dmid)^T x    (r, in)
    dL/dx   = g W + (dL/dmid) D

Under autocast the whole function computes in the autocast dtype (as autocast would run the plain path's linears)
and returns fp32 gradients for the fp32 LoRA weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Off: every LoRA takes the plain path (for A/B benchmarks and bisecting; the maths is the same).
ENABLED = True


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region open now for ``device_type`` ("cpu", "cuda", ...), or None when autocast is
    off there. Uses the per-device-type API of torch >= 2.4 and falls back to the per-device functions of older torch
    (the WebUI's 2.1). Raises nothing."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


class LoRALinearFunction(torch.autograd.Function):
    """``y = F.linear(x, weight, bias) + scale * (x @ down^T) @ up^T`` with hand-written backward.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, down (r, in), up (out, r); returns (..., out).
    ``weight`` and ``bias`` must not require grad (frozen base layer); ``scale`` is a Python float
    (multiplier * alpha / rank); ``compute_dtype`` is the autocast dtype when autocast is on (the inputs are cast to
    it), else None (all inputs already in one dtype). Gradients flow to x, down and up.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float, compute_dtype: torch.dtype | None):
        cdt = compute_dtype
        if cdt is not None:
            # autocast would have run each linear in cdt: do the same, explicitly, so backward (where autocast is
            # off) can use the same dtypes.
            x, weight, down, up = (t.to(cdt) for t in (x, weight, down, up))
            bias = bias.to(cdt) if bias is not None else None
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = F.linear(x2, weight, bias)
        mid = torch.mm(x2, down.t())
        out.addmm_(mid, up.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, down, up, mid)
        ctx.scale = scale
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, down, up, mid = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        need_x, _, _, need_down, need_up, _, _ = ctx.needs_input_grad
        gmid = torch.mm(g, up).mul_(ctx.scale)
        grad_x = grad_down = grad_up = None
        if need_up:
            grad_up = torch.mm(g.t(), mid).mul_(ctx.scale).to(torch.float32)
        if need_down:
            grad_down = torch.mm(gmid.t(), x2).to(torch.float32)
        if need_x:
            grad_x = torch.mm(g, weight).addmm_(gmid, down)
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, grad_down, grad_up, None, None


def fusable_linear(layer: nn.Module, forward) -> nn.Linear | None:
    """``layer`` when the fused path may replace ``forward`` (the forward the LoRA wraps), else None.

    That is: a plain ``nn.Linear`` (not a subclass) without hooks, whose forward is its class's own (no instance-level
    wrapper of someone else's). A class-wide patch of ``nn.Linear.forward`` is accepted: the A1111 WebUI's Lora
    extension patches it to merge *its* loaded networks, which lib_lora's WebUI host unloads before training.
    """
    if not ENABLED or type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if getattr(forward, "__self__", None) is not layer or getattr(forward, "__func__", None) is not nn.Linear.forward:
        return None
    return layer


def lora_linear(x: torch.Tensor, layer: nn.Linear, down: torch.Tensor, up: torch.Tensor,
                scale: float) -> torch.Tensor | None:
    """The fused forward for ``layer(x) + scale * up(down(x))``, or None when this call must take the plain path.

    The plain path stays for: a trained base weight or bias, x in a dtype other than the weights' without autocast
    (the plain path casts the LoRA input to fp32 and back).
    """
    w, b = layer.weight, layer.bias
    if w.requires_grad or (b is not None and b.requires_grad):
        return None
    cdt = autocast_dtype(x.device.type)
    if cdt is None and not (x.dtype == w.dtype == down.dtype):
        return None
    return LoRALinearFunction.apply(x, w, b, down, up, scale, cdt)
