"""Hashes as DVC computes them, to compare with what the pipeline records."""

import hashlib


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def dvc_md5(path, cache):
    """DVC's own hash of a file or directory: the value it would write to dvc.lock."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(cache)), str(path), fs, "md5")
    return obj.hash_info.value
