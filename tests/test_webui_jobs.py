"""Training jobs inside the WebUI stand-in (lib_lora.webui_jobs + webui_host) on the tiny WebUI-shaped SD1/SD2
models: files in the Lora folder, sidecar and preview, model unchanged, progress API, stop, refusals."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from _paths import dog_photos

from lib_lora.errors import ConfigError
from lib_lora.webui_host import host_from_webui, undo_merged_lora
from lib_lora.webui_jobs import JobError, TrainingJobs, format_eta, get_jobs

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def make_dataset(root: Path, n: int = 2) -> Path:
    """A Kohya folder ``1_sks dog`` with ``n`` dog photos, under ``root``."""
    sub = root / "1_sks dog"
    sub.mkdir(parents=True)
    for photo in dog_photos()[:n]:
        shutil.copyfile(photo, sub / photo.name)
    return root


def tiny_config(data: Path, **changes) -> dict:
    """A seconds-long run: 64 px, rank 4, 2 steps, latents cached in memory."""
    cfg = dict(train_data_dir=str(data), output_name="mydog", trigger_words=["sks dog"], resolution=64,
               min_bucket_reso=64, max_bucket_reso=128, network_dim=4, network_alpha=4.0, learning_rate=1e-3,
               train_batch_size=1, max_train_steps=2, save_every_n_steps=None, save_precision="float", seed=0,
               cache_latents="memory", preferred_weight=0.8)
    cfg.update(changes)
    return cfg


def make_jobs(webui) -> TrainingJobs:
    w = webui.modules
    host = host_from_webui(webui.shared, w["devices"], w["call_queue"], w["progress"], w["sd_hijack"],
                           networks=w["networks"], deepbooru=w["deepbooru"])
    return TrainingJobs(host)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_short_run_writes_files_in_the_lora_folder(webui, kind, tmp_path):
    from lib_lora.webui_model import weights_checksum

    model = webui.set_model(kind)
    before = weights_checksum(model)
    jobs = make_jobs(webui)
    data = make_dataset(tmp_path / "data")
    job_id = jobs.start(tiny_config(data, sample_prompts=["sks dog"], sample_every_n_steps=2, sample_steps=2))
    assert job_id.startswith("task(lib_lora-")
    # TensorBoard can be opened while the run goes: its folder is in the status from the start
    logs = jobs.host.data_dir / "lib_lora" / "logs" / "lib_lora" / "mydog"  # not in the Lora folder
    assert jobs.status()["tensorboard_command"] == f'tensorboard --logdir "{logs}"'
    status = jobs.wait(300)
    assert status["state"] == "finished", status
    out = webui.lora_dir / "lib_lora" / "mydog"
    assert Path(status["output_dir"]) == out.resolve()
    final = out / "mydog.safetensors"
    assert final.is_file() and status["last_checkpoint"] == str(final.resolve())
    side = json.loads((out / "mydog.json").read_text())
    assert side["activation text"] == "sks dog" and side["preferred weight"] == 0.8
    assert side["sd version"] == {"sd1": "SD1", "sd2": "SD2"}[kind]
    assert (out / "mydog.preview.png").is_file()
    # the WebUI's Lora list sees the file, for the right SD version, and was refreshed
    networks = webui.networks
    assert networks.list_calls >= 1 and "mydog" in networks.available_networks
    assert networks.available_networks["mydog"].sd_version.name == {"sd1": "SD1", "sd2": "SD2"}[kind]
    assert weights_checksum(model) == before
    assert webui.sd_hijack.undo_calls == 1 and webui.sd_hijack.apply_calls == 1
    assert status["step"] == status["total"] == 2 and status["history"]["step"] == [1, 2]
    assert status["loss"] is not None and status["checkpoints"][-1]["step"] == 2
    # the progress API saw the job and it is finished; the WebUI state is released
    assert job_id in webui.progress.finished_tasks and webui.progress.current_task is None
    assert webui.shared.state.job == "" and not webui.call_queue.queue_lock.locked()
    runs = jobs.runs()
    assert [r["name"] for r in runs] == ["mydog"] and runs[0]["files"][-1]["final"]


def test_progress_textinfo_interrupt_and_stop_keep_a_checkpoint(webui_sd1, tmp_path):
    """The job registers with the progress API (job_no/job_count/textinfo "step N/M, loss x, it/s"); the WebUI's
    Interrupt button stops it after a step; the stopped run keeps a checkpoint and moves its resume state out of
    the Lora folder."""
    webui = webui_sd1
    jobs = make_jobs(webui)
    seen = []
    state = webui.shared.state
    host = jobs.host
    update = host.update_job

    def spy(step, total, textinfo, image=None):
        update(step, total, textinfo, image)
        seen.append((state.job, state.job_no, state.job_count, textinfo, webui.progress.current_task))
        if step == 2:
            state.interrupt()  # the Interrupt button

    host.update_job = spy
    job_id = jobs.start(tiny_config(make_dataset(tmp_path / "data"), max_train_steps=50))
    status = jobs.wait(300)
    assert status["state"] == "stopped", status
    assert seen[0][0] == job_id and seen[0][4] == job_id and seen[0][1:3] == (1, 50)
    assert seen[0][3].startswith("LoRA training: step 1/50, loss ") and seen[0][3].endswith(" it/s")
    assert status["step"] == 2
    out = webui.lora_dir / "lib_lora" / "mydog"
    assert (out / "mydog-step00000002.safetensors").is_file()
    assert not list(out.glob("*-state"))  # not listed as LoRAs by the WebUI
    assert (webui.data_dir / "lib_lora" / "states" / "lib_lora" / "mydog" / "mydog-step00000002-state").is_dir()
    assert not state.interrupted  # reset at the end like wrap_gradio_call


def test_second_start_is_refused_and_stop_works(webui_sd1, tmp_path):
    """While a job waits for the queue lock (a generation is running) a second start is refused; stop() then
    ends the queued job without training; the next start works."""
    webui = webui_sd1
    jobs = make_jobs(webui)
    data = make_dataset(tmp_path / "data")
    lock = webui.call_queue.queue_lock
    lock.acquire()  # a generation in progress
    try:
        jobs.start(tiny_config(data))
        time.sleep(0.2)
        st = jobs.status()
        assert st["state"] == "queued" and st["job_id"] in webui.progress.pending_tasks
        with pytest.raises(JobError, match="already running") as info:
            jobs.start(tiny_config(data, output_name="other"))
        assert info.value.http_status == 409
        assert jobs.stop()
    finally:
        lock.release()
    assert jobs.wait(60)["state"] == "stopped"
    assert not (webui.lora_dir / "lib_lora" / "mydog" / "mydog.safetensors").exists()
    assert not jobs.stop()


def test_stop_while_running_keeps_a_checkpoint(webui_sd1, tmp_path):
    webui = webui_sd1
    jobs = make_jobs(webui)
    started = threading.Event()
    update = jobs.host.update_job

    def spy(step, total, textinfo, image=None):
        update(step, total, textinfo, image)
        started.set()

    jobs.host.update_job = spy
    jobs.start(tiny_config(make_dataset(tmp_path / "data"), max_train_steps=200))
    assert started.wait(300)
    assert jobs.stop()
    status = jobs.wait(300)
    assert status["state"] == "stopped" and 1 <= status["step"] < 200
    assert status["last_checkpoint"] and Path(status["last_checkpoint"]).is_file()
    # The resume path named in the messages is where the state was moved to (out of the Lora folder), once.
    resume_lines = [m for m in status["messages"] if "resume=" in m]
    assert len(resume_lines) == 1 and len([m for m in status["messages"] if "stopped at step" in m]) == 1
    state_dir = resume_lines[0].split("resume=")[1].split()[0]
    assert Path(state_dir).is_dir() and webui.lora_dir not in Path(state_dir).parents
    # A second run under the same name would overwrite it: refused, unless it resumes.
    with pytest.raises(ConfigError, match="already exists"):
        jobs.start(tiny_config(make_dataset(tmp_path / "data2")))
    jobs.start(tiny_config(tmp_path / "data", max_train_steps=status["step"] + 1, resume=state_dir))
    assert jobs.wait(300)["state"] == "finished"


def test_refusals(webui, tmp_path):
    data = make_dataset(tmp_path / "data", n=1)
    jobs = make_jobs(webui)
    with pytest.raises(JobError, match="No Stable Diffusion model is loaded"):
        jobs.start(tiny_config(data))
    webui.set_model("sd1")
    webui.shared.cmd_opts.lowvram = True
    with pytest.raises(JobError, match="--lowvram"):
        make_jobs(webui).start(tiny_config(data))
    webui.shared.cmd_opts.lowvram = False
    webui.shared.cmd_opts.medvram = True
    with pytest.raises(JobError, match="--medvram"):
        make_jobs(webui).start(tiny_config(data))
    webui.shared.cmd_opts.medvram = False
    with pytest.raises(ConfigError, match="did you mean network_dim"):
        jobs.start(tiny_config(data, network_dimm=4))
    with pytest.raises(ConfigError, match="plain file name"):
        jobs.start(tiny_config(data, output_name="../../x"))
    with pytest.raises(Exception, match="does not exist"):
        jobs.start(tiny_config(tmp_path / "nope"))
    assert jobs.status()["state"] == "idle"


def test_unsupported_model_is_refused_with_a_message(webui, tmp_path):
    class ForgeModel:  # Forge's engine object
        forge_objects = object()

    webui.shared.sd_model = ForgeModel()
    with pytest.raises(JobError, match="Forge"):
        make_jobs(webui).start(tiny_config(make_dataset(tmp_path / "data", n=1)))


def test_merged_lora_is_undone_before_training(webui_sd1):
    """A LoRA the built-in extension merged during the last generation is taken out (base weights back) and
    the layer re-applies it on the next generation (network_current_names cleared)."""
    import torch

    model = webui_sd1.shared.sd_model
    layer = model.model.diffusion_model.input_blocks[1][1].proj_in
    base = layer.weight.detach().clone()
    webui_sd1.networks.merge_for_test(layer)
    assert not torch.equal(layer.weight, base)
    assert undo_merged_lora(model, webui_sd1.networks) == 1
    assert torch.equal(layer.weight, base) and layer.network_current_names == ()


def test_training_after_a_generation_that_merged_a_lora(webui_sd1, tmp_path):
    """The real-WebUI sequence "txt2img with <lora:x:1>, then Start training": the merged layer's weights require
    grad (the WebUI never freezes the UNet), so restoring them must happen under no_grad; the run finishes and
    the model ends with its base weights, checksum equal to the unmerged model's."""
    from lib_lora.webui_model import weights_checksum

    model = webui_sd1.shared.sd_model
    layer = model.model.diffusion_model.input_blocks[1][1].proj_in
    assert layer.weight.requires_grad
    base_sum = weights_checksum(model)
    webui_sd1.networks.merge_for_test(layer)
    jobs = make_jobs(webui_sd1)
    jobs.start(tiny_config(make_dataset(tmp_path / "data")))
    status = jobs.wait(300)
    assert status["state"] == "finished", status
    assert weights_checksum(model) == base_sum


def test_get_jobs_is_one_per_process(webui):
    w = webui.modules

    def make():
        return host_from_webui(webui.shared, w["devices"], w["call_queue"], w["progress"], w["sd_hijack"])

    a = get_jobs(make)
    assert get_jobs(make) is a


def test_format_eta():
    assert (format_eta(5), format_eta(125), format_eta(3725), format_eta(float("inf"))) == \
        ("5s", "2m 05s", "1h 02m", "?")
