"""The A1111 user-metadata sidecar: ``<stem>.json`` beside a LoRA file.

A1111 v1.10.1 (``extensions-builtin/Lora/ui_edit_user_metadata.py`` ``save_lora_user_metadata``; read by
``modules/extra_networks.get_user_metadata``) stores a JSON object with these keys, written with
``json.dump(..., indent=4, ensure_ascii=False)`` in UTF-8:

- ``"description"`` (str), shown on the card;
- ``"sd version"``: ``"SD1"``, ``"SD2"``, ``"SDXL"`` or ``"Unknown"`` (a ``network.SdVersion`` member name); when
  present it *overrides* the version detected from the file's metadata for the card filter, so it is only written on
  request;
- ``"activation text"`` (str): trigger words, appended after ``<lora:name:w>`` when the card is clicked;
- ``"preferred weight"`` (number): the weight put in the tag; 0 means ``opts.extra_networks_default_multiplier``;
- ``"negative text"`` (str), added to the negative prompt;
- ``"notes"`` (str).

Other keys (A1111 or other extensions) are preserved on update. Writes are atomic (temp file + ``os.replace``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError, FormatError
from lib_lora.safetensors_io import atomic_write_bytes

__all__ = [
    "SD_VERSIONS",
    "read_sidecar",
    "sd_version_label",
    "sidecar_path",
    "write_sidecar",
]

#: Values A1111 accepts for ``"sd version"`` (``network.SdVersion.__members__``).
SD_VERSIONS: tuple[str, ...] = ("SD1", "SD2", "SDXL", "Unknown")

_VERSION_ALIASES = {
    "sd1": "SD1",
    "sd_v1": "SD1",
    "sd2": "SD2",
    "sd_v2": "SD2",
    "sdxl": "SDXL",
    "unknown": "Unknown",
}


def sidecar_path(lora_path: str | os.PathLike[str]) -> Path:
    """``<folder>/<stem>.json`` for a LoRA at ``lora_path`` (A1111: ``os.path.splitext(filename)[0] + ".json"``)."""
    base, _ext = os.path.splitext(os.fspath(lora_path))
    return Path(base + ".json")


def sd_version_label(version: str) -> str:
    """Map ``"sd1"``/``"sd2"``/``"sdxl"``/``"unknown"`` (as :func:`lib_lora.metadata.read_base_version` returns) or an
    A1111 name (``"SD1"``, ``"SD2"``, ``"SDXL"``, ``"Unknown"``, any case) to the A1111 ``"sd version"`` string.

    Raises:
        ConfigError: any other value.
    """
    key = str(version).strip().lower()
    if key not in _VERSION_ALIASES:
        raise ConfigError(f"sd version {version!r} is not one of {', '.join(SD_VERSIONS)} (or sd1, sd2, sdxl)")
    return _VERSION_ALIASES[key]


def read_sidecar(lora_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the user-metadata sidecar of the LoRA at ``lora_path``.

    Returns:
        The JSON object as a dict (all keys, known or not); ``{}`` when no sidecar exists.

    Raises:
        FormatError: the sidecar exists but cannot be read, is not valid JSON, or is not a JSON object (the message
            names the file). A1111 would show an error and treat it as empty; we refuse so that an update never
            overwrites a user's file we could not parse.
    """
    path = sidecar_path(lora_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path.name}: cannot read sidecar: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path.name}: sidecar is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path.name}: sidecar holds a JSON {type(data).__name__}, not an object")
    return data


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
        if all(isinstance(v, str) for v in items):
            return ", ".join(v.strip() for v in items if v.strip())
    raise ConfigError(f"sidecar {name!r} must be a str (or a list of str for activation text), got {value!r}")


def write_sidecar(
    lora_path: str | os.PathLike[str],
    *,
    description: str | None = None,
    sd_version: str | None = None,
    activation_text: str | Iterable[str] | None = None,
    preferred_weight: float | None = None,
    negative_text: str | None = None,
    notes: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Create or update the A1111 user-metadata sidecar ``<stem>.json`` of the LoRA at ``lora_path``.

    Only the arguments that are not ``None`` are written; every other key of an existing sidecar (including keys
    this module does not know) is kept as it is.

    Args:
        lora_path: the LoRA file (it need not exist yet); the sidecar goes beside it.
        description: ``"description"``.
        sd_version: ``"sd version"``; ``"sd1"``/``"sd2"``/``"sdxl"`` or ``"SD1"``/``"SD2"``/``"SDXL"``/``"Unknown"``
            (see :func:`sd_version_label`). Overrides A1111's own detection for this file.
        activation_text: ``"activation text"``: trigger words as one string, or a list joined with ``", "``.
        preferred_weight: ``"preferred weight"``, a finite number stored as float; 0 means A1111's default weight.
        negative_text: ``"negative text"``.
        notes: ``"notes"``.
        extra: further keys to set (e.g. for other extensions); they override the named arguments' keys.

    Returns:
        The sidecar path.

    Raises:
        ConfigError: a bad ``sd_version``, a non-finite or non-numeric ``preferred_weight``, a non-str text value, or a
            non-str key in ``extra``.
        FormatError: an existing sidecar cannot be parsed (it is left untouched), or the write fails.
    """
    updates: dict[str, Any] = {}
    if description is not None:
        updates["description"] = _text("description", description)
    if sd_version is not None:
        updates["sd version"] = sd_version_label(sd_version)
    if activation_text is not None:
        updates["activation text"] = _text("activation text", activation_text)
    if preferred_weight is not None:
        if isinstance(preferred_weight, bool) or not isinstance(preferred_weight, numbers.Real):
            raise ConfigError(f"preferred weight {preferred_weight!r} is not a number")
        weight = float(preferred_weight)
        if not math.isfinite(weight):
            raise ConfigError(f"preferred weight {preferred_weight!r} is not finite")
        updates["preferred weight"] = weight
    if negative_text is not None:
        updates["negative text"] = _text("negative text", negative_text)
    if notes is not None:
        updates["notes"] = _text("notes", notes)
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"sidecar key {key!r} is not a str")
        updates[key] = value

    data = read_sidecar(lora_path)
    data.update(updates)
    try:
        text = json.dumps(data, indent=4, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sidecar values are not JSON-serialisable: {exc}") from exc
    return atomic_write_bytes(sidecar_path(lora_path), text.encode("utf-8"))
