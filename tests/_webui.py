"""Test helpers that run the extension's scripts against the WebUI stand-in in ``tests/webui_stub``.

Usage (fixtures are registered in ``tests/conftest.py``, so any test can ask for them):
    def test_x(webui):                      # fresh stand-in: callbacks cleared, new state/opts, tmp folders
        mod = webui.load_script("scripts/lib_lora_api.py")   # like modules/script_loading.load_module
        app = webui.start_app()             # FastAPI app; runs the on_app_started callbacks (+ /internal/progress)
        webui.run_ui_settings()             # runs the on_ui_settings callbacks; then webui.shared.opts.<key>
        webui.shared.cmd_opts.lowvram = True   # flags are plain attributes; webui.lora_dir / webui.data_dir are Paths
    def test_y(webui_sd1): ...              # same, with shared.sd_model = tests/webui_models.make_webui_sd1()
                                            # (webui_sd2 likewise; both skip while tests/webui_models.py is absent)
Outside pytest: ``stub = install_stub(); reset_stub(tmp_dir)`` then ``import modules.shared``.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STUB_DIR = Path(__file__).resolve().parent / "webui_stub"

_model_cache: dict[str, Any] = {}


def install_stub() -> Path:
    """Puts the stand-in first on ``sys.path`` so that ``import modules``, ``import launch`` and ``import networks``
    find it; returns its folder. Raises RuntimeError when another ``modules`` package is already imported."""
    if str(STUB_DIR) not in sys.path:
        sys.path.insert(0, str(STUB_DIR))
    mod = sys.modules.get("modules")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(str(STUB_DIR)):
        raise RuntimeError(f"a different 'modules' package is already imported: {mod!r}")
    return STUB_DIR


@dataclass
class WebUI:
    """A fresh stand-in WebUI for one test: its modules, folders and helpers."""

    root: Path
    data_dir: Path
    lora_dir: Path
    shared: ModuleType
    modules: dict[str, ModuleType] = field(default_factory=dict)

    def __getattr__(self, name):  # webui.call_queue, webui.progress, webui.networks ...
        mods = self.__dict__.get("modules", {})
        if name in mods:
            return mods[name]
        raise AttributeError(name)

    def load_script(self, path: str | Path) -> ModuleType:
        """Loads a script file like the WebUI (see :func:`load_script`)."""
        return load_script(path)

    def run_ui_settings(self) -> None:
        """Runs the registered ``on_ui_settings`` callbacks (the WebUI does it while building the UI)."""
        self.modules["script_callbacks"].ui_settings_callback()

    def ui_tabs(self) -> list:
        """Runs the ``on_ui_tabs`` callbacks; returns their ``(component, title, elem_id)`` tuples."""
        return self.modules["script_callbacks"].ui_tabs_callback()

    def start_app(self, demo=None):
        """Builds a FastAPI app like ``webui.py``: ``progress.setup_progress_api(app)``, then the
        ``on_app_started`` callbacks with ``(demo, app)``; returns the app (use it with ``TestClient``)."""
        from fastapi import FastAPI

        app = FastAPI()
        self.modules["progress"].setup_progress_api(app)
        self.modules["script_callbacks"].app_started_callback(demo, app)
        return app

    def set_model(self, kind: str | None, fresh: bool = False):
        """Sets ``shared.sd_model`` to the tiny WebUI-shaped model "sd1"/"sd2" (built once per process unless
        ``fresh``) or None; runs the ``on_model_loaded`` callbacks; returns the model. Skips the test while
        ``tests/webui_models.py`` (agent A) is missing."""
        model = None if kind is None else webui_model(kind, fresh=fresh)
        self.shared.sd_model = model
        if model is not None:
            self.modules["script_callbacks"].model_loaded_callback(model)
        return model


def webui_model(kind: str, fresh: bool = False):
    """The tiny WebUI-shaped model from ``tests/webui_models.py`` (``make_webui_sd1``/``make_webui_sd2``), cached
    per process; skips the calling test when the builder is not there."""
    if kind in _model_cache and not fresh:
        return _model_cache[kind]
    try:
        webui_models = importlib.import_module("webui_models")
    except ImportError as e:
        pytest.skip(f"tests/webui_models.py not available: {e}")
    builder = getattr(webui_models, f"make_webui_{kind}", None)
    if builder is None:
        pytest.skip(f"tests/webui_models.py has no make_webui_{kind}()")
    model = builder()
    _model_cache[kind] = model
    return model


_STUB_MODULES = ("shared", "shared_init", "shared_state", "options", "script_callbacks", "call_queue", "progress",
                 "devices", "sd_hijack", "deepbooru", "interrogate", "paths", "paths_internal", "script_loading",
                 "errors", "fifo_lock", "util")


def reset_stub(root: Path, **cmd_opts) -> WebUI:
    """Gives the stand-in a fresh state under ``root``: ``--data-dir`` = root/webui, ``--lora-dir`` =
    root/webui/models/Lora (created), CPU device with ``--no-half`` (like the real-WebUI check on this machine),
    flags reset to the WebUI defaults then ``cmd_opts`` applied, new ``opts``/``state``/``queue_lock``, no
    callbacks, no tasks, no model, no networks, counters at 0. Returns the :class:`WebUI`."""
    install_stub()
    root = Path(root)
    data_dir = root / "webui"
    lora_dir = data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)

    from modules import paths_internal, shared_cmd_options

    paths_internal.data_path = str(data_dir)
    paths_internal.models_path = str(data_dir / "models")
    ns = shared_cmd_options.cmd_opts
    defaults = dict(shared_cmd_options.DEFAULTS)
    defaults.update(data_dir=str(data_dir), lora_dir=str(lora_dir),
                    lyco_dir_backcompat=str(data_dir / "models" / "LyCORIS"),
                    embeddings_dir=str(data_dir / "embeddings"), ui_settings_file=str(data_dir / "config.json"),
                    use_cpu=["all"], no_half=True, precision="full")
    defaults.update(cmd_opts)
    vars(ns).clear()
    vars(ns).update(defaults)

    mods = {name: importlib.import_module(f"modules.{name}") for name in _STUB_MODULES}
    shared = mods["shared"]
    for name in ("paths", "shared"):
        mods[name].data_path = str(data_dir)
        mods[name].models_path = str(data_dir / "models")
    mods["shared_init"].initialize()
    shared.sd_model = None
    shared.parallel_processing_allowed = True
    mods["script_callbacks"].clear_callbacks()
    mods["call_queue"].queue_lock = mods["fifo_lock"].FIFOLock()
    progress = mods["progress"]
    progress.current_task = None
    progress.pending_tasks.clear()
    progress.finished_tasks.clear()
    progress.recorded_results.clear()
    mods["sd_hijack"].apply_calls = mods["sd_hijack"].undo_calls = 0
    mods["devices"].torch_gc_calls = 0
    mods["deepbooru"].model = mods["deepbooru"].DeepDanbooru()
    mods["errors"].reported.clear()
    mods["script_loading"].loaded_scripts.clear()

    launch = importlib.import_module("launch")
    launch.installed.clear()
    launch.pip_calls.clear()
    launch.args.skip_install = False
    mods["launch"] = launch

    networks = importlib.import_module("networks")
    for d in (networks.available_networks, networks.available_network_aliases, networks.networks_in_memory,
              networks.available_network_hash_lookup, networks.forbidden_network_aliases,
              networks.loaded_bundle_embeddings):
        d.clear()
    networks.loaded_networks.clear()
    networks.list_calls = 0
    mods["networks"] = networks

    _reset_jobs()
    return WebUI(root=root, data_dir=data_dir, lora_dir=lora_dir, shared=shared, modules=mods)


def _reset_jobs() -> None:
    """Stops and forgets the process-wide training-job singleton of ``lib_lora.webui_jobs`` (if loaded)."""
    jobs_mod = sys.modules.get("lib_lora.webui_jobs")
    reset = getattr(jobs_mod, "reset_jobs_for_tests", None)
    if reset is not None:
        reset()


def load_script(path: str | Path) -> ModuleType:
    """Loads a WebUI script file like ``modules/scripts.py`` ``load_scripts`` does: the extension folder (the
    script's parent's parent) is put first on ``sys.path`` while the file runs, then
    ``modules/script_loading.load_module(path)`` executes it as a module named after the file's basename (e.g.
    "lib_lora_api.py") that is NOT in ``sys.modules``. ``path`` is relative to the repository root or absolute.
    Errors while executing the file propagate."""
    install_stub()
    from modules import script_loading

    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    ext_dir = str(path.resolve().parent.parent)
    sys.path.insert(0, ext_dir)
    try:
        return script_loading.load_module(str(path))
    finally:
        sys.path.remove(ext_dir)


@pytest.fixture
def webui(tmp_path) -> WebUI:
    """A fresh stand-in WebUI (see :func:`reset_stub`) under the test's tmp folder; training jobs are stopped
    and the singleton forgotten afterwards."""
    w = reset_stub(tmp_path)
    yield w
    _reset_jobs()


@pytest.fixture
def webui_sd1(webui) -> WebUI:
    """:func:`webui` with ``shared.sd_model`` = the tiny WebUI-shaped SD1 model."""
    webui.set_model("sd1")
    return webui


@pytest.fixture
def webui_sd2(webui) -> WebUI:
    """:func:`webui` with ``shared.sd_model`` = the tiny WebUI-shaped SD2 (v-prediction) model."""
    webui.set_model("sd2")
    return webui
