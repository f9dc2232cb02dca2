"""Pure helpers behind the WebUI's "LoRA Trainer" tab (``scripts/lib_lora_tab.py``).

The script file builds gradio widgets and wires events; everything it shows or computes comes from here, so it can
be tested without gradio or the WebUI:

- parameter widgets generated from :class:`~lib_lora.config.TrainConfig` fields (:func:`field_specs`), widget values
  <-> config dicts (:func:`config_from_widgets`, :func:`widgets_from_config`), the live step arithmetic
  (:func:`steps_text`);
- the dataset panel: per-folder counts (:func:`dataset_summary`), the doctor's findings as table rows
  (:func:`finding_rows`), thumbnails (:func:`thumbnails`);
- the captions panel: auto-captioning through the WebUI's interrogators (:class:`InterrogatorTagger`), tag
  frequency, prune suggestions, batch edits and the per-image editor (:func:`read_caption`, :func:`save_caption`);
- the run panel: status text, the loss chart (:func:`loss_chart`, drawn with Pillow by :mod:`lib_lora.plots`),
  checkpoint and run tables;
- :func:`guard`, which turns any exception of a callback into a readable message (the tab never shows a traceback).

Never imports the WebUI's ``modules`` nor gradio. Importing it does not import torch (the dataset functions import
``lib_lora.data.dataset``, which does, when called).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .config import CACHE_MODES, MIXED_PRECISIONS, NONFINITE_POLICIES, SAVE_PRECISIONS, TrainConfig
from .errors import ConfigError, DatasetError, LoraError

log = logging.getLogger("lib_lora.webui_tab")

# ---------------------------------------------------------------------------------------------------------------
# Parameter widgets from TrainConfig fields
# ---------------------------------------------------------------------------------------------------------------

#: Fields of the "basic" group, in display order.
BASIC_FIELDS: tuple[str, ...] = (
    "network_dim", "network_alpha", "learning_rate", "train_batch_size", "max_train_epochs", "max_train_steps",
    "resolution", "save_every_n_steps", "output_name", "trigger_words", "network_train_unet_only",
)  # fmt: skip

#: Fields set by the dataset panel (folder and repeats of a plain folder).
DATASET_FIELDS: tuple[str, ...] = ("train_data_dir", "repeats")

#: Fields the WebUI job decides (the loaded model, the Lora folder, the device): never shown as widgets.
HOST_FIELDS: tuple[str, ...] = ("model", "output_dir", "logging_dir", "device", "version")

#: Widget labels where the field name alone says too little.
LABELS: dict[str, str] = {
    "network_dim": "Rank (network_dim)",
    "network_alpha": "Alpha (network_alpha)",
    "learning_rate": "Learning rate",
    "train_batch_size": "Batch size",
    "max_train_epochs": "Epochs (blank: use steps)",
    "max_train_steps": "Max steps (used when epochs is blank)",
    "resolution": "Resolution (px)",
    "save_every_n_steps": "Save every N steps (blank: off)",
    "output_name": "Output name",
    "trigger_words": "Trigger words (comma-separated)",
    "network_train_unet_only": "Train UNet only (no text encoder)",
    "sample_prompts": "Sample prompts (one per line)",
    "optimizer_args": "Optimizer arguments (JSON object, e.g. {\"weight_decay\": 0.01})",
    "v_prediction": "v-prediction",
}

#: Choices of the string fields that take one of a fixed set of values.
CHOICES: dict[str, tuple[str, ...]] = {
    "mixed_precision": MIXED_PRECISIONS,
    "save_precision": SAVE_PRECISIONS,
    "on_nonfinite_loss": NONFINITE_POLICIES,
    "cache_latents": CACHE_MODES,
    "on_bad_image": ("skip", "stop"),
    "caption_extension": (".txt", ".caption"),
    "optimizer": ("AdamW", "AdamW8bit", "Lion", "Prodigy"),  # lib_lora.optimizers.OPTIMIZER_NAMES
    "lr_scheduler": (  # lib_lora.schedules.LR_SCHEDULES
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    ),
}

#: Dropdown values of ``v_prediction`` (``bool | None``).
TRISTATE = ("auto", "true", "false")


@dataclass(frozen=True)
class FieldSpec:
    """How one TrainConfig field is shown.

    Attributes:
        name: the field name (= TOML key).
        label: the widget label.
        kind: ``"bool"`` (checkbox), ``"int"`` / ``"float"`` (number), ``"text"`` (one-line string),
            ``"choice"`` (dropdown of ``choices``), ``"tristate"`` (auto / true / false), ``"optional"`` (a text box
            holding a number; blank = unset), ``"list"`` (comma-separated text), ``"lines"`` (one item per line),
            ``"json"`` (a JSON object as text), ``"optional_text"`` (a string; blank = unset).
        number: for ``"optional"`` fields, ``int`` or ``float``.
        choices: for ``"choice"``.
        default: the TrainConfig default, in widget form.
    """

    name: str
    label: str
    kind: str
    number: type | None = None
    choices: tuple[str, ...] = ()
    default: Any = None


def _spec(name: str, hint: Any, default: Any) -> FieldSpec:
    label = LABELS.get(name, name)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    if name in CHOICES:
        spec = FieldSpec(name, label, "choice", choices=CHOICES[name])
    elif base is bool and optional:
        spec = FieldSpec(name, label, "tristate", choices=TRISTATE)
    elif base is bool:
        spec = FieldSpec(name, label, "bool")
    elif base in (int, float) and optional:
        spec = FieldSpec(name, label, "optional", number=base)
    elif base in (int, float):
        spec = FieldSpec(name, label, "int" if base is int else "float")
    elif origin is list:
        spec = FieldSpec(name, label, "lines" if name == "sample_prompts" else "list")
    elif origin is dict:
        spec = FieldSpec(name, label, "json")
    elif optional:
        spec = FieldSpec(name, label, "optional_text")
    else:
        spec = FieldSpec(name, label, "text")
    return FieldSpec(spec.name, spec.label, spec.kind, spec.number, spec.choices, to_widget(spec, default))


@functools.lru_cache(maxsize=1)
def _all_specs() -> tuple[FieldSpec, ...]:
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    return tuple(_spec(f.name, hints[f.name], getattr(defaults, f.name)) for f in fields(TrainConfig))


def field_specs(group: str = "all") -> list[FieldSpec]:
    """Widget specs of the TrainConfig fields, in dataclass order (basic group: :data:`BASIC_FIELDS` order).

    Args:
        group: ``"basic"`` (:data:`BASIC_FIELDS`), ``"advanced"`` (every field not basic, not a dataset field, not a
            host field), ``"dataset"`` or ``"all"`` (basic + advanced + dataset).

    Raises:
        ConfigError: unknown group.
    """
    specs = {s.name: s for s in _all_specs()}
    if group == "basic":
        return [specs[n] for n in BASIC_FIELDS]
    if group == "dataset":
        return [specs[n] for n in DATASET_FIELDS]
    if group == "advanced":
        skip = set(BASIC_FIELDS) | set(DATASET_FIELDS) | set(HOST_FIELDS)
        return [s for s in specs.values() if s.name not in skip]
    if group == "all":
        return field_specs("basic") + field_specs("advanced") + field_specs("dataset")
    raise ConfigError(f"unknown field group {group!r}")


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value in the form its widget holds (numbers stay numbers; optional numbers and lists become text)."""
    if spec.kind == "tristate":
        return "auto" if value is None else ("true" if value else "false")
    if spec.kind == "optional":
        return "" if value is None else _fmt_number(value)
    if spec.kind == "list":
        return ", ".join(value or [])
    if spec.kind == "lines":
        return "\n".join(value or [])
    if spec.kind == "json":
        return json.dumps(value or {})
    if spec.kind in ("text", "optional_text"):
        return "" if value is None else str(value)
    return value


