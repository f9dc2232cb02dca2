"""Stand-in for ``modules/script_callbacks.py``: callback registration (``on_*``) and the runners the WebUI calls.

Registration functions take ``(callback, *, name=None)`` like the real ones. Runners call the callbacks in
registration order (the real ``ordered_callbacks`` also applies metadata.ini and user ordering) and, like the real
ones, report an exception through ``errors.report`` and go on with the next callback.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

from modules import errors


def report_exception(c, job):
    """Mirrors ``script_callbacks.report_exception``."""
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    """Mirrors ``script_callbacks.ImageSaveParams``."""

    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class CFGDenoiserParams:
    """Mirrors ``script_callbacks.CFGDenoiserParams``."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class UiTrainTabParams:
    """Mirrors ``script_callbacks.UiTrainTabParams``."""

    def __init__(self, txt2img_preview_params):
        self.txt2img_preview_params = txt2img_preview_params


class ImageGridLoopParams:
    """Mirrors ``script_callbacks.ImageGridLoopParams``."""

    def __init__(self, imgs, cols, rows):
        self.imgs = imgs
        self.cols = cols
        self.rows = rows


@dataclasses.dataclass
class ScriptCallback:
    """Mirrors ``script_callbacks.ScriptCallback``: the registering file, the function, a unique name."""

    script: str
    callback: Any
    name: str = "unnamed"


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    """Mirrors ``script_callbacks.add_callback``: the registering file is found on the call stack; the name is
    "<extension>/<file>/<category>[/<name>]" made unique with "-N" (extension = the file's grandparent folder
    name, the real code asks ``modules.extensions``)."""
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'
    extension_name = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(filename)))) or 'base'
    callback_name = f"{extension_name}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f'/{name}'
    unique_callback_name = callback_name
    for index in range(1000):
        if not any(x.name == unique_callback_name for x in callbacks):
            break
        unique_callback_name = f'{callback_name}-{index + 1}'
    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    """Mirrors ``script_callbacks.ordered_callbacks``: here simply registration order."""
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get('callbacks_' + category, [])
    return list(unordered_callbacks)


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_image_saved=[],
    callbacks_image_saved=[],
    callbacks_extra_noise=[],
    callbacks_cfg_denoiser=[],
    callbacks_cfg_denoised=[],
    callbacks_cfg_after_cfg=[],
    callbacks_before_component=[],
    callbacks_after_component=[],
    callbacks_image_grid=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_on_reload=[],
    callbacks_list_optimizers=[],
    callbacks_list_unets=[],
    callbacks_before_token_counter=[],
)


def clear_callbacks():
    """Mirrors ``script_callbacks.clear_callbacks`` (run by ``scripts.load_scripts`` before loading scripts)."""
    for callback_list in callback_map.values():
        callback_list.clear()


def _run(category, *args):
    for c in ordered_callbacks(category):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, f'{category}_callback')


def app_started_callback(demo, app):
    """Mirrors ``script_callbacks.app_started_callback``: calls each ``fn(demo, app)`` (gr.Blocks, FastAPI)."""
    _run('app_started', demo, app)


def app_reload_callback():
    """Mirrors ``script_callbacks.app_reload_callback``."""
    _run('on_reload')


def model_loaded_callback(sd_model):
    """Mirrors ``script_callbacks.model_loaded_callback``: calls each ``fn(sd_model)``."""
    _run('model_loaded', sd_model)


def ui_tabs_callback():
    """Mirrors ``script_callbacks.ui_tabs_callback``: concatenates the ``(component, title, elem_id)`` lists."""
    res = []
    for c in ordered_callbacks('ui_tabs'):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_train_tabs_callback(params: UiTrainTabParams):
    """Mirrors ``script_callbacks.ui_train_tabs_callback``."""
    _run('ui_train_tabs', params)


def ui_settings_callback():
    """Mirrors ``script_callbacks.ui_settings_callback`` (run inside ``ui.create_ui``)."""
    _run('ui_settings')


def before_image_saved_callback(params: ImageSaveParams):
    """Mirrors ``script_callbacks.before_image_saved_callback``."""
    _run('before_image_saved', params)


