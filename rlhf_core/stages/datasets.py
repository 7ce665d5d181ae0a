"""Which input files make up each data set, for the demo task or for user files."""

from __future__ import annotations

from pathlib import Path

from rlhf_core.config import Params
from rlhf_core.paths import RAW_SETS, ProjectPaths

# Sets whose texts train the demo tokenizer: training data only, never held-out prompts.
TOKENIZER_SETS = ("sft", "preference", "ranked", "prompts")


def data_set_files(
    params: Params, paths: ProjectPaths, include_store: bool = True
) -> dict[str, list[Path]]:
    """set name -> input files; sets with no files are left out.

    The demo writes one canonical JSONL per set under data/raw; with `data.source: files`
    the user lists their files per set in params.yaml (any supported format). With
    `include_store`, the preference store's merged tables join the preference and ranked
    sets (the validate stage, which depends on the store); the prepare stage does not read
    the store: its outputs (the demo tokenizer above all) must not change as rows arrive.
    """
    if params.data.source == "demo":
        files = {name: [paths.raw_file(name)] for name in RAW_SETS}
        resolved = {name: found for name, found in files.items() if found[0].is_file()}
        return _with_store(resolved, paths) if include_store else resolved
    unknown = sorted(set(params.data.files) - set(RAW_SETS))
    if unknown:
        raise ValueError(
            f"params.yaml data.files: unknown set(s) {unknown}; use {sorted(RAW_SETS)}"
        )
    resolved = {}
    for name, listed in params.data.files.items():
        found = [paths.root / p for p in listed]
        missing = [str(p) for p in found if not p.exists()]
        if missing:
            raise FileNotFoundError(f"params.yaml data.files.{name}: not found: {missing}")
        if found:
            resolved[name] = found
    return _with_store(resolved, paths) if include_store else resolved


def _with_store(files: dict[str, list[Path]], paths: ProjectPaths) -> dict[str, list[Path]]:
    """Add the preference store's merged tables (rows ingested with `rlhf ingest`)."""
    from rlhf_core.data.store import TABLES

    for set_name, table in (("preference", TABLES["preference"]), ("ranked", TABLES["ranked"])):
        stored = paths.preference_store / table
        if stored.is_file():
            files.setdefault(set_name, []).append(stored)
    return files


def set_kind(set_name: str) -> str:
    """The validation kind of a named set (e.g. eval_prompts -> prompts)."""
    return RAW_SETS[set_name][1]
