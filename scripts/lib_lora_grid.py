"""WebUI Script "LoRA checkpoint x weight grid" (txt2img and img2img) and two X/Y/Z plot axes.

The grid: columns = the checkpoints of a training run in the Lora folder (or the S/R values), rows = weights,
the same seed in every cell (one grid per seed), an optional no-LoRA baseline row, optional CLIP scores. Cell
planning, labels, S/R substitution and the size guard are lib_lora's (``lib_lora.grid``, ``lib_lora.webui_grid``,
``lib_lora.scoring``); this file only calls the WebUI, as ``scripts/xyz_grid.py`` does: a ``copy(p)`` per cell
through ``processing.process_images``, ``images.image_grid`` + ``images.draw_grid_annotations``, saved with
``images.save_image`` when ``opts.grid_save``; returns ``Processed(..., index_of_first_image=<number of grids>)``
(1 for one seed on one page).

X/Y/Z axes "LoRA checkpoint" (file stems of the Lora folder) and "LoRA weight" (float, so ranges such as
``0.1-1.0 [10]`` work) are appended to the CURRENT ``xyz_grid`` module's ``axis_options`` in ``on_before_ui``.
"""

from __future__ import annotations

import os
from copy import copy

from modules import images, processing, script_callbacks, scripts, shared

from lib_lora.errors import ConfigError, FormatError, LoraError
from lib_lora.grid import DEFAULT_PLACEHOLDERS, check_grid_size, format_weight, plan_grid
from lib_lora.runs import parse_checkpoint_stem
from lib_lora.webui_grid import (
    annotation_band,
    apply_checkpoint_axis,
    apply_weight_axis,
    cell_problem,
    checkpoint_problem,
    find_lora_files,
    find_run_by_name,
    infotext_params,
    list_runs,
    marked_cell,
    prompt_names_run,
    score_overlay,
)

TITLE = "LoRA checkpoint x weight grid"
MODES = ("Plain (adds <lora:FILE:w>)", "Prompt S/R (placeholders)")
PARTS = ("both", "te", "unet")
CLIP_SETTING = "lib_lora_clip_model_path"


def _lora_dir() -> str:
    return getattr(shared.cmd_opts, "lora_dir", "") or ""


def _trigger_words(run) -> str | None:
    from lib_lora.sidecar import read_sidecar

    for f in reversed(run.files if run else []):
        try:
            text = read_sidecar(f.path).get("activation text")
        except FormatError:
            continue
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def _seeds(text, p) -> list[int]:
    if not str(text or "").strip():
        return [int(p.seed)]
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(processing.get_fixed_seed(int(item)))
        except ValueError as exc:
            raise ConfigError(f"seed {item!r} is not an integer") from exc
    return out or [int(p.seed)]


def _scorer(messages: list[str]):
    """The WebUI interrogator's CLIP when it is loaded, else the open_clip file of the settings; None + a message
    when neither can be used."""
    from lib_lora.scoring import ClipScorer, ScoringUnavailable, load_clip

    interrogator = getattr(shared, "interrogator", None)
    if getattr(interrogator, "clip_model", None) is not None:
        return ClipScorer.from_model(interrogator.clip_model, interrogator.clip_preprocess,
                                     name="WebUI interrogator CLIP")
    spec = shared.opts.data.get(CLIP_SETTING, "") if shared.opts is not None else ""
    if not spec:
        messages.append(f"No scores: no CLIP model is loaded and the setting {CLIP_SETTING} (ARCH:FILE of an "
                        "open_clip model) is empty.")
        return None
    try:
        from modules import devices

        device = str(getattr(devices, "device_interrogate", None) or "cpu")
        return load_clip(spec, device=device)
    except ScoringUnavailable as exc:
        messages.append(f"No scores: {exc}")
        return None


