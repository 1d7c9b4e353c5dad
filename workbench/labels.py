"""Label sources: the user's label files, label functions and providers' label sets → :class:`LabelDataset`.

Labels are shared by probes, codebooks and dynamics, so they live in the core beside :mod:`workbench.datasets`.

Forms of a label source (``load_labels(source, tokenizer=..., ...)``, ``--labels`` of ``workbench probe run``,
``labels =`` in a job file):

    reviews.csv[:TEXT[:LABEL]]   one label per sequence: a text and a label column (default ``text`` and
                                 ``label``); also .tsv / .jsonl / .json / .parquet. Probed at one ``position``:
                                 ``last`` (last real token, the default), ``first`` (e.g. BERT's [CLS]), an int N
                                 (negative counts from the last real token) or ``mean`` (activations mean-pooled
                                 over the real tokens)
    entities.jsonl               per-token labels as character spans:
                                 ``{"text": "Ada wrote", "spans": [{"start": 0, "end": 3, "label": "NAME"}]}``;
                                 characters outside every span get ``outside`` (default ``"O"``; None ignores them)
    pieces.jsonl                 per-token labels on the user's own pieces: ``{"tokens": ["def", " f"],
                                 "labels": ["KW", "NAME"]}``; the pieces are joined (``token_separator``, default
                                 "") into the text, or located in order in the record's ``"text"`` when it has one;
                                 a null label is ignored
    SCHEME:NAME                  a provider's label set: providers register in the ``workbench.labels`` entry
                                 points (the entry point's name is SCHEME, its object a :class:`LabelSets`); the
                                 zoo's are zoo:bracket_depth, inside_string, indent_level, next_token_type (Python
                                 source, on stdlib windows or on the ``data`` texts) and zoo:fsm_state,
                                 fsm_next_state (TokFSM)
    FILE.py:FN / py:MODULE:FN    a label function ``FN(text)`` returning one label (per sequence) or one label per
                                 character (None = ignore); labels the documents of ``data``
    a Python callable            the same, in Python

Alignment (one function, :func:`align_char_labels`): user labels are per character; the model's tokens are mapped to
characters through the tokenizer's offset mapping (a fast tokenizer), and **a token takes the label of its first
non-whitespace character** (its first character when it is all whitespace), so a byte-level BPE token " f" takes
the label of "f", and a token straddling two spans takes the label of the span its first visible character is in.
Special tokens ([CLS], [SEP], offsets (0, 0)) and padding get −1 (ignored).

Labels: strings (and numbers, for classification) become class ids in sorted order (numbers sorted numerically),
recorded in :attr:`LabelDataset.classes`; ``task="regression"`` reads numbers as float targets (NaN = ignored).
Errors (:class:`LabelError`) name the file, the line and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.datasets import (
    TABLE_SUFFIXES,
    Dataset,
    DatasetError,
    iter_model_batches,
    load_dataset,
    read_records,
)

IGNORE = -1
TASKS = ("classification", "regression")
POSITIONS = ("last", "first", "mean")
FORMS = (
    "a label file FILE.csv[:TEXT[:LABEL]] (also .tsv/.jsonl/.json/.parquet) with one label per text, a .jsonl of "
    '{"text", "spans": [{"start", "end", "label"}]} or {"tokens", "labels"} records, a provider\'s label set '
    "SCHEME:NAME (zoo:bracket_depth, ...), or a label function FILE.py:FN / py:MODULE:FN"
)


class LabelError(ValueError):
    """A label source that cannot be used; the message names the file, the line and the fix."""


@dataclass
class LabelDataset:
    """What a probe fits: token ids and labels of the same shape, and what the labels mean.

    Attributes:
        name: the label set, recorded as ``label_set`` in result rows (``bracket_depth``, ``reviews.csv:label@first``).
        tokens: token ids [n, pos] (right-padded).
        labels: [n, pos] long class ids (−1 = ignored) or, for regression, float targets (NaN = ignored).
        dataset: the texts' name, recorded as ``dataset`` in result rows.
        mask: attention mask [n, pos] (1 = real token); all ones when not given.
        classes: names of the class ids 0..k−1 (empty: the integer labels name themselves).
        task: "classification" or "regression".
        level: "token" (every labelled token is a sample) or "sequence" (one label per sequence).
        position: where a sequence label is probed ("last", "first", "mean", an int; None for token labels);
            with "mean" every real token of a sequence carries its label and the activations are mean-pooled.
    """

    name: str
    tokens: torch.Tensor
    labels: torch.Tensor
    dataset: str
    mask: torch.Tensor = None  # type: ignore[assignment]  # all ones when not given (__post_init__)
    classes: tuple[str, ...] = ()
    task: str = "classification"
    level: str = "token"
    position: str | int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask is None:
            self.mask = torch.ones_like(self.tokens)
        if self.tokens.shape != self.labels.shape or self.tokens.shape != self.mask.shape:
            raise LabelError(
                f"tokens {tuple(self.tokens.shape)}, labels {tuple(self.labels.shape)} and mask "
                f"{tuple(self.mask.shape)} must share one shape [n, pos]"
            )

    @property
    def pooled(self) -> bool:
        """True when each sequence is one sample of mean-pooled activations."""
        return self.position == "mean"

    @property
    def label_names(self) -> tuple[str, ...]:
        """The class names, ``("regression",)`` for a regression target."""
        return ("regression",) if self.task == "regression" else self.classes

    def labelled(self) -> torch.Tensor:
        """Boolean [n, pos]: real tokens that carry a label."""
        known = ~torch.isnan(self.labels) if self.labels.is_floating_point() else self.labels != IGNORE
        return known if self.mask is None else known & self.mask.bool()


# ---------------------------------------------------------------------------------------------------- sources
@dataclass
class LabelSource:
    """A parsed, checked label source (no tokenizer needed yet); :meth:`build` aligns it to a model's tokens.

    ``kind``: "sequence" (``texts`` with one raw label each), "chars" (``texts`` with per-character raw labels),
    "provider" (``scheme`` names the provider, ``set_name`` its set) or "function" (``function`` labels the
    documents of ``data``).
    """

    text: str
    kind: str
    name: str
    dataset: str = ""
    texts: list[str] = field(default_factory=list)
    raw: list[Any] = field(default_factory=list)  # per text: one label, or a list of per-character labels
    set_name: str | None = None
    scheme: str | None = None
    function: Callable[[str], Any] | None = None
    path: Path | None = None
    reference: str = ""  # the source with its file path made absolute (what a job's worker parses again)

    def __post_init__(self) -> None:
        self.reference = self.reference or self.text

    @property
    def digest(self) -> str:
        """A hash of the label file's bytes ("" for zoo sets and functions): a changed file changes job tasks."""
        if self.path is None or not self.path.is_file():
            return ""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    @property
    def needs_fsm(self) -> bool:
        """True for a provider's set labelled by the machine that generated the data (:attr:`LabelSets.needs_fsm`)."""
        return self.kind == "provider" and self.set_name in label_provider(self.scheme or "").needs_fsm

    def label_set(self, position: str | int | None = None) -> str:
        """The ``label_set`` of result rows; sequence labels carry their position (``reviews.csv:label@first``)."""
        if self.kind == "sequence":
            return f"{self.name}@{position if position is not None else 'last'}"
        return f"{self.name}@{position}" if self.kind == "function" and position is not None else self.name

    def build(
        self,
        tokenizer: Any = None,
        *,
        data: Dataset | None = None,
        fsm: Any = None,
        position: str | int | None = None,
        task: str | None = None,
        outside: str | None = "O",
        context_length: int = 128,
        batch_size: int = 16,
        n_sequences: int = 64,
        seed: int = 0,
    ) -> LabelDataset:
        """Tokenize and align to ``tokenizer``; see :func:`load_labels` for the options."""
        task = task or "classification"
        if task not in TASKS:
            raise LabelError(f"task {task!r} is not one of {', '.join(TASKS)}")
        position = parse_position(position) if position is not None else None
        if self.kind == "provider":
            if position is not None:
                raise LabelError(f"--position applies to per-sequence labels; {self.text} labels every token")
            provider = label_providers()[self.scheme or ""]
            return provider.build(
                self.set_name or "",
                tokenizer,
                fsm=fsm,
                data=data,
                n_sequences=n_sequences,
                context_length=context_length,
                seed=seed,
                task=task,
            )
        name = self.label_set(position)
        source = self._evaluate(data, n_sequences) if self.kind == "function" else self
        if tokenizer is None:
            raise LabelError(
                f"labels {self.text!r} are on text and need the model's tokenizer; the model has none"
            )
        if source.kind == "sequence":
            return _sequence_dataset(
                source, name, tokenizer, position or "last", task, context_length, batch_size
            )
        if position is not None:
            raise LabelError(
                f"--position applies to per-sequence labels; {self.text} labels every token (drop --position)"
            )
        return _token_dataset(source, name, tokenizer, task, outside, context_length)

    def _evaluate(self, data: Dataset | None, limit: int) -> LabelSource:
        """Run the label function on the documents of ``data``: a "sequence" or "chars" source."""
        if data is None:
            raise LabelError(
                f"label function {self.text!r} labels texts; give them with --data (data = in a job)"
            )
        texts = data.documents(limit=limit)
        values = []
        for number, text in enumerate(texts, 1):
            try:
                values.append(self.function(text))  # type: ignore[misc]
            except Exception as err:
                raise LabelError(
                    f"label function {self.text!r} failed on document {number} of {data.name}: "
                    f"{type(err).__name__}: {err}"
                ) from err
        per_char = [not _is_scalar(v) for v in values]
        if any(per_char) and not all(per_char):
            raise LabelError(
                f"label function {self.text!r} returned one label for some documents and a sequence "
                "for others; return one label per text, or one label per character, always"
            )
        if all(per_char):
            raw = [list(v) for v in values]
            for number, (text, labels) in enumerate(zip(texts, raw, strict=True), 1):
                if len(labels) != len(text):
                    raise LabelError(
                        f"label function {self.text!r}: document {number} of {data.name} has "
                        f"{len(text)} characters but {len(labels)} labels; return one per character"
                    )
            kind = "chars"
        else:
            raw, kind = list(values), "sequence"
        return LabelSource(self.text, kind, self.name, data.name, texts, raw)


