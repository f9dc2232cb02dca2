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


# One line per flag that needs more than its name; every flag also shows its default.
FIELD_HELP: dict[str, str] = {
    "model": "base model: tiny-sd1, tiny-sd2, or an SD1.x/SD2.x checkpoint (.safetensors/.ckpt, LDM layout)",
    "train_data_dir": "dataset folder: N_name sub-folders (Kohya layout) or a plain folder of images",
    "repeats": "repeats for a plain folder (N_name folders carry their own)",
    "trigger_words": "words prepended to captions where missing; written to the sidecar's activation text",
    "resolution": "training resolution in pixels (buckets keep the same area)",
    "network_dim": "LoRA rank",
    "network_alpha": "LoRA alpha; the update is scaled by alpha / rank",
    "conv_dim": "rank of 3x3 conv layers (LoCon); unset = linear layers only",
    "learning_rate": "learning rate of both parts unless unet_lr / text_encoder_lr are set",
    "text_encoder_lr": "text-encoder learning rate; 0 trains the UNet only",
    "optimizer": "AdamW, AdamW8bit (bitsandbytes), Lion (lion-pytorch), Prodigy (prodigyopt)",
    "lr_scheduler": "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
    "max_train_epochs": "epochs to train; overrides max_train_steps",
    "mixed_precision": "no (fp32), fp16 (with loss scaling) or bf16",
    "save_every_n_steps": "write name-stepNNNNNNNN.safetensors every N steps",
    "save_every_n_epochs": "write name-NNNNNN.safetensors every N epochs",
    "save_state": "also write a resume state folder with each checkpoint",
    "resume": "a state folder (name-...-state) to continue from",
    "lr_drop_on_plateau": "lower the LR by plateau_factor when the smoothed loss stops improving",
    "early_stopping_patience_steps": "stop after this many steps without improvement of the smoothed loss",
    "sample_prompts": "prompts for sample images during training",
    "ignore_dataset_errors": "train even when the dataset doctor reports errors",
    "device": "auto, cpu, cuda, cuda:1, ...",
}


def add_subcommands(sub) -> None:
    """Registers ``train`` and ``demo`` on the ``python -m lib_lora`` parser."""
    train = sub.add_parser("train", help="train a LoRA (flags = TrainConfig fields, or --config FILE.toml)")
    train.add_argument("--config", help="TOML file with TrainConfig keys; flags given here override it")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("version", "optimizer_args"):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        text = FIELD_HELP.get(f.name, "")
        text = f"{text} (default: {getattr(defaults, f.name)!r})".strip()
        if typing.get_origin(tp) is list:
            train.add_argument(flag, dest=f.name, nargs="*", default=None, metavar="TEXT", help=text)
        else:
            base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
            metavar = "true|false" if base is bool else {int: "N", float: "X"}.get(base, "TEXT")
            train.add_argument(flag, dest=f.name, type=_flag_type(tp), default=None, metavar=metavar,
                               help=text)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train a small LoRA on bundled real photos with tiny-sd1 and make a grid")
    demo.add_argument("--output-dir", default="demo_output", help="where the demo writes its files")
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
