"""The "model from code" file of every logged rlhf model: MLflow copies it into the model and
runs it when loading, so the model object is built here instead of being unpickled. The
weights come from the model's `artifacts/` folder (safetensors), read in `load_context`."""

from mlflow.models import set_model

from rlhf_core.tracking.models import PretrainedModel

set_model(PretrainedModel())
