"""Atomic training checkpoints: weights, optimizer, scheduler, RNG states and data position.

A checkpoint is a directory `step-<N>` written under a temporary name and renamed into place,
so a run killed mid-write never leaves a half checkpoint that looks complete. Its files are
flushed to disk, then `manifest.json` (each file's size and sha256) is written last: a
checkpoint whose files no longer match it (truncated, corrupted, half copied) is skipped with
a warning naming it and the file, and the run resumes from the newest one that is whole. The
last K are kept. Weights are safetensors; the optimizer state is read back with
`torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects. A checkpoint
records the fingerprint of the run that wrote it (params, inputs and the stage's code), and is
ignored by a different run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rlhf_core.files import file_sha256, writing

log = logging.getLogger(__name__)

PREFIX = "step-"


@dataclass(frozen=True)
class TrainerState:
    """Where the loop is: optimizer steps done, and the fingerprint of the run."""

    global_step: int
    fingerprint: str
    extra: dict[str, Any]


def capture_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, numpy and torch RNG states (JSON part, tensor part)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    json_part = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) for x in np_state[2:]]],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    return json_part, tensors


def restore_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng_state`."""
    version, state, gauss = json_part["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


class CheckpointManager:
    """Saves and finds checkpoints of one run in `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 2, fingerprint: str = "") -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.fingerprint = fingerprint

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()
        ]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def latest(self) -> Path | None:
        """The newest whole checkpoint (its manifest verified) written by a run with the same
        fingerprint, if any; every newer one skipped is named in a warning with the reason."""
        for path in reversed(self.checkpoints()):
            fingerprint = _fingerprint_of(path)  # cheap: before hashing another run's files
            if fingerprint is not None and fingerprint != self.fingerprint:
                log.warning(
                    "ignoring checkpoint %s: it belongs to a run with other params, inputs or code",
                    path,
                )
                continue
            problem = verify_checkpoint(path)  # an unreadable state file fails here too
            if problem is not None:
                log.warning("skipping checkpoint %s: %s", path, problem)
                continue
            return path
        return None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and prune old ones. A failed write (a full
        disk: torch.save's "unexpected pos", safetensors' "os error 28") leaves no partial
        checkpoint and is one `CannotWriteError` naming the checkpoint."""
        final = self.directory / f"{PREFIX}{step:08d}"
        with writing(f"checkpoint step {step}", final):
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.directory, prefix=".writing-"))
            self._write(staging, final, step, model, optimizer, scheduler, extra)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old)
        return final

    def _write(
        self,
        staging: Path,
        final: Path,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        extra: dict[str, Any] | None,
    ) -> None:
        """Fill `staging` (manifest last) and rename it to `final`; removed on failure, after
        the error is named (a full disk is only seen as full before the files are removed)."""
        try:
            with writing(f"checkpoint step {step}", final):
                save_model(model, str(staging / "model.safetensors"))
                with open(staging / "optimizer.pt", "wb") as handle:  # closed on failure too
                    torch.save(optimizer.state_dict(), handle)
                rng_json, rng_tensors = capture_rng_state()
                save_file(rng_tensors, str(staging / "rng.safetensors"))
                state = {
                    "global_step": step,
                    "fingerprint": self.fingerprint,
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_json,
                    "extra": extra or {},
                }
                (staging / "trainer_state.json").write_text(json.dumps(state))
                _write_manifest(staging)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> TrainerState:
        """Restore everything `save` wrote into the given objects; return the loop state."""
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            load_model(model, str(path / "model.safetensors"))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(state["scheduler"])
            restore_rng_state(state["rng"], load_file(str(path / "rng.safetensors")))
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            # Its manifest verified, so the files are as written: a different model or
            # library version. The objects may be half restored; training must not go on.
            raise RuntimeError(
                f"checkpoint {path} does not load into this run ({error}); move it away to "
                "start the stage from its beginning"
            ) from error
        return TrainerState(state["global_step"], state["fingerprint"], state["extra"])

    def clear(self) -> None:
        """Remove every checkpoint (after a run completed and saved its final model)."""
        shutil.rmtree(self.directory, ignore_errors=True)


MANIFEST = "manifest.json"


def _fingerprint_of(path: Path) -> str | None:
    """The fingerprint a checkpoint's trainer_state.json records; None when unreadable."""
    try:
        return json.loads((path / "trainer_state.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(directory: Path) -> None:
    """Flush every file of `directory` to disk, then write the manifest of their sizes and
    sha256s (flushed too): present only once everything it lists is on disk."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    with open(directory / MANIFEST, "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def verify_checkpoint(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (a sentence naming the file), or None when
    every file its manifest lists is there with its size and sha256."""
    manifest_path = path / MANIFEST
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written before manifests, or not finished)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is unreadable ({error})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None
