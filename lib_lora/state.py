"""Resume state: network weights, optimizer, scheduler, grad scaler, plateau controller, RNG states and counters,
saved and validated as one folder.

Layout of a state folder (``<output_name>-state``, or ``<name>-000002-state`` / ``<name>-step00000200-state``):

- ``network.safetensors``: the LoRA tensors in fp32 (not the save precision: resuming must not lose bits);
- ``optimizer.pt``, ``scheduler.pt``, ``extra.pt`` (grad scaler, plateau controller, loss recorder states);
- ``rng.pt``: Python ``random``, torch CPU (and CUDA, when present) generator states;
- ``train_state.json``: ``global_step``, ``epoch`` (epochs fully done), ``step_in_epoch`` (batches of the current
  epoch already trained), ``metadata`` (the cumulative ss_* fields: started_at, session id, ...), the config.

Everything is written to a temp folder and renamed, so an interrupted save never leaves a half state under the
final name. :func:`check_state_dir` lists what is missing before anything loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .errors import TrainingError
from .safetensors_io import torch_load_weights_only

STATE_FILES = ("network.safetensors", "optimizer.pt", "scheduler.pt", "extra.pt", "rng.pt", "train_state.json")
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Python, torch CPU and (if available) CUDA RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned (CUDA only when both sides have it)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: str | os.PathLike, *, network_sd: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
               extra: dict, train_state: dict) -> Path:
    """Writes a complete state folder atomically (temp folder, then rename over any old one).

    Args:
        folder: the final folder path.
        network_sd: Kohya tensors (saved fp32).
        optimizer, scheduler: ``state_dict()`` of each.
        extra: other picklable-by-torch state (grad scaler, plateau, loss recorder).
        train_state: JSON-able counters and metadata (``global_step``, ``epoch``, ``step_in_epoch``, ...).

    Returns:
        The folder.
    """
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        safetensors.torch.save_file({k: v.detach().float().cpu().contiguous() for k, v in network_sd.items()},
                                    str(tmp / "network.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        torch.save(extra, tmp / "extra.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        data = dict(train_state, state_version=STATE_VERSION)
        (tmp / "train_state.json").write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_state_dir(folder: str | os.PathLike) -> list[str]:
    """Returns what a resume folder lacks (empty when complete): missing files, or a bad train_state.json."""
    p = Path(folder)
    if not p.is_dir():
        return [f"{p} is not a folder"]
    missing = [name for name in STATE_FILES if not (p / name).is_file()]
    if "train_state.json" not in missing:
        try:
            data = json.loads((p / "train_state.json").read_text(encoding="utf-8"))
            for key in ("global_step", "epoch", "step_in_epoch"):
                if not isinstance(data.get(key), int):
                    missing.append(f"train_state.json: {key}")
        except (OSError, ValueError) as exc:
            missing.append(f"train_state.json unreadable ({exc})")
    return missing


def require_complete(folder: str | os.PathLike) -> None:
    """Raises TrainingError listing what :func:`check_state_dir` found missing; returns quietly otherwise."""
    missing = check_state_dir(folder)
    if missing:
        raise TrainingError(f"cannot resume from {folder}: not a complete training state, missing "
                            + ", ".join(missing))


def load_state(folder: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Loads a state folder after checking it is complete.

    Returns:
        ``{"network": {key: tensor}, "optimizer": ..., "scheduler": ..., "extra": ..., "rng": ..., "train_state":
        dict}``.

    Raises:
        TrainingError: the folder is not a complete state; the message lists what is missing.
    """
    require_complete(folder)
    p = Path(folder)
    try:
        return {
            "network": safetensors.torch.load_file(str(p / "network.safetensors")),
            "optimizer": torch_load_weights_only(p / "optimizer.pt", map_location=device),
            "scheduler": torch_load_weights_only(p / "scheduler.pt", map_location=None),
            "extra": torch_load_weights_only(p / "extra.pt", map_location=None),
            "rng": torch_load_weights_only(p / "rng.pt", map_location=None),
            "train_state": json.loads((p / "train_state.json").read_text(encoding="utf-8")),
        }
    except Exception as exc:  # noqa: BLE001 - any unreadable part makes the state unusable (weights_only refuses code)
        raise TrainingError(f"cannot resume from {folder}: {exc}") from exc
