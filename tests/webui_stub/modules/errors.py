"""Stand-in for ``modules/errors.py``: report and display errors (printed to stderr, and recorded for tests)."""

from __future__ import annotations

import sys
import traceback

#: every message passed to report/display, newest last (tests read it).
reported: list[str] = []


def report(message: str, *, exc_info: bool = False) -> None:
    """Mirrors ``modules/errors.py`` ``report``: prints the message (and the current traceback) to stderr."""
    reported.append(message)
    print(message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e: Exception, task, *, full_traceback=False) -> None:
    """Mirrors ``modules/errors.py`` ``display``: prints ``task`` and the exception."""
    reported.append(f"{task}: {type(e).__name__}: {e}")
    print(f"{task or 'error'}: {type(e).__name__}: {e}", file=sys.stderr)


def run(code, task) -> None:
    """Mirrors ``modules/errors.py`` ``run``: calls ``code()``, displaying instead of raising an exception."""
    try:
        code()
    except Exception as e:
        display(e, task)
