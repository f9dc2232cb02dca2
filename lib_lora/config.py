"""``TrainConfig``: every setting of a training run, as one dataclass (TOML keys = field names).

Defaults follow the product's seed guidance: network_dim (rank) 32, learning rate 1e-4, batch size 2, a checkpoint
every 200 steps. network_alpha defaults to 16 = rank / 2: the LoRA update is scaled by alpha / rank = 0.5, which
keeps the effective step size of rank 32 close to what users know from rank 16 / alpha 8 runs, without the tiny
scale of sd-scripts' alpha 1 default (scale 1/32), which needs a much larger learning rate at 1e-4.

Field names follow sd-scripts' arguments wherever one exists (``network_dim``, ``network_alpha``,
``caption_tag_dropout_rate``, ``min_snr_gamma``, ``noise_offset``, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_VERSION = 1
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "float")
NONFINITE_POLICIES = ("stop", "skip")
CACHE_MODES = ("memory", "disk", "none")


@dataclass
class TrainConfig:
    """One training run. Units: steps are optimizer steps, epochs are passes over images x repeats, sizes pixels.

    Raises (from :meth:`validate`):
        ConfigError: a value out of range or two that contradict each other; the message names the field.
    """

    # --- model and data
    model: str = "tiny-sd1"  # "tiny-sd1", "tiny-sd2" or a path to an SD1.x/SD2.x checkpoint (LDM layout)
    v_prediction: bool | None = None  # None: from the checkpoint's yaml, else eps
    train_data_dir: str = ""
    repeats: int = 1  # for a plain folder; Kohya N_name folders carry their own
    class_tokens: str = ""  # caption of uncaptioned images in a plain folder
    caption_extension: str = ".txt"
    caption_separator: str = ","
    trigger_words: list[str] = field(default_factory=list)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    on_bad_image: str = "skip"  # "skip" (warn) or "stop"
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    cache_latents: str = "memory"  # "memory", "disk" or "none"

    # --- network
    network_dim: int = 32
    network_alpha: float = 16.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    network_weights: str | None = None  # start from an existing LoRA file
    network_train_unet_only: bool = False

    # --- optimisation
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: float = 1.0
    lr_scheduler_power: float = 1.0
    max_train_steps: int | None = 1600
    max_train_epochs: int | None = None  # overrides max_train_steps
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    clip_skip: int = 1
    seed: int = 42
    on_nonfinite_loss: str = "stop"  # "stop" or "skip" the step

    # --- dynamic LR and early stopping on the smoothed loss
    lr_drop_on_plateau: bool = False
    plateau_patience_steps: int = 200
    plateau_factor: float = 0.5  # 1e-4 -> 5e-5
    plateau_min_delta: float = 1e-3
    early_stopping_patience_steps: int | None = None

    # --- outputs
    output_dir: str = "output"
    output_name: str = "lora"
    save_every_n_steps: int | None = 200
    save_every_n_epochs: int | None = None
    save_last_n: int | None = None  # keep only the last K intermediate checkpoints
    save_precision: str = "fp16"
    save_state: bool = False  # also write a resume state with each checkpoint
    resume: str | None = None  # a state folder written by save_state
    logging_dir: str | None = None  # default: <output_dir>/logs
    preferred_weight: float = 0.0  # sidecar "preferred weight" (0 = the WebUI's default)

    # --- samples
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_steps: int = 20
    sample_cfg_scale: float = 7.0
    sample_seed: int = 1234
    sample_negative_prompt: str = ""

    # --- dataset doctor gate: training refuses to start when the doctor finds errors (see lib_lora.doctor)
    ignore_dataset_errors: bool = False  # True: train anyway; the report is still written next to the outputs

    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    version: int = CONFIG_VERSION

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Checks every field; returns self. Raises ConfigError naming the field and the allowed values."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.network_dim >= 1, f"network_dim must be >= 1, got {self.network_dim}")
        need(self.network_alpha >= 0, f"network_alpha must be >= 0, got {self.network_alpha}")
        need(self.conv_dim is None or self.conv_dim >= 0, f"conv_dim must be >= 0, got {self.conv_dim}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.train_batch_size >= 1, f"train_batch_size must be >= 1, got {self.train_batch_size}")
        need(self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        need(self.max_train_steps is not None or self.max_train_epochs is not None,
             "set max_train_steps or max_train_epochs")
        need(self.max_train_steps is None or self.max_train_steps >= 1,
             f"max_train_steps must be >= 1, got {self.max_train_steps}")
        need(self.max_train_epochs is None or self.max_train_epochs >= 1,
             f"max_train_epochs must be >= 1, got {self.max_train_epochs}")
        need(self.mixed_precision in MIXED_PRECISIONS,
             f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        need(self.save_precision in SAVE_PRECISIONS,
             f"save_precision must be one of {SAVE_PRECISIONS}, got {self.save_precision!r}")
        need(self.on_nonfinite_loss in NONFINITE_POLICIES,
             f"on_nonfinite_loss must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite_loss!r}")
        need(self.cache_latents in CACHE_MODES,
             f"cache_latents must be one of {CACHE_MODES}, got {self.cache_latents!r}")
        need(self.clip_skip >= 1, f"clip_skip must be >= 1, got {self.clip_skip}")
        need(self.resolution >= 64 and self.resolution % 8 == 0,
             f"resolution must be a multiple of 8 pixels >= 64, got {self.resolution}")
        need(self.min_snr_gamma is None or self.min_snr_gamma > 0,
             f"min_snr_gamma must be > 0 (or unset), got {self.min_snr_gamma}")
        need(self.noise_offset >= 0, f"noise_offset must be >= 0, got {self.noise_offset}")
        for name in ("save_every_n_steps", "save_every_n_epochs", "save_last_n", "sample_every_n_steps",
                     "sample_every_n_epochs", "early_stopping_patience_steps"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be >= 1 (or unset), got {value}")
        need(0 < self.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        need(self.plateau_patience_steps >= 1,
             f"plateau_patience_steps must be >= 1, got {self.plateau_patience_steps}")
        need(bool(self.output_name) and not any(c in self.output_name for c in "/\\:*?\"<>|"),
             f"output_name must be a plain file name, got {self.output_name!r}")
        need(self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}")
        need(self.version <= CONFIG_VERSION,
             f"config version {self.version} is newer than this lib_lora understands ({CONFIG_VERSION})")
        return self

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON/TOML-ready except None values, which TOML cannot hold)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict; unknown keys raise ConfigError listing them (typos must not pass silently).

        Older versions are migrated by :func:`migrate`.
        """
        data = migrate(dict(data))
        known = {f.name for f in fields(cls)}
        for name in data.pop("unset", None) or []:
            data.setdefault(name, None)
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            raise ConfigError(f"unknown config keys: {', '.join(hints)}")
        types = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, types[k], v) for k, v in data.items()})

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> TrainConfig:
        """Reads a TOML file (flat keys = field names; tables are flattened one level, so a ``[network]`` table
        may group the network keys).

        Raises:
            ConfigError: unreadable file, bad TOML, unknown keys.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key != "optimizer_args":
                flat.update(value)
            else:
                flat[key] = value
        return cls.from_dict(flat)

    def to_toml(self) -> str:
        """TOML text of the config; None fields are written as comments (TOML has no null)."""
        lines = [f"# lib_lora training config (version {self.version})"]
        unset = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                lines.append(f"# {f.name} = (unset)")
                unset.append(f.name)
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        if unset:  # TOML has no null: name the unset fields so that from_toml does not fall back to defaults
            lines.append(f"unset = {_toml_value(unset)}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Checks one config value against its field type (TOML and JSON give any type) and normalises harmless
    variants: an int where a float is expected, a whole float where an int is expected, one string where a list of
    strings is expected (``trigger_words = "sks"`` means ``["sks"]``).

    Raises:
        ConfigError: naming the field, the expected type and the value given.
    """
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be set (got nothing)")
    origin = typing.get_origin(base)
    if origin is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{name} must be a list of strings, got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name} must be a table of key = value, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Brings a config dict of an older ``version`` up to :data:`CONFIG_VERSION` (none yet: version 1 is the
    first). Kept so that saved presets and resume states keep loading when fields change."""
    data.setdefault("version", CONFIG_VERSION)
    return data
