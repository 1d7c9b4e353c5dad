"""Token-level ground-truth labels for probes, aligned to a model's tokens.

Python source (computed with the ``tokenize`` module, in the spirit of "Evidence of Meaning in Language Models
Trained on Programs"):
- ``bracket_depth``: how many ( [ { enclose the token (outside strings and comments), capped at ``max_depth``;
- ``inside_string``: 1 if the token lies inside a string literal (its quotes included), else 0;
- ``indent_level``: the indentation level (INDENT − DEDENT count) of the logical line holding the token, capped;
- ``next_token_type``: the ``tokenize`` type of the next Python token starting at or after the end of the model
  token (NAME, OP, NUMBER, STRING, NEWLINE, COMMENT, … as small integers, see ``TOKEN_TYPES``).

Alignment rule for model tokens that straddle several characters: a token takes the label of its first
non-whitespace character (its first character if it is all whitespace). Characters the ``tokenize`` module
could not reach (a file cut in the middle of a string, say) and padding get the label −1 (ignored).

TokFSM: ``fsm_state`` (the hidden state that emitted the token) and ``fsm_next_state`` (the state after it).

:data:`LABELS` registers these sets as ``zoo:NAME`` label sources (entry point ``zoo`` of ``workbench.labels``).
"""

from __future__ import annotations

import io
import json
import math
import token as token_module
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.datasets import Dataset
from workbench.labels import IGNORE, LabelDataset, LabelError, LabelSets
from workbench.zoo.corpora import TokFSM, python_source_texts

TOKEN_TYPES = ["NAME", "OP", "NUMBER", "STRING", "NEWLINE", "NL", "COMMENT", "INDENT", "DEDENT", "ENDMARKER"]
PYTHON_LABELS = ("bracket_depth", "inside_string", "indent_level", "next_token_type")
FSM_LABELS = ("fsm_state", "fsm_next_state")
LABEL_SETS = PYTHON_LABELS + FSM_LABELS


def check_label_set(name: str) -> str:
    if name not in LABEL_SETS:
        raise LabelError(f"unknown label set {name!r}; valid: {', '.join(LABEL_SETS)}")
    return name


@dataclass
class CharLabels:
    """Per-character labels of one source text, each an int array [n_chars] (−1 where unknown)."""

    bracket_depth: np.ndarray
    inside_string: np.ndarray
    indent_level: np.ndarray
    next_token_type: np.ndarray  # type of the first Python token starting at or after each character


def python_char_labels(source: str, max_depth: int = 4, max_indent: int = 4) -> CharLabels:
    """Character-level ground truth of one Python source text."""
    n = len(source)
    line_starts = np.concatenate([[0], np.cumsum([len(line) for line in source.splitlines(keepends=True)])])

    def offset(pos: tuple[int, int]) -> int:
        row, col = pos
        return int(line_starts[row - 1]) + col if row - 1 < len(line_starts) else n

    depth = np.full(n, IGNORE, dtype=np.int64)
    inside = np.full(n, IGNORE, dtype=np.int64)
    indent = np.full(n, IGNORE, dtype=np.int64)
    next_type = np.full(n, IGNORE, dtype=np.int64)
    level, indent_level, reached = 0, 0, 0
    starts: list[tuple[int, int]] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            begin, end = offset(tok.start), offset(tok.end)
            if tok.type == token_module.INDENT:
                indent_level += 1
            elif tok.type == token_module.DEDENT:
                indent_level -= 1
            depth[reached:begin] = min(level, max_depth)
            inside[reached:begin] = 0
            indent[reached:end] = min(indent_level, max_indent)
            if tok.type == token_module.STRING:
                inside[begin:end] = 1
                depth[begin:end] = min(level, max_depth)
            else:
                inside[begin:end] = 0
                if tok.type == token_module.OP and tok.string in "([{":
                    depth[begin:end] = min(level, max_depth)
                    level += 1
                elif tok.type == token_module.OP and tok.string in ")]}":
                    level = max(level - 1, 0)
                    depth[begin:end] = min(level, max_depth)
                else:
                    depth[begin:end] = min(level, max_depth)
            name = token_module.tok_name[tok.type]
            if (
                name in TOKEN_TYPES
                and end > begin
                or tok.type in (token_module.NEWLINE, token_module.ENDMARKER)
            ):
                starts.append((begin, TOKEN_TYPES.index(name) if name in TOKEN_TYPES else IGNORE))
            reached = max(reached, end)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    if starts:
        begins = np.array([b for b, _ in starts])
        types = np.array([t for _, t in starts])
        limit = min(reached, n)
        following = np.searchsorted(begins, np.arange(limit), side="left")
        known = following < len(begins)
        next_type[:limit][known] = types[following[known]]
    return CharLabels(depth, inside, indent, next_type)


def align_to_tokens(char_labels: np.ndarray, offsets: Sequence[tuple[int, int]], text: str) -> np.ndarray:
    """Per-token labels [n_tokens] from per-character labels, by the first non-whitespace character rule.

    For ``next_token_type`` pass the per-character array shifted so that position = the token's end.
    """
    out = np.full(len(offsets), IGNORE, dtype=np.int64)
    for i, (begin, end) in enumerate(offsets):
        if end <= begin:
            continue
        piece = text[begin:end]
        first = begin + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)
        if first < len(char_labels):
            out[i] = char_labels[first]
    return out


