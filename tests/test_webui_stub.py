"""Sanity checks of the WebUI stand-in (tests/webui_stub): the behaviour the extension relies on matches v1.10.1."""

from __future__ import annotations

import threading
import time

import pytest


def test_shared_opts_and_settings(webui):
    """opts reads defaults, an unregistered key raises AttributeError, add_option + options_section register."""
    shared = webui.shared
    assert shared.opts.samples_format == "png"
    with pytest.raises(AttributeError):
        _ = shared.opts.lib_lora_not_there
    shared.opts.add_option("x_key", shared.OptionInfo(3, "X", section=("x", "X")).info("units"))
    assert shared.opts.x_key == 3
    assert shared.opts.set("x_key", 4) and shared.opts.x_key == 4
    assert shared.opts.data_labels["x_key"].section == ("x", "X")
    opts = shared.options_section(("s", "S", "training"), {"a": shared.OptionInfo(1, "A")})
    assert opts["a"].section == ("s", "S") and opts["a"].category_id == "training"


def test_fresh_state_per_test_and_tmp_dirs(webui, tmp_path):
    assert webui.shared.cmd_opts.lora_dir == str(webui.lora_dir)
    assert webui.lora_dir.is_dir() and str(webui.lora_dir).startswith(str(tmp_path))
    assert webui.shared.state.job == "" and webui.shared.sd_model is None
    assert webui.shared.cmd_opts.api_auth is None and not webui.shared.cmd_opts.lowvram


def test_state_begin_interrupt_end(webui):
    state = webui.shared.state
    state.begin(job="task(x)")
    assert state.job == "task(x)" and state.job_count == -1 and state.time_start > 0
    state.interrupt()
    assert state.interrupted
    from PIL import Image

    state.assign_current_image(Image.new("RGB", (8, 8)))
    assert state.id_live_preview == 1
    state.end()
    assert state.job == "" and state.job_count == 0


def test_callbacks_register_run_and_clear(webui):
    sc = webui.script_callbacks
    seen = []
    sc.on_ui_settings(lambda: seen.append("settings"), name="mine")
    sc.on_app_started(lambda demo, app: seen.append(("app", demo)))
    sc.on_ui_tabs(lambda: [("blocks", "Title", "elem")])
    sc.on_ui_settings(lambda: 1 / 0)  # an error is reported, the next callbacks still run
    webui.run_ui_settings()
    webui.start_app()
    assert seen == ["settings", ("app", None)]
    assert webui.ui_tabs() == [("blocks", "Title", "elem")]
    assert any("ui_settings" in m for m in webui.errors.reported)
    assert sc.callback_map["callbacks_ui_settings"][0].name.endswith("/test_webui_stub.py/ui_settings/mine")
    sc.clear_callbacks()
    assert webui.ui_tabs() == []


def test_wrap_gradio_gpu_call_registers_task_and_holds_lock(webui):
    """The job id comes from a "task(...)" first argument; the call runs under queue_lock between begin/end and
    the flags are reset afterwards; an exception becomes an error HTML output."""
    seen = {}

    def fn(id_task, x):
        seen["current"] = webui.progress.current_task
        seen["job"] = webui.shared.state.job
        seen["locked"] = webui.call_queue.queue_lock.locked()
        webui.shared.state.interrupted = True
        return x, "<p>ok</p>"

    res = webui.call_queue.wrap_gradio_gpu_call(fn)("task(abc)", 5)
    assert res[0] == 5 and "Time taken" in res[1]
    assert seen == {"current": "task(abc)", "job": "task(abc)", "locked": True}
    assert webui.progress.current_task is None and "task(abc)" in webui.progress.finished_tasks
    assert not webui.shared.state.interrupted and webui.shared.state.job == ""

    def bad(id_task):
        raise ValueError("nope")

    res = webui.call_queue.wrap_gradio_gpu_call(bad, extra_outputs=[None])("task(b)")
    assert res[0] is None and "ValueError: nope" in res[1]


