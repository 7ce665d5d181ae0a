"""The pull step of the work-pool deployment (`rlhf deploy`): a flow run enters the checkout its
worker's environment names. The deployment itself, a real worker running it on an ingest
event, and what the server holds are tested on the team stack (tests/test_team_stack.py)."""

from pathlib import Path

import pytest

from rlhf_core.app.worker_project import (
    PROJECT_ROOT_VARIABLE,
    ProjectNotFoundError,
    enter_project,
)

REPO = Path(__file__).resolve().parents[1]
POOL = "team-pool"


def test_enter_project_moves_into_the_checkout_the_worker_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "checkout"
    project.mkdir()
    monkeypatch.delenv(PROJECT_ROOT_VARIABLE, raising=False)
    with pytest.raises(ProjectNotFoundError, match=f"{PROJECT_ROOT_VARIABLE} is not set"):
        enter_project("")
    with pytest.raises(ProjectNotFoundError, match=r"no dvc\.yaml or params\.yaml there"):
        enter_project(str(project))
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "params.yaml").write_text("seed: 0\n")
    monkeypatch.setenv(PROJECT_ROOT_VARIABLE, str(project))
    assert enter_project("") == {"directory": str(project.resolve())}  # templated to ""
    assert Path.cwd() == project.resolve()
