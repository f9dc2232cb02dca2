"""Stand-in for ``modules/shared.py``: the WebUI's process-wide objects.

``cmd_opts``, ``opts``, ``state``, ``sd_model`` (a plain settable attribute here; the real one is a lazy property
that loads the checkpoint on first access), ``interrogator``, ``options_section``/``OptionInfo``, ``walk_files``.
"""

from __future__ import annotations

from modules import options, shared_cmd_options, util
from modules.paths_internal import data_path, extensions_dir, models_path, script_path  # noqa: F401

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

parallel_processing_allowed = True
hide_dirs = {"visible": True}
demo = None
device = None
hypernetworks = {}
loaded_hypernetworks = []
state = None
interrogator = None
face_restorers = []
options_templates: dict = None
opts: options.Options = None
restricted_opts: set = None
sd_model = None
settings_components: dict = None
tab_names = []
sd_upscalers = []
mem_mon = None

options_section = options.options_section
OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML

natural_sort_key = util.natural_sort_key
walk_files = util.walk_files


def listfiles(dirname):
    """Mirrors ``modules/util.py`` ``listfiles`` (exported by shared): sorted files of ``dirname``, no hidden."""
    import os

    filenames = [os.path.join(dirname, x) for x in sorted(os.listdir(dirname), key=natural_sort_key)
                 if not x.startswith(".")]
    return [file for file in filenames if os.path.isfile(file)]


def _init():
    from modules import shared_init

    shared_init.initialize()


_init()
