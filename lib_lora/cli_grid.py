"""``python -m lib_lora grid``: the checkpoint x weight grid of a run, rendered headless (no WebUI).

Example::

    python -m lib_lora grid --run output/mylora --weights "0.5,1" --prompt "a photo of sks dog" --seed 7 \\
        --base tiny-sd1 --size 64 --steps 8 --output grid.png

Columns are the run's checkpoint files in training order (final last, see :mod:`lib_lora.runs`), rows the
weights; every cell uses the same seed. The cells' prompts are planned by :func:`lib_lora.grid.plan_grid` in the
plain mode (``<lora:STEM:w>`` tags); each tag is read back with :mod:`lib_lora.prompt_syntax` to set the network's
te/unet multipliers, and stripped from the text the model encodes, as the WebUI does. A file that is missing or
cannot be read gives a marked grey column and a warning, not a crash (exit status 1 then).

Outputs: the grid (``--output``, split into ``-page<N>`` files or switched to PNG when too large, see
:func:`lib_lora.grid.check_grid_size`), each cell as ``<output stem>-cells/<stem>_w<weight>_s<seed>.png``, and
``<output stem>.json`` (plan, layout, files, problems). Their paths are printed on stdout.

With ``--clip-model ARCH:FILE`` the cells are scored (:mod:`lib_lora.scoring`: fidelity to the training images,
prompt adherence, seed collapse, combined score): each cell shows its combined score, the best one says
``best``, and ``<output stem>.scores.md`` / ``.scores.csv`` hold the table; ``--apply-best`` writes the winner's
sidecar weight and preview. A CLIP model that cannot be loaded gives a warning and the grid without scores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from .errors import ConfigError, FormatError, LoraError

__all__ = ["add_subcommands", "render_run_grid"]


def add_subcommands(sub) -> None:
    """Registers ``grid`` on the ``python -m lib_lora`` parser."""
    g = sub.add_parser("grid", help="render a checkpoint x weight grid of a LoRA run without the WebUI")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="DIR/NAME: the run NAME in folder DIR (or DIR alone when it holds one run)")
    src.add_argument("--files", nargs="+", metavar="FILE", help="LoRA files to compare, in this order")
    g.add_argument("--weights", default="0.5,1", help='weights: "0.2,0.5,1", "0.1-1.0 [10]", "0-1 (+0.25)"')
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--seed", type=int, action="append", default=None,
                   help="sampling seed (default 0, -1 random); repeat for one grid per seed")
    g.add_argument("--base", default="tiny-sd1", help="base model: tiny-sd1, tiny-sd2 or an SD1/SD2 checkpoint file")
    g.add_argument("--size", type=int, default=512, help="image width and height in pixels (multiple of 64)")
    g.add_argument("--steps", type=int, default=20, help="DDIM steps")
    g.add_argument("--cfg-scale", type=float, default=7.0)
    g.add_argument("--part", choices=("both", "te", "unet"), default="both",
                   help="which multiplier the weight sets (the other stays at --other-weight)")
    g.add_argument("--other-weight", type=float, default=1.0)
    g.add_argument("--baseline", action="store_true", help="add a first row without the LoRA")
    g.add_argument("--trigger", default=None,
                   help="trigger words to add where missing (default: the files' sidecar 'activation text')")
    g.add_argument("--no-trigger", action="store_true", help="add no trigger words")
    g.add_argument("--device", default="cpu")
    g.add_argument("--output", default="grid.png", help="grid file (.png, .jpg, .webp)")
    sc = g.add_argument_group("scoring (lib_lora.scoring; needs a local CLIP file, nothing is downloaded)")
    sc.add_argument("--clip-model", default=None, metavar="ARCH:FILE",
                    help="score the cells with this open_clip model, e.g. ViT-L-14:/models/open_clip_model.bin "
                         "(or an OpenAI TorchScript file alone)")
    sc.add_argument("--train-data-dir", default=None,
                    help="training images for fidelity (default: train_data_dir of the run's .config.toml)")
    sc.add_argument("--fidelity", choices=("mean", "max"), default="mean",
                    help="mean or max CLIP similarity to the training images")
    sc.add_argument("--apply-best", action="store_true",
                    help="write the best weight as 'preferred weight' into the winner's sidecar and its cell "
                         "as <stem>.preview.png")
    g.set_defaults(func=_cmd_grid)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def _checkpoint_files(args: argparse.Namespace) -> list[Path]:
    if args.run:
        from .runs import resolve_run

        run = resolve_run(args.run)
        if not run.files:
            raise ConfigError(f"run {run.name!r} has no files")
        return run.paths
    return [Path(f) for f in args.files]


def _sidecar_trigger(paths: list[Path]) -> str | None:
    """The first non-empty sidecar "activation text", final file first (it describes the finished run)."""
    from .sidecar import read_sidecar

    for path in reversed(paths):
        try:
            text = read_sidecar(path).get("activation text")
        except FormatError as exc:
            _warn(str(exc))
            continue
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def _load_network(path: Path, model, reuse=None):
    """(network, None) or (None, short mark + message) for a file that cannot be used. ``reuse``: the previous
    column's network, loaded into when this file has the same modules (see ``LoRANetwork.from_weights``)."""
    from .network import LoRANetwork
    from .safetensors_io import load_lora_file

    if not path.is_file():
        return None, ("missing", f"{path}: no such file")
    try:
        state_dict, _ = load_lora_file(path)
        net, report = LoRANetwork.from_weights(state_dict, model.unet, model.text_encoders, model.arch, reuse=reuse)
    except FormatError as exc:
        return None, ("unreadable", str(exc))
    if not report.loaded:
        return None, ("no match", f"{path.name}: no module matches the base model {model.name} ({report.summary()})")
    if not report.ok:
        _warn(f"{path.name}: {report.summary()}")
    return net, None


