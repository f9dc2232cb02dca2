"""Scaled-dot-product attention for ldm's ``CrossAttention``, as the WebUI's "sdp" optimisation does.

ldm's own ``CrossAttention.forward`` materialises the (B*heads, N, N) score matrix with einsum; torch's
``F.scaled_dot_product_attention`` computes the same softmax(q k^T / sqrt(d)) v with fused kernels (the WebUI's
``sd_hijack_optimizations.scaled_dot_product_attention_forward``). The headless model switches to it; the
projections ``to_q``/``to_k``/``to_v``/``to_out`` are still called as modules, so LoRA wrappers on them work as before.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import recompute


def _sdpa_forward(attn: nn.Module):
    def forward(x, context=None, mask=None):
        h = attn.heads
        context = x if context is None else context
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        b, n, inner = q.shape
        d = inner // h
        q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        if mask is not None:
            mask = mask.reshape(b, 1, 1, -1).expand(-1, h, n, -1)  # True = keep (ldm's convention)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # Heads merged by lib_lora.recompute: in training, a LoRA on to_out then recomputes this copy in backward
        # from SDPA's own saved output instead of keeping it.
        return attn.to_out(recompute.merge_heads(out, b, n, inner, x.dtype))

    return forward


def use_sdpa(unet: nn.Module) -> int:
    """Replaces the forward of every ldm ``CrossAttention`` in ``unet`` by the SDPA version (instance attribute;
    ``del module.forward`` restores ldm's). Returns the number of modules switched."""
    n = 0
    for m in unet.modules():
        if m.__class__.__name__ == "CrossAttention" and hasattr(m, "to_q") and "forward" not in m.__dict__:
            m.forward = _sdpa_forward(m)
            n += 1
    return n
