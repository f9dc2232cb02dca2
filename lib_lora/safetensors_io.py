"""Reading and writing LoRA files in the Kohya (sd-scripts ``networks.lora``) layout.

File layout (docs/kohya-format-and-trainer.md §1.3-§1.4, §3):

- Keys are ``<module>.lora_down.weight`` (``[r, in]`` or ``[r, in, kh, kw]``), ``<module>.lora_up.weight``
  (``[out, r]`` or ``[out, r, 1, 1]``) and ``<module>.alpha`` (0-dim float tensor); ``scale = alpha / r``.
- Metadata is a ``dict[str, str]`` (see :mod:`lib_lora.metadata`) plus ``sshs_model_hash`` / ``sshs_legacy_hash``
  computed as sd-scripts ``train_util.precalculate_safetensors_hashes``.
- Files are written atomically: to ``.<name>.tmp-<pid>-<token>`` in the target folder, fsync'ed, then
  ``os.replace``'d onto the final name, so A1111 (which re-reads a LoRA whose mtime changed) never sees a
  half-written file, and a crash leaves either the previous file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Union

import safetensors
import safetensors.torch
import torch

from lib_lora.errors import ConfigError, FormatError
from lib_lora.metadata import stringify_metadata

__all__ = [
    "LORA_PARTS",
    "SAVE_DTYPES",
    "addnet_hash_legacy",
    "addnet_hash_safetensors",
    "atomic_write_bytes",
    "check_finite",
    "group_lora_keys",
    "load_lora_file",
    "precalculate_hashes",
    "remove_stale_temp_files",
    "save_dtype_from_name",
    "save_lora_file",
    "sha256_file",
]

PathLike = Union[str, "os.PathLike[str]"]
BytesOrPath = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO]

#: Per-module key suffixes a LoRA loader understands (A1111 ``network_lora``: up/down required, mid optional;
#: ``dora_scale`` for DoRA). ``save_lora_file`` writes only the first two and ``alpha``.
LORA_PARTS: tuple[str, ...] = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")
_SAVE_PARTS: tuple[str, ...] = ("lora_down.weight", "lora_up.weight", "alpha")

#: dtypes a LoRA may be saved in (sd-scripts ``--save_precision`` float / fp16 / bf16).
SAVE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

_CHUNK = 8 * 1024 * 1024
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


# ----------------------------------------------------------------------------------------------------------------------
# Hashes
# ----------------------------------------------------------------------------------------------------------------------


def _open_source(source: BytesOrPath) -> tuple[BinaryIO, bool]:
    """Return (binary file object, whether we opened it and must close it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source), True
    if isinstance(source, (str, os.PathLike)):
        try:
            return open(source, "rb"), True  # noqa: SIM115 - closed by the caller
        except OSError as exc:
            raise FormatError(f"cannot read {os.fspath(source)!r}: {exc}") from exc
    if hasattr(source, "read") and hasattr(source, "seek"):
        return source, False
    raise TypeError(f"expected bytes, a path or a binary file object, got {type(source).__name__}")


