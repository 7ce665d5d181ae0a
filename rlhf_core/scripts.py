"""Loading the project's Python scripts by path: flows/ and tasks/ are not installed packages.

They live in the project's repository and are loaded by path, the way Prefect itself loads a
deployment's entrypoint. A relative path is looked up in the project root first, then beside
this package (an editable install of this repository), so a project that only holds data and
params can still use the flows that came with the code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def code_root() -> Path:
    """The repository this package was installed from (it holds flows/ and tasks/)."""
    return Path(__file__).resolve().parents[1]


def resolve_script(path: str | Path, project_root: str | Path = ".") -> Path:
    """An absolute script path as is; a relative one in the project root, else beside the
    package (see the module docstring)."""
    path = Path(path)
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path(project_root).resolve() / path, code_root() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ValueError(f"Cannot find {path} (looked at {tried}); run from the project repository.")


def load_script(path: str | Path, project_root: str | Path = ".") -> ModuleType:
    """The module of a Python file loaded by path (found with `resolve_script`).

    Each file is loaded once per process under a name unique to its absolute path
    (`_rlhf_<stem>_<hash>`), so loading it again returns the same objects, and generic file
    names (tasks, flows) never shadow or collide with installed packages.
    """
    path = resolve_script(path, project_root)
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]
    module_name = f"_rlhf_{path.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a loadable Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
