"""Stand-in for ``modules/devices.py``: the torch device and dtypes, ``autocast`` and ``torch_gc``.

``shared_init.initialize`` sets ``device``/``dtype*`` from ``cmd_opts`` like the real ``modules/shared_init.py``:
CPU when ``--use-cpu all`` (or no CUDA), ``dtype`` float32 with ``--no-half`` else float16.
"""

from __future__ import annotations

import contextlib

import torch

cpu: torch.device = torch.device("cpu")
fp8: bool = False
force_fp16: bool = False
device: torch.device = cpu
device_interrogate: torch.device = cpu
dtype: torch.dtype = torch.float16
dtype_vae: torch.dtype = torch.float16
dtype_unet: torch.dtype = torch.float16
dtype_inference: torch.dtype = torch.float16
unet_needs_upcast = False

#: how many times torch_gc() ran (tests read it; not in the real module).
torch_gc_calls = 0


def get_optimal_device():
    """Mirrors ``modules/devices.py`` ``get_optimal_device``: CUDA when available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else cpu


def torch_gc():
    """Mirrors ``modules/devices.py`` ``torch_gc``: empties the CUDA cache (when there is CUDA)."""
    global torch_gc_calls
    torch_gc_calls += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def autocast(disable=False):
    """Mirrors ``modules/devices.py`` ``autocast``: a no-op context when disabled, under ``--precision half``
    (``force_fp16``) or when ``dtype``/``dtype_inference`` is float32; else ``torch.autocast("cuda")``. The stand-in
    returns a no-op context on a CPU device too (the real one would build a CUDA autocast that torch disables with
    a warning)."""
    if disable or force_fp16:
        return contextlib.nullcontext()
    if dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    if getattr(device, "type", str(device)) != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda")


def without_autocast(disable=False):
    """Mirrors ``modules/devices.py`` ``without_autocast``."""
    return torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled() and not disable \
        else contextlib.nullcontext()


def cond_cast_unet(input):
    """Mirrors ``modules/devices.py`` ``cond_cast_unet``: casts to ``dtype_unet`` when ``unet_needs_upcast``."""
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    """Mirrors ``modules/devices.py`` ``cond_cast_float``."""
    return input.float() if unet_needs_upcast else input
