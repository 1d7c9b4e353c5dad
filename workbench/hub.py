"""The Hugging Face hub as the workbench sees it: the local cache's layout, offline mode, reachability, a repo's
``stepN`` branches and a cached snapshot's weight fingerprint.

Model references (:mod:`workbench.references`) and checkpoint series (:mod:`workbench.checkpoints`) both read the
hub through this module; it imports neither. Failures are :class:`HubError`.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "HubError",
    "hub_cache_dir",
    "hub_cached_revisions",
    "hub_offline",
    "hub_reachable",
    "hub_step_branches",
    "hub_weights_fingerprint",
    "repo_cache",
    "where_looked",
]


class HubError(ValueError):
    """The hub could not answer what was asked (a repo's branches); the message names the repo and the cause."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the cache only."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def repo_cache(repo: str) -> Path:
    """The cache folder of model repo ``repo`` (``models--ORG--NAME``; it need not exist)."""
    return hub_cache_dir() / f"models--{repo.replace('/', '--')}"


def hub_cached_revisions(repo: str) -> dict[str, str]:
    """Branch/tag name -> commit for ``repo`` in the local hub cache (``refs/``), {} when not cached."""
    refs = repo_cache(repo) / "refs"
    if not refs.is_dir():
        return {}
    return {str(p.relative_to(refs)): p.read_text().strip() for p in refs.rglob("*") if p.is_file()}


def hub_step_branches(repo: str) -> list[int]:
    """Steps N of the ``stepN`` branches of ``repo``: from the local cache, plus the hub's own list when online.

    Raises HubError when the hub cannot list them and the cache holds none."""
    names = set(hub_cached_revisions(repo))
    if not hub_offline() and hub_reachable():
        from huggingface_hub import list_repo_refs  # the hub client only when the hub is asked

        try:
            names |= {branch.name for branch in list_repo_refs(repo).branches}
        except Exception as err:  # noqa: BLE001 - any hub failure means: use what the cache holds
            if not names:
                raise HubError(f"could not list the branches of {repo!r} on the hub: {err}") from None
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"step(\d+)", n)))


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub endpoint (``$HF_ENDPOINT``, default huggingface.co) accepts a connection within ``timeout``."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout):
            return True
    except OSError:
        return False


def where_looked() -> str:
    """Where a repo was looked for, for error messages: the cache folder, and whether offline mode is set."""
    return f"in the hub cache {hub_cache_dir()}" + (" (HF_HUB_OFFLINE is set)" if hub_offline() else "")


def hub_weights_fingerprint(repo: str, revision: str) -> str | None:
    """A sha256 of the weight files the cached snapshot of ``repo@revision`` links to (the hub names LFS blobs by
    their sha256, so equal weights give equal fingerprints); None when the revision or its weights are not cached."""
    cached = repo_cache(repo)
    ref = cached / "refs" / revision
    if not ref.is_file():
        return None
    snapshot = cached / "snapshots" / ref.read_text().strip()
    weights = sorted(p for p in snapshot.glob("*") if p.suffix in (".safetensors", ".bin"))
    if not weights:
        return None
    return hashlib.sha256("".join(f"{p.name}={p.resolve().name};" for p in weights).encode()).hexdigest()
