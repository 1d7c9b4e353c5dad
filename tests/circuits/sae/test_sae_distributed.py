"""Distributed SAE training on 2 gloo processes (``workbench.circuits.sae.distributed``).

* data-parallel over a global batch equals one process training on that global batch (TopK, BatchTopK, ReLU,
  JumpReLU, Gated, Matryoshka BatchTopK; tolerance 1e-4 relative on the weights after 12 Adam steps — the ranks sum in another order), and the
  two ranks end with identical bytes;
* hook-sharded (each SAE on one rank, the hooks' rows routed to their owner) equals training each SAE alone on the
  global batch;
* a rank killed with SIGKILL mid-run (data-parallel: rank 0 right after a checkpoint; hook-sharded: rank 1) takes
  the job down, and the restarted job resumes from the last checkpoint every rank holds and ends with the
  uninterrupted run's SAEs.

Ranks are processes forked from a forkserver that has imported torch once, joined by ``env://`` rendezvous on a
free local port (what torchrun sets up); every process uses one thread.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import torch

from tests.forked import forkserver
from workbench.circuits.sae.base import SAEConfig
from workbench.circuits.sae.distributed import owned_names
from workbench.circuits.sae.train import TrainConfig, seeded_sae, train_saes
from workbench.faults import ENV_VAR

D_IN, D_SAE, LOCAL_BATCH, STEPS, WORLD = 16, 64, 32, 12, 2
SPECS = {
    "topk": dict(architecture="topk", k=4, hook_in="a"),
    "batchtopk": dict(architecture="batchtopk", k=4, hook_in="a"),
    "relu": dict(architecture="relu", l1_coefficient=0.02, hook_in="b"),
    "jumprelu": dict(architecture="jumprelu", l0_coefficient=0.01, hook_in="b"),
    "gated": dict(architecture="gated", l1_coefficient=0.5, hook_in="a"),
    "matryoshka": dict(architecture="matryoshka_batchtopk", k=4, matryoshka_widths=[8, 32], hook_in="b"),
}


def _global_batches(steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    """Planted sparse data: rows are sparse combinations of 48 unit directions (+ noise), two hooks."""
    generator = torch.Generator().manual_seed(0)
    out = []
    atoms = {
        h: torch.nn.functional.normalize(torch.randn(48, D_IN, generator=generator), dim=1) for h in "ab"
    }
    for _ in range(steps):
        batch = {}
        for hook, dictionary in atoms.items():
            codes = torch.rand(WORLD * LOCAL_BATCH, 48, generator=generator) * (
                torch.rand(WORLD * LOCAL_BATCH, 48, generator=generator) < 0.08
            )
            batch[hook] = codes @ dictionary * 3 + 0.01 * torch.randn(
                WORLD * LOCAL_BATCH, D_IN, generator=generator
            )
        out.append(batch)
    return out


def _local(batches, rank: int):
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return [{h: t[rows] for h, t in b.items()} for b in batches]


def _saes(names):
    return {n: seeded_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, **SPECS[n]), i) for i, n in enumerate(sorted(SPECS))
            if n in names}  # fmt: skip


def _cfg(checkpoint_dir=None) -> TrainConfig:
    return TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=3, progress=False, dead_after_tokens=96,
                       checkpoint_dir=checkpoint_dir, checkpoint_every=4 if checkpoint_dir else 0)  # fmt: skip


def _states(saes) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in s.state_dict().items()} for n, s in saes.items()}


# ---------------------------------------------------------------------------------------------- ranks
def _rank_main(
    rank: int, port: int, mode: str, out: str, checkpoint_dir: str | None, crash: str | None
) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    os.environ.pop(ENV_VAR, None)
    if crash:
        os.environ[ENV_VAR] = crash
    from workbench.circuits.sae.distributed import init_distributed, shutdown

    ctx = init_distributed(mode, timeout_s=60)
    names = sorted(SPECS) if mode == "data" else owned_names(sorted(SPECS), rank, WORLD)
    result = train_saes(_saes(names), _local(_global_batches(), rank), _cfg(checkpoint_dir), distributed=ctx)
    torch.save({"states": _states(result.saes), "history": result.history}, Path(out) / f"rank{rank}.pt")
    shutdown()


@pytest.fixture(scope="module")
def job():
    """Run a 2-rank job: ``job(mode, out, checkpoint_dir=None, crash={rank: point})`` -> exit codes per rank."""
    ctx = forkserver()  # warm: torch, torch.distributed and the trainer imported once (tests/forked.py)

    def run(mode: str, out: Path, checkpoint_dir: Path | None = None, crash: dict[int, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [ctx.Process(target=_rank_main, args=(r, port, mode, str(out), checkpoint_dir and str(checkpoint_dir),
                                                       (crash or {}).get(r)))
                 for r in range(WORLD)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
                p.join()
                pytest.fail(f"rank {procs.index(p)} of a {mode} job did not finish in 120 s")
        return [p.exitcode for p in procs]

    return run


def _load(out: Path, rank: int):
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def _assert_close(got, want, rtol=1e-4):
    for name in want:
        for key, value in want[name].items():
            torch.testing.assert_close(got[name][key], value, rtol=rtol, atol=rtol * float(value.abs().max()) + 1e-7,
                                       msg=lambda m, n=name, k=key: f"{n}.{k}: {m}")  # fmt: skip


@pytest.fixture(scope="module")
def single_process():
    """Every SAE trained alone in this process on the global batches (the reference)."""
    torch.manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {n: _states(train_saes(_saes([n]), _global_batches(), _cfg()).saes) for n in SPECS}
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_run(job, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data-parallel")
    assert job("data", out) == [0, 0]
    return out


@pytest.fixture(scope="module")
def hooks_run(job, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hook-sharded")
    assert job("hooks", out) == [0, 0]
    return out


def test_data_parallel_equals_one_process_on_the_global_batch(data_run, single_process):
    ranks = [_load(data_run, r) for r in range(WORLD)]
    for name in SPECS:  # identical dictionaries on every rank, bit for bit
        for key, value in ranks[0]["states"][name].items():
            assert torch.equal(value, ranks[1]["states"][name][key]), f"{name}.{key} differs between ranks"
    assert ranks[0]["history"] == ranks[1]["history"]
    _assert_close(ranks[0]["states"], {n: s[n] for n, s in single_process.items()})
    assert [row["step"] for row in ranks[0]["history"]["topk"]] == list(range(STEPS))


def test_hook_sharded_equals_training_each_sae_alone(hooks_run, single_process):
    for rank in range(WORLD):
        owned = owned_names(sorted(SPECS), rank, WORLD)
        got = _load(hooks_run, rank)["states"]
        assert sorted(got) == owned and len(owned) == len(SPECS) // WORLD
        _assert_close(got, {n: single_process[n][n] for n in owned}, rtol=1e-5)


@pytest.mark.parametrize("mode,crash", [("data", {0: "sae.checkpoint_saved#2"}),
                                        ("hooks", {1: "sae.checkpoint_written#2"})])  # fmt: skip
def test_a_killed_rank_resumes_from_the_last_checkpoint(job, data_run, hooks_run, tmp_path, mode, crash):
    reference = data_run if mode == "data" else hooks_run
    out, checkpoints = tmp_path / "resumed", tmp_path / "checkpoints"
    out.mkdir()
    codes = job(mode, out, checkpoints, crash)
    killed = next(iter(crash))
    assert codes[killed] == -signal.SIGKILL and codes[1 - killed] != 0, codes  # the peer fails, not hangs
    assert not list(out.glob("rank*.pt"))
    assert job(mode, out, checkpoints) == [0, 0]
    for rank in range(WORLD):
        _assert_close(_load(out, rank)["states"], _load(reference, rank)["states"], rtol=1e-6)
        for rows in _load(out, rank)["history"].values():  # every step logged once
            assert [row["step"] for row in rows] == list(range(STEPS))
