"""``LoRANetwork``: find targets in the WebUI's module trees, build LoRA modules, attach, merge, load and save.

The network's ``state_dict()`` holds exactly the Kohya keys (``<name>.lora_down.weight``, ``<name>.lora_up.weight``,
``<name>.alpha``), because every LoRA module is registered under its Kohya name, as sd-scripts ``LoRANetwork``
does. The target layers are never registered inside the network, so the base model's ``state_dict`` is untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import functional, fused, keymap, targets
from .errors import ConfigError
from .lora_module import FusedAttentionAdapter, LoRAModule
from .model_api import TextEncoderRoot
from .safetensors_io import check_finite, group_lora_keys

_RESBLOCK_PATH = re.compile(r"(?:^|\.)resblocks\.(\d+)$")


@dataclass
class Target:
    """One layer that can carry a LoRA module.

    Attributes:
        name: the Kohya key (canonical for this architecture).
        aliases: other names files use for the same layer (LDM-named SD1/SD2 UNet keys, diffusers-named SDXL keys).
        part: ``"unet"`` or ``"te"``.
        layer: the nn.Linear / nn.Conv2d, or the nn.MultiheadAttention for a fused-attention part.
        mha_part: ``"q_proj"``/``"k_proj"``/``"v_proj"``/``"out_proj"`` for a fused-attention part, else None.
        in_conv_block: found inside a ResBlock/Downsample/Upsample (created only with conv_dim, as sd-scripts).
    """

    name: str
    aliases: tuple[str, ...]
    part: str
    layer: nn.Module
    mha_part: str | None = None
    in_conv_block: bool = False

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        """The target's kernel size for a conv, None for Linear and attention parts."""
        return tuple(self.layer.kernel_size) if isinstance(self.layer, nn.Conv2d) else None

    @property
    def is_kxk_conv(self) -> bool:
        """True for a conv with a kernel larger than 1x1 (gets conv_dim)."""
        k = self.kernel_size
        return k is not None and k != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight a delta for this target has."""
        if self.mha_part is not None:
            e = self.layer.embed_dim
            return (e, e)
        return tuple(self.layer.weight.shape)


def _unet_layout(unet: nn.Module) -> tuple[int, int]:
    """(num_levels, num_res_blocks) of an ldm/sgm UNetModel."""
    nrb = unet.num_res_blocks
    nrb = nrb[0] if isinstance(nrb, (list, tuple)) else nrb
    return len(unet.channel_mult), int(nrb)


def _is_target_leaf(m: nn.Module) -> bool:
    # Exact class names, as sd-scripts checks ``child_module.__class__.__name__``.
    return m.__class__.__name__ in ("Linear", "Conv2d")


def find_unet_targets(unet: nn.Module, arch: str, include_conv: bool) -> list[Target]:
    """Lists the UNet layers sd-scripts would wrap, named as Kohya names them for ``arch``.

    Args:
        unet: an ldm/sgm ``UNetModel`` (the WebUI's ``sd_model.model.diffusion_model``), any device incl. meta.
        arch: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        include_conv: also list the layers of ResBlock/Downsample/Upsample (sd-scripts does with conv_dim).

    Raises:
        ConfigError: unknown arch.
    """
    if arch not in targets.UNET_NAMING:
        raise ConfigError(f"unknown architecture {arch!r}; expected one of {sorted(targets.UNET_NAMING)}")
    levels, nrb = _unet_layout(unet)
    classes = targets.UNET_TARGET_CLASSES + (targets.UNET_CONV_TARGET_CLASSES if include_conv else ())
    found: list[Target] = []
    for block_path, block in unet.named_modules():
        cls = block.__class__.__name__
        if cls not in classes:
            continue
        in_conv = cls in targets.UNET_CONV_TARGET_CLASSES
        for child_path, child in block.named_modules():
            if not child_path or not _is_target_leaf(child):
                continue
            path = f"{block_path}.{child_path}"
            ldm_name = keymap.kohya_name(targets.PREFIX_UNET, path)
            diff_path = keymap.ldm_to_diffusers_unet_path(path, levels, nrb)
            diff_name = keymap.kohya_name(targets.PREFIX_UNET, diff_path) if diff_path else None
            if targets.UNET_NAMING[arch] == "diffusers":
                if diff_name is None:
                    continue
                name, aliases = diff_name, (ldm_name,)
            else:
                name, aliases = ldm_name, ((diff_name,) if diff_name else ())
            found.append(Target(name, aliases, "unet", child, in_conv_block=in_conv))
    return found


def find_text_encoder_targets(root: TextEncoderRoot) -> list[Target]:
    """Lists the text-encoder layers sd-scripts would wrap.

    HF ``CLIPTextModel``: every Linear in CLIPAttention/CLIPMLP (q/k/v/out_proj, fc1, fc2), named from the model
    root (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). OpenCLIP: per ResidualAttentionBlock the fused
    attention as four parts plus mlp c_fc/c_proj, named as sd-scripts names the HF-converted model; blocks at index
    >= ``root.layers_used`` are skipped (SD2's last block, unused at the penultimate layer).
    """
    found: list[Target] = []
    for block_path, block in root.module.named_modules():
        cls = block.__class__.__name__
        if cls in targets.HF_CLIP_TARGET_CLASSES:
            for child_path, child in block.named_modules():
                if child_path and _is_target_leaf(child):
                    found.append(Target(keymap.kohya_name(root.prefix, f"{block_path}.{child_path}"), (), "te", child))
        elif cls == targets.OPENCLIP_BLOCK_CLASS:
            m = _RESBLOCK_PATH.search(block_path)
            if m is None:
                continue
            layer = int(m.group(1))
            if root.layers_used is not None and layer >= root.layers_used:
                continue
            for part in targets.MHA_PARTS:
                path = keymap.openclip_kohya_path(layer, f"attn.{part}")
                found.append(Target(keymap.kohya_name(root.prefix, path), (), "te", block.attn, mha_part=part))
            for child in targets.OPENCLIP_CHILD_TO_HF:
                path = keymap.openclip_kohya_path(layer, child)
                found.append(Target(keymap.kohya_name(root.prefix, path), (), "te", block.get_submodule(child)))
    return found


def find_targets(unet: nn.Module | None, text_encoders: Sequence[TextEncoderRoot], arch: str,
                 include_conv: bool) -> list[Target]:
    """All targets of a model: UNet first, then each text encoder in order (see the two functions above)."""
    found = find_unet_targets(unet, arch, include_conv) if unet is not None else []
    for root in text_encoders:
        found.extend(find_text_encoder_targets(root))
    return found


@dataclass
class LoadReport:
    """What :meth:`LoRANetwork.load_weights` did with a file's keys.

    Attributes:
        loaded: Kohya names of the modules whose weights were loaded.
        unmatched: module names in the file that match no layer of this model (reported, not loaded).
        unknown_keys: keys that are not LoRA keys at all (e.g. ``lora_te2_text_projection`` extras, LoHa keys).
        shape_errors: ``name: reason`` for modules whose tensors do not fit their layer.
        missing_alpha: names loaded without an ``.alpha`` key (alpha = rank, scale 1.0).
    """

    loaded: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)
    missing_alpha: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key of the file was used."""
        return not (self.unmatched or self.unknown_keys or self.shape_errors)

    def summary(self) -> str:
        """One human-readable paragraph naming every key that was not used."""
        lines = [f"loaded {len(self.loaded)} modules"]
        if self.missing_alpha:
            lines.append(f"{len(self.missing_alpha)} without alpha (scale 1.0)")
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} modules match no layer of this model: {', '.join(self.unmatched)}")
        if self.unknown_keys:
            lines.append(f"{len(self.unknown_keys)} keys are not LoRA keys: {', '.join(self.unknown_keys)}")
        if self.shape_errors:
            lines.append("shape mismatches: " + "; ".join(self.shape_errors))
        return "; ".join(lines)


def group_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Groups Kohya keys by module (:func:`safetensors_io.group_lora_keys`) and keeps complete modules only.

    Returns:
        ({module name: {part: tensor}}, unknown keys). A module without both ``lora_down.weight`` and
        ``lora_up.weight``, and a ``dora_scale`` (DoRA is not supported), count as unknown keys.
    """
    modules, unknown = group_lora_keys(state_dict)
    for name in list(modules):
        parts = modules[name]
        if "dora_scale" in parts:
            unknown.append(f"{name}.dora_scale")
            del parts["dora_scale"]
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            unknown.extend(f"{name}.{p}" for p in parts)
            del modules[name]
    return modules, sorted(unknown)


def _fit_down(down: torch.Tensor, mid: torch.Tensor | None, target: Target, param: torch.Tensor) -> torch.Tensor:
    """Reshapes a file's lora_down (folding lora_mid) to this network's lora_down parameter shape.

    - ``lora_mid`` (LyCORIS/CP: down 1x1 -> mid k x k -> up 1x1) folds exactly into a k x k down:
      ``down'[s, i] = sum_r mid[s, r] * down[r, i]`` per kernel tap.
    - a 1x1/2-D down for a k x k target is put on the centre tap, which equals a 1x1 conv with the target's stride
      (padding k//2): what A1111 computes for such files.
    - 2-D <-> 4-D 1x1 (SD2 proj_in/out saved as conv by sd-scripts, Linear in the WebUI) is a reshape.
    """
    rank = down.shape[0]
    if mid is not None:
        down2 = down.reshape(rank, -1)
        down = torch.einsum("srkl,ri->sikl", mid.float(), down2.float())
    if param.dim() == 4 and param.shape[2:] != (1, 1) and down.numel() == param.shape[0] * param.shape[1]:
        full = torch.zeros(param.shape, dtype=down.dtype)
        full[:, :, param.shape[2] // 2, param.shape[3] // 2] = down.reshape(param.shape[0], param.shape[1])
        return full
    if down.numel() != param.numel():
        raise ValueError(f"lora_down {tuple(down.shape)} does not fit {tuple(param.shape)}")
    return down.reshape(param.shape)


class LoRANetwork(nn.Module):
    """A set of LoRA modules over one model, registered under their Kohya names.

    Build one with :meth:`create` (training: ranks from the config) or :meth:`from_weights` (ranks from a file).
    ``attach()``/``detach()`` wrap and restore the targets' forwards; ``merge()``/``unmerge()`` add the deltas into
    the base weights (for export or fast inference) and restore them bit-exactly.

    Args:
        targets_list: the layers to wrap (:func:`find_targets`).
        ranks: Kohya name -> rank; targets without an entry get no module.
        alphas: Kohya name -> alpha (None = rank).
        dropout, rank_dropout, module_dropout: as :class:`LoRAModule`.
    """

    def __init__(self, targets_list: Sequence[Target], ranks: dict[str, int], alphas: dict[str, float | None],
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self._targets: dict[str, Target] = {}
        self._adapters: list[FusedAttentionAdapter] = []
        self._attached: list[tuple[nn.Module, bool, object]] = []
        self._backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        mha_parts: dict[int, dict[str, LoRAModule]] = {}
        for t in targets_list:
            rank = ranks.get(t.name)
            if not rank:
                continue
            if t.mha_part is not None:
                e = t.layer.embed_dim
                lora = LoRAModule(t.name, e, e, rank, alphas.get(t.name), dropout=dropout,
                                  rank_dropout=rank_dropout, module_dropout=module_dropout,
                                  device=t.layer.in_proj_weight.device)
                mha_parts.setdefault(id(t.layer), {})[t.mha_part] = lora
            elif isinstance(t.layer, nn.Conv2d):
                lora = LoRAModule(t.name, t.layer.in_channels, t.layer.out_channels, rank, alphas.get(t.name),
                                  kernel_size=tuple(t.layer.kernel_size), stride=t.layer.stride,
                                  padding=t.layer.padding, dropout=dropout, rank_dropout=rank_dropout,
                                  module_dropout=module_dropout, device=t.layer.weight.device)
            else:
                lora = LoRAModule(t.name, t.layer.in_features, t.layer.out_features, rank, alphas.get(t.name),
                                  dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                                  device=t.layer.weight.device)
            lora.part = t.part
            self.add_module(t.name, lora)
            self._targets[t.name] = t
        by_id = {id(t.layer): t.layer for t in targets_list if t.mha_part is not None}
        for layer_id, parts in mha_parts.items():
            self._adapters.append(FusedAttentionAdapter(by_id[layer_id], parts))

    # ----------------------------------------------------------------------------------------------- creation
    @classmethod
    def create(cls, unet: nn.Module | None, text_encoders: Sequence[TextEncoderRoot], arch: str,
               network_dim: int = 32, network_alpha: float | None = 16.0, conv_dim: int | None = None,
               conv_alpha: float | None = None, dropout: float | None = None, rank_dropout: float | None = None,
               module_dropout: float | None = None, train_unet: bool = True,
               train_text_encoder: bool = True) -> LoRANetwork:
        """A new network for training, with sd-scripts' default targets.

        Linear and 1x1 conv targets get ``network_dim``/``network_alpha``; with ``conv_dim`` the ResBlock/
        Downsample/Upsample layers are added, k x k convs at ``conv_dim``/``conv_alpha`` (conv_alpha defaults to
        1.0 as in sd-scripts) and their Linear/1x1 children at network_dim. Parts not trained get no modules.

        Raises:
            ConfigError: network_dim < 1, conv_dim < 0, nothing to train.
        """
        if network_dim < 1:
            raise ConfigError(f"network_dim must be >= 1, got {network_dim}")
        if conv_dim is not None and conv_dim < 0:
            raise ConfigError(f"conv_dim must be >= 0, got {conv_dim}")
        if not (train_unet or train_text_encoder):
            raise ConfigError("nothing to train: train_unet and train_text_encoder are both off")
        if conv_dim and conv_alpha is None:
            conv_alpha = 1.0
        found = find_targets(unet if train_unet else None, text_encoders if train_text_encoder else (), arch,
                             include_conv=bool(conv_dim))
        ranks: dict[str, int] = {}
        alphas: dict[str, float | None] = {}
        for t in found:
            if t.is_kxk_conv:
                ranks[t.name], alphas[t.name] = conv_dim or 0, conv_alpha
            else:
                ranks[t.name], alphas[t.name] = network_dim, network_alpha
        return cls(found, ranks, alphas, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)

    @classmethod
    def from_weights(cls, state_dict: dict[str, torch.Tensor], unet: nn.Module | None,
                     text_encoders: Sequence[TextEncoderRoot], arch: str,
                     reuse: LoRANetwork | None = None) -> tuple[LoRANetwork, LoadReport]:
        """A network shaped by a Kohya file (rank per module from ``lora_down.shape[0]``) with its weights loaded.

        Names are matched against the canonical Kohya names and their aliases of every target, conv blocks
        included (as sd-scripts ``create_network_from_weights``). Nothing raises for unmatched or unknown keys: they
        are listed in the report.

        Args:
            reuse: a network from an earlier ``from_weights`` call on the same model, no longer needed (e.g. the
                previous checkpoint of a run). When this file would build exactly its modules (same targets and
                ranks) and it is neither attached nor merged, the file is loaded into it (multipliers back to
                1.0) and it is returned instead of a new network: building the modules is most of the cost of
                this call. Otherwise it is left untouched.

        Raises:
            FormatError: a tensor holds NaN/Inf (the message names the key).
        """
        check_finite(state_dict)
        modules, unknown = group_keys(state_dict)
        found = find_targets(unet, text_encoders, arch, include_conv=True)
        lookup = _name_lookup(found)
        ranks, alphas = {}, {}
        for name, parts in modules.items():
            t = lookup.get(name)
            if t is not None:
                ranks[t.name] = int(parts["lora_down.weight"].shape[0])
                alpha = parts.get("alpha")
                alphas[t.name] = float(alpha.float().item()) if alpha is not None else None
        report = None
        net = reuse if reuse is not None and reuse._fits(lookup, ranks) else None
        if net is not None:
            report = net._load_checked(state_dict)  # checked above: the finite check is a pass over every tensor
            if report.shape_errors:
                net, report = None, None  # some modules kept the earlier file's tensors: build afresh
            else:
                net.set_multiplier(1.0)
        if net is None:
            net = cls(found, ranks, alphas)
            report = net._load_checked(state_dict)
        report.unknown_keys = sorted(set(report.unknown_keys) | set(unknown))
        loaded = set(report.loaded)
        for name in [n for n in net.names() if n not in loaded]:
            net._drop(name)  # a module whose tensors did not fit must not be saved back as if it came from the file
        return net, report

    def _fits(self, lookup: dict[str, Target], ranks: dict[str, int]) -> bool:
        """True when a file with these ranks (by canonical name) would build exactly this network's modules."""
        if self._attached or self._backups or set(ranks) != set(self._targets):
            return False
        for name, rank in ranks.items():
            lora = getattr(self, name)
            if (lookup[name].layer is not self._targets[name].layer or lora.lora_dim != rank
                    or lora.dropout is not None or lora.rank_dropout is not None or lora.module_dropout is not None):
                return False
        return True

    def _drop(self, name: str) -> None:
        """Removes one module (before attach) and its fused-attention slot, if any."""
        t = self._targets.pop(name)
        lora = getattr(self, name)
        delattr(self, name)
        if t.mha_part is not None:
            for adapter in self._adapters:
                if adapter.parts.get(t.mha_part) is lora:
                    del adapter.parts[t.mha_part]
            self._adapters = [a for a in self._adapters if a.parts]

    # ------------------------------------------------------------------------------------------------ access
    def lora_modules(self, part: str | None = None) -> Iterator[LoRAModule]:
        """The LoRA modules, optionally only those of ``part`` ("unet" or "te")."""
        for m in self.children():
            if isinstance(m, LoRAModule) and (part is None or m.part == part):
                yield m

    def names(self, part: str | None = None) -> list[str]:
        """Kohya names of the modules, in creation order."""
        return [m.lora_name for m in self.lora_modules(part)]

    def set_multiplier(self, multiplier: float | None = None, te: float | None = None,
                       unet: float | None = None) -> None:
        """Sets the strength: ``multiplier`` for all modules, or ``te``/``unet`` per part (A1111's te/unet args)."""
        for m in self.lora_modules():
            value = unet if m.part == "unet" and unet is not None else te if m.part == "te" and te is not None \
                else multiplier
            if value is not None:
                m.multiplier = float(value)

    def prepare_optimizer_params(self, text_encoder_lr: float | None, unet_lr: float | None,
                                 default_lr: float) -> tuple[list[dict], list[str]]:
        """Param groups per part, as sd-scripts ``prepare_optimizer_params``.

        A part whose lr is None uses ``default_lr``; a part whose lr is 0 is left out of the optimizer (its modules
        are still saved). Returns (groups, descriptions) with descriptions "unet"/"textencoder" for logging
        (``lr/unet``, ``lr/textencoder``).
        """
        groups, descs = [], []
        for part, lr, desc in (("te", text_encoder_lr, "textencoder"), ("unet", unet_lr, "unet")):
            params = [p for m in self.lora_modules(part) for p in m.parameters()]
            lr = default_lr if lr is None else lr
            if params and lr:
                groups.append({"params": params, "lr": lr})
                descs.append(desc)
        return groups, descs

    # ----------------------------------------------------------------------------------------- attach/detach
    @property
    def attached(self) -> bool:
        """True while the targets' forwards are wrapped."""
        return bool(self._attached)

    def attach(self) -> None:
        """Wraps every target's forward (sd-scripts ``apply_to``). Idempotent.

        Raises:
            RuntimeError: the network is merged (its deltas are already in the weights).
        """
        if self._attached:
            return
        if self._backups:
            raise RuntimeError("the network is merged into the base weights; unmerge() before attach()")
        for name, t in self._targets.items():
            if t.mha_part is not None:
                continue
            lora = getattr(self, name)
            self._wrap(t.layer, lora)
        for adapter in self._adapters:
            self._wrap(adapter.mha, adapter)

    def _wrap(self, layer: nn.Module, owner) -> None:
        had = "forward" in layer.__dict__
        previous = layer.__dict__.get("forward")
        owner.org_forward = layer.forward
        if isinstance(owner, LoRAModule):
            target = fused.fusable_linear(layer, owner.org_forward)
            owner.fused_target = (target,) if target is not None else ()
        layer.forward = owner.forward
        self._attached.append((layer, had, previous))

    def detach(self) -> None:
        """Restores every wrapped forward exactly as it was before :meth:`attach`. Idempotent."""
        for layer, had, previous in reversed(self._attached):
            if had:
                layer.forward = previous
            else:
                layer.__dict__.pop("forward", None)
        self._attached.clear()
        for m in self.lora_modules():
            m.org_forward = None
            m.fused_target = ()
        for a in self._adapters:
            a.org_forward = None

    @contextmanager
    def applied(self):
        """Context manager: attach on enter, detach on exit (also on error)."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    # ------------------------------------------------------------------------------------------- merge/unmerge
    @property
    def merged(self) -> bool:
        """True while the deltas are added into the base weights."""
        return bool(self._backups)

    def _weight_rows(self, t: Target) -> tuple[torch.Tensor, slice]:
        """(base weight tensor, its rows that ``t``'s delta is added to); q/k/v share ``in_proj_weight``."""
        if t.mha_part is None:
            return t.layer.weight, slice(None)
        if t.mha_part == "out_proj":
            return t.layer.out_proj.weight, slice(None)
        e = t.layer.embed_dim
        i = ("q_proj", "k_proj", "v_proj").index(t.mha_part)
        return t.layer.in_proj_weight, slice(i * e, (i + 1) * e)

    def _backup(self, weight: torch.Tensor) -> torch.Tensor:
        """The saved original of ``weight``, saved now if it is not yet (in_proj_weight holds q, k and v)."""
        for w, backup in reversed(self._backups):  # q, k and v of one in_proj_weight come one after another
            if w is weight:
                return backup
        backup = weight.detach().clone()
        self._backups.append((weight, backup))
        return backup

    def merge(self) -> None:
        """Adds every module's delta (at its current multiplier) into its base weight, keeping a copy of each
        original weight so that :meth:`unmerge` restores it bit-exactly. Detaches first if attached."""
        if self._backups:
            return
        self.detach()
        with torch.no_grad():
            for name, t in self._targets.items():
                lora = getattr(self, name)
                weight, rows = self._weight_rows(t)
                self._backup(weight)
                target = weight[rows]
                delta = lora.delta(target.shape).to(device=weight.device)
                weight[rows] = (target.float() + delta).to(weight.dtype)

    def unmerge(self) -> None:
        """Restores the base weights saved by :meth:`merge` (bit-exact)."""
        with torch.no_grad():
            for weight, backup in reversed(self._backups):
                weight.copy_(backup)
        self._backups.clear()

    @contextmanager
    def weight_switcher(self) -> Iterator[WeightSwitcher]:
        """Context manager for rendering at many strengths: yields a :class:`WeightSwitcher` whose ``set(te=...,
        unet=...)`` writes ``original + multiplier * scale * delta`` into the base weights without a matmul.

        On enter the network is detached (as :meth:`merge` does) and each module's delta at multiplier 1 is
        computed once (fp32, on the base weight's device), next to one saved copy of each original weight; the
        weights stay unchanged until the first ``set``. On exit (also on error) the originals are put back
        bit-exactly. Memory: one fp32 delta per target weight plus the copy :meth:`merge` keeps too.

        Raises:
            RuntimeError: the network is already merged.
        """
        if self._backups:
            raise RuntimeError("the network is merged into the base weights; unmerge() before weight_switcher()")
        self.detach()
        switcher = WeightSwitcher(self)
        try:
            yield switcher
        finally:
            switcher.close()

    # ------------------------------------------------------------------------------------------------ loading
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> LoadReport:
        """Loads Kohya tensors into the existing modules, by canonical name or alias.

        Tensors are reshaped to this network's layout where the maths allows it (see :func:`_fit_down`); a
        missing alpha means alpha = rank. Returns a report; never raises for unmatched keys.

        Raises:
            FormatError: a tensor holds NaN/Inf (the message names the key).
        """
        check_finite(state_dict)
        return self._load_checked(state_dict)

    def _load_checked(self, state_dict: dict[str, torch.Tensor]) -> LoadReport:
        """:meth:`load_weights` after :func:`check_finite`."""
        modules, unknown = group_keys(state_dict)
        lookup = _name_lookup(list(self._targets.values()))
        report = LoadReport(unknown_keys=unknown)
        with torch.no_grad():
            for file_name, parts in sorted(modules.items()):
                t = lookup.get(file_name)
                if t is None or not hasattr(self, t.name):
                    report.unmatched.append(file_name)
                    continue
                lora: LoRAModule = getattr(self, t.name)
                down, up = parts["lora_down.weight"], parts["lora_up.weight"]
                try:
                    if down.shape[0] != lora.lora_dim:
                        raise ValueError(f"rank {down.shape[0]} in the file, {lora.lora_dim} in the network")
                    new_down = _fit_down(down, parts.get("lora_mid.weight"), t, lora.lora_down.weight)
                    if up.numel() != lora.lora_up.weight.numel():
                        raise ValueError(f"lora_up {tuple(up.shape)} does not fit {tuple(lora.lora_up.weight.shape)}")
                except ValueError as exc:
                    report.shape_errors.append(f"{file_name}: {exc}")
                    continue
                lora.lora_down.weight.copy_(new_down.reshape(lora.lora_down.weight.shape))
                lora.lora_up.weight.copy_(up.reshape(lora.lora_up.weight.shape))
                alpha = parts.get("alpha")
                if alpha is None:
                    report.missing_alpha.append(t.name)
                lora.set_alpha(None if alpha is None else float(alpha.float().item()))
                report.loaded.append(t.name)
        return report

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The Kohya tensors (down, up, alpha per module) detached on CPU, optionally cast to ``dtype``."""
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu")
            out[k] = v.to(dtype) if dtype is not None else v.clone()
        return out


class WeightSwitcher:
    """Writes a network's deltas into the base weights at any strength, cheaply and repeatedly (grid cells).

    Made by :meth:`LoRANetwork.weight_switcher`, which is the way to use it. A module's weight after :meth:`set`
    is ``(original.float() + delta1 * (multiplier * scale)).to(weight.dtype)`` with ``delta1 = up @ down`` in fp32:
    the very operations :meth:`LoRANetwork.merge` runs, so a cell is bit-identical to merge() at the same
    multipliers. While it is open the network counts as merged (``attach()`` raises).
    """

    def __init__(self, net: LoRANetwork):
        self._net = net
        self._loras: list[LoRAModule] = []
        self._deltas: list[torch.Tensor] = []  # fp32, multiplier 1 and scale 1, shaped as the target rows
        self._originals: list[torch.Tensor] = []  # views of the saved originals, in the weights' dtype
        self._views: list[torch.Tensor] = []  # views of the live weights the deltas go to
        self._written: list[float | None] = []  # the multiplier * scale each weight holds (None: original)
        with torch.no_grad():
            for name, t in net._targets.items():
                lora = getattr(net, name)
                weight, rows = net._weight_rows(t)
                backup = net._backup(weight)
                target = weight[rows]
                delta = functional.delta_weight(lora.lora_down.weight, lora.lora_up.weight, target.shape)
                self._loras.append(lora)
                self._deltas.append(delta.to(device=weight.device))
                self._originals.append(backup[rows])
                self._views.append(target)
                self._written.append(None)
        self._open = True

    def set(self, multiplier: float | None = None, te: float | None = None, unet: float | None = None) -> None:
        """Sets the strengths (as :meth:`LoRANetwork.set_multiplier`) and writes them into the base weights.

        Only weights whose ``multiplier * scale`` changed since the last write are rewritten (with ``part="te"``
        grids, the UNet's stay as they are). ``set()`` alone writes the modules' current multipliers.

        Raises:
            RuntimeError: the switcher is closed, or the network was unmerged meanwhile.
        """
        net = self._net
        if not self._open or not net._backups:
            raise RuntimeError("the weight switcher is closed (or the network was unmerged)")
        net.set_multiplier(multiplier, te=te, unet=unet)
        idx, factors = [], []
        for i, lora in enumerate(self._loras):
            factor = lora.multiplier * lora.scale
            if factor != self._written[i]:
                idx.append(i)
                factors.append(factor)
        if not idx:
            return
        # Same operations as merge(): delta * factor in fp32, + original, cast to the weight's dtype. An fp32
        # weight is its own scratch (no allocation); a half one needs an fp32 temporary to round only once.
        f32 = [k for k, i in enumerate(idx) if self._views[i].dtype == torch.float32]
        half = [k for k, i in enumerate(idx) if self._views[i].dtype != torch.float32]
        with torch.no_grad():
            if f32:
                views = [self._views[idx[k]] for k in f32]
                torch._foreach_copy_(views, [self._deltas[idx[k]] for k in f32])
                torch._foreach_mul_(views, [factors[k] for k in f32])
                torch._foreach_add_(views, [self._originals[idx[k]] for k in f32])
            if half:
                new = torch._foreach_mul([self._deltas[idx[k]] for k in half], [factors[k] for k in half])
                torch._foreach_add_(new, [self._originals[idx[k]] for k in half])
                torch._foreach_copy_([self._views[idx[k]] for k in half], new)
        for i, f in zip(idx, factors):
            self._written[i] = f

    def close(self) -> None:
        """Puts the original weights back (bit-exact) and frees the deltas. Idempotent."""
        if self._open:
            self._open = False
            self._net.unmerge()
            self._deltas.clear()
            self._originals.clear()
            self._views.clear()


def _name_lookup(found: Sequence[Target]) -> dict[str, Target]:
    lookup: dict[str, Target] = {}
    for t in found:
        for alias in t.aliases:
            lookup.setdefault(alias, t)
    for t in found:
        lookup[t.name] = t
    return lookup
