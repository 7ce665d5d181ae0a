"""Writing the pipeline's files atomically (JSON always valid), and hashing them.

Every write of a stage's outputs (models, checkpoints, metrics, curves) goes through
`writing(what, path)`: a full disk, a read-only folder or a file where a folder should be is
one `CannotWriteError` line naming what and where, never a library's traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What to do about the usual reasons a write fails, by errno.
_WRITE_HINTS = {
    errno.ENOSPC: "the file system is full; free space there or point the project elsewhere",
    errno.EDQUOT: "the disk quota is used up; free space there or point the project elsewhere",
    errno.EACCES: "the folder is not writable by this user; fix its permissions",
    errno.EPERM: "the folder is not writable by this user; fix its permissions",
    errno.EROFS: "the file system is mounted read-only; use a writable one",
    errno.ENOTDIR: "a file stands where a folder is needed on that path; move it away",
    errno.EISDIR: "a folder stands where a file is needed; move it away",
}


class CannotWriteError(OSError):
    """A stage output could not be written; the message is one line naming what and where."""


def write_error_message(what: str, path: str | os.PathLike, error: OSError) -> str:
    """`cannot write <what> to <path>: <strerror>; <hint>` for an OSError from a write."""
    reason = error.strerror or str(error)
    hint = _WRITE_HINTS.get(error.errno, "check the path and the disk")
    return f"cannot write {what} to {Path(path).absolute()}: {reason}; {hint}"


# safetensors reports the OS's error inside its message: "I/O error: ... (os error 28)".
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")
# Below this many free bytes a file system counts as full: torch.save's zip writer reports a
# full disk only as "unexpected pos N vs M", with no errno.
FULL_BELOW_BYTES = 1 << 20


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system of `path` (of its nearest existing parent)."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def os_error_behind(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """The OSError behind a failed write to `path`: the error itself or one it was raised
    from; an errno in a library's message (safetensors); or ENOSPC when a library's error
    (torch.save's "unexpected pos") comes with a full file system. None when it is none."""
    current: BaseException | None = error
    for _ in range(10):
        if current is None:
            break
        if isinstance(current, OSError):
            return current
        if match := _OS_ERROR_IN_MESSAGE.search(str(current)):
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    try:
        full = free_bytes(path) < FULL_BELOW_BYTES
    except OSError:
        full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else None


@contextmanager
def writing(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an error raised while writing `what` to `path` that comes from the OS (a full
    disk, a read-only folder: `os_error_behind`) into one `CannotWriteError` line
    (`write_error_message`); other errors pass unchanged."""
    try:
        yield
    except CannotWriteError:
        raise
    except Exception as error:
        cause = os_error_behind(error, path)
        if cause is None:
            raise
        failure = CannotWriteError(write_error_message(what, path, cause))
        failure.errno = cause.errno
        raise failure from error


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


def sync_folder(folder: str | os.PathLike) -> None:
    """Make the renames inside `folder` durable: fsync its directory entry (POSIX)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def write_json(path: Path, payload: Any, what: str = "the JSON file") -> Path:
    """Write JSON atomically; NaN and infinities become null (valid JSON for DVC metrics).

    A failed write leaves no temporary file behind and is one `CannotWriteError` naming
    `what` and `path`."""
    with writing(what, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = create_temporary_beside(path)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(_finite(payload), out, indent=2, sort_keys=True)
                out.write("\n")
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return path
