"""``Trainer``: trains a LoRA network on a :class:`~lib_lora.model_api.DiffusionModel` from a :class:`TrainConfig`.

Read top to bottom: :meth:`Trainer.run` prepares (dataset, network, optimizer, resume), caches latents, runs the
epoch loop with :meth:`Trainer._train_step` (the maths of one step, as sd-scripts ``train_network.py``), and saves.
The host (CLI, WebUI tab, tests) talks to it through :class:`~lib_lora.control.TrainCallbacks` and
:class:`~lib_lora.control.TrainCommands`.

Never lost work: files are written atomically; a non-finite loss stops the run before anything is saved, so the
last good checkpoint stays as it was; a stop request finishes the step, then saves the LoRA and a resume state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import PngImagePlugin

from . import __version__, checkpointing, recompute, schedules
from .config import TrainConfig
from .control import ProgressInfo, TrainCallbacks, TrainCommands
from .data.buckets import BucketSpec
from .data.captions import CaptionOptions
from .data.dataset import DatasetReport, ScanOptions, TrainDataset, scan_dataset
from .errors import ConfigError, DatasetError, FormatError, TrainingError
from .metadata import build_ss_metadata, finalize_for_save
from .model_api import DiffusionModel
from .network import LoRANetwork
from .optimizers import build_optimizer, optimizer_display_name
from .plateau import LossRecorder, PlateauController
from .safetensors_io import atomic_write_bytes, load_lora_file, save_dtype_from_name, save_lora_file
from .sidecar import write_sidecar
from .state import load_state, save_state, set_rng_state
from .train_log import TrainLog

logger = logging.getLogger(__name__)

# A sampler makes one PIL image: (model, prompt, negative_prompt, steps, cfg_scale, width, height, seed) -> Image.
Sampler = Callable[[DiffusionModel, str, str, int, float, int, int, int], Any]

NONFINITE_ADVICE = ("likely fixes: lower the learning rate (1e-4 is the usual LoRA value), keep max_grad_norm at 1.0, "
                    "use bf16 or fp32 instead of fp16, or turn noise_offset down")
MAX_CONSECUTIVE_SKIPS = 10


@dataclass
class TrainResult:
    """How a run ended.

    Attributes:
        status: ``"completed"``, ``"stopped"`` (stop request), ``"early_stopped"`` (plateau) or ``"failed"``.
        global_step: optimizer steps done in total (across resumes); epoch: epochs fully done.
        files: LoRA files written by this session, in order; last_file: the newest of them (None if none).
        state_dir: the last resume state written, if any.
        message: one sentence for the user.
        final_loss: the last smoothed loss.
        log_dir: the folder with TensorBoard events and ``train_log.jsonl``.
    """

    status: str
    global_step: int
    epoch: int
    files: list[str] = field(default_factory=list)
    last_file: str | None = None
    state_dir: str | None = None
    message: str = ""
    final_loss: float | None = None
    log_dir: str | None = None


def default_sampler(model: DiffusionModel, prompt: str, negative: str, steps: int, cfg_scale: float, width: int,
                    height: int, seed: int):
    """The headless DDIM sampler of :mod:`lib_lora.model.sampler` (the WebUI passes its own)."""
    from .model.sampler import txt2img

    return txt2img(model, prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg_scale, width=width,
                   height=height, seed=seed)[0]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as torch reads them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def plan_steps(batches_per_epoch: int, config: TrainConfig) -> tuple[int, int, int]:
    """Steps and epochs of a run (sd-scripts ``train_network.py``).

    Returns:
        (steps_per_epoch, total_steps, num_epochs): optimizer steps per epoch = ceil(batches / accumulation);
        total = max_train_epochs x steps_per_epoch when epochs are set, else max_train_steps; epochs =
        ceil(total / steps_per_epoch).
    """
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.gradient_accumulation_steps))
    if config.max_train_epochs:
        total = config.max_train_epochs * steps_per_epoch
    else:
        total = int(config.max_train_steps)
    return steps_per_epoch, total, math.ceil(total / steps_per_epoch)


def preflight(config: TrainConfig) -> None:
    """Cheap checks of a config before anything heavy loads (the base model can take minutes): the settings
    validate, the dataset folder exists, the model file exists (unless embedded), the optimizer's package is
    installed, and a resume folder is a complete state.

    Raises:
        ConfigError, DatasetError, TrainingError: naming what is wrong and how to fix it.
    """
    from .model.configs import EMBEDDED_MODELS
    from .optimizers import get_optimizer_class
    from .state import require_complete

    config.validate()
    if not config.train_data_dir:
        raise ConfigError("train_data_dir is not set: point it at a folder of images (or of N_name folders)")
    if not Path(config.train_data_dir).is_dir():
        raise DatasetError(f"dataset folder {config.train_data_dir} does not exist or is not a folder")
    if config.model not in EMBEDDED_MODELS and not Path(config.model).is_file():
        raise ConfigError(f"model {config.model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                          "nor an existing checkpoint file")
    get_optimizer_class(config.optimizer)
    if config.resume:
        require_complete(config.resume)


def checkpoint_name(output_name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """Kohya file stems (sd-scripts ``get_epoch_ckpt_name`` / ``get_step_ckpt_name`` / ``get_last_ckpt_name``):
    ``name-000001`` per epoch, ``name-step00000200`` per step, ``name`` for the final file."""
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    if step is not None:
        return f"{output_name}-step{step:08d}"
    return output_name


class Trainer:
    """Trains one LoRA.

    Args:
        config: the run's settings (validated in :meth:`run`).
        model: the base model; its weights stay frozen and are never written.
        callbacks: progress and event hooks.
        commands: stop / save-now requests from another thread.
        sampler: makes sample images (default: :func:`default_sampler`).
    """

    def __init__(self, config: TrainConfig, model: DiffusionModel, callbacks: TrainCallbacks | None = None,
                 commands: TrainCommands | None = None, sampler: Sampler | None = None):
        self.config = config
        self.model = model
        self.callbacks = callbacks or TrainCallbacks()
        self.commands = commands or TrainCommands()
        self.sampler = sampler or default_sampler
        self.report: DatasetReport | None = None
        self.network: LoRANetwork | None = None
        self.files: list[str] = []
        self._intermediate: list[Path] = []

    # ---------------------------------------------------------------------------------------------------- setup
    def scan(self) -> DatasetReport:
        """Scans the dataset (before anything else, so bad images are reported by name before step 1)."""
        cfg = self.config
        if not cfg.train_data_dir:
            raise ConfigError("train_data_dir is not set: point it at a folder of images (or of N_name folders)")
        options = ScanOptions(caption_extension=cfg.caption_extension, repeats=cfg.repeats,
                              class_tokens=cfg.class_tokens, on_bad_image=cfg.on_bad_image,
                              separator=cfg.caption_separator)
        self.report = scan_dataset(Path(cfg.train_data_dir), options)
        for w in self.report.warnings:
            self.callbacks.message(f"dataset: {w}")
        return self.report

    def check_dataset(self, out_dir: Path) -> Any:
        """Runs the dataset doctor (:func:`lib_lora.doctor.run_checks`) on ``train_data_dir`` and gates the run.

        Checked at ``cfg.resolution`` pixels, with the first trigger word (or None) and ``cfg.caption_extension``,
        as a ``"concept"`` LoRA (at least 15 images, below that a warning). With ``on_bad_image = "skip"`` (the
        user's explicit choice to train without undecodable files) the doctor's ``decode`` errors become warnings;
        with ``"stop"`` the scan has already raised on them. The report is always written,
        atomically, as ``<output_dir>/<output_name>.dataset-report.json`` (the JSON of
        :meth:`lib_lora.doctor.Report.to_dict` plus ``folder``, ``resolution`` and ``ignored``); each warning and
        error is sent to ``callbacks.message``.

        Returns:
            The :class:`lib_lora.doctor.Report`.

        Raises:
            DatasetError: the doctor found errors and ``cfg.ignore_dataset_errors`` is False; the message lists them
                and says how to override (``ignore_dataset_errors = true`` / ``--ignore-dataset-errors true``).
        """
        from .doctor import run_checks

        cfg = self.config
        scan_logger = logging.getLogger("lib_lora.data.dataset")
        level = scan_logger.level
        scan_logger.setLevel(logging.ERROR)  # the scan's warnings were sent already by scan()
        try:
            report = run_checks(Path(cfg.train_data_dir), resolution=cfg.resolution,
                                trigger=cfg.trigger_words[0] if cfg.trigger_words else None,
                                caption_extension=cfg.caption_extension)
        finally:
            scan_logger.setLevel(level)
        if cfg.on_bad_image == "skip":  # the user chose to train without undecodable images: a warning, not an error
            report.findings = [dataclasses.replace(f, severity="warning") if f.check == "decode" else f
                               for f in report.findings]
        errors = [f for f in report.findings if f.severity == "error"]
        data = {"folder": str(report.folder), "resolution": report.resolution,
                "ignored": bool(errors) and cfg.ignore_dataset_errors, **report.to_dict()}
        atomic_write_bytes(out_dir / f"{cfg.output_name}.dataset-report.json",
                           json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))
        for f in report.findings:
            if f.severity != "info":
                self.callbacks.message(f"dataset {f.severity} [{f.check}]: {f.message}; fix: {f.fix}")
        if errors and not cfg.ignore_dataset_errors:
            lines = [f"- [{f.check}] {f.message}" + (f" ({', '.join(f.files[:8])})" if f.files else "")
                     for f in errors]
            raise DatasetError(
                f"the dataset check found {len(errors)} error(s) in {cfg.train_data_dir}:\n" + "\n".join(lines)
                + f"\nfix them (report: {out_dir / (cfg.output_name + '.dataset-report.json')}), or train anyway "
                "with ignore_dataset_errors = true (CLI: --ignore-dataset-errors true)")
        return report

    def _build_dataset(self) -> TrainDataset:
        cfg, model = self.config, self.model
        res = (cfg.resolution, cfg.resolution)
        buckets = BucketSpec(resolution=res, min_reso=min(cfg.min_bucket_reso, cfg.resolution),
                             max_reso=max(cfg.max_bucket_reso, cfg.resolution), reso_steps=cfg.bucket_reso_steps,
                             no_upscale=cfg.bucket_no_upscale, enabled=cfg.enable_bucket)
        captions = CaptionOptions(separator=cfg.caption_separator, keep_tokens=cfg.keep_tokens,
                                  shuffle=cfg.shuffle_caption, tag_dropout_rate=cfg.caption_tag_dropout_rate,
                                  caption_dropout_rate=cfg.caption_dropout_rate,
                                  trigger_words=tuple(cfg.trigger_words))
        # The cache holds unscaled posterior samples, as sd-scripts' npz files do; the step scales them.
        scale = model.latent_scale_factor
        vae_generator = torch.Generator("cpu").manual_seed(cfg.seed)  # same latents in every run and resume

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return model.encode_images(pixels, generator=vae_generator) / scale

        return TrainDataset(self.report.images, encode, buckets=buckets, captions=captions,
                            batch_size=cfg.train_batch_size, seed=cfg.seed, flip_aug=cfg.flip_aug,
                            random_crop=cfg.random_crop, cache=cfg.cache_latents)

    def _build_network(self) -> LoRANetwork:
        cfg, model = self.config, self.model
        train_te = not cfg.network_train_unet_only and cfg.text_encoder_lr != 0
        train_unet = cfg.unet_lr != 0
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the host's global RNG alone
            torch.manual_seed(cfg.seed)
            net = LoRANetwork.create(model.unet, model.text_encoders, model.arch, network_dim=cfg.network_dim,
                                     network_alpha=cfg.network_alpha, conv_dim=cfg.conv_dim,
                                     conv_alpha=cfg.conv_alpha, dropout=cfg.network_dropout,
                                     rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                                     train_unet=train_unet, train_text_encoder=train_te)
        net.to(model.device)
        if cfg.network_weights:
            report = net.load_weights(load_lora_file(cfg.network_weights)[0])
            self.callbacks.message(f"initial weights from {cfg.network_weights}: {report.summary()}")
        return net

    def _base_metadata(self, steps_per_epoch: int, total: int, epochs: int, optimizer_name: str,
                       batches: int, bucket_info: dict) -> dict[str, Any]:
        cfg, model = self.config, self.model
        network_args = {"conv_dim": cfg.conv_dim, "conv_alpha": cfg.conv_alpha if cfg.conv_dim else None,
                        "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout}
        return build_ss_metadata(
            base_model=model.arch, v_parameterization=model.prediction_type == "v_prediction",
            network_dim=cfg.network_dim, network_alpha=cfg.network_alpha, network_args=network_args,
            network_dropout=cfg.network_dropout, sd_model_name=os.path.basename(str(model.name)),
            learning_rate=cfg.learning_rate, unet_lr=cfg.unet_lr, text_encoder_lr=cfg.text_encoder_lr,
            lr_scheduler=cfg.lr_scheduler, lr_warmup_steps=cfg.lr_warmup_steps, optimizer=optimizer_name,
            max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, clip_skip=cfg.clip_skip,
            min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset, mixed_precision=cfg.mixed_precision,
            gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            num_train_images=self.report.num_train_images, num_batches_per_epoch=batches, num_epochs=epochs,
            max_train_steps=total, batch_size_per_device=cfg.train_batch_size,
            total_batch_size=cfg.train_batch_size * cfg.gradient_accumulation_steps,
            cache_latents=cfg.cache_latents != "none", shuffle_caption=cfg.shuffle_caption,
            keep_tokens=cfg.keep_tokens, caption_dropout_rate=cfg.caption_dropout_rate,
            caption_tag_dropout_rate=cfg.caption_tag_dropout_rate, flip_aug=cfg.flip_aug,
            enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso,
            max_bucket_reso=cfg.max_bucket_reso, bucket_no_upscale=cfg.bucket_no_upscale,
            resolution=cfg.resolution, dataset_dirs=self.report.dataset_dirs(),
            tag_frequency=self.report.tag_frequency(cfg.caption_separator), bucket_info=bucket_info,
            trigger_phrase=", ".join(cfg.trigger_words) or None,
            training_comment=f"lib_lora {__version__}",
        )

    # ------------------------------------------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Trains until the planned steps, a stop request, early stopping, or an error.

        Raises:
            ConfigError, DatasetError: bad settings or data, before anything is trained.
            TrainingError: a non-finite loss (policy "stop"), a missing optional optimizer package, an
                incomplete resume state; the last good checkpoint is kept.
        """
        cfg = self.config.validate()
        model = self.model
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        resume = load_state(cfg.resume, model.device) if cfg.resume else None  # refused before any work

        self.scan()
        self.check_dataset(out_dir)  # the dataset doctor; raises DatasetError on errors unless overridden
        dataset = self._build_dataset()
        steps_per_epoch, total_steps, num_epochs = plan_steps(len(dataset), cfg)
        self.callbacks.message(
            f"{self.report.num_images} images x repeats = {self.report.num_train_images} per epoch, "
            f"{len(dataset)} batches of {cfg.train_batch_size} -> {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps in {num_epochs} epochs")

        net = self.network = self._build_network()
        groups, descs = net.prepare_optimizer_params(cfg.text_encoder_lr, cfg.unet_lr, cfg.learning_rate)
        # Progress reports the UNet's rate (the one users set and watch); the TE group comes first when present.
        main_group = descs.index("unet") if "unet" in descs else 0
        if not groups:
            raise ConfigError("no parameters to train: every learning rate is 0")
        optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, **cfg.optimizer_args)
        # With the LR drop off the controller still smooths the loss (and may early-stop) but never drops.
        patience = cfg.plateau_patience_steps if cfg.lr_drop_on_plateau else 2**62
        plateau = PlateauController(patience, factor=cfg.plateau_factor,
                                    min_delta=cfg.plateau_min_delta, min_lr=cfg.learning_rate * 1e-3,
                                    early_stop_patience=cfg.early_stopping_patience_steps,
                                    base_lr=cfg.learning_rate)
        scheduler = schedules.build_lr_scheduler(
            optimizer, cfg.lr_scheduler, total_steps, cfg.lr_warmup_steps or None,
            num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power,
            multiplier=(lambda: plateau.lr_factor) if cfg.lr_drop_on_plateau else None)
        scaler = torch.amp.GradScaler(model.device.type, enabled=cfg.mixed_precision == "fp16")
        recorder = LossRecorder()
        generator = torch.Generator("cpu").manual_seed(cfg.seed)

        global_step, epochs_done, skip_batches = 0, 0, 0
        metadata = self._base_metadata(steps_per_epoch, total_steps, num_epochs, optimizer_display_name(optimizer),
                                       len(dataset), dataset.bucket_info())
        if resume is not None:
            global_step, epochs_done, skip_batches = self._restore(
                resume, net, optimizer, scheduler, scaler, plateau, recorder, generator, metadata)
        self._metadata = metadata

        log_dir = Path(cfg.logging_dir or out_dir / "logs") / f"{cfg.output_name}_{time.strftime('%Y%m%d%H%M%S')}"
        log = TrainLog(log_dir)
        if not log.has_tensorboard:
            self.callbacks.message("TensorBoard logging is off (the tensorboard package is not installed); the "
                                   f"JSONL log is in {log.jsonl_path}")
        atomic_write_bytes(out_dir / f"{cfg.output_name}.config.toml", cfg.to_toml().encode("utf-8"))

        self.callbacks.message(f"caching latents of {len(dataset.items)} images")
        dataset.cache_latents()

        status, message, state_dir = "completed", "", None
        state_parts = (net, optimizer, scheduler, scaler, plateau, recorder, generator)
        started, steps_this_session = time.monotonic(), 0
        train_te = any(True for _ in net.lora_modules("te"))
        consecutive_skips = 0
        accum = cfg.gradient_accumulation_steps
        loss = float("nan")
        try:
            # Without checkpointing, LoRA inputs that are norm/GEGLU outputs, and the frozen UNet's own cheap
            # activations (gelu(gate), GroupNorm -> SiLU -> conv), are recomputed in backward instead of kept
            # (lib_lora.recompute); with it, checkpointing already recomputes whole blocks.
            with net.applied(), checkpointing.training_mode(model.unet, cfg.gradient_checkpointing), \
                    recompute.tagged(model.unet, enabled=not cfg.gradient_checkpointing):
                net.train()
                if cfg.sample_prompts and global_step == 0 and (cfg.sample_every_n_steps or
                                                                cfg.sample_every_n_epochs):
                    self._samples(out_dir, 0)
                epoch, step_in_epoch = epochs_done, skip_batches
                while True:
                    micro, accum_loss = 0, 0.0
                    for batch_index, batch in enumerate(dataset.batches(epoch + 1)):
                        if batch_index < step_in_epoch:
                            continue  # resumed mid-epoch: the batch order of an epoch is fixed by the seed
                        step_loss = self._train_step(batch, generator, scaler, train_te)
                        if not math.isfinite(step_loss):
                            optimizer.zero_grad(set_to_none=True)
                            micro, accum_loss = 0, 0.0
                            consecutive_skips += 1
                            self._skip_or_stop(f"step {global_step + 1}: loss is {step_loss}", consecutive_skips,
                                               global_step, log)
                            continue
                        consecutive_skips = 0
                        accum_loss += step_loss / accum
                        micro += 1
                        if micro < accum and batch_index + 1 < len(dataset):
                            continue
                        grad_norm = self._optimizer_step(optimizer, scaler)
                        if not math.isfinite(grad_norm):  # finite loss, non-finite gradients: not applied
                            step_loss, micro, accum_loss = accum_loss * accum / micro, 0, 0.0
                            consecutive_skips += 1
                            self._skip_or_stop(f"step {global_step + 1}: gradients are non-finite (norm "
                                               f"{grad_norm}, loss {step_loss:.4g})", consecutive_skips,
                                               global_step, log)
                            continue
                        scheduler.step()
                        loss, micro, accum_loss = accum_loss * accum / micro, 0, 0.0
                        global_step += 1
                        steps_this_session += 1
                        step_in_epoch = batch_index + 1

                        recorder.add(epoch=epoch, step=(global_step - 1) % steps_per_epoch, loss=loss)
                        events = plateau.update(global_step, loss)
                        lrs = scheduler.get_last_lr()
                        log.scalars(global_step, {"loss/current": loss, "loss/average": recorder.moving_average,
                                                  "loss/smoothed": plateau.smoothed_loss or loss,
                                                  **{f"lr/{d}": lr for d, lr in zip(descs, lrs)}},
                                    epoch=epoch + 1)
                        for ev in events:
                            log.event(global_step, ev.kind, ev.message)
                            self.callbacks.message(ev.message)
                        self._progress(global_step, total_steps, epoch, num_epochs, loss, recorder, plateau,
                                       lrs[main_group], started, steps_this_session)

                        done = global_step >= total_steps
                        stem = checkpoint_name(cfg.output_name, step=global_step)
                        # Samples first, so that a checkpoint saved at this step gets this step's preview.
                        if cfg.sample_every_n_steps and global_step % cfg.sample_every_n_steps == 0:
                            self._samples(out_dir, global_step)
                        # Epochs completed so far, counting this one when its last batch was just done.
                        epochs_done_now = epoch + (1 if step_in_epoch >= len(dataset) else 0)
                        if cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0 and not done:
                            self._save(out_dir, stem, global_step, epochs_done_now, log, net, keep=True)
                            if cfg.save_state:
                                state_dir = self._write_state(out_dir / f"{stem}-state", *state_parts,
                                                              global_step, epoch, step_in_epoch)
                        elif self.commands.take_save_request():
                            self._save(out_dir, stem, global_step, epochs_done_now, log, net, keep=False)
                        if any(ev.kind == "early_stop" for ev in events):
                            status, message = "early_stopped", events[-1].message
                        elif self.commands.stop_requested and step_in_epoch < len(dataset):
                            status = "stopped"
                        if status != "completed" or done:
                            break

                    if step_in_epoch >= len(dataset):  # the epoch is complete
                        epoch, step_in_epoch = epoch + 1, 0
                        if self.callbacks.on_epoch_end:
                            self.callbacks.on_epoch_end(epoch, global_step)
                        last = epoch >= num_epochs or global_step >= total_steps
                        if cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
                            self._samples(out_dir, global_step)
                        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and not last:
                            stem = checkpoint_name(cfg.output_name, epoch=epoch)
                            self._save(out_dir, stem, global_step, epoch, log, net, keep=True)
                            if cfg.save_state:
                                state_dir = self._write_state(out_dir / f"{stem}-state", *state_parts,
                                                              global_step, epoch, 0)
                        if self.commands.stop_requested and not last and status == "completed":
                            status = "stopped"
                    if status != "completed" or epoch >= num_epochs or global_step >= total_steps:
                        break

                if status == "completed":
                    epoch = num_epochs  # the planned run is done (sd-scripts writes num_epochs in the last file)
                    self._save(out_dir, cfg.output_name, global_step, epoch, log, net, keep=False)
                    if cfg.save_state:
                        state_dir = self._write_state(out_dir / f"{cfg.output_name}-state", *state_parts,
                                                      global_step, epoch, step_in_epoch)
                    message = f"finished: {global_step} steps, {epoch} epochs"
                else:
                    # Stop request or early stop: save the LoRA and a state to resume from, whatever save_state.
                    stem = checkpoint_name(cfg.output_name, step=global_step)
                    self._save(out_dir, stem, global_step, epoch, log, net, keep=False)
                    state_dir = self._write_state(out_dir / f"{stem}-state", *state_parts, global_step, epoch,
                                                  step_in_epoch)
                    message = (message + "; " if message else "") + \
                        f"stopped at step {global_step} ({epoch} epoch(s) completed); resume with resume={state_dir}"
        except TrainingError as exc:
            log.event(global_step, "failed", str(exc))
            log.close()
            self.callbacks.message(str(exc))
            raise
        finally:
            net.eval()
            log.close()
        self.callbacks.message(message)
        return TrainResult(status=status, global_step=global_step, epoch=epoch, files=self.files,
                           last_file=self.files[-1] if self.files else None,
                           state_dir=str(state_dir) if state_dir else None, message=message,
                           final_loss=plateau.smoothed_loss, log_dir=str(log_dir))

    def _restore(self, resume: dict, net, optimizer, scheduler, scaler, plateau, recorder, generator,
                 metadata: dict) -> tuple[int, int, int]:
        """Loads a resume state into the run's objects; returns (global_step, epochs done, batches done in the
        current epoch). The session id and start time carry over, so metadata stays cumulative across resumes.

        Raises:
            TrainingError: the state's network does not fit this configuration.
        """
        ts = resume["train_state"]
        report = net.load_weights(resume["network"])
        if not report.ok or len(report.loaded) != len(net.names()):
            raise TrainingError(f"resume state {self.config.resume} does not fit this network (same network_dim, "
                                f"conv_dim and trained parts are needed): {report.summary()}")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["extra"]["scaler"])
        plateau.load_state_dict(resume["extra"]["plateau"])
        recorder.load_state_dict(resume["extra"]["recorder"])
        generator.set_state(resume["extra"]["generator"])
        set_rng_state(resume["rng"])
        for key in ("ss_session_id", "ss_training_started_at"):
            if key in ts.get("metadata", {}):
                metadata[key] = ts["metadata"][key]
        self.callbacks.message(f"resumed from {self.config.resume}: step {ts['global_step']}, "
                               f"{ts['epoch']} epoch(s) done")
        return ts["global_step"], ts["epoch"], ts["step_in_epoch"]

    # ----------------------------------------------------------------------------------------------------- step
    def _train_step(self, batch, generator: torch.Generator, scaler: torch.amp.GradScaler, train_te: bool) -> float:
        """Forward and backward of one micro-batch; returns the loss (before accumulation scaling).

        The maths of sd-scripts ``train_network.py``: latents x scale factor; uniform timesteps in [0, 1000);
        noise (+ noise offset); x_t = sqrt(a) x0 + sqrt(1 - a) noise; target = noise (eps) or velocity (v);
        MSE per sample over C, H, W in fp32, times the min-SNR-gamma weight, averaged over the batch.
        """
        cfg, model = self.config, self.model
        device = model.device
        ac = model.alphas_cumprod.to(device)
        latents = batch.latents.to(device, torch.float32) * model.latent_scale_factor
        b = latents.shape[0]
        sizes = None
        if model.arch == "sdxl":  # size/crop conditioning per sample (sd-scripts get_size_embeddings order)
            sizes = [(oh, ow, ct, cl, th, tw) for (oh, ow), (ct, cl), (th, tw)
                     in zip(batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw)]
        with torch.set_grad_enabled(train_te):
            cond = model.encode_prompts(batch.captions, clip_skip=cfg.clip_skip, sizes=sizes)
        noise = schedules.make_noise(latents.shape, generator, cfg.noise_offset, device=device)
        timesteps = schedules.sample_timesteps(b, generator, device=device)
        noisy = schedules.add_noise(latents, noise, timesteps, ac)
        pred = model.unet_forward(noisy.to(model.dtype), timesteps, cond)
        v_pred = model.prediction_type == "v_prediction"
        target = schedules.get_velocity(latents, noise, timesteps, ac) if v_pred else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            loss = loss * schedules.min_snr_weight(timesteps, ac, cfg.min_snr_gamma, v_pred).to(loss.device)
        loss = loss.mean()
        value = float(loss.detach())
        if math.isfinite(value):
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        return value

    def _skip_or_stop(self, text: str, consecutive_skips: int, global_step: int, log: TrainLog) -> None:
        """A step with a non-finite loss or gradient: raise (policy "stop", or too many skips in a row) or log
        and let the loop skip it (policy "skip"). Nothing was applied to the weights either way.

        Raises:
            TrainingError: with the likely fixes; the last saved checkpoint is intact.
        """
        if self.config.on_nonfinite_loss == "stop" or consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(f"{text}; training stopped, the last saved checkpoint is intact; {NONFINITE_ADVICE}")
        log.event(global_step, "skipped_step", text)
        self.callbacks.message(f"{text}; step skipped")

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> float:
        """Clips and applies the gradients; returns their total norm. A non-finite norm without fp16 loss scaling
        (where GradScaler itself skips such steps and lowers the scale) is not applied: returns it, grads cleared."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf")))
        if not math.isfinite(norm) and not scaler.is_enabled():
            optimizer.zero_grad(set_to_none=True)
            return norm
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else 0.0

    # ------------------------------------------------------------------------------------------------ reporting
    def _progress(self, step, total, epoch, num_epochs, loss, recorder, plateau, lr, started, steps_session):
        if not self.callbacks.on_progress:
            return
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = steps_session / elapsed
        self.callbacks.on_progress(ProgressInfo(
            step=step, total=total, epoch=epoch + 1, total_epochs=num_epochs, loss=loss,
            avg_loss=recorder.moving_average, smoothed_loss=plateau.smoothed_loss or loss, lr=lr, it_per_s=rate,
            eta_s=(total - step) / rate if rate > 0 else float("inf")))

    # ------------------------------------------------------------------------------------------------- saving
    def _save(self, out_dir: Path, stem: str, step: int, epoch: int, log: TrainLog, net: LoRANetwork,
              keep: bool) -> None:
        """Writes ``<stem>.safetensors`` (+ sidecar); refuses non-finite weights (the previous files stay)."""
        cfg = self.config
        path = out_dir / f"{stem}.safetensors"
        metadata = finalize_for_save(self._metadata, path, step, epoch)
        try:
            save_lora_file(path, net.kohya_state_dict(), metadata, save_dtype_from_name(cfg.save_precision))
        except FormatError as exc:
            raise TrainingError(f"not saving {path.name}: {exc}; the last saved checkpoint is intact; "
                                f"{NONFINITE_ADVICE}") from exc
        write_sidecar(path, sd_version=self.model.arch, activation_text=list(cfg.trigger_words) or None,
                      preferred_weight=cfg.preferred_weight,
                      description=f"LoRA trained with lib_lora on {os.path.basename(str(self.model.name))}, "
                                  f"{step} steps, {epoch} epoch(s) completed")
        self.files.append(str(path))
        log.event(step, "saved", str(path))
        self.callbacks.message(f"saved {path}")
        if self.callbacks.on_saved:
            self.callbacks.on_saved(str(path), step, epoch)
        if keep:
            self._intermediate.append(path)
            self._prune()

    def _prune(self) -> None:
        """Keeps the last ``save_last_n`` intermediate checkpoints (their sidecars and states go with them)."""
        import shutil

        k = self.config.save_last_n
        while k and len(self._intermediate) > k:
            old = self._intermediate.pop(0)
            for p in (old, old.with_suffix(".json")):
                p.unlink(missing_ok=True)
            state = old.with_name(f"{old.stem}-state")
            if state.is_dir():
                shutil.rmtree(state, ignore_errors=True)

    def _write_state(self, folder: Path, net, optimizer, scheduler, scaler, plateau, recorder, generator,
                     global_step: int, epoch: int, step_in_epoch: int) -> Path:
        return save_state(
            folder, network_sd=net.kohya_state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            extra={"scaler": scaler.state_dict(), "plateau": plateau.state_dict(),
                   "recorder": recorder.state_dict(), "generator": generator.get_state()},
            train_state={"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                         "metadata": {k: v for k, v in self._metadata.items() if k.startswith("ss_")},
                         "config": self.config.to_dict()})

    def _samples(self, out_dir: Path, step: int) -> None:
        """One image per sample prompt, with the network as it is now (eval mode, no grad)."""
        cfg = self.config
        folder = out_dir / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        net = self.network
        net.eval()
        try:
            with torch.no_grad():
                for i, prompt in enumerate(cfg.sample_prompts):
                    image = self.sampler(self.model, prompt, cfg.sample_negative_prompt, cfg.sample_steps,
                                         cfg.sample_cfg_scale, cfg.resolution, cfg.resolution, cfg.sample_seed)
                    path = folder / f"{cfg.output_name}_{step:08d}_{i:02d}.png"
                    tmp = path.with_name(f".{path.name}.tmp")
                    # The WebUI's infotext layout, so "PNG Info" shows how the sample was made.
                    info = PngImagePlugin.PngInfo()
                    negative = f"\nNegative prompt: {cfg.sample_negative_prompt}" if cfg.sample_negative_prompt else ""
                    info.add_text("parameters", f"{prompt}{negative}\nSteps: {cfg.sample_steps}, Sampler: DDIM, "
                                  f"CFG scale: {cfg.sample_cfg_scale}, Seed: {cfg.sample_seed}, "
                                  f"Size: {cfg.resolution}x{cfg.resolution}, Model: {self.model.name}, "
                                  f"LoRA: {cfg.output_name} step {step}")
                    image.save(tmp, format="PNG", pnginfo=info)
                    os.replace(tmp, path)
                    if self.callbacks.on_sample:
                        self.callbacks.on_sample(str(path), step, prompt)
        finally:
            net.train()
