"""Model identity: the one key every result row, store, SAE, run and job task of a model carries.

A model's identity is its resolved reference, never a folder's base name:
    workspace model        ``code-small``                    (``<workspace>/models/NAME``, however it is spelled)
    any other directory    ``/abs/path/to/run``              (resolved: relative and absolute spellings agree)
    hub repo               ``EleutherAI/pythia-70m``         (the revision or step is the row's checkpoint)
    TransformerLens        ``tl:gpt2``
    packaged               ``minilm``
A series and its checkpoints share the series' identity (``DIR@300``, ``DIR/step300`` and ``DIR@last`` at step 300
are one checkpoint of one model). Two directories never share an identity, even with equal base names
(``exp-a/checkpoints``, ``exp-b/checkpoints``).

:func:`identity_slug` turns an identity into one file-name component for default ids (a directory's base name
plus a hash of its path: ``checkpoints-3f2a9c1d``), :func:`display_name` into the short label tables and the
dashboard show (``exp-a/checkpoints``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Any

STEP_DIR = re.compile(r"^step(\d+)$")
WORKSPACE_MARKERS = (
    "results.duckdb",
    "stores",
    "jobs",
    "saes",
    "codebooks",
)  # what a workspace holds beside models/


def workspace_model_name(path: Path, workspace_root: Path | None = None) -> str | None:
    """NAME when ``path`` is ``<workspace>/models/NAME``: of ``workspace_root`` (the workspace in use), or of a
    directory that holds a workspace's other parts beside ``models/``; else None."""
    parent = path.parent
    if parent.name != "models":
        return None
    if workspace_root is not None and parent == Path(workspace_root).expanduser().resolve() / "models":
        return path.name
    return path.name if any((parent.parent / marker).exists() for marker in WORKSPACE_MARKERS) else None


def _series_member(resolved: Path) -> tuple[Path, int] | None:
    """(series root, N) when ``resolved`` is a ``step<N>`` folder of a series (its parent is no saved model)."""
    match = STEP_DIR.match(resolved.name)
    if match and not (resolved.parent / "config.json").is_file():
        return resolved.parent, int(match.group(1))
    return None


def directory_identity(path: str | Path, workspace_root: str | Path | None = None) -> str:
    """The identity of a saved model or checkpoint series directory; a ``step<N>`` folder of a series gives the
    series' identity (its step: :func:`directory_step`). ``workspace_root``: the workspace in use, whose models
    are known by name."""
    resolved = Path(path).expanduser().resolve()
    member = _series_member(resolved)
    root = member[0] if member else resolved
    return workspace_model_name(root, Path(workspace_root) if workspace_root else None) or root.as_posix()


def directory_step(path: str | Path) -> int | None:
    """N when ``path`` is the ``step<N>`` folder of a series, else None."""
    member = _series_member(Path(path).expanduser().resolve())
    return member[1] if member else None


def is_path_identity(identity: str) -> bool:
    """True for the identity of a directory outside a workspace (an absolute path)."""
    return PurePosixPath(identity).is_absolute()


def identity_slug(identity: str) -> str:
    """One file-name component for ``identity``: a directory's base name and 8 hex digits of its path's hash;
    other identities as they are, with '/' as '--' (``EleutherAI--pythia-70m``) and ':' as '-' (``tl-gpt2``)."""
    if is_path_identity(identity):
        digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
        text = f"{PurePosixPath(identity).name}-{digest}"
    else:
        text = identity.replace("/", "--").replace(":", "-")
    text = re.sub(r"[^\w.@+-]+", "-", text)
    return re.sub(r"\.{2,}", ".", text).strip("-.") or "model"


def display_name(identity: str) -> str:
    """The short label for tables and the dashboard: a directory's last two path components
    (``exp-a/checkpoints``), any other identity as it is."""
    if is_path_identity(identity):
        parts = PurePosixPath(identity).parts
        return "/".join(parts[-2:]) if len(parts) > 2 else identity
    return identity


def provenance_note(owner: str | None, owner_step: int | None, model: Any, verb: str = "trained") -> str:
    """Where an SAE, transcoder, probe or codebook run that fits ``model`` (same hooks and widths) was made, when
    not on this model and checkpoint — ``"trained on OWNER, this model is NAME (same hooks and widths)"`` or
    ``"trained on checkpoint S, this is T"`` (``verb`` for probes: "fitted") — and "" for the model's own."""
    if owner and owner != model.cfg.name:
        return f"{verb} on {owner}, this model is {model.cfg.name} (same hooks and widths)"
    if owner_step is not None and model.cfg.checkpoint not in (None, owner_step):
        return f"{verb} on checkpoint {owner_step}, this is {model.cfg.checkpoint}"
    return ""
