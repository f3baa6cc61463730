"""Atomic output folders and JSON files: the one way nvila writes a folder or reads a JSON object.

Every writer of a folder (checkpoints, adapters, built models, training checkpoints) fills a temporary
sibling and renames it into place only when everything was written, so an interrupted or failing write
never leaves a half-written folder behind::

    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(...)
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from nvila.base.errors import CheckpointError, NvilaError


@contextmanager
def atomic_dir(out: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success it becomes ``out``, on any error it is removed.

    ``out`` must not exist or be an empty folder, unless ``replace``: then an existing folder is removed
    once the new one is complete.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NvilaError(f"output path {out} is a file; choose a folder path")
    if not replace and out.exists() and any(out.iterdir()):
        raise NvilaError(f"output folder {out} exists and is not empty; choose a new path")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)          # left by a killed writer with our pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, error: type[NvilaError] = CheckpointError) -> dict[str, Any]:
    """Parse a file holding one JSON object; a missing or broken file is ``error`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data


def json_bytes(data: Any) -> bytes:
    """The project's JSON file form: indented by two, one trailing newline."""
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as an indented JSON file (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json_bytes(data))
    return path
