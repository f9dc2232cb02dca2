"""The exception tree of lib_lora.

Every error names the bad value and, where there is a fixed set, the allowed values, so that the WebUI layer can
show the message as it is.
"""


class LoraError(Exception):
    """Base class of every error lib_lora raises on purpose."""


class ConfigError(LoraError, ValueError):
    """A configuration value is out of range, of the wrong type, or inconsistent with another one."""


class FormatError(LoraError):
    """A LoRA file cannot be read or written as asked (bad tensors, non-finite values, bad metadata)."""


class KeyMappingError(LoraError):
    """A module or key name cannot be mapped between the WebUI, Kohya and diffusers conventions."""


class DatasetError(LoraError):
    """The training data cannot be used as it is (no images, caption extension mismatch, unreadable files)."""


class TrainingError(LoraError):
    """Training cannot go on (non-finite loss, missing optional optimizer package, incomplete resume state)."""
