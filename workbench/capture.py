"""Capture: activations of named hooks over a corpus, in memory or streamed into an activation store.

``HookedModel.capture(names, positions=...)`` records activations in memory and narrows them with
:func:`select_positions`; :func:`capture_to_store` streams a corpus through the model into a sharded
:class:`~workbench.store.ActivationStore` (resumable, checksummed). Batching of a dataset into model inputs is
``workbench.datasets.iter_model_batches``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.datasets import TokenRowStream
from workbench.deprecation import renamed_keywords
from workbench.store import ActivationStore, StoreError

if TYPE_CHECKING:
    from workbench.model import HookedModel

__all__ = ["Inputs", "Positions", "capture_to_store", "select_positions"]

Positions = int | Sequence[int] | slice | str | None


def select_positions(
    activation: torch.Tensor, positions: Positions, pos_dim: int, last_index: torch.Tensor | None
) -> torch.Tensor:
    """Select token positions along ``pos_dim`` of ``activation``.

    ``positions``: an int (dimension removed), a list of ints or a slice (dimension kept), or ``"last"`` (the
    last non-padding token of each row, dimension removed; ``last_index`` is [batch]). Negative ints count
    from the end. Out-of-range positions raise IndexError naming the sequence length.
    """
    if positions is None:
        return activation
    seq_len = activation.shape[pos_dim]
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(
                f"positions={positions!r} is not understood; use an int, a list, a slice or 'last'"
            )
        if last_index is None:
            last_index = torch.full((activation.shape[0],), seq_len - 1, device=activation.device)
        shape = [1] * activation.ndim
        shape[0] = activation.shape[0]
        index = last_index.to(activation.device).view(shape)
        index = index.expand(*[s if d != pos_dim else 1 for d, s in enumerate(activation.shape)])
        return activation.gather(pos_dim, index).squeeze(pos_dim)
    if isinstance(positions, slice):
        return activation.narrow(pos_dim, 0, seq_len)[(slice(None),) * pos_dim + (positions,)]
    single = isinstance(positions, int)
    wanted = [positions] if isinstance(positions, int) else list(positions)
    bad = [p for p in wanted if not -seq_len <= p < seq_len]
    if bad:
        raise IndexError(
            f"position(s) {bad} out of range for a sequence of length {seq_len} "
            f"(valid: {-seq_len}..{seq_len - 1})"
        )
    index = torch.tensor(wanted, device=activation.device)
    picked = activation.index_select(pos_dim, index % seq_len)
    return picked.squeeze(pos_dim) if single else picked


Inputs = Sequence[str] | Sequence[Sequence[int]] | torch.Tensor | TokenRowStream


@renamed_keywords(max_length="context_length")
def capture_to_store(
    model: HookedModel,
    texts: Inputs,
    hooks: str | Sequence[str],
    path: str | Path,
    *,
    batch_size: int = 16,
    context_length: int = 128,
    positions: Positions = None,
    dtype: torch.dtype = torch.float32,
    dataset: str = "texts",
    checkpoint: int | None = None,
    shard_rows: int = 65536,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Stream ``texts`` through ``model`` and store the activations of ``hooks`` for every real token.

    ``texts``: strings (tokenized by the model), token-id lists, token ids [n, pos] (all real), or a dataset's
    :class:`~workbench.datasets.TokenRowStream` (read from the source batch by batch: memory holds one batch and one
    shard however large the dataset; this is what ``workbench capture`` passes). Each row is one
    (sequence, position); padding is dropped, and ``positions`` (int, list, slice or "last", counted within each
    sequence's real tokens) keeps only those; an int or listed position must exist in every sequence (IndexError
    naming the shortest length otherwise), a slice must select at least one token overall. Empty inputs are
    refused. ``checkpoint`` defaults to the model's. RAM is bounded by one batch plus one shard. An interrupted
    capture resumes after the last sequence written; resuming with other inputs, ``context_length`` or ``positions``
    raises StoreError. A rerun on a finished store verifies every shard's checksum and returns it.
    """
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size={batch_size} and context_length={context_length} must be positive")
    if len(texts) == 0:
        raise StoreError(f"no inputs to capture into {path}; pass at least one text or token sequence")
    names = model.resolve(hooks)
    model.check_context_length(_widest(texts, context_length))
    _check_positions(
        positions, _lengths(model, texts, context_length, batch_size) if positions is not None else None
    )
    recipe = {
        "inputs_sha256": texts.fingerprint if isinstance(texts, TokenRowStream) else _fingerprint(texts),
        "n_inputs": len(texts),
        "context_length": context_length,
        "positions": _describe_positions(positions),
    }
    store = ActivationStore.create(
        path,
        model=model.cfg.name,
        checkpoint=model.cfg.checkpoint if checkpoint is None else checkpoint,
        hooks=names,
        dataset=dataset,
        dtype=dtype,
        shard_rows=shard_rows,
        resume=resume,
        overwrite=overwrite,
        extra={"capture": recipe},
    )
    stored = store.manifest["extra"].get("capture")
    if stored is not None and "max_length" in stored:  # captured before context_length was its name
        stored = {("context_length" if k == "max_length" else k): v for k, v in stored.items()}
    if stored != recipe:
        changed = sorted(k for k in recipe if (stored or {}).get(k) != recipe[k])
        raise StoreError(
            f"{path} was captured from other inputs or settings ({', '.join(changed)} differ); write to a new path "
            "or pass overwrite=True"
        )
    store.verify()
    if store.manifest["complete"]:
        return store
    start = store.manifest["sequences_done"]
    bar = tqdm(
        total=len(texts), initial=start, desc=f"capture → {Path(path).name}", unit="seq", disable=not progress
    )
    for begin, chunk in _chunks(texts, start, batch_size):
        batch = _encode(model, chunk, context_length)
        keep = _position_mask(batch["attention_mask"].bool(), positions)
        with torch.no_grad(), model.capture(names, dtype=dtype) as cache:
            model(batch)
        rows: dict[str, torch.Tensor] = {}
        for name in names:
            value = cache[name]
            if name.endswith(("hook_entropy", "hook_sink", "hook_lse", "hook_max_logit")):
                value = value.transpose(1, 2)
            if tuple(value.shape[:2]) != tuple(keep.shape):
                raise StoreError(
                    f"{name} has shape {list(value.shape)}, not [batch, pos, ...] = {list(keep.shape)}; "
                    "only per-token hooks can be stored as rows (capture attention patterns in memory instead)"
                )
            rows[name] = value[keep.to(value.device)]
        sequence, position = keep.nonzero(as_tuple=True)
        store.append(
            rows,
            batch["input_ids"][keep],
            sequence=sequence + begin,
            position=position,
            sequences_done=begin + len(chunk),
        )
        bar.update(len(chunk))
    bar.close()
    if store.n_rows + store.pending_rows == 0:
        raise StoreError(
            f"the inputs hold no tokens to store in {path} (every sequence is empty after tokenization"
            + (f" or lacks positions {positions!r}" if positions is not None else "")
            + "); pass non-empty inputs"
        )
    return store.finalize()