def python_token_labels(
    texts: Sequence[str], tokenizer, context_length: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token ids [n, context_length] (right-padded) and each Python label set [n, context_length] (−1 = ignore)."""
    ids = torch.full((len(texts), context_length), tokenizer.pad_token_id, dtype=torch.long)
    labels = {
        name: torch.full((len(texts), context_length), IGNORE, dtype=torch.long) for name in PYTHON_LABELS
    }
    for row, text in enumerate(texts):
        encoding = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=context_length)
        offsets = encoding["offset_mapping"]
        n = len(encoding["input_ids"])
        ids[row, :n] = torch.tensor(encoding["input_ids"])
        chars = python_char_labels(text)
        for name in ("bracket_depth", "inside_string", "indent_level"):
            labels[name][row, :n] = torch.from_numpy(align_to_tokens(getattr(chars, name), offsets, text))
        ends = [chars.next_token_type[end] if end < len(text) else IGNORE for _, end in offsets]
        labels["next_token_type"][row, :n] = torch.tensor(ends, dtype=torch.long)
    return ids, labels


def python_label_dataset(
    tokenizer, n_sequences: int, context_length: int, *, seed: int = 0, max_files: int = 400
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Windows of stdlib source (each starting at a line start), their token ids and Python label sets."""
    rng = np.random.default_rng(seed)
    files = python_source_texts(max_files=max_files, seed=seed + 1)
    windows: list[str] = []
    while len(windows) < n_sequences:
        text = files[int(rng.integers(len(files)))]
        lines = text.splitlines(keepends=True)
        start = int(rng.integers(max(1, len(lines) - 40)))
        windows.append("".join(lines[start : start + 40]))
    return python_token_labels(windows, tokenizer, context_length)


def fsm_label_dataset(
    fsm, n_sequences: int, context_length: int, *, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TokFSM tokens [n, context_length] with ``fsm_state`` and ``fsm_next_state`` labels (the last next state is
    −1)."""
    tokens, states = fsm.sample(n_sequences, context_length + 1, seed=seed)
    next_states = states[:, 1:]
    return torch.from_numpy(tokens[:, :context_length]), {
        "fsm_state": torch.from_numpy(states[:, :context_length]),
        "fsm_next_state": torch.from_numpy(next_states),
    }


def build_label_set(
    name: str,
    tokenizer: Any,
    *,
    fsm: Any = None,
    data: Dataset | None = None,
    n_sequences: int = 64,
    context_length: int = 128,
    seed: int = 0,
    task: str = "classification",
) -> LabelDataset:
    """The zoo label set ``name`` as a token-level :class:`LabelDataset` (tokens and labels [n, context_length]).

    Python sets label ``data``'s documents when given, else ``n_sequences`` seeded stdlib windows, and need a
    tokenizer with a pad token; TokFSM sets sample ``n_sequences`` sequences from ``fsm`` (or ``data.meta["fsm"]``).
    A regression ``task`` reads the labels as float targets (NaN = ignored).
    """
    if name in PYTHON_LABELS:
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise LabelError(
                f"label set {name!r} is computed from Python source and needs a tokenizer with a pad "
                "token (a code model)"
            )
        if data is None:
            tokens, labels = python_label_dataset(tokenizer, n_sequences, context_length, seed=seed)
            described = f"python-stdlib:{n_sequences}x{context_length}:seed{seed}"
        else:
            tokens, labels = python_token_labels(data.documents(limit=n_sequences), tokenizer, context_length)
            described = data.name
        mask = (tokens != tokenizer.pad_token_id).long()
    else:
        fsm = fsm if fsm is not None else (data.meta.get("fsm") if data is not None else None)
        if fsm is None:
            raise LabelError(
                f"label set {name!r} needs the TokFSM that generated the model's training data (a zoo "
                "model trained on the fsm corpus, or --data zoo:tokfsm)"
            )
        tokens, labels = fsm_label_dataset(fsm, n_sequences, context_length, seed=seed)
        described, mask = f"tokfsm:{n_sequences}x{context_length}:seed{seed}", None
    target = labels[check_label_set(name)]
    if task == "regression":
        target = torch.where(target == IGNORE, math.nan, target.double()).float()
    classes = tuple(TOKEN_TYPES) if name == "next_token_type" and task == "classification" else ()
    return LabelDataset(name, tokens, target, described, mask, classes, task, "token")


def model_fsm(model_dir: Path) -> TokFSM:
    """The TokFSM a zoo model directory (or one of its step dirs) was trained on, from its spec.json."""
    for candidate in (model_dir / "spec.json", model_dir.parent / "spec.json"):
        if candidate.exists():
            spec = json.loads(candidate.read_text())
            if spec.get("corpus") != "fsm":
                break
            return TokFSM(**spec["fsm"], seed=spec.get("seed", 0))
    raise LabelError(
        f"{model_dir} is not a zoo model trained on TokFSM; the label sets {', '.join(FSM_LABELS)} need one"
    )


LABELS = LabelSets(names=LABEL_SETS, build=build_label_set, needs_fsm=FSM_LABELS, model_fsm=model_fsm)