def parse_label_source(
    source: str | Path | Callable[[str], Any],
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    token_separator: str = "",
    base: Path | None = None,
) -> LabelSource:
    """Read and check a label source (module docstring) without a tokenizer; errors name the line and the fix.

    ``base`` is where relative file paths are looked up first (a job file's directory), then the working directory.
    """
    if callable(source):
        name = getattr(source, "__qualname__", None) or type(source).__name__
        return LabelSource(name, "function", name, function=source)
    text = str(source).strip()
    if not text:
        raise LabelError(f"empty label source; give {FORMS}")
    scheme, sep, name = text.partition(":")
    if sep and scheme in _provider_entry_points():
        provider = label_providers()[scheme]
        if name not in provider.names:
            raise LabelError(
                f"{scheme} has no label set {name!r}; {scheme} label sets: "
                + ", ".join(f"{scheme}:{n}" for n in provider.names)
            )
        return LabelSource(text, "provider", name, set_name=name, scheme=scheme)
    if text.startswith("py:"):
        module, _, function = text[3:].rpartition(":")
        return _function_source(text, module, function, None)
    path, columns = _split_columns(text, base)
    reference = ":".join([str(path.resolve()), *columns])
    if path.suffix == ".py":
        if len(columns) != 1:
            raise LabelError(f"label function {text!r}: name the function as {path.name}:FUNCTION")
        return _function_source(reference, "", columns[0], path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise LabelError(f"label file {path} is not one of {', '.join(TABLE_SUFFIXES)}; give {FORMS}")
    if len(columns) > 2:
        raise LabelError(f"label source {text!r}: write FILE:TEXT_COLUMN:LABEL_COLUMN (at most two columns)")
    records = _records(path)
    first = records[0]
    if "spans" in first:
        parsed = _span_source(text, path, records, text_column or "text")
    elif "tokens" in first and ("labels" in first or label_column):
        parsed = _pieces_source(text, path, records, label_column or "labels", token_separator)
    else:
        text_col = columns[0] if columns else text_column or "text"
        label_col = columns[1] if len(columns) > 1 else label_column or "label"
        parsed = _sequence_source(text, path, records, text_col, label_col)
    parsed.reference = reference
    return parsed


def load_labels(
    source: str | Path | Callable[[str], Any] | LabelSource,
    tokenizer: Any = None,
    *,
    data: str | Path | Dataset | None = None,
    fsm: Any = None,
    position: str | int | None = None,
    task: str | None = None,
    outside: str | None = "O",
    context_length: int = 128,
    batch_size: int = 16,
    n_sequences: int = 64,
    seed: int = 0,
    text_column: str | None = None,
    label_column: str | None = None,
    token_separator: str = "",
) -> LabelDataset:
    """Any label source (module docstring) aligned to ``tokenizer``'s tokens → a :class:`LabelDataset`.

    Args:
        tokenizer: the model's (fast) tokenizer; TokFSM label sets need none.
        data: a dataset reference (or Dataset) of texts: for label functions, and for the zoo's Python label sets
            on your own code (default: stdlib windows); ``zoo:tokfsm`` (or ``fsm``) for the TokFSM sets.
        position: where a sequence label is probed: "last" (default), "first", "mean" or an int.
        task: "classification" (default) or "regression" (numeric labels as float targets).
        outside: the label of characters outside every span (None: ignored).
        context_length: tokens per sequence (longer texts are truncated).
        n_sequences: sequences of a zoo label set, documents of ``data`` a label function labels; label files use
            every row.
    """
    parsed = (
        source
        if isinstance(source, LabelSource)
        else parse_label_source(
            source, text_column=text_column, label_column=label_column, token_separator=token_separator
        )
    )
    dataset = load_dataset(data) if data is not None else None
    return parsed.build(
        tokenizer,
        data=dataset,
        fsm=fsm,
        position=position,
        task=task,
        outside=outside,
        context_length=context_length,
        batch_size=batch_size,
        n_sequences=n_sequences,
        seed=seed,
    )


def parse_position(position: str | int) -> str | int:
    """``"last"`` / ``"first"`` / ``"mean"`` / an int (or its text) → the position; anything else is a LabelError."""
    if isinstance(position, bool):
        raise LabelError(f"position {position!r} must be last, first, mean or an int")
    if isinstance(position, int):
        return position
    text = str(position).strip().lower()
    if text in POSITIONS:
        return text
    try:
        return int(text)
    except ValueError:
        raise LabelError(
            f"position {position!r} must be last, first, mean or a token index (an int)"
        ) from None


# ---------------------------------------------------------------------------------------------------- alignment
def align_char_labels(char_labels: Sequence[Any], offsets: Sequence[tuple[int, int]], text: str) -> list[Any]:
    """Per-token labels from per-character labels: each token takes the label of its first non-whitespace
    character (its first character when it is all whitespace); tokens without characters (special tokens,
    offsets (0, 0)) get None.

    Args:
        char_labels: one label per character of ``text`` (None = no label).
        offsets: (begin, end) character offsets of each token (a fast tokenizer's ``offset_mapping``).
    Returns:
        one label (or None) per token.
    """
    out: list[Any] = []
    for begin, end in offsets:
        if end <= begin:
            out.append(None)
            continue
        piece = text[begin:end]
        first = begin + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)
        out.append(char_labels[first] if first < len(char_labels) else None)
    return out


