"""The grid Script ``scripts/lib_lora_grid.py`` against the WebUI stand-in (``tests/webui_stub``; its
``process_images`` draws a deterministic image from prompt, seed and LoRA file instead of running a model), and
the two X/Y/Z plot axes it registers."""

from __future__ import annotations

import numpy as np
import pytest
from _webui import STUB_DIR, load_script
from PIL import Image

RUN = "立绘 style v1"
STEMS = [f"{RUN}-000001", f"{RUN}-000002", RUN]


def _fake_lora(path, token: int) -> None:
    """A small valid safetensors file (header + one tensor) whose bytes differ per token."""
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.full((2, 2), float(token))}, str(path))


@pytest.fixture
def grid(webui, tmp_path):
    """(webui, script module, Script instance, p): a run of three checkpoints in the Lora folder's sub-folder."""
    from modules import processing

    run_dir = webui.lora_dir / "lib_lora" / RUN
    run_dir.mkdir(parents=True)
    for i, stem in enumerate(STEMS):
        _fake_lora(run_dir / f"{stem}.safetensors", i)
    (run_dir / f"{RUN}.json").write_text('{"activation text": "sks dog"}', encoding="utf-8")
    processing.process_calls.clear()
    mod = load_script("scripts/lib_lora_grid.py")
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a photo, outdoors", negative_prompt="blurry", seed=7,
                                                    width=64, height=64, steps=4, sampler_name="Euler a",
                                                    outpath_samples=str(tmp_path / "samples"),
                                                    outpath_grids=str(tmp_path / "grids"))
    webui.shared.state.begin(job="test")
    return webui, mod, mod.Script(), p


def _cells_of(proc):
    return proc.images[proc.index_of_first_image:]


