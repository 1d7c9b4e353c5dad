"""Where codebook runs live: ``workspace/codebooks/<run>/``, and the default run name of a model reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.circuits.codebook.module import CodebookError
from workbench.references import short_name
from workbench.workspace import safe_name


def codebook_dir(workspace: Any, run_name: str) -> Path:
    """``workspace.root / "codebooks" / run_name`` (names with separators or '..' are refused)."""
    try:
        name = safe_name(run_name, "for a codebook run: use a plain name")
    except ValueError as err:
        raise CodebookError(str(err)) from None
    return Path(workspace.root) / "codebooks" / name


def default_run_name(reference: str) -> str:
    """``<short name>-codebooks`` for a model reference (``workbench.references.short_name``)."""
    return safe_name(f"{short_name(reference)}-codebooks", "for a codebook run")