def tokenize_with_offsets(
    tokenizer: Any, text: str, context_length: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (special tokens included, truncated to ``context_length``)."""
    if not getattr(tokenizer, "is_fast", True):
        raise LabelError(
            f"aligning labels to tokens needs a fast tokenizer (offset mapping); "
            f"{type(tokenizer).__name__} is not one: save the model with its tokenizer.json"
        )
    encoding = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=context_length)
    return list(encoding["input_ids"]), [(int(start), int(end)) for start, end in encoding["offset_mapping"]]


# ---------------------------------------------------------------------------------------------------- builders
def _sequence_dataset(
    source: LabelSource,
    name: str,
    tokenizer: Any,
    position: str | int,
    task: str,
    context_length: int,
    batch_size: int,
) -> LabelDataset:
    texts = Dataset(source.dataset, texts=lambda: source.texts)
    ids, mask = texts.token_tensor(tokenizer, context_length=context_length, batch_size=batch_size)
    if len(ids) != len(source.texts):
        raise LabelError(
            f"{source.text}: {len(source.texts)} texts gave {len(ids)} token rows; remove empty texts"
        )
    values, classes = _encode([[label] for label in source.raw], task, source.text)
    lengths = mask.sum(1)
    labels = torch.full(ids.shape, math.nan) if task == "regression" else torch.full(ids.shape, IGNORE)
    for row, ((value,), length) in enumerate(zip(values, lengths.tolist(), strict=True)):
        if position == "mean":
            labels[row, :length] = value
            continue
        index = {"first": 0, "last": length - 1}.get(position, position)  # type: ignore[arg-type]
        index = length + index if isinstance(index, int) and index < 0 else index
        if not 0 <= index < length:
            raise LabelError(
                f"{source.text}: text {row + 1} has {length} tokens, so position {position} does not "
                "exist; use --position last, first, mean or a smaller index"
            )
        labels[row, index] = value
    return LabelDataset(name, ids, labels, source.dataset, mask, classes, task, "sequence", position)


def _token_dataset(
    source: LabelSource, name: str, tokenizer: Any, task: str, outside: str | None, context_length: int
) -> LabelDataset:
    rows, token_labels = [], []
    for text, chars in zip(source.texts, source.raw, strict=True):
        token_ids, offsets = tokenize_with_offsets(tokenizer, text, context_length)
        chars = [outside if label is _OUTSIDE else label for label in chars]
        rows.append(token_ids)
        token_labels.append(align_char_labels(chars, offsets, text))
    values, classes = _encode(token_labels, task, source.text)
    (_, batch), *_ = iter_model_batches(rows, tokenizer, batch_size=len(rows), context_length=context_length)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full(ids.shape, math.nan) if task == "regression" else torch.full(ids.shape, IGNORE)
    for row, encoded in enumerate(values):
        labels[row, : len(encoded)] = torch.tensor(encoded, dtype=labels.dtype)
    return LabelDataset(name, ids, labels, source.dataset, mask, classes, task, "token")


# ---------------------------------------------------------------------------------------------------- providers
def _no_machine(model_dir: Path) -> Any:
    raise LabelError(f"{model_dir}: this provider's label sets are not made by a finite-state machine")


@dataclass(frozen=True)
class LabelSets:
    """A provider's label sets, the object of a ``workbench.labels`` entry point (its name is the SCHEME of
    ``SCHEME:NAME``).

    Attributes:
        names: the label sets it computes.
        build: ``build(name, tokenizer, *, fsm, data, n_sequences, context_length, seed, task)`` → a token-level
            :class:`LabelDataset` (tokens and labels [n, pos]); raises :class:`LabelError` for a model or corpus the
            set does not fit.
        needs_fsm: the sets labelled by the finite-state machine that generated the data (given as ``fsm``, or
            ``data.meta["fsm"]``).
        model_fsm: ``model_fsm(model_dir)`` → the machine whose data the model in ``model_dir`` was trained on (for
            the ``needs_fsm`` sets); raises :class:`LabelError` for a model trained on anything else.
    """

    names: tuple[str, ...]
    build: Callable[..., LabelDataset]
    needs_fsm: tuple[str, ...] = ()
    model_fsm: Callable[[Path], Any] = _no_machine


def _provider_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The ``workbench.labels`` entry points by scheme (nothing is imported until a provider is asked for)."""
    return {entry.name: entry for entry in importlib.metadata.entry_points(group="workbench.labels")}


