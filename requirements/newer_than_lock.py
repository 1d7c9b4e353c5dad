"""Name the installed packages whose version differs from the lock: `make test-latest` prints this when the suite
fails on the newest releases, so the release that broke it is named. Run with the interpreter of the venv to
compare: ``python newer_than_lock.py LOCK``."""

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> int:
    locked = {}
    for line in Path(lock).read_text().splitlines():
        match = PIN.match(line)
        if match:
            locked[canonical(match.group(1))] = match.group(2)
    changed = []
    for dist in distributions():
        name = canonical(dist.metadata["Name"])
        if name in locked and locked[name] != dist.version:
            changed.append(f"  {name} {dist.version} (lock: {locked[name]})")
    if changed:
        print("the suite failed on these releases, newer than the lock (the breaking one is among them):")
        print("\n".join(sorted(changed)))
    else:
        print("the newest releases equal the lock: the failure is not a new release")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
