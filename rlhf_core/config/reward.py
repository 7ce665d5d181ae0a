"""The settings of the reward stage: the `reward` section of params.yaml (the reward model,
its ensemble and its held-out judge). Importable without torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rlhf_core.config.training import TrainSettings, require_minimums

# Measured on the demo (the 0.9M-parameter SFT model, 1356 training pairs, 2 CPU cores): held-out
# accuracy plateaus after 3-4 epochs whatever the learning rate (3e-4 … 1e-3); the low rate
# gives the best-calibrated rewards (lowest held-out loss). 4 epochs are 172 steps, ~45 s of
# single-core compute. More epochs overfit (train accuracy above the annotators' agreement).
REWARD_DEMO_TRAIN = TrainSettings(
    learning_rate=3e-4, warmup_steps=10, epochs=4.0, eval_every=43, checkpoint_every=50
)


@dataclass(frozen=True)
class EnsembleSettings:
    """The reward stage's ensemble (Coste et al. 2023, arXiv:2310.02743): `reward.ensemble`.

    Attributes:
        members: reward models trained one after another in the stage (default 1, a single
            model). Member 0 is the single model (global seed, every training comparison) at
            artifacts/reward; member i ≥ 1 trains with the seed `derived_seed(seed,
            "reward/member", i)` (its score head and data order) under
            artifacts/reward/members/<i>. Costs k× the training time and k× the scoring
            time wherever the ensemble is used.
        bootstrap: members i ≥ 1 train on a bootstrap resample of the training comparisons
            (as many, drawn with replacement) rather than on all of them (default True):
            each member sees as much data as one model, the resamples make them disagree.
    """

    members: int = 1
    bootstrap: bool = True

    def __post_init__(self) -> None:
        require_minimums("reward.ensemble", self, {"members": 1})
        if not isinstance(self.bootstrap, bool):
            raise ValueError(
                f"reward.ensemble.bootstrap must be true or false, got {self.bootstrap!r}."
            )


@dataclass(frozen=True)
class JudgeSettings:
    """A held-out judge for the overoptimisation alarm: `reward.judge`.

    Where the data have no gold judge (anything but the demo), PPO's alarm needs a second
    opinion the policy cannot exploit along with the proxy: a reward model trained on
    comparisons the proxy never saw (Gao et al. 2023, arXiv:2210.10760, measure a proxy
    against a gold reward model; this is the stand-in for one).

    Attributes:
        enabled: train the judge in the reward stage after the reward model (and its
            ensemble members), under artifacts/reward/judge (default False). PPO then scores
            every evaluation with it as `eval/judge_score_mean` and, without a gold judge,
            its alarm compares the proxy against it (`policy.ppo.overoptimisation_judge`).
        share: the fraction of the training prompts whose comparisons go to the judge
            (`data.splits.judge_split`, by prompt, disjoint); the reward model and its members
            train on the rest, so they see less data (default 0.5).
    """

    enabled: bool = False
    share: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"reward.judge.enabled must be true or false, got {self.enabled!r}.")
        share = self.share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
            raise ValueError(
                f"reward.judge.share must be a number strictly between 0 and 1, got {share!r}."
            )


@dataclass(frozen=True)
class RewardSettings:
    """Every knob of the reward stage.

    Attributes:
        train: optimisation settings (defaults measured on the demo: lr 3e-4, 4 epochs of
            batch 32, cosine decay). `batch_size` counts comparisons (a pair or a ranking).
            Its `seed` is replaced by the stage's global seed, which also seeds the new score
            head.
        max_length: most tokens of chat prompt + response + EOS; longer sequences lose the
            start of the prompt first, then the end of the response (default 256).
        use_margin: subtract the data's per-pair `margin` inside Bradley–Terry,
            −log σ(r⁺ − r⁻ − m) (Llama 2); needs a `margin` column (default False).
        use_rankings: also train on the validated `ranked` set with Plackett–Luce when it
            exists (default True).
        center_rewards: shift the score head so the mean reward over the training responses
            is 0 (default True).
        eval_batch_size: sequences per forward pass when scoring (default 64).
        ensemble: how many reward models to train and on what (`EnsembleSettings`; default
            one model). Each member is centred on the same training responses.
        judge: a held-out reward model on a disjoint split, the overoptimisation alarm's
            stand-in for a gold judge (`JudgeSettings`; default off).
    """

    train: TrainSettings = REWARD_DEMO_TRAIN
    max_length: int = 256
    use_margin: bool = False
    use_rankings: bool = True
    center_rewards: bool = True
    eval_batch_size: int = 64
    ensemble: EnsembleSettings = field(default_factory=EnsembleSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)

    def __post_init__(self) -> None:
        require_minimums("reward", self, {"max_length": 2, "eval_batch_size": 2})
        if isinstance(self.ensemble, Mapping):
            object.__setattr__(self, "ensemble", EnsembleSettings(**self.ensemble))
        if not isinstance(self.ensemble, EnsembleSettings):
            raise ValueError(
                f"reward.ensemble must be a mapping with members and bootstrap, "
                f"got {self.ensemble!r}."
            )
        if isinstance(self.judge, Mapping):
            object.__setattr__(self, "judge", JudgeSettings(**self.judge))
        if not isinstance(self.judge, JudgeSettings):
            raise ValueError(
                f"reward.judge must be a mapping with enabled and share, got {self.judge!r}."
            )
