"""One LoRA training job at a time inside the WebUI, on the model it has loaded (``shared.sd_model``).

:class:`TrainingJobs` is what the tab (``scripts/lib_lora_tab.py``) and the API (``scripts/lib_lora_api.py``)
share, through the process-wide :func:`get_jobs`. :meth:`TrainingJobs.start` checks everything it can at once
(config, a job already running, the model, ``--lowvram``/``--medvram``) and raises :class:`JobError` /
``ConfigError`` with a message for the user; the run itself happens on a background thread that:

1. waits for the WebUI's queue lock (``host.lock``; the job shows as "queued" and in the progress API queue), so
   that no generation runs while the weights are in training shape, and a generation asked for meanwhile waits;
2. registers with the progress API like the built-in trainers (``host.begin_job``; ``update_job`` after each step
   with textinfo "step N/M, loss x, ETA ..."), and stops (saving) when the WebUI's Interrupt button is pressed;
3. trains inside ``lib_lora.webui_model.training_session`` (merged LoRAs taken out, checksum, modes/devices and
   attention optimizations restored, ``torch_gc``), with :class:`lib_lora.trainer.Trainer`;
4. writes into ``<--lora-dir>/<output sub-folder>/<output_name>/``: checkpoints with metadata for the loaded
   model's version and the ``.json`` sidecar (both by the trainer), ``<stem>.preview.png`` from the latest
   sample, and refreshes the WebUI's Lora list whenever a checkpoint lands. Resume states are moved out of the
   Lora folder (to ``<data dir>/lib_lora/states/...``), because the WebUI would list their ``.safetensors`` and
   ``.pt`` files as LoRAs.

Sources: A1111 v1.10.1 ``modules/textual_inversion/ui.py`` (refuses --lowvram, undoes/re-applies the attention
optimizations), ``textual_inversion.py`` (``shared.state`` use), ``modules/call_queue.py``.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .control import ProgressInfo, TrainCallbacks, TrainCommands
from .errors import ConfigError, DatasetError, LoraError
from .safetensors_io import atomic_write_bytes
from .webui_api import output_path_inside, sanitize_output_name
from .webui_host import WebUIHost

logger = logging.getLogger("lib_lora")

STATES = ("idle", "queued", "running", "stopping", "finished", "stopped", "failed")
#: Kept in the status: the last messages and loss-history points.
MAX_MESSAGES = 200
MAX_HISTORY = 20000


class JobError(LoraError):
    """A training job cannot start: another one is running (``http_status`` 409), the model or the WebUI's
    memory mode cannot be trained on (409), or the request is unusable (400). The message is for the user."""

    def __init__(self, message: str, http_status: int = 400):
        super().__init__(message)
        self.http_status = http_status


def _num(x: Any) -> float | None:
    """A float for JSON: None for None, NaN and infinities."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def format_eta(seconds: float | None) -> str:
    """``"1h 02m"``, ``"3m 05s"``, ``"12s"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def progress_text(info: ProgressInfo) -> str:
    """The progress line shown by the WebUI's progress bar: ``"LoRA training: step 3/100, loss 0.1234, 2.35 it/s"``
    (loss = moving average). No ETA here: the bar adds its own (``modules/progress.py`` from job_no/job_count),
    and two different ETAs side by side confuse; :meth:`TrainingJobs.status` has ours."""
    loss = info.avg_loss if info.avg_loss is not None and math.isfinite(info.avg_loss) else info.loss
    return f"LoRA training: step {info.step}/{info.total}, loss {loss:.4f}, {info.it_per_s:.2f} it/s"


def new_job_id() -> str:
    """A job id in the WebUI's task format (``progress.create_task_id``): ``"task(lib_lora-<12 hex>)"``."""
    return f"task(lib_lora-{uuid.uuid4().hex[:12]})"


