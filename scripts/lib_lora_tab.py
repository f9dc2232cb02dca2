"""The "LoRA Trainer" tab of the AUTOMATIC1111 WebUI (v1.10.1): dataset, captions, parameters, run.

Registered with ``script_callbacks.on_ui_tabs`` (``modules/script_callbacks.py``); the callback returns
``[(blocks, "LoRA Trainer", "lib_lora_trainer")]`` and the WebUI renders it as a top-level tab
(``modules/ui.py`` ``create_ui``). This file only adapts the WebUI: widgets and events here, every computation in
``lib_lora.webui_tab`` (pure helpers), ``lib_lora.presets``, the dataset doctor and the tag tools, and the training
job in ``lib_lora.webui_jobs`` (one process-wide job shared with the API routes of ``scripts/lib_lora_api.py``).

Element ids, CSS classes and JS globals start with ``lib_lora_`` (all extensions share one page). Nothing here
touches ``shared.sd_model`` while the UI is built (that would force a model load, see
``modules/shared.py`` ``Shared.sd_model``); the support check runs when the tab refreshes or Start is pressed.
Every callback returns a readable message instead of raising (``lib_lora.webui_tab.guard``).
"""

from __future__ import annotations

import importlib
import sys

import gradio as gr
from modules import script_callbacks, shared

from lib_lora import presets
from lib_lora import webui_tab as wt

TAB_TITLE = "LoRA Trainer"
TAB_ID = "lib_lora_trainer"
ACTIVE_STATES = ("queued", "running", "stopping")


# ---------------------------------------------------------------------------------------------------------------
# WebUI access
# ---------------------------------------------------------------------------------------------------------------


def _make_host():
    """A ``lib_lora.webui_host.WebUIHost`` over the WebUI's modules (``shared``, ``devices``, ``call_queue``,
    ``progress``, ``sd_hijack``, the built-in Lora extension's ``networks``, ``deepbooru``)."""
    from modules import call_queue, devices, progress, sd_hijack

    from lib_lora.webui_host import host_from_webui

    try:
        from modules import deepbooru
    except Exception:  # noqa: BLE001 - DeepBooru is optional (tensorflow-free builds)
        deepbooru = None
    networks = sys.modules.get("networks")
    if networks is None:
        try:
            networks = importlib.import_module("networks")
        except Exception:  # noqa: BLE001 - the built-in Lora extension may be disabled
            networks = None
    return host_from_webui(shared, devices, call_queue, progress, sd_hijack, networks, deepbooru)


def _jobs():
    """The process-wide ``TrainingJobs`` (``lib_lora.webui_jobs.get_jobs``)."""
    from lib_lora.webui_jobs import get_jobs

    return get_jobs(_make_host)


def _lowvram() -> bool:
    return bool(getattr(shared.cmd_opts, "lowvram", False))


def _support_message() -> str | None:
    """Why training cannot run on the loaded model (``lib_lora.webui_model.detect_support``) or with ``--lowvram``,
    or None. Called from callbacks only, never while the UI is built."""
    if _lowvram():
        return wt.support_message(None, True)
    try:
        from lib_lora.webui_model import detect_support
    except Exception:  # noqa: BLE001 - adapter missing: the job reports it on Start
        return None
    try:
        model = _make_host().get_model()
    except Exception as e:  # noqa: BLE001 - no model loaded (yet)
        return f"No model is loaded: {e}"
    return wt.support_message(model, False, detect_support)


def _notice_html(message: str | None) -> str:
    if not message:
        return ""
    import html

    return f'<div class="lib_lora_notice lib_lora_warning">{html.escape(message)}</div>'


def _interrogators() -> list[str]:
    try:
        names = list(_make_host().interrogators())
    except Exception:  # noqa: BLE001 - host not available yet: the usual two
        names = []
    return names or ["BLIP", "DeepBooru"]


def _busy() -> bool:
    try:
        return (_jobs().status() or {}).get("state") in ACTIVE_STATES
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------------------------------------------------
# The tab
# ---------------------------------------------------------------------------------------------------------------


