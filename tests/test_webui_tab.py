"""The "LoRA Trainer" tab: pure helpers (lib_lora.webui_tab, lib_lora.presets) and the tab script built with real
gradio 3.41.2 on the WebUI stand-in (tests/_webui.py), its callbacks run on real photos and the tiny SD1 model."""

from __future__ import annotations

import importlib.util
import re
import shutil
import time
from dataclasses import fields
from pathlib import Path

import pytest
from _paths import dog_photos

from lib_lora import presets
from lib_lora import webui_tab as wt
from lib_lora.config import TrainConfig
from lib_lora.errors import ConfigError, DatasetError

gr = pytest.importorskip("gradio")


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def dog_set(tmp_path) -> Path:
    """A Kohya dataset: ``<tmp>/data/10_sks dog/`` with the five real dog photos, three of them captioned."""
    root = tmp_path / "data"
    sub = root / "10_sks dog"
    sub.mkdir(parents=True)
    for i, photo in enumerate(dog_photos()[:5]):
        shutil.copy(photo, sub / f"dog{i}.jpg")
    (sub / "dog0.txt").write_text("sks, dog, brown fur, grass\n", encoding="utf-8")
    (sub / "dog1.txt").write_text("sks, dog, brown fur, red hat, red hat\n", encoding="utf-8")
    (sub / "dog2.txt").write_text("dog, sofa\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------------------


def test_presets_are_valid_configs_with_the_seed_defaults():
    assert {"SD1.5 character", "SD1.5 style", "SDXL low VRAM"} <= set(presets.preset_names())
    for name in presets.preset_names():
        cfg = TrainConfig.from_dict(presets.preset_values(name)).validate()
        assert presets.PRESETS[name].description
        assert cfg.learning_rate == 1e-4
    d = TrainConfig.from_dict(presets.preset_values(presets.DEFAULT_PRESET))
    assert (d.network_dim, d.network_alpha, d.learning_rate, d.train_batch_size, d.save_every_n_steps) == (
        32, 16.0, 1e-4, 2, 200)
    xl = TrainConfig.from_dict(presets.preset_values("SDXL low VRAM"))
    assert xl.resolution == 1024 and xl.network_train_unet_only and xl.gradient_checkpointing


def test_apply_preset_keeps_other_keys_and_unknown_preset_is_a_config_error():
    out = presets.apply_preset({"output_name": "mine", "network_dim": 4}, "SD1.5 character")
    assert out["output_name"] == "mine" and out["network_dim"] == 32 and out["max_train_epochs"] == 10
    with pytest.raises(ConfigError, match="SD1.5 style"):
        presets.preset_values("nope")


# ---------------------------------------------------------------------------------------------------------------
# parameter widgets <-> config
# ---------------------------------------------------------------------------------------------------------------


def test_every_trainconfig_field_has_exactly_one_place():
    shown = [s.name for s in wt.field_specs("all")]
    assert len(shown) == len(set(shown))
    assert set(shown) | set(wt.HOST_FIELDS) == {f.name for f in fields(TrainConfig)}
    assert [s.name for s in wt.field_specs("basic")] == list(wt.BASIC_FIELDS)
    with pytest.raises(ConfigError):
        wt.field_specs("bogus")


def test_widget_values_round_trip_to_the_default_config():
    names = [s.name for s in wt.field_specs("all")]
    values = wt.widgets_from_config({}, names)
    assert wt.config_from_widgets(names, values) == TrainConfig().to_dict()


def test_widget_conversions_blank_optional_lists_json_and_errors():
    names = ["max_train_epochs", "max_train_steps", "trigger_words", "sample_prompts", "optimizer_args",
             "v_prediction", "network_weights", "conv_dim"]
    cfg = wt.config_from_widgets(names, ["10", "", "sks, dog ", "a\n\nb", '{"weight_decay": 0.01}', "true", "",
                                         "8"])
    assert cfg["max_train_epochs"] == 10 and cfg["max_train_steps"] is None
    assert cfg["trigger_words"] == ["sks", "dog"] and cfg["sample_prompts"] == ["a", "b"]
    assert cfg["optimizer_args"] == {"weight_decay": 0.01} and cfg["v_prediction"] is True
    assert cfg["network_weights"] is None and cfg["conv_dim"] == 8
    back = wt.widgets_from_config(cfg, names)
    assert back[:3] == ["10", "", "sks, dog"] and back[5] == "true"
    with pytest.raises(ConfigError, match="max_train_epochs"):
        wt.config_from_widgets(["max_train_epochs"], ["ten"])
    with pytest.raises(ConfigError, match="optimizer_args"):
        wt.config_from_widgets(["optimizer_args"], ["[1]"])
    with pytest.raises(ConfigError, match="network_dim"):
        wt.config_from_widgets(["network_dim"], [0])


def test_toml_save_and_load(tmp_path):
    cfg = wt.config_from_widgets(["network_dim", "trigger_words", "max_train_epochs"], [8, "sks", "3"])
    path = wt.save_toml(str(tmp_path / "sub" / "run"), cfg)
    assert path.suffix == ".toml" and path.is_file()
    loaded = wt.load_toml(str(path))
    assert loaded == cfg
    with pytest.raises(ConfigError):
        wt.load_toml("")
    with pytest.raises(ConfigError, match="cannot read"):
        wt.load_toml(str(tmp_path / "missing.toml"))


def test_steps_arithmetic():
    assert wt.plan_steps(50, 2, 10, None) == (25, 250, 10)
    assert wt.plan_steps(5, 2, None, 100) == (3, 100, 34)
    assert wt.plan_steps(50, 2, 2, None, grad_accum=4) == (7, 14, 2)
    text = wt.steps_text(50, 2, "10", "", 1, "200")
    assert "**250** steps" in text and "1 checkpoint" in text
    assert "Check the dataset" in wt.steps_text(None, 2, 10, None)
    # a preset set epochs and the user typed max steps: say which one counts
    both = wt.steps_text(50, 2, 10, 20)
    assert "**250** steps" in both and "Max steps (20) is not used" in both
    assert "whole numbers" in wt.steps_text(50, "x", 10, None)
    assert "epochs or max steps" in wt.steps_text(50, 2, "", "")


# ---------------------------------------------------------------------------------------------------------------
# dataset and captions on real photos
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_summary_doctor_and_thumbnails(dog_set):
    summary = wt.dataset_summary(str(dog_set), 1)
    assert summary.rows == [["10_sks dog", 10, 5, 50, 3, 0]]
    assert summary.num_train_images == 50 and len(summary.images) == 5
    report = wt.run_doctor(str(dog_set), "concept", 512, "sks")
    rows = wt.finding_rows(report.findings)
    checks = {r[2] for r in rows}
    assert {"count", "caption_missing", "trigger_missing", "duplicate_tag"} <= checks
    assert all(len(r) == len(wt.FINDING_HEADERS) for r in rows)
    assert any(r[0] == "(dataset)" and r[2] == "count" for r in rows)
    assert "warning" in wt.doctor_text(report)
    thumbs = wt.thumbnails(summary.images, side=64)
    assert len(thumbs) == 5 and max(thumbs[0][0].size) == 64
    with pytest.raises(DatasetError):
        wt.dataset_summary("")
    with pytest.raises(DatasetError, match="does not exist"):
        wt.dataset_summary(str(dog_set / "nope"))


def test_auto_caption_through_an_interrogator(dog_set):
    calls = []

    def interrogate(kind, image):
        calls.append((kind, image.size))
        return "dog, grass, dog"

    text = wt.auto_caption(str(dog_set), interrogate, "DeepBooru", "skip", "sks, other")
    assert "wrote 2 caption(s), kept 3" in text and len(calls) == 2
    sub = dog_set / "10_sks dog"
    assert (sub / "dog3.txt").read_text(encoding="utf-8").strip() == "sks, dog, grass"
    assert (sub / "dog0.txt").read_text(encoding="utf-8").startswith("sks, dog, brown fur")

    def broken(kind, image):
        raise RuntimeError("model not loaded")

    text = wt.auto_caption(str(dog_set), broken, "BLIP", "overwrite")
    assert "5 failed" in text and "model not loaded" in text

    # What the real interrogators return when their model is missing offline: BLIP "<error>", DeepBooru "".
    before = {p.name: p.read_bytes() for p in sub.glob("*.txt")}
    for kind, answer in (("BLIP", "<error>"), ("DeepBooru", "")):
        text = wt.auto_caption(str(dog_set), lambda k, im, a=answer: a, kind, "overwrite", "sks")
        assert "5 failed" in text and "caption not written" in text, text
    assert {p.name: p.read_bytes() for p in sub.glob("*.txt")} == before


def test_tag_tools_and_editor(dog_set):
    freq = wt.tag_frequency_rows(str(dog_set))
    assert freq[0] == ["dog", 3, 100.0]
    prune = wt.prune_rows(str(dog_set), "sks", 60)
    assert [r[0] for r in prune] == ["dog", "brown fur"]
    dry = wt.batch_edit(str(dog_set), add="photo", remove="grass", replace="sofa=couch", trigger="sks",
                        dry_run=True)
    assert "would change 3" in dry and "couch" in dry
    sub = dog_set / "10_sks dog"
    assert "sofa" in (sub / "dog2.txt").read_text(encoding="utf-8")
    wt.batch_edit(str(dog_set), add="photo", remove="grass", replace="sofa=couch", trigger="sks")
    assert (sub / "dog2.txt").read_text(encoding="utf-8").strip() == "sks, dog, couch, photo"
    assert (sub / "dog1.txt").read_text(encoding="utf-8").strip() == "sks, dog, brown fur, red hat, photo"
    with pytest.raises(ConfigError, match="old=new"):
        wt.parse_replace("justone")

    names = wt.caption_list(str(dog_set))
    assert names[0] == "10_sks dog/dog0.jpg" and len(names) == 5
    image, caption = wt.read_caption(str(dog_set), names[4])
    assert image.name == "dog4.jpg" and caption == ""
    wt.save_caption(str(dog_set), names[4], "sks,  dog on   a sofa")
    assert wt.read_caption(str(dog_set), names[4])[1] == "sks, dog on a sofa"
    with pytest.raises(DatasetError):
        wt.read_caption(str(dog_set), "../../etc/passwd")
    with pytest.raises(DatasetError, match="pick an image"):
        wt.save_caption(str(dog_set), "", "x")


# ---------------------------------------------------------------------------------------------------------------
# run panel helpers
# ---------------------------------------------------------------------------------------------------------------


def test_status_chart_checkpoints_runs(tmp_path):
    assert wt.loss_chart(None) is None
    history = {"step": [1, 2, 3, 4], "loss": [0.3, 0.2, None, 0.1], "avg_loss": [0.3, 0.25, 0.22, 0.2],
               "lr": [1e-4, 1e-4, 5e-5, 5e-5]}
    img = wt.loss_chart(history, 600, 400)
    assert img.size == (600, 400)
    status = {"job_id": "task(x)", "state": "running", "step": 4, "total": 10, "epoch": 1, "total_epochs": 3,
              "loss": 0.1, "avg_loss": 0.2, "lr": 5e-5, "eta_s": 75, "it_per_s": 2.5, "messages": ["hello"],
              "checkpoints": [{"path": "/x/a-step00000002.safetensors", "step": 2, "epoch": 1, "loss": 0.123456}],
              "log_dir": "/x/logs", "tensorboard_command": "tensorboard --logdir /x/logs"}
    md = wt.status_markdown(status)
    assert "**running**" in md and "step 4 / 10" in md and "ETA 1:15" in md and "hello" in md
    assert wt.status_markdown(None) == "No training job yet."
    assert wt.checkpoint_rows(status) == [["a-step00000002.safetensors", 2, 1, 0.12346]]
    assert "tensorboard --logdir /x/logs" in wt.tensorboard_markdown(status)
    run = tmp_path / "lib_lora" / "mine"
    run.mkdir(parents=True)
    for stem in ("mine-step00000002", "mine"):
        (run / f"{stem}.safetensors").write_bytes(b"x")
    assert wt.run_rows(tmp_path) == [["mine", 2, "mine", str(run)]]
    assert wt.run_rows(None) == [] and "Pick a run" in wt.grid_hint("")


def test_guard_and_support_messages():
    def boom(x):
        raise DatasetError(f"bad {x}")

    assert wt.guard(boom, 1, dict)("folder") == "Error: bad folder"
    out = wt.guard(lambda: 1 / 0, 3, lambda: "keep", message_index=1)()
    assert out == ("keep", "Error: ZeroDivisionError: division by zero", "keep")
    assert "--lowvram" in wt.support_message(None, lowvram=True)
    assert wt.support_message(object(), detect=lambda m: None) is None
    assert wt.support_message(object(), detect=lambda m: "Forge model") == "Forge model"
    assert "Cannot tell" in wt.support_message(object(), detect=lambda m: 1 / 0)


# ---------------------------------------------------------------------------------------------------------------
# the tab script on the WebUI stand-in
# ---------------------------------------------------------------------------------------------------------------


def _tab(webui):
    webui.load_script("scripts/lib_lora_tab.py")
    tabs = webui.ui_tabs()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert (title, elem_id) == ("LoRA Trainer", "lib_lora_trainer")
    assert isinstance(blocks, gr.Blocks)
    return blocks


def _by_id(blocks) -> dict:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def _handler(blocks, elem_id: str, trigger: str = "click"):
    """``(fn, input components, output components)`` of the event ``trigger`` on the component ``elem_id``."""
    comp = _by_id(blocks)[elem_id]
    for dep, block_fn in zip(blocks.dependencies, blocks.fns):
        if comp._id in dep["targets"] and dep["trigger"] == trigger:
            return (block_fn.fn, [blocks.blocks[i] for i in dep["inputs"]],
                    [blocks.blocks[i] for i in dep["outputs"]])
    raise AssertionError(f"no {trigger} handler on {elem_id}")


def _call(blocks, elem_id: str, values: dict | None = None, trigger: str = "click"):
    """Runs an event handler with the components' current values, some replaced by ``values`` (by elem_id)."""
    fn, inputs, outputs = _handler(blocks, elem_id, trigger)
    values = values or {}
    args = [values.get(c.elem_id, getattr(c, "value", None)) for c in inputs]
    out = fn(*args)
    if len(outputs) == 1:
        return {outputs[0].elem_id or "out": out}
    return {o.elem_id or f"out{i}": v for i, (o, v) in enumerate(zip(outputs, out))}


def test_tab_builds_with_prefixed_ids_and_the_javascript(webui):
    blocks = _tab(webui)
    ids = _by_id(blocks)
    assert len(ids) > 100 and all(i.startswith("lib_lora_") for i in ids)
    for needed in ("lib_lora_dataset_dir", "lib_lora_check", "lib_lora_findings", "lib_lora_thumbnails",
                   "lib_lora_autocaption", "lib_lora_tag_frequency", "lib_lora_prune", "lib_lora_pick_caption",
                   "lib_lora_preset", "lib_lora_advanced", "lib_lora_save_toml", "lib_lora_start",
                   "lib_lora_stop", "lib_lora_save_now", "lib_lora_loss_chart", "lib_lora_samples",
                   "lib_lora_tensorboard", "lib_lora_checkpoints", "lib_lora_runs", "lib_lora_send_grid"):
        assert needed in ids, needed
    for f in wt.field_specs("basic") + wt.field_specs("advanced"):
        assert f"lib_lora_cfg_{f.name}" in ids
    start = _by_id(blocks)["lib_lora_start"]
    dep = next(d for d in blocks.dependencies if start._id in d["targets"])
    assert dep["js"] == "lib_lora_start"
    js = (Path(__file__).resolve().parents[1] / "javascript" / "lib_lora.js").read_text()
    assert "function lib_lora_start(" in js and "requestProgress(" in js and "randomId()" in js
    css = (Path(__file__).resolve().parents[1] / "style.css").read_text()
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    selectors = [s.strip() for s in re.findall(r"([^{}]+)\{", css)]
    assert selectors and all(s.startswith(("#lib_lora_", ".lib_lora_")) for s in selectors), selectors


def test_lowvram_shows_the_reason_and_start_returns_it(webui):
    webui.shared.cmd_opts.lowvram = True
    blocks = _tab(webui)
    assert "--lowvram" in _by_id(blocks)["lib_lora_notice"].value
    out = _call(blocks, "lib_lora_start")
    assert "--lowvram" in out["lib_lora_run_message"]


def test_dataset_and_caption_panels_on_real_photos(webui, dog_set):
    blocks = _tab(webui)
    out = _call(blocks, "lib_lora_check", {"lib_lora_dataset_dir": str(dog_set),
                                           "lib_lora_cfg_trigger_words": "sks", "lib_lora_cfg_max_train_epochs": "2",
                                           "lib_lora_cfg_max_train_steps": ""})
    assert "**5** images, **50** with repeats" in out["lib_lora_dataset_summary"]
    assert "**50** images x repeats x **2** epochs / batch **2** = **50** steps" in out["lib_lora_steps"]
    assert out["lib_lora_dataset_folders"] == [["10_sks dog", 10, 5, 50, 3, 0]]
    assert any(r[2] == "trigger_missing" for r in out["lib_lora_findings"])
    assert len(out["lib_lora_thumbnails"]) == 5
    bad = _call(blocks, "lib_lora_check", {"lib_lora_dataset_dir": str(dog_set / "missing")})
    assert bad["lib_lora_dataset_summary"].startswith("Error: dataset folder")

    # auto-caption: the stand-in's DeepBooru returns "1girl, solo, smile" (tests/webui_stub/modules/deepbooru.py)
    out = _call(blocks, "lib_lora_autocaption", {"lib_lora_dataset_dir": str(dog_set),
                                                 "lib_lora_interrogator": "DeepBooru",
                                                 "lib_lora_caption_trigger": "sks"})
    assert "wrote 2 caption(s)" in out["lib_lora_caption_result"], out
    assert (dog_set / "10_sks dog" / "dog4.txt").read_text().strip() == "sks, 1girl, solo, smile"
    assert webui.deepbooru.model.calls == 2
    out = _call(blocks, "lib_lora_autocaption", {"lib_lora_dataset_dir": str(dog_set),
                                                 "lib_lora_interrogator": None})
    assert "Pick an interrogator" in out["lib_lora_caption_result"]

    freq = _call(blocks, "lib_lora_tag_frequency_btn", {"lib_lora_dataset_dir": str(dog_set)})
    assert freq["lib_lora_tag_frequency"][0][:2] == ["sks", 4]
    prune = _call(blocks, "lib_lora_prune_btn", {"lib_lora_dataset_dir": str(dog_set),
                                                 "lib_lora_caption_trigger": "sks"})
    assert prune["lib_lora_prune"][0][0] == "dog"

    listed = _call(blocks, "lib_lora_list_images", {"lib_lora_dataset_dir": str(dog_set)})
    assert listed["lib_lora_pick_result"] == "5 image(s)."
    shown = _call(blocks, "lib_lora_pick_image", {"lib_lora_dataset_dir": str(dog_set),
                                                  "lib_lora_pick_image": "10_sks dog/dog2.jpg"}, "change")
    assert shown["lib_lora_pick_caption"] == "dog, sofa" and shown["lib_lora_pick_preview"].endswith("dog2.jpg")
    saved = _call(blocks, "lib_lora_save_caption", {"lib_lora_dataset_dir": str(dog_set),
                                                    "lib_lora_pick_image": "10_sks dog/dog2.jpg",
                                                    "lib_lora_pick_caption": "sks, dog, sofa"})
    assert saved["lib_lora_pick_result"] == "Saved `dog2.txt`."


def test_parameters_preset_and_toml(webui, tmp_path):
    blocks = _tab(webui)
    out = _call(blocks, "lib_lora_apply_preset", {"lib_lora_preset": "SDXL low VRAM"})
    assert out["lib_lora_cfg_resolution"] == 1024 and out["lib_lora_cfg_network_dim"] == 16
    assert out["lib_lora_cfg_output_name"] == gr.update()  # keys the preset does not name stay as they are
    path = tmp_path / "cfg.toml"
    saved = _call(blocks, "lib_lora_save_toml", {"lib_lora_toml_path": str(path), "lib_lora_cfg_network_dim": 8,
                                                 "lib_lora_dataset_dir": "/data/x"})
    assert saved["lib_lora_params_result"] == f"Saved `{path}`."
    loaded = _call(blocks, "lib_lora_load_toml", {"lib_lora_toml_path": str(path)})
    assert loaded["lib_lora_cfg_network_dim"] == 8 and loaded["lib_lora_dataset_dir"] == "/data/x"
    bad = _call(blocks, "lib_lora_save_toml", {"lib_lora_toml_path": str(path), "lib_lora_cfg_network_dim": 0})
    assert bad["lib_lora_params_result"].startswith("Error: network_dim must be >= 1")


def _wait_state(blocks, states, timeout=600.0) -> dict:
    deadline = time.monotonic() + timeout
    out = {}
    while time.monotonic() < deadline:
        out = _call(blocks, "lib_lora_refresh", {"lib_lora_state": ""})
        if out["lib_lora_state"] in states:
            return out
        time.sleep(0.5)
    raise AssertionError(f"job did not reach {states}: {out.get('lib_lora_status')}")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lib_lora.webui_jobs") is None, reason="lib_lora.webui_jobs not there")
def test_training_through_the_start_button(webui_sd1, dog_set, torch_single_thread):
    blocks = _tab(webui_sd1)
    values = {"lib_lora_task_id": "task(libloratest1)", "lib_lora_dataset_dir": str(dog_set),
              "lib_lora_cfg_network_dim": 4, "lib_lora_cfg_network_alpha": 2, "lib_lora_cfg_resolution": 64,
              "lib_lora_cfg_max_train_steps": "4", "lib_lora_cfg_max_train_epochs": "",
              "lib_lora_cfg_save_every_n_steps": "2", "lib_lora_cfg_output_name": "tabdog",
              "lib_lora_cfg_trigger_words": "sks", "lib_lora_cfg_train_batch_size": 1,
              "lib_lora_cfg_min_bucket_reso": 64, "lib_lora_cfg_max_bucket_reso": 128,
              "lib_lora_cfg_ignore_dataset_errors": True}
    out = _call(blocks, "lib_lora_start", values)
    assert out["lib_lora_run_message"] == "Training started (job `task(libloratest1)`).", out
    again = _call(blocks, "lib_lora_start", values)
    assert again["lib_lora_run_message"].startswith("Error:")
    done = _wait_state(blocks, ("finished", "failed", "stopped"))
    assert done["lib_lora_state"] == "finished", done["lib_lora_status"]
    assert "step 4 / 4" in done["lib_lora_status"]
    assert done["lib_lora_loss_chart"] is not None and done["lib_lora_loss_chart"].size[0] > 100
    assert "tensorboard --logdir" in done["lib_lora_tensorboard"]
    assert done["lib_lora_runs"][0][0] == "tabdog"
    files = sorted(p.name for p in webui_sd1.lora_dir.rglob("*.safetensors"))
    assert "tabdog.safetensors" in files and "tabdog-step00000002.safetensors" in files
    assert any(r[0] == "tabdog-step00000002.safetensors" for r in done["lib_lora_checkpoints"])
    runs = _call(blocks, "lib_lora_list_runs")["lib_lora_runs"]
    assert runs[0][0] == "tabdog"
    assert "idle" not in _call(blocks, "lib_lora_stop")["lib_lora_run_message"]
    assert _call(blocks, "lib_lora_send_grid", {"lib_lora_run_name": "tabdog"})["lib_lora_grid_hint"].startswith(
        "Run `tabdog`")


def test_send_to_grid_selects_the_script_when_txt2img_was_built_first(webui):
    """As in the WebUI (``modules/ui.py`` ``create_ui``), txt2img's Blocks is built, and its components reported to
    on_after_component, before extension tabs, and all interfaces are rendered into one demo: "Send to grid" then
    outputs the grid Script's title to txt2img's Script dropdown and the run name to the Script's Run box (elem_ids
    as modules/scripts.py makes them)."""
    webui.load_script("scripts/lib_lora_tab.py")
    callbacks = webui.modules["script_callbacks"]
    title = "LoRA checkpoint x weight grid"
    with gr.Blocks() as txt2img:
        script_list = gr.Dropdown(label="Script", elem_id="script_list", choices=["None", title], value="None",
                                  type="index")
        callbacks.after_component_callback(script_list, elem_id="script_list")
        grid_run = gr.Dropdown(label="Run", elem_id="script_txt2img_lora_checkpoint_x_weight_grid_run", choices=[],
                               allow_custom_value=True)
        callbacks.after_component_callback(grid_run, elem_id=grid_run.elem_id)
    with gr.Blocks():
        img2img_list = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"], type="index")
        callbacks.after_component_callback(img2img_list, elem_id="script_list")  # ignored: txt2img's came first
    (tab, _, _), = webui.ui_tabs()
    with gr.Blocks() as demo:
        txt2img.render()
        tab.render()
    fn, inputs, outputs = _handler(demo, "lib_lora_send_grid", "click")
    assert outputs[1] is script_list and outputs[2] is grid_run
    hint, script_value, run_value = fn("tabdog")
    assert script_value["value"] == title and run_value["value"] == "tabdog"
    assert "is selected" in hint
