"""CheckpointSeries: one object over a training run's checkpoints, loaded lazily (one in memory at a time).

series = CheckpointSeries.from_directory("workspace/models/code-small")      # step0/ step1/ … step1000/
series = CheckpointSeries.from_hub("EleutherAI/pythia-70m", steps=[0, 1000, 143000])   # hub or its cache
for model in series:             # HookedModel with model.cfg.checkpoint == step, progress bar; byte-identical
    ...                          # checkpoints are loaded once (series.duplicates says which)
Any model reference becomes a series through ``workbench.references.resolve_series`` (``workbench.load_series``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from workbench.fileio import CHECKSUMS_FILE, verify_checksums
from workbench.hub import hub_weights_fingerprint
from workbench.identity import STEP_DIR, directory_identity
from workbench.model import HookedModel, load_tokenizer

log = logging.getLogger(__name__)
PYTHIA_STEPS = [0, *(2**i for i in range(10)), *range(1000, 143001, 1000)]


class CheckpointError(ValueError):
    """A checkpoint is missing or damaged; the message names its step and path."""


class CheckpointSeries:
    """Checkpoints of one training run, by training step. ``load(step)`` returns a HookedModel."""

    def __init__(
        self,
        name: str,
        steps: Sequence[int],
        locate: Any,
        *,
        revision_format: str | None = None,
        skip_damaged: bool = False,
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.steps = sorted(int(s) for s in steps)
        self._locate = locate
        self.revision_format = revision_format
        self.skip_damaged = skip_damaged
        self.load_kwargs = load_kwargs or {}
        self.skipped: dict[int, str] = {}
        self.duplicates: dict[int, int] = {}
        self._preloaded: HookedModel | None = None

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_directory(
        cls,
        path: str | Path,
        *,
        skip_damaged: bool = False,
        load_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> CheckpointSeries:
        """A directory of ``step<N>/`` folders in ``save_pretrained`` layout (tokenizer at the root or in each);
        ``name`` its identity (default: :func:`workbench.identity.directory_identity` of the directory)."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        steps = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
        if not steps:
            raise CheckpointError(
                f"{root} holds no step<N>/ checkpoint folders; train one with `workbench zoo train NAME` or point "
                "at a directory of save_pretrained checkpoints named step0, step1, …"
            )
        return cls(
            name or directory_identity(root),
            steps,
            lambda step: root / f"step{step}",
            skip_damaged=skip_damaged,
            load_kwargs=load_kwargs,
        )

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        steps: Sequence[int] | None = None,
        *,
        revision_format: str = "step{step}",
        skip_damaged: bool = False,
        **load_kwargs: Any,
    ) -> CheckpointSeries:
        """Hub revisions of one model, e.g. Pythia's ``EleutherAI/pythia-70m`` at revisions ``step1000``.

        ``steps`` defaults to Pythia's 154 published checkpoints (``workbench.references.resolve_series`` lists
        the repo's real ``stepN`` branches instead). Loading needs the hub or a populated HF cache
        (``HF_HUB_OFFLINE=1`` uses only the cache).
        """
        return cls(
            repo_id,
            steps if steps is not None else PYTHIA_STEPS,
            lambda step: repo_id,
            revision_format=revision_format,
            skip_damaged=skip_damaged,
            load_kwargs=load_kwargs,
        )

    @classmethod
    def single(cls, model: HookedModel) -> CheckpointSeries:
        """A one-checkpoint series over an already loaded model (its ``cfg.checkpoint``, or step 0)."""
        step = model.cfg.checkpoint if model.cfg.checkpoint is not None else 0
        series = cls(model.cfg.name, [step], lambda _step: model.cfg.name)
        series._preloaded = model
        return series

    def restrict(self, steps: Sequence[int]) -> CheckpointSeries:
        """The same series over ``steps`` only (each must exist)."""
        missing = sorted(set(int(s) for s in steps) - set(self.steps))
        if missing:
            raise CheckpointError(f"{self.name} has no checkpoint at step(s) {missing}; steps: {self.steps}")
        series = CheckpointSeries(
            self.name,
            steps,
            self._locate,
            revision_format=self.revision_format,
            skip_damaged=self.skip_damaged,
            load_kwargs=self.load_kwargs,
        )
        series._preloaded = self._preloaded
        return series

    # ------------------------------------------------------------------ loading
    def location(self, step: int) -> str | Path:
        if step not in self.steps:
            raise CheckpointError(f"{self.name} has no checkpoint at step {step}; steps: {self.steps}")
        return self._locate(step)

    def revision(self, step: int) -> str | None:
        return self.revision_format.format(step=step) if self.revision_format else None

    def tokenizer(self, step: int | None = None) -> Any:
        """The tokenizer of the checkpoint at ``step`` (default: the first), without loading its weights."""
        if self._preloaded is not None:
            return self._preloaded.tokenizer
        step = self.steps[0] if step is None else step
        return load_tokenizer(
            self.location(step),
            revision=self.revision(step),
            trust_remote_code=bool(self.load_kwargs.get("trust_remote_code", False)),
        )

    def load(self, step: int) -> HookedModel:
        """The checkpoint at ``step`` as a HookedModel (``cfg.checkpoint == step``, ``cfg.name`` the series)."""
        if self._preloaded is not None:
            return self._preloaded
        where = self.location(step)
        if isinstance(where, Path):
            _check_local_checkpoint(where, step)
        model = HookedModel.from_pretrained(
            where, revision=self.revision(step), checkpoint=step, **self.load_kwargs
        )
        model.cfg.name = self.name
        return model

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[HookedModel]:
        return self.iter(progress=True)

    def fingerprint(self, step: int) -> str | None:
        """A content hash of the checkpoint's weight files (None when it cannot be had without downloading).

        Local step folders hash ``checksums.json`` when present (else the files' bytes); a hub checkpoint in the
        local cache hashes the blob names its snapshot links to (the hub names LFS blobs by their sha256).
        """
        if self._preloaded is not None:
            return None
        where = self.location(step)
        if isinstance(where, Path):
            record = where / CHECKSUMS_FILE
            if record.is_file():
                return hashlib.sha256(record.read_bytes()).hexdigest()
            digest = hashlib.sha256()
            for file in sorted(where.glob("*.safetensors")):
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
            return digest.hexdigest()
        return hub_weights_fingerprint(str(where), self.revision(step) or "main")

    def iter(
        self, steps: Sequence[int] | None = None, progress: bool = True, dedupe: bool = True
    ) -> Iterator[HookedModel]:
        """Yield each checkpoint's HookedModel in step order; only one is referenced by the series at a time.

        With ``dedupe`` a checkpoint byte-identical to an earlier one (same :meth:`fingerprint`) is not loaded
        again: it is recorded in ``self.duplicates`` (step -> the earlier step) and logged once. Damaged
        checkpoints raise CheckpointError, or are skipped (recorded in ``self.skipped``) when the series was made
        with ``skip_damaged=True``.
        """
        seen: dict[str, int] = {}
        for step in tqdm(
            steps or self.steps, desc=f"checkpoints of {self.name}", unit="ckpt", disable=not progress
        ):
            if dedupe:
                key = self.fingerprint(step)
                if key is not None and key in seen:
                    self.duplicates[step] = seen[key]
                    continue
                if key is not None:
                    seen[key] = step
            try:
                model = self.load(step)
            except CheckpointError as err:
                if not self.skip_damaged:
                    raise
                self.skipped[step] = str(err)
                continue
            yield model
            del model
        if self.duplicates:
            log.warning(
                "%s: %d checkpoint(s) are byte-identical to an earlier one and were analysed once: %s",
                self.name,
                len(self.duplicates),
                ", ".join(f"step {s} = step {o}" for s, o in sorted(self.duplicates.items())),
            )

    def __repr__(self) -> str:
        return f"CheckpointSeries({self.name!r}, {len(self.steps)} steps: {self.steps[:4]}…{self.steps[-1:]})"


def _check_local_checkpoint(path: Path, step: int) -> None:
    """Raise CheckpointError (with step and path) for a missing or truncated local checkpoint."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint for step {step} is missing: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint for step {step} at {path} has no config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"checkpoint for step {step} at {path} has no .safetensors weights")
    for file in weights:
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                header_len = struct.unpack("<Q", handle.read(8))[0]
                if header_len > size - 8:
                    raise ValueError("header longer than file")
                header = json.loads(handle.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"checkpoint for step {step}: {file} is not a valid safetensors file ({err})"
            ) from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise CheckpointError(
                f"checkpoint for step {step}: {file} is truncated or corrupt ({size} bytes, header says "
                f"{8 + header_len + end}); re-save it, or load the series with skip_damaged=True"
            )
    damaged = verify_checksums(path)
    if damaged:
        raise CheckpointError(
            f"checkpoint for step {step} at {path}: {', '.join(damaged)} differ from {CHECKSUMS_FILE} (corrupted "
            "on disk); restore or re-save the checkpoint, or load the series with skip_damaged=True"
        )
