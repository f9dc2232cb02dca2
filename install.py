"""Run by the WebUI (``modules/launch_utils.py`` ``run_extension_installer``) on every start and right after the
extension is installed, as ``python install.py`` with the WebUI root on ``PYTHONPATH`` (so ``import launch`` works).

Installs only what is missing from the WebUI's venv (``launch.is_installed`` / ``launch.run_pip``, which is a no-op
under ``--skip-install``). It never upgrades or replaces a package the WebUI pins: those are checked, not installed,
and every pip call carries a constraints file holding the versions installed now (so pip fails rather than move
torch, gradio, transformers, open-clip-torch, Pillow, numpy, safetensors ...). Silent when nothing is missing;
downloads no model; lib_lora itself is not imported here.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile

import launch

# (name for launch.is_installed, pip requirement, what it is for): lib_lora's needs beyond the WebUI's own packages.
OPTIONAL = (
    ("tensorboard", "tensorboard", "TensorBoard event files of training runs"),
    ("imagehash", "imagehash", "near-duplicate checks of training images"),
)
# TOML configs on Python 3.10 (tomllib is in the standard library from 3.11).
TOMLI = ("tomli", "tomli", "TOML training configs on Python 3.10")

# Import names the WebUI installs and pins (requirements_versions.txt): reported when absent, never installed here.
WEBUI_PINNED = ("torch", "safetensors", "transformers", "open_clip", "PIL", "numpy", "omegaconf", "einops", "tqdm")

# Distributions whose installed version is frozen in the constraints file of every pip call made here.
FROZEN_DISTRIBUTIONS = ("torch", "torchvision", "xformers", "gradio", "gradio_client", "fastapi", "pydantic",
                        "transformers", "tokenizers", "open-clip-torch", "Pillow", "numpy", "safetensors",
                        "omegaconf", "einops", "protobuf", "httpx", "accelerate", "huggingface-hub")


def needed() -> list[tuple[str, str, str]]:
    """The (name, requirement, purpose) entries of this extension's packages that are not installed."""
    wanted = list(OPTIONAL) + ([TOMLI] if sys.version_info < (3, 11) else [])
    return [entry for entry in wanted if not launch.is_installed(entry[0])]


def constraints_text() -> str:
    """pip constraints ``name==version`` for every installed distribution of :data:`FROZEN_DISTRIBUTIONS`."""
    lines = []
    for name in FROZEN_DISTRIBUTIONS:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def main() -> None:
    missing = needed()
    if missing:
        fd, constraints = tempfile.mkstemp(prefix="lib_lora_constraints_", suffix=".txt")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(constraints_text())
            for _name, requirement, purpose in missing:
                try:
                    launch.run_pip(f'install "{requirement}" --constraint "{constraints}"',
                                   f"lib_lora requirement: {requirement} ({purpose})")
                except Exception as exc:  # noqa: BLE001 - the WebUI must start anyway
                    print(f"[lib_lora] could not install {requirement} ({purpose}); the trainer works without it. "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        finally:
            try:
                os.remove(constraints)
            except OSError:
                pass
    absent = [name for name in WEBUI_PINNED if not launch.is_installed(name)]
    if absent:
        print(f"[lib_lora] the WebUI environment lacks {', '.join(absent)}; the LoRA trainer needs them. Start the "
              "WebUI once without --skip-install so that it installs its own requirements.")


main()
