"""Load causal LMs and tokenizers from a local directory, a GGUF file or the hub; save atomically.

Only safetensors weights are loaded: a pickled `pytorch_model.bin` can run arbitrary code when
unpickled, so directories that only have those are refused.
"""

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_core.models.tokenizer import ensure_chat_template, ensure_pad_token

logger = logging.getLogger(__name__)

PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelSource:
    """Where `load_causal_lm` / `load_tokenizer` read from, after looking at the source string."""

    kind: Literal["directory", "gguf", "hub"]
    location: str  # the directory, the GGUF's parent directory, or the hub id
    gguf_file: str | None = None  # the GGUF file name inside `location`


def hub_offline() -> bool:
    """Whether hub access is switched off (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set true)."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUTHY
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_source(source: str | os.PathLike) -> ModelSource:
    """Classify `source` as a local model directory, a `.gguf` file or a hub id.

    Anything that exists on disk, ends in `.gguf`, or looks like a path (absolute, starting with
    `.` or `~`, or with more than one `/`) is treated as local and must exist.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text!r} does not exist.")
        return ModelSource("gguf", str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return ModelSource("directory", str(path))
    if path.exists():
        raise ValueError(
            f"{text!r} is a file; pass a directory written by save_pretrained or a .gguf file."
        )
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"Model directory {text!r} does not exist.")
    return ModelSource("hub", text)


def require_readable_gguf(path: str | os.PathLike) -> None:
    """Read a GGUF file's header, metadata and tensor table with the `gguf` package before
    transformers does: a file with a valid magic and garbage after it (truncated, damaged)
    otherwise fails deep inside transformers as a bare UnicodeDecodeError or struct error
    naming neither the file nor the problem. One ValueError naming the file instead."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as error:  # any failure to parse the file is "not a readable GGUF"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(
            f"{os.fspath(path)} is not a readable GGUF file ({type(error).__name__}: {reason}); "
            "it is truncated or damaged: download or extract it again"
        ) from error


def require_safetensors(directory: str) -> None:
    """Raise unless `directory` holds safetensors weights (refusing pickle-only checkpoints)."""
    files = list(Path(directory).iterdir())
    if any(f.suffix == ".safetensors" for f in files):
        return
    pickled = sorted(f.name for f in files if f.suffix in PICKLED_WEIGHT_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{directory!r} only has pickled weights ({', '.join(pickled)}), which are refused "
            "because unpickling can run arbitrary code; re-save the model with save_pretrained "
            "(safetensors) from a trusted environment."
        )
    raise FileNotFoundError(f"{directory!r} has no *.safetensors weights to load.")


def _hub_unavailable_error(hub_id: str) -> ValueError:
    return ValueError(
        f"Model {hub_id!r} is not available locally and hub access is off (HF_HUB_OFFLINE=1); "
        "pass a local directory or .gguf file, or unset HF_HUB_OFFLINE to download it."
    )


def _from_hub(loader, hub_id: str, **kwargs):
    """Call `loader.from_pretrained` for a hub id, using only the local cache when offline."""
    if hub_offline():
        try:
            return loader.from_pretrained(hub_id, local_files_only=True, **kwargs)
        except OSError as err:
            raise _hub_unavailable_error(hub_id) from err
    try:
        return loader.from_pretrained(hub_id, **kwargs)
    except OSError as err:
        raise ValueError(f"Could not load {hub_id!r} from the hub: {err}") from err


def load_tokenizer(
    source: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a directory, a `.gguf` file or a hub id (see `load_causal_lm`).

    A missing pad token becomes EOS (`ensure_pad_token`) and a missing chat template becomes
    `DEFAULT_CHAT_TEMPLATE` (`ensure_chat_template`). `revision` only applies to hub ids.
    """
    return _load_tokenizer(resolve_source(source), trust_remote_code, revision)


def _load_tokenizer(
    resolved: ModelSource, trust_remote_code: bool, revision: str | None
) -> PreTrainedTokenizerBase:
    if resolved.kind == "gguf":
        require_readable_gguf(Path(resolved.location) / resolved.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.location, gguf_file=resolved.gguf_file, trust_remote_code=trust_remote_code
        )
    elif resolved.kind == "directory":
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                resolved.location, trust_remote_code=trust_remote_code, local_files_only=True
            )
        except OSError as err:
            raise ValueError(
                f"Could not load a tokenizer from {resolved.location!r}: {err}"
            ) from err
    else:
        tokenizer = _from_hub(
            AutoTokenizer, resolved.location, trust_remote_code=trust_remote_code, revision=revision
        )
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer)
    return tokenizer


def detach_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Make a model loaded from GGUF saveable: its weights are already dequantized to plain
    tensors, but transformers keeps a GGUF quantizer on it that refuses `save_pretrained`."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_causal_lm(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` from a local directory, a `.gguf` file or a hub id.

    - directory: written by `save_pretrained`; must contain `*.safetensors` (pickle-only
      directories are refused).
    - `.gguf` file: loaded with transformers' GGUF reader, dequantized to `dtype`, and made
      saveable again (`detach_gguf_quantizer`).
    - hub id: downloaded only when hub access is on; with `HF_HUB_OFFLINE=1` only the local
      cache is tried, and a clear ValueError says when the model is not there.

    `trust_remote_code` is passed to transformers unchanged (default False). `revision` only
    applies to hub ids. The tokenizer gets a pad token and chat template if it lacks them, and
    the model's missing `pad_token_id` is filled from it. The model's train/eval mode is left as
    transformers returns it (eval); set it yourself.
    """
    resolved = resolve_source(source)
    if resolved.kind == "directory":
        require_safetensors(resolved.location)
    tokenizer = _load_tokenizer(resolved, trust_remote_code, revision)
    common = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if resolved.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, gguf_file=resolved.gguf_file, **common
        )
        detach_gguf_quantizer(model)
    elif resolved.kind == "directory":
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, use_safetensors=True, local_files_only=True, **common
        )
    else:
        model = _from_hub(
            AutoModelForCausalLM,
            resolved.location,
            use_safetensors=True,
            revision=revision,
            **common,
        )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory next to `path`; on success it replaces `path`.

    Readers see either the old directory or the complete new one, never a half-written one
    (apart from a moment between two renames when `path` is missing). On error the staging
    directory is removed and `path` is left as it was.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot save to {str(target)!r}: it is a file, not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace_directory(staging, target)


def _replace_directory(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`, moving an existing `target` aside first."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    path: str | os.PathLike,
) -> Path:
    """Save `model` (safetensors) and `tokenizer` to the directory `path`, atomically.

    An existing directory at `path` is replaced as a whole. Returns the path written.
    """
    with atomic_directory(path) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if not any(staging.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no *.safetensors file for {path!r}.")
    return Path(path).expanduser()
