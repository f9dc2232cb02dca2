"""Safetensors metadata of a LoRA file: the ``ss_*`` and ``modelspec.*`` keys that sd-scripts writes and A1111 reads.

Conventions (see docs/kohya-format-and-trainer.md §3 and docs/webui-internals.md §2.5):

- Every metadata value is a ``str``. sd-scripts builds a dict of Python values and applies ``str()`` to each one, with
  structured fields (tag frequency, dataset dirs, bucket info, network args) pre-encoded with ``json.dumps``. So
  ``None`` is stored as ``"None"``, bools as ``"True"``/``"False"`` and tuples as ``"(512, 512)"``.
- A1111 (``sd_models.read_metadata_from_safetensors``) JSON-decodes values that start with ``{``; it reads
  ``ss_output_name`` (the alias used in ``<lora:alias:w>``), ``sshs_model_hash``, ``ss_base_model_version`` and
  ``ss_v2`` (SD version detection), and shows a few more in its metadata dialog.
- The design is dict-in/dict-out: :func:`build_ss_metadata` takes the trainer's values under their sd-scripts names
  without the ``ss_`` prefix, :func:`finalize_for_save` adds the per-save keys, and
  :func:`lib_lora.safetensors_io.save_lora_file` stringifies and adds the ``sshs_*`` hashes.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib_lora import __version__
from lib_lora.errors import ConfigError, FormatError

__all__ = [
    "BASE_MODEL_VERSIONS",
    "SS_METADATA_MINIMUM_KEYS",
    "build_ss_metadata",
    "finalize_for_save",
    "minimal_metadata",
    "parse_metadata_values",
    "read_base_version",
    "stringify_metadata",
    "stringify_value",
    "summarize",
]

#: ``ss_base_model_version`` values written by sd-scripts: ``model_util.get_model_version_str_for_sd1_sd2`` for
#: SD1/SD2 (``_v`` suffix for v-parameterization) and ``sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`` for SDXL.
BASE_MODEL_VERSIONS: dict[tuple[str, bool], str] = {
    ("sd1", False): "sd_v1",
    ("sd1", True): "sd_v1_v",
    ("sd2", False): "sd_v2",
    ("sd2", True): "sd_v2_v",
    ("sdxl", False): "sdxl_base_v1-0",
    ("sdxl", True): "sdxl_base_v1-0",
}

#: Keys kept by sd-scripts ``--no_metadata`` (``train_util.SS_METADATA_MINIMUM_KEYS``).
SS_METADATA_MINIMUM_KEYS: tuple[str, ...] = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)

# sd-scripts always writes these (a missing value becomes "None"), in this order.
_ALWAYS_FIELDS: tuple[str, ...] = (
    "session_id",
    "training_started_at",
    "output_name",
    "learning_rate",
    "text_encoder_lr",
    "unet_lr",
    "num_train_images",
    "num_batches_per_epoch",
    "num_epochs",
    "gradient_checkpointing",
    "gradient_accumulation_steps",
    "max_train_steps",
    "lr_warmup_steps",
    "lr_scheduler",
    "network_module",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "mixed_precision",
    "seed",
    "clip_skip",
    "cache_latents",
    "noise_offset",
    "min_snr_gamma",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "optimizer",
    "max_grad_norm",
    "training_comment",
    "batch_size_per_device",
    "total_batch_size",
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_no_upscale",
    "keep_tokens",
    "shuffle_caption",
    "flip_aug",
)

# Written only when given (not None). JSON fields are json.dumps'ed.
_JSON_FIELDS: tuple[str, ...] = (
    "tag_frequency",
    "dataset_dirs",
    "reg_dataset_dirs",
    "bucket_info",
    "datasets",
)
_OPTIONAL_FIELDS: tuple[str, ...] = (
    "sd_model_name",
    "sd_model_hash",
    "new_sd_model_hash",
    "vae_name",
    "vae_hash",
    "new_vae_hash",
    "full_fp16",
    "max_token_length",
    "color_aug",
    "random_crop",
    "num_reg_images",
    "prior_loss_weight",
    "multires_noise_iterations",
    "multires_noise_discount",
    "adaptive_noise_scale",
    "zero_terminal_snr",
    "noise_offset_random_strength",
    "ip_noise_gamma",
    "ip_noise_gamma_random_strength",
    "caption_dropout_every_n_epochs",
    "face_crop_aug_range",
    "scale_weight_norms",
    "debiased_estimation",
    "loss_type",
    "huber_schedule",
    "huber_c",
    "huber_scale",
    "lowram",
    "fp8_base",
    "fp8_base_unet",
)
# Inputs that are not ss_ fields themselves but drive ss_/modelspec values.
_DERIVED_INPUTS: tuple[str, ...] = (
    "base_model",
    "v_parameterization",
    "network_args",
    "title",
    "author",
    "description",
    "license",
    "tags",
    "usage_hint",
    "trigger_phrase",
    "timestep_range",
)
_SET_AT_SAVE: tuple[str, ...] = ("steps", "epoch", "training_finished_at")
_KNOWN_INPUTS = frozenset(_ALWAYS_FIELDS + _JSON_FIELDS + _OPTIONAL_FIELDS + _DERIVED_INPUTS)

_ARCH_SD_V1 = "stable-diffusion-v1"
_ARCH_SD_V2_512 = "stable-diffusion-v2-512"
_ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
_ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
_IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
_IMPL_DIFFUSERS = "diffusers"
_MODELSPEC_VERSION = "1.0.1"


# ----------------------------------------------------------------------------------------------------------------------
# Stringification
# ----------------------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numbers and tensors become plain numbers/lists, anything else ``str()``."""
    item = getattr(obj, "tolist", None)  # numpy arrays/scalars and torch tensors
    if callable(item):
        try:
            return item()
        except Exception:  # noqa: BLE001 - fall through to str()
            pass
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a value with a broken __str__ must not stop a save
        try:
            return repr(value)
        except Exception:  # noqa: BLE001
            return f"<unprintable {type(value).__name__}>"


