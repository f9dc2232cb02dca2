"""Stand-in for ``modules/sd_hijack.py``: cross-attention optimizations, counted instead of applied."""

from __future__ import annotations

#: calls so far (tests read them; not in the real module).
apply_calls = 0
undo_calls = 0
current_optimizer = None


def apply_optimizations(option=None):
    """Mirrors ``modules/sd_hijack.py`` ``apply_optimizations``: undoes, then applies the selected optimization
    (the stand-in only counts); returns the optimization's name ("" when none)."""
    global apply_calls, current_optimizer
    apply_calls += 1
    current_optimizer = option or "stub"
    return current_optimizer


def undo_optimizations():
    """Mirrors ``modules/sd_hijack.py`` ``undo_optimizations``: puts back ldm's own attention forwards."""
    global undo_calls, current_optimizer
    undo_calls += 1
    current_optimizer = None


class StableDiffusionModelHijack:
    """Mirrors ``modules/sd_hijack.py`` ``StableDiffusionModelHijack`` (only the optimization methods)."""

    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []

    def apply_optimizations(self, option=None):
        self.optimization_method = apply_optimizations(option)

    def undo_optimizations(self):
        """Not a method of the real class (the module function is used there); kept for symmetry."""
        undo_optimizations()


model_hijack = StableDiffusionModelHijack()
