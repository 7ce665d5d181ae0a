"""Stage `prepare`: the raw data sets and the base model, at fixed paths.

- data.source 'demo': generate the demo task into data/raw (deterministic by demo.seed).
- model.base 'demo': train a BPE tokenizer on the training sets and build a small Llama;
  otherwise load the named model (local folder, .gguf file, or hub id when online).
The base model is saved to artifacts/base as safetensors, so later stages read one local copy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from rlhf_core.config import Params
from rlhf_core.files import writing
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.datasets import TOKENIZER_SETS, data_set_files, set_kind

log = logging.getLogger(__name__)

STAGE = "prepare"


def run_prepare(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Write the raw sets (demo) and the base model; return and save a summary.

    An MLflow run `prepare` records the params, the rows of each set and the base model's
    size, with the user's data files and a local base model as its inputs.
    """
    from rlhf_core.tracking.runs import stage_run

    started = time.perf_counter()
    paths = ProjectPaths(root)
    summary: dict[str, Any] = {"data_source": params.data.source, "model_base": params.model.base}
    run_params = {
        "data": {"source": params.data.source, "files": params.data.files},
        "model": params.model.model_dump(),
        "demo": dataclasses.asdict(params.demo) if params.data.source == "demo" else {},
    }
    label = f"data={params.data.source} model={Path(params.model.base).name}"
    with stage_run(
        STAGE, project_root=root, params=run_params, inputs=_user_inputs(params, paths), label=label
    ) as run:
        if params.data.source == "demo":
            from rlhf_core.data.demo import write_demo

            log.info("generating the demo task into %s", paths.raw_dir)
            summary["demo"] = write_demo(params.demo, paths.raw_dir)
            run.record_output(paths.raw_dir)
        # Folders the retrain flow and `rlhf ingest` use; validate depends on the store.
        paths.preference_store.mkdir(parents=True, exist_ok=True)
        paths.incoming_dir.mkdir(parents=True, exist_ok=True)
        files = data_set_files(params, paths, include_store=False)
        summary["sets"] = {name: [str(p) for p in found] for name, found in files.items()}
        summary["base_model"] = _prepare_base_model(params, files, paths.base_model_dir)
        run.log_metrics(prepare_metrics(summary), step=0)
        run.record_output(paths.base_model_dir)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    metrics_file = paths.metrics_dir / "prepare.json"
    with writing("the prepare metrics", metrics_file):
        paths.metrics_dir.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _user_inputs(params: Params, paths: ProjectPaths) -> dict[str, Path]:
    """The files this stage reads: the user's data files, and the base model when local."""
    inputs: dict[str, Path] = {}
    if params.data.source != "demo":
        for name, listed in params.data.files.items():
            for index, file in enumerate(listed):
                if (paths.root / file).exists():
                    inputs[f"{name}.{index}"] = paths.root / file
    base = Path(params.model.base)
    if params.model.base != "demo" and (paths.root / base).exists():
        inputs["base_model"] = paths.root / base
    return inputs


def prepare_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a prepare summary as MLflow metrics: the demo's counts and known
    ceilings (`demo.<key>`) and `base_model.parameters`."""
    metrics = {
        f"demo.{key}": float(value)
        for key, value in (summary.get("demo") or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    parameters = summary.get("base_model", {}).get("parameters")
    if isinstance(parameters, int):
        metrics["base_model.parameters"] = float(parameters)
    return metrics


def _prepare_base_model(params: Params, files: dict[str, list[Path]], out: Path) -> dict:
    model_params = params.model
    if model_params.base == "demo":
        from rlhf_core.models.building import build_base_model

        by_kind: dict[str, list[Path]] = {}
        for name in TOKENIZER_SETS:
            if name in files:
                by_kind.setdefault(set_kind(name), []).extend(files[name])
        log.info(
            "training a %d-token BPE and building the %r model",
            model_params.tokenizer_vocab_size,
            model_params.tiny_config,
        )
        return build_base_model(
            by_kind,
            out,
            model_params.tiny_config,
            model_params.tokenizer_vocab_size,
            model_params.seed,
        )
    from rlhf_core.models.loading import load_causal_lm, save_model
    from rlhf_core.models.tiny import count_parameters

    log.info("loading base model %s", model_params.base)
    model, tokenizer = load_causal_lm(
        model_params.base, trust_remote_code=model_params.trust_remote_code
    )
    from rlhf_core.models.tokenizer import eos_closes_assistant_turn

    closes = eos_closes_assistant_turn(tokenizer)
    if not closes:
        log.warning(
            "%s: the chat template does not end an assistant turn with the EOS token %r; "
            "completions are trained to end with EOS and generation stops there, so answers "
            "may not end where the template says a turn ends (set the tokenizer's eos_token "
            "to the turn-closing token)",
            model_params.base,
            tokenizer.eos_token,
        )
    with writing("the base model", out):
        save_model(model, tokenizer, out)
    return {
        "out": str(out),
        "source": model_params.base,
        "parameters": count_parameters(model),
        "eos_closes_turn": closes,
    }