def stringify_value(value: Any) -> str:
    """Convert one metadata value to the string sd-scripts would store.

    Rules (sd-scripts ``train_network.py`` applies ``str()`` after ``json.dumps`` of structured fields):

    - ``str`` unchanged; ``None`` -> ``"None"``; ``bool`` -> ``"True"``/``"False"``;
    - integers (Python, numpy) -> ``"8"``; other reals -> ``str(float(v))`` (``"0.0001"``, ``"1e-05"``, ``"nan"``);
    - a 0-dim / one-element tensor or numpy array -> the string of its Python scalar;
    - ``dict`` and ``list`` -> ``json.dumps`` (dicts as JSON objects; unserialisable members fall back to ``str``);
    - ``tuple`` -> ``str(tuple)``, e.g. ``"(512, 512)"`` as sd-scripts writes ``ss_resolution``;
    - anything else ``str(v)``.

    Never raises: a value that cannot be converted becomes its ``repr`` or ``"<unprintable T>"``.
    """
    try:
        if isinstance(value, str):
            return value
        if value is None or isinstance(value, bool):
            return str(value)
        if isinstance(value, numbers.Integral):
            return str(int(value))
        if isinstance(value, numbers.Real):
            return str(float(value))
        if isinstance(value, (dict, list)):
            try:
                return json.dumps(value, default=_json_default)
            except Exception:  # noqa: BLE001 - e.g. tuple keys, circular references
                return _safe_str(value)
        if isinstance(value, tuple):
            return _safe_str(value)
        numel = getattr(value, "numel", None) or getattr(value, "size", None)
        item = getattr(value, "item", None)
        if callable(item) and (numel() if callable(numel) else numel) == 1:
            return stringify_value(item())
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return _safe_str(value)
    except Exception:  # noqa: BLE001
        return _safe_str(value)


