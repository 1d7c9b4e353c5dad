"""Lay out a Hugging Face hub cache (``models--ORG--NAME/{blobs,snapshots,refs}``) from local checkpoints, so the
real hub code path (transformers + huggingface_hub with ``HF_HUB_OFFLINE=1``) is tested as a user with a warm
cache meets it. Blobs are named by the sha256 of their bytes, as the hub names LFS files; snapshots hold
relative symlinks to them; ``refs/<branch>`` holds the commit."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt")  # fmt: skip


def lay_out_hub_cache(cache: Path, repo: str, branches: dict[str, Path], main: str | None = None) -> Path:
    """Write ``repo`` into the hub cache at ``cache``: one commit per branch name -> checkpoint directory (its files,
    plus tokenizer files from the directory's parent when it has none). ``main`` names the branch ``refs/main``
    points to (default: the last one). Returns the repo's cache folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for folder in ("blobs", "snapshots", "refs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    commits = {}
    for branch, source in branches.items():
        files = {f.name: f for f in source.iterdir() if f.is_file() and f.name != "checksums.json"}
        for name in TOKENIZER_FILES:
            if name not in files and (source.parent / name).is_file():
                files[name] = source.parent / name
        digests = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
        commit = hashlib.sha1(f"{repo}:{branch}:{sorted(digests.items())}".encode()).hexdigest()
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, digest in digests.items():
            blob = root / "blobs" / digest
            if not blob.exists():
                shutil.copyfile(files[name], blob)
            link = snapshot / name
            if not link.exists():
                link.symlink_to(Path("..") / ".." / "blobs" / digest)
        (root / "refs" / branch).write_text(commit)
        commits[branch] = commit
    (root / "refs" / "main").write_text(commits[main or list(branches)[-1]])
    return root