@functools.cache
def label_providers() -> dict[str, LabelSets]:
    """Every installed label-set provider by scheme (loads the ``workbench.labels`` entry points)."""
    providers = {}
    for scheme, entry in _provider_entry_points().items():
        provider = entry.load()
        if not isinstance(provider, LabelSets):
            raise LabelError(
                f"entry point {entry.value} of workbench.labels is a {type(provider).__name__}, not a "
                "workbench.labels.LabelSets"
            )
        providers[scheme] = provider
    return providers


def label_provider(scheme: str) -> LabelSets:
    """The label-set provider registered as ``scheme`` (LabelError naming the installed ones otherwise)."""
    providers = label_providers()
    if scheme not in providers:
        known = ", ".join(sorted(providers)) or "none installed"
        raise LabelError(
            f"no label-set provider {scheme!r} (installed: {known}); it registers in the "
            "workbench.labels entry points"
        )
    return providers[scheme]


# ---------------------------------------------------------------------------------------------------- file readers
_OUTSIDE = object()  # a character no span covers (becomes ``outside`` when the source is built)


def _split_columns(text: str, base: Path | None) -> tuple[Path, list[str]]:
    """``FILE[:A[:B]]`` → (the existing file, [A, B]); a missing file is a LabelError naming where it looked."""
    parts = text.split(":")
    for cut in range(len(parts), 0, -1):
        head, columns = ":".join(parts[:cut]), parts[cut:]
        for candidate in _candidates(head, base):
            if candidate.is_file():
                return candidate, columns
    looked = " and ".join(str(c.resolve()) for c in _candidates(text.split(":")[0], base))
    raise LabelError(f"label file {text.split(':')[0]!r} does not exist (looked at {looked}); give {FORMS}")


