"""Writing the pipeline's files atomically (JSON always valid), and hashing them."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_temporary_beside(path: Path) -> tuple[int, Path]:
    """A new empty file beside `path` for an atomic replace: (open descriptor, its path).

    Created with mode 0666 minus the umask, as `open(path, "w")` would create `path` itself;
    `tempfile.mkstemp` makes 0600 files, and every metrics file the team shares would be
    private to the user who ran the stage.
    """
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically; NaN and infinities become null (valid JSON for DVC metrics)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = create_temporary_beside(path)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(_finite(payload), out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(temporary, path)
    return path
