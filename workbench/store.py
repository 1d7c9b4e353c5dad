"""ActivationStore: activations streamed to sharded safetensors files with a JSON manifest.

Layout of a store directory::

    manifest.json          identity (model, checkpoint, dataset, hooks, dtype), shards with row counts and sha256,
                           n_rows, sequences_done (for resuming a capture), complete flag, workbench version
    shard-00000.safetensors  one tensor per hook [rows, ...] plus token_ids, sequence, position [rows]

Shards are written to a temporary file, fsynced and renamed; the manifest is rewritten the same way only after
the shard is in place, so a crash leaves either the old or the new state, never a half shard that reads as
complete: at worst temporary files and an orphan shard, which a resume deletes (a directory holding only those
and no manifest is a capture killed while writing its first manifest, and starts afresh). Shard bytes are
deterministic, so identical captures have identical files and checksums. Reads map shard files into memory (no
copy) and verify each shard's checksum before first use; a capture rerun on a finished store verifies every shard.

Fault-injection points (:mod:`workbench.faults`): ``store.first_manifest.before_rename|after_rename``,
``store.shard.before_rename|after_rename``, ``store.manifest.before_rename|after_rename`` (every later manifest
rewrite: after each shard and at finalize).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench import __version__
from workbench.fileio import (
    TEMP_GLOB,
    atomic_save_tensors,
    atomic_write_bytes,
    remove_temp_files,
    sha256_file,
)
from workbench.heap import release_free_heap

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
META_COLUMNS = ("token_ids", "sequence", "position")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_NAME = re.compile(r"^shard-\d{5,}\.safetensors$")
SHARD_GLOB = "shard-*.safetensors"
# A shard is written once its buffered rows reach shard_rows or this many bytes (all hooks together), so a capture's
# memory is bounded by a few shards' bytes whatever the width, the number of hooks or the size of the dataset.
SHARD_BYTES = 64 * 2**20


class StoreError(RuntimeError):
    """A store cannot be created, resumed or read; the message names the path and the fix."""


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a copy-on-write memory map: no copy, and edits never reach the file."""
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        np_dtype = _DTYPES[info["dtype"]]
        count = (end - start) // np.dtype(np_dtype).itemsize
        array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + header_len + start, shape=(count,))
        tensor = (
            torch.from_numpy(array).reshape(info["shape"])
            if count
            else torch.empty(info["shape"], dtype=torch.from_numpy(np.empty(0, np_dtype)).dtype)
        )
        if info["dtype"] == "BF16":
            tensor = tensor.view(torch.bfloat16)
        out[name] = tensor
    return out


def _crash_leftover(path: Path) -> bool:
    """A file a killed capture can leave before its first manifest exists: a temporary file or a shard."""
    return path.is_file() and (path.match(TEMP_GLOB) or bool(SHARD_NAME.match(path.name)))


_MANIFEST_KEYS: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "model": (str,),
    "dataset": (str,),
    "hooks": (list,),
    "dtype": (str,),
    "shard_rows": (int,),
    "shards": (list,),
    "n_rows": (int,),
    "sequences_done": (int,),
    "complete": (bool,),
    "shapes": (dict,),
    "extra": (dict,),
}


