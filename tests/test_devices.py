"""`compute`: one device and one precision setting, resolved on the machine at hand."""

import logging

import pytest
import torch

from rlhf_core.config import DataSettings, ParamsError, parse_params
from rlhf_core.config.compute import ComputeSettings
from rlhf_core.devices import resolve_device, resolve_precision
from rlhf_core.stages.common import StageContext

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("device", "cuda", "expected"),
    [("auto", False, CPU), ("auto", True, GPU), ("cpu", True, CPU), ("cuda:1", True, "cuda:1")],
)
def test_device_follows_the_setting_and_the_machine(device, cuda, expected):
    resolved = resolve_device(ComputeSettings(device=device), cuda_available=cuda)
    assert resolved == torch.device(expected)


def test_a_gpu_asked_for_on_a_machine_without_one_is_an_error_not_a_silent_cpu_run():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device(ComputeSettings(device="cuda"), cuda_available=False)


@pytest.mark.parametrize(
    ("precision", "device", "bf16", "expected"),
    [
        ("auto", CPU, True, "fp32"),  # fp32 on the CPU, whatever it supports
        ("auto", GPU, True, "bf16"),
        ("auto", GPU, False, "fp32"),  # no bf16 on an old GPU: fp32, not fp16
        ("fp16", GPU, True, "fp16"),
        ("fp32", GPU, True, "fp32"),
    ],
)
def test_precision_follows_the_setting_and_the_device(precision, device, bf16, expected):
    settings = ComputeSettings(precision=precision)
    assert resolve_precision(settings, device, bf16_supported=bf16) == expected


def test_bf16_asked_for_on_the_cpu_is_kept_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_core.devices"):
        assert resolve_precision(ComputeSettings(precision="bf16"), CPU) == "bf16"
    assert "slower than fp32" in caplog.text


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"compute\.device"):
        ComputeSettings(device="gpu")
    with pytest.raises(ValueError, match=r"compute\.precision"):
        ComputeSettings(precision="int8")
    with pytest.raises(ParamsError, match="compute"):
        parse_params({"compute": {"device": "tpu"}})


def test_a_stage_trains_in_its_own_precision_or_else_the_compute_one():
    params = parse_params({"compute": {"device": "cpu", "precision": "bf16"}})
    context = StageContext.from_params(params)
    assert context.device == CPU
    assert context.precision("fp16") == "fp16"  # the stage's train.mixed_precision wins
    assert context.precision("auto") == "bf16"
    assert StageContext(DataSettings(), 0).precision() == (
        "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    )
