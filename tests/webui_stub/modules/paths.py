"""Stand-in for ``modules/paths.py``: re-exports the folders of ``modules/paths_internal.py``."""

from modules.paths_internal import data_path, models_path, script_path  # noqa: F401
