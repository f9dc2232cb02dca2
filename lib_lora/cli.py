"""The command line: ``python -m lib_lora {keys,inspect,train,demo} ...``.

Each subcommand turns its flags into lib_lora calls and prints the result; errors of lib_lora (``LoraError``) are
printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import LoraError


def _cmd_keys(args: argparse.Namespace) -> int:
    from .reference import kohya_module_names

    names = kohya_module_names(args.arch, args.conv_dim)
    if args.json:
        print(json.dumps(names, indent=1))
    else:
        for items in names.values():
            for name in items:
                print(name)
        counts = ", ".join(f"{part} {len(items)}" for part, items in names.items())
        print(f"# {args.arch}: {counts}", file=sys.stderr)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checks import inspect_file

    reports, failed = [], 0
    for path in args.files:  # one unreadable file must not hide the reports of the others
        try:
            reports.append(inspect_file(path))
        except LoraError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    if args.json:
        data = [r.to_dict() for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=1))
    elif reports:
        print("\n\n".join(r.to_text() for r in reports))
    if failed:
        return 2
    return 1 if any(r.non_finite for r in reports) else 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (status 2) instead of the full usage; subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m lib_lora``."""
    parser = _Parser(prog="python -m lib_lora",
                     description="Kohya-compatible LoRA tools for Stable Diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="list the Kohya module names a network gets on a full-size model")
    keys.add_argument("--arch", required=True, choices=("sd1", "sd2", "sdxl"))
    keys.add_argument("--conv-dim", type=int, default=None, help="include ResBlock/Downsample/Upsample (LoCon)")
    keys.add_argument("--json", action="store_true", help='print {"unet": [...], "te": [...]} (SDXL: te1, te2)')
    keys.set_defaults(func=_cmd_keys)

    insp = sub.add_parser("inspect", help="describe LoRA files: architecture, ranks, counts, unmatched keys")
    insp.add_argument("files", nargs="+", help="LoRA files (.safetensors, or weights-only .ckpt/.pt)")
    insp.add_argument("--json", action="store_true", help="print the report as JSON (a list for several files)")
    insp.set_defaults(func=_cmd_inspect)

    from . import cli_train

    cli_train.add_subcommands(sub)
    from . import cli_data
    cli_data.add_subcommands(sub)
    from . import cli_grid
    cli_grid.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for a lib_lora error, with its message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``... | head``): not an error of ours. Point stdout at devnull so that the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
