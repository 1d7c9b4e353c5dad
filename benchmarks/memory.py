"""Peak memory as the text file grows (issue 34: "memory bounded by the batch, not the dataset").

Each command runs as a user types it, in a fresh process, over the same generated text file at 1×, 4× and 16× its
base size (``--sizes``); the peak resident set of that process (``wait4``'s ``ru_maxrss``) and its wall time are
printed per size, then the ratio of the largest size's peak to the smallest's — flat means about 1.0. A command
that reads the whole file by default must say how much it will read and show progress: its first lines that say so
are printed beside it.

    python benchmarks/memory.py                                  # minilm; capture, massive, attention, sae train
    python benchmarks/memory.py --model DIR --lines 2000 --commands capture,massive
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBJECTS = (
    "the model",
    "a researcher",
    "this layer",
    "every head",
    "the probe",
    "our sparse code",
    "a network",
)
VERBS = ("reads", "writes", "predicts", "copies", "suppresses", "tracks", "moves", "amplifies", "ignores")
OBJECTS = (
    "the next token",
    "a rare feature",
    "the residual stream",
    "its own output",
    "the previous word",
    "a massive activation",
    "the first position",
    "a noisy signal",
    "the end of the line",
)


def write_text(path: Path, lines: int, seed: int) -> Path:
    """``lines`` generated two-clause sentences, one document per line (about 20 tokens each)."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(lines):
            clause = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
            other = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
            out.write(" ".join(clause) + " while " + " ".join(other) + ".\n")
    return path


def command_line(name: str, model: str, data: Path, workspace: Path, hook: str, sae_hook: str) -> list[str]:
    """The command as a user types it (``workbench`` from this environment)."""
    common = ["--data", str(data), "--workspace", str(workspace)]
    if name == "capture":
        return [
            "capture",
            model,
            "--hooks",
            hook,
            "--dtype",
            "float16",
            "--out",
            str(workspace / "store"),
            *common,
        ]
    if name == "massive":
        return ["massive", "run", model, "--hooks", hook, *common]
    if name == "attention":
        return ["attention", "run", model, *common]
    if name == "sae":
        return ["sae", "train", model, "--hook", sae_hook, "--steps", "50", "--d-sae", "512", *common]
    raise SystemExit(f"unknown command {name!r}: use capture, massive, attention or sae")


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[float, float, str, int]:
    """(peak RSS MB, wall s, output, exit code) of one fresh process running ``argv``."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    return usage.ru_maxrss / 1024, seconds, output, process.returncode


def plan_lines(output: str) -> list[str]:
    """The lines in which a command says how much it reads (progress bars reduced to their last state)."""
    lines = []
    for line in output.splitlines():
        line = line.split("\r")[-1].strip()
        if re.search(r"\b(tokens?|rows|lines|documents|sequences|seq/s)\b", line) and len(line) < 240:
            lines.append(line)
    return lines[:3]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument(
        "--hook", default="blocks.*.hook_resid_post", help="capture / massive: hooks (a glob)"
    )
    parser.add_argument("--sae-hook", default="blocks.2.hook_resid_post")
    parser.add_argument("--lines", type=int, default=600, help="lines of the 1× file")
    parser.add_argument("--sizes", default="1,4,16", help="multiples of --lines")
    parser.add_argument("--commands", default="capture,massive,attention,sae")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    workbench = str(Path(sys.executable).parent / "workbench")  # this environment's command
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = Path(tempfile.mkdtemp(prefix="workbench-memory-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    files = {s: write_text(root / f"text_{s}x.txt", args.lines * s, seed=s) for s in sizes}
    print(
        f"model {args.model}; files: "
        + ", ".join(f"{s}× {args.lines * s} lines ({files[s].stat().st_size / 1e6:.2f} MB)" for s in sizes)
    )
    print(f"{'command':10} {'size':>5} {'peak RSS MB':>12} {'wall s':>8}  what it said it reads")
    for name in args.commands.split(","):
        peaks = {}
        for size in sizes:
            workspace = root / f"ws_{name}_{size}"
            argv = [
                workbench,
                *command_line(name, args.model, files[size], workspace, args.hook, args.sae_hook),
            ]
            peak, seconds, output, code = run_measured(argv, env)
            if code != 0:
                raise SystemExit(f"{' '.join(argv)} exited {code}:\n{output[-2000:]}")
            peaks[size] = peak
            said = " | ".join(plan_lines(output))
            print(f"{name:10} {size:>4}× {peak:12.0f} {seconds:8.1f}  {said}", flush=True)
            shutil.rmtree(workspace, ignore_errors=True)
        print(
            f"{name:10} peak RSS {sizes[-1]}× / {sizes[0]}×: {peaks[sizes[-1]] / peaks[sizes[0]]:.3f}",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
