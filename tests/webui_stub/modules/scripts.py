"""Stand-in for ``modules/scripts.py``: the ``Script`` base class of txt2img/img2img scripts, ``AlwaysVisible``,
``scripts_data`` (every loaded script class as a ``ScriptClassData``) and ``basedir()``.

Only what extensions use: the real ``ScriptRunner`` (UI building, arg slicing) is not here; tests call
``Script.run(p, *args)`` directly, as ``ScriptRunner.run`` does with the script's slice of the UI values.
"""

from __future__ import annotations

import re
from collections import namedtuple

from modules import paths

AlwaysVisible = object()

ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

#: Mirrors ``scripts.scripts_data``: filled by ``load_scripts`` (tests append to it with :func:`register`).
scripts_data: list = []
postprocessing_scripts_data: list = []

current_basedir = paths.script_path


def basedir():
    """Mirrors ``scripts.basedir``: the folder of the extension whose script is being loaded."""
    return current_basedir


class Script:
    """Mirrors ``modules/scripts.py`` ``Script`` (attributes and the methods a selectable script overrides)."""

    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        """The title in the Script dropdown."""
        raise NotImplementedError()

    def ui(self, is_img2img):
        """Creates the gradio components; their values arrive in ``run(p, *args)``."""
        pass

    def show(self, is_img2img):
        """False (hidden), True (in the dropdown) or ``AlwaysVisible``."""
        return True

    def run(self, p, *args):
        """Does the processing when selected; returns a ``Processed`` (or None: the WebUI then processes p)."""
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def describe(self):
        return ""

    def elem_id(self, item_id):
        """Mirrors ``Script.elem_id``: ``script_[txt2img_|img2img_]<title>_<item_id>``."""
        need_tabname = self.show(True) == self.show(False)
        tabkind = 'img2img' if self.is_img2img else 'txt2img'
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'


def register(module, path, base=None):
    """Test helper (not in the real module): appends every ``Script`` subclass of a loaded script module to
    ``scripts_data`` as ``load_scripts``' ``register_scripts_from_module`` does."""
    import inspect

    for script_class in module.__dict__.values():
        if inspect.isclass(script_class) and issubclass(script_class, Script) and script_class is not Script:
            scripts_data.append(ScriptClassData(script_class, str(path), base or current_basedir, module))