class Script(scripts.Script):
    """The grid Script; see the module docstring."""

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        import gradio as gr

        runs = list(list_runs(_lora_dir()))
        with gr.Row():
            # Custom values: a run trained after the UI was built can be typed (or pasted from the trainer tab's
            # "Send to grid") before the list is refreshed.
            run = gr.Dropdown(label="Run", choices=runs, value=runs[0] if runs else None, allow_custom_value=True,
                              elem_id=self.elem_id("run"))
            refresh = gr.Button(value="\U0001f504", elem_id=self.elem_id("refresh_runs"), scale=0, min_width=40)
            checkpoints = gr.Dropdown(label="Checkpoints (empty = all)", choices=[], multiselect=True,
                                      elem_id=self.elem_id("checkpoints"))
        with gr.Row():
            weights = gr.Textbox(label="Weights", value="0.1-1.0 [10]", elem_id=self.elem_id("weights"))
            seeds = gr.Textbox(label="Seeds (empty = the seed above)", value="", elem_id=self.elem_id("seeds"))
        with gr.Row():
            mode = gr.Radio(label="Prompt", choices=list(MODES), value=MODES[0], elem_id=self.elem_id("mode"))
            sr_values = gr.Textbox(label="S/R checkpoint values (NUM,000001,000002,...)", value="",
                                   elem_id=self.elem_id("sr_values"))
            placeholders = gr.Textbox(label="S/R placeholders (checkpoint, weight)",
                                      value=",".join(DEFAULT_PLACEHOLDERS), elem_id=self.elem_id("placeholders"))
        with gr.Row():
            baseline = gr.Checkbox(label="Baseline row without LoRA", value=False, elem_id=self.elem_id("baseline"))
            part = gr.Radio(label="Weight applies to", choices=list(PARTS), value="both", elem_id=self.elem_id("part"))
            other_weight = gr.Number(label="Other part's weight", value=1.0, elem_id=self.elem_id("other_weight"))
            add_trigger = gr.Checkbox(label="Add trigger words from the sidecar", value=True,
                                      elem_id=self.elem_id("add_trigger"))
            draw_legend = gr.Checkbox(label="Labels", value=True, elem_id=self.elem_id("draw_legend"))
        with gr.Row():
            score = gr.Checkbox(label="Score cells with CLIP", value=False, elem_id=self.elem_id("score"))
            apply = gr.Checkbox(label="Apply best (sidecar preferred weight + preview)", value=False,
                                elem_id=self.elem_id("apply"))

        def stems(run_name):
            r = list_runs(_lora_dir()).get(run_name)
            return gr.update(choices=r.stems if r else [], value=[])

        def refresh_runs(current):
            names = list(list_runs(_lora_dir()))
            return gr.update(choices=names, value=current if current in names else (names[-1] if names else None))

        run.change(stems, inputs=[run], outputs=[checkpoints])
        refresh.click(refresh_runs, inputs=[run], outputs=[run])
        return [run, checkpoints, weights, mode, sr_values, placeholders, baseline, part, other_weight, seeds,
                add_trigger, draw_legend, score, apply]

    def run(self, p, run_name=None, checkpoints=None, weights="0.1-1.0 [10]", mode=MODES[0], sr_values="",
            placeholders=",".join(DEFAULT_PLACEHOLDERS), baseline=False, part="both", other_weight=1.0, seeds="",
            add_trigger=True, draw_legend=True, score=False, apply=False):
        state = shared.state
        processing.fix_seed(p)
        sr = mode == MODES[1] or str(mode).lower().startswith(("prompt s/r", "sr"))
        run = find_run_by_name(list_runs(_lora_dir()), run_name) if run_name else None
        if sr and run is not None and not prompt_names_run(run, p.prompt, sr_values):
            run = None  # the S/R prompt names other files: the Run dropdown's trigger words don't belong to them
        files = find_lora_files(_lora_dir())
        seed_list = _seeds(seeds, p)
        trigger = _trigger_words(run) if add_trigger else None
        phs = tuple(x.strip() for x in str(placeholders or "").split(",") if x.strip()) or DEFAULT_PLACEHOLDERS
        if sr:
            plan = plan_grid(sr_values, weights, p.prompt, "sr", seeds=seed_list, baseline=baseline,
                             trigger_words=trigger, negative_prompt=p.negative_prompt, placeholders=phs)
            col_files = {}
        else:
            if run is None:
                raise ConfigError(f"no run {run_name!r} in the Lora folder {_lora_dir()!r}")
            by_stem = {f.stem: f.path for f in run.files}
            wanted = list(checkpoints) if checkpoints else list(by_stem)
            # A requested checkpoint that is not (or no longer) there gets a marked column, not silence.
            paths = [by_stem.get(stem) or run.folder / f"{stem}.safetensors" for stem in wanted]
            plan = plan_grid([str(x) for x in paths], weights, p.prompt, "plain", seeds=seed_list,
                             baseline=baseline, trigger_words=trigger, negative_prompt=p.negative_prompt,
                             part=part, other_weight=float(other_weight))
            col_files = {stem: by_stem.get(stem) for stem in wanted}

        messages: list[str] = []
        fmt = str(getattr(shared.opts, "grid_format", "png"))
        label_w, label_h = annotation_band(p.width, p.height, plan.col_labels, plan.row_labels) if draw_legend \
            else (0, 0)
        max_mp = getattr(shared.opts, "img_max_size_mp", 200)  # megapixels, as xyz_grid's limit
        decision = check_grid_size(plan.cols, plan.rows, p.width, p.height, label_w=label_w, label_h=label_h,
                                   fmt=fmt, max_pixels=int(max_mp * 1_000_000))
        if decision.message:
            print(f"[lib_lora grid] {decision.message}")
            messages.append(decision.message)

        state.job_count = len({c.key for c in plan.cells})
        done: dict = {}  # cell key -> (image, infotext)
        made: dict = {}  # (row, col, page) -> image
        marks: dict = {}
        infos: dict = {}
        stopped = False
        for cell in plan.cells:
            pos = (cell.row, cell.col, cell.page)
            if state.interrupted or getattr(state, "stopping_generation", False):
                stopped = True
                break
            if cell.baseline:
                problem = None
            elif sr:
                problem, _ = cell_problem(cell.prompt, files)
            else:
                problem = checkpoint_problem(col_files.get(cell.checkpoint))
            if problem:
                marks[pos] = problem
                continue
            if cell.key not in done:
                state.job = f"{len(done) + 1} out of {state.job_count}"
                pc = copy(p)
                pc.styles = list(p.styles or [])
                pc.prompt, pc.negative_prompt, pc.seed = cell.prompt, cell.negative_prompt, cell.seed
                pc.n_iter, pc.batch_size, pc.do_not_save_grid = 1, 1, True
                pc.extra_generation_params = copy(p.extra_generation_params)
                try:
                    res = processing.process_images(pc)
                except Exception as exc:  # noqa: BLE001 - like xyz_grid: report, mark the cell, go on
                    from modules import errors

                    errors.display(exc, "generating image for the LoRA grid")
                    res = processing.Processed(p, [], cell.seed, "")
                if getattr(state, "skipped", False):
                    state.skipped = False
                done[cell.key] = (res.images[0], res.infotexts[0]) if res.images else (None, None)
            image, info = done[cell.key]
            if image is None:
                marks[pos] = "not made"
            else:
                made[pos], infos[pos] = image, info
        if stopped:
            messages.append(f"Stopped: {len(made)} of {len(plan.cells)} cells were made.")

        scores = None
        if score and made:
            scores = self._score(plan, made, run, trigger, col_files, apply, messages)

        first = next((c for c in plan.cells if not c.baseline), plan.cells[0])
        pg = copy(p)
        pg.extra_generation_params = dict(p.extra_generation_params or {})
        pg.extra_generation_params["Script"] = TITLE
        pg.extra_generation_params.update(infotext_params(
            run.name if run else "", "S/R" if sr else "plain", list(plan.checkpoints), list(plan.weights),
            list(plan.seeds), plan.baseline, part))
        if scores is not None and scores.best is not None:
            b = scores.best
            pg.extra_generation_params["LoRA grid best"] = f"{b.checkpoint} at {b.weight:g} ({b.combined:.3f})"
        if messages:
            # p.comments reach the UI only; the infotext reaches API clients and the saved PNG as well.
            pg.extra_generation_params["LoRA grid note"] = " | ".join(m.replace("\n", " ") for m in messages)
        grids, grid_infos, grid_seeds, grid_prompts = [], [], [], []
        for page, seed in enumerate(plan.seeds):
            grid_info = processing.create_infotext(pg, [first.prompt], [seed], [p.subseed],
                                                   all_negative_prompts=[first.negative_prompt])
            for sheet in decision.pages:
                cells_img = []
                for r in sheet.rows:
                    for c in sheet.cols:
                        im = made.get((r, c, page))
                        if im is None:
                            im = marked_cell(p.width, p.height, marks.get((r, c, page), "not made"))
                        elif scores is not None:
                            g = next((g for g in scores.groups if (g.row, g.col) == (r, c)), None)
                            if g is not None and g.combined is not None:
                                im = score_overlay(im, g.combined, g.best)
                        cells_img.append(im)
                grid = images.image_grid(cells_img, rows=len(sheet.rows))
                if draw_legend:
                    hor = [[images.GridAnnotation(plan.col_labels[c])] for c in sheet.cols]
                    ver = [[images.GridAnnotation(plan.row_labels[r])] for r in sheet.rows]
                    grid = images.draw_grid_annotations(grid, p.width, p.height, hor, ver)
                if getattr(shared.opts, "grid_save", True):
                    images.save_image(grid, p.outpath_grids, "lora_grid", seed, first.prompt, decision.fmt,
                                      info=grid_info, grid=True, p=p)
                grids.append(grid)
                grid_infos.append(grid_info)
                grid_seeds.append(seed)
                grid_prompts.append(first.prompt)

        order = sorted(made, key=lambda k: (k[2], k[0], k[1]))
        cell_cells = {(c.row, c.col, c.page): c for c in plan.cells}
        if scores is not None:
            messages.append(scores.table_markdown())
        # Processed takes its comments from p.comments (a dict used as an ordered set; p.comment(text) does the
        # same), not from its ``comments`` argument.
        if not isinstance(p.comments, dict):
            p.comments = {}
        for m in messages:
            p.comments[m] = 1
            print(f"[lib_lora grid] {m}")
        comments = "\n".join(messages)
        return processing.Processed(
            p, grids + [made[k] for k in order], seed_list[0], grid_infos[0],
            all_prompts=grid_prompts + [cell_cells[k].prompt for k in order],
            all_negative_prompts=[first.negative_prompt] * len(grids) + [cell_cells[k].negative_prompt for k in order],
            all_seeds=grid_seeds + [cell_cells[k].seed for k in order],
            infotexts=grid_infos + [infos[k] for k in order], index_of_first_image=len(grids), comments=comments)

    @staticmethod
    def _score(plan, made, run, trigger, col_files, apply, messages):
        """CLIP scores of the made cells (None + a message when no CLIP can be used); "apply" writes the winner."""
        from lib_lora.scoring import apply_best, find_training_images, load_training_images, score_grid

        scorer = _scorer(messages)
        if scorer is None:
            return None
        try:
            paths = find_training_images(run_folder=run.folder, run_name=run.name) if run else []
        except LoraError as exc:
            messages.append(str(exc))
            paths = []
        train, problems = load_training_images(paths)
        messages.extend(problems)
        cells = [(c, made.get((c.row, c.col, c.page))) for c in plan.cells]
        scores = score_grid(scorer, cells, train, trigger_words=trigger)
        messages.extend(scores.messages)
        if apply and scores.best is not None:
            try:
                out = apply_best(scores, col_files, cells)
                messages.append(f"Applied: preferred weight {format_weight(out['weight'])} -> {out['sidecar']}, "
                                f"preview -> {out['preview']}")
                messages.extend(out["messages"])
            except LoraError as exc:
                messages.append(f"Not applied: {exc}")
        return scores


