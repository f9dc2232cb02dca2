"""``python -m lib_lora``: see :mod:`lib_lora.cli`."""

from .cli import main

raise SystemExit(main())
