// lib_lora: the "LoRA Trainer" tab's browser side (every global starts with lib_lora_).
// Start: like the WebUI's javascript/textualInversion.js, replaces argument 0 with randomId() and shows the WebUI's
// progress bar (javascript/progressbar.js requestProgress, which polls /internal/progress for progress, ETA and
// textinfo). While a job runs and the tab is visible, the hidden-in-spirit "Refresh" button is clicked every
// lib_lora_REFRESH_MS so the status, loss chart, samples and checkpoints follow the run.

var lib_lora_REFRESH_MS = 2000;
var lib_lora_timer = null;
var lib_lora_ticks_since_start = 0;
var lib_lora_was_visible = false;

function lib_lora_app() {
    return typeof gradioApp === 'function' ? gradioApp() : document;
}

function lib_lora_click_refresh() {
    var btn = lib_lora_app().getElementById('lib_lora_refresh');
    if (btn) btn.click();
}

function lib_lora_state() {
    var box = lib_lora_app().querySelector('#lib_lora_state textarea, #lib_lora_state input');
    return box ? box.value : '';
}

function lib_lora_visible() {
    var tab = lib_lora_app().getElementById('lib_lora_tab_run');
    return !!(tab && tab.offsetParent !== null);
}

function lib_lora_tick() {
    var visible = lib_lora_visible();
    var state = lib_lora_state();
    var active = state === 'queued' || state === 'running' || state === 'stopping';
    lib_lora_ticks_since_start += 1;
    // refresh while a job runs, for a few ticks after Start (the job may still be starting), and once when the
    // Run tab becomes visible (a job started through the API shows up)
    if (visible && (active || lib_lora_ticks_since_start <= 3 || !lib_lora_was_visible)) {
        lib_lora_click_refresh();
    }
    lib_lora_was_visible = visible;
}

function lib_lora_start_polling() {
    lib_lora_ticks_since_start = 0;
    if (lib_lora_timer === null) {
        lib_lora_timer = setInterval(lib_lora_tick, lib_lora_REFRESH_MS);
    }
}

function lib_lora_start() {
    var res = Array.from(arguments);
    var id = typeof randomId === 'function' ? randomId() :
        'task(' + Math.random().toString(36).slice(2, 12) + ')';
    res[0] = id;
    var container = lib_lora_app().getElementById('lib_lora_progress');
    if (typeof requestProgress === 'function' && container) {
        // inactivity timeout 10 s (the WebUI's default is 40): a refused Start (the job never gets queued) must not
        // leave a "Waiting..." bar; an accepted job is queued at once, which keeps the bar.
        requestProgress(id, container, null, function() {
            lib_lora_click_refresh();
        }, null, 10);
    }
    lib_lora_start_polling();
    return res;
}

function lib_lora_send_to_grid(runName) {
    // copies the run name and opens txt2img, where the "LoRA checkpoint x weight grid" Script takes it
    try {
        if (runName && navigator.clipboard) navigator.clipboard.writeText(runName);
    } catch (e) {
        // clipboard needs a secure context; the hint below names the run anyway
    }
    if (runName && typeof switch_to_txt2img === 'function') {
        setTimeout(switch_to_txt2img, 1500);
    }
    return [runName];
}

if (typeof onUiLoaded === 'function') {
    onUiLoaded(lib_lora_start_polling);
} else {
    document.addEventListener('DOMContentLoaded', function() {
        setTimeout(lib_lora_start_polling, 1000);
    });
}
