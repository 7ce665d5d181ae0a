"""infra/accelerate/*.yaml, the configs a training stage's `launch.config_file` names: each is
read by accelerate's own loader and launcher code and gives the FSDP2 or DeepSpeed plugin the
settings it documents (DeepSpeed is not installed here: its plugin is checked, not run), and
ddp.yaml drives a real 2-process `accelerate launch` on this machine's CPUs.

Measured here with accelerate 1.15 and torch 2.13 on CPUs: a launch of fsdp2.yaml runs DDP
over gloo (accelerate applies FSDP on GPUs only), so only the GPU runs would test sharding.
"""

import json
import os
import socket
import subprocess
import sys
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

# One backward on each process of a launch, then what that process saw: its rank, the world,
# accelerate's distributed type and the launcher's environment. The Accelerator is built as the
# training stages build theirs (an explicit precision); rank r's input is r + 1, so the
# gradient all-reduced over two processes is the mean of 3 and 6 in every entry.
PROBE = """
import json, os, sys
import torch
from accelerate import Accelerator

accelerator = Accelerator(mixed_precision="no")
model = torch.nn.Linear(4, 1, bias=False)
torch.nn.init.zeros_(model.weight)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
inputs = torch.ones(3, 4, device=accelerator.device) * (accelerator.process_index + 1)
accelerator.backward(model(inputs).sum())
seen = {
    "rank": accelerator.process_index,
    "world": accelerator.num_processes,
    "distributed_type": accelerator.distributed_type.value,
    "backend": accelerator.state.backend,
    "wrapper": type(model).__name__,
    "grad": accelerator.unwrap_model(model).weight.grad.flatten().tolist(),
    "mixed_precision": accelerator.mixed_precision,
    "env": {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "FSDP_"))},
}
out = os.path.join(sys.argv[1], f"rank{accelerator.process_index}-pid{os.getpid()}.json")
with open(out, "w") as f:
    json.dump(seen, f)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_two_processes(config: Path, tmp_path: Path) -> list[dict]:
    """`accelerate launch --config_file CONFIG --num_processes 2` of the probe on the CPUs (no
    GPU visible, `ACCELERATE_USE_CPU` set so accelerate joins the processes over gloo); what
    each process recorded, by rank."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / "seen"
    out.mkdir()
    argv = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", "2", "--num_machines", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(script), str(out),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    assert len(seen) == 2, f"expected one record per process, got {[p.name for p in out.iterdir()]}"
    return sorted(seen, key=lambda record: record["rank"])


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


def test_ddp_config_launches_two_processes_over_gloo(tmp_path):
    seen = launch_two_processes(CONFIGS / "ddp.yaml", tmp_path)
    assert [record["rank"] for record in seen] == [0, 1]
    for record in seen:
        assert record["world"] == 2
        # Without a GPU accelerate runs the MULTI_GPU config as DDP over gloo.
        assert record["distributed_type"] == "MULTI_CPU"
        assert record["backend"] == "gloo"
        assert record["wrapper"] == "DistributedDataParallel"
        assert record["grad"] == [4.5] * 4  # (3 + 6) / 2: the gradients were all-reduced
        # The file's bf16 reaches the process; the Accelerator's explicit precision wins.
        assert record["env"]["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert record["mixed_precision"] == "no"
        assert "ACCELERATE_USE_FSDP" not in record["env"]


@pytest.mark.slow  # two fresh interpreters importing torch: 8-14 s here
def test_processes_without_a_gpu_or_use_cpu_each_train_alone():
    """Why the launches above set ACCELERATE_USE_CPU: two processes started as torchrun starts
    them (RANK, WORLD_SIZE, MASTER_PORT), on CPUs, whose Accelerator is not told cpu=True,
    join torch's process group, yet accelerate gives each one a world of one process: no
    data is sharded and no gradient is all-reduced."""
    code = (
        "import torch.distributed as dist; from accelerate import Accelerator; "
        "a = Accelerator(mixed_precision='no'); "
        "print(a.distributed_type.value, a.num_processes, a.process_index, dist.get_world_size())"
    )
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(
        CUDA_VISIBLE_DEVICES="", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr[-3000:]
            assert stdout.split() == ["NO", "1", "0", "2"]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
