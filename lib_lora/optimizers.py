"""Optimizer factory: the subset of sd-scripts' ``train_util.get_optimizer`` (``--optimizer_type``) that the trainer
offers, with optional packages detected instead of imported blindly.

- AdamW: ``torch.optim.AdamW`` (the default; no extra package);
- AdamW8bit: ``bitsandbytes.optim.AdamW8bit`` (pip package ``bitsandbytes``);
- Lion: ``lion_pytorch.Lion`` (pip package ``lion-pytorch``);
- Prodigy: ``prodigyopt.Prodigy`` (pip package ``prodigyopt``).

Nothing is imported at module import time; an optional package is looked up with ``importlib.util.find_spec`` and
imported only when its optimizer is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, TrainingError


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimizer class lives.

    Attributes:
        name: the display / sd-scripts ``--optimizer_type`` spelling, e.g. "AdamW8bit".
        module: the module to import, e.g. "bitsandbytes.optim".
        class_name: the attribute of ``module``.
        pip_package: the distribution to ``pip install`` when the module is missing; None for torch.
    """

    name: str
    module: str
    class_name: str
    pip_package: str | None


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name.lower(): spec
    for spec in (
        OptimizerSpec("AdamW", "torch.optim", "AdamW", None),
        OptimizerSpec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
        OptimizerSpec("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
        OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    )
}
"""Lower-cased name -> :class:`OptimizerSpec`."""

OPTIMIZER_NAMES: tuple[str, ...] = tuple(spec.name for spec in OPTIMIZERS.values())
"""Display names in UI order; the first one is the default."""

DEFAULT_OPTIMIZER = "AdamW"

# sd-scripts warns below this lr for D-Adaptation and Prodigy ("set learning rate around 1.0").
_ADAPTIVE_LR_WARN_AT = 0.1


def get_optimizer_spec(name: str | None) -> OptimizerSpec:
    """Looks an optimizer up by name, case-insensitively; None or "" means AdamW (sd-scripts' default).

    Raises:
        ConfigError: unknown name; the message lists :data:`OPTIMIZER_NAMES`.
    """
    key = (name or DEFAULT_OPTIMIZER).strip().lower() or DEFAULT_OPTIMIZER.lower()
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}")
    return OPTIMIZERS[key]


def _missing_package_message(spec: OptimizerSpec) -> str:
    return f"{spec.name} needs the {spec.pip_package} package: pip install {spec.pip_package}"


def is_optimizer_available(name: str | None) -> bool:
    """True when the package behind ``name`` can be found (``importlib.util.find_spec``), without importing it.

    Lets the UI mark optimizers whose package is missing. A package that is found but fails to import still counts
    as available here; :func:`build_optimizer` reports that failure.

    Raises:
        ConfigError: unknown name.
    """
    spec = get_optimizer_spec(name)
    top = spec.module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def get_optimizer_class(name: str | None) -> type[torch.optim.Optimizer]:
    """Imports and returns the optimizer class for ``name``.

    Raises:
        ConfigError: unknown name.
        TrainingError: the optional package is not installed ("AdamW8bit needs the bitsandbytes package:
            pip install bitsandbytes"), fails to import, or lacks the class (too old).
    """
    spec = get_optimizer_spec(name)
    if spec.pip_package is not None and not is_optimizer_available(spec.name):
        raise TrainingError(_missing_package_message(spec))
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        raise TrainingError(f"{_missing_package_message(spec)} (it is installed but failed to import: {e})") from e
    cls = getattr(module, spec.class_name, None)
    if cls is None:
        raise TrainingError(
            f"{spec.module} has no {spec.class_name}; the installed {spec.pip_package} is too old: "
            f"pip install -U {spec.pip_package}"
        )
    return cls


def _first_group_lrs(param_groups: list, lr: float) -> list[float]:
    # The learning rates the optimizer will see, first group first (sd-scripts' check in get_optimizer).
    if param_groups and isinstance(param_groups[0], dict):
        return [float(g.get("lr", lr)) for g in param_groups]
    return [float(lr)]


def build_optimizer(name: str | None, param_groups: Iterable[Any], lr: float,
                    **optimizer_args: Any) -> torch.optim.Optimizer:
    """Builds ``name``'s optimizer over ``param_groups`` (sd-scripts ``train_util.get_optimizer``).

    Args:
        name: "AdamW" (default for None/""), "AdamW8bit", "Lion" or "Prodigy", case-insensitive.
        param_groups: parameters, or dicts with "params" and an optional per-group "lr" (as
            ``LoRANetwork.prepare_optimizer_params`` returns; groups without "lr" use ``lr``).
        lr: the default learning rate (> 0). Prodigy expects about 1.0: it adapts the step size itself.
        **optimizer_args: passed to the constructor (sd-scripts ``--optimizer_args``, e.g. ``weight_decay=0.01``,
            ``betas=(0.9, 0.99)``, Prodigy's ``d_coef``/``use_bias_correction``/``safeguard_warmup``).

    Returns:
        The optimizer. Its ``ss_optimizer`` metadata string is :func:`optimizer_display_name`.

    Warns:
        UserWarning: for Prodigy, when the first group's lr is <= 0.1 (sd-scripts: "learning rate is too low ...
            set learning rate around 1.0"), and when groups have different lrs (only the first takes effect).

    Raises:
        ConfigError: unknown name, lr not finite and > 0, an empty parameter list, or arguments the constructor
            rejects (the message names the optimizer and the arguments).
        TrainingError: the optional package is missing or broken (see :func:`get_optimizer_class`).
    """
    spec = get_optimizer_spec(name)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
    groups = list(param_groups)
    if not groups:
        raise ConfigError(f"{spec.name} got no parameters to train")
    cls = get_optimizer_class(spec.name)
    if spec.name == "Prodigy":
        lrs = _first_group_lrs(groups, lr)
        if lrs[0] <= _ADAPTIVE_LR_WARN_AT:
            warnings.warn(
                f"learning rate {lrs[0]} is too low for Prodigy, which adapts the step size itself; "
                "set the learning rate around 1.0 (recommended: 1.0)",
                UserWarning,
                stacklevel=2,
            )
        if len(set(lrs)) > 1:
            warnings.warn(
                f"Prodigy uses only the first parameter group's learning rate ({lrs[0]}); the others ({lrs[1:]}) "
                "have no effect",
                UserWarning,
                stacklevel=2,
            )
    try:
        return cls(groups, lr=lr, **optimizer_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{spec.name} rejected its arguments (lr={lr}, optimizer_args={optimizer_args}): {e}") from e


def optimizer_display_name(optimizer: torch.optim.Optimizer | type,
                           optimizer_args: dict[str, Any] | None = None) -> str:
    """The ``ss_optimizer`` metadata value, as sd-scripts writes it.

    sd-scripts: ``optimizer_class.__module__ + "." + optimizer_class.__name__``, plus ``"(k=v,k=v)"`` when
    ``--optimizer_args`` were given (``get_optimizer`` and the metadata block of ``train_network.py``).

    Args:
        optimizer: an optimizer instance or class.
        optimizer_args: the extra constructor arguments, in the order given; values are written with ``str()``.

    Returns:
        e.g. "torch.optim.adamw.AdamW", "bitsandbytes.optim.adamw.AdamW8bit",
        "prodigyopt.prodigy.Prodigy(d_coef=2.0,weight_decay=0.01)".
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    if optimizer_args:
        name += "(" + ",".join(f"{k}={v}" for k, v in optimizer_args.items()) + ")"
    return name
