"""Stage `prepare`: the raw data sets and the base model, at fixed paths.

- data.source 'demo': generate the demo task into data/raw (deterministic by demo.seed).
- model.base 'demo': train a BPE tokenizer on the training sets and build a small Llama;
  otherwise load the named model (local folder, .gguf file, or hub id when online).
The base model is saved to artifacts/base as safetensors, so later stages read one local copy.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rlhf_core.config import Params
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.datasets import TOKENIZER_SETS, data_set_files, set_kind

log = logging.getLogger(__name__)


def run_prepare(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Write the raw sets (demo) and the base model; return and save a summary."""
    started = time.perf_counter()
    paths = ProjectPaths(root)
    summary: dict[str, Any] = {"data_source": params.data.source, "model_base": params.model.base}
    if params.data.source == "demo":
        from rlhf_core.data.demo import write_demo

        log.info("generating the demo task into %s", paths.raw_dir)
        summary["demo"] = write_demo(params.demo, paths.raw_dir)
    # Folders the retrain flow and `rlhf ingest` use; validate depends on the store in dvc.yaml.
    paths.preference_store.mkdir(parents=True, exist_ok=True)
    paths.incoming_dir.mkdir(parents=True, exist_ok=True)
    files = data_set_files(params, paths)
    summary["sets"] = {name: [str(p) for p in found] for name, found in files.items()}
    summary["base_model"] = _prepare_base_model(params, files, paths.base_model_dir)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    paths.metrics_dir.mkdir(parents=True, exist_ok=True)
    (paths.metrics_dir / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
    save_model(model, tokenizer, out)
    return {"out": str(out), "source": model_params.base, "parameters": count_parameters(model)}
