"""The extension's HTTP API (scripts/lib_lora_api.py + lib_lora/webui_api.py) on the WebUI stand-in, through
FastAPI's TestClient: train -> status -> finished, settings, path and name checks, --api-auth."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_webui_jobs import make_dataset, tiny_config

from lib_lora.errors import ConfigError
from lib_lora.webui_api import output_path_inside, resolve_dataset_path, sanitize_output_name

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SCRIPT = "scripts/lib_lora_api.py"


def start(webui, **flags) -> TestClient:
    """Loads the script like the WebUI, registers settings, starts the app; --api on unless told."""
    flags.setdefault("api", True)
    for k, v in flags.items():
        setattr(webui.shared.cmd_opts, k, v)
    webui.load_script(SCRIPT)
    webui.run_ui_settings()
    return TestClient(webui.start_app())


def wait_done(client, timeout=300.0, **auth) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get("/lora-trainer/v1/status", **auth).json()
        if st["state"] in ("finished", "stopped", "failed"):
            return st
        time.sleep(0.2)
    raise AssertionError(f"job did not end: {st}")


def test_train_status_finished_runs(webui_sd2):
    webui = webui_sd2
    client = start(webui)
    data = make_dataset(webui.data_dir / "datasets" / "dog")
    body = tiny_config(data, output_dir="/somewhere/else", model="x.safetensors")
    r = client.post("/lora-trainer/v1/train", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    assert r.json()["ignored"] == ["model", "output_dir"]
    progress = client.post("/internal/progress", json={"id_task": job_id}).json()
    assert progress["active"] or progress["queued"] or progress["completed"]
    st = wait_done(client)
    assert st["state"] == "finished" and st["job_id"] == job_id, st
    assert st["step"] == st["total"] == 2 and st["last_checkpoint"].endswith("mydog.safetensors")
    assert Path(st["last_checkpoint"]).parent == (webui.lora_dir / "lib_lora" / "mydog").resolve()
    assert client.post("/internal/progress", json={"id_task": job_id}).json()["completed"]
    runs = client.get("/lora-trainer/v1/runs").json()
    assert runs["runs"][0]["name"] == "mydog" and runs["runs"][0]["files"][-1]["stem"] == "mydog"
    assert client.post("/lora-trainer/v1/stop").json() == {"stopping": False, "state": "finished"}


def test_settings_registered_and_used(webui_sd1, tmp_path):
    webui = webui_sd1
    client = start(webui)
    opts = webui.shared.opts
    assert opts.lib_lora_output_subdir == "lib_lora" and opts.lib_lora_tensorboard is True
    assert opts.data_labels["lib_lora_dataset_roots"].section == ("lib_lora", "LoRA Trainer")
    outside = make_dataset(tmp_path / "elsewhere")
    r = client.post("/lora-trainer/v1/train", json=tiny_config(outside))
    assert r.status_code == 400 and "outside the allowed dataset folders" in r.json()["detail"]
    opts.set("lib_lora_dataset_roots", str(tmp_path / "elsewhere"))
    opts.set("lib_lora_output_subdir", "trained/v1")
    r = client.post("/lora-trainer/v1/train", json=tiny_config(outside, output_name="roots"))
    assert r.status_code == 200, r.text
    st = wait_done(client)
    assert st["state"] == "finished", st
    assert (webui.lora_dir / "trained" / "v1" / "roots" / "roots.safetensors").is_file()


@pytest.mark.parametrize("change, fragment", [
    ({"output_name": "../../x"}, "plain file name"),
    ({"output_name": "a/b"}, "plain file name"),
    ({"output_name": ".."}, "must not start with '.'"),
    ({"output_name": ""}, "output_name is empty"),
    ({"train_data_dir": "/etc"}, "outside the allowed dataset folders"),
    ({"train_data_dir": "../../.."}, "outside the allowed dataset folders"),
    ({"train_data_dir": "datasets/missing"}, "does not exist"),
    ({"network_dimm": 4}, "did you mean network_dim"),
    ({"learning_rate": -1}, "learning_rate must be > 0"),
    ({"resume": "/etc"}, "outside the Lora folder"),
])
def test_bad_input_is_a_4xx_with_a_message(webui_sd1, change, fragment):
    webui = webui_sd1
    client = start(webui)
    data = make_dataset(webui.data_dir / "datasets" / "dog", n=1)
    r = client.post("/lora-trainer/v1/train", json={**tiny_config(data), **change})
    assert 400 <= r.status_code < 500 and fragment in r.json()["detail"], r.text
    assert client.get("/lora-trainer/v1/status").json()["state"] == "idle"
    assert not any(webui.lora_dir.rglob("*.safetensors"))


def test_non_object_body_and_busy_and_unsupported(webui, tmp_path):
    client = start(webui)
    assert client.post("/lora-trainer/v1/train", json=[1, 2]).status_code == 400
    data = make_dataset(webui.data_dir / "d", n=1)
    r = client.post("/lora-trainer/v1/train", json=tiny_config(data))
    assert r.status_code == 409 and "No Stable Diffusion model" in r.json()["detail"]
    webui.set_model("sd1")
    lock = webui.call_queue.queue_lock
    lock.acquire()  # a generation is running: the job waits in the queue
    try:
        assert client.post("/lora-trainer/v1/train", json=tiny_config(data)).status_code == 200
        r = client.post("/lora-trainer/v1/train", json=tiny_config(data, output_name="b"))
        assert r.status_code == 409 and "already running" in r.json()["detail"]
        assert client.post("/lora-trainer/v1/stop").json()["stopping"] is True
    finally:
        lock.release()
    assert wait_done(client)["state"] == "stopped"


def test_api_auth(webui_sd1):
    client = start(webui_sd1, api_auth="alice:s3cret,bob:pw")
    assert client.get("/lora-trainer/v1/status").status_code == 401
    r = client.get("/lora-trainer/v1/status", auth=("alice", "wrong"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    assert client.get("/lora-trainer/v1/status", auth=("alice", "s3cret")).status_code == 200
    assert client.get("/lora-trainer/v1/runs", auth=("bob", "pw")).status_code == 200
    assert client.post("/lora-trainer/v1/train", json={}).status_code == 401


def test_no_routes_without_api_flag(webui):
    client = start(webui, api=False)
    assert client.get("/lora-trainer/v1/status").status_code == 404


def test_validators():
    assert sanitize_output_name("  my_lora-v2 ") == "my_lora-v2"
    for bad in ("../../x", "a\\b", "x:y", ".hidden", "a..b", "x" * 101, None):
        with pytest.raises(ConfigError):
            sanitize_output_name(bad)


def test_output_path_inside(tmp_path):
    lora = tmp_path / "Lora"
    lora.mkdir()
    assert output_path_inside(lora, "lib_lora", "x") == (lora / "lib_lora" / "x").resolve()
    assert output_path_inside(lora, "", "x") == (lora / "x").resolve()
    for subdir in ("../up", "/abs", "a/../../b"):
        with pytest.raises(ConfigError):
            output_path_inside(lora, subdir, "x")
    (lora / "link").symlink_to(tmp_path)  # a symlink leading out of the Lora folder
    with pytest.raises(ConfigError, match="not be inside the Lora folder"):
        output_path_inside(lora, "link", "x")
    with pytest.raises(ConfigError, match="plain file name"):
        output_path_inside(lora, "link", "../x")


def test_resolve_dataset_path(tmp_path):
    root = tmp_path / "root"
    (root / "ds").mkdir(parents=True)
    assert resolve_dataset_path("ds", [root]) == (root / "ds").resolve()
    assert resolve_dataset_path(str(root / "ds"), [root]) == (root / "ds").resolve()
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        resolve_dataset_path(str(root / "escape"), [root])
    with pytest.raises(ConfigError, match="not set"):
        resolve_dataset_path("", [root])
