"""Gradient checkpointing for the ldm UNet that still gives LoRA gradients with a frozen base.

ldm's own checkpointing (``use_checkpoint``: ``ldm.modules.diffusionmodules.util.checkpoint``) is a reentrant
autograd Function that passes only the block's own parameters as inputs; LoRA parameters living in the network are
not among them, so they would get no gradient (and with a frozen base, nothing would). We switch ldm's flags off and
wrap each UNet block in ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, which tracks every tensor
the block touches, LoRA parameters included.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# ldm attributes that turn on its reentrant checkpointing: BasicTransformerBlock.checkpoint,
# ResBlock/AttentionBlock.use_checkpoint, SpatialTransformer (sgm) .use_checkpoint.
_LDM_FLAGS = ("checkpoint", "use_checkpoint")


def _wrap(block: nn.Module) -> Callable[[], None]:
    had = "forward" in block.__dict__
    previous = block.__dict__.get("forward")
    org = block.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return org(*args, **kwargs)
        return checkpoint(org, *args, use_reentrant=False, **kwargs)

    block.forward = forward

    def undo() -> None:
        if had:
            block.forward = previous
        else:
            block.__dict__.pop("forward", None)

    return undo


@contextmanager
def training_mode(unet: nn.Module, gradient_checkpointing: bool):
    """Context manager for a training run on an ldm/sgm ``UNetModel``.

    Always: ldm's reentrant checkpoint flags are set to False (restored on exit). With ``gradient_checkpointing``:
    every block of ``input_blocks``, ``middle_block`` and ``output_blocks`` runs under non-reentrant
    ``torch.utils.checkpoint`` (activations recomputed in backward; about 25-35% more compute, much less memory).
    """
    saved: list[tuple[nn.Module, str, object]] = []
    undos: list[Callable[[], None]] = []
    try:
        for m in unet.modules():
            for flag in _LDM_FLAGS:
                if isinstance(getattr(m, flag, None), bool):
                    saved.append((m, flag, getattr(m, flag)))
                    setattr(m, flag, False)
        if gradient_checkpointing:
            blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
            undos = [_wrap(b) for b in blocks]
        yield
    finally:
        for undo in reversed(undos):
            undo()
        for m, flag, value in saved:
            setattr(m, flag, value)
