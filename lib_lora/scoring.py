"""Automatic scoring of a checkpoint x weight grid with a CLIP model, and writing the winner back.

Three signals per grid cell, all cosine similarities of L2-normalised CLIP embeddings (no unit, -1 ... 1):

- **fidelity**: the cell image against the run's training images (``"mean"`` (default): the mean similarity to all
  of them, the CLIP-I score of the DreamBooth paper, Ruiz et al. 2023, section 4.1; ``"max"``: the similarity to
  the closest one, which rewards near-copies of a single photo);
- **prompt adherence**: the cell image against the text of its prompt with every ``<lora:...>``/``<lyco:...>`` tag
  and the run's trigger words removed (CLIP-T in the same paper), so that it measures whether the *rest* of the
  prompt is still obeyed;
- **collapse** (overfitting signal): for cells of the same checkpoint and weight made with different seeds, the
  mean pairwise image-image similarity. Seeds should give different pictures; a LoRA that draws the same picture
  whatever the seed is over-trained. The *excess* collapse is the group's value minus a reference: the no-LoRA
  baseline's cross-seed similarity when the grid has a baseline row, else the lowest group value of the grid. With
  one seed there is no collapse signal and its weight is dropped.

The **combined score** of a (checkpoint, weight) group is ``w_f * F + w_p * P - w_o * O`` with the default
weights :data:`DEFAULT_WEIGHTS` (fidelity 0.5, adherence 0.3, overfitting 0.2), where F and P are the group's
mean fidelity / adherence min-max scaled to 0 ... 1 across the grid's LoRA groups (CLIP's image-image and
text-image similarities live on different scales, about 0.5-0.95 and 0.15-0.35 for ViT-L/14, so raw values cannot
be added) and O is the excess collapse divided by the grid's largest excess (0 when none). The highest combined
score is the best checkpoint and weight (ties: higher fidelity, then the earlier column, then the lower weight).

CLIP model: either passed in (:meth:`ClipScorer.from_model`, e.g. the WebUI interrogator's ``clip_model`` /
``clip_preprocess``, an OpenAI ``clip`` model, which open_clip's tokenizer serves because both use the same BPE
vocabulary and 77-token context) or loaded from a local file with open_clip (:func:`load_clip`). Nothing is ever
downloaded: a missing file, an unknown architecture, an architecture whose text tower comes from the Hugging Face
hub, or open_clip not being installed raise :class:`ScoringUnavailable` with a message for the user, and the grid
goes on without scores.

"Apply" (:func:`apply_best`): writes the winning weight as ``"preferred weight"`` into the winning file's A1111
sidecar ``<stem>.json`` (:mod:`lib_lora.sidecar`, other keys kept) and its cell image as ``<stem>.preview.png``
(atomic write), which the WebUI's Lora cards show (``ui_extra_networks.find_preview``: ``<stem>.png`` is looked at
first, so an existing one hides ours; the result says so).
"""

from __future__ import annotations

import csv
import io
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, DatasetError, LoraError
from .grid import GridCell, format_weight
from .prompt_syntax import EXTRA_NETWORK_RE, split_trigger_words

__all__ = [
    "DEFAULT_WEIGHTS",
    "FIDELITY_MODES",
    "ClipScorer",
    "GridScores",
    "GroupScore",
    "ScoringUnavailable",
    "adherence_text",
    "apply_best",
    "find_training_images",
    "load_clip",
    "load_training_images",
    "parse_clip_spec",
    "score_grid",
]

#: Weights of the combined score: fidelity, prompt adherence, overfitting penalty (see the module docstring).
DEFAULT_WEIGHTS: dict[str, float] = {"fidelity": 0.5, "adherence": 0.3, "overfit": 0.2}

#: How a cell's similarities to the training images are reduced to one fidelity value.
FIDELITY_MODES: tuple[str, ...] = ("mean", "max")

#: Most training images embedded for fidelity (evenly picked from the sorted list when there are more).
MAX_TRAINING_IMAGES = 64

_BATCH = 16


class ScoringUnavailable(LoraError):
    """No CLIP model can be used (none given, file missing, offline-only architecture, open_clip missing). The
    message is meant for the user; the grid is made without scores."""


