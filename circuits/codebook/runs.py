"""Where codebook runs live: ``workspace/codebooks/<run>/``, and the default run name of a model reference."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from circuits.codebook.module import CodebookError
from workbench.workspace import safe_name


def codebook_dir(workspace: Any, run_name: str) -> Path:
    """``workspace.root / "codebooks" / run_name`` (names with separators or '..' are refused)."""
    try:
        name = safe_name(run_name, "for a codebook run: use a plain name")
    except ValueError as err:
        raise CodebookError(str(err)) from None
    return Path(workspace.root) / "codebooks" / name


def default_run_name(reference: str) -> str:
    """``<short name>-codebooks`` for a model reference: a workspace name keeps its ``@STEP`` (``code-tiny@300``);
    a path gives its last component (a ``stepN`` folder: ``<parent>@N``); a hub id ``org/name`` gives
    ``org--name``."""
    text = str(reference).strip().rstrip("/\\")
    base, at, step = text.rpartition("@") if "@" in text else (text, "", "")
    path = Path(base).expanduser()
    if base.startswith(("/", ".", "~")) or path.exists():  # a directory
        if not at and re.fullmatch(r"step\d+", path.name) and path.parent.name:
            path, at, step = path.parent, "@", path.name[4:]
        short = (path.resolve() if path.exists() else path).name
    else:  # a workspace model, minilm, tl:NAME or a hub id org/name
        short = base.replace("/", "--")
    return safe_name(f"{short.lstrip('.')}{at}{step}-codebooks", "for a codebook run")