def _check_manifest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest with missing or mistyped keys, shard files outside the store, or counts that disagree."""

    def bad(what: str) -> StoreError:
        return StoreError(f"{manifest_path} is damaged: {what}; recapture the store (overwrite=True)")

    for key, types in _MANIFEST_KEYS.items():
        if key not in manifest:
            raise bad(f"key {key!r} is missing")
        value = manifest[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise bad(f"key {key!r} is {value!r}, not {' or '.join(t.__name__ for t in types)}")
    if "checkpoint" not in manifest:
        raise bad("key 'checkpoint' is missing")
    if manifest["checkpoint"] is not None and (
        not isinstance(manifest["checkpoint"], int) or isinstance(manifest["checkpoint"], bool)
    ):
        raise bad(f"key 'checkpoint' is {manifest['checkpoint']!r}, not an int or null")
    if manifest["dtype"] not in _TORCH_DTYPES:
        raise bad(f"key 'dtype' is {manifest['dtype']!r}, not one of {', '.join(_TORCH_DTYPES)}")
    if not all(isinstance(h, str) for h in manifest["hooks"]):
        raise bad("key 'hooks' must list hook names")
    total = 0
    for index, shard in enumerate(manifest["shards"]):
        where = f"shards[{index}]"
        if not isinstance(shard, dict):
            raise bad(f"{where} is {shard!r}, not an object")
        for key, types in (("file", (str,)), ("rows", (int,)), ("sha256", (str,))):
            if key not in shard:
                raise bad(f"key {where}.{key} is missing")
            if not isinstance(shard[key], types) or isinstance(shard[key], bool):
                raise bad(f"key {where}.{key} is {shard[key]!r}, not {types[0].__name__}")
        if not SHARD_NAME.match(shard["file"]):
            raise bad(
                f"{where}.file is {shard['file']!r}, not a shard file name inside the store (shard-NNNNN.safetensors)"
            )
        if shard["rows"] < 1:
            raise bad(f"{where}.rows is {shard['rows']}, not a positive row count")
        total += shard["rows"]
    if manifest["n_rows"] != total:
        raise bad(f"n_rows is {manifest['n_rows']} but the shards hold {total} rows")
    if len({s["file"] for s in manifest["shards"]}) != len(manifest["shards"]):
        raise bad("a shard file is listed twice")
    if manifest["sequences_done"] < 0 or manifest["shard_rows"] < 1:
        raise bad(
            f"sequences_done={manifest['sequences_done']}, shard_rows={manifest['shard_rows']} out of range"
        )


class ActivationStore:
    """A directory of activation shards; build with :meth:`create`, read with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], verify: str = "lazy") -> None:
        self.path = path
        self.manifest = manifest
        self._verify = verify
        self._verified: set[str] = set()
        self._mapped: dict[str, dict[str, torch.Tensor]] = {}
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._buffer_rows = 0
        self._buffer_bytes = 0
        self.shard_bytes = SHARD_BYTES  # a shard is written once its rows reach shard_rows or this many bytes
        self._buffer_sequences_done = manifest.get("sequences_done", 0)
        self._writer: ThreadPoolExecutor | None = None  # one thread: shards written behind the next forward
        self._in_flight: Future[None] | None = None
        self._in_flight_rows = 0
        self.rows_at_open = int(manifest.get("n_rows", 0))  # rows on disk when this object was made
        self.rows_written = 0  # rows this object wrote to shards since (what "wrote N rows" reports)

    # ---------------------------------------------------------------- creating
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        model: str,
        hooks: Sequence[str],
        dataset: str,
        checkpoint: int | None = None,
        dtype: torch.dtype = torch.float32,
        shard_rows: int = 65536,
        resume: bool = True,
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> ActivationStore:
        """Create a store, or resume one at ``path`` written with the same identity.

        A store at ``path`` with a different model, checkpoint, dataset, hooks or dtype raises StoreError
        (choose another path or pass ``overwrite=True``).
        """
        path = Path(path)
        dtype_name = str(dtype).removeprefix("torch.")
        if dtype_name not in _TORCH_DTYPES:
            raise StoreError(f"dtype {dtype} is not storable; use one of {', '.join(_TORCH_DTYPES)}")
        identity = {
            "model": model,
            "checkpoint": checkpoint,
            "dataset": dataset,
            "hooks": list(hooks),
            "dtype": dtype_name,
        }
        manifest_path = path / MANIFEST
        if manifest_path.exists() and not overwrite:
            manifest = cls._read_manifest(path)
            differs = {k: (manifest.get(k), v) for k, v in identity.items() if manifest.get(k) != v}
            if differs:
                detail = "; ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in differs.items())
                raise StoreError(
                    f"{path} already holds a different store ({detail}); write to a new path, or pass "
                    "overwrite=True to replace it"
                )
            if not resume:
                raise StoreError(
                    f"{path} already exists; pass resume=True to continue it or overwrite=True to replace it"
                )
            store = cls(path, manifest)
            store._remove_orphans()
            return store
        if path.exists() and overwrite:
            for child in path.glob(SHARD_GLOB):
                child.unlink()
            (path / MANIFEST).unlink(missing_ok=True)
            remove_temp_files(path)
        elif path.is_dir():
            others = [c.name for c in path.iterdir() if not _crash_leftover(c)]
            if others:
                raise StoreError(
                    f"{path} exists, is not empty ({', '.join(sorted(others)[:3])}) and holds no store manifest; "
                    "choose an empty or new directory"
                )
            for child in path.glob(SHARD_GLOB):  # a capture killed before its first manifest was in place
                child.unlink()
            remove_temp_files(path)
        elif path.exists():
            raise StoreError(f"{path} is a file, not a store directory; choose a new directory")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            **identity,
            "workbench_version": __version__,
            "shard_rows": shard_rows,
            "shards": [],
            "n_rows": 0,
            "sequences_done": 0,
            "complete": False,
            "shapes": {},
            "extra": extra or {},
        }
        store = cls(path, manifest)
        store._write_manifest("store.first_manifest")
        return store

    def append(
        self,
        activations: dict[str, torch.Tensor],
        token_ids: torch.Tensor,
        sequence: torch.Tensor | None = None,
        position: torch.Tensor | None = None,
        sequences_done: int | None = None,
    ) -> None:
        """Add rows: ``activations[hook]`` [rows, ...] for every hook, ``token_ids``/``sequence``/``position`` [rows].

        Rows are buffered and written as a shard once ``shard_rows`` are pending; ``sequences_done`` records how
        many input sequences are fully contained in the rows appended so far (for resuming).
        """
        if self.manifest["complete"]:
            raise StoreError(f"{self.path} is finalised; create a new store to add rows")
        missing = set(self.hooks) - set(activations)
        if missing or set(activations) - set(self.hooks):
            raise StoreError(f"append needs exactly the hooks {self.hooks}; got {sorted(activations)}")
        rows = len(token_ids)
        dtype = _TORCH_DTYPES[self.manifest["dtype"]]
        chunk: dict[str, torch.Tensor] = {}
        for hook, value in activations.items():
            if value.shape[0] != rows:
                raise StoreError(f"{hook} has {value.shape[0]} rows but token_ids has {rows}")
            # A sum is finite iff every value is (NaN and inf propagate), barring an overflow of the sum itself,
            # which the exact elementwise test below then clears: one reduction instead of a bool tensor per batch.
            if not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).flatten(1).any(1).nonzero()[0, 0])
                raise StoreError(
                    f"{hook} holds NaN/inf at appended row {bad}; refusing to store non-finite activations"
                )
            shape = list(value.shape[1:])
            known = self.manifest["shapes"].setdefault(hook, shape)
            if known != shape:
                raise StoreError(f"{hook} rows have shape {shape}, but the store holds {known}")
            chunk[hook] = value.detach().to("cpu", dtype).contiguous()
        chunk["token_ids"] = token_ids.detach().to("cpu", torch.int64)
        chunk["sequence"] = (sequence if sequence is not None else torch.full((rows,), -1)).to(
            "cpu", torch.int64
        )
        chunk["position"] = (position if position is not None else torch.full((rows,), -1)).to(
            "cpu", torch.int64
        )
        self._buffer.append(chunk)
        self._buffer_rows += rows
        self._buffer_bytes += sum(t.numel() * t.element_size() for t in chunk.values())
        if sequences_done is not None:
            self._buffer_sequences_done = sequences_done
        if self._buffer_rows >= self.manifest["shard_rows"] or self._buffer_bytes >= self.shard_bytes:
            self._write_behind()

    def _write_behind(self) -> None:
        """Hand the buffered rows to the writer thread as one shard and return at once, so the next batch's forward
        overlaps the shard's concatenation, checksum, write and fsync. At most one shard is in flight: this waits
        for the previous one first (and re-raises its error), which bounds memory by one buffer plus one shard."""
        self._wait_for_writer()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        buffer, rows, done = self._take_buffer()
        self._in_flight_rows = rows
        self._in_flight = self._writer.submit(self._write_shard, buffer, rows, done)

    def _wait_for_writer(self) -> None:
        """Block until the shard in flight (if any) is on disk and in the manifest; re-raise its error."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            try:
                in_flight.result()
            finally:
                self._in_flight_rows = 0

    def _take_buffer(self) -> tuple[list[dict[str, torch.Tensor]], int, int]:
        buffer, rows, done = self._buffer, self._buffer_rows, self._buffer_sequences_done
        self._buffer, self._buffer_rows, self._buffer_bytes = [], 0, 0
        return buffer, rows, done

    def flush(self) -> None:
        """Write the buffered rows as one shard (atomically) now, then record it in the manifest; returns once
        every appended row is on disk."""
        self._wait_for_writer()
        if self._buffer:
            self._write_shard(*self._take_buffer())
        self._shutdown_writer()

    def _shutdown_writer(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _write_shard(self, buffer: list[dict[str, torch.Tensor]], rows: int, sequences_done: int) -> None:
        """One shard from ``buffer`` (appended chunks, each {column: [rows_i, ...]}) written atomically, then the
        manifest rewritten to include it: the manifest never names a shard that is not fully on disk."""
        tensors = {k: torch.cat([c[k] for c in buffer]) for k in buffer[0]}
        buffer.clear()  # the chunks go as soon as they are joined: at most two copies of a shard at any time
        index = len(self.manifest["shards"])
        name = f"shard-{index:05d}.safetensors"
        sha256 = atomic_save_tensors(self.path / name, tensors, {"shard": str(index)}, boundary="store.shard")
        del tensors
        self.manifest["shards"].append({"file": name, "rows": rows, "sha256": sha256})
        self.manifest["n_rows"] += rows
        self.rows_written += rows
        self.manifest["sequences_done"] = sequences_done
        self._write_manifest()
        release_free_heap()  # the shard's freed buffers back to the OS, not kept at the heap's high point

    def finalize(self) -> ActivationStore:
        """Flush and mark the store complete; only complete stores open for reading by default."""
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()
        return self

    def _write_manifest(self, boundary: str = "store.manifest") -> None:
        atomic_write_bytes(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode(), boundary)

    def _remove_orphans(self) -> None:
        """Delete shard files a crash left behind without a manifest entry, and temporary files."""
        known = {s["file"] for s in self.manifest["shards"]}
        for child in self.path.glob(SHARD_GLOB):
            if child.name not in known:
                child.unlink()
        remove_temp_files(self.path)

    def verify(self) -> None:
        """Check every shard against its sha256 now, whatever ``verify`` mode it was opened with."""
        for shard in self.manifest["shards"]:
            self._check(shard, force=True)

    # ---------------------------------------------------------------- reading
    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise StoreError(f"{path} is not an activation store (no {MANIFEST}); capture into it first")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{manifest_path} is corrupt ({err}); recapture the store") from err
        if not isinstance(manifest, dict):
            raise StoreError(f"{manifest_path} is corrupt (not a JSON object); recapture the store")
        version = manifest.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise StoreError(
                f"{path} was written by a newer workbench (format {version}); upgrade the workbench"
            )
        _check_manifest(manifest_path, manifest)
        return manifest

    @classmethod
    def open(
        cls, path: str | Path, *, verify: str = "lazy", allow_incomplete: bool = False
    ) -> ActivationStore:
        """Open a store for reading. ``verify``: "full" checks every shard's sha256 now, "lazy" each shard on first
        read, "none" never. An incomplete (interrupted) store raises unless ``allow_incomplete``."""
        path = Path(path)
        manifest = cls._read_manifest(path)
        if not manifest["complete"] and not allow_incomplete:
            raise StoreError(
                f"{path} is incomplete ({manifest['n_rows']} rows, {manifest['sequences_done']} sequences written before "
                "it stopped); resume the capture (same command) or open with allow_incomplete=True"
            )
        if verify not in ("full", "lazy", "none"):
            raise ValueError(f"verify={verify!r}; use 'full', 'lazy' or 'none'")
        store = cls(path, manifest, verify)
        if verify == "full":
            for shard in manifest["shards"]:
                store._check(shard)
        return store

    def _check(self, shard: dict[str, Any], force: bool = False) -> None:
        if not force and (shard["file"] in self._verified or self._verify == "none"):
            return
        file = self.path / shard["file"]
        if not file.exists():
            raise StoreError(f"shard {file} is missing; the store is damaged, recapture it (overwrite=True)")
        if sha256_file(file) != shard["sha256"]:
            raise StoreError(
                f"shard {file} fails its checksum (truncated or corrupted); recapture the store (overwrite=True)"
            )
        self._verified.add(shard["file"])

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        shard = self.manifest["shards"][index]
        if shard["file"] not in self._mapped:
            self._check(shard)
            try:
                self._mapped[shard["file"]] = _mmap_safetensors(self.path / shard["file"])
            except (OSError, ValueError, KeyError, struct.error) as err:
                raise StoreError(
                    f"shard {self.path / shard['file']} cannot be read ({err}); recapture the store"
                ) from err
        return self._mapped[shard["file"]]

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def pending_rows(self) -> int:
        """Rows appended but not yet recorded in a shard (buffered, or being written behind; ``flush`` writes
        them)."""
        return self._buffer_rows + self._in_flight_rows

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def _column(self, name: str) -> torch.Tensor:
        if name not in self.hooks and name not in META_COLUMNS:
            raise StoreError(f"{name!r} is not in {self.path}; stored hooks: {', '.join(self.hooks)}")
        parts = [self._shard(i)[name] for i in range(len(self.manifest["shards"]))]
        if not parts:
            shape = self.manifest["shapes"].get(name, [])
            return torch.empty(0, *shape)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read(self, hook: str) -> torch.Tensor:
        """All rows of ``hook`` [n_rows, ...] (a memory map for a single shard, else a concatenated copy)."""
        return self._column(hook)

    def token_ids(self) -> torch.Tensor:
        """Token id of each row [n_rows]."""
        return self._column("token_ids")

    def locations(self) -> torch.Tensor:
        """(sequence index, position) of each row [n_rows, 2]."""
        return torch.stack([self._column("sequence"), self._column("position")], dim=1)

    def iter_batches(
        self,
        hook: str | Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        shards: Sequence[int] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches {hook: [batch, ...], "token_ids": [batch], "location": [batch, 2] (sequence, position)} over all
        rows once (or the rows of the given shard indices only: a rank's disjoint share), in a seeded order across
        shards.

        Memory stays bounded by one batch plus the mapped shard pages in use.
        """
        hooks = [hook] if isinstance(hook, str) else list(hook)
        for name in hooks:
            self._column_check(name)
        sizes = [s["rows"] for s in self.manifest["shards"]]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if shards is None:
            rows_read = np.arange(self.n_rows)
        else:
            bad = [i for i in shards if not 0 <= i < len(sizes)]
            if bad:
                raise StoreError(f"{self.path} has shards 0..{len(sizes) - 1}, not {bad}")
            rows_read = np.concatenate(
                [np.arange(starts[i], starts[i + 1]) for i in shards] or [np.zeros(0, int)]
            )
        order = np.random.default_rng(seed).permutation(rows_read) if shuffle else rows_read
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            if drop_last and len(rows) < batch_size:
                break
            shard_of = np.searchsorted(starts, rows, side="right") - 1
            batch: dict[str, list[torch.Tensor]] = {
                name: [] for name in [*hooks, "token_ids", "sequence", "position"]
            }
            slots = []
            for shard_index in np.unique(shard_of):
                picked = rows[shard_of == shard_index] - starts[shard_index]
                tensors = self._shard(int(shard_index))
                index = torch.from_numpy(picked)
                for name in batch:
                    batch[name].append(tensors[name][index])
                slots.append(np.nonzero(shard_of == shard_index)[0])
            restore = torch.from_numpy(np.argsort(np.concatenate(slots)))
            out = {name: torch.cat(parts)[restore] for name, parts in batch.items()}
            out["location"] = torch.stack([out.pop("sequence"), out.pop("position")], dim=1)
            yield out

    def _column_check(self, name: str) -> None:
        if name not in self.hooks:
            raise StoreError(f"{name!r} is not in {self.path}; stored hooks: {', '.join(self.hooks)}")

    def __repr__(self) -> str:
        state = "complete" if self.manifest["complete"] else "incomplete"
        return f"ActivationStore({str(self.path)!r}, {self.n_rows} rows, hooks={self.hooks}, {state})"


