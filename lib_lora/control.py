"""How a running trainer talks to its host: callbacks out (progress, logs, samples, saves), commands in (stop,
save now). The same trainer runs from pytest, the CLI and the WebUI tab (OneTrainer's TrainCallbacks /
TrainCommands split)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ProgressInfo:
    """One progress report, sent after every optimizer step.

    Attributes:
        step: optimizer steps done (global, across resumes); total: steps planned.
        epoch: current epoch (1-based); total_epochs: epochs planned.
        loss: this step's loss; avg_loss: moving average (sd-scripts ``loss/average``); smoothed_loss: the EMA the
            plateau controller watches.
        lr: learning rate of the UNet parameter group (of the text encoder when only it trains).
        it_per_s: optimizer steps per second over this session; eta_s: seconds left at that rate.
    """

    step: int
    total: int
    epoch: int
    total_epochs: int
    loss: float
    avg_loss: float
    smoothed_loss: float
    lr: float
    it_per_s: float
    eta_s: float


@dataclass
class TrainCallbacks:
    """Optional hooks; each is called on the training thread and must return quickly.

    Attributes:
        on_progress: ``(ProgressInfo)`` after each optimizer step.
        on_message: ``(text)`` for human-readable events (LR drops, early stop, skipped steps, saves, warnings).
        on_saved: ``(path, step, epoch)`` after a LoRA file is written.
        on_sample: ``(path, step, prompt)`` after a sample image is written.
        on_epoch_end: ``(epoch, step)`` after an epoch's last step.
    """

    on_progress: Callable[[ProgressInfo], None] | None = None
    on_message: Callable[[str], None] | None = None
    on_saved: Callable[[str, int, int], None] | None = None
    on_sample: Callable[[str, int, str], None] | None = None
    on_epoch_end: Callable[[int, int], None] | None = None

    def message(self, text: str) -> None:
        """Sends ``text`` to ``on_message`` if set."""
        if self.on_message:
            self.on_message(text)


class TrainCommands:
    """Thread-safe requests to a running trainer: :meth:`stop` (finish the step, save, exit) and
    :meth:`save_now` (save a checkpoint after the current step)."""

    def __init__(self):
        self._stop = threading.Event()
        self._save = threading.Event()

    def stop(self) -> None:
        """Asks the trainer to stop after the current step; it saves before exiting."""
        self._stop.set()

    def save_now(self) -> None:
        """Asks the trainer to write a checkpoint after the current step."""
        self._save.set()

    @property
    def stop_requested(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def take_save_request(self) -> bool:
        """True once per :meth:`save_now` call."""
        if self._save.is_set():
            self._save.clear()
            return True
        return False
