"""A rank that fails the way a `workbench` rank can, without importing torch: ``python -m tests.torchrun_standin
MODE`` under torchrun (``distributed.launch(..., module="tests.torchrun_standin")``).

MODE ``killed``: rank 0 prints a line, then kills itself with SIGKILL (out of memory, ``kill -9``); the other ranks
report a broken connection at once, as gloo's peers do, and wait for torchrun to stop them.
"""

from __future__ import annotations

import os
import signal
import sys
import time

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    mode = sys.argv[1]
    if mode == "killed":
        if rank == 0:
            print("rank 0 at work", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        print("error: internal error (RuntimeError: Connection closed by peer)", file=sys.stderr, flush=True)
        time.sleep(30)  # torchrun stops this rank once rank 0 is gone
        sys.exit(1)
    sys.exit(f"unknown mode {mode!r}")