def _fmt_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value)) if abs(value) >= 1 else repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def from_widget(spec: FieldSpec, raw: Any) -> Any:
    """A widget's value as the config value (types are checked later by ``TrainConfig.from_dict``).

    Raises:
        ConfigError: text that is not a number where one is needed, or bad JSON; the message names the field.
    """
    if spec.kind == "tristate":
        return None if raw in (None, "", "auto") else str(raw).lower() == "true"
    if spec.kind == "optional":
        text = "" if raw is None else str(raw).strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{spec.name} must be a number or blank, got {text!r}") from None
        if spec.number is int:
            if not number.is_integer():
                raise ConfigError(f"{spec.name} must be a whole number or blank, got {text!r}")
            return int(number)
        return number
    if spec.kind == "int":
        if raw is None or raw == "":
            raise ConfigError(f"{spec.name} must be set")
        number = float(raw)
        if not number.is_integer():
            raise ConfigError(f"{spec.name} must be a whole number, got {raw!r}")
        return int(number)
    if spec.kind == "float":
        if raw is None or raw == "":
            raise ConfigError(f"{spec.name} must be set")
        return float(raw)
    if spec.kind == "bool":
        return bool(raw)
    if spec.kind == "list":
        return [t.strip() for t in str(raw or "").split(",") if t.strip()]
    if spec.kind == "lines":
        return [t.strip() for t in str(raw or "").splitlines() if t.strip()]
    if spec.kind == "json":
        text = str(raw or "").strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{spec.name} must be a JSON object like {{\"weight_decay\": 0.01}}: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{spec.name} must be a JSON object, got {text!r}")
        return value
    if spec.kind == "optional_text":
        return str(raw).strip() or None if raw is not None else None
    return "" if raw is None else str(raw)


def config_from_widgets(names: Sequence[str], values: Sequence[Any], base: Mapping[str, Any] | None = None,
                        validate: bool = True) -> dict[str, Any]:
    """The config dict for the widget values (``names[i]`` <-> ``values[i]``), over ``base``.

    Args:
        names: field names, as in :func:`field_specs`.
        values: the widgets' values.
        base: other keys to start from (e.g. the host's); widget values win.
        validate: check the result with :meth:`TrainConfig.validate`.

    Returns:
        ``TrainConfig.to_dict()`` of the resulting config (every field).

    Raises:
        ConfigError: a bad value or combination; the message names the field.
    """
    if len(names) != len(values):
        raise ConfigError(f"{len(names)} fields but {len(values)} values")
    specs = {s.name: s for s in _all_specs()}
    data: dict[str, Any] = dict(base or {})
    for name, raw in zip(names, values):
        if name not in specs:
            raise ConfigError(f"unknown config field {name!r}")
        data[name] = from_widget(specs[name], raw)
    cfg = TrainConfig.from_dict(data)
    if validate:
        cfg.validate()
    return cfg.to_dict()


def widgets_from_config(config: Mapping[str, Any], names: Sequence[str]) -> list[Any]:
    """The widget values for ``names`` from a config dict (missing keys: the TrainConfig default).

    Raises:
        ConfigError: unknown keys or bad types in ``config``.
    """
    cfg = TrainConfig.from_dict(dict(config))
    specs = {s.name: s for s in _all_specs()}
    return [to_widget(specs[n], getattr(cfg, n)) for n in names]


def load_toml(path: str) -> dict[str, Any]:
    """Reads a config TOML file (see :meth:`TrainConfig.from_toml`) into a dict.

    Raises:
        ConfigError: no path, unreadable file, bad TOML, unknown keys, wrong types.
    """
    if not str(path or "").strip():
        raise ConfigError("enter the path of a .toml file to load")
    return TrainConfig.from_toml(Path(str(path).strip()).expanduser()).to_dict()


def save_toml(path: str, config: Mapping[str, Any]) -> Path:
    """Writes the config as TOML (parent folders are created). Returns the path written.

    Raises:
        ConfigError: no path, or the file cannot be written.
    """
    if not str(path or "").strip():
        raise ConfigError("enter the path of the .toml file to write")
    target = Path(str(path).strip()).expanduser()
    if target.suffix.lower() != ".toml":
        target = target.with_suffix(target.suffix + ".toml") if target.suffix else target.with_suffix(".toml")
    text = TrainConfig.from_dict(dict(config)).to_toml()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {target}: {e}") from e
    return target


# ---------------------------------------------------------------------------------------------------------------
# Steps arithmetic
# ---------------------------------------------------------------------------------------------------------------


def plan_steps(train_images: int, batch_size: int, epochs: int | None, max_steps: int | None,
               grad_accum: int = 1) -> tuple[int, int, int]:
    """``(steps per epoch, total steps, epochs)`` as the trainer computes them without buckets:
    steps per epoch = ceil(ceil(images x repeats / batch) / accumulation); total = epochs x steps per epoch when
    epochs are set, else ``max_steps``; epochs = ceil(total / steps per epoch). Aspect-ratio buckets can add a few
    batches per epoch (a batch never mixes buckets). Pure.

    Raises:
        ConfigError: batch or accumulation < 1, or neither epochs nor steps set.
    """
    if batch_size < 1 or grad_accum < 1:
        raise ConfigError("batch size and gradient accumulation must be >= 1")
    per_epoch = max(1, math.ceil(math.ceil(max(train_images, 0) / batch_size) / grad_accum))
    if epochs:
        return per_epoch, epochs * per_epoch, epochs
    if not max_steps:
        raise ConfigError("set epochs or max steps")
    return per_epoch, max_steps, math.ceil(max_steps / per_epoch)


def steps_text(train_images: int | None, batch_size: Any, epochs: Any, max_steps: Any, grad_accum: Any = 1,
               save_every: Any = None) -> str:
    """The live "images x repeats x epochs / batch = steps" line for the tab (markdown). Never raises: bad or
    missing numbers give a sentence saying what is missing."""
    try:
        batch = int(float(batch_size))
        accum = int(float(grad_accum or 1))
        ep = int(float(epochs)) if str(epochs or "").strip() else None
        steps = int(float(max_steps)) if str(max_steps or "").strip() else None
        every = int(float(save_every)) if str(save_every or "").strip() else None
    except (TypeError, ValueError):
        return "Enter whole numbers for batch size, epochs and steps to see the step count."
    if train_images is None:
        return "Check the dataset to see the step count (images x repeats x epochs / batch)."
    try:
        per_epoch, total, n_epochs = plan_steps(train_images, batch, ep, steps, accum)
    except ConfigError as e:
        return str(e).capitalize() + "."
    accum_txt = f" / accumulation {accum}" if accum > 1 else ""
    if ep:
        line = (f"**{train_images}** images x repeats x **{ep}** epochs / batch **{batch}**{accum_txt} = "
                f"**{total}** steps ({per_epoch} per epoch)")
    else:
        line = (f"**{total}** steps (max steps) = about **{n_epochs}** epochs of {train_images} images x repeats "
                f"/ batch {batch}{accum_txt} ({per_epoch} steps per epoch)")
    if every:
        line += f"; a checkpoint every {every} steps = {total // every} checkpoint(s) + the final file"
    if ep and steps:
        line += f". Epochs is set, so Max steps ({steps}) is not used: clear Epochs to train by steps"
    return line


# ---------------------------------------------------------------------------------------------------------------
# Dataset panel
# ---------------------------------------------------------------------------------------------------------------

SUMMARY_HEADERS = ["folder", "repeats", "images", "images x repeats", "captioned", "skipped"]
FINDING_HEADERS = ["file", "severity", "check", "reason", "fix"]


def dataset_folder(path: Any) -> Path:
    """The dataset folder typed in the tab, checked to exist.

    Raises:
        DatasetError: blank, or not a folder.
    """
    text = str(path or "").strip()
    if not text:
        raise DatasetError("enter the dataset folder (a folder of images, or Kohya 10_name sub-folders)")
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist or is not a folder")
    return folder


@dataclass
class DatasetSummary:
    """What the dataset panel shows from a scan.

    Attributes:
        rows: one row per subset folder (:data:`SUMMARY_HEADERS`).
        num_images: usable images. num_train_images: images x repeats.
        images: the usable image files, in scan order.
        text: markdown: layout, totals, the scan's warnings and notes.
    """

    rows: list[list[Any]]
    num_images: int
    num_train_images: int
    images: list[Path]
    text: str


def dataset_summary(path: Any, repeats: Any = 1, caption_extension: str = ".txt") -> DatasetSummary:
    """Scans the dataset (:func:`lib_lora.data.dataset.scan_dataset`) for the per-folder counts.

    Raises:
        DatasetError: no folder, not a folder, no usable image, caption problems the scan refuses.
        ConfigError: repeats < 1.
    """
    from .data.dataset import ScanOptions, scan_dataset  # imports torch

    folder = dataset_folder(path)
    try:
        n_repeats = int(float(repeats or 1))
    except (TypeError, ValueError):
        raise ConfigError(f"repeats must be a whole number, got {repeats!r}") from None
    report = scan_dataset(folder, ScanOptions(caption_extension=caption_extension, repeats=n_repeats))
    rows = [[s.name, s.repeats, s.image_count, s.images_with_repeats, s.caption_counts.get(caption_extension, 0),
             len(s.skipped)] for s in report.subsets]
    layout = {"kohya": "Kohya layout (N_name sub-folders)", "subset_folder": "one N_name folder",
              "plain": f"plain folder x {n_repeats} repeats"}.get(report.layout, report.layout)
    lines = [f"**{report.num_images}** images, **{report.num_train_images}** with repeats; {layout}."]
    lines += [f"- warning: {w}" for w in report.warnings] + [f"- {n}" for n in report.notes]
    return DatasetSummary(rows, report.num_images, report.num_train_images, [r.path for r in report.images],
                          "\n".join(lines))


def finding_rows(findings: Iterable[Any]) -> list[list[str]]:
    """Doctor findings (:class:`lib_lora.doctor.Finding`) as table rows (:data:`FINDING_HEADERS`): one row per file,
    errors first; a finding about the whole folder gets the file ``(dataset)``."""
    order = {"error": 0, "warning": 1, "info": 2}
    rows = []
    for f in sorted(findings, key=lambda f: order.get(f.severity, 3)):
        for file in (f.files or ("(dataset)",)):
            rows.append([file, f.severity, f.check, f.message, f.fix])
    return rows


def run_doctor(path: Any, kind: str = "concept", resolution: Any = 512, trigger: str | None = None,
               caption_extension: str = ".txt") -> Any:
    """Runs :func:`lib_lora.doctor.run_checks` on the tab's inputs. Returns the :class:`~lib_lora.doctor.Report`.

    Raises:
        DatasetError / ConfigError: as :func:`~lib_lora.doctor.run_checks`.
    """
    from .doctor import run_checks

    first_trigger = next((t.strip() for t in str(trigger or "").split(",") if t.strip()), None)
    return run_checks(dataset_folder(path), kind=kind or "concept", resolution=int(float(resolution or 512)),
                      trigger=first_trigger, caption_extension=caption_extension)


def doctor_text(report: Any) -> str:
    """One markdown line for a doctor report: counts and verdict."""
    c = report.counts
    verdict = ("**errors to fix** before training (or tick ignore_dataset_errors)" if c["error"]
               else "warnings: training works, the result may suffer" if c["warning"] else "no problems found")
    return f"Doctor: {c['error']} error(s), {c['warning']} warning(s), {c['info']} info; {verdict}."


def thumbnails(images: Sequence[Path], side: int = 256, limit: int = 48) -> list[tuple[Any, str]]:
    """``[(PIL thumbnail, file name)]`` for a gallery: the first ``limit`` images, longer side ``side`` pixels.
    Unreadable files are left out (the doctor reports them)."""
    from PIL import Image

    out = []
    for path in list(images)[:limit]:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (side, side))
                thumb = img.convert("RGB")
                thumb.thumbnail((side, side))
            out.append((thumb, Path(path).name))
        except Exception:  # noqa: BLE001 - a broken file: the doctor lists it with the reason
            continue
    return out


