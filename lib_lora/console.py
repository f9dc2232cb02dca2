"""Running a training from a terminal: model loading, a tqdm progress bar, messages on stderr, Ctrl+C = stop."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import torch

from .config import TrainConfig
from .control import ProgressInfo, TrainCallbacks, TrainCommands
from .trainer import Trainer, TrainResult, preflight, resolve_device

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_training(config: TrainConfig, progress_bar: bool = True, callbacks: TrainCallbacks | None = None,
                 model=None) -> TrainResult:
    """Loads the base model (unless given), trains with a terminal progress bar, prints where the files are.

    Ctrl+C asks the trainer to stop: it finishes the step, saves the LoRA and a resume state, then returns.

    Raises:
        LoraError subclasses: as :meth:`Trainer.run`, and the model loader's errors.
    """
    from tqdm import tqdm

    from .model.headless import load_model

    preflight(config)  # before the (possibly minutes long) model load
    device = resolve_device(config.device)
    if model is None:
        print(f"loading {config.model} on {device}", file=sys.stderr)
        model = load_model(config.model, device=device, dtype=_DTYPES[config.mixed_precision],
                           v_prediction=config.v_prediction)
    # lib_lora's loggers repeat what the trainer already reports through on_message; without this the logging
    # module's last-resort handler would print each dataset warning twice on the terminal.
    logging.getLogger("lib_lora").addHandler(logging.NullHandler())
    commands = TrainCommands()
    bar = None
    cb = callbacks or TrainCallbacks()

    def on_progress(info: ProgressInfo) -> None:
        nonlocal bar
        if progress_bar:
            if bar is None:
                bar = tqdm(total=info.total, initial=info.step - 1, unit="step", file=sys.stderr)
            bar.update(info.step - bar.n)
            bar.set_postfix(epoch=f"{info.epoch}/{info.total_epochs}", loss=f"{info.avg_loss:.4f}",
                            lr=f"{info.lr:.2e}")
        if callbacks and callbacks.on_progress:
            callbacks.on_progress(info)

    def on_message(text: str) -> None:
        (bar.write if bar is not None else lambda t: print(t, file=sys.stderr))(text)
        if callbacks and callbacks.on_message:
            callbacks.on_message(text)

    trainer_cb = TrainCallbacks(on_progress=on_progress, on_message=on_message, on_saved=cb.on_saved,
                                on_sample=cb.on_sample, on_epoch_end=cb.on_epoch_end)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            on_message("stop requested: finishing the step and saving (Ctrl+C again to abort)")
            commands.stop()
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = Trainer(config, model, callbacks=trainer_cb, commands=commands).run()
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    for path in result.files:
        print(path)
    print(f"logs: {result.log_dir} (tensorboard --logdir {result.log_dir})", file=sys.stderr)
    return result