def _widget(spec: wt.FieldSpec):
    """A gradio component for one TrainConfig field (see ``lib_lora.webui_tab.FieldSpec``)."""
    eid = f"lib_lora_cfg_{spec.name}"
    if spec.kind == "bool":
        return gr.Checkbox(label=spec.label, value=spec.default, elem_id=eid)
    if spec.kind in ("choice", "tristate"):
        return gr.Dropdown(label=spec.label, choices=list(spec.choices), value=spec.default, elem_id=eid)
    if spec.kind == "int":
        return gr.Number(label=spec.label, value=spec.default, precision=0, elem_id=eid)
    if spec.kind == "float":
        return gr.Number(label=spec.label, value=spec.default, elem_id=eid)
    if spec.kind == "lines":
        return gr.Textbox(label=spec.label, value=spec.default, lines=3, elem_id=eid)
    return gr.Textbox(label=spec.label, value=spec.default, lines=1, elem_id=eid)


def _df(headers: list[str], eid: str, label: str):
    return gr.Dataframe(headers=headers, value=_rows([], headers), label=label, interactive=False, wrap=True,
                        elem_id=eid, elem_classes=["lib_lora_table"])


def _rows(rows: list, headers: list[str]):
    """Dataframe value (an empty table keeps its headers)."""
    return rows if rows else {"data": [["" for _ in headers]], "headers": headers}


