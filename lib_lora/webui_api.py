"""The extension's HTTP API (``/lora-trainer/v1/...``) on the WebUI's FastAPI app, and the path checks it needs.

Routes (registered by ``scripts/lib_lora_api.py`` from ``script_callbacks.on_app_started``):

- ``POST /lora-trainer/v1/train``: body = a JSON object with the keys of the TOML training config
  (:class:`lib_lora.config.TrainConfig` fields); ``train_data_dir`` must lie under the WebUI's data folder or a
  root of the "allowed dataset roots" setting; ``output_name`` must be a plain name; the files go to
  ``<--lora-dir>/<output sub-folder>/<output_name>/``. Keys the WebUI decides (``output_dir``, ``logging_dir``,
  ``model``, ``device``) are ignored and listed in the answer. Returns ``{"job_id", "output_dir", "ignored"}``.
- ``GET /lora-trainer/v1/status``: :meth:`lib_lora.webui_jobs.TrainingJobs.status`.
- ``POST /lora-trainer/v1/stop``: ``{"stopping": bool, "state"}``.
- ``GET /lora-trainer/v1/runs``: ``{"lora_dir", "runs": [...]}``.

Errors: bad input 400 (``{"detail": message}``), a job already running 409, a model or memory mode that cannot
be trained 409, no such route 404. Authentication: the same HTTP Basic check as the WebUI's own API
(``modules/api/api.py`` ``Api.auth``: users from ``--api-auth user:pass[,user2:pass2]``, 401 with
``WWW-Authenticate: Basic``), see :func:`basic_auth_dependency`.

FastAPI is imported inside the functions, so that lib_lora itself does not need it outside the WebUI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError, LoraError

API_PREFIX = "/lora-trainer/v1"
#: TrainConfig keys the WebUI decides; ignored in a train request (and listed in the answer).
IGNORED_KEYS = ("output_dir", "logging_dir", "model", "device")
#: Longest output name accepted (characters; the checkpoint stems add up to 13 more).
MAX_NAME_LENGTH = 100
_BAD_NAME_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


# ------------------------------------------------------------------------------------------------- validators
def sanitize_output_name(name: Any) -> str:
    """An output name that is a plain file name: no path separators, no ``..``, no characters Windows refuses,
    not hidden, at most :data:`MAX_NAME_LENGTH` characters; surrounding blanks are stripped.

    Raises:
        ConfigError: naming what is wrong (e.g. ``'../../x'`` contains a path separator).
    """
    if not isinstance(name, str):
        raise ConfigError(f"output_name must be a string, got {type(name).__name__}")
    name = name.strip()
    if not name:
        raise ConfigError("output_name is empty: give the LoRA a name (letters, digits, - and _)")
    if _BAD_NAME_CHARS.search(name):
        raise ConfigError(f"output_name {name!r} must be a plain file name: no path separators or any of "
                          "\\ / : * ? \" < > | or control characters")
    if name.startswith(".") or ".." in name:
        raise ConfigError(f"output_name {name!r} must not start with '.' or contain '..'")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"output_name is {len(name)} characters long; at most {MAX_NAME_LENGTH}")
    return name


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def output_path_inside(lora_dir: str | os.PathLike, subdir: str, name: str) -> Path:
    """``<lora_dir>/<subdir>/<name>``, resolved (symlinks followed), checked to lie inside ``lora_dir``.

    ``subdir`` may hold several parts (``"lib_lora/chars"``) but no ``..`` part and no absolute path; ``name``
    must pass :func:`sanitize_output_name`.

    Raises:
        ConfigError: a bad subdir or name, or a resolved path outside the Lora folder (e.g. through a symlink).
    """
    name = sanitize_output_name(name)
    subdir = (subdir or "").strip().replace("\\", "/")
    parts = [p for p in subdir.split("/") if p not in ("", ".")]
    if subdir.startswith("/") or re.match(r"^[A-Za-z]:", subdir) or ".." in parts:
        raise ConfigError(f"output sub-folder {subdir!r} must be a relative folder inside the Lora folder "
                          "(no '..', not absolute)")
    root = Path(os.fspath(lora_dir)).resolve()
    path = root.joinpath(*parts, name).resolve()
    if not _inside(path, root) or path == root:
        raise ConfigError(f"the output folder {path} would not be inside the Lora folder {root}")
    return path


def resolve_dataset_path(path: Any, roots: Iterable[str | os.PathLike]) -> Path:
    """The dataset folder ``path`` resolved (``~`` expanded, symlinks followed; a relative path is taken from the
    first root), checked to be an existing folder inside one of ``roots``.

    Raises:
        ConfigError: empty/non-string path, outside every root (the message lists the roots and the setting to
            change), or not an existing folder.
    """
    roots = [Path(os.fspath(r)).expanduser().resolve() for r in roots]
    if not isinstance(path, str) or not path.strip():
        raise ConfigError("train_data_dir is not set: give the dataset folder (under the WebUI data folder or an "
                          "allowed dataset root)")
    p = Path(path.strip()).expanduser()
    if not p.is_absolute():
        if not roots:
            raise ConfigError(f"train_data_dir {path!r} is relative and no dataset root is configured")
        p = roots[0] / p
    p = p.resolve()
    if not any(_inside(p, r) for r in roots):
        listed = ", ".join(str(r) for r in roots) or "none"
        raise ConfigError(f"train_data_dir {str(p)!r} is outside the allowed dataset folders ({listed}); add its "
                          "folder to Settings > LoRA Trainer > allowed dataset roots")
    if not p.is_dir():
        raise ConfigError(f"train_data_dir {str(p)!r} does not exist or is not a folder")
    return p


def check_file_inside(key: str, path: Any, roots: Iterable[str | os.PathLike]) -> str:
    """For ``network_weights`` / ``resume``: the resolved path, which must exist inside one of ``roots``.

    Raises:
        ConfigError: not a string, missing, or outside the roots.
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{key} must be a path")
    p = Path(path.strip()).expanduser().resolve()
    roots = [Path(os.fspath(r)).expanduser().resolve() for r in roots]
    if not any(_inside(p, r) for r in roots):
        raise ConfigError(f"{key} {str(p)!r} is outside the Lora folder and the allowed dataset folders")
    if not p.exists():
        raise ConfigError(f"{key} {str(p)!r} does not exist")
    return str(p)


