"""MLflow tracking of the pipeline: where runs go, what each stage run records and hands on.

    experiment  the tracking store's URI and the project's experiment
    runs        `stage_run`: the MLflow run of one stage (params, metrics, artifacts, outputs)
    lineage     md5s as DVC computes them, run markers beside outputs, the producing run
    timing      a stage process's wall time split into start-up, imports, tracking and compute
    models      the pyfunc MLflow model of a `save_pretrained` folder (`model_code.py` loads it)
    registry    registered versions of the policy and reward model, candidate and champion
    registry_lineage  a registered version's lineage: the chain of runs and its JSON file
    check       whether the tracking store answers, before any stage starts

Import from the modules themselves (`from rlhf_core.tracking.runs import stage_run`).
"""
