"""Module-name mapping between the WebUI's module trees and Kohya keys, as data tables.

Three conventions meet here:

* LDM ("compvis") / sgm names: what the WebUI's UNet holds (``input_blocks.1.1.proj_in``).
* diffusers names: what Kohya files use for SD1/SD2 UNets (``down_blocks.0.attentions.0.proj_in``), because
  sd-scripts trains on ``library/original_unet.py``, a copy of diffusers' tree.
* Kohya keys: ``<prefix>_<path with "." replaced by "_">`` (sd-scripts ``LoRANetwork.create_modules``).

The block-index arithmetic lives in :func:`unet_block_table` and nowhere else; it follows sd-scripts
``model_util.convert_unet_state_dict_to_sd`` (also A1111 ``convert_diffusers_name_to_compvis``):

* ``down_blocks.i.resnets.j``    <-> ``input_blocks.(n*i + j + 1).0``, n = num_res_blocks + 1
* ``down_blocks.i.attentions.j`` <-> ``input_blocks.(n*i + j + 1).1``
* ``down_blocks.i.downsamplers.0.conv`` <-> ``input_blocks.(n*(i+1)).0.op`` for every level but the last
* ``mid_block.resnets.0 / attentions.0 / resnets.1`` <-> ``middle_block.0 / .1 / .2``
* ``up_blocks.i.resnets.j`` / ``attentions.j`` <-> ``output_blocks.(n*i + j).0`` / ``.1``, j = 0..n-1
* ``up_blocks.i.upsamplers.0.conv`` <-> ``output_blocks.(n*i + n - 1).1.conv`` when that up block has no attention,
  else ``.2.conv`` (for SD1: 1 for up_blocks.0, 2 for the others; for SDXL always 2).

Both upsampler positions are listed; only the one that exists in a model is ever looked up.
"""

from __future__ import annotations

from functools import lru_cache

# Children of an LDM ResBlock and their diffusers ResnetBlock2D names (convert_unet_state_dict_to_sd's
# unet_conversion_map_resnet). Only Linear/Conv2d children are listed: the others are never LoRA targets.
RESNET_CHILD_TABLE: tuple[tuple[str, str], ...] = (
    ("in_layers.2", "conv1"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)


@lru_cache(maxsize=16)
def unet_block_table(num_levels: int, num_res_blocks: int) -> tuple[tuple[str, str, str], ...]:
    """Returns ``(ldm_prefix, diffusers_prefix, kind)`` rows for a UNet of ``num_levels`` resolution levels.

    ``kind`` is ``"resnet"`` (children renamed through :data:`RESNET_CHILD_TABLE`), ``"attention"`` (children keep
    their names) or ``"sampler"`` (the row names the conv itself). Rows are sorted longest LDM prefix first so that
    the first prefix match is the right one.

    Args:
        num_levels: len(channel_mult): 4 for SD1/SD2, 3 for SDXL.
        num_res_blocks: res blocks per down level: 2 for SD1/SD2/SDXL.
    """
    n = num_res_blocks + 1
    rows: list[tuple[str, str, str]] = []
    for i in range(num_levels):
        for j in range(num_res_blocks):
            rows.append((f"input_blocks.{n * i + j + 1}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
            rows.append((f"input_blocks.{n * i + j + 1}.1", f"down_blocks.{i}.attentions.{j}", "attention"))
        if i < num_levels - 1:
            rows.append((f"input_blocks.{n * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "sampler"))
    rows.append(("middle_block.0", "mid_block.resnets.0", "resnet"))
    rows.append(("middle_block.1", "mid_block.attentions.0", "attention"))
    rows.append(("middle_block.2", "mid_block.resnets.1", "resnet"))
    for i in range(num_levels):
        for j in range(n):
            rows.append((f"output_blocks.{n * i + j}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            rows.append((f"output_blocks.{n * i + j}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
        if i < num_levels - 1:
            last = n * i + n - 1
            rows.append((f"output_blocks.{last}.1.conv", f"up_blocks.{i}.upsamplers.0.conv", "sampler"))
            rows.append((f"output_blocks.{last}.2.conv", f"up_blocks.{i}.upsamplers.0.conv", "sampler"))
    rows.sort(key=lambda r: -len(r[0]))
    return tuple(rows)


def ldm_to_diffusers_unet_path(path: str, num_levels: int, num_res_blocks: int) -> str | None:
    """Maps an LDM UNet module path to its diffusers path.

    Example: ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``; ``input_blocks.1.0.in_layers.2`` ->
    ``down_blocks.0.resnets.0.conv1``.

    Returns:
        The diffusers path, or None if the path is outside the mapped blocks (conv_in, time_embed, out).
    """
    for ldm, diff, kind in unet_block_table(num_levels, num_res_blocks):
        if path == ldm:
            return diff
        if not path.startswith(ldm + "."):
            continue
        if kind == "sampler":
            return None
        rest = path[len(ldm) + 1:]
        if kind == "resnet":
            for ldm_child, diff_child in RESNET_CHILD_TABLE:
                if rest == ldm_child:
                    return f"{diff}.{diff_child}"
            return None
        return f"{diff}.{rest}"
    return None


def kohya_name(prefix: str, path: str) -> str:
    """``prefix`` + "_" + ``path`` with every "." replaced by "_" (sd-scripts ``create_modules``)."""
    return f"{prefix}_{path}".replace(".", "_")


def openclip_kohya_path(layer: int, child: str) -> str:
    """The HF-style path sd-scripts gives an OpenCLIP text block child after converting the model to HF CLIP.

    Args:
        layer: the resblock index N.
        child: ``"attn.q_proj"`` / ``"attn.k_proj"`` / ``"attn.v_proj"`` / ``"attn.out_proj"`` for the fused
            attention parts, ``"mlp.c_fc"`` / ``"mlp.c_proj"`` for the MLP.

    Returns:
        e.g. ``text_model.encoder.layers.N.self_attn.q_proj`` or ``text_model.encoder.layers.N.mlp.fc1``
        (sd-scripts ``model_util.convert_ldm_clip_checkpoint_v2``).

    Raises:
        KeyError: an unknown child.
    """
    from .targets import MHA_PARTS, OPENCLIP_CHILD_TO_HF

    if child.startswith("attn.") and child[5:] in MHA_PARTS:
        hf = f"self_attn.{child[5:]}"
    else:
        hf = OPENCLIP_CHILD_TO_HF[child]
    return f"text_model.encoder.layers.{layer}.{hf}"
