"""Training logs: TensorBoard event files (sd-scripts' tag names) and a JSONL file, one record per step.

Tags: ``loss/current``, ``loss/average`` (moving mean over one epoch's worth of steps), ``loss/smoothed`` (the EMA
the plateau controller watches), ``lr/unet``, ``lr/textencoder``; events (LR drops, early stop, saves) go to the
JSONL file with ``"event"`` keys and to TensorBoard as text.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TrainLog:
    """Writes one run's logs into ``folder`` (created): TensorBoard events (when the ``tensorboard`` package is
    installed; otherwise a warning, and JSONL only) and ``train_log.jsonl``.

    Args:
        folder: the run's log folder, e.g. ``<output_dir>/logs/<name>_<YYYYmmddHHMMSS>`` (sd-scripts layout).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.folder / "train_log.jsonl"
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.folder))
        except ImportError as exc:
            logger.warning("TensorBoard logging off (%s); install the tensorboard package to get event files", exc)

    @property
    def has_tensorboard(self) -> bool:
        """True when event files are written."""
        return self._tb is not None

    def scalars(self, step: int, values: dict[str, float], **extra: Any) -> None:
        """Logs scalars at optimizer ``step`` (TensorBoard x axis = global step, as sd-scripts)."""
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
        self._write({"step": step, "time": time.time(), **values, **extra})

    def event(self, step: int, kind: str, message: str) -> None:
        """Logs a named event (``lr_drop``, ``early_stop``, ``saved``, ``skipped_step``, ...)."""
        if self._tb is not None:
            self._tb.add_text(f"events/{kind}", message, step)
        self._write({"step": step, "time": time.time(), "event": kind, "message": message})

    def _write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes both writers."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if not self._jsonl.closed:
            self._jsonl.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a ``train_log.jsonl`` back (for plots and tests); a torn last line is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