class StoreUnion:
    """Several finalised stores of the same hooks read in order as one (a distributed run's per-rank stores): rows
    store after store, sequence indices offset past the previous stores' so every sequence stays distinct. Reads
    like an ActivationStore for in-order passes: ``hooks``, ``n_rows``, ``token_ids()``, ``locations()``,
    ``iter_batches(..., shuffle=False)``."""

    def __init__(self, stores: Sequence[ActivationStore]) -> None:
        if not stores:
            raise StoreError("a union needs at least one store")
        first = stores[0]
        for other in stores[1:]:
            if other.hooks != first.hooks or other.manifest["shapes"] != first.manifest["shapes"]:
                raise StoreError(
                    f"{other.path} holds {other.hooks} {other.manifest['shapes']}, but {first.path} holds "
                    f"{first.hooks} {first.manifest['shapes']}: a union reads stores of the same hooks and shapes"
                )
        self.stores = list(stores)
        offsets, next_sequence = [], 0
        for store in self.stores:
            offsets.append(next_sequence)
            sequences = store.locations()[:, 0]
            next_sequence += int(sequences.max()) + 1 if len(sequences) else 0
        self._sequence_offsets = offsets

    @property
    def hooks(self) -> list[str]:
        return self.stores[0].hooks

    @property
    def n_rows(self) -> int:
        return sum(store.n_rows for store in self.stores)

    def token_ids(self) -> torch.Tensor:
        """Token id of each row [n_rows]."""
        return torch.cat([store.token_ids() for store in self.stores])

    def locations(self) -> torch.Tensor:
        """(sequence index, position) of each row [n_rows, 2], sequences offset store by store."""
        parts = []
        for store, offset in zip(self.stores, self._sequence_offsets, strict=True):
            located = store.locations().clone()
            located[:, 0] += offset
            parts.append(located)
        return torch.cat(parts)

    def iter_batches(
        self, hook: str | Sequence[str], batch_size: int, *, shuffle: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Each store's in-order batches in turn (a store's last batch may be short), ``location`` offset."""
        if shuffle:
            raise StoreError(
                "a store union reads in order only; shuffle each store with its own iter_batches"
            )
        for store, offset in zip(self.stores, self._sequence_offsets, strict=True):
            for batch in store.iter_batches(hook, batch_size, shuffle=False):
                batch["location"][:, 0] += offset
                yield batch

    def __repr__(self) -> str:
        return f"StoreUnion({[str(store.path) for store in self.stores]}, {self.n_rows} rows)"


def __getattr__(name: str) -> Any:
    """``workbench.store.capture_to_store``, the old home of :func:`workbench.capture.capture_to_store`, kept for one
    release (imported lazily: capture imports the store)."""
    if name == "capture_to_store":
        from workbench.capture import capture_to_store  # deferred: import circle (capture imports store)

        return capture_to_store
    raise AttributeError(f"module 'workbench.store' has no attribute {name!r}")
