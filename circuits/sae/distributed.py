"""SAE training on several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU; one code path).

Two layouts, both launched by ``torchrun`` (``workbench sae train ... --nproc N`` spawns it on one machine;
``torchrun --nnodes ... -m workbench.cli sae train ...`` spans machines):

* **data-parallel** (``mode="data"``): every rank holds every SAE and reads its own batches (disjoint store
  shards, or disjoint document ranges of a live model); after each backward the gradients are averaged over the
  ranks with one coalesced ``all_reduce``, so the dictionaries stay identical on every rank. The normalisation
  scale and the data-dependent initialisation use the first *global* batch (gathered), the dead-latent counters
  count the global batch, BatchTopK keeps the ``k × global batch`` largest activations of the global batch, and the
  logged metrics are global means: training on N ranks with local batch b equals one process training on the
  concatenated global batch of N·b rows (up to float summation order; tested).
* **hook-sharded** (``mode="hooks"``): each SAE is owned by one rank (:func:`owned_names`, round robin over the
  sorted names); every rank runs the model on its own documents and sends each hook's rows to the ranks whose SAEs
  read it (``gather``), so an SAE trains on the global batch alone on its owner, with no gradient traffic.

Checkpoints (``TrainConfig.checkpoint_dir``): data-parallel ranks are identical, so rank 0 writes the single
``trainer_state.pt`` that every rank resumes from; hook-sharded ranks each write ``trainer_state.rank<R>-of-<N>.
step<S>.pt`` and delete older steps only after a barrier (every rank has written step S), so on a restart the
ranks agree (``all_reduce`` MIN) on the newest step all of them hold. A rank killed at any moment therefore
brings the job down (torchrun), and the restarted job continues from the last complete checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

MODES = ("data", "hooks")
PARALLEL_CHOICES = ("auto", *MODES)  # `sae train --parallel`
DEFAULT_TIMEOUT_S = 600  # a rank waiting this long on a dead peer gives up (torchrun also stops the job)
_TORCHRUN_LOG = re.compile(rb"^[WEI]\d{4} \d\d:\d\d:\d\d")  # torchrun's own log lines (W1201 12:13:54...)
_ROOT_CAUSE_SIGNAL = re.compile(  # torchrun's failure report: the first failed rank, when a signal ended it
    rb"Root Cause \(first observed failure\):[^=]*?rank\s*: (\d+)[^=]*?exitcode\s*: -(\d+)"
)
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedRunError(RuntimeError):
    """A distributed run could not start or one of its ranks failed (the message is the rank's error)."""


@dataclass
class Distributed:
    """This process's place in the job: ``rank`` of ``world_size`` ranks, training in ``mode`` ("data"/"hooks")."""

    rank: int
    world_size: int
    mode: str = "data"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"distributed mode {self.mode!r} is unknown; use one of {list(MODES)}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives (all ranks call them)
    def _on(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` (same dtype and device) in place over the ranks: one coalesced all_reduce."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        moved = self._on(flat)
        dist.all_reduce(moved)
        moved.div_(self.world_size)
        offset = 0
        for t in tensors:
            t.copy_(moved[offset : offset + t.numel()].view_as(t).to(t.device))
            offset += t.numel()

    def all_reduce_min_int(self, value: int) -> int:
        t = self._on(torch.tensor([value], dtype=torch.long))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_reduce_sum_int(self, value: int) -> int:
        t = self._on(torch.tensor([value], dtype=torch.long))
        dist.all_reduce(t)
        return int(t.item())

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[rows, ...] on every rank (same shape) -> [world_size · rows, ...] in rank order, on every rank."""
        moved = self._on(t.contiguous())
        parts = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(parts, moved)
        return torch.cat(parts).to(t.device)

    def gather_rows(self, t: torch.Tensor, owner: int) -> torch.Tensor | None:
        """[rows, d] from every rank -> [world_size · rows, d] in rank order on ``owner`` (None elsewhere)."""
        moved = self._on(t.contiguous())
        parts = [torch.empty_like(moved) for _ in range(self.world_size)] if self.rank == owner else None
        dist.gather(moved, parts, dst=owner)
        return torch.cat(parts).to(t.device) if parts is not None else None

    def all_gather_object(self, value):
        out: list = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        dist.barrier()


def backend_for(device: str | torch.device) -> str:
    """NCCL for CUDA tensors, gloo otherwise (both come with torch)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (``WORLD_SIZE`` and ``RANK`` are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def check_local_devices(nproc: int, device: str | torch.device) -> None:
    """Refuse more processes on this machine than it has GPUs, for a CUDA run (NCCL: one GPU per process)."""
    if torch.device(device).type != "cuda":
        return
    count = torch.cuda.device_count()
    if nproc > count:
        raise DistributedRunError(
            f"{nproc} processes on --device cuda need {nproc} GPUs on this machine (one per process: NCCL), but "
            f"it has {count}: run --nproc {count} or fewer (--nproc-per-node under torchrun), or --device cpu (gloo)"
            if count
            else f"--device cuda with {nproc} processes, but this machine has no CUDA GPU: use --device cpu"
        )


def init_distributed(
    mode: str = "data", device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S
) -> Distributed:
    """Join the job torchrun started (``env://``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with the backend
    for ``device``; on CUDA each rank takes GPU ``LOCAL_RANK``. Idempotent."""
    if not launched_by_torchrun():
        missing = [key for key in ENV_KEYS if key not in os.environ]
        raise DistributedRunError(
            f"not started by torchrun ({', '.join(missing)} unset): launch with `workbench sae train ... --nproc N` "
            "or `torchrun --nproc-per-node N -m workbench.cli sae train ...`"
        )
    target = torch.device(device)
    if target.type == "cuda":
        check_local_devices(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), target)
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(target), timeout=timedelta(seconds=timeout_s))
    return Distributed(dist.get_rank(), dist.get_world_size(), mode, target)


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still sends)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- ownership
def parallel_mode(requested: str, n_saes: int, world_size: int) -> str:
    """The layout of a job training ``n_saes`` SAEs on ``world_size`` ranks: ``requested`` ("data" / "hooks"), or
    for "auto" hook-sharded when every rank owns at least one SAE (no gradient traffic, each rank holds only its
    SAEs and their optimizer state), else data-parallel (no idle rank)."""
    if requested not in PARALLEL_CHOICES:
        raise ValueError(
            f"parallel layout {requested!r} (--parallel) is unknown; use one of {list(PARALLEL_CHOICES)}"
        )
    if requested != "auto":
        return requested
    return "hooks" if n_saes >= world_size > 1 else "data"


def owned_names(names: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Hook-sharded ownership: the SAE names (sorted) dealt round robin over the ranks; this rank's share."""
    return [name for i, name in enumerate(sorted(names)) if i % world_size == rank]


def local_ranks(ctx: Distributed) -> range:
    """The ranks on this machine (torchrun numbers a machine's ``LOCAL_WORLD_SIZE`` ranks contiguously)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    first = ctx.rank - int(os.environ.get("LOCAL_RANK", ctx.rank))
    return range(first, first + local_world)


def document_range(n_documents: int, rank: int, world_size: int) -> range:
    """This rank's contiguous, disjoint share of ``n_documents`` (sizes differ by at most one)."""
    base, extra = divmod(n_documents, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def store_shards(
    n_shards: int, n_rows: int, rank: int, world_size: int
) -> tuple[list[int] | None, range | None]:
    """Disjoint reading plan for one store: (shard indices dealt round robin, None) when there are at least as
    many shards as ranks, else (None, a disjoint row range)."""
    if n_shards >= world_size:
        return [i for i in range(n_shards) if i % world_size == rank], None
    return None, document_range(n_rows, rank, world_size)


# ---------------------------------------------------------------------------------------------- routing
def route_batches(
    batches: Iterator[Mapping[str, torch.Tensor]], needs: Mapping[int, Sequence[str]], ctx: Distributed
) -> Iterator[dict[str, torch.Tensor] | None]:
    """Hook-sharded: every rank's local batch {hook: [b, d]} -> on each rank the global batch {hook: [N·b, d]} of
    the hooks its own SAEs read (``needs[rank]``); None on every rank once any rank's stream has ended."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if ctx.all_reduce_min_int(0 if batch is None else 1) == 0:
            yield None
            return
        assert batch is not None
        routed: dict[str, torch.Tensor] = {}
        for owner in range(ctx.world_size):
            for hook in needs.get(owner, ()):
                if hook not in batch:
                    raise KeyError(
                        f"rank {ctx.rank}'s batch has no {hook!r} (it holds {sorted(batch)}), which the SAEs of "
                        f"rank {owner} read: every rank must capture every hook of the job"
                    )
                rows = ctx.gather_rows(batch[hook].reshape(-1, batch[hook].shape[-1]), owner)
                if rows is not None:
                    routed[hook] = rows
        yield routed


# ---------------------------------------------------------------------------------------------- checkpoints
def rank_state_name(base: str, rank: int, world_size: int, step: int) -> str:
    stem, _, suffix = base.rpartition(".")
    return f"{stem}.rank{rank}-of-{world_size}.step{step}.{suffix}"


def rank_state_steps(directory: Path, base: str, rank: int, world_size: int) -> dict[int, Path]:
    """{step: path} of this rank's hook-sharded checkpoints in ``directory``."""
    stem, _, suffix = base.rpartition(".")
    pattern = re.compile(rf"{re.escape(stem)}\.rank{rank}-of-{world_size}\.step(\d+)\.{re.escape(suffix)}")
    found = {}
    for path in directory.glob(f"{stem}.rank{rank}-of-{world_size}.step*.{suffix}"):
        match = pattern.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def agreed_resume_path(directory: Path, base: str, ctx: Distributed) -> Path | None:
    """The checkpoint of the newest step every rank holds (None: start from scratch)."""
    steps = rank_state_steps(directory, base, ctx.rank, ctx.world_size)
    step = ctx.all_reduce_min_int(max(steps, default=0))
    if step == 0:
        return None
    if step not in steps:
        raise DistributedRunError(
            f"rank {ctx.rank} has no checkpoint of step {step} in {directory} (it has {sorted(steps)}), which "
            "every other rank holds: the directory was changed by hand; delete it to train from scratch"
        )
    return steps[step]


def prune_rank_states(directory: Path, base: str, ctx: Distributed, keep_step: int) -> None:
    """After a barrier (every rank has written ``keep_step``): delete this rank's older checkpoints."""
    ctx.barrier()
    for step, path in rank_state_steps(directory, base, ctx.rank, ctx.world_size).items():
        if step < keep_step:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- launcher
def torchrun_command(nproc: int, module_args: Sequence[str], module: str = "workbench.cli") -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m <module> <module_args>``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *module_args,
    ]


def launch(nproc: int, module_args: Sequence[str], module: str = "workbench.cli") -> None:
    """Run ``python -m <module> <module_args>`` (``workbench <module_args>``) on ``nproc`` local processes under
    torchrun (rank 0 prints the output).

    The ranks' own output passes through as it comes; torchrun's log lines and failure report (a traceback) are held
    back, and a DistributedRunError carries the ranks' first ``error:`` line instead."""
    if nproc < 1:
        raise DistributedRunError(f"--nproc {nproc}: run at least one process")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    process = subprocess.Popen(torchrun_command(nproc, module_args, module), env=env, stderr=subprocess.PIPE)
    assert process.stderr is not None
    seen, pending, passing = b"", b"", True
    while chunk := os.read(process.stderr.fileno(), 65536):
        seen, pending = seen + chunk, pending + chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        if b"\r" in pending:  # a progress bar redrawing: show it as it comes
            shown, _, pending = pending.rpartition(b"\r")
            lines.append(shown + b"\r")
        for line in lines:
            passing = passing and not line.startswith(b"Traceback (most recent call last)")
            if passing and not _TORCHRUN_LOG.match(line) and not line.startswith(b"error:"):
                sys.stderr.buffer.write(line if line.endswith(b"\r") else line + b"\n")
        sys.stderr.flush()
    if process.wait() != 0:
        killed = _ROOT_CAUSE_SIGNAL.search(seen)  # torchrun's report: the first rank to fail died of a signal
        if killed:
            rank, name = int(killed.group(1)), signal.Signals(int(killed.group(2))).name
            raise DistributedRunError(
                f"rank {rank} of the {nproc}-process run was killed by {name} (out of memory, or stopped from "
                "outside) and the job stopped; rerun the same command (with --checkpoint-every N it resumes from "
                "the last checkpoint)"
            )
        text = seen.decode(errors="replace").splitlines()
        errors = [line.removeprefix("error:").strip() for line in text if line.startswith("error:")]
        last = next((line for line in reversed(text) if line.strip()), "no output")
        raise DistributedRunError(
            f"{errors[0] if errors else last} (a rank of the {nproc}-process run failed)"
        )
