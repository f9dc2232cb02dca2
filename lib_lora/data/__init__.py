"""The dataset layer: image opening, captions, aspect-ratio buckets, folder scan and training batches.

Modules, one job each:

- :mod:`.images`: safe image opening (sniffed format, full decode, EXIF orientation, alpha on white).
- :mod:`.captions`: pure caption functions with an injected RNG (``keep_tokens``, shuffle, dropouts, triggers).
- :mod:`.buckets`: pure aspect-ratio bucketing and per-epoch batch order.
- :mod:`.dataset`: folder scan and report, item pipeline, latent cache, :class:`TrainDataset`.

The names below are re-exported lazily, so importing ``lib_lora.data`` (or its torch-free modules ``images``,
``captions`` and ``buckets``) does not import torch. Importing has no side effects.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "images": ("ImageInfo", "SkippedFile", "list_image_files", "open_image", "probe_image"),
    "captions": ("CaptionOptions", "count_tags", "process_caption"),
    "buckets": ("BucketAssignment", "BucketSpec", "bucket_info", "make_bucket_resolutions", "select_bucket"),
    "dataset": (
        "Batch",
        "DatasetReport",
        "ImageRecord",
        "ScanOptions",
        "SubsetReport",
        "TrainDataset",
        "scan_dataset",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Imports the defining submodule on first access of a re-exported name (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
