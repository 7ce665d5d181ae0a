"""One writer at a time in a preference store, across processes: `rlhf ingest`, the retrain
flow and their `dvc add` of the store all hold `store_lock` while they write.

The lock is an OS file lock (`filelock`, flock on POSIX) on `.<store name>.lock` beside the
store, never inside it, so `dvc add` of the store does not version it. The kernel drops the
lock when its holder dies (a kill, a crash, a lost machine), so no stale lock outlives a
process. Within one process the lock is re-entrant in the thread that holds it (the retrain
flow holds it around `ingest_files`, which takes it too); other threads wait.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


class StoreBusyError(RuntimeError):
    """The store's lock was not free within the time allowed; the message says what to do."""


@dataclass
class _ProcessLock:
    """The file lock of one store in this process, with a thread lock in front of it."""

    file_lock: FileLock
    thread_lock: threading.RLock = field(default_factory=threading.RLock)
    depth: int = 0


_LOCKS: dict[Path, _ProcessLock] = {}
_LOCKS_GUARD = threading.Lock()


def store_lock_path(store_dir: str | Path) -> Path:
    """The lock file of a store: `.<name>.lock` in the store's parent folder."""
    store = Path(store_dir).resolve()
    return store.parent / f".{store.name}.lock"


def _process_lock(path: Path) -> _ProcessLock:
    with _LOCKS_GUARD:
        if path not in _LOCKS:
            # thread_local=False: the thread lock in front decides which thread may enter.
            _LOCKS[path] = _ProcessLock(FileLock(str(path), thread_local=False))
        return _LOCKS[path]


@contextmanager
def store_lock(
    store_dir: str | Path,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the store's lock; wait up to `timeout` seconds for it (None: as long as it takes).

    When another process holds it, `on_wait` (a logger's warning by default) gets one line
    saying who is waiting for what, once. StoreBusyError when `timeout` runs out.
    """
    path = store_lock_path(store_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    held = _process_lock(path)
    if not held.thread_lock.acquire(timeout=-1 if timeout is None else timeout):
        raise StoreBusyError(_busy_message(store_dir, path, timeout))
    try:
        if held.depth == 0:
            _acquire_file_lock(held.file_lock, store_dir, path, timeout, on_wait)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                held.file_lock.release()
    finally:
        held.thread_lock.release()


def _acquire_file_lock(
    lock: FileLock,
    store_dir: str | Path,
    path: Path,
    timeout: float | None,
    on_wait: Callable[[str], None] | None,
) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        pass  # held elsewhere: say so once, then wait
    (on_wait or log.warning)(
        f"Waiting for {path}: another ingest or a retrain is writing {store_dir}."
    )
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout)
    except Timeout:
        raise StoreBusyError(_busy_message(store_dir, path, timeout)) from None


def _busy_message(store_dir: str | Path, path: Path, timeout: float | None) -> str:
    return (
        f"{store_dir} is busy: another ingest or a retrain held {path} for more than "
        f"{timeout:g} s. Try again later, wait longer (--lock-timeout), or put the files in "
        "data/incoming/ for the next retrain to ingest."
    )
