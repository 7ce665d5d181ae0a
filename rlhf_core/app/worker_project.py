"""Where a worker finds the project: the checkout named by RLHF_PROJECT_ROOT on its machine.

A deployment on a work pool runs on whichever worker picks it up, and each machine keeps its
checkout of the project where it likes; so the deployment names no path. Its one pull step,
`enter_project`, runs in the flow run's process before the flow is loaded, and moves into
the checkout that the worker's environment names; the flow's `project_root` is then ".".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PROJECT_ROOT_VARIABLE = "RLHF_PROJECT_ROOT"
PULL_STEP = "rlhf_core.app.worker_project.enter_project"


class ProjectNotFoundError(RuntimeError):
    """The worker's environment names no project, or not one; the message says what to set."""


def enter_project(directory: str | None = None) -> dict[str, str]:
    """The pull step: chdir into `directory` (RLHF_PROJECT_ROOT, templated by Prefect) and
    return it as {"directory": ...} for later steps. One clear error when it is unset or
    holds no dvc.yaml and params.yaml."""
    directory = directory or os.environ.get(PROJECT_ROOT_VARIABLE)
    if not directory:
        raise ProjectNotFoundError(
            f"{PROJECT_ROOT_VARIABLE} is not set in this worker's environment: start the "
            f"worker with {PROJECT_ROOT_VARIABLE}=/path/to/the/project (a checkout with "
            "dvc.yaml and params.yaml), or with `rlhf infra up` from the project"
        )
    root = Path(directory).expanduser().resolve()
    missing = [name for name in ("dvc.yaml", "params.yaml") if not (root / name).is_file()]
    if missing:
        raise ProjectNotFoundError(
            f"{PROJECT_ROOT_VARIABLE}={directory} is not an rlhf project (no "
            f"{' or '.join(missing)} there): point it at the project's checkout"
        )
    os.chdir(root)
    return {"directory": str(root)}


class ProjectCheckout:
    """A RunnerStorage whose code is already on every worker's machine: no pull, one step
    that enters the checkout (`enter_project`)."""

    def set_base_path(self, path: Path) -> None:
        """Nothing to place: the code is the worker's checkout."""

    @property
    def pull_interval(self) -> int | None:
        return None

    @property
    def destination(self) -> Path:
        return Path(".")

    async def pull_code(self) -> None:
        """Nothing to pull: the checkout is kept up to date by its machine (git pull)."""

    def to_pull_step(self) -> dict[str, Any]:
        return {PULL_STEP: {"directory": "{{ $" + PROJECT_ROOT_VARIABLE + " }}"}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProjectCheckout)

    __hash__ = object.__hash__
