"""The `launch` settings and the `accelerate launch` command a training stage re-executes as."""

import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.config import ParamsError, parse_params
from rlhf_core.config.launch import LaunchSettings
from rlhf_core.orchestration.stage_launch import (
    LAUNCHED_ENV,
    is_launched,
    launch_argv,
    launch_env,
)
from rlhf_core.stages.training_stage import is_main_process


def test_one_process_is_the_default_and_launches_nothing():
    launch = parse_params({}).launch
    assert launch == LaunchSettings() and not launch.launches
    assert LaunchSettings(num_processes=2).launches
    assert LaunchSettings(config_file="infra/accelerate/ddp.yaml").launches


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"num_processes": 0}, "launch.num_processes"),
        ({"num_processes": "two"}, "launch.num_processes"),
        ({"config_file": ""}, "launch.config_file"),
        ({"main_process_port": 70000}, "launch.main_process_port"),
    ],
)
def test_bad_launch_settings_are_one_clear_error(bad, says):
    with pytest.raises(ParamsError, match=says):
        parse_params({"launch": bad})


def test_the_command_is_accelerate_launch_of_the_same_stage(tmp_path):
    params = tmp_path / "params.yaml"
    argv = launch_argv("dpo", params, LaunchSettings(num_processes=3), port=29555)
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in argv  # accelerate's data-parallel launcher (gloo without GPUs)
    flags = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert flags["--num_processes"] == "3" and flags["--main_process_port"] == "29555"
    assert flags["--main_process_ip"] == "127.0.0.1"  # loopback only
    assert argv[-6:] == [
        "-m", "rlhf_core.app.cli", "stage", "dpo", "--params", str(params.resolve()),
    ]  # fmt: skip


def test_a_config_file_is_resolved_from_the_project_and_must_exist(tmp_path):
    config = tmp_path / "infra" / "fsdp.yaml"
    config.parent.mkdir()
    config.write_text("distributed_type: FSDP\n")
    launch = LaunchSettings(num_processes=2, config_file="infra/fsdp.yaml")
    argv = launch_argv("sft", tmp_path / "params.yaml", launch, port=1234)
    assert argv[argv.index("--config_file") + 1] == str(config)
    assert "--multi_gpu" not in argv  # the config says how
    with pytest.raises(FileNotFoundError, match=r"launch\.config_file infra/missing\.yaml"):
        launch_argv(
            "sft", tmp_path / "params.yaml", LaunchSettings(config_file="infra/missing.yaml")
        )


def test_launched_processes_are_marked_leave_the_stage_server_and_share_the_cores():
    env = launch_env(LaunchSettings(num_processes=2), {"RLHF_STAGE_SERVER": "/s", "A": "1"})
    assert env[LAUNCHED_ENV] == "1" and env["A"] == "1" and "RLHF_STAGE_SERVER" not in env
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert (
        launch_env(LaunchSettings(num_processes=2), {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"]
        == "7"
    )
    assert is_launched({LAUNCHED_ENV: "1"}) and is_launched({"WORLD_SIZE": "4"})
    assert not is_launched({}) and not is_launched({"WORLD_SIZE": "1"})
    assert is_main_process({}) and is_main_process({"RANK": "0"})
    assert not is_main_process({"RANK": "1"})


def test_a_missing_config_file_stops_the_stage_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"launch": {"config_file": "nowhere.yaml"}}))
    result = CliRunner().invoke(app, ["stage", "sft", "--params", str(params)])
    assert result.exit_code == 2
    assert "launch.config_file nowhere.yaml: no such file" in result.output
    assert not (tmp_path / "artifacts").exists()
    assert Path(params).exists()
