"""Test-wide settings: offline, no telemetry, and small thread counts for a 2-core machine."""

import os

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


# ---------------------------------------------------------------------------------------------
# A tiny prepared project shared by the stage tests: demo data (small), validated sets, a
# "nano" base model, and untrained stand-ins for the SFT and reward models at their fixed
# paths, so each stage can be tested alone. Built once per session, copied per test.

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_PARAMS = {
    "seed": 0,
    "model": {"base": "demo", "tiny_config": "nano", "tokenizer_vocab_size": 400, "seed": 0},
    "data": {"eval_fraction": 0.2},
    "demo": {
        "seed": 0,
        "n_sft": 64,
        "n_preference_prompts": 48,
        "n_ranked": 16,
        "ranking_k": 3,
        "n_ppo_prompts": 16,
        "n_eval_prompts": 8,
        "n_reward_eval_pairs": 40,
    },
}


@pytest.fixture(scope="session")
def tiny_project_template(tmp_path_factory) -> Path:
    from rlhf_core.config import parse_params
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.loading import load_causal_lm, save_model
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.stages.prepare import run_prepare
    from rlhf_core.stages.validate import run_validate

    root = tmp_path_factory.mktemp("tiny_project")
    params = parse_params(TINY_PARAMS)
    run_prepare(params, root)
    run_validate(params, root)
    paths = ProjectPaths(root)
    model, tokenizer = load_causal_lm(str(paths.base_model_dir))
    save_model(model, tokenizer, paths.sft_model_dir)
    RewardModel.from_causal_lm(model, seed=0).save_pretrained(
        paths.reward_model_dir, tokenizer=tokenizer
    )
    return root


@pytest.fixture
def tiny_project(tiny_project_template, tmp_path) -> Path:
    """A fresh copy of the tiny prepared project (tmp_path/project)."""
    return Path(shutil.copytree(tiny_project_template, tmp_path / "project"))


@pytest.fixture
def tiny_params():
    """The params the tiny project was built with (a Params object)."""
    from rlhf_core.config import parse_params

    return parse_params(TINY_PARAMS)


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory):
    """One migrated sqlite MLflow store per test module (the first migration takes ~2 s),
    with MLFLOW_TRACKING_URI pointing at it; yields (its folder, an MlflowClient on it)."""
    from mlflow import MlflowClient

    from rlhf_core.tracking.experiment import EXPERIMENT_NAME, ensure_experiment

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
        patch.delenv("RLHF_EXPERIMENT", raising=False)
        client = MlflowClient(uri)
        ensure_experiment(client, EXPERIMENT_NAME, (root / "mlruns").as_uri())
        yield root, client


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for nano models: they are all overhead, two threads contend on a
    busy 2-core machine and run far slower. Modules opt in with `usefixtures`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite file to copy: migrating one costs seconds, copying not."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def mlflow_uri(empty_mlflow_db, tmp_path_factory):
    """A migrated sqlite MLflow store of its own for a module's stage runs."""
    folder = tmp_path_factory.mktemp("mlflow")
    shutil.copy(empty_mlflow_db, folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture
def mlflow_store(mlflow_uri, monkeypatch):
    """`mlflow_uri` as this test's MLFLOW_TRACKING_URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    return mlflow_uri


@pytest.fixture(scope="module")
def toy_template(tmp_path_factory) -> Path:
    """The toy git + DVC project of tests/toy_project.py, built once per module."""
    from toy_project import build_toy_project

    return build_toy_project(tmp_path_factory.mktemp("toy") / "template")


@pytest.fixture
def toy(toy_template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the toy project; MLflow settings from the environment cleared."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID", "RLHF_EXPERIMENT"):
        monkeypatch.delenv(name, raising=False)
    return Path(shutil.copytree(toy_template, tmp_path / "toy", symlinks=True))


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    """A nano reward model over the module's `tokenizer` (its trunk seeded apart from the LM's)."""
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.tiny import build_tiny_llama

    return RewardModel.from_causal_lm(build_tiny_llama("nano", tokenizer, seed=1), seed=0).eval()


# ---------------------------------------------------------------------------------------------
# The longest test files first: `make test` runs a file per worker (pytest-xdist, --dist
# loadfile) in collection order (--no-loadscope-reorder: xdist would otherwise hand out the
# files with the most tests first), and the end-to-end file started last would set the suite's
# length alone. Within a file, and among the others, the order is unchanged (a stable sort).

LONGEST_FIRST = (
    "test_pipeline_end_to_end.py",
    "test_team_stack.py",
    "test_sweep.py",  # a real 4-point sweep through DVC's queue: about 3.5 minutes
    "test_benchmarks.py",
    "test_flows.py",
    "test_tracking_outage.py",
    "test_crash_harness.py",
    "test_store_crashes.py",
    "test_training_processes.py",
    "test_ppo_processes.py",
    "test_chat.py",
    "test_label_page.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
