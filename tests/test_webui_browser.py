"""Browser check of the "LoRA Trainer" tab: served by real gradio 3.41.2 on the WebUI stand-in, opened in headless
Debian Chromium through Playwright's Python API (no browser download), Start clicked, the WebUI-style progress bar
and the loss chart seen, screenshots saved.

Needs ``/usr/bin/chromium`` (Debian package ``chromium``) and the Python package ``playwright``; skips with the
reason when either is missing. Screenshots go to the test's tmp folder and, when ``LIB_LORA_TEST_OUTPUT`` names a
folder, are copied there too.

The page gets what the WebUI adds to every page (``modules/ui_gradio_extensions.py`` patches gradio's
``TemplateResponse`` to inject the extensions' scripts and ``style.css``): our ``javascript/lib_lora.js`` and
``style.css``, plus a small stand-in, written here, for the WebUI globals our script calls (``gradioApp``,
``randomId``, ``onUiLoaded`` and ``requestProgress``, which like ``javascript/progressbar.js`` polls
``/internal/progress`` and draws a ``div.progressDiv > div.progress`` bar with percent and ETA).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from _paths import dog_photos

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing (Debian package 'chromium')"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="Python package 'playwright' missing (pip install playwright; no browser download)"),
    pytest.mark.skipif(importlib.util.find_spec("lib_lora.webui_jobs") is None, reason="lib_lora.webui_jobs missing"),
]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

#: Stand-ins for the WebUI page globals javascript/lib_lora.js uses (behaviour of the WebUI's script.js and
#: progressbar.js, reduced to what the tab needs).
WEBUI_GLOBALS_JS = r"""
function gradioApp() {
    var elems = document.getElementsByTagName('gradio-app');
    var elem = elems.length === 0 ? document : elems[0];
    if (elem !== document) elem.getElementById = function(id) { return document.getElementById(id); };
    return elem.shadowRoot ? elem.shadowRoot : elem;
}
function randomId() {
    return "task(" + Math.random().toString(36).slice(2, 9) + Math.random().toString(36).slice(2, 9) + ")";
}
var lib_lora_test_ui_loaded = [];
function onUiLoaded(cb) { lib_lora_test_ui_loaded.push(cb); }
var lib_lora_test_wait = setInterval(function() {
    if (document.getElementById('lib_lora_start')) {
        clearInterval(lib_lora_test_wait);
        lib_lora_test_ui_loaded.forEach(function(cb) { cb(); });
    }
}, 200);
function requestProgress(id_task, container, gallery, atEnd, onProgress) {
    var parent = container.parentNode;
    var outer = document.createElement('div');
    outer.className = 'progressDiv';
    var inner = document.createElement('div');
    inner.className = 'progress';
    outer.appendChild(inner);
    parent.insertBefore(outer, container);
    var start = Date.now(), wasActive = false;
    var done = function() { if (outer.parentNode) parent.removeChild(outer); atEnd(); };
    var poll = function() {
        fetch('./internal/progress', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                     body: JSON.stringify({id_task: id_task, live_preview: false})})
        .then(function(r) { return r.json(); }).then(function(res) {
            if (res.completed) { done(); return; }
            var text = res.progress > 0 ? (res.progress * 100).toFixed(0) + '%' : '';
            if (res.eta) text += ' ETA: ' + Math.floor(res.eta) + 's';
            if (res.textinfo && res.textinfo.indexOf('\n') === -1) text = res.textinfo + ' ' + text;
            inner.style.width = ((res.progress || 0) * 100) + '%';
            inner.textContent = text;
            if (res.active) wasActive = true;
            if ((!res.active && wasActive) || (Date.now() - start > 40000 && !res.queued && !res.active)) {
                done(); return;
            }
            if (onProgress) onProgress(res);
            setTimeout(poll, 500);
        }).catch(done);
    };
    poll();
}
"""

WEBUI_PROGRESS_CSS = """
.progressDiv { position: relative; height: 22px; background: #ddd; border-radius: 6px; margin: 6px 0; }
.progressDiv .progress { height: 22px; background: #f97316; color: white; white-space: nowrap; line-height: 22px;
                         padding-left: 6px; border-radius: 6px; }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def inject_page_assets(monkeypatch):
    """Patches gradio's TemplateResponse like the WebUI does, adding the WebUI globals, lib_lora.js and style.css."""
    import gradio.routes

    head = (f"<script>{WEBUI_GLOBALS_JS}</script>"
            f"<script>{(REPO / 'javascript' / 'lib_lora.js').read_text(encoding='utf-8')}</script>"
            f"<style>{WEBUI_PROGRESS_CSS}{(REPO / 'style.css').read_text(encoding='utf-8')}</style>")
    original = gradio.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode())
        res.init_headers()
        return res

    monkeypatch.setattr(gradio.routes.templates, "TemplateResponse", template_response)