# ----------------------------------------------------------------------------------------------------------------------
# X/Y/Z plot axes
# ----------------------------------------------------------------------------------------------------------------------

AXIS_CHECKPOINT = "LoRA checkpoint"
AXIS_WEIGHT = "LoRA weight"


def _checkpoint_choices() -> list[str]:
    """File stems in the Lora folder, runs together in training order."""
    out = []
    for run in list_runs(_lora_dir()).values():
        out.extend(run.stems)
    return sorted(set(out), key=lambda s: (parse_checkpoint_stem(s)[0].casefold(), out.index(s)))


def _confirm_checkpoints(p, xs):
    files = find_lora_files(_lora_dir())
    for x in xs:
        stem = os.path.splitext(os.path.basename(str(x)))[0] if str(x).lower().endswith(
            (".safetensors", ".pt", ".ckpt")) else os.path.basename(str(x))
        if stem not in files:
            raise RuntimeError(f"Unknown LoRA checkpoint: {x}")


def _find_xyz_module():
    for data in scripts.scripts_data:
        if os.path.basename(data.path) == "xyz_grid.py":
            return data.module
    return None


def register_xyz_axes() -> bool:
    """Appends the two axes to the current xyz_grid module's ``axis_options`` (replacing ones of the same label
    from an earlier load); False when the X/Y/Z plot is not loaded."""
    xyz = _find_xyz_module()
    if xyz is None:
        return False
    xyz.axis_options[:] = [o for o in xyz.axis_options if o.label not in (AXIS_CHECKPOINT, AXIS_WEIGHT)]
    xyz.axis_options.append(xyz.AxisOption(AXIS_CHECKPOINT, str, apply_checkpoint_axis, format_value=xyz.format_value,
                                           confirm=_confirm_checkpoints, cost=0.5, choices=_checkpoint_choices))
    xyz.axis_options.append(xyz.AxisOption(AXIS_WEIGHT, float, apply_weight_axis))
    return True


script_callbacks.on_before_ui(register_xyz_axes)
