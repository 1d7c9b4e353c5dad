"""Renamed keyword arguments and settings keys, kept for one release: the old name still works and warns.

    @renamed_keywords(max_length="context_length")
    def capture_to_store(model, texts, hooks, path, *, context_length=128): ...

    capture_to_store(..., max_length=64)     # DeprecationWarning: ... use context_length=
    table = renamed_keys(toml_table, {"seq_len": "context_length"}, where="jobs.toml [settings]")

The command line's old option and command spellings go through ``workbench.cli_options`` instead
(``add_deprecated_alias``, ``deprecation_note``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
# What every deprecation message says, so the command line can show these warnings (workbench.cli).
WHEN = "is deprecated (it goes in the next release)"


def renamed_keys(
    table: Mapping[str, Any], renames: Mapping[str, str], where: str, *, keywords: bool = False
) -> dict[str, Any]:
    """``table`` with each old key of ``renames`` (old -> new) under its new name, warning once per old key
    found; a table that gives both names is refused (ValueError naming both; TypeError for ``keywords``, the
    keyword arguments of a call, spelt ``name=``)."""
    result = dict(table)
    for old, new in renames.items():
        if old not in result:
            continue
        was, now = (f"{old}=", f"{new}=") if keywords else (repr(old), repr(new))
        if new in result:
            error = TypeError if keywords else ValueError
            raise error(f"{where} gives both {was} and {now}; keep {now} only ({was} is its old name)")
        warnings.warn(
            f"{was} in {where} {WHEN}; use {now}", DeprecationWarning, stacklevel=3 if keywords else 2
        )
        result[new] = result.pop(old)
    return result


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorate a function whose keyword arguments were renamed (``old="new"``): a call with an old name passes
    the value as the new one after a DeprecationWarning; a call with both names is a TypeError."""

    def decorate(function: F) -> F:
        where = f"{function.__qualname__}()"

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **renamed_keys(kwargs, renames, where, keywords=True))

        return wrapper  # type: ignore[return-value]  # same signature as function, plus the old names

    return decorate