def _safe_name(text: str) -> str:
    """A file-name part: keeps letters (any script), digits, space, ``-_.``; replaces the rest with ``_``."""
    out = "".join(c if c.isalnum() or c in " -_." else "_" for c in text).strip(" .")
    return out or "_"


def render_run_grid(args: argparse.Namespace) -> dict:
    """Renders the grid described by the parsed ``grid`` flags; returns the summary written to ``<stem>.json``.

    Raises:
        ConfigError: bad flags (weights, seeds, size, run, output format).
        lib_lora.model.headless.ModelLoadError: the base model cannot be loaded.
    """
    import torch

    from .grid import check_grid_size, format_weight, grid_layout, plan_grid, render_grid, save_format
    from .model.headless import load_model
    from .model.sampler import txt2img
    from .prompt_syntax import parse_lora_tags, strip_lora_tags

    started = time.monotonic()
    output = Path(args.output)
    fmt = save_format(output)
    if args.size < 64 or args.size % 64:
        raise ConfigError(f"--size must be a positive multiple of 64 pixels, got {args.size}")
    paths = _checkpoint_files(args)
    seeds = [random.randrange(2**32) if s == -1 else s for s in (args.seed or [0])]  # -1: random, as the WebUI
    trigger = None if args.no_trigger else (args.trigger if args.trigger is not None else _sidecar_trigger(paths))
    plan = plan_grid([str(p) for p in paths], args.weights, args.prompt, "plain", seeds=seeds,
                     baseline=args.baseline, trigger_words=trigger, negative_prompt=args.negative, part=args.part,
                     other_weight=args.other_weight)
    by_name = dict(zip(plan.checkpoints, paths))
    text = strip_lora_tags(plan.cells[-1].prompt).strip()
    layouts = {seed: grid_layout(plan.row_labels, plan.col_labels, args.size, args.size,
                                 title=f"{text} | seed {seed} | {args.steps} steps, cfg {args.cfg_scale:g}")
               for seed in seeds}
    tallest = max(layouts.values(), key=lambda lay: (lay.label_h, lay.label_w))
    decision = check_grid_size(plan.cols, plan.rows, args.size, args.size, label_w=tallest.label_w,
                               label_h=tallest.label_h, fmt=fmt)
    if decision.message:
        print(decision.message, file=sys.stderr)
    if decision.fmt != fmt:
        output = output.with_suffix(".png")

    others = [t.text for t in parse_lora_tags(args.prompt + " " + args.negative)]
    if others:
        _warn(f"the headless grid loads only the compared files; these tags are ignored: {', '.join(others)}")
    model = load_model(args.base, device=args.device)
    problems: dict[int, tuple[str, str]] = {}
    images: dict[tuple[int, int, int], object] = {}
    cache: dict[tuple, object] = {}

    def generate(cell):
        if cell.key not in cache:
            cache[cell.key] = txt2img(model, strip_lora_tags(cell.prompt).strip(),
                                      negative_prompt=strip_lora_tags(cell.negative_prompt).strip(),
                                      steps=args.steps, cfg_scale=args.cfg_scale, width=args.size, height=args.size,
                                      seed=cell.seed)[0]
        return cache[cell.key]

    with torch.no_grad():
        net = previous = None  # a run's checkpoints share their modules: the next file loads into this network
        for col, name in enumerate(plan.checkpoints):
            col_cells = [c for c in plan.cells if c.col == col]
            net = None
            if any(not c.baseline for c in col_cells):
                net, problem = _load_network(by_name[name], model, reuse=previous)
                if problem:
                    problems[col] = problem
                    _warn(f"{problem[1]} -> column {col + 1} marked {problem[0]!r}")
            print(f"column {col + 1}/{plan.cols}: {name}", file=sys.stderr)
            for cell in col_cells:
                if cell.baseline:  # before the switcher below writes into the weights
                    images[(cell.row, cell.col, cell.page)] = generate(cell)
            if net is None:
                continue
            # In the weights, a cell costs what a plain generation costs (no per-layer LoRA path in each of the
            # sampler's steps). The switcher computes the column's deltas once; each cell only rescales them,
            # bit-identical to merge() at that weight, and the base weights come back bit-exactly at the end.
            with net.weight_switcher() as switch:
                for cell in col_cells:
                    if cell.baseline:
                        continue
                    tag = next(t for t in parse_lora_tags(cell.prompt) if t.name == name)
                    switch.set(te=tag.te, unet=tag.unet)
                    images[(cell.row, cell.col, cell.page)] = generate(cell)
            previous = net
        del previous, net

    cells_dir = output.with_name(output.stem + "-cells")
    cells_dir.mkdir(parents=True, exist_ok=True)
    saved_cells = []
    for cell in plan.cells:
        im = images.get((cell.row, cell.col, cell.page))
        if im is None or (cell.baseline and cell.col > 0):
            continue
        part = "baseline" if cell.baseline else f"{_safe_name(cell.checkpoint)}_w{format_weight(cell.weight)}"
        path = cells_dir / f"{part}_s{cell.seed}.png"
        im.save(path)
        saved_cells.append({"file": str(path), "row": cell.row, "col": cell.col, "seed": cell.seed,
                            "checkpoint": cell.checkpoint, "weight": cell.weight, "prompt": cell.prompt})

    marks = {(r, c): problems[c][0] for c in problems for r in range(plan.rows) if not (plan.baseline and r == 0)}
    scoring = (_score(args, plan, images, paths, by_name, trigger, output, marks)
               if getattr(args, "clip_model", None) else None)
    grids = []
    output.parent.mkdir(parents=True, exist_ok=True)
    for page, seed in enumerate(seeds):
        grid_images = [[images.get((r, c, page)) for c in range(plan.cols)] for r in range(plan.rows)]
        base = output.stem + (f"-seed{seed}" if len(seeds) > 1 else "")
        for i, pg in enumerate(decision.pages):
            name = base + (f"-page{i + 1}" if len(decision.pages) > 1 else "") + output.suffix
            target = output.with_name(name)
            img = render_grid(grid_images, layouts[seed], marks=marks, rows=pg.rows, cols=pg.cols)
            img.save(target)
            grids.append({"file": str(target), "seed": seed, "rows": [pg.rows.start, pg.rows.stop],
                          "cols": [pg.cols.start, pg.cols.stop], "width": img.width, "height": img.height,
                          "label_w": layouts[seed].label_w, "label_h": layouts[seed].label_h})

    summary = {
        "grids": grids, "cells": saved_cells, "checkpoints": [str(p) for p in paths],
        "weights": list(plan.weights), "seeds": list(seeds), "row_labels": list(plan.row_labels),
        "col_labels": list(plan.col_labels), "trigger_words": trigger, "base": args.base, "size": args.size,
        "steps": args.steps, "cfg_scale": args.cfg_scale,
        "size_check": {"action": decision.action, "format": decision.fmt, "message": decision.message},
        "problems": [{"col": c, "file": str(paths[c]), "mark": m, "message": msg}
                     for c, (m, msg) in sorted(problems.items())],
        "scoring": scoring,
        "seconds": round(time.monotonic() - started, 2),
    }
    manifest = output.with_suffix(".json")
    manifest.write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    summary["manifest"] = str(manifest)
    return summary