class _Job:
    def __init__(self, job_id: str, config: TrainConfig, out_dir: Path, states_dir: Path, tensorboard: bool):
        self.job_id = job_id
        self.config = config
        self.out_dir = out_dir
        self.states_dir = states_dir
        self.commands = TrainCommands()
        self.state = "queued"
        self.step = 0
        self.total = 0
        self.epoch = 0
        self.total_epochs = 0
        self.loss = self.avg_loss = self.lr = self.eta_s = self.it_per_s = None
        self.checkpoints: list[dict] = []
        self.samples: list[str] = []
        self.messages: list[str] = []
        self.error: str | None = None
        self.log_dir: str | None = None
        self.tensorboard = tensorboard
        self.history = {"step": [], "loss": [], "avg_loss": [], "lr": []}
        self.thread: threading.Thread | None = None
        self.result = None

    def message(self, text: str) -> None:
        # Resume states are moved out of the Lora folder after each save: name the folder they end up in.
        pattern = re.escape(str(self.out_dir)) + r"[/\\]([^/\\\s]+-state)"
        text = re.sub(pattern, lambda m: str(self.states_dir / m.group(1)), text)
        self.messages.append(text)
        del self.messages[:-MAX_MESSAGES]


class TrainingJobs:
    """The training job of one WebUI process (one at a time).

    Args:
        host: the WebUI, see :class:`lib_lora.webui_host.WebUIHost`.
    """

    def __init__(self, host: WebUIHost):
        self.host = host
        self._mutex = threading.RLock()
        self._job: _Job | None = None

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def running(self) -> bool:
        """True while a job is queued, running or stopping."""
        job = self._job
        return job is not None and job.state in ("queued", "running", "stopping")

    def output_dir_for(self, output_name: str) -> Path:
        """Where a run called ``output_name`` writes: ``<lora_dir>/<output sub-folder>/<output_name>``.

        Raises:
            ConfigError: a name with separators or ``..``, or a path that would leave the Lora folder.
        """
        return output_path_inside(self.host.lora_dir, self.host.output_subdir(), output_name)

    def status(self) -> dict:
        """The current (or last) job as a JSON-ready dict: ``job_id``, ``state`` (one of :data:`STATES`),
        ``step``/``total`` (optimizer steps), ``epoch``/``total_epochs``, ``loss``/``avg_loss`` (float or None),
        ``lr``, ``eta_s`` (seconds), ``it_per_s``, ``last_checkpoint`` (path or None), ``checkpoints``
        ([{path, step, epoch, loss}]), ``samples`` (paths), ``messages``, ``error``, ``output_dir``, ``log_dir``,
        ``tensorboard_command``, ``history`` ({step, loss, avg_loss, lr} lists)."""
        with self._mutex:
            job = self._job
            if job is None:
                return {"job_id": None, "state": "idle", "step": 0, "total": 0, "epoch": 0, "total_epochs": 0,
                        "loss": None, "avg_loss": None, "lr": None, "eta_s": None, "it_per_s": None,
                        "last_checkpoint": None, "checkpoints": [], "samples": [], "messages": [], "error": None,
                        "output_dir": None, "log_dir": None, "tensorboard_command": None,
                        "history": {"step": [], "loss": [], "avg_loss": [], "lr": []}}
            log_dir = job.log_dir
            tb = f'tensorboard --logdir "{log_dir}"' if (log_dir and job.tensorboard) else None
            return {
                "job_id": job.job_id, "state": job.state, "step": job.step, "total": job.total,
                "epoch": job.epoch, "total_epochs": job.total_epochs, "loss": _num(job.loss),
                "avg_loss": _num(job.avg_loss), "lr": _num(job.lr), "eta_s": _num(job.eta_s),
                "it_per_s": _num(job.it_per_s),
                "last_checkpoint": job.checkpoints[-1]["path"] if job.checkpoints else None,
                "checkpoints": [dict(c) for c in job.checkpoints], "samples": list(job.samples),
                "messages": list(job.messages), "error": job.error, "output_dir": str(job.out_dir),
                "log_dir": log_dir, "tensorboard_command": tb,
                "history": {k: [_num(v) if k != "step" else v for v in vals] for k, vals in job.history.items()},
            }

    def runs(self) -> list[dict]:
        """The runs under ``<lora_dir>/<output sub-folder>/`` (:func:`lib_lora.webui_grid.list_runs`): [{"name",
        "folder", "files": [{"path", "stem", "label", "epoch", "step", "final"}]}], sorted by folder then run
        name. Missing folder = []."""
        from .webui_grid import list_runs

        runs = list_runs(self.host.lora_dir / self.host.output_subdir()).values()
        return [{"name": run.name, "folder": str(run.folder),
                 "files": [{"path": str(f.path), "stem": f.stem, "label": f.label, "epoch": f.epoch, "step": f.step,
                            "final": f.final} for f in run.files]}
                for run in sorted(runs, key=lambda r: (str(r.folder), r.name))]

    # ----------------------------------------------------------------------------------------------- commands
    def prepare_config(self, config: dict | TrainConfig) -> TrainConfig:
        """The config a job will run: from a dict (TOML keys; unknown keys raise ConfigError with suggestions) or
        a TrainConfig, with ``output_dir`` forced to :meth:`output_dir_for`, ``logging_dir`` = ``<output_dir>/
        logs``, ``model`` = the loaded checkpoint's name (for the record), ``device`` = "auto"; validated.

        Raises:
            ConfigError, DatasetError: bad values, no dataset folder.
        """
        if isinstance(config, TrainConfig):
            cfg = config.replace()
        elif isinstance(config, dict):
            cfg = TrainConfig.from_dict(config)
        else:
            raise ConfigError(f"a training config must be a dict or TrainConfig, got {type(config).__name__}")
        name = sanitize_output_name(cfg.output_name)
        out_dir = self.output_dir_for(name)
        existing = sorted(p.name for p in out_dir.glob("*.safetensors")) if out_dir.is_dir() else []
        if existing and not cfg.resume:
            raise ConfigError(f"a run named {name!r} already exists ({len(existing)} LoRA files in {out_dir}); "
                              "choose another output_name, move or delete that folder, or resume it")
        # TensorBoard logs outside the Lora folder: the Lora tab turns every sub-folder into a filter button.
        logs = self.host.data_dir / "lib_lora" / "logs" / out_dir.relative_to(Path(self.host.lora_dir).resolve())
        cfg = cfg.replace(output_name=name, output_dir=str(out_dir), logging_dir=str(logs),
                          device="auto")
        cfg.validate()
        if not cfg.train_data_dir:
            raise ConfigError("train_data_dir is not set: point it at a folder of images (or of N_name folders)")
        if not Path(cfg.train_data_dir).is_dir():
            raise DatasetError(f"dataset folder {cfg.train_data_dir} does not exist or is not a folder")
        from .optimizers import get_optimizer_class

        get_optimizer_class(cfg.optimizer)
        return cfg

    def _check_model(self, sd_model, cfg: TrainConfig) -> None:
        from .webui_model import check_memory_flags, detect_support

        reason = detect_support(sd_model)
        if reason:
            raise JobError(reason, http_status=409)
        is_sdxl = bool(getattr(sd_model, "is_sdxl", False))
        medvram = self.host.medvram or (self.host.medvram_sdxl and is_sdxl)
        train_te = not cfg.network_train_unet_only and (cfg.text_encoder_lr is None or cfg.text_encoder_lr > 0)
        reason = check_memory_flags(self.host.lowvram, medvram, train_te)
        if reason:
            raise JobError(reason, http_status=409)

    def start(self, config: dict | TrainConfig, job_id: str | None = None) -> str:
        """Checks and starts a training job on a background thread; returns its job id (``job_id`` or a new
        ``"task(lib_lora-...)"``, the id the WebUI's progress API knows it by).

        Raises:
            JobError: a job is already running (409); no model / unsupported model / --lowvram / --medvram with
                text-encoder training (409).
            ConfigError, DatasetError: bad config (unknown keys with suggestions, bad values, bad output name,
                missing dataset folder).
        """
        with self._mutex:
            if self.running:
                job = self._job
                raise JobError(f"A LoRA training job is already running ({job.job_id}, {job.state}, step "
                               f"{job.step}/{job.total or '?'}); stop it or wait for it to finish.", 409)
            cfg = self.prepare_config(config)
            sd_model = self.host.get_model()
            self._check_model(sd_model, cfg)
            job_id = job_id or new_job_id()
            states_dir = self.host.data_dir / "lib_lora" / "states" / Path(cfg.output_dir).relative_to(
                Path(self.host.lora_dir).resolve())
            job = _Job(job_id, cfg.replace(model=str(_model_name(sd_model))), Path(cfg.output_dir), states_dir,
                       bool(self.host.tensorboard_enabled()))
            job.message(f"queued: waiting for the WebUI to finish its current task; output {cfg.output_dir}")
            # Known before the run starts: TensorBoard can be opened on it while training (each run of this name
            # writes a time-stamped sub-folder there).
            job.log_dir = cfg.logging_dir
            self._job = job
            self.host.queue_job(job_id)
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"lib_lora {job_id}", daemon=True)
            job.thread.start()
            return job_id

    def stop(self) -> bool:
        """Asks the job to stop: it finishes the current step, saves a checkpoint (and a resume state) and ends
        as "stopped"; a queued job ends without training. Returns False when no job is queued or running."""
        with self._mutex:
            job = self._job
            if job is None or job.state not in ("queued", "running", "stopping"):
                return False
            job.commands.stop()
            if job.state == "running":
                job.state = "stopping"
            job.message("stop requested: finishing the step and saving")
            return True

    def save_now(self) -> bool:
        """Asks the running job to write a checkpoint after the current step. False when nothing is running."""
        job = self._job
        if job is None or job.state != "running":
            return False
        job.commands.save_now()
        job.message("save requested: a checkpoint is written after this step")
        return True

    def wait(self, timeout: float | None = None) -> dict:
        """Waits (at most ``timeout`` seconds) for the job's thread to end; returns :meth:`status`."""
        job = self._job
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.status()

    # --------------------------------------------------------------------------------------------- the run
    def _run(self, job: _Job) -> None:
        host = self.host
        with host.lock:
            if job.commands.stop_requested:
                job.state = "stopped"
                job.message("stopped before it started")
                try:
                    host.begin_job(job.job_id, 0)
                finally:
                    host.end_job(job.job_id)
                return
            try:
                host.begin_job(job.job_id, job.config.max_train_steps or 0)
                job.state = "running" if not job.commands.stop_requested else "stopping"
                self._train(job)
            except BaseException as exc:  # noqa: BLE001 - reported to the user, never raised on the thread
                job.state = "failed"
                job.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, LoraError) else str(exc)
                job.message(f"failed: {job.error}")
                if not isinstance(exc, LoraError):  # an unexpected error: keep the traceback in the WebUI log
                    logger.error("LoRA training job %s failed", job.job_id, exc_info=exc)
            finally:
                try:
                    self._finish_files(job)
                finally:
                    host.end_job(job.job_id)

    def _train(self, job: _Job) -> None:
        from .trainer import Trainer
        from .webui_model import WebUIModel, training_session

        host = self.host
        sd_model = host.get_model()
        self._check_model(sd_model, job.config)  # the model may have changed while the job was queued

        def on_progress(info: ProgressInfo) -> None:
            job.step, job.total, job.epoch, job.total_epochs = info.step, info.total, info.epoch, info.total_epochs
            job.loss, job.avg_loss, job.lr = info.loss, info.avg_loss, info.lr
            job.eta_s, job.it_per_s = info.eta_s, info.it_per_s
            h = job.history
            if len(h["step"]) < MAX_HISTORY:
                h["step"].append(info.step)
                h["loss"].append(info.loss)
                h["avg_loss"].append(info.avg_loss)
                h["lr"].append(info.lr)
            host.update_job(info.step, info.total, progress_text(info))
            if host.interrupted() and not job.commands.stop_requested:
                job.message("Interrupt pressed: finishing the step and saving")
                job.commands.stop()
                job.state = "stopping"

        def on_saved(path: str, step: int, epoch: int) -> None:
            job.checkpoints.append({"path": path, "step": step, "epoch": epoch, "loss": _num(job.avg_loss)})
            self._copy_preview(job, Path(path))
            self._move_states(job)
            try:
                host.refresh_loras()
            except Exception as exc:  # noqa: BLE001 - a refresh failure must not end the run
                job.message(f"could not refresh the Lora list: {exc}")

        def on_sample(path: str, step: int, prompt: str) -> None:
            job.samples.append(path)
            image = None
            try:
                from PIL import Image

                with Image.open(path) as im:
                    image = im.convert("RGB")
            except Exception:  # noqa: BLE001 - the preview is optional
                image = None
            host.update_job(job.step, job.total or 1, f"LoRA training: sample at step {step}", image)

        callbacks = TrainCallbacks(on_progress=on_progress, on_message=job.message, on_saved=on_saved,
                                   on_sample=on_sample)
        with training_session(sd_model, undo_lora=lambda: host.undo_lora(sd_model),
                              undo_optimizations=host.undo_optimizations,
                              apply_optimizations=host.apply_optimizations, torch_gc=host.torch_gc):
            model = WebUIModel(sd_model, autocast=host.autocast, device=host.device)
            trainer = Trainer(job.config, model, callbacks=callbacks, commands=job.commands, sampler=host.sampler)
            result = trainer.run()
        job.result = result
        job.state = "finished" if result.status in ("completed", "early_stopped") else "stopped"

    # ------------------------------------------------------------------------------------------- outputs
    def _copy_preview(self, job: _Job, lora_path: Path) -> None:
        """``<stem>.preview.png`` = the latest sample image (the WebUI's Lora card preview)."""
        if not job.samples:
            return
        src = Path(job.samples[-1])
        if not src.is_file():
            return
        dst = lora_path.with_name(f"{lora_path.stem}.preview.png")
        try:
            atomic_write_bytes(dst, src.read_bytes())
        except OSError as exc:
            job.message(f"could not write the preview {dst.name}: {exc}")

    def _move_states(self, job: _Job) -> None:
        """Moves ``*-state`` folders out of the Lora folder (their .safetensors/.pt files would show as LoRAs)."""
        if not job.out_dir.is_dir():
            return
        for folder in job.out_dir.glob("*-state"):
            if not folder.is_dir():
                continue
            target = job.states_dir / folder.name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    shutil.rmtree(target)
                shutil.move(str(folder), str(target))
            except OSError as exc:
                job.message(f"could not move the resume state {folder.name}: {exc}")

    def _finish_files(self, job: _Job) -> None:
        """After the run (any outcome): states moved out of the Lora folder, the newest checkpoint's preview
        refreshed from the newest sample, the Lora list refreshed, the resume path reported."""
        self._move_states(job)
        if job.checkpoints:
            self._copy_preview(job, Path(job.checkpoints[-1]["path"]))
        result = job.result
        if result is not None and result.state_dir:
            moved = job.states_dir / Path(result.state_dir).name
            if moved.is_dir():
                job.message(f"resume state: {moved} (train again with resume = that folder)")
        if job.state == "failed" and job.checkpoints:
            job.message(f"the last good checkpoint is kept: {job.checkpoints[-1]['path']}")
        try:
            self.host.refresh_loras()
        except Exception as exc:  # noqa: BLE001
            job.message(f"could not refresh the Lora list: {exc}")
        if job.state in ("running", "stopping", "queued"):
            job.state = "stopped" if job.commands.stop_requested else "failed"


def _model_name(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return str(getattr(info, "filename", None) or getattr(info, "model_name", None) or "webui-model")


_jobs: TrainingJobs | None = None
_jobs_lock = threading.Lock()


def get_jobs(make_host: Callable[[], WebUIHost]) -> TrainingJobs:
    """The process-wide :class:`TrainingJobs`, so that the tab and the API share one job. The first call builds
    it with ``make_host()``; later calls replace its host with a fresh ``make_host()`` while no job runs (Reload
    UI re-executes the scripts and passes new module objects), else keep the running job's host."""
    global _jobs
    with _jobs_lock:
        if _jobs is None:
            _jobs = TrainingJobs(make_host())
        elif not _jobs.running:
            _jobs.host = make_host()
        return _jobs


def reset_jobs_for_tests(timeout: float = 60.0) -> None:
    """Stops the current job (waiting up to ``timeout`` seconds) and forgets the singleton (tests only)."""
    global _jobs
    with _jobs_lock:
        jobs, _jobs = _jobs, None
    if jobs is not None and jobs.running:
        jobs.stop()
        jobs.wait(timeout)