def build_tab():
    """Builds the tab's Blocks; returns ``[(blocks, "LoRA Trainer", "lib_lora_trainer")]``."""
    upd = gr.update
    basic = wt.field_specs("basic")
    advanced = wt.field_specs("advanced")
    names = [s.name for s in basic + advanced]
    widgets: dict[str, gr.components.Component] = {}
    msg_md = lambda s: s  # noqa: E731 - messages go to Markdown components as text

    with gr.Blocks(analytics_enabled=False) as blocks:
        notice = gr.HTML(_notice_html(wt.support_message(None, _lowvram())), elem_id="lib_lora_notice")
        with gr.Tabs(elem_id="lib_lora_tabs"):
            # ---------------------------------------------------------------- Dataset
            with gr.Tab("Dataset", elem_id="lib_lora_tab_dataset"):
                with gr.Row():
                    folder = gr.Textbox(label="Dataset folder (images, or Kohya 10_name sub-folders)",
                                        elem_id="lib_lora_dataset_dir", scale=4)
                    repeats = gr.Number(label="Repeats (plain folder)", value=1, precision=0,
                                        elem_id="lib_lora_repeats", scale=1)
                    kind = gr.Dropdown(label="LoRA kind", choices=["person", "anime", "style", "concept"],
                                       value="concept", elem_id="lib_lora_kind", scale=1)
                    check_btn = gr.Button("Check", variant="primary", elem_id="lib_lora_check", scale=1)
                dataset_md = gr.Markdown("", elem_id="lib_lora_dataset_summary")
                steps_md = gr.Markdown(wt.steps_text(None, 2, None, 1600), elem_id="lib_lora_steps")
                folders_df = _df(wt.SUMMARY_HEADERS, "lib_lora_dataset_folders", "Folders")
                doctor_md = gr.Markdown("", elem_id="lib_lora_doctor_summary")
                findings_df = _df(wt.FINDING_HEADERS, "lib_lora_findings", "Dataset doctor findings")
                thumbs = gr.Gallery(label="Images", columns=8, height="auto", elem_id="lib_lora_thumbnails")
                train_images = gr.State(None)

            # ---------------------------------------------------------------- Captions
            with gr.Tab("Captions", elem_id="lib_lora_tab_captions"):
                with gr.Row():
                    cap_trigger = gr.Textbox(label="Trigger word(s), comma-separated (first one goes first)",
                                             elem_id="lib_lora_caption_trigger", scale=3)
                    interrogator = gr.Dropdown(label="Interrogator", choices=_interrogators(), value=None,
                                               elem_id="lib_lora_interrogator", scale=1)
                    cap_mode = gr.Radio(label="Existing captions", choices=["skip", "overwrite", "prepend",
                                        "append"], value="skip", elem_id="lib_lora_caption_mode", scale=2)
                    caption_btn = gr.Button("Auto-caption", elem_id="lib_lora_autocaption", scale=1)
                caption_md = gr.Markdown("", elem_id="lib_lora_caption_result")
                with gr.Row():
                    with gr.Column():
                        freq_btn = gr.Button("Tag frequency", elem_id="lib_lora_tag_frequency_btn")
                        freq_df = _df(["tag", "captions", "%"], "lib_lora_tag_frequency", "Tag frequency")
                    with gr.Column():
                        with gr.Row():
                            prune_pct = gr.Slider(label="Suggest tags in at least this % of captions", minimum=5,
                                                  maximum=100, step=5, value=50, elem_id="lib_lora_prune_pct")
                            prune_btn = gr.Button("Suggest tags to prune", elem_id="lib_lora_prune_btn")
                        prune_df = _df(["tag", "captions", "%"], "lib_lora_prune", "Tags to delete so that the "
                                       "trigger word learns them")
                with gr.Accordion("Batch edit captions", open=False, elem_id="lib_lora_batch_edit"):
                    with gr.Row():
                        add_tags = gr.Textbox(label="Add tags (comma-separated)", elem_id="lib_lora_add_tags")
                        remove_tags = gr.Textbox(label="Remove tags", elem_id="lib_lora_remove_tags")
                        replace_tags = gr.Textbox(label="Replace (old=new; old2=new2)",
                                                  elem_id="lib_lora_replace_tags")
                    with gr.Row():
                        dedupe = gr.Checkbox(label="Remove duplicate tags", value=True, elem_id="lib_lora_dedupe")
                        dry_run = gr.Checkbox(label="Dry run (show the changes only)", value=True,
                                              elem_id="lib_lora_dry_run")
                        edit_btn = gr.Button("Apply to all captions", elem_id="lib_lora_apply_edit")
                    edit_md = gr.Markdown("", elem_id="lib_lora_edit_result")
                with gr.Accordion("Edit one image's caption", open=True, elem_id="lib_lora_editor"):
                    with gr.Row():
                        pick = gr.Dropdown(label="Image", choices=[], elem_id="lib_lora_pick_image", scale=4)
                        list_btn = gr.Button("List images", elem_id="lib_lora_list_images", scale=1)
                    with gr.Row():
                        pick_img = gr.Image(label="Image", type="filepath", interactive=False, height=360,
                                            elem_id="lib_lora_pick_preview")
                        with gr.Column():
                            pick_caption = gr.Textbox(label="Caption", lines=6, elem_id="lib_lora_pick_caption")
                            save_cap_btn = gr.Button("Save caption", variant="primary",
                                                     elem_id="lib_lora_save_caption")
                            pick_md = gr.Markdown("", elem_id="lib_lora_pick_result")

            # ---------------------------------------------------------------- Parameters
            with gr.Tab("Parameters", elem_id="lib_lora_tab_parameters"):
                with gr.Row():
                    preset = gr.Dropdown(label="Preset", choices=presets.preset_names(),
                                         value=presets.DEFAULT_PRESET, elem_id="lib_lora_preset", scale=3)
                    preset_btn = gr.Button("Apply preset", elem_id="lib_lora_apply_preset", scale=1)
                preset_md = gr.Markdown(presets.PRESETS[presets.DEFAULT_PRESET].description,
                                        elem_id="lib_lora_preset_info")
                with gr.Group(elem_id="lib_lora_basic"):
                    for i in range(0, len(basic), 4):
                        with gr.Row():
                            for spec in basic[i:i + 4]:
                                widgets[spec.name] = _widget(spec)
                # The same live step count as under Dataset, next to the fields that change it (epochs win over
                # max steps; a preset may set epochs).
                steps_params_md = gr.Markdown(wt.steps_text(None, 2, None, 1600), elem_id="lib_lora_steps_params")
                with gr.Accordion("Advanced (every other setting)", open=False, elem_id="lib_lora_advanced"):
                    for i in range(0, len(advanced), 4):
                        with gr.Row():
                            for spec in advanced[i:i + 4]:
                                widgets[spec.name] = _widget(spec)
                with gr.Row():
                    toml_path = gr.Textbox(label="Config file (.toml)", elem_id="lib_lora_toml_path", scale=4)
                    save_toml_btn = gr.Button("Save TOML", elem_id="lib_lora_save_toml", scale=1)
                    load_toml_btn = gr.Button("Load TOML", elem_id="lib_lora_load_toml", scale=1)
                params_md = gr.Markdown("", elem_id="lib_lora_params_result")

            # ---------------------------------------------------------------- Run
            with gr.Tab("Run", elem_id="lib_lora_tab_run"):
                with gr.Row():
                    task_id = gr.Textbox(visible=False, elem_id="lib_lora_task_id")
                    start_btn = gr.Button("Start training", variant="primary", elem_id="lib_lora_start")
                    stop_btn = gr.Button("Stop (saves)", elem_id="lib_lora_stop")
                    save_btn = gr.Button("Save now", elem_id="lib_lora_save_now")
                    refresh_btn = gr.Button("Refresh", elem_id="lib_lora_refresh")
                gr.HTML('<div id="lib_lora_progress" class="lib_lora_progress"></div>')
                run_md = gr.Markdown("", elem_id="lib_lora_run_message")
                status_md = gr.Markdown(wt.status_markdown(None), elem_id="lib_lora_status")
                job_state = gr.Textbox(value="", visible=False, elem_id="lib_lora_state")
                last_key = gr.State("")
                with gr.Row():
                    chart = gr.Image(label="Loss (and smoothed loss) / learning rate", type="pil",
                                     interactive=False, elem_id="lib_lora_loss_chart")
                    samples = gr.Gallery(label="Samples", columns=3, height="auto", elem_id="lib_lora_samples")
                tb_md = gr.Markdown(wt.tensorboard_markdown(None), elem_id="lib_lora_tensorboard")
                ckpt_df = _df(wt.CHECKPOINT_HEADERS, "lib_lora_checkpoints", "This run's checkpoints")
                with gr.Row():
                    runs_btn = gr.Button("List runs in the Lora folder", elem_id="lib_lora_list_runs")
                    run_name = gr.Textbox(label="Run", elem_id="lib_lora_run_name")
                    grid_btn = gr.Button("Send to the checkpoint x weight grid", elem_id="lib_lora_send_grid")
                grid_md = gr.Markdown("", elem_id="lib_lora_grid_hint")
                runs_df = _df(wt.RUN_HEADERS, "lib_lora_runs", "Runs")

        # ------------------------------------------------------------------------ callbacks
        param_components = [widgets[n] for n in names]

        def steps_line(n_images, batch, epochs, steps, accum, every):
            return wt.steps_text(n_images, batch, epochs, steps, accum, every)

        steps_inputs = [train_images, widgets["train_batch_size"], widgets["max_train_epochs"],
                        widgets["max_train_steps"], widgets["gradient_accumulation_steps"],
                        widgets["save_every_n_steps"]]
        for comp in steps_inputs[1:]:
            comp.change(steps_line, steps_inputs, [steps_md], show_progress=False)
            comp.change(steps_line, steps_inputs, [steps_params_md], show_progress=False)
        steps_md.change(lambda text: text, [steps_md], [steps_params_md], show_progress=False)

        def check(path, n_repeats, lora_kind, resolution, triggers, ext, batch, epochs, steps, accum, every):
            summary = wt.dataset_summary(path, n_repeats, ext)
            report = wt.run_doctor(path, lora_kind, resolution, triggers, ext)
            return (summary.text, wt.steps_text(summary.num_train_images, batch, epochs, steps, accum, every),
                    _rows(summary.rows, wt.SUMMARY_HEADERS), wt.doctor_text(report),
                    _rows(wt.finding_rows(report.findings), wt.FINDING_HEADERS), wt.thumbnails(summary.images),
                    summary.num_train_images)

        check_btn.click(
            wt.guard(check, 7, upd, wrap_message=msg_md),
            [folder, repeats, kind, widgets["resolution"], widgets["trigger_words"], widgets["caption_extension"],
             *steps_inputs[1:]],
            [dataset_md, steps_md, folders_df, doctor_md, findings_df, thumbs, train_images],
        )

        # trigger words: one value, shown in Captions and Parameters
        cap_trigger.input(lambda v: v, [cap_trigger], [widgets["trigger_words"]], show_progress=False)
        widgets["trigger_words"].input(lambda v: v, [widgets["trigger_words"]], [cap_trigger], show_progress=False)

        def autocaption(path, kind_name, mode, triggers, ext):
            if not kind_name:
                return "Pick an interrogator first."
            if _busy():
                return "A training job is running; auto-captioning waits until it ends."
            # host.interrogate takes the WebUI's queue lock per image, like the WebUI's own interrogate buttons
            return wt.auto_caption(path, _make_host().interrogate, kind_name, mode, triggers, ext)

        caption_btn.click(wt.guard(autocaption, 1, upd), [folder, interrogator, cap_mode, cap_trigger,
                                                          widgets["caption_extension"]], [caption_md])
        freq_btn.click(wt.guard(lambda p, e: _rows(wt.tag_frequency_rows(p, e), ["tag", "captions", "%"]), 1, upd,
                                wrap_message=lambda m: [[m, "", ""]]),
                       [folder, widgets["caption_extension"]], [freq_df])
        prune_btn.click(wt.guard(lambda p, t, pct, e: _rows(wt.prune_rows(p, t, pct, e), ["tag", "captions", "%"]),
                                 1, upd, wrap_message=lambda m: [[m, "", ""]]),
                        [folder, cap_trigger, prune_pct, widgets["caption_extension"]], [prune_df])
        edit_btn.click(wt.guard(wt.batch_edit, 1, upd),
                       [folder, add_tags, remove_tags, replace_tags, cap_trigger, dedupe, dry_run,
                        widgets["caption_extension"]], [edit_md])

        def list_images(path, ext):
            names_ = wt.caption_list(path, ext)
            return upd(choices=names_, value=names_[0] if names_ else None), f"{len(names_)} image(s)."

        list_btn.click(wt.guard(list_images, 2, upd, message_index=1), [folder, widgets["caption_extension"]],
                       [pick, pick_md])

        def show_image(path, rel, ext):
            if not rel:
                return None, "", ""
            image, caption = wt.read_caption(path, rel, ext)
            return str(image), caption, ""

        pick.change(wt.guard(show_image, 3, upd, message_index=2), [folder, pick, widgets["caption_extension"]],
                    [pick_img, pick_caption, pick_md])

        def save_one(path, rel, caption, ext):
            return f"Saved `{wt.save_caption(path, rel, caption, ext).name}`."

        save_cap_btn.click(wt.guard(save_one, 1, upd), [folder, pick, pick_caption, widgets["caption_extension"]],
                           [pick_md])

        # parameters
        def apply_preset(name):
            values = presets.preset_values(name)
            shown = wt.widgets_from_config(values, [n for n in names if n in values])
            by_name = dict(zip([n for n in names if n in values], shown))
            out = [by_name[n] if n in by_name else upd() for n in names]
            return [presets.PRESETS[name].description, *out]

        preset_btn.click(wt.guard(apply_preset, 1 + len(names), upd), [preset], [preset_md, *param_components])

        def save_toml(path, data_dir, n_repeats, *values):
            cfg = wt.config_from_widgets(["train_data_dir", "repeats", *names], [data_dir, n_repeats, *values],
                                         validate=True)
            return f"Saved `{wt.save_toml(path, cfg)}`."

        save_toml_btn.click(wt.guard(save_toml, 1, upd), [toml_path, folder, repeats, *param_components],
                            [params_md])

        def load_toml(path):
            cfg = wt.load_toml(path)
            values = wt.widgets_from_config(cfg, names)
            return [f"Loaded `{path}`.", cfg.get("train_data_dir", ""), cfg.get("repeats", 1), *values]

        load_toml_btn.click(wt.guard(load_toml, 3 + len(names), upd), [toml_path],
                            [params_md, folder, repeats, *param_components])

        # run
        def start(task, data_dir, n_repeats, *values):
            reason = _support_message()
            if reason:
                return reason
            cfg = wt.config_from_widgets(["train_data_dir", "repeats", *names], [data_dir, n_repeats, *values],
                                         validate=True)
            job_id = task if isinstance(task, str) and task.startswith("task(") else None
            started = _jobs().start(cfg, job_id)
            return f"Training started (job `{started}`)."

        start_btn.click(wt.guard(start, 1, upd), [task_id, folder, repeats, *param_components], [run_md],
                        _js="lib_lora_start")
        stop_btn.click(wt.guard(lambda: "Stopping: the current step finishes, then a checkpoint is saved."
                                if _jobs().stop() else "No training job is running.", 1, upd), [], [run_md])
        save_btn.click(wt.guard(lambda: "A checkpoint is saved after the current step."
                                if _jobs().save_now() else "No training job is running.", 1, upd), [], [run_md])

        def refresh(key):
            status = _jobs().status() or {}
            state = status.get("state") or "idle"
            history = status.get("history") or {}
            new_key = f"{status.get('job_id')}|{status.get('step')}|{state}|{len(status.get('samples') or [])}"
            changed = new_key != key
            chart_value = wt.loss_chart(history) if changed else upd()
            samples_value = list(status.get("samples") or []) if changed else upd()
            runs_value = upd()
            if changed and state in wt.FINAL_STATES and status.get("job_id"):  # a run ended: list its files
                runs_value = _rows(wt.run_rows(_make_host().lora_dir), wt.RUN_HEADERS)
            return (wt.status_markdown(status), chart_value, samples_value, wt.tensorboard_markdown(status),
                    _rows(wt.checkpoint_rows(status), wt.CHECKPOINT_HEADERS), _notice_html(_support_message()),
                    state, new_key, runs_value)

        refresh_btn.click(wt.guard(refresh, 9, upd), [last_key],
                          [status_md, chart, samples, tb_md, ckpt_df, notice, job_state, last_key, runs_df],
                          show_progress=False)

        def list_runs():
            host = _make_host()
            return _rows(wt.run_rows(host.lora_dir), wt.RUN_HEADERS)

        runs_btn.click(wt.guard(list_runs, 1, upd, wrap_message=lambda m: [[m, "", "", ""]]), [], [runs_df])

        def pick_run(evt: gr.SelectData):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            rows = wt.run_rows(_make_host().lora_dir)
            return rows[row][0] if 0 <= row < len(rows) else upd()

        runs_df.select(wt.guard(pick_run, 1, upd), None, [run_name])
        script_list, grid_run = _txt2img_targets.get("script_list"), _txt2img_targets.get(GRID_RUN_ELEM_ID)
        if script_list is not None and grid_run is not None:
            # txt2img's Script dropdown and our grid Script's Run box were seen being built (on_after_component):
            # select the Script and fill in the run, then the JS switches to txt2img.
            def send_to_grid(name):
                name = str(name or "").strip()
                if not name:
                    return wt.grid_hint(name), upd(), upd()
                return wt.grid_hint(name, selected=True), gr.update(value=GRID_SCRIPT_TITLE), gr.update(value=name)

            grid_btn.click(wt.guard(send_to_grid, 3, upd), [run_name], [grid_md, script_list, grid_run],
                           _js="lib_lora_send_to_grid")
        else:
            grid_btn.click(wt.guard(wt.grid_hint, 1, upd), [run_name], [grid_md], _js="lib_lora_send_to_grid")

    return [(blocks, TAB_TITLE, TAB_ID)]


#: The grid Script (scripts/lib_lora_grid.py) as the WebUI names it: its title, and the elem_id of its Run box in
#: txt2img (``modules/scripts.py`` ``Script.elem_id``: ``script_<tab>_<title lower, spaces to _>_<item>``).
GRID_SCRIPT_TITLE = "LoRA checkpoint x weight grid"
GRID_RUN_ELEM_ID = "script_txt2img_lora_checkpoint_x_weight_grid_run"
#: Components of the txt2img tab seen while the UI is built (the txt2img tab is built before extension tabs).
_txt2img_targets: dict = {}


def on_after_component(component, **kwargs):
    """``script_callbacks.on_after_component``: remembers txt2img's Script dropdown (the first ``script_list``;
    img2img's comes later) and the grid Script's Run box, for "Send to grid"."""
    elem_id = kwargs.get("elem_id")
    if elem_id in ("script_list", GRID_RUN_ELEM_ID) and elem_id not in _txt2img_targets:
        _txt2img_targets[elem_id] = component


def on_ui_tabs():
    """``script_callbacks.on_ui_tabs`` callback."""
    return build_tab()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_after_component(on_after_component)
