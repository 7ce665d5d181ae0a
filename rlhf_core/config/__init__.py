"""Typed configuration: params.yaml read into one validated settings object per section.

params.yaml is the one source of every knob. `Params` is the whole file; each section is one
class: `model`, `data`, `policy`, `orchestration` here, the stage sections in `config.stages`,
their `train:` and `sampling:` subsections in `config.training`, `data.validation` and `demo`
in `config.data`, `gate` in `config.gate`, `sweep` in `config.sweep`. Unknown keys are errors
(a typo must not become a silent default), and every error names the key and the file. Nothing
here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlhf_core.config.compute import ComputeSettings
from rlhf_core.config.data import DemoSettings, ValidationSettings
from rlhf_core.config.gate import GateSettings
from rlhf_core.config.launch import LaunchSettings
from rlhf_core.config.reward import RewardSettings
from rlhf_core.config.stages import (
    DPOSettings,
    EvaluateSettings,
    PPOSettings,
    SFTSettings,
)
from rlhf_core.config.sweep import SweepSettings

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ParamsError(ValueError):
    """A params file that cannot be read or does not match the schema."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """The base model every stage starts from."""

    base: str = Field(
        "demo",
        description=(
            "'demo' builds a small Llama from scratch with a BPE tokenizer trained on the demo "
            "corpus; otherwise a local save_pretrained directory, a .gguf file, or a hub id "
            "(hub ids need network access and HF_HUB_OFFLINE unset)."
        ),
    )
    tiny_config: str = Field("demo", description="Named config of the from-scratch model.")
    tokenizer_vocab_size: int = Field(2048, ge=300, description="BPE vocabulary size (demo).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub model.")
    seed: int = Field(0, description="Seed of the from-scratch model's initial weights.")


class DataSettings(_Section):
    """Where data comes from and how it is split and validated."""

    source: str = Field(
        "demo",
        description="'demo' generates the demo task; 'files' reads the paths listed in `files`.",
    )
    files: dict[str, list[str]] = Field(
        default_factory=dict,
        description="kind -> input paths when source is 'files' (kinds: sft, preference, "
        "ranked, prompts, eval_prompts).",
    )
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Held-out share of prompts.")
    split_salt: str = Field("", description="Changes the hash split without changing the data.")
    validation: ValidationSettings = Field(default_factory=ValidationSettings)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in ("demo", "files"):
            raise ValueError("must be 'demo' or 'files'")
        return value


POLICY_ALGORITHMS = ("dpo", "ppo")


class PolicySettings(_Section):
    """The aligned policies: which algorithms run (one DVC stage each) and their settings."""

    algorithms: list[str] = Field(default_factory=lambda: list(POLICY_ALGORITHMS))
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    ppo: PPOSettings = Field(default_factory=PPOSettings)

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(POLICY_ALGORITHMS))
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(
                f"must be a non-empty list of distinct names from {list(POLICY_ALGORITHMS)}"
            )
        return value


class OrchestrationSettings(_Section):
    """Scheduling of the retrain deployment served by `rlhf serve`."""

    schedule_cron: str = Field("0 3 * * *", description="Cron schedule of the retrain flow.")
    project_name: str | None = Field(
        None,
        description="The project's name on a shared Prefect server: the retrain deployment on "
        "a work pool (`rlhf deploy`) runs on the ingest events of this name. None: the name "
        "of the project's folder.",
    )
    work_pool: str = Field("rlhf", description="The work pool `rlhf deploy` deploys to.")
    record_lock: str = Field(
        "none",
        description="After a retrain: 'none'; 'commit' (git commit of dvc.lock and "
        "data/preferences.dvc when they changed); or a path to copy dvc.lock to. With a "
        "default DVC remote the retrain also pulls before and pushes after.",
        min_length=1,
    )


class Params(_Section):
    """The whole params.yaml."""

    seed: int = Field(0, description="Global seed for every stage.")
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    orchestration: OrchestrationSettings = Field(default_factory=OrchestrationSettings)

    def validation_for(self, kind: str) -> ValidationSettings:
        """`data.validation` for a data set of `kind`, with `max_tokens` resolved: the value
        set in params.yaml, else the shortest `max_length` of the stages that train on such
        rows (each of them truncates longer ones): sft for `sft`, the reward model and DPO
        for `preference`, the reward model for `ranked`, and the longest of them for
        `prompts` (a prompt must leave room for an answer in every stage)."""
        settings = self.data.validation
        if settings.max_tokens is not None:
            return settings
        lengths = {
            "sft": [self.sft.max_length],
            "preference": [self.reward.max_length, self.policy.dpo.max_length],
            "ranked": [self.reward.max_length],
        }
        if kind == "prompts":
            limit = max(length for listed in lengths.values() for length in listed)
        elif kind in lengths:
            limit = min(lengths[kind])
        else:
            raise ValueError(f"unknown data set kind {kind!r}")
        return dataclasses.replace(settings, max_tokens=max(limit, settings.min_tokens))


def _format_validation_error(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown key (check its spelling against params.yaml's documented keys)"
        problems.append(f"{key}: {message}")
    return f"{source}: " + "; ".join(problems)


def non_finite_keys(raw: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN or infinite number in a loaded mapping (lists by index):
    YAML reads `.nan` and `.inf` as floats, and no knob of the pipeline means anything there
    (an infinite learning rate trains a NaN model to the end)."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return [prefix or "(top level)"]
    if isinstance(raw, dict):
        items = ((f"{prefix}.{key}" if prefix else str(key), value) for key, value in raw.items())
    elif isinstance(raw, list):
        items = ((f"{prefix}[{index}]", value) for index, value in enumerate(raw))
    else:
        return []
    return [found for key, value in items for found in non_finite_keys(value, key)]


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate an already-loaded mapping; `source` names it in error messages."""
    if bad := non_finite_keys(raw or {}):
        raise ParamsError(
            f"{source}: {', '.join(bad)} must be a finite number (NaN and infinity are not "
            "settings; use null where a key allows no limit)"
        )
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ParamsError(_format_validation_error(error, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate a params.yaml; a missing file or a bad key is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    return parse_params(raw, str(path))
