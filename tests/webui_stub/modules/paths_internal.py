"""Stand-in for ``modules/paths_internal.py``: the WebUI's folders.

``data_path`` (``--data-dir``) and ``models_path`` are plain module attributes; ``tests/_webui.py`` points them at a
temporary folder per test (the real ones are computed once at import from the command line).
"""

from __future__ import annotations

import os
import tempfile

script_path = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
data_path = os.path.join(tempfile.gettempdir(), "lib_lora_webui_stub")
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
default_output_dir = os.path.join(data_path, "outputs")