def stringify_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Return a copy of ``metadata`` with every value converted by :func:`stringify_value`.

    Args:
        metadata: ``{key: value}``; ``None`` is treated as ``{}``. Keys must be ``str`` (safetensors stores a
            ``dict[str, str]`` header).

    Returns:
        ``dict[str, str]`` in the input's key order, e.g. ``{"ss_network_dim": 8, "ss_seed": None}`` ->
        ``{"ss_network_dim": "8", "ss_seed": "None"}``.

    Raises:
        FormatError: a key is not a ``str``. Values never raise.
    """
    if metadata is None:
        return {}
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise FormatError(f"metadata key {key!r} is a {type(key).__name__}; safetensors metadata keys must be str")
        out[key] = stringify_value(value)
    return out


def parse_metadata_values(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Decode metadata as A1111 does: values starting with ``{`` are JSON-decoded when they parse.

    Mirrors ``sd_models.read_metadata_from_safetensors`` (A1111 v1.10.1). Other values are kept as they are.
    Never raises.
    """
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                out[key] = json.loads(value)
                continue
            except Exception:  # noqa: BLE001
                pass
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------------


def _normalise_base_model(value: Any) -> str:
    text = str(value).strip().lower()
    aliases = {
        "sd1": "sd1",
        "sd15": "sd1",
        "sd_v1": "sd1",
        "sd1.5": "sd1",
        "sd2": "sd2",
        "sd_v2": "sd2",
        "sdxl": "sdxl",
        "sdxl_base_v1-0": "sdxl",
    }
    if text not in aliases:
        raise ConfigError(f"base_model {value!r} is not one of 'sd1', 'sd2', 'sdxl'")
    return aliases[text]