# ---------------------------------------------------------------------------------------------------------------
# Captions panel
# ---------------------------------------------------------------------------------------------------------------


class InterrogatorTagger:
    """A :class:`lib_lora.taggers.Tagger` over one of the WebUI's interrogators.

    ``interrogate(kind, pil_image) -> str`` is the host's (``WebUIHost.interrogate``: BLIP through
    ``shared.interrogator``, DeepBooru through ``modules.deepbooru.model``). The text is split at ``","`` into tags,
    each with score 1.0 (interrogators give no scores); a BLIP sentence becomes one tag.

    Raises (from :meth:`tag`):
        DatasetError: the interrogator failed on the image (reported per image by ``tag_folder``).
    """

    def __init__(self, interrogate: Callable[[str, Any], str], kind: str):
        self.interrogate = interrogate
        self.kind = kind

    def tag(self, image: Any) -> dict[str, float]:
        """``{tag: 1.0}`` from the interrogator's text."""
        from .data.captions import split_tags
        from .tags import normalise

        try:
            text = self.interrogate(self.kind, image)
        except Exception as e:  # noqa: BLE001 - any failure inside the WebUI becomes a per-image message
            raise DatasetError(f"{self.kind} interrogator failed: {type(e).__name__}: {e}") from e
        text = str(text or "").strip()
        # The WebUI's interrogators report their own failures as text: BLIP returns "<error>" (modules/interrogate.py
        # catches the exception), and a DeepBooru model that failed to load gives "" for every image.
        if not text or text == "<error>":
            raise DatasetError(f"{self.kind} interrogator gave {'no text' if not text else repr(text)} (its model "
                               "may be missing or failed to load: see the WebUI console); caption not written")
        tags = [normalise(t) for t in split_tags(text)]
        return {t: 1.0 for t in tags if t}


