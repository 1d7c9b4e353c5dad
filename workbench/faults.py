"""Fault injection for the crash-safety tests: named write boundaries where a test can kill the process.

Every writer calls ``crash_point("<writer>.<boundary>")`` between the writes that must survive a crash. With
``WORKBENCH_CRASH_AT=<name>`` (or ``<name>#N``, the N-th time that point is reached) in the environment the
process kills itself with SIGKILL there, exactly like ``kill -9`` at that moment; unset, a call costs one
dictionary lookup. ``WORKBENCH_CRASH_AT`` is meant for tests only.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV_VAR = "WORKBENCH_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Kill this process (SIGKILL) if ``$WORKBENCH_CRASH_AT`` names this point (``name`` or ``name#N``)."""
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    point, _, count = target.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] >= (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)
