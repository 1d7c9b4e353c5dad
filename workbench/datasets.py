"""Dataset references: the one way to say "this data" to every analysis, and the one iterator over it.

Forms (a string):
    notes.txt                  a UTF-8 text file, one document per non-empty line
    data.jsonl[:FIELD]         a JSON-lines file's text field (default "text"); also .csv / .tsv / .parquet
    corpus/  or  corpus/*.md   a directory of text files (default *.txt), one document per file
    hf_folder[:FIELD]          a ``datasets.save_to_disk`` folder (a DatasetDict: FIELD may be SPLIT/FIELD)
    ids.npy / ids.safetensors  pre-tokenized ids: [n, ctx] rows (or a 1-D stream, windowed); safetensors key input_ids
    stores/NAME                an activation store (its token ids, and its activations for analyses that read them)
    images/  or  images/*.png  a folder of images (.png .jpg .jpeg .bmp .gif .webp; class subfolders become labels)
    zoo:python-stdlib | zoo:tokfsm | zoo:digits     providers registered in the ``workbench.datasets`` entry points
One iterator, :meth:`Dataset.batches`, tokenizes with the model's tokenizer and owns context length, BOS policy,
packing, seeded shuffling, the token budget and progress; every analysis reads its data through it.

    data = load_dataset("notes.txt")
    for batch in data.batches(model.tokenizer, context_length=128, batch_size=8, max_tokens=50_000):
        batch["input_ids"], batch["attention_mask"]            # [batch, pos] each
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from workbench.store import ActivationStore

FORMS = (
    "a text file (one document per line), FILE.jsonl[:FIELD] / .csv / .tsv / .parquet with a text column, a "
    "directory of text files (DIR or 'DIR/*.md'), a datasets.save_to_disk folder[:FIELD], pre-tokenized ids "
    "(.npy / .safetensors), an activation store directory, a folder of images, or a provider such as zoo:python-stdlib"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TOKEN_SUFFIXES = (".npy", ".safetensors")


class DatasetError(ValueError):
    """A dataset reference could not be read; the message names the file, the place and the fix."""


@dataclass
class Dataset:
    """Documents (texts), pre-tokenized rows, or inputs of another modality, under one name.

    Exactly one of ``texts`` (a callable yielding documents), ``token_ids`` ([n, ctx] LongTensor rows, -1 or a
    mask for padding) or ``inputs`` (e.g. images [n, ...]) is set. ``labels`` holds whatever per-row or per-token
    label arrays the source carries (a provider's ground truth); ``store`` an ActivationStore when the source is one.
    """

    name: str
    texts: Callable[[], Iterable[str]] | None = None
    token_ids: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    store: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        """ "text" (documents to tokenize), "tokens" (already ids) or "inputs" (e.g. pixels)."""
        return "text" if self.texts is not None else "tokens" if self.token_ids is not None else "inputs"

    # ------------------------------------------------------------------ documents
    def documents(self, *, shuffle_seed: int | None = None, limit: int | None = None) -> list[str]:
        """The documents as a list, optionally in a seeded random order, at most ``limit`` of them."""
        if self.texts is None:
            raise DatasetError(
                f"dataset {self.name!r} holds {self.modality}, not texts; pass a text dataset to this analysis"
            )
        docs = [d for d in self.texts() if d.strip()]
        if not docs:
            raise DatasetError(
                f"dataset {self.name!r} holds no text; it needs at least one non-empty document"
            )
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(docs))
            docs = [docs[i] for i in order]
        return docs[:limit] if limit else docs

    def _stream_documents(self) -> Iterator[str]:
        """The non-empty documents in source order, read as they are used (what :meth:`documents` lists)."""
        if self.texts is None:
            raise DatasetError(
                f"dataset {self.name!r} holds {self.modality}, not texts; pass a text dataset to this analysis"
            )
        count = 0
        for doc in self.texts():
            if doc.strip():
                count += 1
                yield doc
        if not count:
            raise DatasetError(
                f"dataset {self.name!r} holds no text; it needs at least one non-empty document"
            )

    # ------------------------------------------------------------------ the one iterator
    def batches(
        self,
        tokenizer: Any,
        *,
        context_length: int = 128,
        batch_size: int = 16,
        bos: bool | None = None,
        packing: bool = False,
        shuffle_seed: int | None = None,
        max_tokens: int | None = None,
        max_rows: int | None = None,
        progress: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches {"input_ids": [batch, pos], "attention_mask": [batch, pos]} of token rows.

        Args:
            tokenizer: the model's (transformers) tokenizer; unused for pre-tokenized data.
            context_length: tokens per row (longer documents are truncated, or split when packing).
            bos: None keeps what the tokenizer adds; True makes every row start with the BOS (or CLS) token;
                False adds no special tokens.
            packing: concatenate documents (separated by EOS when the tokenizer has one) into full rows.
            shuffle_seed: shuffle documents / rows with this seed (None keeps the source order).
            max_tokens: stop once this many real tokens are yielded (the token budget); max_rows likewise.
            progress: a tqdm bar over tokens.
        """
        if context_length < 1 or batch_size < 1:
            raise DatasetError(
                f"context_length ({context_length}) and batch_size ({batch_size}) must be >= 1"
            )
        rows = self._rows(tokenizer, context_length, bos, packing, shuffle_seed)
        bar = tqdm(total=max_tokens, desc=f"tokens of {self.name}", unit="tok", disable=not progress)
        pad = _pad_id(tokenizer)
        used_tokens = used_rows = 0
        pending: list[list[int]] = []
        for row in rows:
            if max_tokens is not None and used_tokens >= max_tokens:
                break
            if max_rows is not None and used_rows >= max_rows:
                break
            if max_tokens is not None:
                row = row[: max_tokens - used_tokens]
            pending.append(row)
            used_tokens += len(row)
            used_rows += 1
            bar.update(len(row))
            if len(pending) == batch_size:
                yield _collate(pending, pad)
                pending = []
        if pending:
            yield _collate(pending, pad)
        bar.close()
        if used_rows == 0:
            raise DatasetError(f"dataset {self.name!r} gave no token rows; check the file and --max-tokens")

    def token_rows(self, tokenizer: Any, **options: Any) -> list[list[int]]:
        """All rows of :meth:`batches` (same options) as lists of real token ids, padding removed."""
        return [
            ids[mask.bool()].tolist()
            for batch in self.batches(tokenizer, **options)
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    def token_row_stream(self, tokenizer: Any, **options: Any) -> TokenRowStream:
        """The rows of :meth:`token_rows` (same options), streamed: one counting pass now, a fresh pass of
        :meth:`batches` per iteration, so memory holds one batch whatever the size of the dataset."""
        return TokenRowStream(lambda: self.batches(tokenizer, **options), name=self.name)

    def check_vocabulary(self, ids: torch.Tensor, model: Any) -> None:
        """Refuse token ids (real tokens, any shape) at or past ``model``'s vocabulary (``cfg.d_vocab``; 0: not
        known), naming the fix."""
        if model.cfg.d_vocab and ids.numel() and int(ids.max()) >= model.cfg.d_vocab:
            raise DatasetError(
                f"dataset {self.name!r} holds token id {int(ids.max())}, outside {model.cfg.name}'s vocabulary "
                f"(d_vocab={model.cfg.d_vocab}); pass token ids made with this model's tokenizer, or text"
            )

    def token_tensor(self, tokenizer: Any, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of :meth:`batches` at once: (input_ids [n, pos], attention_mask [n, pos]), padded to one length."""
        batches = list(self.batches(tokenizer, **options))
        width = max(b["input_ids"].shape[1] for b in batches)
        pad = _pad_id(tokenizer)
        ids = torch.cat(
            [
                torch.nn.functional.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]), value=pad)
                for b in batches
            ]
        )
        mask = torch.cat(
            [
                torch.nn.functional.pad(b["attention_mask"], (0, width - b["attention_mask"].shape[1]))
                for b in batches
            ]
        )
        return ids, mask

    def _rows(
        self, tokenizer: Any, context_length: int, bos: bool | None, packing: bool, shuffle_seed: int | None
    ) -> Iterator[list[int]]:
        if self.token_ids is not None:
            order = (
                np.random.default_rng(shuffle_seed).permutation(len(self.token_ids))
                if shuffle_seed is not None
                else range(len(self.token_ids))
            )
            for i in order:
                row = self.token_ids[int(i)]
                if self.token_mask is not None:
                    row = row[self.token_mask[int(i)].bool()]
                yield row[:context_length].tolist()
            return
        if tokenizer is None:
            raise DatasetError(
                f"dataset {self.name!r} is text, and the model has no tokenizer to read it with; save the model's "
                "tokenizer into its directory (tokenizer.save_pretrained(DIR)) or pass pre-tokenized ids as --data"
            )
        docs = (
            self.documents(shuffle_seed=shuffle_seed)
            if shuffle_seed is not None
            else self._stream_documents()
        )
        bos_id = _bos_id(tokenizer) if bos else None
        if bos and bos_id is None:
            raise DatasetError("bos=True, but the tokenizer has no BOS or CLS token; use bos=None or False")
        special = bos is None
        if not packing:
            for doc in docs:
                ids = tokenizer(doc, add_special_tokens=special, truncation=True, max_length=context_length)[
                    "input_ids"
                ]
                if bos_id is not None and (not ids or ids[0] != bos_id):
                    ids = [bos_id, *ids][:context_length]
                if ids:
                    yield ids
            return
        sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        width = context_length - (bos_id is not None)
        buffer: list[int] = []
        for doc in docs:
            buffer += tokenizer(doc, add_special_tokens=special)["input_ids"] + sep
            while len(buffer) >= width:
                chunk, buffer = buffer[:width], buffer[width:]
                yield [bos_id, *chunk] if bos_id is not None else chunk
        if buffer:
            yield [bos_id, *buffer] if bos_id is not None else buffer


class TokenRowStream:
    """Token rows (lists of real token ids, padding removed) of a dataset, read again from the source on every
    iteration instead of held in memory: ``len()`` and the totals come from one counting pass at construction.

    Attributes: ``n_rows``, ``n_tokens``, ``widest`` (the longest row) and ``fingerprint`` (sha256 of the rows,
    the same digest as ``workbench.capture``'s for the same rows held as lists).
    """

    def __init__(self, batches: Callable[[], Iterable[dict[str, torch.Tensor]]], name: str = "rows") -> None:
        self._batches, self.name = batches, name
        digest = hashlib.sha256()
        self.n_rows = self.n_tokens = self.widest = 0
        for row in self:
            digest.update(b"t" + np.asarray(row, dtype=np.int64).tobytes() + b"\0")
            self.n_rows += 1
            self.n_tokens += len(row)
            self.widest = max(self.widest, len(row))
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                yield ids[mask.bool()].tolist()


def iter_model_batches(
    inputs: Dataset | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    tokenizer: Any,
    *,
    batch_size: int = 16,
    context_length: int = 128,
    **options: Any,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index of the batch's first sequence, {"input_ids", "attention_mask"} [batch, pos]) over any analysis input:
    a Dataset (through :meth:`Dataset.batches` with ``options``), texts, token-id lists or token ids [n, pos]."""
    if isinstance(inputs, Dataset):
        batches = inputs.batches(tokenizer, context_length=context_length, batch_size=batch_size, **options)
    elif isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() or inputs.dim() != 2:
            raise DatasetError(
                f"token ids must be an integer tensor [n, pos], got {tuple(inputs.shape)} {inputs.dtype}"
            )
        batches = (
            {
                "input_ids": inputs[i : i + batch_size],
                "attention_mask": torch.ones_like(inputs[i : i + batch_size]),
            }
            for i in range(0, len(inputs), batch_size)
        )
    elif len(inputs) and all(isinstance(x, str) for x in inputs):
        texts = cast("Sequence[str]", inputs)  # all strings (checked above)
        batches = Dataset("texts", texts=lambda: list(texts)).batches(
            tokenizer, context_length=context_length, batch_size=batch_size, **options
        )
    else:
        rows = [list(map(int, r))[:context_length] for r in inputs]
        if not rows or not all(rows):
            raise DatasetError("inputs hold no tokens; pass texts, token-id lists or a dataset")
        batches = (
            _collate(rows[i : i + batch_size], _pad_id(tokenizer)) for i in range(0, len(rows), batch_size)
        )
    start = 0
    for batch in batches:
        yield start, batch
        start += len(batch["input_ids"])


def _collate(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pad_id(tokenizer: Any) -> int:
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _bos_id(tokenizer: Any) -> int | None:
    for attr in ("bos_token_id", "cls_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


# ---------------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class DatasetRef:
    """A parsed dataset reference: ``kind`` (text, table, glob, hf_disk, tokens, store, provider), the path or
    provider name, and the field / pattern / provider argument."""

    text: str
    kind: str
    location: str | Path
    field: str | None = None

    @property
    def name(self) -> str:
        """The name results rows record for this dataset."""
        if self.kind == "provider":
            return self.text
        base = Path(self.location).name
        return f"{base}:{self.field}" if self.field and self.kind in ("table", "hf_disk") else base


def parse_dataset_ref(text: str | Path) -> DatasetRef:
    """Parse ``text`` into a :class:`DatasetRef` (files are checked to exist, not read)."""
    text = str(text).strip()
    if not text:
        raise DatasetError(f"empty dataset reference; give {FORMS}")
    scheme, sep, rest = text.partition(":")
    if sep and scheme in _providers():
        return DatasetRef(text, "provider", scheme, rest)
    path, fld = Path(text).expanduser(), None
    if not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if Path(head).expanduser().exists():
            path, fld = Path(head).expanduser(), tail
    if "*" in path.name and path.parent.is_dir():
        images = path.name.lower().endswith(IMAGE_SUFFIXES)
        return DatasetRef(text, "images" if images else "glob", path.parent, path.name)
    if path.is_dir():
        if fld is None and _image_files(path) and not any(path.glob("*.txt")):
            return DatasetRef(text, "images", path)
        if (path / "manifest.json").is_file():
            return DatasetRef(text, "store", path)
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return DatasetRef(text, "hf_disk", path, fld)
        return DatasetRef(text, "glob", path, fld or "*.txt")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            return DatasetRef(text, "table", path, fld or "text")
        if suffix in TOKEN_SUFFIXES:
            return DatasetRef(text, "tokens", path, fld)
        return DatasetRef(text, "text", path)
    known = ", ".join(f"{p}:" for p in sorted(_providers())) or "none installed"
    raise DatasetError(
        f"dataset {text!r}: no such file or directory ({path.resolve()}), and not a provider ({known}). Forms: {FORMS}"
    )


def load_dataset(ref: str | Path | Dataset | DatasetRef, *, limit: int | None = None) -> Dataset:
    """The one dataset loader: any reference (module docstring) -> a :class:`Dataset`.

    ``limit`` caps the number of documents read from a text source (the token budget is
    :meth:`Dataset.batches`'s ``max_tokens``).
    """
    if isinstance(ref, Dataset):
        return ref
    parsed = ref if isinstance(ref, DatasetRef) else parse_dataset_ref(ref)
    path = Path(parsed.location)
    if parsed.kind == "provider":
        return _providers()[str(parsed.location)](parsed.field or "", limit)
    if parsed.kind in ("text", "table", "hf_disk"):  # read now: a bad file fails before any model work
        if parsed.kind == "text":  # streamed from the file on every pass: checked and counted now
            count = count_text_lines(path)
            documents = min(count, limit) if limit else count
            return Dataset(
                parsed.name,
                texts=lambda: _capped(iter_text_lines(path), limit),
                meta={"path": str(path), "documents": documents},
            )
        if parsed.kind == "table":
            docs = read_table_column(path, parsed.field or "text")
        else:
            docs = _read_hf_disk(path, parsed.field)
        docs = docs[:limit] if limit else docs
        return Dataset(parsed.name, texts=lambda: docs, meta={"path": str(path), "documents": len(docs)})
    if parsed.kind == "glob":
        files = sorted(p for p in path.glob(parsed.field or "*.txt") if p.is_file())
        if not files:
            raise DatasetError(
                f"{path} holds no files matching {parsed.field!r}; name a pattern, e.g. '{path}/*.md'"
            )
        return Dataset(
            parsed.name,
            texts=lambda: _capped((_read_utf8(f) for f in files), limit),
            meta={"path": str(path), "files": len(files)},
        )
    if parsed.kind == "images":
        return read_image_folder(path, parsed.field, limit)
    if parsed.kind == "tokens":
        ids, mask = read_token_file(path)
        return Dataset(
            parsed.name,
            token_ids=ids[:limit] if limit else ids,
            token_mask=None if mask is None else mask[:limit] if limit else mask,
        )

    store = ActivationStore.open(path)
    ids, mask = _store_rows(store)
    return Dataset(parsed.name, token_ids=ids, token_mask=mask, store=store, meta={"path": str(path)})


def _image_files(folder: Path, pattern: str | None = None) -> list[Path]:
    """Image files of ``folder`` matching ``pattern``, else those in it and in its subfolders, sorted."""
    found = folder.glob(pattern) if pattern else [*folder.glob("*"), *folder.glob("*/*")]
    return sorted(f for f in found if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(folder: str | Path, pattern: str | None = None, limit: int | None = None) -> Dataset:
    """A folder of images -> ``Dataset.inputs`` [n, C, H, W] float32 in [0, 1] (C = 1 when every image is grey,
    else 3), files sorted by path; when every image sits in a subfolder, the subfolder names are the classes and
    ``labels["class"]`` [n] their indices (meta: files, classes). Images of different sizes are refused."""
    from PIL import Image  # pillow ships with streamlit; only image folders need it

    folder = Path(folder)
    files = _image_files(folder, pattern)[:limit] if limit else _image_files(folder, pattern)
    if not files:
        raise DatasetError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put images in it")
    opened = [Image.open(f) for f in files]
    mode = "L" if all(image.mode in ("1", "L", "I", "I;16", "F") for image in opened) else "RGB"
    sizes = {image.size for image in opened}
    if len(sizes) > 1:
        first, other = opened[0], next(i for i in opened if i.size != opened[0].size)
        raise DatasetError(
            f"the images in {folder} differ in size ({files[0].name} {first.size[0]}×{first.size[1]}, "
            f"{files[opened.index(other)].name} {other.size[0]}×{other.size[1]}); resize them to one size"
        )
    arrays = [np.asarray(image.convert(mode), dtype=np.float32) / 255.0 for image in opened]
    inputs = torch.from_numpy(np.stack(arrays))
    inputs = inputs[:, None] if mode == "L" else inputs.permute(0, 3, 1, 2)
    classes = sorted({f.parent.name for f in files})
    in_subfolders = all(f.parent != folder for f in files)
    labels = {"class": np.array([classes.index(f.parent.name) for f in files])} if in_subfolders else {}
    meta = {
        "path": str(folder),
        "files": [str(f) for f in files],
        "classes": classes if in_subfolders else [],
    }
    return Dataset(folder.name, inputs=inputs.contiguous(), labels=labels, meta=meta)


def _capped(items: Iterable[str], limit: int | None) -> Iterator[str]:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


# ---------------------------------------------------------------------------------------------------- readers
def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DatasetError(
            f"{path} is not UTF-8 (byte {err.start}, line {line}: {raw[err.start : err.start + 4]!r}); convert it, "
            f"e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from None


def iter_text_lines(path: str | Path) -> Iterator[str]:
    """The non-empty lines of a UTF-8 text file (one document each), read as they are used: memory holds one line,
    not the file. Lines split as ``str.splitlines`` splits the whole text; a byte that is not UTF-8 raises
    DatasetError naming the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"text file {path} does not exist")
    with path.open("rb") as raw:
        offset = 0
        for number, line in enumerate(raw, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"{path} is not UTF-8 (byte {offset + err.start}, line {number}: "
                    f"{line[err.start : err.start + 4]!r}); convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
                ) from None
            offset += len(line)
            yield from (part for part in text.splitlines() if part.strip())


def count_text_lines(path: str | Path) -> int:
    """How many documents :func:`iter_text_lines` gives, checked in one streaming pass (a file that is missing, not
    UTF-8 or without text fails here, before any model work)."""
    count = sum(1 for _ in iter_text_lines(path))
    if not count:
        raise DatasetError(f"{path} holds no text; write one document per line")
    return count


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json (list of objects) / .csv / .tsv / .parquet file as dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    text = _read_utf8(path)
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DatasetError(
                f"{path} must hold a JSON list of objects (or use .jsonl, one object per line)"
            )
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path}:{number}: not valid JSON ({err.msg}); each line must be one object"
            ) from None
        if not isinstance(row, dict):
            raise DatasetError(f'{path}:{number}: each JSONL line must be an object like {{"text": ...}}')
        rows.append(row)
    return rows


def read_table_column(path: str | Path, column: str) -> list[str]:
    """The ``column`` of every row of a table file, as strings (a missing column names the ones there)."""
    rows = read_records(path)
    if not rows:
        raise DatasetError(f"{path} holds no rows")
    for number, row in enumerate(rows, 1):
        if column not in row:
            raise DatasetError(
                f"{path}: row {number} has no column {column!r} (it has {', '.join(map(str, row))}); "
                f"name the text column as {Path(path).name}:COLUMN"
            )
    return [str(row[column]) for row in rows]


def _read_hf_disk(path: Path, spec: str | None) -> list[str]:
    import datasets  # optional: Hugging Face datasets (save_to_disk folders only)

    loaded = datasets.load_from_disk(str(path))
    column = spec or "text"
    if isinstance(loaded, datasets.DatasetDict):
        split, _, column = (spec or "").rpartition("/") if spec and "/" in spec else ("", "", spec or "text")
        split = split or ("train" if "train" in loaded else next(iter(loaded)))
        if split not in loaded:
            raise DatasetError(
                f"{path} has no split {split!r}; splits: {', '.join(loaded)} (write FOLDER:SPLIT/FIELD)"
            )
        loaded = loaded[split]
    if column not in loaded.column_names:
        raise DatasetError(
            f"{path} has no column {column!r}; columns: {', '.join(loaded.column_names)} (write FOLDER:COLUMN)"
        )
    return [str(x) for x in loaded[column]]


def read_token_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pre-tokenized ids: (ids [n, ctx] long, mask [n, ctx] or None). Negative ids mark padding (masked out)."""
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        ids = torch.from_numpy(np.ascontiguousarray(array))
    else:
        tensors = load_file(str(path))
        if "input_ids" not in tensors:
            raise DatasetError(f"{path} has no 'input_ids' tensor (it has {', '.join(tensors)})")
        ids = tensors["input_ids"]
    if ids.is_floating_point() or ids.dim() not in (1, 2) or ids.numel() == 0:
        raise DatasetError(
            f"{path}: token ids must be a non-empty 1-D or 2-D integer array, got {tuple(ids.shape)} "
            f"{ids.dtype}"
        )
    ids = ids.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = ids >= 0
    return ids.clamp_min(0), (None if bool(mask.all()) else mask.long())


def _store_rows(store: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The token rows an activation store was captured from: (ids [n_seq, max_pos+1], mask)."""
    ids, where = store.token_ids(), store.locations()
    if len(ids) == 0:
        raise DatasetError(f"activation store {store.path} holds no rows")
    n_seq, width = int(where[:, 0].max()) + 1, int(where[:, 1].max()) + 1
    out = torch.zeros((n_seq, width), dtype=torch.long)
    mask = torch.zeros((n_seq, width), dtype=torch.long)
    out[where[:, 0], where[:, 1]] = ids.long()
    mask[where[:, 0], where[:, 1]] = 1
    keep = mask.any(1)
    return out[keep], mask[keep]


# ---------------------------------------------------------------------------------------------------- providers
Provider = Callable[[str, int | None], Dataset]


def _providers() -> dict[str, Provider]:
    """Dataset providers from the ``workbench.datasets`` entry-point group: scheme -> fn(argument, limit)."""
    found: dict[str, Provider] = {}
    for entry in importlib.metadata.entry_points(group="workbench.datasets"):
        found[entry.name] = _lazy(entry)
    return found


def _lazy(entry: importlib.metadata.EntryPoint) -> Provider:
    def provide(argument: str, limit: int | None) -> Dataset:
        return entry.load()(argument, limit)

    return provide