def auto_caption(path: Any, interrogate: Callable[[str, Any], str], kind: str, mode: str = "skip",
                 trigger: str | None = None, caption_extension: str = ".txt",
                 progress: Callable[[int, int], None] | None = None) -> str:
    """Captions the dataset's images with a WebUI interrogator (:func:`lib_lora.taggers.tag_folder`) and returns a
    markdown summary.

    Args:
        path: the dataset folder.
        interrogate: ``(kind, image) -> text``.
        kind: the interrogator's name, e.g. ``"BLIP"`` or ``"DeepBooru"``.
        mode: ``skip`` (only images without a caption), ``overwrite``, ``prepend`` or ``append``.
        trigger: first trigger word, put first in every caption written; None or "" for none.
        caption_extension: ``.txt`` or ``.caption``.
        progress: ``progress(done, total)``.

    Raises:
        DatasetError / ConfigError: bad folder, mode or trigger; a caption file that cannot be read or written.
    """
    from .taggers import tag_folder

    folder = dataset_folder(path)
    first = next((t.strip() for t in str(trigger or "").split(",") if t.strip()), None)
    result = tag_folder(folder, InterrogatorTagger(interrogate, kind), mode=mode, trigger=first,
                        caption_extension=caption_extension, progress=progress)
    lines = [f"{kind}: wrote {len(result.written)} caption(s), kept {len(result.kept)} existing, "
             f"{len(result.failed)} failed."]
    lines += [f"- failed {_rel(p, folder)}: {r}" for p, r in result.failed[:10]]
    return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def caption_list(path: Any, caption_extension: str = ".txt") -> list[str]:
    """The dataset's images relative to the folder (``/``-separated), for the editor's picker.

    Raises:
        DatasetError: bad folder.
    """
    from .data.images import list_image_files
    from .tags import dataset_image_folders

    folder = dataset_folder(path)
    out = []
    for sub in dataset_image_folders(folder):
        images, _ = list_image_files(sub, (".txt", ".caption", ".npz", caption_extension.lower()))
        out += [_rel(p, folder) for p in images]
    return out


