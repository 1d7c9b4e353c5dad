"""Atomic file writes. Everything the workbench saves goes through here, so a crash leaves the old file or the
new one, never half of one: write to a temporary file beside the target, fsync, rename over it.

A crash can leave the temporary file behind: its name is ``.NAME.XXXXXXXX.tmp`` (``TEMP_GLOB``), and
:func:`remove_temp_files` sweeps them. Safetensors files are written byte-for-byte deterministically
(:func:`safetensors_bytes`: sorted JSON header), so identical tensors give identical files and checksums.
"""

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

from workbench.faults import crash_point

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
TEMP_GLOB = f"{TEMP_PREFIX}*{TEMP_SUFFIX}"  # what atomic_path creates (and a crash may leave behind)


@contextmanager
def atomic_path(path: str | Path, boundary: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is fsynced and renamed over ``path``,
    on an exception it is removed and ``path`` is left as it was.

    ``boundary`` names the fault-injection points ``<boundary>.before_rename`` (temporary file complete and
    fsynced) and ``<boundary>.after_rename`` (see :mod:`workbench.faults`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if boundary:
            crash_point(f"{boundary}.before_rename")
        os.replace(tmp, path)
        _fsync_directory(path.parent)
        if boundary:
            crash_point(f"{boundary}.after_rename")
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file directly in ``directory``, then the directory itself: a folder written whole before it is
    renamed into place (a zoo checkpoint step)."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(directory)


def temp_files(directory: str | Path) -> list[Path]:
    """The temporary files :func:`atomic_path` left in ``directory`` (a crash between write and rename)."""
    return sorted(p for p in Path(directory).glob(TEMP_GLOB) if p.is_file())


def remove_temp_files(directory: str | Path) -> int:
    """Delete the temporary files a crash left in ``directory``; returns how many. Call it only while no other
    process is writing there."""
    found = temp_files(directory)
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def atomic_write_bytes(path: str | Path, data: bytes, boundary: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``boundary``: fault-injection point names, see :func:`atomic_path`)."""
    with atomic_path(path, boundary) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=1))


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _safetensors_parts(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[memoryview]]:
    """(length prefix + JSON header, each tensor's raw bytes as a view in file order) of the safetensors file of
    ``tensors``: no tensor's bytes are copied."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("safetensors metadata must map str to str")
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    for name, tensor in cpu.items():
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named '__metadata__' in a safetensors file")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}; storable: {list(SAFETENSORS_DTYPES)}")
    header: dict[str, Any] = {}
    blobs: list[memoryview] = []
    offset = 0
    for name in sorted(cpu, key=lambda n: (-cpu[n].element_size(), n)):  # widest first: every tensor aligned
        tensor = cpu[name]
        blob = tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else memoryview(b"")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + blob.nbytes],
        }
        blobs.append(blob)
        offset += blob.nbytes
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, blobs


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors file of ``tensors`` (any shapes, 0-d included), deterministic byte for byte.

    Layout: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__":
    {...}}`` with sorted keys, padded with spaces to a multiple of 8, then each tensor's raw little-endian bytes,
    widest dtype first and by name within a width (so each tensor is aligned to its element size). Readable by
    ``safetensors.safe_open`` / ``safetensors.torch.load_file``.
    """
    header, blobs = _safetensors_parts(tensors, metadata)
    return header + b"".join(blobs)


def atomic_save_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    boundary: str | None = None,
) -> str:
    """Write ``tensors`` as a safetensors file atomically, with the deterministic bytes of :func:`safetensors_bytes`,
    streamed from the tensors' memory (no copy of the file in memory); returns the file's sha256 (hex)."""
    header, blobs = _safetensors_parts(tensors, metadata)
    digest = hashlib.sha256(header)
    with atomic_path(path, boundary) as tmp, tmp.open("wb") as out:
        out.write(header)
        for blob in blobs:
            digest.update(blob)
            out.write(blob)
    return digest.hexdigest()


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
        name
        for name, expected in sums.items()
        if not (directory / name).is_file() or sha256_file(directory / name) != expected
    ]
