"""install.py against the stand-in ``launch`` (tests/webui_stub/launch.py): only missing packages, never the
WebUI's pinned ones, every pip call constrained to the installed versions, silent on the second start."""

from __future__ import annotations

import runpy
import sys

from _webui import REPO_ROOT

INSTALL = str(REPO_ROOT / "install.py")


def run_install(capsys) -> str:
    runpy.run_path(INSTALL, run_name="__main__")
    return capsys.readouterr().out


def test_installs_only_what_is_missing_then_is_silent(webui, capsys):
    launch = webui.launch
    launch.installed.update(tensorboard=False, imagehash=True, tomli=True)
    seen = {}
    real_run_pip = launch.run_pip

    def run_pip(command, desc=None, live=False):
        path = command.split('--constraint "', 1)[1].rstrip('"')
        seen[command] = open(path, encoding="utf-8").read()
        launch.installed["tensorboard"] = True  # pip did its job
        return real_run_pip(command, desc, live)

    launch.run_pip = run_pip
    try:
        out = run_install(capsys)
        assert [c for c, _ in launch.pip_calls] == [c for c in seen]
        assert len(launch.pip_calls) == 1 and launch.pip_calls[0][0].startswith('install "tensorboard" --constraint')
        constraints = next(iter(seen.values()))
        import importlib.metadata

        assert f"torch=={importlib.metadata.version('torch')}" in constraints.splitlines()
        assert out == ""
        launch.pip_calls.clear()
        assert run_install(capsys) == "" and launch.pip_calls == []  # second start: nothing to do, nothing said
    finally:
        launch.run_pip = real_run_pip


def test_never_installs_pinned_packages(webui, capsys):
    launch = webui.launch
    for name in ("torch", "PIL", "transformers", "open_clip", "safetensors"):
        launch.installed[name] = False
    out = run_install(capsys)
    pinned = ("torch", "pillow", "transformers", "open-clip", "open_clip", "safetensors", "gradio", "numpy")
    for command, _ in launch.pip_calls:
        requirement = command.split('"')[1].lower()
        assert not requirement.startswith(pinned)
    assert "lacks torch, safetensors, transformers, open_clip, PIL" in out


def test_tomli_only_on_python_310(webui, capsys, monkeypatch):
    launch = webui.launch
    launch.installed.update(tensorboard=True, imagehash=True, tomli=False)
    monkeypatch.setattr(sys, "version_info", (3, 10, 12, "final", 0))
    run_install(capsys)
    assert [c.split('"')[1] for c, _ in launch.pip_calls] == ["tomli"]
    launch.pip_calls.clear()
    monkeypatch.setattr(sys, "version_info", (3, 11, 7, "final", 0))
    run_install(capsys)
    assert launch.pip_calls == []


def test_skip_install_and_pip_failure_do_not_break_the_start(webui, capsys):
    launch = webui.launch
    launch.installed.update(tensorboard=False, imagehash=False, tomli=True)
    launch.args.skip_install = True
    assert run_install(capsys) == "" and launch.pip_calls == []
    launch.args.skip_install = False

    def failing(command, desc=None, live=False):
        raise RuntimeError("Couldn't install tensorboard.\nCommand: pip ...")

    real = launch.run_pip
    launch.run_pip = failing
    try:
        out = run_install(capsys)
    finally:
        launch.run_pip = real
    assert "could not install tensorboard" in out and "could not install imagehash" in out


def test_install_py_downloads_no_model_and_does_not_import_lib_lora():
    text = open(INSTALL, encoding="utf-8").read()
    for needle in ("import lib_lora", "from lib_lora", "hf_hub_download", "urlretrieve", "requests."):
        assert needle not in text
