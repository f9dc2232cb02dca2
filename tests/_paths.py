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