# ----------------------------------------------------------------------------------------------------------------------
# CLIP model
# ----------------------------------------------------------------------------------------------------------------------


def _default_tokenizer() -> Callable[[list[str]], Any]:
    try:
        import open_clip
    except ImportError as exc:
        raise ScoringUnavailable("scoring needs open_clip (pip package open-clip-torch), which is not installed") \
            from exc
    return open_clip.tokenize


@dataclass
class ClipScorer:
    """A CLIP model with its image preprocessing and tokenizer, embedding images and texts.

    Attributes:
        model: has ``encode_image(pixels)`` and ``encode_text(tokens)`` (open_clip ``CLIP`` or OpenAI ``clip``).
        preprocess: PIL image -> ``(3, H, W)`` float tensor (the model's own transform).
        tokenize: list of texts -> ``(N, context)`` long tensor; texts longer than the context are truncated.
        name: a description for messages and tables.
    """

    model: Any
    preprocess: Callable[[Any], Any]
    tokenize: Callable[[list[str]], Any]
    name: str = "CLIP"

    @classmethod
    def from_model(cls, model: Any, preprocess: Callable[[Any], Any],
                   tokenize: Callable[[list[str]], Any] | None = None, name: str = "CLIP") -> ClipScorer:
        """Wraps an already loaded model, e.g. the WebUI's ``shared.interrogator.clip_model`` and
        ``clip_preprocess`` (OpenAI ``clip``, ViT-L/14). ``tokenize`` defaults to ``open_clip.tokenize``.

        Raises:
            ScoringUnavailable: ``model`` or ``preprocess`` is None, the model lacks ``encode_image`` /
                ``encode_text``, or no tokenizer can be had.
        """
        if model is None or preprocess is None:
            raise ScoringUnavailable("no CLIP model is loaded")
        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
            raise ScoringUnavailable(f"{type(model).__name__} has no encode_image/encode_text: not a CLIP model")
        return cls(model=model, preprocess=preprocess, tokenize=tokenize or _default_tokenizer(), name=name)

    def _device_dtype(self):
        import torch

        for p in self.model.parameters():
            return p.device, p.dtype
        return torch.device("cpu"), torch.float32

    def embed_images(self, images: Sequence[Any]):
        """L2-normalised image embeddings, ``(len(images), D)`` float32 on the CPU. Images are converted to RGB."""
        import torch

        device, dtype = self._device_dtype()
        out = []
        with torch.no_grad():
            for i in range(0, len(images), _BATCH):
                batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + _BATCH]])
                feats = self.model.encode_image(batch.to(device=device, dtype=dtype)).float().cpu()
                out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def embed_texts(self, texts: Sequence[str]):
        """L2-normalised text embeddings, ``(len(texts), D)`` float32 on the CPU."""
        import torch

        device, _ = self._device_dtype()
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), _BATCH):
                tokens = self.tokenize(list(texts[i:i + _BATCH])).to(device)
                feats = self.model.encode_text(tokens).float().cpu()
                out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0)


