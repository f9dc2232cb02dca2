"""Loss smoothing and the "dynamic learning rate" controller: lower the learning rate when the smoothed training loss
stops improving, and optionally stop early.

Pure Python, no torch: the trainer feeds ``(step, loss)`` pairs and acts on the returned events; the state is a small
JSON-compatible dict saved with the resume state. None of the common trainers (sd-scripts, kohya_ss, OneTrainer, ...)
has this; the rule follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode "min", absolute threshold, ``factor``,
``min_lr``), counted in optimizer steps instead of epochs and applied to an exponential moving average of the loss,
because the per-step diffusion loss is dominated by the random timestep.

Also here: :class:`LossRecorder`, sd-scripts' ``loss/average`` (a moving mean over the last epoch's worth of steps),
and :class:`MovingAverage`, the same over a fixed window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError, TrainingError

STATE_VERSION = 1


def _check_finite(loss: float, step: int | None = None) -> float:
    value = float(loss)
    if not math.isfinite(value):
        where = f" at step {step}" if step is not None else ""
        raise TrainingError(f"non-finite loss {value}{where}")
    return value


def _require_keys(state: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    if not isinstance(state, dict):
        raise TrainingError(f"{what} state must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise TrainingError(f"incomplete {what} state: missing {', '.join(missing)}")


class LossEma:
    """Bias-corrected exponential moving average of the loss.

    ``m_t = beta * m_{t-1} + (1 - beta) * loss_t`` with ``m_0 = 0``, reported as ``m_t / (1 - beta ** t)``: the bias
    correction of Adam's first moment (Kingma & Ba 2015, "Adam", Algorithm 1). The correction makes the first value
    equal the first loss instead of ``(1 - beta) * loss``, and a constant loss average to itself. ``beta = 0.99``
    weights roughly the last ``1 / (1 - beta) = 100`` updates.

    Args:
        beta: decay per update, in [0, 1); 0 means no smoothing.

    Raises:
        ConfigError: ``beta`` outside [0, 1).
    """

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self._m = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """Number of losses fed so far."""
        return self._count

    @property
    def value(self) -> float | None:
        """The bias-corrected average, or None before the first update."""
        if self._count == 0:
            return None
        return self._m / (1.0 - self.beta**self._count)

    def update(self, loss: float) -> float:
        """Feeds one loss and returns the new bias-corrected average.

        Raises:
            TrainingError: the loss is NaN or infinite (it would poison every later value).
        """
        x = _check_finite(loss)
        self._m = self.beta * self._m + (1.0 - self.beta) * x
        self._count += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state: ``{"m": float, "count": int}`` (beta is configuration)."""
        return {"m": self._m, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output.

        Raises:
            TrainingError: a key is missing.
        """
        _require_keys(state, ("m", "count"), "loss EMA")
        self._m = float(state["m"])
        self._count = int(state["count"])


@dataclass(frozen=True)
class PlateauEvent:
    """What :meth:`PlateauController.update` asks the trainer to do.

    Attributes:
        kind: "lr_drop" (multiply the learning rate by the controller's new ``lr_factor``) or "early_stop" (save and
            stop).
        step: the optimizer step at which the event fired.
        smoothed_loss: the bias-corrected EMA of the loss at that step.
        lr_factor: the cumulative factor on the base learning rate after the event (unchanged for "early_stop").
        lr: ``base_lr * lr_factor``, the learning rate the controller now asks for (before any LR schedule factor).
        message: one human-readable sentence for the UI log.
    """

    kind: str
    step: int
    smoothed_loss: float
    lr_factor: float
    lr: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-compatible dict."""
        return asdict(self)


class PlateauController:
    """Lowers the learning rate when the smoothed loss has stopped improving; optionally stops training.

    Signal: the bias-corrected EMA of the loss (:class:`LossEma`, ``ema_beta``). An update *improves* when the
    smoothed loss is below ``best - min_delta`` (absolute, in loss units); the first counted update always improves.

    Rules, for an update at optimizer step ``s`` (steps must increase; gaps are allowed, counts are in steps, not in
    calls):

    - **lr_drop** fires when ``s - max(last_improvement_step, last_drop_step) >= patience_steps`` and the learning
      rate is above ``min_lr``. The factor becomes ``max(lr_factor * factor, min_lr / base_lr)``, so with the defaults
      1e-4 becomes 5e-5. The patience count then restarts from ``s``; ``best`` is kept. With a flat loss fed at every
      step from step ``s0``, drops fire at ``s0 + patience_steps``, ``s0 + 2 * patience_steps``, ...
    - **early_stop** fires when ``s - last_improvement_step >= early_stop_patience`` (the same signal; drops do not
      reset this count). It fires once; if both rules hold on the same update only "early_stop" is returned, and
      later updates return no events.
    - Updates with ``s < warmup_steps`` feed the EMA but are not counted (loss during LR warmup is not a plateau).

    The controller does not touch an optimizer. The trainer multiplies the learning rate by :attr:`lr_factor`, e.g.
    ``schedules.build_lr_scheduler(..., multiplier=lambda: controller.lr_factor)``.

    Args:
        patience_steps: optimizer steps without improvement before a drop (>= 1).
        factor: multiplier per drop, in (0, 1).
        min_delta: smallest decrease of the smoothed loss that counts as an improvement (>= 0).
        min_lr: floor of ``base_lr * lr_factor`` (>= 0, below ``base_lr``).
        early_stop_patience: optimizer steps without improvement before stopping (>= 1), or None for never.
        base_lr: the learning rate the factor applies to (> 0); used for ``min_lr`` and the messages.
        ema_beta: smoothing of the loss, see :class:`LossEma`.
        warmup_steps: steps before which updates are not counted (>= 0).

    Raises:
        ConfigError: any argument out of range.
    """

    def __init__(self, patience_steps: int, factor: float = 0.5, min_delta: float = 1e-3, min_lr: float = 1e-6,
                 early_stop_patience: int | None = None, *, base_lr: float, ema_beta: float = 0.99,
                 warmup_steps: int = 0):
        if isinstance(patience_steps, bool) or not isinstance(patience_steps, int) or patience_steps < 1:
            raise ConfigError(f"patience_steps must be an int >= 1, got {patience_steps!r}")
        if not 0.0 < factor < 1.0:
            raise ConfigError(f"plateau factor must be in (0, 1), got {factor}")
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ConfigError(f"min_delta must be >= 0, got {min_delta}")
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise ConfigError(f"base_lr must be > 0, got {base_lr}")
        if not 0.0 <= min_lr < base_lr:
            raise ConfigError(f"min_lr must be >= 0 and below the base learning rate {base_lr}, got {min_lr}")
        if early_stop_patience is not None and (
            isinstance(early_stop_patience, bool) or not isinstance(early_stop_patience, int) or early_stop_patience < 1
        ):
            raise ConfigError(f"early_stop_patience must be None or an int >= 1, got {early_stop_patience!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.patience_steps = patience_steps
        self.factor = float(factor)
        self.min_delta = float(min_delta)
        self.min_lr = float(min_lr)
        self.early_stop_patience = early_stop_patience
        self.base_lr = float(base_lr)
        self.warmup_steps = warmup_steps
        self._ema = LossEma(ema_beta)
        self._best: float | None = None
        self._best_step: int | None = None
        self._last_drop_step: int | None = None
        self._last_step: int | None = None
        self._lr_factor = 1.0
        self._num_drops = 0
        self._stopped = False

    # --- read-only views -------------------------------------------------------------------------------------------

    @property
    def lr_factor(self) -> float:
        """Cumulative factor on the base learning rate (1.0 until the first drop)."""
        return self._lr_factor

    @property
    def lr(self) -> float:
        """``base_lr * lr_factor``."""
        return self.base_lr * self._lr_factor

    @property
    def smoothed_loss(self) -> float | None:
        """The current bias-corrected EMA, or None before the first update."""
        return self._ema.value

    @property
    def best_loss(self) -> float | None:
        """The best counted smoothed loss, or None before the first counted update."""
        return self._best

    @property
    def best_step(self) -> int | None:
        """The step of :attr:`best_loss` (the last improvement)."""
        return self._best_step

    @property
    def num_drops(self) -> int:
        """How many "lr_drop" events fired."""
        return self._num_drops

    @property
    def stopped(self) -> bool:
        """True once "early_stop" fired."""
        return self._stopped

    # --- the rule --------------------------------------------------------------------------------------------------

    def _floor_factor(self) -> float:
        return self.min_lr / self.base_lr

    def update(self, step: int, loss: float) -> list[PlateauEvent]:
        """Feeds the loss of optimizer step ``step`` and returns the events it triggers (usually none).

        Args:
            step: the optimizer step (global step), strictly greater than the previous call's.
            loss: that step's training loss (mean over the batch), finite.

        Returns:
            [], [lr_drop] or [early_stop]; see the class docstring for when.

        Raises:
            ConfigError: ``step`` does not increase.
            TrainingError: the loss is NaN or infinite.
        """
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ConfigError(f"plateau steps must increase: got step {step} after step {self._last_step}")
        smoothed = self._ema.update(_check_finite(loss, step))
        self._last_step = step
        if self._stopped or step < self.warmup_steps:
            return []
        if self._best is None or smoothed < self._best - self.min_delta:
            self._best, self._best_step = smoothed, step
            return []

        since_best = step - self._best_step
        if self.early_stop_patience is not None and since_best >= self.early_stop_patience:
            self._stopped = True
            return [
                PlateauEvent(
                    "early_stop", step, smoothed, self._lr_factor, self.lr,
                    f"Step {step}: smoothed loss {smoothed:.5g} has not improved by {self.min_delta:g} for "
                    f"{since_best} steps (best {self._best:.5g} at step {self._best_step}); stopping early.",
                )
            ]

        anchor = self._best_step if self._last_drop_step is None else max(self._best_step, self._last_drop_step)
        if step - anchor < self.patience_steps:
            return []
        new_factor = max(self._lr_factor * self.factor, self._floor_factor())
        # Already at the floor: nothing to lower (as ReduceLROnPlateau, compare with a small tolerance).
        if self._lr_factor - new_factor <= 1e-12 * self._lr_factor:
            return []
        old_lr = self.lr
        self._lr_factor = new_factor
        self._last_drop_step = step
        self._num_drops += 1
        return [
            PlateauEvent(
                "lr_drop", step, smoothed, new_factor, self.lr,
                f"Step {step}: smoothed loss {smoothed:.5g} has not improved by {self.min_delta:g} for "
                f"{since_best} steps (best {self._best:.5g} at step {self._best_step}); lowering the learning rate "
                f"from {old_lr:.3g} to {self.lr:.3g}.",
            )
        ]

    # --- resume ----------------------------------------------------------------------------------------------------

    _STATE_KEYS = ("version", "ema", "best_loss", "best_step", "last_drop_step", "last_step", "lr_factor",
                   "num_drops", "stopped")

    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible dynamic state (no configuration; None stands for "not yet").

        Keys: version, ema ({m, count}), best_loss, best_step, last_drop_step, last_step, lr_factor, num_drops,
        stopped.
        """
        return {
            "version": STATE_VERSION,
            "ema": self._ema.state_dict(),
            "best_loss": self._best,
            "best_step": self._best_step,
            "last_drop_step": self._last_drop_step,
            "last_step": self._last_step,
            "lr_factor": self._lr_factor,
            "num_drops": self._num_drops,
            "stopped": self._stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output. The configuration (patience, factor, ...) stays the constructor's, so a
        resumed run may change it.

        Raises:
            TrainingError: a key is missing or the version is unknown.
        """
        _require_keys(state, self._STATE_KEYS, "plateau controller")
        if state["version"] != STATE_VERSION:
            raise TrainingError(f"unknown plateau controller state version {state['version']!r}")

        def opt_int(v: Any) -> int | None:
            return None if v is None else int(v)

        self._ema.load_state_dict(state["ema"])
        self._best = None if state["best_loss"] is None else float(state["best_loss"])
        self._best_step = opt_int(state["best_step"])
        self._last_drop_step = opt_int(state["last_drop_step"])
        self._last_step = opt_int(state["last_step"])
        self._lr_factor = float(state["lr_factor"])
        self._num_drops = int(state["num_drops"])
        self._stopped = bool(state["stopped"])


class LossRecorder:
    """sd-scripts' ``train_util.LossRecorder``: the ``loss/average`` value logged every step.

    During epoch 0 every loss is appended; in later epochs the loss of step ``i`` of the epoch replaces slot ``i``.
    The average is over all slots, i.e. a moving mean over the last epoch's worth of steps.
    ``step`` is the step index inside the epoch (0-based), as in ``train_network.py``.
    """

    def __init__(self) -> None:
        self.loss_list: list[float] = []
        self.loss_total = 0.0

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        """Records the loss of ``step`` (index within the epoch) of ``epoch`` (0-based)."""
        loss = float(loss)
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        """Mean of the recorded slots; 0.0 when empty (sd-scripts returns 0)."""
        if not self.loss_list:
            return 0.0
        return self.loss_total / len(self.loss_list)

    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state: ``{"loss_list": [...]}``."""
        return {"loss_list": list(self.loss_list)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (the running total is recomputed).

        Raises:
            TrainingError: the key is missing.
        """
        _require_keys(state, ("loss_list",), "loss recorder")
        self.loss_list = [float(x) for x in state["loss_list"]]
        self.loss_total = math.fsum(self.loss_list)


class MovingAverage:
    """Mean of the last ``window`` losses (the window sd-scripts uses is one epoch's worth of steps).

    Args:
        window: number of values kept (>= 1).

    Raises:
        ConfigError: ``window < 1``.
    """

    def __init__(self, window: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"moving-average window must be an int >= 1, got {window!r}")
        self.window = window
        self._values: deque[float] = deque(maxlen=window)

    def add(self, loss: float) -> float:
        """Adds one value and returns the new mean."""
        self._values.append(float(loss))
        return self.value

    @property
    def value(self) -> float | None:
        """Mean of the kept values (exact sum, ``math.fsum``), or None when empty."""
        if not self._values:
            return None
        return math.fsum(self._values) / len(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state: ``{"values": [...]}``, oldest first."""
        return {"values": list(self._values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; only the newest ``window`` values are kept.

        Raises:
            TrainingError: the key is missing.
        """
        _require_keys(state, ("values",), "moving average")
        self._values = deque((float(x) for x in state["values"]), maxlen=self.window)
