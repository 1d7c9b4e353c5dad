"""Tokenizers the zoo builds and saves itself: byte-level BPE for Python source, one token per TokFSM symbol."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def train_bpe(texts: Sequence[str], vocab_size: int = 512):
    """A byte-level BPE (``tokenizers``) trained on ``texts``; deterministic for the same texts and size."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def fsm_tokenizer(vocab_size: int):
    """Whitespace-separated symbols ``t0 … t{V-1}`` mapped to ids 0 … V-1 (then the special tokens)."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab.update({tok: vocab_size + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[1]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save as ``tokenizer.json`` + the files ``transformers.AutoTokenizer`` needs."""
    wrapped = as_transformers(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    if not isinstance(
        wrapped, PreTrainedTokenizerFast
    ):  # pragma: no cover - as_transformers always returns one
        raise TypeError("expected a fast tokenizer")
    wrapped.save_pretrained(str(directory))


def as_transformers(tokenizer):
    """Wrap a ``tokenizers.Tokenizer`` as a ``transformers.PreTrainedTokenizerFast`` with our special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
    )