def _image_in(folder: Path, rel: Any) -> Path:
    name = str(rel or "").strip()
    if not name:
        raise DatasetError("pick an image first")
    image = (folder / name).resolve()
    if folder.resolve() not in image.parents or not image.is_file():
        raise DatasetError(f"{name} is not an image of {folder}")
    return image


def read_caption(path: Any, rel: Any, caption_extension: str = ".txt") -> tuple[Path, str]:
    """``(image path, caption line)`` of one image of the dataset (``""`` when it has no caption file).

    Raises:
        DatasetError: bad folder, an image outside it, a caption file that is not UTF-8.
    """
    from .data.captions import caption_path
    from .tags import parse_caption_bytes

    folder = dataset_folder(path)
    image = _image_in(folder, rel)
    cap = caption_path(image, caption_extension)
    if not cap.is_file():
        return image, ""
    try:
        data = cap.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {cap}: {e}") from e
    return image, parse_caption_bytes(data, str(cap)).caption


def save_caption(path: Any, rel: Any, caption: str, caption_extension: str = ".txt") -> Path:
    """Writes one image's caption line (other lines of the file are kept; UTF-8, atomic). Returns the file.

    Raises:
        DatasetError: bad folder, an image outside it, the file cannot be written.
    """
    from .data.captions import caption_path
    from .tags import parse_caption_bytes, write_atomic

    folder = dataset_folder(path)
    image = _image_in(folder, rel)
    cap = caption_path(image, caption_extension)
    text = " ".join(str(caption or "").split())
    if cap.is_file():
        parsed = parse_caption_bytes(cap.read_bytes(), str(cap))
        write_atomic(cap, parsed.with_caption(text))
    else:
        write_atomic(cap, (text + "\n").encode("utf-8"))
    return cap