def _candidates(head: str, base: Path | None) -> list[Path]:
    path = Path(head).expanduser()
    if base is not None and not path.is_absolute():
        return [base / path, path]
    return [path]


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        records = read_records(path)
    except DatasetError as err:
        raise LabelError(str(err)) from None
    except Exception as err:  # a parquet / csv reader's own error
        raise LabelError(
            f"{path}: cannot be read as {path.suffix} ({type(err).__name__}: {err}); check the file "
            "format, or convert it to .jsonl"
        ) from None
    if not records:
        raise LabelError(f"{path} holds no rows; write one labelled text per row ({FORMS})")
    return records


def _line(path: Path, index: int) -> str:
    """``FILE:LINE`` of record ``index`` (0-based) for line-based files, ``FILE row N`` otherwise."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        numbers = [
            n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()
        ]
        return f"{path}:{numbers[index]}" if index < len(numbers) else f"{path} row {index + 1}"
    if suffix in (".csv", ".tsv"):
        return f"{path}:{index + 2}"
    return f"{path} row {index + 1}"


def _sequence_source(
    text: str, path: Path, records: list[dict], text_col: str, label_col: str
) -> LabelSource:
    texts, raw = [], []
    for index, record in enumerate(records):
        for column in (text_col, label_col):
            if column not in record:
                raise LabelError(
                    f"{_line(path, index)}: no column {column!r} (it has {', '.join(map(str, record))}); name the "
                    f"text and label columns as {path.name}:TEXT_COLUMN:LABEL_COLUMN"
                )
        value, label = record[text_col], record[label_col]
        if not isinstance(value, str) or not value.strip():
            raise LabelError(
                f"{_line(path, index)}: the text ({text_col!r}) is empty or not a string; "
                "fill it in or remove the row"
            )
        if label is None or (isinstance(label, str) and not label.strip()) or _is_nan(label):
            raise LabelError(
                f"{_line(path, index)}: the label ({label_col!r}) is empty; fill it in or remove the row"
            )
        texts.append(value)
        raw.append(label.strip() if isinstance(label, str) else label)
    name = f"{path.name}:{label_col}"
    return LabelSource(text, "sequence", name, f"{path.name}:{text_col}", texts, raw, path=path)


def _span_source(text: str, path: Path, records: list[dict], text_col: str) -> LabelSource:
    texts, raw = [], []
    for index, record in enumerate(records):
        where = _line(path, index)
        value, spans = record.get(text_col), record.get("spans")
        if not isinstance(value, str):
            raise LabelError(
                f"{where}: a span record needs a {text_col!r} string (it has "
                f'{", ".join(map(str, record))}); write {{"text": ..., "spans": [...]}}'
            )
        if not isinstance(spans, list):
            raise LabelError(f'{where}: \'spans\' must be a list of {{"start", "end", "label"}} objects')
        chars: list[Any] = [_OUTSIDE] * len(value)
        for span in spans:
            if not isinstance(span, dict) or not {"start", "end", "label"} <= set(span):
                raise LabelError(
                    f"{where}: span {span!r} needs start, end and label, e.g. "
                    '{"start": 0, "end": 5, "label": "NAME"}'
                )
            start, end, label = span["start"], span["end"], span["label"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
                raise LabelError(f"{where}: span {span!r}: start and end must be integer character offsets")
            if not 0 <= start < end <= len(value):
                raise LabelError(
                    f"{where}: span {start}..{end} ({label!r}) lies outside the text of {len(value)} characters; "
                    "offsets are 0-based characters with end exclusive (0 <= start < end <= len(text))"
                )
            if any(c is not _OUTSIDE for c in chars[start:end]):
                raise LabelError(
                    f"{where}: span {start}..{end} ({label!r}) overlaps another span; split or merge "
                    "them so that every character has one label"
                )
            if label is None:
                raise LabelError(f"{where}: span {start}..{end} has no label; give one or drop the span")
            chars[start:end] = [label] * (end - start)
        texts.append(value)
        raw.append(chars)
    return LabelSource(text, "chars", f"{path.name}:spans", path.name, texts, raw, path=path)


def _pieces_source(text: str, path: Path, records: list[dict], label_col: str, separator: str) -> LabelSource:
    texts, raw = [], []
    for index, record in enumerate(records):
        where = _line(path, index)
        pieces, labels = record.get("tokens"), record.get(label_col)
        if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces) or not pieces:
            raise LabelError(f"{where}: 'tokens' must be a non-empty list of strings")
        if not isinstance(labels, list) or len(labels) != len(pieces):
            got = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise LabelError(
                f"{where}: {len(pieces)} tokens but {got} {label_col!r}; give one label per token "
                "(null to ignore one)"
            )
        full = record.get("text")
        if full is None:
            full = separator.join(pieces)
        elif not isinstance(full, str):
            raise LabelError(f"{where}: 'text' must be a string")
        chars: list[Any] = [_OUTSIDE] * len(full)
        cursor = 0
        for piece, label in zip(pieces, labels, strict=True):
            begin = full.find(piece, cursor)
            if begin < 0:
                raise LabelError(
                    f"{where}: token {piece!r} is not in the text after character {cursor}; the tokens "
                    "must appear in the text in order (or drop 'text' to join them)"
                )
            chars[begin : begin + len(piece)] = [label] * len(piece)
            cursor = begin + len(piece)
        texts.append(full)
        raw.append(chars)
    return LabelSource(text, "chars", f"{path.name}:{label_col}", path.name, texts, raw, path=path)


def _function_source(text: str, module: str, function: str, path: Path | None) -> LabelSource:
    if not function:
        raise LabelError(f"label function {text!r}: write py:MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if path is not None:
            spec = importlib.util.spec_from_file_location(f"_workbench_labels_{path.stem}", path)
            loaded = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(loaded)  # type: ignore[union-attr]
        else:
            loaded = importlib.import_module(module)
    except Exception as err:
        raise LabelError(
            f"label function {text!r}: importing {path or module} failed: {type(err).__name__}: {err}"
        ) from err
    fn = getattr(loaded, function, None)
    if not callable(fn):
        have = sorted(n for n, v in vars(loaded).items() if callable(v) and not n.startswith("_"))
        raise LabelError(
            f"label function {text!r}: {path or module} has no function {function!r}; it has "
            f"{', '.join(have) or 'none'}"
        )
    return LabelSource(text, "function", function, function=fn, path=path)


# ---------------------------------------------------------------------------------------------------- encoding
def _encode(rows: list[list[Any]], task: str, source: str) -> tuple[list[list[float | int]], tuple[str, ...]]:
    """Raw labels (None = ignored) → class ids (−1 ignored) with the sorted class names, or float targets (NaN)."""
    if task == "regression":
        out = []
        for number, row in enumerate(rows, 1):
            values = []
            for label in row:
                if label is None:
                    values.append(math.nan)
                    continue
                try:
                    values.append(float(label))
                except (TypeError, ValueError):
                    raise LabelError(
                        f"{source}: text {number} has the label {label!r}, which is not a number; "
                        "regression needs numeric labels (or use task classification)"
                    ) from None
            out.append(values)
        return out, ()
    seen = {_class_name(label) for row in rows for label in row if label is not None}
    if not seen:
        raise LabelError(f"{source}: no token carries a label; check the spans and the context length")
    numeric = all(_is_number(v) for v in seen)
    classes = tuple(sorted(seen, key=float) if numeric else sorted(seen))
    index = {name: i for i, name in enumerate(classes)}
    return [
        [IGNORE if label is None else index[_class_name(label)] for label in row] for row in rows
    ], classes


def _class_name(label: Any) -> str:
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, np.generic)) or value is None