def test_three_by_three_labelled_grid(grid, tmp_path):
    webui, mod, script, p = grid
    from modules import processing

    assert script.title() == "LoRA checkpoint x weight grid" and script.show(False) and script.show(True)
    proc = script.run(p, f"lib_lora/{RUN}", [], "0.2,0.5,1")
    assert isinstance(proc, processing.Processed) and proc.index_of_first_image == 1
    cells = _cells_of(proc)
    assert len(cells) == 9 and len(processing.process_calls) == 9
    assert {c.seed for c in processing.process_calls} == {7}  # one seed for every cell
    prompts = [c.prompt for c in processing.process_calls]
    assert prompts[0] == f"sks dog, a photo, outdoors <lora:{STEMS[0]}:0.2>"  # trigger added, file stem named
    assert len(set(prompts)) == 9
    assert all(c.negative_prompt == "blurry" for c in processing.process_calls)
    g = proc.images[0]
    assert g.width > 3 * 64 and g.height > 3 * 64  # labels on both axes
    pad_left, pad_top = g.width - 3 * 64, g.height - 3 * 64
    arr = np.asarray(g)
    # rows = weights (0.2, 0.5, 1), columns = checkpoints; the cells follow the grid, row by row
    for r in range(3):
        for c in range(3):
            x, y = pad_left + c * 64, pad_top + r * 64
            assert np.array_equal(arr[y:y + 64, x:x + 64], np.asarray(cells[r * 3 + c]))
    info = proc.infotexts[0]
    assert f"LoRA grid run: {RUN}" in info and "LoRA grid weights: \"0.2, 0.5, 1\"" in info
    assert "Script: LoRA checkpoint x weight grid" in info and STEMS[1] in info
    saved = list((tmp_path / "grids").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("lora_grid-0000")
    assert len(list((tmp_path / "samples").iterdir())) == 9  # cells saved like WebUI samples


def test_baseline_row_checkpoint_subset_and_seeds(grid):
    webui, mod, script, p = grid
    from modules import processing

    proc = script.run(p, f"lib_lora/{RUN}", [STEMS[0], STEMS[2]], "0.5,1", baseline=True, seeds="3, 4",
                      add_trigger=False)
    assert proc.index_of_first_image == 2  # one grid per seed
    calls = processing.process_calls
    assert len(calls) == 2 * (1 + 2 * 2)  # per seed: one baseline image (same for every column) + 4 LoRA cells
    assert [c.prompt for c in calls if "<lora:" not in c.prompt] == ["a photo, outdoors"] * 2
    assert {c.seed for c in calls} == {3, 4}
    assert len(_cells_of(proc)) == 2 * 3 * 2  # baseline cells repeat the image per column


def test_sr_mode_placeholder_first_is_not_rendered(grid):
    webui, mod, script, p = grid
    from modules import processing

    p.prompt = f"a photo <lora:{RUN}-NUM:STRENGTH>, sks dog"
    proc = script.run(p, None, [], "STRENGTH, 0.1, 0.15", mode=mod.MODES[1], sr_values="NUM,000001,000002")
    prompts = [c.prompt for c in processing.process_calls]
    assert len(prompts) == 4 and not any("NUM" in x or "STRENGTH" in x for x in prompts)
    assert f"a photo <lora:{RUN}-000002:0.15>, sks dog" in prompts
    assert f"a photo <lora:{RUN}-000001:0.1>, sks dog" in prompts
    assert proc.index_of_first_image == 1 and len(_cells_of(proc)) == 4


def test_te_unet_part_weights(grid):
    webui, mod, script, p = grid
    from modules import processing

    # the bare run name (what the trainer tab's "Send to grid" gives) finds lib_lora/<name>
    script.run(p, RUN, [RUN], "0.5", part="unet", other_weight=0.25, add_trigger=False)
    (call,) = processing.process_calls
    assert call.prompt.endswith(f"<lora:{RUN}:te=0.25:unet=0.5>")


def test_missing_and_unreadable_files_are_marked(grid):
    webui, mod, script, p = grid
    from modules import processing

    run_dir = webui.lora_dir / "lib_lora" / RUN
    (run_dir / f"{STEMS[1]}.safetensors").write_bytes(b"\xff" * 40)  # unreadable header
    mod_runs = mod.list_runs(mod._lora_dir())
    assert f"lib_lora/{RUN}" in mod_runs
    # a checkpoint selected in the UI whose file disappeared before Generate
    (run_dir / f"{STEMS[0]}.safetensors").unlink()
    run_obj = mod_runs[f"lib_lora/{RUN}"]
    orig = mod.list_runs
    mod.list_runs = lambda d: {f"lib_lora/{RUN}": run_obj}
    try:
        proc = script.run(p, f"lib_lora/{RUN}", [], "0.5,1")
    finally:
        mod.list_runs = orig
    assert len(processing.process_calls) == 2  # only the final file's column was generated
    g = np.asarray(proc.images[0]).astype(int)
    pad_left, pad_top = g.shape[1] - 3 * 64, g.shape[0] - 2 * 64
    for col in (0, 1):  # grey marked cells
        cell = g[pad_top + 40:pad_top + 60, pad_left + col * 64 + 40:pad_left + col * 64 + 50]
        assert np.abs(cell - 0xBB).max() <= 0x33
    assert len(_cells_of(proc)) == 2


def test_interrupt_returns_partial_grid(grid):
    webui, mod, script, p = grid
    from modules import processing

    state = webui.shared.state
    real = processing.process_images

    def interrupting(pc):
        res = real(pc)
        if len(processing.process_calls) == 4:
            state.interrupt()
        return res

    processing.process_images = interrupting
    try:
        proc = script.run(p, f"lib_lora/{RUN}", [], "0.2,0.5,1")
    finally:
        processing.process_images = real
    assert len(processing.process_calls) == 4
    assert proc.index_of_first_image == 1 and len(_cells_of(proc)) == 4
    assert proc.images[0].width > 3 * 64  # still the whole 3 x 3 layout, unmade cells marked
    assert "Stopped: 4 of 9" in proc.comments


def test_scoring_marks_best_and_applies(grid, tmp_path):
    webui, mod, script, p = grid
    open_clip = pytest.importorskip("open_clip")
    import json

    import torch

    cfg = tmp_path / "lib-lora-tiny-clip.json"
    cfg.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                               "patch_size": 8, "head_width": 16},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                            "layers": 1}}))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("lib-lora-tiny-clip")

    class Interrogator:
        clip_model = model.eval()
        clip_preprocess = preprocess

    webui.shared.interrogator = Interrogator()
    proc = script.run(p, f"lib_lora/{RUN}", [], "0.5,1", score=True, apply=True)
    assert "| checkpoint | weight | fidelity" in proc.comments and "best:" in proc.comments
    assert "Applied: preferred weight" in proc.comments
    assert "no training images found" in proc.comments
    previews = list((webui.lora_dir / "lib_lora" / RUN).glob("*.preview.png"))
    assert len(previews) == 1

    # no interrogator CLIP and no settings file: a clear message, grid without scores
    webui.shared.interrogator = None
    proc = script.run(p, f"lib_lora/{RUN}", [], "0.5", score=True)
    assert "No scores" in proc.comments and "lib_lora_clip_model_path" in proc.comments
    assert proc.index_of_first_image == 1
    # API clients see no comments (the WebUI's Processed.js() has none): the note is in the grid's infotext.
    assert "LoRA grid note:" in proc.infotexts[0] and "No scores" in proc.infotexts[0]