def addnet_hash_safetensors(source: BytesOrPath) -> str:
    """SHA-256 (64 lowercase hex chars) of a safetensors file's data section: the bytes after the 8-byte
    little-endian header length N and the N-byte JSON header.

    This is the "addnet hash" of A1111 ``modules/hashes.addnet_hash_safetensors`` and sd-scripts
    ``train_util.addnet_hash_safetensors``, stored as ``sshs_model_hash``; its first 12 chars are A1111's shorthash.
    Metadata edits do not change it. As in those implementations, a header length past the end hashes empty input.

    Args:
        source: the serialised file as bytes, a path, or a seekable binary file object (read from offset 0).

    Raises:
        FormatError: the file cannot be read or is shorter than 8 bytes.
    """
    fh, close = _open_source(source)
    try:
        fh.seek(0)
        head = fh.read(8)
        if len(head) < 8:
            raise FormatError(f"{_name_of(source)}: {len(head)} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        fh.seek(n + 8)
        digest = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
        return digest.hexdigest()
    except OSError as exc:
        raise FormatError(f"cannot read {_name_of(source)}: {exc}") from exc
    finally:
        if close:
            fh.close()


def addnet_hash_legacy(source: BytesOrPath) -> str:
    """First 8 hex chars of SHA-256 over the 0x10000 bytes at offset 0x100000 (1 MiB) of a serialisation.

    sd-scripts ``addnet_hash_legacy`` (stored as ``sshs_legacy_hash``, computed on the in-memory serialisation with
    only ``ss_*`` metadata) and the old A1111 model hash. Inputs under 1 MiB hash empty input (``"e3b0c442"``).

    Args:
        source: bytes, a path, or a seekable binary file object.

    Raises:
        FormatError: the file cannot be read.
    """
    fh, close = _open_source(source)
    try:
        fh.seek(_LEGACY_OFFSET)
        return hashlib.sha256(fh.read(_LEGACY_LENGTH)).hexdigest()[0:8]
    except OSError as exc:
        raise FormatError(f"cannot read {_name_of(source)}: {exc}") from exc
    finally:
        if close:
            fh.close()


def sha256_file(path: PathLike) -> str:
    """Full-file SHA-256 (64 hex chars) of ``path``, read in 1 MiB blocks.

    sd-scripts ``train_util.calculate_sha256``, used for ``ss_new_sd_model_hash`` of the base checkpoint (the legacy
    ``ss_sd_model_hash`` is :func:`addnet_hash_legacy` of the base file).

    Raises:
        FormatError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1024 * 1024), b""):
                digest.update(chunk)
    except OSError as exc:
        raise FormatError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
    return digest.hexdigest()


def precalculate_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as sd-scripts ``train_util.precalculate_safetensors_hashes``.

    The tensors are serialised in memory with only the ``ss_*`` metadata keys (user-editable keys must not change
    the hash), then :func:`addnet_hash_safetensors` and :func:`addnet_hash_legacy` are taken of those bytes. The
    model hash equals :func:`addnet_hash_safetensors` of the final file, whatever its metadata.

    Args:
        state_dict: the tensors exactly as they will be saved (CPU, contiguous, final dtype).
        metadata: string metadata (non-``ss_`` keys are ignored).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(state_dict), ss_only)
    return addnet_hash_safetensors(data), addnet_hash_legacy(data)


# ----------------------------------------------------------------------------------------------------------------------
# Key grouping and checks
# ----------------------------------------------------------------------------------------------------------------------


def group_lora_keys(state_dict: Iterable[str] | Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Group LoRA keys by module, splitting each key at its first ``.`` as A1111 ``networks.load_network`` does.

    Args:
        state_dict: ``{key: tensor}`` (or an iterable of keys, then the values are the keys themselves).

    Returns:
        ``(modules, unknown)``: ``modules`` maps a module name (``"lora_unet_..._to_q"``) to
        ``{part: tensor}`` with part one of :data:`LORA_PARTS` (``"lora_down.weight"``, ``"lora_up.weight"``,
        ``"lora_mid.weight"``, ``"alpha"``, ``"dora_scale"``); ``unknown`` lists, in input order, the keys whose part
        is not one of those (LoHa/LoKr/PEFT keys, biases, bundled embeddings, keys without a ``.``). A module may
        lack parts; checking completeness is the caller's job. Never raises.
    """
    items = state_dict.items() if isinstance(state_dict, Mapping) else ((k, k) for k in state_dict)
    modules: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, value in items:
        name, dot, part = str(key).partition(".")
        if dot and name and part in LORA_PARTS:
            modules.setdefault(name, {})[part] = value
        else:
            unknown.append(key)
    return modules, unknown


def check_finite(state_dict: Mapping[str, torch.Tensor], chunk: int = 1 << 24) -> None:
    """Raise if any floating-point tensor holds NaN or ±Inf.

    A LoRA file holds three small tensors per module, so small tensors of one dtype and device are joined, up to
    ``chunk`` elements at a time (the memory the check may add), and checked with one ``aminmax`` each (min/max
    propagate NaN and hold any ±Inf); tensors of ``chunk`` elements or more are checked alone. Only when a pass
    finds something are the tensors checked one by one, to name the key.

    Args:
        state_dict: ``{key: tensor}``; non-float tensors and non-tensors are skipped.
        chunk: elements per joined pass.

    Raises:
        FormatError: naming the first offending key in iteration order, e.g.
            ``"lora_unet_..._to_q.lora_up.weight holds NaN"`` (``"holds Inf"`` when there is no NaN).
    """
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    alone = []
    for value in state_dict.values():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
            continue
        if value.numel() >= chunk:
            alone.append([value.detach().reshape(-1)])
            continue
        group = (value.dtype, value.device)
        if group not in groups or sizes[group] >= chunk:
            groups.setdefault(group, []).append([])
            sizes[group] = 0
        groups[group][-1].append(value.detach().reshape(-1))
        sizes[group] += value.numel()
    if all(_all_finite(batch) for batches in groups.values() for batch in batches) and all(
            _all_finite(batch) for batch in alone):
        return
    for key, value in state_dict.items():
        reason = _non_finite_reason(value)
        if reason:
            raise FormatError(f"{key} {reason}")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every element of the 1-D ``tensors`` (one dtype and device) is finite."""
    try:
        low, high = torch.aminmax(tensors[0] if len(tensors) == 1 else torch.cat(tensors))
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax on this device
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _non_finite_reason(value: Any) -> str | None:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
        return None
    try:
        # One pass without a full-size bool tensor; min/max propagate NaN and hold any +-Inf.
        low, high = torch.aminmax(value.detach())
        finite = bool(torch.isfinite(low)) and bool(torch.isfinite(high))
    except (RuntimeError, NotImplementedError):
        finite = bool(torch.isfinite(value).all())
    if finite:
        return None
    if bool(torch.isnan(value).any()):
        return "holds NaN"
    return "holds Inf"


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def save_dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map a save-precision name to a dtype: ``"fp16"``/``"float16"``/``"half"`` -> float16, ``"bf16"``/``"bfloat16"``
    -> bfloat16, ``"float"``/``"fp32"``/``"float32"`` -> float32 (sd-scripts ``--save_precision`` names), and
    ``None``/``""``/``"none"`` -> None (keep the training dtype). A dtype in :data:`SAVE_DTYPES` passes through.

    Raises:
        ConfigError: any other name or dtype.
    """
    if name is None or isinstance(name, torch.dtype):
        if name is None or name in SAVE_DTYPES:
            return name
        raise ConfigError(f"save dtype {name} is not one of float16, bfloat16, float32")
    table = {
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "float": torch.float32,
        "fp32": torch.float32,
        "float32": torch.float32,
        "": None,
        "none": None,
    }
    key = str(name).strip().lower()
    if key not in table:
        raise ConfigError(f"save precision {name!r} is not one of fp16, bf16, float (fp32)")
    return table[key]


def _prepare_tensors(state_dict: Mapping[str, Any], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Validate keys and shapes, cast, and return fresh contiguous CPU tensors."""
    if not state_dict:
        raise FormatError("nothing to save: the state dict is empty")
    # A key must split at its first "." into a non-empty module name and a saved part (A1111 parses it that way).
    unexpected = [
        k for k in state_dict if not isinstance(k, str) or k.partition(".")[2] not in _SAVE_PARTS or k[0] == "."
    ]
    if unexpected:
        shown = ", ".join(map(str, unexpected[:5])) + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        raise FormatError(
            f"unexpected key(s) in LoRA state dict: {shown}; only <module>.lora_down.weight, "
            "<module>.lora_up.weight and <module>.alpha are saved"
        )
    modules, _ = group_lora_keys(state_dict)
    for name, parts in modules.items():
        missing = [p for p in ("lora_down.weight", "lora_up.weight") if p not in parts]
        if missing:
            raise FormatError(f"module {name} has no {' / '.join(missing)}")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        for part, t in (("lora_down.weight", down), ("lora_up.weight", up)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise FormatError(f"{name}.{part} is not a floating-point tensor ({type(t).__name__})")
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise FormatError(
                f"module {name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not form a "
                "rank-r pair (down [r, in] / [r, in, kh, kw], up [out, r] / [out, r, 1, 1])"
            )

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise FormatError(f"{key} has shape {tuple(value.shape)}; alpha must be a scalar")
                tensor = value.detach().reshape(())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                tensor = torch.tensor(float(value))
            else:
                raise FormatError(f"{key} is a {type(value).__name__}; alpha must be a scalar tensor or number")
            target = dtype or (tensor.dtype if tensor.is_floating_point() else torch.float32)
        else:
            tensor = value.detach()
            target = dtype or tensor.dtype
        out[key] = tensor.to(device="cpu", dtype=target, copy=True).contiguous()
        reason = _non_finite_reason(out[key])
        if reason:
            if _non_finite_reason(tensor) is None:
                reason += f" after casting to {target} (max |value| {tensor.abs().max().item():.6g} overflows)"
            raise FormatError(f"{key} {reason}; refusing to save")
    return out


def _write_all(fh: BinaryIO, data: memoryview) -> None:
    for start in range(0, len(data), _CHUNK):
        fh.write(data[start : start + _CHUNK])


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically: temp file ``.<name>.tmp-<pid>-<token>`` in the same folder, flush,
    fsync, ``os.replace`` onto ``path``, fsync the folder (POSIX).

    Creates the parent folder. On any failure (including KeyboardInterrupt) the temp file is removed and an existing
    file at ``path`` is left untouched; a process killed mid-write leaves only a dot-named temp file (see
    :func:`remove_stale_temp_files`).

    Returns:
        The final path.

    Raises:
        FormatError: an OSError while creating the folder, writing, syncing or renaming (the message names the path
            and the reason). Other exceptions propagate unchanged after the cleanup.
    """
    final = Path(os.fspath(path))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FormatError(f"cannot create folder {str(final.parent)!r}: {exc}") from exc
    tmp = _temp_name(final)
    view = memoryview(data).cast("B")
    created = False
    try:
        with open(tmp, "xb") as fh:
            created = True
            _write_all(fh, view)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise FormatError(f"cannot write {str(final)!r}: {exc}") from exc
        raise
    _fsync_dir(final.parent)
    return final


def save_lora_file(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None,
    dtype: torch.dtype | None,
) -> Path:
    """Save a Kohya-layout LoRA as ``.safetensors``, the way sd-scripts ``LoRANetwork.save_weights`` does, atomically.

    Args:
        path: target ``*.safetensors`` file (``str`` or path); its folder is created.
        state_dict: ``{key: tensor}`` with only ``<module>.lora_down.weight`` (``[r, in]`` / ``[r, in, kh, kw]``),
            ``<module>.lora_up.weight`` (``[out, r]`` / ``[out, r, 1, 1]``) and ``<module>.alpha`` (scalar tensor or
            number). Not modified.
        metadata: ``{str: value}``, stringified by :func:`lib_lora.metadata.stringify_metadata`; ``None`` = ``{}``.
            ``sshs_model_hash`` and ``sshs_legacy_hash`` are (re)computed as sd-scripts
            ``precalculate_safetensors_hashes`` does (see :func:`precalculate_hashes`).
        dtype: ``torch.float16``, ``torch.bfloat16``, ``torch.float32``, or ``None`` to keep each tensor's dtype.
            Every tensor, alpha included, is cast (sd-scripts convention); alpha is always a 0-dim float tensor
            (an integer alpha with ``dtype=None`` becomes float32).

    Returns:
        The final path. The file's ``sshs_model_hash`` equals :func:`addnet_hash_safetensors` of it.

    Raises:
        ConfigError: ``dtype`` is not one of the three above, or ``path`` does not end in ``.safetensors``.
        FormatError: an unexpected key (named), a module without up or down, mismatched ranks, a non-scalar alpha, a
            NaN/Inf (before or after the cast; named), a non-str metadata key, or an I/O error. Nothing is written
            then, and an existing file at ``path`` is untouched.
    """
    final = Path(os.fspath(path))
    if final.suffix.lower() != ".safetensors":
        raise ConfigError(f"LoRA file name {final.name!r} must end in .safetensors")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ConfigError(f"save dtype {dtype} is not one of float16, bfloat16, float32 (or None)")
    tensors = _prepare_tensors(state_dict, dtype)
    md = stringify_metadata(metadata)
    md.pop("sshs_model_hash", None)
    md.pop("sshs_legacy_hash", None)
    model_hash, legacy_hash = precalculate_hashes(tensors, md)
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy_hash
    try:
        data = safetensors.torch.save(tensors, md)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise FormatError(f"cannot serialise {final.name}: {exc}") from exc
    del tensors
    return atomic_write_bytes(final, data)


def remove_stale_temp_files(folder: PathLike, *, min_age_s: float = 3600.0) -> list[Path]:
    """Remove temp files left in ``folder`` by saves that were killed (``.<name>.tmp-<pid>-<token>``).

    A temp file is removed when its writer process no longer exists (POSIX only; never our own pid) or when it is
    older than ``min_age_s`` seconds. Other files are never touched.

    Returns:
        The removed paths. Errors while listing or removing are ignored (never raises for a missing folder).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        stale = False
        try:
            stale = now - entry.stat(follow_symlinks=False).st_mtime > min_age_s
        except OSError:
            continue
        if not stale and os.name != "nt" and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                stale = True
            except OSError:
                pass  # exists, owned by someone else
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _name_of(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.path.basename(os.fspath(source)) or os.fspath(source)
    return getattr(source, "name", None) or "<in-memory data>"


def torch_load_weights_only(path: str | os.PathLike, map_location: torch.device | str | None = "cpu"):
    """``torch.load(path, map_location, weights_only=True)``: tensors, numbers, strings and containers only, no
    arbitrary unpickling.

    Calls ``torch.serialization.load`` rather than ``torch.load``: inside the WebUI ``torch.load`` is replaced by
    ``modules/safe.py`` ``load``, whose allow-list check rejects the ``.format_version`` / ``.storage_alignment``
    entries that current torch writes and then returns None instead of raising. ``weights_only=True`` is the same
    protection, done by torch itself.

    Raises:
        whatever ``torch.serialization.load`` raises (FileNotFoundError, pickle.UnpicklingError, RuntimeError).
    """
    return torch.serialization.load(os.fspath(path), map_location=map_location, weights_only=True)


def load_lora_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file into CPU tensors and its metadata.

    - ``.safetensors``: all tensors in their stored dtype, and the ``__metadata__`` dict (``{}`` when absent). Values
      are the raw strings (use :func:`lib_lora.metadata.parse_metadata_values` for A1111-style JSON decoding).
    - ``.ckpt`` / ``.pt``: ``torch.load(map_location="cpu", weights_only=True)`` only (no arbitrary unpickling); a
      top-level ``"state_dict"`` dict is unwrapped; non-tensor entries are ignored; metadata is ``{}``.

    Keys are returned unchanged; group them with :func:`group_lora_keys` and check them with :func:`check_finite`
    (not done here, so a damaged file can still be inspected).

    Raises:
        FormatError: missing/unreadable/corrupt/truncated file, a pickle that needs more than tensors, no tensors, or
            another extension; the message names the file and the reason.
    """
    p = Path(os.fspath(path))
    suffix = p.suffix.lower()
    if p.is_dir():
        raise FormatError(f"{p}: is a folder, not a LoRA file")
    if suffix == ".safetensors":
        try:
            with safetensors.safe_open(os.fspath(p), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except FileNotFoundError as exc:
            raise FormatError(f"{p.name}: no such file ({p})") from exc
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise FormatError(f"{p.name}: not a readable safetensors file: {exc}") from exc
        return state_dict, metadata
    if suffix in (".ckpt", ".pt"):
        try:
            obj = torch_load_weights_only(p)
        except FileNotFoundError as exc:
            raise FormatError(f"{p.name}: no such file ({p})") from exc
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...
            raise FormatError(f"{p.name}: not a readable weights-only torch file: {exc}") from exc
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise FormatError(f"{p.name}: holds a {type(obj).__name__}, not a dict of tensors")
        state_dict = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not state_dict:
            raise FormatError(f"{p.name}: holds no tensors")
        return state_dict, {}
    raise FormatError(f"{p.name}: unsupported extension {suffix or '(none)'!r}; expected .safetensors, .ckpt or .pt")
