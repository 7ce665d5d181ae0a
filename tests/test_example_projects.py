"""The example projects of examples/: each a DVC project of its own running the root pipeline.

examples/smollm2 is `make demo-real` (SmolLM2-135M-Instruct). Its stages must stay the root
dvc.yaml's, with code deps two levels up, and its prepare stage must depend on the model file's
content, not on the `model.base` string.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.config import load_params
from rlhf_core.stages.training_stage import learning_rate_warning

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2"
CODE_PREFIX = "../../"
# What the example's prepare reads beyond the root's: the model file and its loader.
PREPARE_EXTRA_DEPS = ["${model.base}", "../../rlhf_core/models/loading.py"]


def stages_of(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


def test_example_runs_the_root_pipeline_with_code_deps_two_levels_up():
    root_stages, example_stages = stages_of(ROOT), stages_of(EXAMPLE)
    assert list(example_stages) == list(root_stages)
    for name, root_stage in root_stages.items():
        expected = json.loads(
            json.dumps(root_stage).replace('"rlhf_core/', f'"{CODE_PREFIX}rlhf_core/')
        )
        if name == "prepare":
            expected["deps"] = PREPARE_EXTRA_DEPS + expected["deps"]
        assert example_stages[name] == expected, name


def test_example_is_a_dvc_project_of_its_own():
    assert (EXAMPLE / ".dvc" / "config").is_file()
    ignored = (EXAMPLE / ".gitignore").read_text().split()
    assert {"/downloads/?*", "/data/", "/mlflow.db"} <= set(ignored)


def test_the_model_file_is_dvc_tracked_so_temporary_experiments_find_it(example_copy):
    """`dvc exp run --temp` and `--queue` run in a copy of the git tree: the GGUF reaches
    them from the DVC cache through its .dvc file, which git must see (the file itself not)."""
    params = load_params(EXAMPLE / "params.yaml")
    tracked = yaml.safe_load((EXAMPLE / f"{params.model.base}.dvc").read_text())
    [out] = tracked["outs"]
    assert out["path"] == Path(params.model.base).name and out["size"] == 98_362_432
    shutil.copy(EXAMPLE / ".gitignore", example_copy / ".gitignore")

    def ignored(path: str) -> bool:
        check = ["git", "check-ignore", "-q", path]
        return subprocess.run(check, cwd=example_copy).returncode == 0

    assert not ignored(f"{params.model.base}.dvc")
    assert ignored(params.model.base) and ignored("downloads/other.gguf")


def test_example_params_suit_a_pretrained_model():
    params = load_params(EXAMPLE / "params.yaml")
    assert params.model.base.startswith("downloads/") and params.model.base.endswith(".gguf")
    rates = {
        "sft": params.sft.train.learning_rate,
        "reward": params.reward.train.learning_rate,
        "ppo": params.policy.ppo.train.learning_rate,
    }
    if not params.policy.dpo.lora.enabled:
        rates["dpo"] = params.policy.dpo.train.learning_rate
    for stage, rate in rates.items():  # no from-scratch rate on 135M parameters
        assert learning_rate_warning(stage, 134_515_008, rate) is None, stage
    assert params.data.validation.max_tokens is None  # follows the stages' max_length
    assert params.validation_for("sft").max_tokens == params.sft.max_length


def run_dvc(project: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def example_copy(tmp_path) -> Path:
    """The example in a git repository laid out as this one (code two levels up, linked)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "rlhf_core").symlink_to(ROOT / "rlhf_core")
    project = tmp_path / "examples" / "smollm2"
    shutil.copytree(EXAMPLE / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(EXAMPLE / name, project / name)
    return project


def test_prepare_goes_stale_when_the_model_file_changes(example_copy):
    """dvc.lock records the model file's md5: new bytes under the same name rerun prepare."""
    params = load_params(example_copy / "params.yaml")
    model_file = example_copy / params.model.base
    model_file.parent.mkdir(parents=True)
    model_file.write_bytes(b"GGUF first weights")
    for out in ("data/raw", "artifacts/base"):  # stand-ins for the stage's outputs
        (example_copy / out).mkdir(parents=True)
        (example_copy / out / "file").write_text(out)
    (example_copy / "artifacts/metrics").mkdir()
    (example_copy / "artifacts/metrics/prepare.json").write_text("{}")
    run_dvc(example_copy, "commit", "--force", "prepare")
    assert json.loads(run_dvc(example_copy, "status", "prepare", "--json")) == {}

    model_file.write_bytes(b"GGUF other weights")
    status = json.loads(run_dvc(example_copy, "status", "prepare", "--json"))
    changed = [entry["changed deps"] for entry in status["prepare"] if "changed deps" in entry]
    assert changed == [{params.model.base: "modified"}]
