"""multiprocessing's fork server is one per process, started with the preloads set before its
first use. A test file that needs its own preloads (the store's crash tests, the benchmark's
workers) stops a server that another test file started in the same pytest worker."""

from __future__ import annotations

from multiprocessing import forkserver


def stop_forkserver() -> None:
    """Stop this process's fork server, if one runs; the next forkserver process starts a new
    one with the preloads set by then. `_stop` is private but kept for CPython's own tests
    (3.8+)."""
    forkserver._forkserver._stop()
