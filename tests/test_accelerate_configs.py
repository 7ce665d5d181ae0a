"""infra/accelerate/*.yaml, the configs a training stage's `launch.config_file` names: each is
read by accelerate's own loader and launcher code and gives the FSDP2 or DeepSpeed plugin the
settings it documents (DeepSpeed is not installed here: its plugin is checked, not run).
ddp.yaml drives the real 2-process PPO stage in test_training_processes.py.

Measured here with accelerate 1.15 and torch 2.13 on CPUs: a launch of fsdp2.yaml runs DDP
over gloo (accelerate applies FSDP on GPUs only), so only the GPU runs would test sharding.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "infra" / "accelerate"
README = ROOT / "infra" / "README.md"
EXPECTED_TYPES = {
    "ddp.yaml": "MULTI_GPU",
    "fsdp2.yaml": "FSDP",
    "deepspeed-zero2.yaml": "DEEPSPEED",
    "deepspeed-zero3.yaml": "DEEPSPEED",
}
CONFIG_NAMES = sorted(path.name for path in CONFIGS.glob("*.yaml"))


def test_every_config_is_expected_and_documented_in_its_header():
    assert sorted(EXPECTED_TYPES) == CONFIG_NAMES, (
        "infra/accelerate/ holds a config this test does not know (or lacks one): add it to "
        "EXPECTED_TYPES and to infra/README.md"
    )
    for name in CONFIG_NAMES:
        header = (CONFIGS / name).read_text().split("\ncompute_environment:")[0]
        for part in ("When:", "Serves:", "Memory:", f"--config_file infra/accelerate/{name}"):
            assert part in header, f"{name}: its comment header lacks {part!r}"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == EXPECTED_TYPES[name]
    assert config.num_machines == 1
    assert config.num_processes >= 2
    assert config.use_cpu is False
    # accelerate validates the top-level keys only; a misspelt nested key would be ignored.
    launch_arguments = {action.dest for action in launch_command_parser()._actions}
    nested = {**config.fsdp_config, **config.deepspeed_config}
    unknown = sorted(key for key in nested if key not in launch_arguments)
    assert not unknown, f"{name}: not `accelerate launch` settings: {unknown}"


def launcher_environment(name: str) -> tuple[object, dict[str, str]]:
    """The parsed arguments and the environment accelerate's launcher gives the processes of
    `accelerate launch --config_file infra/accelerate/NAME --num_processes 2` (its own code,
    run here without starting them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(CONFIGS / name), "--num_processes", "2", "train.py"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    ("name", "engine"),
    [("ddp.yaml", None), ("fsdp2.yaml", "FSDP"), ("deepspeed-zero2.yaml", "DeepSpeed"),
     ("deepspeed-zero3.yaml", "DeepSpeed")],
)  # fmt: skip
def test_a_stage_refuses_the_engines_whose_sharded_states_it_cannot_save_yet(name, engine):
    """What a training stage's processes see of each config (the launcher's environment): DDP
    runs; FSDP2 and DeepSpeed are one error naming the engine, not a run whose checkpoints
    and model would be one process's shard."""
    from rlhf_core.training.distributed import unsupported_engine

    reason = unsupported_engine(launcher_environment(name)[1])
    if engine is None:
        assert reason is None
    else:
        assert reason.startswith(f"launch.config_file asks for {engine}, which the training")
        assert "infra/accelerate/ddp.yaml" in reason


def test_fsdp2_config_gives_fsdp_its_wrapping_and_full_state_dict(monkeypatch):
    """The launcher's FSDP2 settings, and the plugin accelerate builds from them in each
    process (the launcher refuses cpu_ram_efficient_loading without sync_module_states)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, env = launcher_environment("fsdp2.yaml")
    assert args.use_fsdp and args.num_processes == 2
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True
    # FSDP2's no-offload policy (CPUOffloadPolicy would keep parameters in CPU memory)
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"


@pytest.mark.parametrize(
    ("name", "stage", "gathers_16bit"),
    [("deepspeed-zero2.yaml", 2, False), ("deepspeed-zero3.yaml", 3, True)],
)
def test_deepspeed_config_gives_deepspeed_its_zero_stage(name, stage, gathers_16bit, monkeypatch):
    """The DeepSpeed config accelerate's DeepSpeedPlugin builds in each process from the
    launcher's environment (neither needs DeepSpeed installed)."""
    from accelerate.utils import DeepSpeedPlugin

    args, env = launcher_environment(name)
    assert args.use_deepspeed and args.num_processes == 2
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    deepspeed = DeepSpeedPlugin().deepspeed_config
    zero = deepspeed["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none"
    assert zero["offload_param"]["device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is gathers_16bit
    assert deepspeed["gradient_accumulation_steps"] == 1
    assert deepspeed["gradient_clipping"] == 1.0


def test_readme_names_every_config():
    text = README.read_text()
    assert "## Training on more than one process" in text
    for name in CONFIG_NAMES:
        assert f"infra/accelerate/{name}" in text, f"infra/README.md does not mention {name}"
