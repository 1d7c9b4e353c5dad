"""Atomic file writes. Everything the workbench saves goes through here, so a crash leaves the old file or the
new one, never half of one: write to a temporary file beside the target, fsync, rename over it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is fsynced and renamed over ``path``,
    on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=1))


def atomic_save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous) as a safetensors file atomically."""
    from safetensors.torch import save_file

    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically; read it back with ``torch.load(path, weights_only=True)``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


CHECKSUMS_FILE = "checksums.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | Path, pattern: str = "*.safetensors") -> dict[str, str]:
    """Record the sha256 of every file matching ``pattern`` in ``directory`` in ``checksums.json`` (atomic)."""
    directory = Path(directory)
    sums = {p.name: sha256_file(p) for p in sorted(directory.glob(pattern)) if p.is_file()}
    atomic_write_json(directory / CHECKSUMS_FILE, {"sha256": sums})
    return sums


def verify_checksums(directory: str | Path) -> list[str]:
    """Names of the files in ``directory`` whose bytes differ from ``checksums.json`` (missing files count).

    A directory without ``checksums.json`` (saved by another tool) verifies as ``[]``.
    """
    directory = Path(directory)
    record = directory / CHECKSUMS_FILE
    if not record.is_file():
        return []
    try:
        sums = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        return [CHECKSUMS_FILE]
    return [
        name for name, expected in sums.items()
        if not (directory / name).is_file() or sha256_file(directory / name) != expected
    ]  # fmt: skip