def tag_frequency_rows(path: Any, caption_extension: str = ".txt") -> list[list[Any]]:
    """``[[tag, captions containing it, share in %]]``, most frequent first (:func:`lib_lora.tags.tag_frequency`).

    Raises:
        DatasetError: bad folder or unreadable caption file.
    """
    from .tags import read_captions, tag_frequency

    captions = list(read_captions(dataset_folder(path), caption_extension).values())
    total = max(len(captions), 1)
    return [[tag, n, round(100.0 * n / total, 1)] for tag, n in tag_frequency(captions).items()]


def prune_rows(path: Any, trigger: str | None, threshold_percent: Any = 50,
               caption_extension: str = ".txt") -> list[list[Any]]:
    """Tags to delete so their feature binds into the trigger (:func:`lib_lora.tags.suggest_prune`), as
    ``[[tag, captions, share in %]]``.

    Raises:
        DatasetError / ConfigError: bad folder, threshold outside (0, 100].
    """
    from .tags import read_captions, suggest_prune

    captions = list(read_captions(dataset_folder(path), caption_extension).values())
    triggers = [t.strip() for t in str(trigger or "").split(",") if t.strip()]
    found = suggest_prune(captions, float(threshold_percent) / 100.0, triggers)
    return [[tag, n, round(100.0 * frac, 1)] for tag, n, frac in found]


def parse_replace(text: Any) -> dict[str, str]:
    """``"old=new; other -> new2"`` (``;`` or new lines between pairs, ``=`` or ``->`` inside) as a dict.

    Raises:
        ConfigError: a pair without ``=`` / ``->`` or with an empty side.
    """
    out = {}
    for part in str(text or "").replace("\n", ";").split(";"):
        if not part.strip():
            continue
        sep = "->" if "->" in part else "=" if "=" in part else None
        if sep is None:
            raise ConfigError(f"replace {part.strip()!r}: write it as old=new")
        old, new = (s.strip() for s in part.split(sep, 1))
        if not old or not new:
            raise ConfigError(f"replace {part.strip()!r}: both sides must be tags")
        out[old] = new
    return out