def test_tab_in_chromium_start_progress_and_loss_chart(webui_sd1, tmp_path, inject_page_assets,
                                                       torch_single_thread):
    import gradio as gr
    from playwright.sync_api import sync_playwright

    data = tmp_path / "data" / "10_sks dog"
    data.mkdir(parents=True)
    for i, photo in enumerate(dog_photos()[:5]):
        shutil.copy(photo, data / f"dog{i}.jpg")
        (data / f"dog{i}.txt").write_text("sks, dog\n", encoding="utf-8")

    webui_sd1.load_script("scripts/lib_lora_tab.py")
    (tab, title, elem_id), = webui_sd1.ui_tabs()
    with gr.Blocks(analytics_enabled=False, title="lib_lora browser check") as demo:
        with gr.Tabs():
            with gr.Tab(title, id=elem_id, elem_id=f"tab_{elem_id}"):
                tab.render()
    demo.queue(concurrency_count=4)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                show_error=False)
    webui_sd1.progress.setup_progress_api(demo.server_app)  # what webui.py does after launch
    shots = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#lib_lora_dataset_dir textarea", timeout=60_000)
            page.fill("#lib_lora_dataset_dir textarea", str(data.parent))
            page.click("#lib_lora_check")
            page.wait_for_function(
                "document.querySelector('#lib_lora_dataset_summary').innerText.includes('with repeats')",
                timeout=120_000)

            page.locator("#lib_lora_tabs button", has_text="Parameters").first.click()
            for name, value in (("max_train_steps", "40"), ("save_every_n_steps", "20"), ("output_name", "browserdog"),
                                ("trigger_words", "sks")):
                page.fill(f"#lib_lora_cfg_{name} textarea", value)
            for name, value in (("network_dim", "4"), ("network_alpha", "2"), ("resolution", "64"),
                                ("train_batch_size", "1")):
                page.fill(f"#lib_lora_cfg_{name} input", value)
            page.locator("#lib_lora_advanced").get_by_text("Advanced (every other setting)").click()
            page.fill("#lib_lora_cfg_min_bucket_reso input", "64")
            page.fill("#lib_lora_cfg_max_bucket_reso input", "128")
            page.check("#lib_lora_cfg_ignore_dataset_errors input")
            page.keyboard.press("Tab")

            page.locator("#lib_lora_tabs button", has_text="Run").first.click()
            page.click("#lib_lora_start")
            page.wait_for_selector(".progressDiv .progress", timeout=60_000)
            page.wait_for_function("/%/.test(document.querySelector('.progressDiv .progress').textContent)",
                                   timeout=120_000)
            progress_text = page.inner_text(".progressDiv .progress")
            page.wait_for_selector("#lib_lora_loss_chart img", timeout=120_000)
            shots.append(tmp_path / "lib_lora_tab_running.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            page.wait_for_function("document.querySelector('#lib_lora_status').innerText.includes('finished')",
                                   timeout=600_000)
            page.wait_for_timeout(2500)  # one more refresh: chart and checkpoints of the end
            shots.append(tmp_path / "lib_lora_tab_finished.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            status = page.inner_text("#lib_lora_status")
            checkpoints = page.inner_text("#lib_lora_checkpoints")
            chart_src = page.get_attribute("#lib_lora_loss_chart img", "src")
            runs = page.inner_text("#lib_lora_runs")
            browser.close()
    finally:
        demo.close()
        out = os.environ.get("LIB_LORA_TEST_OUTPUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            for shot in shots:
                if shot.exists():
                    shutil.copy(shot, Path(out) / shot.name)
    print("screenshots:", *shots)
    assert "%" in progress_text, progress_text
    assert "step 40 / 40" in status, status
    assert "browserdog-step00000020.safetensors" in checkpoints
    assert chart_src
    assert "browserdog" in runs, runs  # the runs table lists the run once it has ended
    assert (webui_sd1.lora_dir / "lib_lora" / "browserdog" / "browserdog.safetensors").is_file() or any(
        webui_sd1.lora_dir.rglob("browserdog.safetensors"))
    assert not errors, errors