def prepare_api_config(body: Any, host) -> tuple[dict[str, Any], list[str]]:
    """Checks a train request body against ``host`` (a :class:`lib_lora.webui_host.WebUIHost`).

    Returns:
        (config dict for :meth:`TrainingJobs.start`, ignored keys).

    Raises:
        ConfigError: not a JSON object, or a path/name check failed.
    """
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object with training config keys")
    data = dict(body)
    ignored = sorted(k for k in IGNORED_KEYS if k in data)
    for k in ignored:
        data.pop(k)
    roots = list(host.allowed_roots())
    data["train_data_dir"] = str(resolve_dataset_path(data.get("train_data_dir"), roots))
    data["output_name"] = sanitize_output_name(data.get("output_name", "lora"))
    for key in ("network_weights", "resume"):
        if data.get(key) is not None:
            data[key] = check_file_inside(key, data[key], [host.lora_dir, *roots])
    return data, ignored


# ------------------------------------------------------------------------------------------------- auth
def parse_api_auth(api_auth: str | None) -> dict[str, str]:
    """``--api-auth`` text ``"user:pass,user2:pass2"`` as {user: password} (``Api.__init__``; a password may
    contain ":" here, the WebUI would refuse to start).

    Raises:
        ConfigError: an entry without ":".
    """
    credentials = {}
    for entry in (api_auth or "").split(","):
        if not entry.strip():
            continue
        if ":" not in entry:
            raise ConfigError("--api-auth entries must be user:password")
        user, password = entry.split(":", 1)
        credentials[user] = password
    return credentials


def basic_auth_dependency(api_auth: str | None):
    """A FastAPI dependency list checking HTTP Basic credentials like ``modules/api/api.py`` ``Api.auth``, or
    None when ``api_auth`` is empty (the WebUI's API is then open too)."""
    if not api_auth:
        return None
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    credentials = parse_api_auth(api_auth)

    # No annotation on purpose: with postponed annotations FastAPI could not resolve a local type name; the
    # HTTPBasic dependency hands over an HTTPBasicCredentials (username, password) either way.
    def auth(creds=Depends(HTTPBasic())):
        if creds.username in credentials and compare_digest(creds.password, credentials[creds.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


# ------------------------------------------------------------------------------------------------- routes
def register_routes(app, jobs, dependencies=None) -> None:
    """Adds the four routes to ``app`` (a FastAPI app) for ``jobs`` (:class:`TrainingJobs`).

    Args:
        dependencies: FastAPI dependencies for every route (e.g. :func:`basic_auth_dependency`), or None.
    """
    from fastapi import Body, HTTPException

    from .webui_jobs import JobError

    def fail(exc: Exception) -> HTTPException:
        status = getattr(exc, "http_status", 400)
        return HTTPException(status_code=status, detail=str(exc))

    def train(body: Any = Body(...)):
        try:
            data, ignored = prepare_api_config(body, jobs.host)
            job_id = jobs.start(data)
        except (JobError, LoraError, ValueError) as exc:
            raise fail(exc) from exc
        return {"job_id": job_id, "output_dir": jobs.status()["output_dir"], "ignored": ignored}

    def status():
        return jobs.status()

    def stop():
        stopping = jobs.stop()
        return {"stopping": stopping, "state": jobs.status()["state"]}

    def runs():
        try:
            return {"lora_dir": str(jobs.host.lora_dir), "runs": jobs.runs()}
        except LoraError as exc:
            raise fail(exc) from exc

    kw = {"dependencies": dependencies} if dependencies else {}
    app.add_api_route(f"{API_PREFIX}/train", train, methods=["POST"], **kw)
    app.add_api_route(f"{API_PREFIX}/status", status, methods=["GET"], **kw)
    app.add_api_route(f"{API_PREFIX}/stop", stop, methods=["POST"], **kw)
    app.add_api_route(f"{API_PREFIX}/runs", runs, methods=["GET"], **kw)
