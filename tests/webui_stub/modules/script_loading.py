"""Stand-in for ``modules/script_loading.py``: how the WebUI executes a script file."""

from __future__ import annotations

import importlib.util
import os

loaded_scripts = {}


def load_module(path):
    """Mirrors ``modules/script_loading.py`` ``load_module``: executes the file as a module named after its
    basename (e.g. "lib_lora_api.py"), NOT put in ``sys.modules``; returns the module. Errors propagate."""
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module
