"""Reading the text corpora users pass on the command line."""

from __future__ import annotations

import json
from pathlib import Path


class TextFileError(ValueError):
    """A text file could not be read as a corpus; the message names the file, the place and the fix."""


def load_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """One text per non-empty line of a UTF-8 ``.txt`` file, or the ``"text"`` field of each ``.jsonl`` line."""
    path = Path(path)
    if not path.is_file():
        raise TextFileError(f"text file {path} does not exist")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise TextFileError(
            f"{path} is not UTF-8 (byte {err.start}, line {line}: {raw[err.start : err.start + 4]!r}); convert it, "
            f"e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from None
    lines = [line for line in content.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise TextFileError(
                    f'{path}:{number}: each JSONL line needs a "text" field ({err})'
                ) from None
        lines = texts
    if not lines:
        raise TextFileError(f"{path} holds no text; write one text per line")
    return lines[:limit] if limit else lines