def _resolution_pair(value: Any) -> tuple[int, int] | None:
    """Accept 512, (512,), (512, 768), [512, 768] or "512,768"; return (width, height)."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        elif isinstance(value, numbers.Integral):
            parts = [int(value)]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"resolution {value!r} is not an int or a (width, height) pair") from exc
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"resolution {value!r} is not an int or a (width, height) pair of positive ints")
    return parts[0], parts[1]


def build_ss_metadata(values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> dict[str, str]:
    """Build the training metadata sd-scripts ``train_network.py`` writes, plus the ``modelspec.*`` keys.

    Args:
        values: the trainer's values under sd-scripts' names without the ``ss_`` prefix (``"network_dim"``,
            ``"learning_rate"``, ...; an ``ss_`` prefix is also accepted). ``kwargs`` are merged over ``values``.
            Required: ``base_model`` (``"sd1"``, ``"sd2"``, ``"sdxl"``), ``network_dim`` (positive int) and
            ``network_alpha`` (number). Derived inputs:

            - ``v_parameterization`` (bool, default False): ``ss_base_model_version`` ``sd_v1_v``/``sd_v2_v``,
              ``modelspec.prediction_type`` ``"v"``, SD2 architecture ``stable-diffusion-v2-768-v``.
            - ``network_args`` (dict, e.g. ``{"conv_dim": 8, "conv_alpha": 1, "rank_dropout": 0.1}``):
              ``ss_network_args`` as JSON with every value a string (entries that are None are dropped).
            - ``title``, ``author``, ``description``, ``license``, ``tags``, ``usage_hint``, ``trigger_phrase``:
              ``modelspec.*``; without ``title``, :func:`finalize_for_save` uses the file stem.
            - ``timestep_range`` ((min, max)): ``modelspec.timestep_range`` ``"min,max"``.
            - ``resolution`` (int or (width, height)): ``ss_resolution`` ``"(w, h)"`` and ``modelspec.resolution``
              ``"wxh"`` (default 512, 768 for SD2-v, 1024 for SDXL, as ``sai_model_spec``).
            - ``text_encoder_lr`` may be a list; its first element is written (sd-scripts, networks.lora).

            Defaults: ``session_id`` a random int in [0, 2**32], ``training_started_at`` ``time.time()``,
            ``network_module`` ``"networks.lora"``. The other sd-scripts "always written" fields (learning rates,
            optimizer, seed, bucket settings, ...) are written as ``"None"`` when not given; JSON fields
            (``tag_frequency``, ``dataset_dirs``, ``reg_dataset_dirs``, ``bucket_info``, ``datasets``) and optional
            fields (``sd_model_name``, ``sd_model_hash``, ``new_sd_model_hash``, ``vae_*``, ...) only when given.

    Returns:
        ``dict[str, str]``: ``ss_*`` keys, then ``modelspec.*`` keys (``sai_model_spec`` "1.0.1", ``architecture``
        e.g. ``"stable-diffusion-v1/lora"``, ``implementation`` ``"diffusers"`` for SD1/SD2 and
        ``"https://github.com/Stability-AI/generative-models"`` for SDXL, ``resolution``, ``prediction_type``,
        ``encoder_layer`` = clip_skip when given, ``implementation_version`` ``"lib_lora/<version>"``). The per-save
        keys ``ss_steps``, ``ss_epoch``, ``ss_training_finished_at``, ``modelspec.date`` and (unless a title was
        given) ``modelspec.title`` are added by :func:`finalize_for_save`.

    Raises:
        ConfigError: an unknown input name (typo), a missing required input, a bad ``base_model``, ``network_dim``,
            ``network_alpha``, ``resolution`` or ``network_args``.
    """
    merged: dict[str, Any] = {}
    for source in (values or {}, kwargs):
        for key, value in source.items():
            name = key[3:] if isinstance(key, str) and key.startswith("ss_") else key
            merged[name] = value
    unknown = sorted(str(k) for k in merged if k not in _KNOWN_INPUTS)
    if unknown:
        set_at_save = [k for k in unknown if k in _SET_AT_SAVE]
        hint = f" ({', '.join(set_at_save)} are set by finalize_for_save)" if set_at_save else ""
        raise ConfigError(f"unknown metadata input(s) {', '.join(unknown)}{hint}")
    for required in ("base_model", "network_dim", "network_alpha"):
        if merged.get(required) is None:
            raise ConfigError(f"metadata input {required!r} is required")

    base = _normalise_base_model(merged["base_model"])
    v_param = bool(merged.get("v_parameterization") or False)
    dim = merged["network_dim"]
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0:
        raise ConfigError(f"network_dim {dim!r} is not a positive int")
    alpha = merged["network_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
        raise ConfigError(f"network_alpha {alpha!r} is not a finite number")

    fields: dict[str, Any] = {name: merged.get(name) for name in _ALWAYS_FIELDS}
    if fields["session_id"] is None:
        fields["session_id"] = random.randint(0, 2**32)
    if fields["training_started_at"] is None:
        fields["training_started_at"] = time.time()
    if fields["network_module"] is None:
        fields["network_module"] = "networks.lora"
    te_lr = fields["text_encoder_lr"]
    if isinstance(te_lr, (list, tuple)):
        fields["text_encoder_lr"] = te_lr[0] if te_lr else None
    reso = _resolution_pair(merged.get("resolution"))
    fields["resolution"] = reso

    out: dict[str, Any] = {}
    for name in _ALWAYS_FIELDS:
        if name == "output_name" and fields[name] is None:
            continue  # set from the file stem by finalize_for_save
        out["ss_" + name] = fields[name]
    out["ss_v2"] = base == "sd2"
    out["ss_base_model_version"] = BASE_MODEL_VERSIONS[(base, v_param)]

    network_args = merged.get("network_args")
    if network_args is not None:
        if not isinstance(network_args, Mapping):
            raise ConfigError(f"network_args {network_args!r} is not a dict of name -> value")
        out["ss_network_args"] = json.dumps(
            {str(k): stringify_value(v) for k, v in network_args.items() if v is not None}
        )
    for name in _JSON_FIELDS:
        if merged.get(name) is not None:
            value = merged[name]
            out["ss_" + name] = value if isinstance(value, str) else json.dumps(value, default=_json_default)
    for name in _OPTIONAL_FIELDS:
        if merged.get(name) is not None:
            out["ss_" + name] = merged[name]

    # modelspec (sd-scripts library/sai_model_spec.build_metadata_dataclass, lora=True)
    if base == "sdxl":
        arch, impl = _ARCH_SD_XL_V1_BASE, _IMPL_STABILITY_AI
        default_reso = (1024, 1024)
    elif base == "sd2":
        arch = _ARCH_SD_V2_768_V if v_param else _ARCH_SD_V2_512
        impl = _IMPL_DIFFUSERS
        default_reso = (768, 768) if v_param else (512, 512)
    else:
        arch, impl, default_reso = _ARCH_SD_V1, _IMPL_DIFFUSERS, (512, 512)
    spec_reso = reso or default_reso
    out["modelspec.sai_model_spec"] = _MODELSPEC_VERSION
    out["modelspec.architecture"] = f"{arch}/lora"
    out["modelspec.implementation"] = impl
    if merged.get("title") is not None:
        out["modelspec.title"] = merged["title"]
    out["modelspec.resolution"] = f"{spec_reso[0]}x{spec_reso[1]}"
    for name in ("description", "author", "license", "tags", "usage_hint", "trigger_phrase"):
        if merged.get(name) is not None:
            value = merged[name]
            out["modelspec." + name] = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    out["modelspec.implementation_version"] = f"lib_lora/{__version__}"
    out["modelspec.prediction_type"] = "v" if v_param else "epsilon"
    timesteps = merged.get("timestep_range")
    if timesteps is not None:
        if isinstance(timesteps, (str, int)):
            timesteps = (timesteps, timesteps)
        if len(timesteps) == 1:
            timesteps = (timesteps[0], timesteps[0])
        out["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    if fields["clip_skip"] is not None:
        out["modelspec.encoder_layer"] = f"{fields['clip_skip']}"
    return stringify_metadata(out)


def finalize_for_save(
    metadata: Mapping[str, Any],
    path: str | os.PathLike[str],
    steps: int,
    epoch: int,
    *,
    finished_at: float | None = None,
) -> dict[str, str]:
    """Return a copy of ``metadata`` with the keys sd-scripts ``save_model()`` sets at every save.

    Args:
        metadata: the dict from :func:`build_ss_metadata` (not modified).
        path: the LoRA file about to be written. ``ss_output_name`` becomes its stem (``"x-000002"`` for
            ``.../x-000002.safetensors``), so each epoch file has its own A1111 alias (sd-scripts writes the run's
            output name instead, which makes epoch files collide as aliases in A1111).
        steps: global optimiser step at save time -> ``ss_steps``.
        epoch: epoch number -> ``ss_epoch`` (sd-scripts: epoch+1 for an epoch save, num_epochs for the final one).
        finished_at: Unix seconds -> ``ss_training_finished_at``; default ``time.time()``.

    Returns:
        ``dict[str, str]``. When ``metadata`` carries modelspec keys, ``modelspec.date`` is set to the save time as
        local ISO-8601 without zone or microseconds (``"2025-01-31T12:34:56"``, sd-scripts convention) and
        ``modelspec.title`` to the stem unless a title is already there. Stale ``sshs_*`` hashes are dropped (the
        save recomputes them).

    Raises:
        FormatError: a metadata key is not a ``str``.
    """
    out = {k: v for k, v in stringify_metadata(metadata).items() if not k.startswith("sshs_")}
    stamp = time.time() if finished_at is None else float(finished_at)
    stem = Path(os.fspath(path)).stem
    out["ss_output_name"] = stem
    out["ss_training_finished_at"] = str(stamp)
    out["ss_steps"] = stringify_value(steps)
    out["ss_epoch"] = stringify_value(epoch)
    if "modelspec.sai_model_spec" in out:
        out.setdefault("modelspec.title", stem)
        out["modelspec.date"] = datetime.datetime.fromtimestamp(int(stamp)).isoformat()
    return out


def minimal_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Keep only what sd-scripts ``--no_metadata`` keeps: :data:`SS_METADATA_MINIMUM_KEYS` plus ``modelspec.*``.

    Raises:
        FormatError: a metadata key is not a ``str``.
    """
    return {
        k: v
        for k, v in stringify_metadata(metadata).items()
        if k in SS_METADATA_MINIMUM_KEYS or k.startswith("modelspec.")
    }


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def read_base_version(metadata: Mapping[str, Any] | None) -> str:
    """Which base model a LoRA is for, exactly as A1111 v1.10.1 ``network.NetworkOnDisk.detect_version`` decides.

    ``ss_base_model_version`` starting with ``"sdxl_"`` -> ``"sdxl"``; else ``ss_v2 == "True"`` -> ``"sd2"``; else any
    metadata at all -> ``"sd1"``; no metadata (``None`` or ``{}``) -> ``"unknown"``. Never raises.
    """
    if not metadata:
        return "unknown"
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "sdxl"
    if str(metadata.get("ss_v2", "")) == "True":
        return "sd2"
    return "sd1"


