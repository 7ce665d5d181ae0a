"""MLflow models of the `save_pretrained` folders the stages make: a pyfunc to load and serve.

Every stage that makes a model logs it with `log_pretrained_model`, which wraps the folder (kept
byte for byte, safetensors only) as an MLflow "model from code": MLflow copies
`model_code.py` into the model and runs it at load time to get a `PretrainedModel`, so
nothing is pickled. The folder itself decides what the model predicts:

- a policy (any causal LM folder) takes a DataFrame with a `prompt` column (one user turn,
  rendered with the tokenizer's chat template) and returns one generated response per row;
  optional params `max_new_tokens`, `temperature`, `top_k`, `top_p`, `do_sample`, `seed`
  default to `SamplingSettings()` and seed 0;
- a reward model (a folder written by `RewardModel.save_pretrained`) takes `prompt` and
  `response` columns and returns one score per row, the same value as
  `generation.score(RewardModel.from_pretrained(folder), ...)`.

    mlflow.pyfunc.load_model("models:/rlhf-policy@champion").predict(
        pd.DataFrame({"prompt": ["Review the film."]}), params={"max_new_tokens": 32}
    )

The model's environment is this package's: it is installed from its repository, not from a
package index, so serve with `mlflow models serve -m models:/rlhf-policy@champion
--env-manager local`. MLflow is imported here at module level: import this module lazily.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from mlflow.models import Model, ModelSignature
    from mlflow.models.model import ModelInfo

POLICY = "policy"
REWARD = "reward"
# The name of the save_pretrained folder among the MLflow model's artifacts.
PRETRAINED_ARTIFACT = "pretrained"
MODEL_CODE_FILE = Path(__file__).with_name("model_code.py")
# What the wrapper imports at run time; the versions are the ones installed when it is logged.
RUNTIME_DISTRIBUTIONS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas")
_REWARD_MARKER = "reward_model.json"  # written by RewardModel.save_pretrained
_SEED_DEFAULT = 0


def model_kind(model_dir: Path) -> str:
    """`REWARD` for a folder written by `RewardModel.save_pretrained`, else `POLICY`."""
    return REWARD if (Path(model_dir) / _REWARD_MARKER).is_file() else POLICY


def model_signature(kind: str) -> ModelSignature:
    """The explicit signature of a `kind` model (no inference from an input example).

    Policy: input `prompt` (string), output one string per row, params for sampling.
    Reward: inputs `prompt` and `response` (strings), output one double per row.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from rlhf_core.config.training import SamplingSettings

    if kind == REWARD:
        inputs = Schema([ColSpec("string", "prompt"), ColSpec("string", "response")])
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "score")]))
    if kind != POLICY:
        raise ValueError(f"Unknown model kind {kind!r}; expected {POLICY!r} or {REWARD!r}.")
    defaults = SamplingSettings()
    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", defaults.max_new_tokens),
            ParamSpec("temperature", "double", defaults.temperature),
            ParamSpec("top_k", "long", defaults.top_k),
            ParamSpec("top_p", "double", defaults.top_p),
            ParamSpec("do_sample", "boolean", defaults.do_sample),
            ParamSpec("seed", "long", _SEED_DEFAULT),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "response")]),
        params=params,
    )


def pip_requirements() -> list[str]:
    """`name==version` of each runtime distribution as installed now (local labels dropped).

    Given explicitly, so MLflow does not load the model to infer them.
    """
    pins = []
    for name in RUNTIME_DISTRIBUTIONS:
        version = importlib.metadata.version(name).split("+", 1)[0]  # torch 2.x+cpu -> 2.x
        pins.append(f"{name}=={version}")
    return pins


def log_pretrained_model(model_dir: Path, name: str) -> ModelInfo:
    """Log `model_dir` as the pyfunc model `name` of the active run; returns MLflow's ModelInfo.

    The folder is copied into the model's artifacts as `artifacts/<folder name>` and is listed
    in MLmodel under the artifact name `PRETRAINED_ARTIFACT`. Its kind (policy or reward model)
    sets the signature.
    """
    model_dir = Path(model_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE_FILE),
        artifacts={PRETRAINED_ARTIFACT: str(model_dir.resolve())},
        signature=model_signature(model_kind(model_dir)),
        pip_requirements=pip_requirements(),
    )


def pretrained_path(mlmodel: Model) -> str:
    """Path, relative to the MLflow model's root, of the save_pretrained folder it wraps."""
    from mlflow.pyfunc import FLAVOR_NAME

    artifacts = (mlmodel.flavors.get(FLAVOR_NAME) or {}).get("artifacts") or {}
    entry = artifacts.get(PRETRAINED_ARTIFACT)
    if not entry or "path" not in entry:
        raise ValueError(
            f"This MLflow model has no '{PRETRAINED_ARTIFACT}' artifact: it was not logged by "
            "rlhf_core.tracking.models.log_pretrained_model."
        )
    return entry["path"]


class PretrainedModel(PythonModel):
    """The pyfunc of a policy or reward model folder (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        """Load the folder in `context.artifacts`: a reward model, else a causal LM."""
        directory = context.artifacts[PRETRAINED_ARTIFACT]
        self._kind = model_kind(Path(directory))
        if self._kind == REWARD:
            from rlhf_core.models.heads import RewardModel
            from rlhf_core.models.loading import load_tokenizer

            self._model = RewardModel.from_pretrained(directory)
            self._tokenizer = load_tokenizer(directory)
        else:
            from rlhf_core.models.loading import load_causal_lm

            self._model, self._tokenizer = load_causal_lm(directory)
        self._model.eval()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str] | list[float]:
        """Responses (policy) or scores (reward model), one per row of `model_input`."""
        frame = _as_frame(model_input)
        if self._kind == REWARD:
            return self._score(frame)
        return self._generate(frame, params or {})

    def _generate(self, frame: pd.DataFrame, params: dict[str, Any]) -> list[str]:
        from rlhf_core.config.training import SamplingSettings
        from rlhf_core.generation import generate

        prompts = [_user_turn(text) for text in _column(frame, "prompt")]
        known = {field.name for field in dataclasses.fields(SamplingSettings)}
        settings = SamplingSettings(**{k: v for k, v in params.items() if k in known})
        seed = int(params.get("seed", _SEED_DEFAULT))
        return generate(self._model, self._tokenizer, prompts, settings, seed=seed).texts

    def _score(self, frame: pd.DataFrame) -> list[float]:
        from rlhf_core.scoring import score

        prompts = [_user_turn(text) for text in _column(frame, "prompt")]
        responses = _column(frame, "response")
        return score(self._model, self._tokenizer, prompts, responses).tolist()


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    return pd.DataFrame(model_input)


def _column(frame: pd.DataFrame, name: str) -> list[str]:
    if name not in frame.columns:
        raise ValueError(f"The input has no '{name}' column; pass a DataFrame with one.")
    values = frame[name].tolist()
    missing = [row for row, value in enumerate(values) if not isinstance(value, str)]
    if missing:
        raise ValueError(f"Rows {missing} have no '{name}' text; give every row a string.")
    return values


def _user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
