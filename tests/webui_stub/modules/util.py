"""Stand-in for ``modules/util.py``: file listing helpers used through ``modules.shared``."""

from __future__ import annotations

import os
import re


def natural_sort_key(s, regex=re.compile("([0-9]+)")):
    """Mirrors ``modules/util.py`` ``natural_sort_key``: "a2" sorts before "a10"."""
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def walk_files(path, allowed_extensions=None):
    """Mirrors ``modules/util.py`` ``walk_files``: yields the files under ``path`` (recursive, following links,
    natural order), only those whose lower-cased extension is in ``allowed_extensions`` (e.g. [".safetensors"]);
    files in hidden folders are skipped unless ``opts.list_hidden_files``. A missing ``path`` yields nothing."""
    from modules import shared

    if not os.path.exists(path):
        return
    if allowed_extensions is not None:
        allowed_extensions = set(allowed_extensions)
    items = sorted(os.walk(path, followlinks=True), key=lambda x: natural_sort_key(x[0]))
    for root, _, files in items:
        for filename in sorted(files, key=natural_sort_key):
            if allowed_extensions is not None:
                _, ext = os.path.splitext(filename)
                if ext.lower() not in allowed_extensions:
                    continue
            if not shared.opts.list_hidden_files and ("/." in root or "\\." in root):
                continue
            yield os.path.join(root, filename)