def test_queue_lock_makes_a_generation_wait(webui):
    lock = webui.call_queue.queue_lock
    order = []
    with lock:
        t = threading.Thread(target=lambda: webui.call_queue.wrap_queued_call(lambda: order.append("gen"))())
        t.start()
        time.sleep(0.1)
        order.append("train done")
    t.join(5)
    assert order == ["train done", "gen"]


def test_progress_api(webui):
    from fastapi.testclient import TestClient

    client = TestClient(webui.start_app())
    r = client.post("/internal/progress", json={"id_task": "task(q)", "id_live_preview": -1})
    assert r.status_code == 200 and r.json()["textinfo"] == "Waiting..." and not r.json()["active"]
    webui.progress.add_task_to_queue("task(q)")
    assert client.post("/internal/progress", json={"id_task": "task(q)"}).json()["textinfo"] == "In queue: 1/1"
    state = webui.shared.state
    state.begin(job="task(q)")
    webui.progress.start_task("task(q)")
    state.job_count, state.job_no, state.textinfo = 4, 1, "step 1/4"
    body = client.post("/internal/progress", json={"id_task": "task(q)"}).json()
    assert body["active"] and body["progress"] == pytest.approx(0.25) and body["textinfo"] == "step 1/4"
    assert body["eta"] is not None
    webui.progress.finish_task("task(q)")
    assert client.post("/internal/progress", json={"id_task": "task(q)"}).json()["completed"]
    assert webui.progress.create_task_id("lora").startswith("task(lora-")


def test_devices_hijack_interrogators(webui):
    import torch

    assert webui.devices.device == torch.device("cpu") and webui.devices.dtype == torch.float32
    with webui.devices.autocast():
        pass
    webui.sd_hijack.undo_optimizations()
    webui.sd_hijack.model_hijack.apply_optimizations()
    assert (webui.sd_hijack.undo_calls, webui.sd_hijack.apply_calls) == (1, 1)
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    assert webui.deepbooru.model.tag(img) == webui.deepbooru.FIXED_TAGS
    assert webui.shared.interrogator.interrogate(img) == webui.interrogate.FIXED_CAPTION


def test_networks_list_and_restore(webui):
    import torch
    from safetensors.torch import save_file

    sub = webui.lora_dir / "run1"
    sub.mkdir()
    save_file({"a": torch.zeros(1)}, str(sub / "mine.safetensors"), metadata={"ss_v2": "True",
                                                                              "ss_output_name": "alias"})
    networks = webui.networks
    networks.list_available_networks()
    assert set(networks.available_networks) == {"mine"} and "alias" in networks.available_network_aliases
    assert networks.available_networks["mine"].sd_version.name == "SD2"
    lin = torch.nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    networks.merge_for_test(lin)
    assert not torch.equal(lin.weight, before)
    with pytest.raises(RuntimeError, match="leaf Variable"):  # like the real one: callers turn grad off
        networks.network_restore_weights_from_backup(lin)
    with torch.no_grad():
        networks.network_restore_weights_from_backup(lin)
    assert torch.equal(lin.weight, before)


def test_load_script_like_the_webui(webui, tmp_path):
    ext = tmp_path / "ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "helper_mod_xyz.py").write_text("VALUE = 7\n")
    (ext / "scripts" / "s.py").write_text(
        "import sys\nimport helper_mod_xyz\nfrom modules import script_callbacks\n"
        "NAME = __name__\nIN_SYS = NAME in sys.modules\nscript_callbacks.on_ui_tabs(lambda: [])\n")
    mod = webui.load_script(ext / "scripts" / "s.py")
    assert mod.NAME == "s.py" and not mod.IN_SYS and mod.helper_mod_xyz.VALUE == 7
    assert len(webui.script_callbacks.callback_map["callbacks_ui_tabs"]) == 1


def test_launch_stub(webui):
    launch = webui.launch
    assert launch.is_installed("torch") and not launch.is_installed("surely_not_a_package_xyz")
    launch.installed["torch"] = False
    assert not launch.is_installed("torch")
    launch.run_pip('install "x"', "x")
    assert launch.pip_calls == [('install "x"', "x")]
