"""Stand-in for ``extensions-builtin/Lora/network.py``: ``NetworkOnDisk`` and ``SdVersion`` (a file in the list)."""

from __future__ import annotations

import enum
import json
import os
import struct


class SdVersion(enum.Enum):
    """Mirrors ``network.SdVersion``."""

    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


def read_metadata_from_safetensors(filename):
    """Mirrors ``modules/sd_models.py`` ``read_metadata_from_safetensors``: the ``__metadata__`` dict of the JSON
    header; values that start with "{" are JSON-decoded when they parse. Raises OSError for an unreadable file."""
    with open(filename, "rb") as file:
        metadata_len = struct.unpack("<Q", file.read(8))[0]
        json_obj = json.loads(file.read(metadata_len).decode("utf-8"))
    res = {}
    for k, v in json_obj.get("__metadata__", {}).items():
        if isinstance(v, str) and v[0:1] == "{":
            try:
                v = json.loads(v)
            except Exception:
                pass
        res[k] = v
    return res


class NetworkOnDisk:
    """Mirrors ``network.NetworkOnDisk``: ``name`` (file stem), ``filename``, ``metadata`` (safetensors only),
    ``alias`` (``ss_output_name`` or the name), ``sd_version`` from ``detect_version``."""

    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if self.is_safetensors:
            self.metadata = read_metadata_from_safetensors(filename)
        self.mtime = os.path.getmtime(filename)
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None
        self.sd_version = self.detect_version()

    def detect_version(self):
        """Mirrors ``NetworkOnDisk.detect_version``: "sdxl_" base version -> SDXL, ``ss_v2 == "True"`` -> SD2,
        any metadata -> SD1, none -> Unknown."""
        if str(self.metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
            return SdVersion.SDXL
        elif str(self.metadata.get("ss_v2", "")) == "True":
            return SdVersion.SD2
        elif len(self.metadata):
            return SdVersion.SD1
        return SdVersion.Unknown
