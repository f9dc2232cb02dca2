"""``train`` and ``demo`` subcommands (filled in by the training engine)."""

from __future__ import annotations


def add_subcommands(sub) -> None:
    """Registers the training subcommands on the ``python -m lib_lora`` parser."""
