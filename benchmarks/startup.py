"""Start-up cost of the command line (issue 34: `workbench --help` and `workbench info MODEL` in ≤ 1.5 s of imports).

Measures, in fresh interpreters, best of ``--repeats``:
- the import time of ``workbench.cli`` (what every command pays before it runs), from ``python -X importtime``;
- wall time of ``workbench --help`` (imports + listing every core and plugin command);
- for ``workbench info MODEL``: the imports before the command starts, and the torch / transformers imports the
  command then needs to load the model (imported where used, so a command that needs no model never pays them).

Run: ``.venv/bin/python benchmarks/startup.py [--model minilm] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def import_seconds(module: str) -> float:
    """Cumulative import time of ``module`` in a fresh interpreter (``-X importtime``'s top-level row), seconds."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    rows = [line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:")]
    return max(int(row[1]) for row in rows[1:] if row[2].strip() == module) / 1e6


def wall_seconds(command: list[str]) -> float:
    """Wall time of a fresh process running ``command``, seconds."""
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="model reference for `workbench info`")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    cli = min(import_seconds("workbench.cli") for _ in range(args.repeats))
    torch_import = min(import_seconds("torch") for _ in range(args.repeats))
    help_wall = min(
        wall_seconds([sys.executable, "-m", "workbench.cli", "--help"]) for _ in range(args.repeats)
    )
    bare = min(wall_seconds([sys.executable, "-c", "pass"]) for _ in range(args.repeats))
    info_wall = min(
        wall_seconds([sys.executable, "-m", "workbench.cli", "info", args.model]) for _ in range(args.repeats)
    )
    print("| what | seconds |")
    print("|---|---|")
    print(f"| imports of `workbench.cli` (every command, before it runs) | {cli:.2f} |")
    print(f"| `workbench --help`, wall (interpreter start {bare:.2f} s included) | {help_wall:.2f} |")
    print(f"| `import torch` alone (paid only by commands that load a model) | {torch_import:.2f} |")
    print(f"| `workbench info {args.model}`, wall (load and describe the model) | {info_wall:.2f} |")
    verdict = "meets" if cli <= 1.5 else "misses"
    print(f"start-up imports {cli:.2f} s: {verdict} the 1.5 s target")


if __name__ == "__main__":
    main()
