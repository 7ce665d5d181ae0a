"""A toy git + DVC repository whose stages are quick Python scripts, for the tests of
tasks/dvc_stage.py and of the flows.

The toy DAG (written to dvc.yaml in reverse order, so only the DAG can put it right):
    first (params: seed; deps: data/preferences; MLflow run; metrics/first.json)
    -> second@x, second@y (foreach; params: data.split_salt; no cache:false outs, so DVC's
       run-cache can restore them) -> third (MLflow run)
Each call of a stage appends its name to calls.log, so tests can see what really ran.
"""

import subprocess
import sys
from pathlib import Path

import yaml

TOY_STAGE = '''"""Toy stage: <name> <out dir> [--mlflow]; see tests/toy_project.py."""
import json
import sys
from pathlib import Path

import yaml

name, out = sys.argv[1], Path(sys.argv[2])
with open("calls.log", "a") as calls:
    calls.write(name + "\\n")
if Path(f"broken_{name}").exists():
    print("ValueError: this stage is broken on purpose")
    sys.exit(1)
if Path(f"flaky_{name}").exists():
    Path(f"flaky_{name}").unlink()  # fails once, like a DVC lock held by another process
    print("ERROR: Unable to acquire lock. Most likely another DVC process is running")
    sys.exit(1)
params = yaml.safe_load(Path("params.yaml").read_text())
value = {
    "first": f"seed={params['seed']}",
    "third": "third",
}.get(name, f"salt={params['data']['split_salt']}")


def write():
    out.mkdir(parents=True, exist_ok=True)
    (out / "value.txt").write_text(value)
    Path("metrics").mkdir(exist_ok=True)
    metrics = {"loss": 0.25 + params["seed"], "seconds": 0.1, "eval": {"accuracy": 0.75}}
    Path(f"metrics/{name}.json").write_text(json.dumps(metrics))


if "--mlflow" in sys.argv:
    from rlhf_core.tracking.runs import stage_run

    with stage_run(name, params=params) as run:
        write()
        run.log_metrics({"loss": 0.5}, step=0)
        run.record_output(out)
else:
    write()
print(f"{name} wrote {out}")
if "--mlflow" in sys.argv:  # MLflow's objects: a second of teardown the toy does not need
    import gc

    gc.freeze()
'''

TOY_DVC_YAML = {
    "stages": {
        "third": {
            "cmd": "python toy_stage.py third out/third --mlflow",
            "deps": ["toy_stage.py", "out/second"],
            "outs": ["out/third"],
        },
        "second": {
            "foreach": ["x", "y"],
            "do": {
                "cmd": "python toy_stage.py second_${item} out/second/${item}",
                "deps": ["toy_stage.py", "out/first"],
                "params": ["data.split_salt"],
                "outs": ["out/second/${item}"],
            },
        },
        "first": {
            "cmd": "python toy_stage.py first out/first --mlflow",
            "deps": ["toy_stage.py", "data/preferences"],
            "params": ["seed"],
            "outs": ["out/first"],
            "metrics": [{"metrics/first.json": {"cache": False}}],
        },
    }
}
TOY_PARAMS = {"seed": 0, "data": {"split_salt": ""}}
TOY_ORDER = ["first", "second@x", "second@y", "third"]


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def init_repo(root: Path, files: dict[str, str]) -> Path:
    """A committed git + DVC repo holding `files`, data/ folders, and a migrated MLflow store."""
    from mlflow import MlflowClient

    root.mkdir(parents=True)
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    files = {".gitignore": "mlflow.db\nmlruns/\ncalls.log\n.prefect/\n/data/\n", **files}
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "data" / "preferences").mkdir(parents=True)
    (root / "data" / "incoming").mkdir()
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "toy pipeline"], cwd=root, check=True)
    MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()  # migrate once
    return root


def build_toy_project(root: Path) -> Path:
    """The toy pipeline of this module's docstring, plus a file tracked with `dvc add`."""
    init_repo(
        root,
        {
            "toy_stage.py": TOY_STAGE,
            "dvc.yaml": yaml.safe_dump(TOY_DVC_YAML, sort_keys=False),
            "params.yaml": yaml.safe_dump(TOY_PARAMS),
        },
    )
    (root / "notes.txt").write_text("data tracked with dvc add, not a stage\n")
    dvc(root, "add", "-q", "notes.txt")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "notes"], cwd=root, check=True)
    return root


def calls(root: Path) -> list[str]:
    log = root / "calls.log"
    return log.read_text().split() if log.is_file() else []


def set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    section = params
    for key in parents:
        section = section[key]
    section[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))