def batch_edit(path: Any, add: Any = "", remove: Any = "", replace: Any = "", trigger: Any = "",
               dedupe: bool = True, dry_run: bool = False, caption_extension: str = ".txt") -> str:
    """Adds, removes and replaces tags in every caption file (:func:`lib_lora.tags.edit_folder`), optionally puts the
    first trigger word first; returns a markdown summary (changes listed for a dry run).

    Raises:
        DatasetError / ConfigError: bad folder, bad replace pairs or trigger, unwritable files.
    """
    from .tags import TagEdit, edit_folder

    split = [t.strip() for t in str(add or "").split(",") if t.strip()]
    drop = [t.strip() for t in str(remove or "").split(",") if t.strip()]
    first = next((t.strip() for t in str(trigger or "").split(",") if t.strip()), None)
    edit = TagEdit(trigger=first, remove=tuple(drop), replace=parse_replace(replace), add=tuple(split),
                   dedupe=bool(dedupe))
    folder = dataset_folder(path)
    result = edit_folder(folder, edit, caption_extension=caption_extension, dry_run=bool(dry_run))
    verb = "would change" if dry_run else "changed"
    lines = [f"{verb} {len(result.changes)} caption file(s), {result.unchanged} unchanged, "
             f"{len(result.missing)} image(s) without a caption file."]
    for c in result.changes[:20]:
        lines.append(f"- `{_rel(c.path, folder)}`: {c.before} -> **{c.after}**")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Run panel
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT_HEADERS = ["file", "step", "epoch", "loss"]
RUN_HEADERS = ["run", "files", "latest", "folder"]
FINAL_STATES = ("idle", "finished", "stopped", "failed")


