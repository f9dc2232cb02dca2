"""Everything the training jobs, the tab and the API need from the AUTOMATIC1111 WebUI, as plain values and callables.

lib_lora never imports the WebUI's ``modules``: the thin files in ``scripts/`` import them and pass them to
:func:`host_from_webui`, which wraps them in a :class:`WebUIHost`. Tests build a host from the stand-in in
``tests/webui_stub`` the same way, or fill a :class:`WebUIHost` by hand.

Sources (A1111 v1.10.1): ``modules/call_queue.py`` (``queue_lock``, how ``wrap_gradio_gpu_call`` registers a job),
``modules/progress.py`` (``add_task_to_queue``/``start_task``/``finish_task``), ``modules/shared_state.py``
(``begin``/``end``, ``job_count``/``job_no``/``textinfo``, ``interrupted``, ``assign_current_image``),
``modules/textual_inversion/ui.py`` + ``textual_inversion.py`` (what the built-in trainer does around a run),
``extensions-builtin/Lora/networks.py`` (``list_available_networks``, ``network_restore_weights_from_backup``,
the ``network_weights_backup``/``network_current_names`` bookkeeping), ``modules/interrogate.py`` and
``modules/deepbooru.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Settings keys (registered by ``scripts/lib_lora_api.py`` with ``on_ui_settings``).
OPT_DATASET_ROOTS = "lib_lora_dataset_roots"
OPT_OUTPUT_SUBDIR = "lib_lora_output_subdir"
OPT_TENSORBOARD = "lib_lora_tensorboard"
#: Local open_clip weights for the grid Script's scores, "ARCH:FILE" (see lib_lora.scoring); never downloaded.
OPT_CLIP_MODEL = "lib_lora_clip_model_path"
#: Settings section (id, label).
SETTINGS_SECTION = ("lib_lora", "LoRA Trainer")
#: Defaults of the settings above.
DEFAULT_OUTPUT_SUBDIR = "lib_lora"
DEFAULT_DATASET_ROOTS = ""
DEFAULT_TENSORBOARD = True


def _noop(*_args, **_kwargs) -> None:
    return None


def split_roots(text: str | None) -> list[str]:
    """The folders of the "allowed dataset roots" setting: one per line or separated by ";" (blank ignored)."""
    return [p.strip() for p in re.split(r"[;\n]", text or "") if p.strip()]


@dataclass
class WebUIHost:
    """The WebUI seen by lib_lora.

    Attributes:
        get_model: ``() -> sd_model | None`` (``shared.sd_model``; only called when a job starts, never at import).
        lock: context manager held while training (``call_queue.queue_lock``: a generation waits meanwhile).
        autocast: ``() -> context manager`` (``devices.autocast``).
        begin_job: ``(job_id, total_steps)``: registers the job with the progress API and ``shared.state``.
        update_job: ``(step, total, textinfo, image=None)``: ``state.job_no/job_count/textinfo``, live preview.
        end_job: ``(job_id)``: ``progress.finish_task`` and ``state.end``; resets the interrupt flags.
        queue_job: ``(job_id)``: marks the job queued (``progress.add_task_to_queue``) while it waits for ``lock``.
        interrupted: ``() -> bool`` (``shared.state.interrupted``: the WebUI's Interrupt button).
        lora_dir: the WebUI's Lora folder (``--lora-dir``); data_dir: the WebUI's data folder (``--data-dir``).
        allowed_roots: ``() -> list[Path]``: folders datasets may come from (API): ``data_dir`` plus the setting.
        output_subdir: ``() -> str``: sub-folder of ``lora_dir`` for trained LoRAs (setting, default "lib_lora").
        tensorboard_enabled: ``() -> bool`` (setting).
        refresh_loras: ``()``: re-scans the Lora folder (``networks.list_available_networks``).
        undo_lora: ``(sd_model)``: puts back the weights the built-in Lora extension merged in.
        undo_optimizations / apply_optimizations / torch_gc: ``()`` (``sd_hijack``, ``devices.torch_gc``).
        lowvram / medvram / medvram_sdxl / no_half: the command-line flags.
        device: ``devices.device`` (where inputs go; None = the UNet's device).
        interrogators: ``() -> list[str]`` among "BLIP", "DeepBooru".
        interrogate: ``(kind, pil_image) -> str`` caption; raises ValueError for an unknown kind.
        sampler: optional sample-image maker for the trainer (see :data:`lib_lora.trainer.Sampler`); None = the
            headless DDIM sampler.
    """

    get_model: Callable[[], Any]
    lora_dir: Path
    data_dir: Path
    lock: Any = field(default_factory=contextlib.nullcontext)
    autocast: Callable[[], Any] = contextlib.nullcontext
    begin_job: Callable[[str, int], None] = _noop
    update_job: Callable[..., None] = _noop
    end_job: Callable[[str], None] = _noop
    queue_job: Callable[[str], None] = _noop
    interrupted: Callable[[], bool] = lambda: False
    allowed_roots: Callable[[], list[Path]] | None = None
    output_subdir: Callable[[], str] = lambda: DEFAULT_OUTPUT_SUBDIR
    tensorboard_enabled: Callable[[], bool] = lambda: DEFAULT_TENSORBOARD
    refresh_loras: Callable[[], None] = _noop
    undo_lora: Callable[[Any], None] = _noop
    undo_optimizations: Callable[[], None] = _noop
    apply_optimizations: Callable[[], None] = _noop
    torch_gc: Callable[[], None] = _noop
    lowvram: bool = False
    medvram: bool = False
    medvram_sdxl: bool = False
    no_half: bool = False
    device: Any = None
    interrogators: Callable[[], list[str]] = list
    interrogate: Callable[[str, Any], str] | None = None
    sampler: Callable[..., Any] | None = None

    def __post_init__(self):
        self.lora_dir = Path(self.lora_dir)
        self.data_dir = Path(self.data_dir)
        if self.allowed_roots is None:
            self.allowed_roots = lambda: [self.data_dir]


def undo_merged_lora(sd_model, networks) -> int:
    """Puts back the base weights of every layer the built-in Lora extension merged a LoRA into (its "merge" mode
    keeps a CPU backup in ``network_weights_backup``/``network_bias_backup``; see webui-internals 2.4), clears
    ``network_current_names`` and empties ``networks.loaded_networks`` (else the patched forwards re-merge the
    last prompt's LoRAs during training), so that the next generation re-applies the LoRAs it asks for.

    Returns:
        how many layers were restored. Does nothing (0) when ``networks`` is None (Lora extension disabled).
    """
    if networks is None or sd_model is None:
        return 0
    # The extension's patched forwards re-merge whatever ``loaded_networks`` holds on the next forward (ours
    # included): empty it, so training sees base weights; the next generation loads what its prompt asks for.
    loaded = getattr(networks, "loaded_networks", None)
    if isinstance(loaded, list):
        loaded.clear()
    restored = 0
    # The WebUI leaves UNet weights with requires_grad=True, and networks.network_restore_weights_from_backup does
    # a plain ``param.copy_(backup)``: without no_grad that raises "a leaf Variable that requires grad is being
    # used in an in-place operation" (seen in a real v1.10.1 after a txt2img with a LoRA).
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_weights_backup", None) is None and \
                    getattr(module, "network_bias_backup", None) is None:
                continue
            if getattr(module, "network_current_names", ()) != ():
                networks.network_restore_weights_from_backup(module)
                restored += 1
            module.network_current_names = ()
    return restored


def _opt(shared, key: str, default):
    """A setting's value; works before ``on_ui_settings`` registered the key (``opts.data`` holds config.json)."""
    opts = getattr(shared, "opts", None)
    if opts is None:
        return default
    value = opts.data.get(key, None)
    return default if value is None else value


def host_from_webui(shared, devices, call_queue, progress, sd_hijack, networks=None, deepbooru=None) -> WebUIHost:
    """Builds the :class:`WebUIHost` of a running WebUI from its modules (passed in by ``scripts/``).

    Args:
        shared, devices, call_queue, progress, sd_hijack: ``modules.<name>``.
        networks: the built-in Lora extension's top-level ``networks`` module, or None when it is disabled (then
            merged LoRAs cannot be undone and the Lora list is not refreshed).
        deepbooru: ``modules.deepbooru`` or None (then only BLIP is offered).

    Nothing here touches ``shared.sd_model`` (a lazy property that would load a checkpoint).
    """
    cmd_opts = shared.cmd_opts
    data_dir = Path(getattr(cmd_opts, "data_dir", None) or getattr(shared, "data_path", None) or os.getcwd())
    lora_dir = Path(getattr(cmd_opts, "lora_dir", None) or data_dir / "models" / "Lora")

    def begin_job(job_id: str, total_steps: int) -> None:
        # What wrap_gradio_gpu_call does inside queue_lock, with the step counts of textual_inversion.train_embedding.
        shared.state.begin(job=job_id)
        progress.start_task(job_id)
        shared.state.job_count = int(total_steps)
        shared.state.job_no = 0
        shared.state.textinfo = "Preparing LoRA training..."

    def update_job(step: int, total: int, textinfo: str, image=None) -> None:
        state = shared.state
        state.job_count = int(total)
        state.job_no = int(step)
        state.textinfo = textinfo
        if image is not None:
            state.assign_current_image(image)

    def end_job(job_id: str) -> None:
        # progress.finish_task + state.end (wrap_gradio_gpu_call), then the resets of wrap_gradio_call.
        try:
            progress.finish_task(job_id)
            shared.state.end()
        finally:
            state = shared.state
            state.skipped = False
            state.interrupted = False
            state.stopping_generation = False
            state.job_count = 0
            state.job = ""

    def allowed_roots() -> list[Path]:
        return [data_dir] + [Path(p) for p in split_roots(_opt(shared, OPT_DATASET_ROOTS, DEFAULT_DATASET_ROOTS))]

    def output_subdir() -> str:
        return str(_opt(shared, OPT_OUTPUT_SUBDIR, DEFAULT_OUTPUT_SUBDIR)).strip()

    def tensorboard_enabled() -> bool:
        return bool(_opt(shared, OPT_TENSORBOARD, DEFAULT_TENSORBOARD))

    def refresh_loras() -> None:
        if networks is not None:
            networks.list_available_networks()

    def interrogators() -> list[str]:
        kinds = []
        if getattr(shared, "interrogator", None) is not None:
            kinds.append("BLIP")
        if deepbooru is not None:
            kinds.append("DeepBooru")
        return kinds

    def interrogate(kind: str, pil_image) -> str:
        # The WebUI's own interrogate buttons run under the queue lock (wrap_gradio_gpu_call); so does this.
        with call_queue.queue_lock:
            if kind == "BLIP" and getattr(shared, "interrogator", None) is not None:
                return shared.interrogator.interrogate(pil_image.convert("RGB"))
            if kind == "DeepBooru" and deepbooru is not None:
                return deepbooru.model.tag(pil_image)
        raise ValueError(f"unknown interrogator {kind!r}; available: {', '.join(interrogators()) or 'none'}")

    return WebUIHost(
        get_model=lambda: shared.sd_model,
        lora_dir=lora_dir,
        data_dir=data_dir,
        lock=call_queue.queue_lock,
        autocast=devices.autocast,
        begin_job=begin_job,
        update_job=update_job,
        end_job=end_job,
        queue_job=progress.add_task_to_queue,
        interrupted=lambda: bool(shared.state.interrupted),
        allowed_roots=allowed_roots,
        output_subdir=output_subdir,
        tensorboard_enabled=tensorboard_enabled,
        refresh_loras=refresh_loras,
        undo_lora=lambda sd_model: undo_merged_lora(sd_model, networks),
        undo_optimizations=sd_hijack.undo_optimizations if hasattr(sd_hijack, "undo_optimizations")
        else sd_hijack.model_hijack.undo_optimizations,
        apply_optimizations=sd_hijack.model_hijack.apply_optimizations,
        torch_gc=devices.torch_gc,
        lowvram=bool(getattr(cmd_opts, "lowvram", False)),
        medvram=bool(getattr(cmd_opts, "medvram", False)),
        medvram_sdxl=bool(getattr(cmd_opts, "medvram_sdxl", False)),
        no_half=bool(getattr(cmd_opts, "no_half", False)),
        device=getattr(devices, "device", None),
        interrogators=interrogators,
        interrogate=interrogate,
    )
