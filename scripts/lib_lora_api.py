"""WebUI glue: the LoRA trainer's settings and HTTP API routes (see lib_lora/webui_api.py for the routes).

Loaded by the WebUI as a script module (``modules/script_loading.load_module``). It only adapts the WebUI: it passes
the WebUI's modules to ``lib_lora.webui_host.host_from_webui`` and registers callbacks; the logic is in lib_lora.
"""

from __future__ import annotations

import sys

from modules import script_callbacks, shared

from lib_lora import webui_host


def make_host():
    """The WebUI seen by lib_lora (modules imported at call time, so Reload UI gets the current objects)."""
    from modules import call_queue, devices, progress, sd_hijack

    try:
        from modules import deepbooru
    except Exception:  # noqa: BLE001 - DeepBooru's dependencies may be missing; BLIP stays available
        deepbooru = None
    networks = sys.modules.get("networks")  # the built-in Lora extension's module, when it is enabled
    if networks is None:
        try:
            import networks
        except ImportError:
            networks = None
    return webui_host.host_from_webui(shared, devices, call_queue, progress, sd_hijack, networks=networks,
                                      deepbooru=deepbooru)


def on_ui_settings():
    """Settings > LoRA Trainer: allowed dataset roots, output sub-folder, TensorBoard on/off, the grid's CLIP file."""
    section = webui_host.SETTINGS_SECTION
    shared.opts.add_option(webui_host.OPT_DATASET_ROOTS, shared.OptionInfo(
        webui_host.DEFAULT_DATASET_ROOTS, "Allowed dataset folders for the API (besides the WebUI data folder)",
        section=section).info("one folder per line or separated by ';'"))
    shared.opts.add_option(webui_host.OPT_OUTPUT_SUBDIR, shared.OptionInfo(
        webui_host.DEFAULT_OUTPUT_SUBDIR, "Sub-folder of the Lora folder for trained LoRAs (one folder per run)",
        section=section))
    shared.opts.add_option(webui_host.OPT_TENSORBOARD, shared.OptionInfo(
        webui_host.DEFAULT_TENSORBOARD, "Show the TensorBoard command for training logs", section=section))
    shared.opts.add_option(webui_host.OPT_CLIP_MODEL, shared.OptionInfo(
        "", "CLIP model for scoring grid cells when the interrogator's CLIP is not loaded", section=section).info(
        "local file as ARCH:FILE, e.g. ViT-L-14:/models/clip/ViT-L-14.pt; never downloaded"))


def on_app_started(demo, app):
    """Adds /lora-trainer/v1/* to the WebUI's FastAPI app, with the WebUI API's --api-auth check; only when the
    WebUI's own API is on (--api or --nowebui), like /sdapi/v1/*."""
    from lib_lora import webui_api, webui_jobs

    cmd_opts = shared.cmd_opts
    if not (getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False)):
        print("[lib_lora] API routes /lora-trainer/v1/* not added: start the WebUI with --api to use them")
        return
    jobs = webui_jobs.get_jobs(make_host)
    webui_api.register_routes(app, jobs, dependencies=webui_api.basic_auth_dependency(cmd_opts.api_auth))


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