def parse_clip_spec(spec: str) -> tuple[str, Path]:
    """``"ARCH:FILE"`` -> (open_clip architecture, weights file); ``"FILE"`` alone -> ("", FILE) (only valid for an
    OpenAI TorchScript file such as the WebUI's ``models/clip/ViT-L-14.pt``, whose architecture is in the file).

    The split is at the first ``:`` that is not a Windows drive letter (``ViT-B-32:C:/m/clip.bin`` works). ARCH may
    also be the path of an open_clip model-config ``.json`` (registered under its file stem).

    Raises:
        ConfigError: empty spec or file part.
    """
    text = str(spec).strip()
    if not text:
        raise ConfigError("no CLIP model given (expected ARCH:FILE, e.g. ViT-L-14:/models/clip/open_clip_model.bin)")
    arch, sep, rest = text.partition(":")
    if sep and len(arch) == 1 and arch.isalpha() and rest[:1] in ("/", "\\"):  # "C:/path" alone
        return "", Path(text)
    if not sep:
        return "", Path(text)
    if not rest.strip():
        raise ConfigError(f"CLIP spec {spec!r} names no file (expected ARCH:FILE)")
    return arch.strip(), Path(rest.strip())


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_clip(spec: str, device: str = "cpu") -> ClipScorer:
    """Loads a CLIP model with open_clip from a local file, never downloading.

    Args:
        spec: ``"ARCH:FILE"`` (see :func:`parse_clip_spec`): ``ARCH`` an open_clip architecture
            (``open_clip.list_models()``, e.g. ``ViT-L-14``, ``ViT-B-32``) or a model-config ``.json``; ``FILE`` an
            open_clip checkpoint (``.bin``/``.pt``/``.pth`` state dict via
            ``open_clip.create_model_and_transforms(arch, pretrained=FILE)``, or ``.safetensors``). A ``FILE``
            alone must be an OpenAI TorchScript archive (``open_clip.load_openai_model(FILE, jit=False)``).
        device: torch device for the model.

    Raises:
        ScoringUnavailable: open_clip missing, no such file, unknown architecture, an architecture whose text tower
            is a Hugging Face model (it would be downloaded), or the file does not fit the architecture (the
            message names it).
    """
    if str(spec).strip().startswith("hf-hub:"):
        raise ScoringUnavailable(f"{spec!r}: hf-hub: models are downloaded; give ARCH:FILE with a local file")
    try:
        arch, path = parse_clip_spec(spec)
    except ConfigError as exc:
        raise ScoringUnavailable(str(exc)) from exc
    if not path.is_file():
        raise ScoringUnavailable(f"CLIP weights file {str(path)!r} not found (scoring needs a local file; nothing "
                                 "is downloaded)")
    try:
        import open_clip
        from open_clip.transform import image_transform
    except ImportError as exc:
        raise ScoringUnavailable("scoring needs open_clip (pip package open-clip-torch), which is not installed") \
            from exc
    path = path.resolve()
    try:
        if not arch:
            if not _is_torchscript(path):
                raise ScoringUnavailable(f"{path.name}: give the architecture as ARCH:FILE (e.g. ViT-L-14:{path}); "
                                         "only OpenAI TorchScript files carry their own")
            model = open_clip.load_openai_model(str(path), device=device, jit=False)
            preprocess = image_transform(model.visual.image_size, is_train=False)
            return ClipScorer(model.eval(), preprocess, open_clip.tokenize, name=path.name)
        if arch.lower().endswith(".json"):
            cfg_path = Path(arch)
            if not cfg_path.is_file():
                raise ScoringUnavailable(f"model config {arch!r} not found")
            open_clip.add_model_config(cfg_path)
            arch = cfg_path.stem
        if arch.startswith("hf-hub:") or arch not in open_clip.list_models():
            raise ScoringUnavailable(f"unknown open_clip architecture {arch!r} (known: e.g. ViT-B-32, ViT-L-14, "
                                     "ViT-H-14; hf-hub: names would download)")
        cfg = open_clip.get_model_config(arch) or {}
        if "hf_model_name" in cfg.get("text_cfg", {}):
            raise ScoringUnavailable(f"{arch}: its text tower is a Hugging Face model that open_clip would download; "
                                     "use an architecture with a built-in text tower")
        if path.suffix.lower() == ".safetensors":
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
            _load_safetensors(model, path)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=device)
    except ScoringUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/open_clip raise many kinds; the user needs the message
        raise ScoringUnavailable(f"cannot load CLIP {arch or ''} from {path.name}: {type(exc).__name__}: {exc}") \
            from exc
    return ClipScorer(model.eval(), preprocess, open_clip.get_tokenizer(arch), name=f"{arch} ({path.name})")


def _load_safetensors(model, path: Path) -> None:
    from open_clip.factory import convert_to_custom_text_state_dict, resize_pos_embed
    from safetensors.torch import load_file

    state = load_file(str(path))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    resize_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------------------
# Training images
# ----------------------------------------------------------------------------------------------------------------------


