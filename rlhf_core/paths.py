"""Fixed input and output locations of the pipeline stages, relative to the project root.

DVC declares these same paths as each stage's deps and outs, so a stage never reads state
outside them. Everything here is generated: DVC outputs or git-ignored, never git objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Data sets the prepare stage writes, by kind: (file name, validation kind).
RAW_SETS: dict[str, tuple[str, str]] = {
    "sft": ("sft.jsonl", "sft"),
    "preference": ("preferences.jsonl", "preference"),
    "ranked": ("rankings.jsonl", "ranked"),
    "prompts": ("ppo_prompts.jsonl", "prompts"),
    "eval_prompts": ("eval_prompts.jsonl", "prompts"),
}


@dataclass(frozen=True)
class ProjectPaths:
    """Every fixed path of a project rooted at `root`."""

    root: Path = Path(".")

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def validated_dir(self) -> Path:
        return self.root / "data" / "validated"

    @property
    def preference_store(self) -> Path:
        return self.root / "data" / "preferences"

    @property
    def incoming_dir(self) -> Path:
        return self.root / "data" / "incoming"

    @property
    def labels_dir(self) -> Path:
        """`rlhf label`'s votes log and its batch state."""
        return self.root / "data" / "labels"

    @property
    def base_model_dir(self) -> Path:
        return self.root / "artifacts" / "base"

    @property
    def timings_dir(self) -> Path:
        """Per-stage timing splits (`rlhf_core.tracking.timing`); git-ignored, not a DVC output."""
        return self.root / "artifacts" / "timings"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "artifacts" / "metrics"

    @property
    def sft_model_dir(self) -> Path:
        return self.root / "artifacts" / "sft"

    @property
    def reward_model_dir(self) -> Path:
        return self.root / "artifacts" / "reward"

    def policy_dir(self, algorithm: str) -> Path:
        """An aligned policy (dpo, ppo, ...)."""
        return self.root / "artifacts" / "policy" / algorithm

    @property
    def plots_dir(self) -> Path:
        return self.root / "artifacts" / "plots"

    @property
    def evaluation_dir(self) -> Path:
        return self.root / "artifacts" / "evaluation"

    def checkpoints_dir(self, stage: str) -> Path:
        """Resumable checkpoints of a running stage: git-ignored, not a DVC output, removed
        when the stage completes."""
        return self.root / ".checkpoints" / stage

    def data_docs_dir(self, set_name: str) -> Path:
        """Great Expectations Data Docs of a validated set: git-ignored, not a DVC output
        (GX stamps each page with the time of the run), logged to the validate run."""
        return self.root / "artifacts" / "data_docs" / set_name

    def metrics_file(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"

    def raw_file(self, set_name: str) -> Path:
        return self.raw_dir / RAW_SETS[set_name][0]

    def validated_set(self, set_name: str) -> Path:
        return self.validated_dir / set_name