def image_saved_callback(params: ImageSaveParams):
    """Mirrors ``script_callbacks.image_saved_callback``."""
    _run('image_saved', params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    """Mirrors ``script_callbacks.cfg_denoiser_callback``."""
    _run('cfg_denoiser', params)


def before_component_callback(component, **kwargs):
    """Mirrors ``script_callbacks.before_component_callback``."""
    for c in ordered_callbacks('before_component'):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, 'before_component_callback')


def after_component_callback(component, **kwargs):
    """Mirrors ``script_callbacks.after_component_callback``."""
    for c in ordered_callbacks('after_component'):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, 'after_component_callback')


def image_grid_callback(params: ImageGridLoopParams):
    """Mirrors ``script_callbacks.image_grid_callback``."""
    _run('image_grid', params)


def infotext_pasted_callback(infotext: str, params: dict[str, Any]):
    """Mirrors ``script_callbacks.infotext_pasted_callback``."""
    _run('infotext_pasted', infotext, params)


def script_unloaded_callback():
    """Mirrors ``script_callbacks.script_unloaded_callback``: runs in reverse order."""
    for c in reversed(ordered_callbacks('script_unloaded')):
        try:
            c.callback()
        except Exception:
            report_exception(c, 'script_unloaded')


def before_ui_callback():
    """Mirrors ``script_callbacks.before_ui_callback``: runs in reverse order, like the real one."""
    for c in reversed(ordered_callbacks('before_ui')):
        try:
            c.callback()
        except Exception:
            report_exception(c, 'before_ui')


def remove_callbacks_for_function(callback_func):
    """Mirrors ``script_callbacks.remove_callbacks_for_function``."""
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(cb)


def on_app_started(callback, *, name=None):
    """Mirrors ``script_callbacks.on_app_started``: ``callback(demo: gr.Blocks | None, app: FastAPI)``."""
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_before_reload(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_reload``."""
    add_callback(callback_map['callbacks_on_reload'], callback, name=name, category='on_reload')


def on_model_loaded(callback, *, name=None):
    """Mirrors ``script_callbacks.on_model_loaded``: ``callback(sd_model)``."""
    add_callback(callback_map['callbacks_model_loaded'], callback, name=name, category='model_loaded')


def on_ui_tabs(callback, *, name=None):
    """Mirrors ``script_callbacks.on_ui_tabs``: ``callback()`` returns None or [(component, title, elem_id)]."""
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_train_tabs(callback, *, name=None):
    """Mirrors ``script_callbacks.on_ui_train_tabs``."""
    add_callback(callback_map['callbacks_ui_train_tabs'], callback, name=name, category='ui_train_tabs')


def on_ui_settings(callback, *, name=None):
    """Mirrors ``script_callbacks.on_ui_settings``: ``callback()`` adds settings with ``shared.opts.add_option``."""
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


def on_before_image_saved(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_image_saved``."""
    add_callback(callback_map['callbacks_before_image_saved'], callback, name=name, category='before_image_saved')


def on_image_saved(callback, *, name=None):
    """Mirrors ``script_callbacks.on_image_saved``."""
    add_callback(callback_map['callbacks_image_saved'], callback, name=name, category='image_saved')


def on_cfg_denoiser(callback, *, name=None):
    """Mirrors ``script_callbacks.on_cfg_denoiser``."""
    add_callback(callback_map['callbacks_cfg_denoiser'], callback, name=name, category='cfg_denoiser')


def on_before_component(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_component``."""
    add_callback(callback_map['callbacks_before_component'], callback, name=name, category='before_component')


def on_after_component(callback, *, name=None):
    """Mirrors ``script_callbacks.on_after_component``."""
    add_callback(callback_map['callbacks_after_component'], callback, name=name, category='after_component')


def on_image_grid(callback, *, name=None):
    """Mirrors ``script_callbacks.on_image_grid``."""
    add_callback(callback_map['callbacks_image_grid'], callback, name=name, category='image_grid')


def on_infotext_pasted(callback, *, name=None):
    """Mirrors ``script_callbacks.on_infotext_pasted``."""
    add_callback(callback_map['callbacks_infotext_pasted'], callback, name=name, category='infotext_pasted')


def on_script_unloaded(callback, *, name=None):
    """Mirrors ``script_callbacks.on_script_unloaded``."""
    add_callback(callback_map['callbacks_script_unloaded'], callback, name=name, category='script_unloaded')


def on_before_ui(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_ui`` (runs after all scripts are loaded, before the UI is built)."""
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')
