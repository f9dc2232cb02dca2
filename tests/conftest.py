"""Shared pytest fixtures.

Keep this file small: fixtures used by more than one test module only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _paths import SHARED_DATA

#: The shared WebUI test checkpoint and its reference LoRA files (see its README.md).
WEBUI_TINY_SD1 = SHARED_DATA / "webui-tiny-sd1"


@pytest.fixture(scope="module")
def torch_single_thread():
    """Runs a module's tests with one intra-op torch thread, then restores the previous count.

    The tiny models' ops are so small that thread start-up dominates; on a shared 2-core machine one thread is
    several times faster and gives the same numbers run after run.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reference_lora_dir() -> Path:
    """The folder of the shared reference LoRA files for the tiny SD1 checkpoint; skips when it is absent."""
    folder = WEBUI_TINY_SD1 / "lora"
    if not (folder / "test_lora.safetensors").is_file():
        pytest.skip(f"shared reference LoRA files not found under {folder}")
    return folder


# WebUI stand-in fixtures (tests/_webui.py): webui, webui_sd1, webui_sd2.
from _webui import webui, webui_sd1, webui_sd2  # noqa: E402, F401
