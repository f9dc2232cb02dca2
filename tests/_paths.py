"""Where the shared test inputs live (``shared/data/``: real photos and the tiny WebUI checkpoint).

CI runs a fresh clone with a copy of ``shared/`` beside it (``<clone>/../shared``); developers have it at the same
place relative to their checkout. ``LIB_LORA_SHARED_DIR`` overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    candidates = [os.environ.get("LIB_LORA_SHARED_DIR"), REPO_ROOT.parent / "shared", REPO_ROOT / "shared",
                  Path("/work/shared")]
    for c in candidates:
        if c and (Path(c) / "data").is_dir():
            return Path(c)
    return REPO_ROOT.parent / "shared"  # absent: tests that need it skip


SHARED = _find_shared()
SHARED_DATA = SHARED / "data"
REFERENCE_LORA_DIR = SHARED_DATA / "webui-tiny-sd1" / "lora"  # reference Kohya files for the tiny SD1 checkpoint
_SHARED_DOG = SHARED_DATA / "dreambooth" / "dog"
_BUNDLED_DOG = REPO_ROOT / "lib_lora" / "demo_data" / "dog"


def dog_photos() -> list[Path]:
    """The five real dog photos (the shared DreamBooth copy, else the ones bundled with the demo); skips the
    calling test when neither is there."""
    import pytest

    for folder in (_SHARED_DOG, _BUNDLED_DOG):
        photos = sorted(folder.glob("*.jpg"))
        if len(photos) >= 5:
            return photos
    pytest.skip(f"dog photos not found in {_SHARED_DOG} or {_BUNDLED_DOG}")