def test_size_guard_splits_pages(grid):
    webui, mod, script, p = grid
    webui.shared.opts.data["img_max_size_mp"] = 0.03  # 30,000 px: a few 64 px cells per page
    proc = script.run(p, f"lib_lora/{RUN}", [], "0.1-1.0 [10]", add_trigger=False)
    assert proc.index_of_first_image > 1  # split into pages
    assert "split into" in proc.comments
    assert len(_cells_of(proc)) == 30


def test_xyz_axes_registered_with_current_axis_option(grid):
    webui, mod, script, p = grid
    from modules import processing, scripts

    path = STUB_DIR / "builtin_scripts" / "xyz_grid.py"
    stale = load_script(path)
    xyz = load_script(path)  # Reload UI: a new module object; only its AxisOption class is current
    assert stale.AxisOption is not xyz.AxisOption
    scripts.scripts_data.clear()
    scripts.register(xyz, path)
    webui.modules["script_callbacks"].before_ui_callback()
    by_label = {o.label: o for o in xyz.axis_options}
    ck, w = by_label["LoRA checkpoint"], by_label["LoRA weight"]
    assert type(ck) is xyz.AxisOption and type(w) is xyz.AxisOption
    assert w.type is float and ck.type is str
    assert set(STEMS) <= set(ck.choices())
    xs = [STEMS[0], STEMS[2]]
    ck.confirm(p, xs)
    with pytest.raises(RuntimeError):
        ck.confirm(p, ["nope"])
    ws = xyz.process_axis(p, w, "0.5-1 [2]")
    assert ws == [0.5, 1.0]
    ui = xyz.Script()
    ui.ui(False)
    assert "LoRA weight" in [o.label for o in ui.current_axis_options]

    from copy import copy

    pc = copy(p)
    ck.apply(pc, STEMS[2], xs)
    w.apply(pc, 0.5, ws)
    assert pc.prompt == f"a photo, outdoors <lora:{RUN}:0.5>"
    assert p.prompt == "a photo, outdoors"
    pc2 = copy(p)  # weight axis first (X = weight, Y = checkpoint)
    w.apply(pc2, 0.25, ws)  # no tag yet: the weight waits for the checkpoint axis of the same cell
    ck.apply(pc2, STEMS[0], xs)
    assert pc2.prompt == f"a photo, outdoors <lora:{STEMS[0]}:0.25>"
    pc3 = copy(p)
    pc3.prompt = f"x <lora:{STEMS[1]}:1>"
    w.apply(pc3, 0.7, ws)
    assert pc3.prompt == f"x <lora:{STEMS[1]}:0.7>"
    res = processing.process_images(pc)
    assert res.images and isinstance(res.images[0], Image.Image)
    # registering twice (Reload UI) does not double the axes
    webui.modules["script_callbacks"].before_ui_callback()
    assert [o.label for o in xyz.axis_options].count("LoRA weight") == 1


