"""Run by the WebUI (launch_utils.run_extension_installer) on every start and right after installation.

Installs only what is missing from the WebUI's venv. It never upgrades or replaces a package the WebUI pins (torch,
gradio, transformers, open-clip-torch, Pillow, numpy, safetensors, omegaconf, einops): those are checked, not
installed. Quiet when everything is there; downloads no model. Must not import lib_lora.
"""

import launch

# (import or distribution name, pip requirement) for what lib_lora needs beyond the WebUI's own packages.
MISSING_OK_TO_INSTALL = (
    ("tensorboard", "tensorboard"),  # TensorBoard event files of training runs
    ("imagehash", "imagehash"),  # near-duplicate checks of training images
    ("tomli", "tomli; python_version < '3.11'"),  # TOML configs on Python 3.10 (tomllib is 3.11+)
)

# Pinned by the WebUI: reported if absent, never installed here (installing them would fight the WebUI's pins).
WEBUI_PINNED = ("torch", "safetensors", "transformers", "open_clip", "PIL", "numpy", "omegaconf", "einops", "tqdm")


def main() -> None:
    for name, requirement in MISSING_OK_TO_INSTALL:
        if name == "tomli":
            import sys

            if sys.version_info >= (3, 11):
                continue
        if not launch.is_installed(name):
            launch.run_pip(f'install "{requirement}"', f"lib_lora requirement: {requirement}")
    missing = [name for name in WEBUI_PINNED if not launch.is_installed(name)]
    if missing:
        print(f"[lib_lora] the WebUI environment lacks {', '.join(missing)}; the LoRA trainer needs them. "
              "Start the WebUI once without --skip-install so that it installs its own requirements.")


main()
