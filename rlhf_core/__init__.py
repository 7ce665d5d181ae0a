"""rlhf_core: the algorithm library of the RLHF pipeline (losses, PPO math, models, data).

Pure Python + torch/transformers/datasets; knows nothing about Prefect or DVC.
"""

__version__ = "0.1.0"
