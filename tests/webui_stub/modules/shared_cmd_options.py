"""Stand-in for ``modules/shared_cmd_options.py`` + ``modules/cmd_args.py``: the parsed command line.

``cmd_opts`` is one ``argparse.Namespace`` for the whole process (the real one is parsed once at start); tests
change its attributes in place (``tests/_webui.py`` resets them to :data:`DEFAULTS` per test).
"""

from __future__ import annotations

import argparse
import os

from modules.paths_internal import data_path, models_path

#: The flags the extension reads, with the WebUI's defaults (``modules/cmd_args.py``; ``--lora-dir`` and
#: ``--lyco-dir-backcompat`` come from ``extensions-builtin/Lora/preload.py``).
DEFAULTS = {
    "data_dir": data_path,
    "models_dir": None,
    "lora_dir": os.path.join(models_path, "Lora"),
    "lyco_dir_backcompat": os.path.join(models_path, "LyCORIS"),
    "embeddings_dir": os.path.join(data_path, "embeddings"),
    "hypernetwork_dir": os.path.join(models_path, "hypernetworks"),
    "lowvram": False,
    "medvram": False,
    "medvram_sdxl": False,
    "lowram": False,
    "no_half": False,
    "no_half_vae": False,
    "precision": "autocast",
    "use_cpu": [],
    "api": False,
    "api_auth": None,
    "api_log": False,
    "nowebui": False,
    "skip_install": False,
    "freeze_settings": False,
    "freeze_settings_in_sections": None,
    "freeze_specific_settings": None,
    "hide_ui_dir_config": False,
    "listen": False,
    "share": False,
    "enable_insecure_extension_access": False,
    "disable_extension_access": False,
    "use_ipex": False,
    "ui_settings_file": os.path.join(data_path, "config.json"),
}

parser = argparse.ArgumentParser()
cmd_opts = argparse.Namespace(**DEFAULTS)
