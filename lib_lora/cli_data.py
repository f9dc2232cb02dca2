"""``python -m lib_lora check`` (the dataset doctor) and ``python -m lib_lora tags`` (caption tag cleaning).

``check DIR`` prints the findings of :func:`lib_lora.doctor.run_checks` and exits with 0 (nothing to report),
1 (warnings) or 2 (errors; also for an unusable folder, as every lib_lora error on the command line).

``prepare SRC DST`` writes resized/cropped copies (:func:`lib_lora.prepare.prepare_folder`); ``autotag DIR --wd14
MODEL_DIR`` writes WD14 tags into the captions (:func:`lib_lora.taggers.tag_folder`).

``tags DIR`` edits every caption file of the dataset (:func:`lib_lora.tags.edit_folder`): trigger word first, tags
removed, replaced, added, repeats and conflicts dropped, prompt syntax cleaned; ``--dry-run`` only shows the changes.
``--suggest-prune`` only reads: it lists the tags present in at least ``--threshold`` of the captions.

Importing this module does not import torch; the subcommands import what they need when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import ConfigError

#: The LoRA kinds of :data:`lib_lora.doctor.KINDS`, spelt out so that building the parser imports neither numpy nor
#: imagehash (a test keeps the two equal).
KINDS = ("person", "anime", "style", "concept")


def add_subcommands(sub) -> None:
    """Registers ``check``, ``tags``, ``prepare`` and ``autotag`` on the ``python -m lib_lora`` parser."""
    check = sub.add_parser("check", help="check a dataset folder (count, duplicates, blur, exposure, captions)")
    check.add_argument("folder", metavar="DIR")
    check.add_argument("--kind", choices=KINDS, default="concept", help="LoRA kind for the image count guidance")
    check.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (default 512)")
    check.add_argument("--trigger", default=None, help="trigger word every caption should contain")
    check.add_argument("--caption-extension", default=".txt", help="caption extension training uses (default .txt)")
    check.add_argument("--json", action="store_true", help='print {"findings": [...], "counts": {...}}')
    check.set_defaults(func=_cmd_check)

    tags = sub.add_parser("tags", help="clean caption tags: trigger first, remove, dedupe, suggest tags to prune")
    tags.add_argument("folder", metavar="DIR")
    tags.add_argument("--trigger", default=None, help="trigger word, put first in every caption")
    tags.add_argument("--remove", nargs="+", action="extend", default=[], metavar="TAG", help="tags to delete")
    tags.add_argument("--replace", nargs="+", action="extend", default=[], metavar="OLD=NEW",
                      help="tags to rename (an empty NEW deletes)")
    tags.add_argument("--add", nargs="+", action="extend", default=[], metavar="TAG", help="tags to append")
    tags.add_argument("--dedupe", action="store_true", help="drop repeated tags")
    tags.add_argument("--normalise", action="store_true", help="strip (tag:1.2) weights and emphasis, fix spaces")
    tags.add_argument("--underscores", action="store_true", help="with --normalise: long_hair -> long hair")
    tags.add_argument("--drop-conflicts", action="store_true", help="drop the later tag of contradictory pairs")
    tags.add_argument("--suggest-prune", action="store_true",
                      help="only list tags in at least --threshold of the captions (nothing is written)")
    tags.add_argument("--threshold", type=float, default=None, help="share of captions for --suggest-prune (0.5)")
    tags.add_argument("--caption-extension", default=".txt", help="caption extension (default .txt)")
    tags.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")
    tags.add_argument("--json", action="store_true", help="print the result as JSON")
    tags.set_defaults(func=_cmd_tags)

    prep = sub.add_parser("prepare", help="write resized/cropped copies of a dataset folder into a new folder")
    prep.add_argument("src", metavar="SRC")
    prep.add_argument("dst", metavar="DST", help="new output folder (not SRC nor inside it)")
    prep.add_argument("--size", type=int, default=512, help="output side in pixels (default 512)")
    prep.add_argument("--crop", choices=("centre", "focal", "none"), default="centre",
                      help="centre square, square around faces/detail, or none (keep aspect, only downscale)")
    prep.add_argument("--flip", action="store_true", help="also write mirrored copies (same caption)")
    prep.add_argument("--remove-background", action="store_true",
                      help="white background via rembg (needs rembg and its model file locally)")
    prep.add_argument("--overwrite", action="store_true", help="replace files already in DST")
    prep.add_argument("--json", action="store_true", help="print the report as JSON")
    prep.set_defaults(func=_cmd_prepare)

    auto = sub.add_parser("autotag", help="caption images with a local WD14 tagger (onnxruntime)")
    auto.add_argument("folder", metavar="DIR")
    auto.add_argument("--wd14", required=True, metavar="MODEL_DIR",
                      help="folder with model.onnx and selected_tags.csv (or one level above such folders)")
    auto.add_argument("--threshold", type=float, default=0.35, help="general tag threshold (default 0.35)")
    auto.add_argument("--character-threshold", type=float, default=0.85,
                      help="character tag threshold (default 0.85)")
    auto.add_argument("--mode", choices=("skip", "overwrite", "prepend", "append"), default="skip",
                      help="what to do with existing captions (default skip: never replace them)")
    auto.add_argument("--trigger", default=None, help="trigger word put first in each caption written")
    auto.add_argument("--caption-extension", default=".txt", help="caption extension (default .txt)")
    auto.add_argument("--dry-run", action="store_true", help="show the captions, write nothing")
    auto.add_argument("--json", action="store_true", help="print the result as JSON")
    auto.set_defaults(func=_cmd_autotag)


def _cmd_check(args: argparse.Namespace) -> int:
    from .doctor import run_checks

    scan_logger = logging.getLogger("lib_lora.data.dataset")
    level = scan_logger.level
    scan_logger.setLevel(logging.ERROR)  # the doctor reports what the scan would log as warnings
    try:
        report = run_checks(args.folder, kind=args.kind, resolution=args.resolution, trigger=args.trigger,
                            caption_extension=args.caption_extension)
    finally:
        scan_logger.setLevel(level)
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code


def _parse_replace(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise ConfigError(f"--replace takes OLD=NEW, got {item!r}")
        out[old.strip()] = new.strip()
    return out


def _cmd_tags(args: argparse.Namespace) -> int:
    from . import tags

    if args.suggest_prune:
        threshold = tags.DEFAULT_PRUNE_THRESHOLD if args.threshold is None else args.threshold
        captions = list(tags.read_captions(args.folder, args.caption_extension).values())
        rows = tags.suggest_prune(captions, threshold, trigger=args.trigger)
        if args.json:
            print(json.dumps({"captions": len(captions), "threshold": threshold,
                              "suggestions": [{"tag": t, "count": n, "fraction": round(f, 4)} for t, n, f in rows]},
                             indent=1, ensure_ascii=False))
        else:
            print(f"{len(captions)} captions; tags in at least {threshold:.0%} of them (delete to bind them to the "
                  f"trigger word):")
            for tag, count, fraction in rows:
                print(f"  {tag}: {count} ({fraction:.0%})")
            if not rows:
                print("  none")
        return 0
    if args.threshold is not None:
        raise ConfigError("--threshold only applies with --suggest-prune")
    edit = tags.TagEdit(trigger=args.trigger, remove=tuple(args.remove), replace=_parse_replace(args.replace),
                        add=tuple(args.add), dedupe=args.dedupe, normalise=args.normalise,
                        underscores_to_spaces=args.underscores, drop_conflicts=args.drop_conflicts)
    result = tags.edit_folder(args.folder, edit, args.caption_extension, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": result.dry_run, "unchanged": result.unchanged,
                          "missing": [str(p) for p in result.missing],
                          "changes": [{"path": str(c.path), "before": c.before, "after": c.after}
                                      for c in result.changes]}, indent=1, ensure_ascii=False))
        return 0
    for c in result.changes:
        print(f"{c.path}:\n  - {c.before}\n  + {c.after}")
    verb = "would change" if result.dry_run else "changed"
    print(f"{verb} {len(result.changes)} caption file(s), {result.unchanged} unchanged, "
          f"{len(result.missing)} image(s) without a caption file", file=sys.stderr)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare_folder

    report = prepare_folder(args.src, args.dst, size=args.size, crop=args.crop, flip=args.flip,
                            remove_background=args.remove_background, overwrite=args.overwrite)
    print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) if args.json else report.to_text())
    return 0


def _cmd_autotag(args: argparse.Namespace) -> int:
    from .taggers import WD14Tagger, tag_folder

    tagger = WD14Tagger(args.wd14, general_threshold=args.threshold, character_threshold=args.character_threshold)
    result = tag_folder(args.folder, tagger, mode=args.mode, trigger=args.trigger,
                        caption_extension=args.caption_extension, dry_run=args.dry_run)
    print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) if args.json else result.to_text())
    return 0
