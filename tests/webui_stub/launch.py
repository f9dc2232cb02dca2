"""Stand-in for the WebUI's ``launch.py`` (which re-exports ``modules/launch_utils.py``), for ``install.py``.

``is_installed`` answers from :data:`installed` when a name is listed there (tests control it), else from the real
environment like the WebUI; ``run_pip`` records the call in :data:`pip_calls` instead of running pip.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util

args = argparse.Namespace(skip_install=False)

#: name -> True/False overrides for is_installed (tests set them).
installed: dict[str, bool] = {}
#: (command, desc) of each run_pip call.
pip_calls: list[tuple[str, str | None]] = []


def is_installed(package):
    """Mirrors ``launch_utils.is_installed``: ``importlib.metadata.distribution(package)``, else
    ``importlib.util.find_spec(package)`` (a module name); False when neither finds it."""
    if package in installed:
        return installed[package]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=False):
    """Mirrors ``launch_utils.run_pip``: would run ``python -m pip <command> --prefer-binary``; a no-op under
    ``--skip-install``. The stand-in records ``(command, desc)`` and marks the requirement's name installed."""
    if args.skip_install:
        return
    pip_calls.append((command, desc))
    return ""
