"""Corpora that exist on every machine: the Python standard library's source, TokFSM sequences, sklearn digits.

TokFSM (after the Codebook Features paper): a random finite-state machine whose hidden state emits a token at
each step. Each state has ``branching`` successor states, and each transition emits the token of the state it
enters; a state's token is shared by ``n_states / vocab_size`` states, so the token alone does not tell the
state — a model has to track it. The state sequence is kept as ground truth for probes and codebooks.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch


class CorpusError(ValueError):
    """A corpus could not be built; the message says what was missing."""


def stdlib_source_dir() -> Path:
    """Directory of the running Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_source_files(root: Path | None = None, max_files: int | None = None, seed: int = 0) -> list[Path]:
    """The ``.py`` files below ``root`` (default: the stdlib, without tests and site-packages), in a seeded order."""
    root = Path(root) if root is not None else stdlib_source_dir()
    if not root.is_dir():
        raise CorpusError(f"corpus directory {root} does not exist")
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")
    files = sorted(
        p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)
    )
    if not files:
        raise CorpusError(
            f"no .py files under {root}; point the corpus at a directory of Python source files"
        )
    order = np.random.default_rng(seed).permutation(len(files))
    files = [files[i] for i in order]
    return files[:max_files] if max_files else files


def python_source_texts(
    root: Path | None = None, *, max_files: int | None = None, max_chars: int = 20000, seed: int = 0
) -> list[str]:
    """Source texts (each file's first ``max_chars`` characters, UTF-8 decodable files only)."""
    texts = []
    for path in python_source_files(root, max_files, seed):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text[:max_chars])
    if not texts:
        raise CorpusError(f"no readable UTF-8 Python source under {root or stdlib_source_dir()}")
    return texts


@dataclass(frozen=True)
class TokFSM:
    """A seeded random finite-state machine over ``n_states`` hidden states emitting ``vocab_size`` tokens."""

    n_states: int = 100
    vocab_size: int = 20
    branching: int = 3
    seed: int = 0

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n_states < 2 or self.vocab_size < 2 or not 1 <= self.branching <= self.n_states:
            raise CorpusError(f"invalid TokFSM sizes: {self}")
        rng = np.random.default_rng(self.seed)
        emission = rng.permutation(np.arange(self.n_states) % self.vocab_size)
        successors = np.stack(
            [rng.choice(self.n_states, self.branching, replace=False) for _ in range(self.n_states)]
        )
        return emission, successors

    @property
    def emission(self) -> np.ndarray:
        """Token emitted on entering each state [n_states]."""
        return self._tables[0]

    @property
    def successors(self) -> np.ndarray:
        """Possible next states of each state [n_states, branching]."""
        return self._tables[1]

    def sample(self, n_sequences: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Sequences of (tokens [n, length], states [n, length]); the first state is uniform."""
        rng = np.random.default_rng((self.seed, seed))
        states = np.empty((n_sequences, length), dtype=np.int64)
        states[:, 0] = rng.integers(self.n_states, size=n_sequences)
        choice = rng.integers(self.branching, size=(n_sequences, length))
        for t in range(1, length):
            states[:, t] = self.successors[states[:, t - 1], choice[:, t]]
        return self.emission[states], states

    def legal_next_tokens(self, state: int) -> set[int]:
        """Tokens that can follow ``state`` (those emitted by its successors)."""
        return {int(t) for t in self.emission[self.successors[state]]}

    def is_legal(self, state: int, token: int) -> bool:
        return int(token) in self.legal_next_tokens(state)

    def entropy_rate(self) -> float:
        """Per-token entropy (nats) of the next token given the true state: the best achievable loss."""
        total = 0.0
        for state in range(self.n_states):
            tokens = self.emission[self.successors[state]]
            _, counts = np.unique(tokens, return_counts=True)
            p = counts / counts.sum()
            total += float(-(p * np.log(p)).sum())
        return total / self.n_states


def digits_dataset(test_fraction: float = 0.25, seed: int = 0):
    """sklearn's bundled 8×8 digits as float tensors: (x_train [n, 1, 8, 8] in [0, 1], y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn (~1.4 s), the digits corpus only
    from sklearn.model_selection import train_test_split  # deferred: scikit-learn, as above

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )

    def tensor(x):
        return torch.from_numpy(x).unsqueeze(1)

    return tensor(x_train), torch.from_numpy(y_train), tensor(x_test), torch.from_numpy(y_test)
