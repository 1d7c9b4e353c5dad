"""The workspace: the one directory that holds zoo models, activation stores, results.duckdb and job state."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "WORKBENCH_WORKSPACE"


class Workspace:
    """A workspace rooted at ``path`` (default: ``$WORKBENCH_WORKSPACE`` or ``./workspace``).

    Layout: ``models/<name>/step<N>/`` checkpoints, ``stores/<name>/`` activation stores, ``jobs/`` batch-job
    state, ``results.duckdb`` the results database. Nothing is written outside it.
    """

    def __init__(self, path: str | Path | Workspace | None = None) -> None:
        if isinstance(path, Workspace):
            path = path.root
        self.root: Path = Path(path or os.environ.get(ENV_VAR) or "workspace").expanduser().resolve()

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def stores_dir(self) -> Path:
        return self.root / "stores"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def results_path(self) -> Path:
        return self.root / "results.duckdb"

    def model_dir(self, name: str) -> Path:
        return self.models_dir / safe_name(name)

    def store_dir(self, name: str) -> Path:
        return self.stores_dir / safe_name(name)

    def ensure(self) -> Workspace:
        """Create the workspace directories (idempotent)."""
        for directory in (self.models_dir, self.stores_dir, self.jobs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        return self

    def results(self):
        """The workspace's results database (:class:`workbench.results.ResultsDB`)."""
        from workbench.results import ResultsDB  # deferred: CLI start-up (pandas, duckdb)

        self.ensure()
        return ResultsDB(self.results_path)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"


def safe_name(name: str, purpose: str = "inside the workspace") -> str:
    """``name`` as a single, non-hidden path component: no separators, no '..', no leading '.'; the one check for
    every name the workbench turns into a file or directory (models, stores, SAEs, codebook runs)."""
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned or cleaned.startswith(".") or ".." in cleaned or any(c in cleaned for c in "/\\\0"):
        raise ValueError(
            f"{name!r} is not a valid name {purpose}; use letters, digits, '-', '_' and single dots "
            "(no '/', '\\', '..' or leading '.')"
        )
    return cleaned