def _as_dict(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.startswith("{"):
        try:
            decoded = json.loads(value)
        except Exception:  # noqa: BLE001
            return None
        return decoded if isinstance(decoded, dict) else None
    return None


def summarize(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Human-readable summary of a LoRA's metadata for the CLI ``inspect`` command.

    Returns an ordered ``{label: text}`` dict; a label is present only when its source keys are (``"base model"``
    always is). Labels: ``"output name"`` (ss_output_name), ``"base model"`` (:func:`read_base_version` and the raw
    ss_base_model_version), ``"trained on"`` (ss_sd_model_name), ``"network"`` (ss_network_module),
    ``"dim/alpha"`` (``"8/4.0"``, plus ``"conv 4/1"`` from ss_network_args), ``"steps"``, ``"epoch"`` (``"2/10"``
    with ss_num_epochs), ``"resolution"``, ``"trigger words"`` (modelspec.trigger_phrase), ``"dataset dirs"``
    (``"10_sks dog: 25 images x 10"``), ``"hash"`` (first 12 hex chars of sshs_model_hash, A1111 shorthash).

    Values may be raw strings or A1111-decoded dicts. Never raises on odd values.
    """
    md = dict(metadata or {})
    get = md.get
    out: dict[str, str] = {}
    if get("ss_output_name") is not None:
        out["output name"] = str(get("ss_output_name"))
    base = read_base_version(md)
    raw_base = get("ss_base_model_version")
    out["base model"] = f"{base} ({raw_base})" if raw_base is not None else base
    if get("ss_sd_model_name") is not None:
        out["trained on"] = str(get("ss_sd_model_name"))
    if get("ss_network_module") is not None:
        out["network"] = str(get("ss_network_module"))
    if get("ss_network_dim") is not None or get("ss_network_alpha") is not None:
        text = f"{get('ss_network_dim', '?')}/{get('ss_network_alpha', '?')}"
        args = _as_dict(get("ss_network_args")) or {}
        if "conv_dim" in args:
            text += f", conv {args['conv_dim']}/{args.get('conv_alpha', '?')}"
        out["dim/alpha"] = text
    if get("ss_steps") is not None:
        out["steps"] = str(get("ss_steps"))
    if get("ss_epoch") is not None:
        epochs = get("ss_num_epochs")
        out["epoch"] = f"{get('ss_epoch')}/{epochs}" if epochs not in (None, "None") else str(get("ss_epoch"))
    if get("ss_resolution") is not None:
        out["resolution"] = str(get("ss_resolution"))
    if get("modelspec.trigger_phrase"):
        out["trigger words"] = str(get("modelspec.trigger_phrase"))
    dirs = _as_dict(get("ss_dataset_dirs"))
    if dirs:
        parts = []
        for name, info in dirs.items():
            if isinstance(info, dict):
                parts.append(f"{name}: {info.get('img_count', '?')} images x {info.get('n_repeats', '?')}")
            else:
                parts.append(str(name))
        out["dataset dirs"] = "; ".join(parts)
    if get("sshs_model_hash"):
        out["hash"] = str(get("sshs_model_hash"))[:12]
    return out
