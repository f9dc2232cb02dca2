"""lib_lora must run without the WebUI: no submodule may import the WebUI's ``modules`` package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "lib_lora"

_CHECK = r"""
import importlib, json, pkgutil, sys
import lib_lora
names = ["lib_lora"]
for info in pkgutil.walk_packages(lib_lora.__path__, "lib_lora."):
    if info.name == "lib_lora.__main__":
        continue  # runs the CLI on import
    importlib.import_module(info.name)
    names.append(info.name)
webui = sorted(m for m in sys.modules if m == "modules" or m.startswith("modules."))
print(json.dumps({"imported": names, "webui": webui}))
"""


def test_no_submodule_imports_webui_modules():
    """Importing every lib_lora submodule (walked with pkgutil, in a fresh interpreter) leaves no ``modules`` or
    ``modules.*`` entry in sys.modules."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {f"lib_lora.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert expected <= set(result["imported"]), "some top-level submodules were not imported"
    assert result["webui"] == []


def test_no_source_line_imports_webui_modules():
    """No line of lib_lora's sources imports ``modules`` (``import modules...`` / ``from modules... import``)."""
    pattern = re.compile(r"^\s*(from\s+modules(\.|\s)|import\s+modules(\.|\s|$|,))")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert offenders == []
