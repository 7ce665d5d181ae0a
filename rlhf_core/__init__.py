"""rlhf_core: the RLHF pipeline's library (algorithms, data, models, training, evaluation,
tracking, stages), its Prefect/DVC glue (`orchestration`) and the `rlhf` command (`app`).

The library is pure Python + torch/transformers/datasets/MLflow and knows nothing about
Prefect or DVC; see ARCHITECTURE.md for who may import whom.
"""

__version__ = "0.1.0"