def find_training_images(dataset_dir: str | os.PathLike[str] | None = None, *,
                         run_folder: str | os.PathLike[str] | None = None, run_name: str | None = None,
                         limit: int = MAX_TRAINING_IMAGES) -> list[Path]:
    """The training images of a run: the images in ``dataset_dir`` and its direct sub-folders (Kohya ``10_name/``
    layout), sorted by path.

    Without ``dataset_dir``, the run's ``<run_folder>/<run_name>.config.toml`` (written by the trainer) gives its
    ``train_data_dir``.

    Args:
        limit: at most this many, evenly picked from the sorted list.

    Returns:
        The image paths (may be empty when nothing is found).

    Raises:
        DatasetError: ``dataset_dir`` (given or from the config) is not a folder.
    """
    from .data.images import list_image_files

    if dataset_dir is None:
        if run_folder is None or run_name is None:
            return []
        cfg = Path(os.fspath(run_folder)) / f"{run_name}.config.toml"
        if not cfg.is_file():
            return []
        from .config import TrainConfig

        try:
            dataset_dir = TrainConfig.from_toml(cfg).train_data_dir
        except ConfigError:
            return []
        if not dataset_dir:
            return []
    folder = Path(os.fspath(dataset_dir))
    if not folder.is_dir():
        raise DatasetError(f"training image folder {str(folder)!r} does not exist")
    found, _ = list_image_files(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(list_image_files(sub)[0])
    found.sort()
    if len(found) > limit > 0:
        step = len(found) / limit
        found = [found[int(i * step)] for i in range(limit)]
    return found


def load_training_images(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Any], list[str]]:
    """Opens images as RGB (:func:`lib_lora.data.images.open_image`); returns (images, problems) where each
    unreadable file gives a one-line problem instead of an error."""
    from .data.images import open_image

    images, problems = [], []
    for p in paths:
        try:
            images.append(open_image(Path(os.fspath(p))))
        except DatasetError as exc:
            problems.append(str(exc))
    return images, problems


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def adherence_text(prompt: str, trigger_words: str | Sequence[str] | None = None) -> str:
    """The prompt text prompt adherence is measured against: every extra-network tag removed, each trigger phrase
    removed where it stands as a whole phrase (case-insensitive), and the comma list tidied (empty items dropped).
    ``"sks dog, <lora:x:0.5> on a beach"`` with trigger ``"sks dog"`` -> ``"on a beach"``."""
    import re

    text = EXTRA_NETWORK_RE.sub(" ", prompt)
    for word in split_trigger_words(trigger_words):
        text = re.sub(r"(?<!\w)" + re.escape(word) + r"(?!\w)", " ", text, flags=re.IGNORECASE)
    parts = [" ".join(p.split()) for p in text.split(",")]
    return ", ".join(p for p in parts if p)


@dataclass
class GroupScore:
    """Scores of one (checkpoint, weight) group: the cells of all seeds at that grid position.

    Attributes:
        checkpoint, weight: the group (``checkpoint`` None and ``weight`` None for the baseline row).
        row, col: grid position; images: how many cells had an image.
        fidelity, adherence: mean over the group's cells (cosine similarity); None without images.
        collapse: mean pairwise similarity between different seeds' cells (None with fewer than two).
        overfit: collapse above the reference (>= 0), None when there is no collapse signal.
        combined: the combined score (None for the baseline or a group without images).
        best: True for the winner.
    """

    checkpoint: str | None
    weight: float | None
    row: int
    col: int
    images: int = 0
    fidelity: float | None = None
    adherence: float | None = None
    collapse: float | None = None
    overfit: float | None = None
    combined: float | None = None
    best: bool = False

    @property
    def baseline(self) -> bool:
        """True for the no-LoRA row."""
        return self.weight is None


