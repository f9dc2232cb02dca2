"""Loader checks on a LoRA file: architecture guess, ranks and alphas, module counts, unmatched keys, NaN/Inf.

Backs ``python -m lib_lora inspect`` and the WebUI's checks before a file is used. Matching is done against the
full-size module tree of the guessed architecture (:mod:`lib_lora.reference`), conv layers included, by canonical
Kohya name or alias, exactly as :meth:`LoRANetwork.from_weights` matches.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from . import metadata as md
from .errors import FormatError
from .network import group_keys
from .reference import full_size_targets
from .safetensors_io import check_finite, load_lora_file

# Cross-attention context width -> architecture (attn2.to_k input features): SD1 768, SD2 1024, SDXL 2048.
_CONTEXT_DIM_ARCH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Text-encoder hidden width of lora_te_ keys -> architecture: CLIP-L 768 (SD1), OpenCLIP ViT-H 1024 (SD2).
_TE_WIDTH_ARCH = {768: "sd1", 1024: "sd2"}


@dataclass
class FileReport:
    """What ``inspect`` tells about one LoRA file.

    Attributes:
        path: the file.
        arch: guessed architecture ("sd1"/"sd2"/"sdxl"/"unknown") and ``arch_reason``, how it was decided.
        counts: modules per part ("unet", "te", "te1", "te2").
        ranks: per part, "rank/alpha" -> module count (e.g. {"unet": {"8/4.0": 192}}).
        conv_modules: modules whose lora_down is a k x k conv (LoCon / C3Lier).
        unmatched: module names that match no layer of the full-size ``arch`` model.
        unknown_keys: keys that are not LoRA keys.
        non_finite: the error for a NaN/Inf tensor, else None.
        metadata: :func:`lib_lora.metadata.summarize` of the file's metadata.
    """

    path: str
    arch: str
    arch_reason: str
    counts: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)
    conv_modules: int = 0
    unmatched: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)
    non_finite: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    def to_text(self) -> str:
        """A few human-readable lines."""
        lines = [f"{os.path.basename(self.path)}", f"  architecture: {self.arch} ({self.arch_reason})"]
        for part, n in self.counts.items():
            ranks = ", ".join(f"{k} x{v}" for k, v in self.ranks.get(part, {}).items())
            lines.append(f"  {part}: {n} modules (rank/alpha {ranks})")
        if self.conv_modules:
            lines.append(f"  conv (LoCon) modules: {self.conv_modules}")
        lines.append(f"  unmatched modules: {len(self.unmatched)}" + (f": {', '.join(self.unmatched)}"
                                                                     if self.unmatched else ""))
        if self.unknown_keys:
            lines.append(f"  keys that are not LoRA keys: {', '.join(self.unknown_keys)}")
        if self.non_finite:
            lines.append(f"  DAMAGED: {self.non_finite}")
        for label, text in self.metadata.items():
            lines.append(f"  {label}: {text}")
        return "\n".join(lines)


def _part_of(name: str) -> str:
    for prefix in ("lora_te1_", "lora_te2_", "lora_te_"):
        if name.startswith(prefix):
            return prefix[5:-1]
    return "unet"


def guess_arch(modules: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> tuple[str, str]:
    """Guesses the base architecture of a file from its keys, shapes and metadata.

    Order: lora_te1_/lora_te2_ keys mean SDXL; the cross-attention width (attn2 to_k input) or the text-encoder
    width names SD1/SD2/SDXL at full size; otherwise the metadata (A1111's ``detect_version``); else "unknown".

    Returns:
        (arch, reason).
    """
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl", "lora_te1_/lora_te2_ keys"
    for name, parts in modules.items():
        if name.endswith("attn2_to_k") and parts["lora_down.weight"].dim() >= 2:
            width = int(parts["lora_down.weight"].shape[1])
            if width in _CONTEXT_DIM_ARCH:
                return _CONTEXT_DIM_ARCH[width], f"cross-attention width {width}"
            break
    for name, parts in modules.items():
        if name.startswith("lora_te_") and name.endswith("q_proj"):
            width = int(parts["lora_down.weight"].shape[1])
            if width in _TE_WIDTH_ARCH:
                return _TE_WIDTH_ARCH[width], f"text encoder width {width}"
            break
    version = md.read_base_version(metadata)
    if version != "unknown":
        return version, "metadata"
    if any(n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")) for n in names):
        return "sd1", "diffusers-style UNet names (width unknown)"
    return "unknown", "no telling keys, shapes or metadata"


def inspect_file(path: str | os.PathLike) -> FileReport:
    """Reads a LoRA file and reports on it; never raises for bad contents, only for unreadable files.

    Raises:
        FormatError: the file cannot be read at all (missing, truncated, not safetensors/weights-only).
    """
    state_dict, metadata = load_lora_file(path)
    modules, unknown = group_keys(state_dict)
    arch, reason = guess_arch(modules, metadata)
    report = FileReport(path=os.fspath(path), arch=arch, arch_reason=reason, unknown_keys=unknown,
                        metadata=md.summarize(md.parse_metadata_values(metadata)))
    try:
        check_finite(state_dict)
    except FormatError as exc:
        report.non_finite = str(exc)
    ranks: dict[str, Counter] = {}
    for name, parts in modules.items():
        part = _part_of(name)
        report.counts[part] = report.counts.get(part, 0) + 1
        down = parts["lora_down.weight"]
        alpha = parts.get("alpha")
        alpha_text = f"{float(alpha.float().item()):g}" if alpha is not None else "none"
        ranks.setdefault(part, Counter())[f"{down.shape[0]}/{alpha_text}"] += 1
        if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) or "lora_mid.weight" in parts:
            report.conv_modules += 1
    report.ranks = {p: dict(c.most_common()) for p, c in ranks.items()}
    if arch != "unknown":
        known = set()
        for t in full_size_targets(arch, True):
            known.add(t.name)
            known.update(t.aliases)
        report.unmatched = sorted(n for n in modules if n not in known)
    return report