def _chunks(texts: Inputs, start: int, batch_size: int) -> Iterator[tuple[int, Inputs]]:
    """(index of the chunk's first input, up to ``batch_size`` inputs) from input ``start`` on; a stream is read
    from its beginning, the inputs before ``start`` (already in a resumed store) skipped without a forward."""
    if not isinstance(texts, TokenRowStream):
        for begin in range(start, len(texts), batch_size):
            yield begin, texts[begin : begin + batch_size]
        return
    pending: list[list[int]] = []
    for index, row in enumerate(texts):
        if index < start:
            continue
        pending.append(row)
        if len(pending) == batch_size:
            yield index + 1 - batch_size, pending
            pending = []
    if pending:
        yield len(texts) - len(pending), pending


def _widest(texts: Inputs, context_length: int) -> int:
    """The longest sequence of token ids ``texts`` gives the model after truncation to ``context_length``; 0 for
    strings, whose lengths are known once tokenized (a too-long one is refused by the model's forward)."""
    if isinstance(texts, torch.Tensor):
        return (
            min(texts.shape[-1], context_length) if texts.ndim == 2 and not texts.is_floating_point() else 0
        )
    if isinstance(texts, TokenRowStream):
        return min(texts.widest, context_length)
    if all(isinstance(t, str) for t in texts):
        return 0
    return min(max(len(t) for t in texts), context_length)


def _lengths(model: HookedModel, texts: Inputs, context_length: int, batch_size: int) -> list[int]:
    """Real-token count of every input after tokenization and truncation to ``context_length``."""
    if isinstance(texts, torch.Tensor):
        return [min(texts.shape[-1], context_length)] * len(texts) if texts.ndim == 2 else []
    if isinstance(texts, TokenRowStream):
        return [min(len(row), context_length) for row in texts]
    step = max(batch_size, 256)
    return [
        int(n)
        for begin in range(0, len(texts), step)
        for n in _encode(model, texts[begin : begin + step], context_length)["attention_mask"].sum(1).tolist()
    ]


