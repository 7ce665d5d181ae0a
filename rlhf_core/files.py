"""Writing the pipeline's JSON files (metrics, plots data): atomically, and always valid JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
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


def write_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically; NaN and infinities become null (valid JSON for DVC metrics)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(_finite(payload), out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(temporary, path)
    return path
