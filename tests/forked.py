"""Processes forked from one warm forkserver, for the tests that run many short-lived processes (kill -9 at a write
boundary, distributed ranks): each process costs its work, not seconds of importing torch and transformers.

multiprocessing starts one forkserver per test process, and only the preload list set before it starts counts; so
every module that forks takes :func:`forkserver` (one list, the union of what those modules' children import),
whichever of them runs first on an xdist worker. A child's exit code is what the test reads: 0, or -9 when it
killed itself at ``$WORKBENCH_CRASH_AT`` (``workbench.faults``).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

import pytest
import torch

from workbench.faults import ENV_VAR

PRELOAD = [
    "tests.forked",
    "tests.workbench.test_crash_store",
    "tests.test_crash_training",
    "tests.circuits.sae.test_sae_distributed",
    "workbench.zoo.train",
    "workbench.circuits.sae.train",
    "workbench.circuits.sae.distributed",
    "workbench.circuits.codebook",
    "workbench.model",
    "workbench.store",
    "workbench.cli",
    "workbench.probes.cli",
    "workbench.probes.jobs",
    "transformers.models.gpt_neox.modeling_gpt_neox",
    "safetensors.torch",
    "torch._dynamo",
    "torch.distributed",
    "tqdm.auto",
]
TIME_LIMIT_S = 300


def forkserver() -> ForkServerContext:
    """The forkserver context, its preload list set (a no-op once this process's forkserver runs)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_forked(fn: Callable[..., Any], *args: Any, crash: str | None = None) -> int:
    """Run ``fn(*args)`` in a process forked from the warm forkserver with one torch thread and
    ``$WORKBENCH_CRASH_AT=crash`` (unset when None); returns its exit code (-9: killed by SIGKILL)."""
    process = start_forked(fn, *args, crash=crash)
    process.join(TIME_LIMIT_S)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"{fn.__name__}{args} (crash at {crash}) did not finish in {TIME_LIMIT_S} s")
    assert process.exitcode is not None
    return process.exitcode


def start_forked(fn: Callable[..., Any], *args: Any, crash: str | None = None) -> BaseProcess:
    """:func:`run_forked`'s process, started and not waited for."""
    process = forkserver().Process(target=_child, args=(crash, fn, *args))
    process.start()
    return process


def _child(crash: str | None, fn: Callable[..., Any], *args: Any) -> None:
    torch.set_num_threads(1)
    os.environ.pop(ENV_VAR, None)
    if crash:
        os.environ[ENV_VAR] = crash
    fn(*args)