@dataclass
class GridScores:
    """The result of :func:`score_grid`.

    Attributes:
        groups: one per LoRA (checkpoint, weight) position, in plan order (column, then row); the baseline (one
            group for the whole row, its cells are the same image per seed) is ``baseline``.
        cells: (row, col, page) -> {"fidelity": f, "adherence": a} per scored cell.
        best: the winning group, None when nothing could be scored.
        weights: the combined-score weights used (overfit dropped to 0 without a collapse signal).
        fidelity_mode: "mean" or "max"; reference_collapse: the reference of the overfitting signal.
        model: the CLIP model's name; training_images: how many were used; messages: notes for the user.
    """

    groups: list[GroupScore]
    cells: dict[tuple[int, int, int], dict[str, float]]
    best: GroupScore | None
    weights: dict[str, float]
    fidelity_mode: str
    baseline: GroupScore | None = None
    reference_collapse: float | None = None
    model: str = ""
    training_images: int = 0
    messages: list[str] = field(default_factory=list)

    def group(self, checkpoint: str, weight: float) -> GroupScore:
        """The group of a checkpoint and weight. Raises KeyError when absent."""
        for g in self.groups:
            if g.checkpoint == checkpoint and g.weight == weight:
                return g
        raise KeyError((checkpoint, weight))

    def _rows(self) -> list[list[str]]:
        def f(x: float | None) -> str:
            return "" if x is None else f"{x:.4f}"

        rows = []
        for g in ([self.baseline] if self.baseline else []) + self.groups:
            rows.append(["no LoRA" if g.baseline else g.checkpoint, "" if g.baseline else format_weight(g.weight),
                         f(g.fidelity), f(g.adherence), f(g.collapse), f(g.overfit), f(g.combined),
                         "yes" if g.best else ""])
        return rows

    HEADER = ("checkpoint", "weight", "fidelity", "adherence", "collapse", "overfit", "combined", "best")

    def table_markdown(self) -> str:
        """A markdown table (one line per group, baseline first) followed by a line naming the winner and the
        weights."""
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + " --- |" * len(self.HEADER)]
        for r in self._rows():
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)

    def table_csv(self) -> str:
        """The same table as CSV text (header first)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.HEADER)
        w.writerows(self._rows())
        return buf.getvalue()

    def summary(self) -> str:
        """One line: the best checkpoint and weight, and how the score was made."""
        ws = ", ".join(f"{k} {v:g}" for k, v in self.weights.items())
        how = (f"fidelity = {self.fidelity_mode} CLIP similarity to {self.training_images} training images; "
               f"score weights {ws}; model {self.model}")
        if self.best is None:
            return f"no best cell ({how})"
        return (f"best: {self.best.checkpoint} at weight {format_weight(self.best.weight)} "
                f"(score {self.best.combined:.3f}; {how})")

    def to_dict(self) -> dict:
        """JSON-ready summary (groups, baseline, best, weights, messages)."""
        def g2d(g: GroupScore | None):
            if g is None:
                return None
            return {k: getattr(g, k) for k in ("checkpoint", "weight", "row", "col", "images", "fidelity",
                                               "adherence", "collapse", "overfit", "combined", "best")}

        return {"groups": [g2d(g) for g in self.groups], "baseline": g2d(self.baseline), "best": g2d(self.best),
                "weights": dict(self.weights), "fidelity_mode": self.fidelity_mode,
                "reference_collapse": self.reference_collapse, "model": self.model,
                "training_images": self.training_images, "messages": list(self.messages)}


def _scale(values: dict[Any, float]) -> dict[Any, float]:
    if not values:
        return {}
    lo, hi = min(values.values()), max(values.values())
    if hi - lo < 1e-9:
        return {k: 0.5 for k in values}
    return {k: (v - lo) / (hi - lo) for k, v in values.items()}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pairwise_mean(emb) -> float | None:
    n = emb.shape[0]
    if n < 2:
        return None
    sim = emb @ emb.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def score_grid(scorer: ClipScorer, cells: Sequence[tuple[GridCell, Any]], training_images: Sequence[Any], *,
               trigger_words: str | Sequence[str] | None = None, fidelity: str = "mean",
               weights: Mapping[str, float] | None = None) -> GridScores:
    """Scores the cells of a grid.

    Args:
        scorer: the CLIP model (:class:`ClipScorer`).
        cells: (cell, PIL image or None) pairs, e.g. every cell of a :class:`lib_lora.grid.GridPlan` with the image
            made for it; None (missing / unreadable file, interrupted) is skipped. Baseline cells (weight None)
            give the reference for the overfitting signal and the ``baseline`` line of the table; they never win.
        training_images: PIL images of the run's dataset (fidelity is None without them; the combined score then
            uses adherence and overfitting only, and a message says so).
        trigger_words: phrases removed from the prompts before prompt adherence (see :func:`adherence_text`).
        fidelity: ``"mean"`` or ``"max"`` (see the module docstring).
        weights: the combined-score weights {"fidelity", "adherence", "overfit"} (default :data:`DEFAULT_WEIGHTS`);
            each >= 0.

    Returns:
        :class:`GridScores`; ``best`` is None when no LoRA cell had an image.

    Raises:
        ConfigError: unknown fidelity mode, unknown or negative weights, all weights zero.
    """
    import torch

    if fidelity not in FIDELITY_MODES:
        raise ConfigError(f"fidelity mode {fidelity!r} is not one of {', '.join(FIDELITY_MODES)}")
    ws = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = set(ws) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ConfigError(f"unknown score weights {sorted(unknown)} (known: {', '.join(DEFAULT_WEIGHTS)})")
    for k in DEFAULT_WEIGHTS:
        ws.setdefault(k, 0.0)
        if not math.isfinite(float(ws[k])) or ws[k] < 0:
            raise ConfigError(f"score weight {k} must be a finite number >= 0, got {ws[k]!r}")
    if sum(ws.values()) <= 0:
        raise ConfigError("all score weights are 0")

    messages: list[str] = []
    made = [(c, im) for c, im in cells if im is not None]
    # The baseline row repeats one image per seed; embed it once per seed.
    seen_base: set[int] = set()
    todo = []
    for c, im in made:
        if c.baseline:
            if c.page in seen_base:
                continue
            seen_base.add(c.page)
        todo.append((c, im))
    img_emb = scorer.embed_images([im for _, im in todo]) if todo else None
    texts = sorted({adherence_text(c.prompt, trigger_words) for c, _ in todo})
    txt_emb = dict(zip(texts, scorer.embed_texts(texts))) if texts else {}
    train_emb = scorer.embed_images(list(training_images)) if training_images else None
    if train_emb is None:
        messages.append("no training images found: fidelity not scored")

    cell_scores: dict[tuple[int, int, int], dict[str, float]] = {}
    per_group: dict[tuple[int, int], list[int]] = {}
    for i, (c, _) in enumerate(todo):
        e = img_emb[i]
        scores = {"adherence": float(e @ txt_emb[adherence_text(c.prompt, trigger_words)])}
        if train_emb is not None:
            sims = train_emb @ e
            scores["fidelity"] = float(sims.mean() if fidelity == "mean" else sims.max())
        cell_scores[(c.row, c.col, c.page)] = scores
        per_group.setdefault((-1, -1) if c.baseline else (c.row, c.col), []).append(i)

    def make_group(key, members) -> GroupScore:
        c0 = todo[members[0]][0]
        ss = [cell_scores[(todo[i][0].row, todo[i][0].col, todo[i][0].page)] for i in members]
        return GroupScore(
            checkpoint=c0.checkpoint, weight=c0.weight, row=c0.row if key != (-1, -1) else 0,
            col=c0.col if key != (-1, -1) else -1, images=len(members),
            fidelity=_mean([s["fidelity"] for s in ss if "fidelity" in s]),
            adherence=_mean([s["adherence"] for s in ss]),
            collapse=_pairwise_mean(img_emb[torch.tensor(members)]))

    baseline = make_group((-1, -1), per_group.pop((-1, -1))) if (-1, -1) in per_group else None
    # Groups in plan order; positions of LoRA cells without any image get an empty group.
    positions = []
    for c, _ in cells:
        if not c.baseline and (c.row, c.col) not in positions:
            positions.append((c.row, c.col))
    proto = {(c.row, c.col): c for c, _ in cells}
    groups = []
    for pos in positions:
        if pos in per_group:
            groups.append(make_group(pos, per_group[pos]))
        else:
            c = proto[pos]
            groups.append(GroupScore(c.checkpoint, c.weight, c.row, c.col))
    scored = [g for g in groups if g.images]

    collapses = [g.collapse for g in scored if g.collapse is not None]
    reference = None
    if collapses:
        reference = baseline.collapse if baseline is not None and baseline.collapse is not None else min(collapses)
        for g in scored:
            if g.collapse is not None:
                g.overfit = max(0.0, g.collapse - reference)
    else:
        if ws["overfit"] > 0:
            messages.append("one seed per cell: no overfitting signal (use several seeds to get one)")
        ws["overfit"] = 0.0
    if train_emb is None:
        ws["fidelity"] = 0.0

    f_s = _scale({id(g): g.fidelity for g in scored if g.fidelity is not None})
    p_s = _scale({id(g): g.adherence for g in scored if g.adherence is not None})
    top = max((g.overfit for g in scored if g.overfit is not None), default=0.0)
    for g in scored:
        o = (g.overfit / top) if (g.overfit is not None and top > 0) else 0.0
        g.combined = (ws["fidelity"] * f_s.get(id(g), 0.0) + ws["adherence"] * p_s.get(id(g), 0.0)
                      - ws["overfit"] * o)
    best = None
    if scored:
        order = {id(g): i for i, g in enumerate(scored)}
        best = max(scored, key=lambda g: (g.combined, g.fidelity if g.fidelity is not None else -2.0,
                                          -g.col, -(g.weight or 0.0), -order[id(g)]))
        best.best = True
    else:
        messages.append("no LoRA cell has an image: nothing to score")
    return GridScores(groups=groups, cells=cell_scores, best=best, weights=ws, fidelity_mode=fidelity,
                      baseline=baseline, reference_collapse=reference, model=scorer.name,
                      training_images=0 if train_emb is None else int(train_emb.shape[0]), messages=messages)


# ----------------------------------------------------------------------------------------------------------------------
# Apply
# ----------------------------------------------------------------------------------------------------------------------


def apply_best(scores: GridScores, files: Mapping[str, str | os.PathLike[str]],
               cells: Sequence[tuple[GridCell, Any]]) -> dict:
    """Writes the winner back: ``"preferred weight"`` into ``<stem>.json`` and the winning cell image (first seed
    with an image) as ``<stem>.preview.png``, both atomically, beside the winning file.

    Args:
        scores: from :func:`score_grid`.
        files: checkpoint name (a cell's ``checkpoint``) -> its LoRA file.
        cells: the same (cell, image) pairs that were scored.

    Returns:
        {"file", "sidecar", "preview", "weight", "messages"}.

    Raises:
        ConfigError: no winner, the winner's file unknown, or a winning weight of 0 (A1111 reads a preferred
            weight of 0 as "use the default multiplier", so it cannot be stored).
        FormatError: the sidecar exists but is not valid JSON (left untouched), or a write fails.
    """
    from .safetensors_io import atomic_write_bytes
    from .sidecar import write_sidecar

    best = scores.best
    if best is None:
        raise ConfigError("nothing to apply: no cell was scored")
    if best.weight == 0:
        raise ConfigError("the best weight is 0, which A1111 reads as 'default weight' in a sidecar: not applied")
    if best.checkpoint not in files:
        raise ConfigError(f"no file known for checkpoint {best.checkpoint!r}")
    path = Path(os.fspath(files[best.checkpoint]))
    image = next((im for c, im in sorted(cells, key=lambda ci: ci[0].page)
                  if im is not None and c.row == best.row and c.col == best.col), None)
    messages = []
    sidecar = write_sidecar(path, preferred_weight=float(best.weight))
    preview = None
    if image is not None:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        base, _ = os.path.splitext(os.fspath(path))
        preview = atomic_write_bytes(Path(base + ".preview.png"), buf.getvalue())
        if Path(base + ".png").exists():
            messages.append(f"{Path(base).name}.png exists and is shown instead of the new .preview.png")
    else:
        messages.append("the winning cell has no image: no preview written")
    return {"file": str(path), "sidecar": str(sidecar), "preview": str(preview) if preview else None,
            "weight": best.weight, "messages": messages}
