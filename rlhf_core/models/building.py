"""Build the from-scratch base model: a BPE tokenizer trained on data files + a small Llama."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_core.data.readers import read_records
from rlhf_core.data.texts import corpus_from_rows
from rlhf_core.models.loading import save_model
from rlhf_core.models.tiny import build_tiny_llama, count_parameters
from rlhf_core.models.tokenizer import train_bpe_tokenizer


def corpus_texts(files_by_kind: Mapping[str, Sequence[str | Path]]) -> list[str]:
    """All texts of data files, read as their kind (the readers' adapters normalise shapes)."""
    texts: list[str] = []
    for kind, files in files_by_kind.items():
        if files:
            frame = read_records(list(files), kind).frame
            texts.extend(corpus_from_rows(frame.to_dict(orient="records")))
    if not texts:
        raise ValueError(f"no text found in {dict(files_by_kind)} to train a tokenizer on")
    return texts


def build_base_model(
    files_by_kind: Mapping[str, Sequence[str | Path]],
    out_dir: str | Path,
    config_name: str = "demo",
    vocab_size: int = 2048,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the tokenizer, build the model, save both (safetensors) and return a summary."""
    texts = corpus_texts(files_by_kind)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_llama(config_name, tokenizer, seed=seed)
    save_model(model, tokenizer, out_dir)
    return {
        "out": str(out_dir),
        "config": config_name,
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "corpus_texts": len(texts),
    }
