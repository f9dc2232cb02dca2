"""``python -m lib_lora train`` and ``python -m lib_lora demo``.

``train`` takes every :class:`~lib_lora.config.TrainConfig` field as a ``--flag`` (``--network-dim 8``,
``--trigger-words "sks dog"``; lists take several values) and/or ``--config FILE.toml``; flags override the file.
The resolved config is written next to the outputs (``<output_name>.config.toml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .config import TrainConfig


def _flag_type(tp):
    """argparse type for a config field annotation (handles ``X | None`` and the basic types)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    if base is bool:
        return _parse_bool
    if base in (int, float, str):
        return base
    return str


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (1/0, yes/no, on/off), got {text!r}")


def add_subcommands(sub) -> None:
    """Registers ``train`` and ``demo`` on the ``python -m lib_lora`` parser."""
    train = sub.add_parser("train", help="train a LoRA (flags = TrainConfig fields, or --config FILE.toml)")
    train.add_argument("--config", help="TOML file with TrainConfig keys; flags given here override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("version", "optimizer_args"):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        if typing.get_origin(tp) is list:
            train.add_argument(flag, dest=f.name, nargs="*", default=None)
        else:
            train.add_argument(flag, dest=f.name, type=_flag_type(tp), default=None,
                               metavar=f.name.upper())
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train a small LoRA on bundled real photos with tiny-sd1 and make a grid")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--images", default=None, help="a folder of your own images instead of the bundled ones")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    demo.set_defaults(func=_cmd_demo)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from ``--config`` (if any) overridden by the flags that were given."""
    cfg = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if getattr(args, f.name, None) is not None}
    return cfg.replace(**changes)


def _cmd_train(args: argparse.Namespace) -> int:
    from .console import run_training

    result = run_training(config_from_args(args), progress_bar=not args.no_progress)
    return 0 if result.status in ("completed", "stopped", "early_stopped") else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, images=args.images, steps=args.steps)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run: python -m lib_lora train ...")
