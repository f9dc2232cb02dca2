"""Group the LoRA files of a folder into training runs by their Kohya file names.

Source convention (sd-scripts ``train_util.get_epoch_ckpt_name`` / ``get_step_ckpt_name`` / ``get_last_ckpt_name``,
the same stems :func:`lib_lora.trainer.checkpoint_name` writes): ``<name>-000001`` per epoch (6+ digits),
``<name>-step00000200`` per step (8+ digits), ``<name>`` for the final file. Files are addressed by their stem, as
the WebUI does; ``ss_output_name`` is never used (all checkpoints of a run share it).

Order inside a run: epoch files by epoch, step files by step, the final file last. When a run holds both epoch
and step files, their optimizer step (``ss_steps`` in the safetensors header, read without loading tensors) orders
them; files without it keep epochs before steps.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "LORA_EXTENSIONS",
    "Run",
    "RunFile",
    "find_run",
    "group_runs",
    "parse_checkpoint_stem",
    "resolve_run",
]

#: File types the WebUI lists as networks (``networks.list_available_networks``).
LORA_EXTENSIONS: tuple[str, ...] = (".safetensors", ".pt", ".ckpt")

_EPOCH_RE = re.compile(r"^(?P<name>.+)-(?P<n>\d{6,})$")
_STEP_RE = re.compile(r"^(?P<name>.+)-step(?P<n>\d{8,})$")


def parse_checkpoint_stem(stem: str) -> tuple[str, int | None, int | None]:
    """Splits a Kohya checkpoint stem into (run name, epoch, step).

    ``"立绘 style v1-000002"`` -> ``("立绘 style v1", 2, None)``; ``"x-step00000200"`` -> ``("x", None, 200)``;
    anything else is a final file: ``("x", None, None)``. Never raises.
    """
    m = _STEP_RE.match(stem)
    if m:
        return m.group("name"), None, int(m.group("n"))
    m = _EPOCH_RE.match(stem)
    if m:
        return m.group("name"), int(m.group("n")), None
    return stem, None, None


@dataclass(frozen=True)
class RunFile:
    """One checkpoint file of a run.

    Attributes:
        path: the file; stem: its name without extension (what a ``<lora:stem:w>`` tag names).
        run: the run name; epoch / step: from the stem (None when not that kind); final: neither.
        steps: ``ss_steps`` from the header when it was read (mixed runs only), else None.
    """

    path: Path
    stem: str
    run: str
    epoch: int | None = None
    step: int | None = None
    steps: int | None = None

    @property
    def final(self) -> bool:
        """True for the run's final file (stem = run name)."""
        return self.epoch is None and self.step is None

    @property
    def label(self) -> str:
        """Short text for a grid axis: ``"epoch 2"``, ``"step 200"`` or ``"final"``."""
        if self.epoch is not None:
            return f"epoch {self.epoch}"
        if self.step is not None:
            return f"step {self.step}"
        return "final"


@dataclass
class Run:
    """The files of one run, in training order (final last)."""

    name: str
    folder: Path
    files: list[RunFile] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """The files' paths in order."""
        return [f.path for f in self.files]

    @property
    def stems(self) -> list[str]:
        """The files' stems in order."""
        return [f.stem for f in self.files]


def _header_steps(path: Path) -> int | None:
    """``ss_steps`` of a safetensors header (tensors are not read); None when absent or unreadable."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        import safetensors

        with safetensors.safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            value = (f.metadata() or {}).get("ss_steps")
        return int(str(value).strip()) if value is not None else None
    except Exception:  # noqa: BLE001 - unreadable header: fall back to the name order
        return None


def _order(files: list[RunFile]) -> list[RunFile]:
    has_epochs = any(f.epoch is not None for f in files)
    has_steps = any(f.step is not None for f in files)
    if has_epochs and has_steps:
        files = [RunFile(f.path, f.stem, f.run, f.epoch, f.step, _header_steps(f.path)) if not f.final else f
                 for f in files]
    known = has_epochs and has_steps and all(f.steps is not None for f in files if not f.final)

    def key(f: RunFile):
        if f.final:
            return (2, 0, 0, f.stem)
        if known:
            return (0, f.steps, 0 if f.epoch is not None else 1, f.stem)
        if f.epoch is not None:
            return (0, f.epoch, 0, f.stem)
        return (1, f.step, 0, f.stem)

    return sorted(files, key=key)


def group_runs(folder: str | os.PathLike[str], extensions: tuple[str, ...] = LORA_EXTENSIONS) -> dict[str, Run]:
    """The runs in ``folder`` (not recursive), by run name, each with its files in training order.

    Hidden files (names starting with ``.``, e.g. the temp files of an interrupted save) and files of other types
    (sidecar ``.json``, previews) are ignored. When two files share a stem (``x.safetensors`` and ``x.pt``), the
    first by extension order in ``extensions`` is kept, as one stem names one network in the WebUI.

    Returns:
        {run name: Run}, names in sorted order.

    Raises:
        ConfigError: ``folder`` is not a directory.
    """
    base = Path(os.fspath(folder))
    if not base.is_dir():
        raise ConfigError(f"{str(base)!r} is not a folder")
    rank = {ext: i for i, ext in enumerate(e.lower() for e in extensions)}
    chosen: dict[str, Path] = {}
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        suffix = entry.suffix.lower()
        if entry.name.startswith(".") or suffix not in rank or not entry.is_file():
            continue
        stem = entry.name[: -len(entry.suffix)]
        old = chosen.get(stem)
        if old is None or rank[suffix] < rank[old.suffix.lower()]:
            chosen[stem] = entry
    groups: dict[str, list[RunFile]] = {}
    for stem, path in chosen.items():
        name, epoch, step = parse_checkpoint_stem(stem)
        groups.setdefault(name, []).append(RunFile(path=path, stem=stem, run=name, epoch=epoch, step=step))
    return {name: Run(name=name, folder=base, files=_order(groups[name])) for name in sorted(groups)}


def find_run(folder: str | os.PathLike[str], name: str) -> Run:
    """The run called ``name`` in ``folder``.

    Raises:
        ConfigError: no such folder, or no run of that name (the message lists the runs found).
    """
    runs = group_runs(folder)
    if name in runs:
        return runs[name]
    found = ", ".join(repr(n) for n in runs) or "none"
    raise ConfigError(f"no run {name!r} in {os.fspath(folder)!r} (runs found: {found})")


def resolve_run(spec: str | os.PathLike[str]) -> Run:
    """A run from ``DIR/NAME`` (run NAME in folder DIR) or ``DIR`` (the folder's only run).

    A ``DIR/NAME`` whose NAME is a checkpoint file (``DIR/x-000002.safetensors``) selects that file's run.

    Raises:
        ConfigError: no such folder or run, or ``DIR`` alone holds no run or several (the message lists them).
    """
    path = Path(os.fspath(spec))
    if path.is_dir():
        runs = group_runs(path)
        if len(runs) == 1:
            return next(iter(runs.values()))
        if runs:
            names = ", ".join(repr(n) for n in runs)
            raise ConfigError(f"{str(path)!r} holds several runs ({names}): pass DIR/NAME")
        if not path.parent.is_dir() or path.name not in group_runs(path.parent):
            raise ConfigError(f"no LoRA files ({', '.join(LORA_EXTENSIONS)}) in {str(path)!r}")
    name = path.name
    if path.suffix.lower() in LORA_EXTENSIONS:
        name = parse_checkpoint_stem(path.name[: -len(path.suffix)])[0]
    return find_run(path.parent, name)