def _score(args, plan, images, paths, by_name, trigger, output: Path, marks: dict) -> dict:
    """Scores the cells (see :mod:`lib_lora.scoring`), adds a score mark to each scored cell (``marks`` is
    changed), writes the tables; returns the summary's ``scoring`` entry ({"error": message} when unavailable)."""
    from .safetensors_io import atomic_write_bytes
    from .scoring import (
        ScoringUnavailable,
        apply_best,
        find_training_images,
        load_clip,
        load_training_images,
        score_grid,
    )

    try:
        scorer = load_clip(args.clip_model, device=args.device)
    except ScoringUnavailable as exc:
        _warn(f"no scores: {exc}")
        return {"error": str(exc)}
    run_folder, run_name = (paths[0].parent, plan_run_name(paths)) if paths else (None, None)
    try:
        train_paths = find_training_images(args.train_data_dir, run_folder=run_folder, run_name=run_name)
    except LoraError as exc:
        _warn(str(exc))
        train_paths = []
    train, problems = load_training_images(train_paths)
    for p in problems:
        _warn(p)
    cells = [(c, images.get((c.row, c.col, c.page))) for c in plan.cells]
    scores = score_grid(scorer, cells, train, trigger_words=trigger, fidelity=args.fidelity)
    for m in scores.messages:
        _warn(m)
    for g in scores.groups:
        if g.combined is not None:
            text = f"{g.combined:.2f}" + (" best" if g.best else "")
            marks[(g.row, g.col)] = f"{marks[(g.row, g.col)]} {text}" if (g.row, g.col) in marks else text
    md, csv_path = output.with_suffix(".scores.md"), output.with_suffix(".scores.csv")
    atomic_write_bytes(md, (scores.table_markdown() + "\n").encode("utf-8"))
    atomic_write_bytes(csv_path, scores.table_csv().encode("utf-8"))
    print(scores.summary(), file=sys.stderr)
    out = {"table_md": str(md), "table_csv": str(csv_path), **scores.to_dict()}
    if args.apply_best:
        try:
            out["applied"] = apply_best(scores, by_name, cells)
        except LoraError as exc:
            _warn(f"not applied: {exc}")
            out["applied"] = {"error": str(exc)}
    return out


def plan_run_name(paths: list[Path]) -> str:
    """The run name of the first checkpoint file (see :func:`lib_lora.runs.parse_checkpoint_stem`)."""
    from .runs import parse_checkpoint_stem

    return parse_checkpoint_stem(paths[0].stem)[0]


def _cmd_grid(args: argparse.Namespace) -> int:
    summary = render_run_grid(args)
    for grid in summary["grids"]:
        print(f"grid: {grid['file']}")
    print(f"cells: {len(summary['cells'])} images in {os.path.dirname(summary['cells'][0]['file'])}"
          if summary["cells"] else "cells: none")
    print(f"manifest: {summary['manifest']}")
    for p in summary["problems"]:
        print(f"marked {p['mark']}: {p['file']}", file=sys.stderr)
    return 1 if summary["problems"] else 0