def _check_positions(positions: Positions, lengths: list[int] | None) -> None:
    """Refuse ``positions`` up front: a kind that is not int / list / slice / "last", an int or listed position
    that some sequence lacks (IndexError naming the shortest length), or a slice that selects nothing."""
    if positions is None or positions == "last":
        return
    if isinstance(positions, str):
        raise ValueError(f"positions={positions!r}; use an int, a list of ints, a slice or 'last'")
    if isinstance(positions, slice):
        if lengths is not None and not any(len(range(n)[positions]) for n in lengths):
            raise IndexError(
                f"positions={positions} selects no token of any sequence (longest {max(lengths)} tokens); "
                "choose a slice within the sequences or raise --context-length"
            )
        return
    wanted = [positions] if isinstance(positions, int) else list(positions)
    if not wanted or not all(isinstance(p, int) and not isinstance(p, bool) for p in wanted):
        raise ValueError(f"positions={positions!r}; use an int, a non-empty list of ints, a slice or 'last'")
    if not lengths:
        return
    shortest = min(lengths)
    outside = [p for p in wanted if not -shortest <= p < shortest]
    if outside:
        lacking = sum(1 for n in lengths if any(not -n <= p < n for p in outside))
        raise IndexError(
            f"positions {outside} are out of range for {lacking} of {len(lengths)} sequences (shortest "
            f"{shortest} tokens; valid positions there are {-shortest}..{shortest - 1}); raise the context "
            "length (--context-length), drop the shorter inputs, or count from the end with a negative position"
        )


def _encode(model: HookedModel, chunk: Inputs, context_length: int) -> dict[str, torch.Tensor]:
    """A slice of the inputs as input_ids / attention_mask [batch, pos], right-padded and truncated."""
    if isinstance(chunk, torch.Tensor):
        if chunk.ndim != 2 or chunk.is_floating_point():
            raise ValueError(
                f"token ids must be an integer tensor [n, pos]; got {chunk.dtype} {list(chunk.shape)}"
            )
        ids = chunk[:, :context_length].long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if all(isinstance(item, str) for item in chunk):
        return model.tokenize(list(cast("Sequence[str]", chunk)), context_length=context_length)
    sequences = [torch.as_tensor(list(item), dtype=torch.long)[:context_length] for item in chunk]
    if any(s.ndim != 1 or len(s) == 0 for s in sequences):
        raise ValueError("each input must be a non-empty text or a non-empty list of token ids")
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    lengths = torch.tensor([len(s) for s in sequences])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def _position_mask(mask: torch.Tensor, positions: Positions) -> torch.Tensor:
    """Which (sequence, position) cells to keep [batch, pos]: real tokens, narrowed to ``positions`` counted
    within each sequence's real length (negative ints from its last real token)."""
    if positions is None:
        return mask
    lengths = mask.sum(1)
    keep = torch.zeros_like(mask)
    for row, length in enumerate(lengths.tolist()):
        if positions == "last":
            picked: Sequence[int] | range = [length - 1]
        elif isinstance(positions, str):
            raise ValueError(f"positions={positions!r}; use an int, a list of ints, a slice or 'last'")
        elif isinstance(positions, slice):
            picked = range(length)[positions]
        else:
            wanted = [positions] if isinstance(positions, int) else list(positions)
            picked = [p + length if p < 0 else p for p in wanted if -length <= p < length]
        keep[row, list(picked)] = True
    return keep & mask


def _describe_positions(positions: Positions) -> Any:
    if isinstance(positions, slice):
        return {"slice": [positions.start, positions.stop, positions.step]}
    if positions is None or isinstance(positions, (int, str)):
        return positions
    return [int(p) for p in positions]


def _fingerprint(texts: Inputs) -> str:
    """sha256 of the capture inputs, so a resume can check it continues the same corpus."""
    digest = hashlib.sha256()
    if isinstance(texts, torch.Tensor):
        digest.update(str(list(texts.shape)).encode())
        digest.update(texts.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()
    for item in texts:
        if isinstance(item, str):
            digest.update(b"s" + item.encode("utf-8", "surrogatepass") + b"\0")
        else:
            digest.update(b"t" + np.asarray(list(item), dtype=np.int64).tobytes() + b"\0")
    return digest.hexdigest()
