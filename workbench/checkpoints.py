"""CheckpointSeries: one object over a training run's checkpoints, loaded lazily (one in memory at a time).

series = CheckpointSeries.from_directory("workspace/models/code-small")      # step0/ step1/ … step1000/
series = CheckpointSeries.from_hub("EleutherAI/pythia-70m", steps=[0, 1000, 143000])   # needs network
for model in series:             # HookedModel with model.cfg.checkpoint == step, progress bar
    ...
load_series(...)                 # the same, from a directory, a workspace zoo name, or a hub name
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.model import HookedModel

STEP_DIR = re.compile(r"^step(\d+)$")
PYTHIA_STEPS = [0, *(2**i for i in range(10)), *range(1000, 143001, 1000)]


class CheckpointError(RuntimeError):
    """A checkpoint is missing or damaged; the message names its step and path."""


class CheckpointSeries:
    """Checkpoints of one training run, by training step. ``load(step)`` returns a HookedModel."""

    def __init__(self, name: str, steps: Sequence[int], locate: Any, *, revision_format: str | None = None,
                 skip_damaged: bool = False, load_kwargs: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.name = name
        self.steps = sorted(int(s) for s in steps)
        self._locate = locate
        self.revision_format = revision_format
        self.skip_damaged = skip_damaged
        self.load_kwargs = load_kwargs or {}
        self.skipped: dict[int, str] = {}

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_directory(cls, path: str | Path, *, skip_damaged: bool = False) -> CheckpointSeries:
        """A directory of ``step<N>/`` folders in ``save_pretrained`` layout (tokenizer at the root or in each)."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        steps = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
        if not steps:
            raise CheckpointError(
                f"{root} holds no step<N>/ checkpoint folders; train one with `workbench zoo train NAME` or point "
                "at a directory of save_pretrained checkpoints named step0, step1, …"
            )
        return cls(root.name, steps, lambda step: root / f"step{step}", skip_damaged=skip_damaged)

    @classmethod
    def from_hub(cls, repo_id: str, steps: Sequence[int] | None = None, *, revision_format: str = "step{step}",
                 skip_damaged: bool = False, **load_kwargs: Any) -> CheckpointSeries:  # fmt: skip
        """Hub revisions of one model, e.g. Pythia's ``EleutherAI/pythia-70m`` at revisions ``step1000``.

        ``steps`` defaults to Pythia's 154 published checkpoints. Loading needs network access to the hub (or a
        populated HF cache); set ``HF_HUB_OFFLINE=1`` to use only the cache.
        """
        return cls(repo_id, steps if steps is not None else PYTHIA_STEPS, lambda step: repo_id,
                   revision_format=revision_format, skip_damaged=skip_damaged, load_kwargs=load_kwargs)  # fmt: skip

    # ------------------------------------------------------------------ loading
    def location(self, step: int) -> str | Path:
        if step not in self.steps:
            raise CheckpointError(f"{self.name} has no checkpoint at step {step}; steps: {self.steps}")
        return self._locate(step)

    def revision(self, step: int) -> str | None:
        return self.revision_format.format(step=step) if self.revision_format else None

    def load(self, step: int) -> HookedModel:
        """The checkpoint at ``step`` as a HookedModel (``cfg.checkpoint == step``, ``cfg.name`` the series)."""
        from workbench.model import HookedModel

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

    def iter(self, steps: Sequence[int] | None = None, progress: bool = True) -> Iterator[HookedModel]:
        """Yield each checkpoint's HookedModel in step order; only one is referenced by the series at a time.

        Damaged checkpoints raise CheckpointError, or are skipped (recorded in ``self.skipped``) when the series
        was made with ``skip_damaged=True``.
        """
        from tqdm.auto import tqdm

        for step in tqdm(
            steps or self.steps, desc=f"checkpoints of {self.name}", unit="ckpt", disable=not progress
        ):
            try:
                model = self.load(step)
            except CheckpointError as err:
                if not self.skip_damaged:
                    raise
                self.skipped[step] = str(err)
                continue
            yield model
            del model

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


def load_series(
    source: str | Path, *, workspace: str | Path | None = None, **kwargs: Any
) -> CheckpointSeries:
    """A checkpoint series from a directory, a zoo model name in the workspace, or a hub repo id (Pythia)."""
    path = Path(source)
    if path.is_dir():
        return CheckpointSeries.from_directory(path, **kwargs)
    from workbench.workspace import Workspace

    zoo_dir = Workspace(workspace).model_dir(str(source)) if "/" not in str(source) else None
    if zoo_dir is not None and zoo_dir.is_dir():
        return CheckpointSeries.from_directory(zoo_dir, **kwargs)
    if "/" in str(source):
        return CheckpointSeries.from_hub(str(source), **kwargs)
    from workbench.zoo.train import SPECS

    raise CheckpointError(
        f"{source!r} is neither a directory nor a trained zoo model in {Workspace(workspace).models_dir}; "
        f"train one with `workbench zoo train NAME` (names: {', '.join(SPECS)}) or give a hub id like "
        "EleutherAI/pythia-70m"
    )