def test_requested_checkpoint_that_is_gone_gets_a_marked_column(grid):
    webui, mod, script, p = grid
    from modules import processing

    proc = script.run(p, f"lib_lora/{RUN}", [STEMS[0], f"{RUN}-000009"], "0.5", add_trigger=False)
    assert len(processing.process_calls) == 1  # only the existing checkpoint is generated
    assert proc.images[0].size[0] > 2 * 64  # two columns (plus the label band)
    assert f"{RUN}-000009" in proc.infotexts[0]


def test_sr_mode_ignores_the_run_dropdown_for_other_files(grid):
    webui, mod, script, p = grid
    from modules import processing

    other = webui.lora_dir / "other-000001.safetensors"
    _fake_lora(other, 5)
    p.prompt = "a photo <lora:other-NUM:STRENGTH>"
    proc = script.run(p, f"lib_lora/{RUN}", [], "STRENGTH,0.5", mode=mod.MODES[1], sr_values="NUM,000001")
    (call,) = processing.process_calls
    assert call.prompt == "a photo <lora:other-000001:0.5>"  # no "sks dog" from the dropdown's run
    assert f"LoRA grid run: lib_lora/{RUN}" not in proc.infotexts[0]


def test_ui_builds_with_real_gradio_and_refreshes_runs(grid):
    """The Script's ui() under real gradio 3.41.2: 14 inputs in run()'s order, a run typed by hand is accepted
    (allow_custom_value), and the refresh button lists a run trained after the UI was built."""
    import gradio as gr

    webui, mod, script, p = grid
    with gr.Blocks() as demo:
        inputs = script.ui(False)
    assert len(inputs) == 14 and isinstance(inputs[0], gr.Dropdown)
    assert inputs[0].allow_custom_value and inputs[0].choices == [f"lib_lora/{RUN}"]
    new_dir = webui.lora_dir / "lib_lora" / "later"
    new_dir.mkdir(parents=True)
    _fake_lora(new_dir / "later.safetensors", 9)
    refresh = next(d.fn for d in demo.fns if d.fn is not None and d.fn.__name__ == "refresh_runs")
    update = refresh("lib_lora/later")
    assert set(update["choices"]) == {f"lib_lora/{RUN}", "lib_lora/later"} and update["value"] == "lib_lora/later"


def test_find_run_by_name_and_prompt_names_run(tmp_path):
    """The pure lookups behind the Script: a key, a unique bare name, an ambiguous bare name (None); an S/R grid
    names a run by ``<lora:NAME`` or by one of its stems in the S/R values."""
    from lib_lora.webui_grid import find_run_by_name, list_runs, prompt_names_run

    for sub in ("a/dog", "b/dog", "a/cat"):
        (tmp_path / sub).mkdir(parents=True)
        _fake_lora(tmp_path / sub / f"{sub.split('/')[1]}-000001.safetensors", 1)
    runs = list_runs(tmp_path)
    assert set(runs) == {"a/dog", "b/dog", "a/cat"}
    assert find_run_by_name(runs, "a/dog") is runs["a/dog"] and find_run_by_name(runs, "cat") is runs["a/cat"]
    assert find_run_by_name(runs, "dog") is None and find_run_by_name(runs, "nope") is None
    cat = runs["a/cat"]
    assert prompt_names_run(cat, "x <lora:cat-NUM:STRENGTH>", "") and prompt_names_run(cat, "<lora:NUM:1>",
                                                                                        "NUM,cat-000001")
    assert not prompt_names_run(cat, "<lora:dog-NUM:STRENGTH>", "NUM,000001")