def _num(value: Any, fmt: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _eta(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, float(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def status_markdown(status: Mapping[str, Any] | None) -> str:
    """The job's state as markdown: state, step / total, epoch, loss (and smoothed), LR, speed, ETA, messages,
    error, last checkpoint. ``status`` is ``TrainingJobs.status()``'s dict; missing keys show as ``-``."""
    if not status:
        return "No training job yet."
    st = dict(status)
    state = st.get("state") or "idle"
    lines = [f"**{state}**" + (f" (job `{st['job_id']}`)" if st.get("job_id") else "")]
    if st.get("total"):
        lines.append(f"step {st.get('step') or 0} / {st['total']}, epoch {st.get('epoch') or 0} / "
                     f"{st.get('total_epochs') or '-'}; loss {_num(st.get('loss'))} (smoothed "
                     f"{_num(st.get('avg_loss'))}), lr {_num(st.get('lr'), '{:.3g}')}, "
                     f"{_num(st.get('it_per_s'), '{:.2f}')} it/s, ETA {_eta(st.get('eta_s'))}")
    if st.get("last_checkpoint"):
        lines.append(f"last checkpoint: `{st['last_checkpoint']}`")
    if st.get("output_dir"):
        lines.append(f"output folder: `{st['output_dir']}`")
    if st.get("error"):
        lines.append(f"**error:** {st['error']}")
    lines += [f"- {m}" for m in list(st.get("messages") or [])[-5:]]
    return "\n\n".join(lines[:2]) + ("\n\n" + "\n".join(lines[2:]) if len(lines) > 2 else "")


def tensorboard_markdown(status: Mapping[str, Any] | None) -> str:
    """The TensorBoard log folder and the command that opens it."""
    st = dict(status or {})
    log_dir = st.get("log_dir")
    if not log_dir:
        return "TensorBoard: the log folder appears here once a run starts."
    cmd = st.get("tensorboard_command") or f'tensorboard --logdir "{log_dir}"'
    return f"TensorBoard logs: `{log_dir}`\n\nOpen them with: `{cmd}`"


def checkpoint_rows(status: Mapping[str, Any] | None) -> list[list[Any]]:
    """The job's checkpoints (``status["checkpoints"]``) as rows (:data:`CHECKPOINT_HEADERS`)."""
    rows = []
    for c in (status or {}).get("checkpoints") or []:
        loss = c.get("loss")
        rows.append([Path(str(c.get("path", ""))).name, c.get("step"), c.get("epoch"),
                     None if loss is None else round(float(loss), 5)])
    return rows


def loss_chart(history: Mapping[str, Sequence[float]] | None, width: int = 760, height: int = 420) -> Any:
    """The live chart: loss and smoothed loss over steps on top, the learning rate below (own scale, shown in units of
    its power of ten, e.g. "x 1e-4"), drawn with
    :func:`lib_lora.plots.loss_plot`. Returns a PIL image, or None before the first logged step."""
    from PIL import Image

    from .plots import loss_plot

    h = dict(history or {})
    steps = list(h.get("step") or [])
    if not steps:
        return None
    n = len(steps)

    def series(key: str) -> list[float]:
        values = list(h.get(key) or [])
        return [float(v) if v is not None else float("nan") for v in values][:n] + [float("nan")] * (n - len(values))

    top_h = int(height * 0.62)
    top = loss_plot(steps, {"loss": series("loss"), "smoothed": series("avg_loss")}, width, top_h, "training loss")
    lr = series("lr")
    finite = [abs(v) for v in lr if math.isfinite(v) and v != 0]
    exponent = math.floor(math.log10(max(finite))) if finite else 0
    scaled = [v / 10.0**exponent for v in lr]  # the plot pads a flat line by +-0.5: keep values near 1
    title = f"learning rate (x 1e{exponent})" if exponent else "learning rate"
    bottom = loss_plot(steps, {"lr": scaled}, width, height - top_h, title)
    img = Image.new("RGB", (width, height), "white")
    img.paste(top, (0, 0))
    img.paste(bottom, (0, top_h))
    return img


def run_rows(folder: str | os.PathLike | None) -> list[list[Any]]:
    """The LoRA runs under ``folder`` and its sub-folders (:func:`lib_lora.webui_grid.list_runs`; the tab writes to
    ``<Lora folder>/<sub-folder>/<output name>/``), newest file first, as rows (:data:`RUN_HEADERS`). Never
    raises: an unreadable file counts as oldest."""
    from .webui_grid import list_runs

    if not folder:
        return []

    def newest(run) -> float:
        try:
            return max(p.stat().st_mtime for p in run.paths)
        except (OSError, ValueError):
            return 0.0

    runs = sorted(list_runs(folder).values(), key=newest, reverse=True)
    return [[run.name, len(run.files), run.files[-1].stem if run.files else "", str(run.folder)] for run in runs]


def grid_hint(run_name: Any, selected: bool = False) -> str:
    """What to do with a run in the grid Script ("LoRA checkpoint x weight grid" on txt2img); ``selected``: the
    tab has already chosen the Script and filled in the run."""
    name = str(run_name or "").strip()
    if not name:
        return "Pick a run in the table (or type its name) first."
    if selected:
        return (f"Run `{name}` is selected in txt2img's Script **LoRA checkpoint x weight grid**: set the prompt and "
                "the weights there and press Generate.")
    return (f"Run `{name}`: in txt2img choose the Script **LoRA checkpoint x weight grid**, then pick or type "
            f"`{name}` in its Run box (the refresh button next to it lists new runs; the name was copied to the "
            "clipboard when the browser allows it).")


# ---------------------------------------------------------------------------------------------------------------
# Support and errors
# ---------------------------------------------------------------------------------------------------------------


def support_message(model: Any, lowvram: bool = False, detect: Callable[[Any], str | None] | None = None) -> str | None:
    """Why training on the WebUI's model cannot work, or None when it can.

    Args:
        model: ``shared.sd_model`` (None: not loaded yet; not a reason to refuse, the job checks again).
        lowvram: ``--lowvram`` is set (the WebUI streams weights to the GPU piecewise; backward through it is not
            possible, and the built-in trainers refuse it too).
        detect: :func:`lib_lora.webui_model.detect_support`.
    """
    if lowvram:
        return ("Training is not possible with --lowvram: the WebUI moves the model to the GPU piece by piece, "
                "which backpropagation cannot follow. Restart the WebUI without --lowvram (--medvram works for "
                "UNet-only training).")
    if model is None or detect is None:
        return None
    try:
        return detect(model)
    except Exception as e:  # noqa: BLE001 - the check itself failing is a reason too
        return f"Cannot tell whether the loaded model can be trained: {type(e).__name__}: {e}"


def error_message(exc: BaseException) -> str:
    """A readable one-paragraph message for an exception (no traceback): lib_lora's own errors as they are, others
    with their type name."""
    if isinstance(exc, LoraError):
        return f"Error: {exc}"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"Error: {exc.strerror or exc}: {exc.filename}"
    return f"Error: {type(exc).__name__}: {exc}"


def guard(fn: Callable[..., Any], n_outputs: int, no_change: Callable[[], Any], message_index: int = 0,
          wrap_message: Callable[[str], Any] = lambda s: s) -> Callable[..., Any]:
    """Wraps a tab callback so that an exception becomes a message instead of a traceback.

    On an exception the wrapper logs it (with the traceback, to the console log only) and returns ``n_outputs``
    values: ``no_change()`` for each output (gradio's ``gr.update()``) except ``message_index``, which gets
    ``wrap_message(error_message(exc))``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error becomes a message in the tab
            # An expected refusal (bad input, a busy job) is the user's message, not a bug: no traceback in the log.
            log.warning("lib_lora tab: %s failed: %s", getattr(fn, "__name__", "callback"), exc,
                        exc_info=not isinstance(exc, LoraError))
            msg = wrap_message(error_message(exc))
            if n_outputs == 1:
                return msg
            out = [no_change() for _ in range(n_outputs)]
            out[message_index] = msg
            return tuple(out)

    return wrapper
