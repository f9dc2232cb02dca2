"""Stand-in for ``modules/options.py``: settings (``OptionInfo``, ``Options``, ``options_section``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from modules.shared_cmd_options import cmd_opts


class OptionInfo:
    """Mirrors ``modules/options.py`` ``OptionInfo``: one setting (default, label, gradio component and its
    arguments, ``section`` = (id, label)); ``link``/``js``/``info``/``html``/``needs_restart``/``needs_reload_ui``
    append HTML to the label and return ``self``."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html):
        self.comment_after += html
        return self

    def needs_restart(self):
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class OptionHTML(OptionInfo):
    """Mirrors ``modules/options.py`` ``OptionHTML``: a text-only entry on the settings page (not saved)."""

    def __init__(self, text):
        super().__init__(str(text).strip(), label='')
        self.do_not_save = True


def options_section(section_identifier, options_dict):
    """Mirrors ``modules/options.py`` ``options_section``: stamps ``section`` (and ``category_id`` for a 3-tuple)
    onto every OptionInfo of ``options_dict`` and returns the dict."""
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


options_builtin_fields = {"data_labels", "data", "restricted_opts", "typemap"}


class Options:
    """Mirrors ``modules/options.py`` ``Options``: ``opts.<key>`` reads ``data`` then the default; reading an
    unregistered key raises AttributeError; ``add_option(key, info)`` registers; ``set(key, value)`` runs
    ``onchange``. Setting freezes (``--freeze-settings...``) are only checked for ``--freeze-settings``."""

    typemap = {int: float}

    def __init__(self, data_labels: dict[str, OptionInfo], restricted_opts):
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in self.data_labels.items() if not v.do_not_save}
        self.restricted_opts = restricted_opts

    def __setattr__(self, key, value):
        if key in options_builtin_fields:
            return super().__setattr__(key, value)
        if self.data is not None and (key in self.data or key in self.data_labels):
            assert not cmd_opts.freeze_settings, "changing settings is disabled"
            info = self.data_labels.get(key, None)
            if info is not None and info.do_not_save:
                return
            self.data[key] = value
            return
        return super().__setattr__(key, value)

    def __getattr__(self, item):
        if item in options_builtin_fields:
            return super().__getattribute__(item)
        if self.data is not None and item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def set(self, key, value, is_api=False, run_callbacks=True):
        """Mirrors ``Options.set``: returns True if the value changed (then ``onchange`` ran)."""
        oldval = self.data.get(key, None)
        if oldval == value:
            return False
        option = self.data_labels[key]
        if option.do_not_save or (is_api and option.restrict_api):
            return False
        setattr(self, key, value)
        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception:
                setattr(self, key, oldval)
                return False
        return True

    def get_default(self, key):
        """Mirrors ``Options.get_default``: the registered default, or None."""
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def add_option(self, key, info):
        """Mirrors ``Options.add_option``: registers ``info`` under ``key`` and keeps a value already loaded."""
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def onchange(self, key, func, call=True):
        """Mirrors ``Options.onchange``: sets the key's change callback and calls it once when ``call``."""
        self.data_labels.get(key).onchange = func
        if call:
            func()

    def save(self, filename):
        """Mirrors ``Options.save``: writes ``data`` as JSON."""
        with open(filename, "w", encoding="utf8") as file:
            json.dump(self.data, file, indent=4, ensure_ascii=False)

    def load(self, filename):
        """Mirrors ``Options.load``: reads ``data`` from JSON (missing file = empty)."""
        try:
            with open(filename, encoding="utf8") as file:
                self.data = json.load(file)
        except FileNotFoundError:
            self.data = {}

    def dumpjson(self):
        """Mirrors ``Options.dumpjson`` (without the comments/categories extras): all values as JSON."""
        return json.dumps({k: self.data.get(k, v.default) for k, v in self.data_labels.items()})


@dataclass
class OptionsCategory:
    id: str
    label: str


class OptionsCategories:
    """Mirrors ``modules/options.py`` ``OptionsCategories``."""

    def __init__(self):
        self.mapping = {}

    def register_category(self, category_id, label):
        if category_id in self.mapping:
            return category_id
        self.mapping[category_id] = OptionsCategory(category_id, label)


categories = OptionsCategories()
