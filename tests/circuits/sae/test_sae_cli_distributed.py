"""`workbench sae train` on 2 gloo processes, end to end through the command line (code-tiny, a user's text file).

* data-parallel, ``--nproc 2`` (the CLI re-runs itself under torchrun): exit 0, the SAE saved under
  ``saes/<id>/``, one ``sae_evals`` row and one feature page per latent (rank 0 writes, over both ranks' stores),
  each rank's own document range captured into its own store, and the SAE equal (rtol 1e-4: the ranks sum gradients in another order) to one
  process training the same SAE on the global batches, i.e. both ranks' batches of those stores concatenated;
* hook-sharded, two ``--hook`` under ``torchrun --nnodes 1 --node-rank 0 --master-addr ... -m workbench.cli`` (the
  documented multi-machine form, on one machine): each SAE, trained by its own rank, equals that SAE trained alone
  on the global batches of its hook (rtol 1e-5); both rows written once;
* a bad hook with ``--nproc 2``: exit 2, one ``error:`` line naming the closest hooks, no traceback, nothing
  written, and no hang (a time limit).
* the launcher under real torchrun with stand-in ranks: a rank killed by SIGKILL is one line naming it; ``--checkpoint-every``'s directory is found again by the same command only. (Resume
  itself, a killed rank included, is tested on 2 gloo processes in tests/circuits/sae/test_sae_distributed.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.circuits.sae.analysis import _rows_stream
from workbench.circuits.sae.base import CONFIG_FILE, WEIGHTS_FILE
from workbench.circuits.sae.cli import app
from workbench.circuits.sae.distributed import ENV_KEYS, owned_names
from workbench.circuits.sae.formats import load_sae
from workbench.circuits.sae.train import TrainConfig, seeded_sae, train_saes
from workbench.faults import ENV_VAR
from workbench.store import ActivationStore
from workbench.workspace import Workspace

WORLD, STEPS, D_SAE, K, ROWS_PER_STEP = 2, 6, 32, 4, 64
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
TRAIN = ["--d-sae", str(D_SAE), "--k", str(K), "--steps", str(STEPS), "--max-tokens", "1024", "--context-length",
         "32", "--train-batch-size", str(ROWS_PER_STEP), "--no-progress"]  # fmt: skip
LINES = [
    "def add(first, second):    return first + second",
    "for index in range(10):    print(index * index)",
    "the quick brown fox jumps over the lazy dog again and again",
    "class Point:    def __init__(self, x, y):        self.x = x",
    "with open(path) as handle:    text = handle.read()",
] * 12
TIME_LIMIT_S = 240  # a run that has not ended by then hangs


def _workspace(zoo_workspace, root: Path) -> Workspace:
    workspace = Workspace(root).ensure()
    workspace.model_dir("code-tiny").symlink_to(
        zoo_workspace.model_dir("code-tiny"), target_is_directory=True
    )
    return workspace


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A user's command line in ``cwd`` (not itself inside a torchrun job, no fault injection), with one thread per
    process."""
    env = {key: value for key, value in os.environ.items() if key not in (*ENV_KEYS, ENV_VAR)}
    return subprocess.run(command, cwd=cwd, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=TIME_LIMIT_S)  # fmt: skip


def _workbench(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "workbench"), *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("notes") / "notes.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


def _global_batches(workspace: Workspace, hooks: list[str]) -> list[dict[str, torch.Tensor]]:
    """The job's global batches: each rank's stream of its own store (what ``analysis.run`` feeds the trainer),
    rank 0's rows first (the order ``all_gather`` / ``gather`` concatenate in)."""
    stores = [
        ActivationStore.open(path) for path in sorted(workspace.stores_dir.glob(f"sae-*-rank*-of-{WORLD}"))
    ]
    assert [s.path.name[-len("rank0-of-2") :] for s in stores] == [
        f"rank{r}-of-{WORLD}" for r in range(WORLD)
    ]
    rows = min(ROWS_PER_STEP, stores[0].n_rows * WORLD) // WORLD  # analysis.run's rows per rank and step
    streams = [_rows_stream(store, hooks, rows, None) for store in stores]
    return [{h: torch.cat([b[h] for b in parts]) for h in hooks} for parts in
            (tuple(next(s) for s in streams) for _ in range(STEPS))]  # fmt: skip


def _trained_alone(workspace: Workspace, sae_id: str, batches) -> dict[str, torch.Tensor]:
    """The saved SAE's configuration, initialised as ``analysis.run`` does (seed 0), trained in this process."""
    cfg = load_sae(workspace.root / "saes" / sae_id).cfg
    rows = len(next(iter(batches[0].values())))
    options = TrainConfig(
        steps=STEPS, lr=3e-3, warmup_steps=min(20, STEPS), progress=False, dead_after_tokens=10 * rows
    )  # fmt: skip  (analysis.run's settings)
    return train_saes({sae_id: seeded_sae(cfg, 0)}, batches, options).saes[sae_id].inference_state()[1]


def _assert_saved_equals(
    workspace: Workspace, sae_id: str, want: dict[str, torch.Tensor], rtol: float
) -> None:
    got = load_sae(workspace.root / "saes" / sae_id).inference_state()[1]
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=rtol, atol=rtol * float(value.abs().max()) + 1e-7,
                                   msg=lambda m, k=key: f"{sae_id}.{k}: {m}")  # fmt: skip


def _assert_written_once(workspace: Workspace, sae_ids: list[str]) -> None:
    results = workspace.results()
    evals = results.read("sae_evals")
    assert sorted(evals["sae_id"]) == sorted(sae_ids), evals[["sae_id"]]
    assert (evals["train_steps"] == STEPS).all() and (evals["architecture"] == "topk").all()
    assert evals["L0"].tolist() == pytest.approx([K] * len(sae_ids))
    pages = results.read("sae_features")
    assert sorted(pages.groupby("sae_id")["latent"].apply(sorted).to_dict().items()) == [
        (sae_id, list(range(D_SAE))) for sae_id in sorted(sae_ids)
    ]  # one page per latent: not once per rank
    for sae_id in sae_ids:
        assert {p.name for p in (workspace.root / "saes" / sae_id).iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}


def test_data_parallel_cli_equals_one_process_on_the_global_batches(zoo_workspace, notes, tmp_path):
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    sae_id = "code-tiny.blocks.0.hook_resid_post.topk"
    done = _run(_workbench("sae", "train", "code-tiny", "--data", str(notes), "--hook", HOOKS[0], *TRAIN,
                           "--workspace", str(workspace.root), "--nproc", str(WORLD)), tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "error:" not in done.stderr, done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith(f"{sae_id}: L0 4.00  FVU "), done.stdout
    assert out[1:] == [
        f"{WORLD} data-parallel processes (every process trained every SAE)",
        f"saved to saes/{sae_id}; code-tiny on 'notes.txt' written to the workspace (sae_evals 1 rows, "
        "sae_features 32 rows)",
    ], done.stdout
    assert sorted(p.name for p in (workspace.root / "saes").iterdir()) == [sae_id]
    _assert_written_once(workspace, [sae_id])
    stores = [ActivationStore.open(p) for p in sorted(workspace.stores_dir.iterdir())]
    assert len(stores) == WORLD and abs(stores[0].n_rows - stores[1].n_rows) <= 32  # halves of the documents
    pages = workspace.results().read("sae_features", sae_id=sae_id)
    sequences = sum(int(store.locations()[:, 0].unique().numel()) for store in stores)
    assert set(pages["n_prompts"]) == {sequences}  # the pages read both ranks' documents, not rank 0's only
    batches = _global_batches(workspace, [HOOKS[0]])
    assert len(batches[0][HOOKS[0]]) == ROWS_PER_STEP
    _assert_saved_equals(workspace, sae_id, _trained_alone(workspace, sae_id, batches), rtol=1e-4)


def test_hook_sharded_under_torchrun_equals_each_sae_alone(zoo_workspace, notes, tmp_path):
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    ids = [f"L{layer}" for layer in range(len(HOOKS))]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--node-rank",
        "0",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "--nproc-per-node",
        str(WORLD),
    ]
    done = _run([*torchrun, "-m", "workbench.cli", "sae", "train", "code-tiny", "--data", str(notes), "--hook",
                 ",".join(HOOKS), "--sae-id", ids[0], "--sae-id", ids[1], *TRAIN, "--workspace",
                 str(workspace.root)], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    owners = [owned_names(ids, rank, WORLD) for rank in range(WORLD)]
    assert owners == [["L0"], ["L1"]]
    assert f"{WORLD} hook-sharded processes (rank 0: L0; rank 1: L1)" in done.stdout.splitlines(), done.stdout
    assert done.stdout.count("saved to saes/L0, saes/L1;") == 1, done.stdout  # rank 0 reports
    _assert_written_once(workspace, ids)
    batches = _global_batches(workspace, list(HOOKS))
    for sae_id, hook in zip(ids, HOOKS, strict=True):
        alone = _trained_alone(workspace, sae_id, [{hook: b[hook]} for b in batches])
        _assert_saved_equals(workspace, sae_id, alone, rtol=1e-5)


def test_a_bad_hook_on_two_processes_is_one_error_line_and_writes_nothing(zoo_workspace, notes, tmp_path):
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    done = _run(_workbench("sae", "train", "code-tiny", "--data", str(notes), "--hook", "blocks.0.hook_resid_pots",
                           *TRAIN, "--workspace", str(workspace.root), "--nproc", str(WORLD)), tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: unknown hook name 'blocks.0.hook_resid_pots'"), (
        errors
    )
    assert "closest valid names: blocks.0.hook_resid_post" in errors[0] and errors[0].endswith(
        f"(a rank of the {WORLD}-process run failed)"
    )
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (workspace.root / "saes").exists() and not any(workspace.stores_dir.iterdir())
    assert "sae_evals" not in workspace.results().tables()


def test_the_ranks_command_line_parses_to_the_same_options():
    """`--nproc` re-runs the command from its parsed options (`_argv`): repeated, comma-listed and flag options
    survive, and the ranks see --nproc at its default."""
    from typer.main import get_command

    from workbench.circuits.sae.cli import _argv

    train = get_command(app).commands["train"]  # type: ignore[attr-defined]
    given = ["code-tiny", "--data", "notes.txt", "--hook", f"{HOOKS[0]},{HOOKS[1]}", "--hook", "blocks.0.hook_mlp_out",
             "--sae-id", "A", "--sae-id", "B", "--sae-id", "C", "--skip", "--no-progress", "--mask-outliers", "10",
             "--parallel", "hooks", "--nproc", "3", "--workspace", "ws"]  # fmt: skip
    parsed = train.make_context("train", list(given))
    again = train.make_context("train", _argv(parsed, drop=("nproc",)))
    assert again.params == parsed.params | {"nproc": 1}
    assert again.params["hook"] == [f"{HOOKS[0]},{HOOKS[1]}", "blocks.0.hook_mlp_out"]
    assert again.params["skip"] is True and again.params["progress"] is False


def test_bad_pairings_and_too_few_gpus_are_refused_before_any_process_starts(tmp_path, monkeypatch):
    from tests.circuits.sae.test_sae import refused, sae_cli

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: NCCL takes one per process

    base = ["train", "code-tiny", "--data", "notes.txt", "--hook", ",".join(HOOKS), "--nproc", "2"]
    cases = [
        ([*base, "--hook-out", "blocks.0.hook_mlp_out"], "1 --hook-out for 2 --hook"),
        ([*base, "--sae-id", "A,B,C"], "3 --sae-id for 2 --hook"),
        ([*base, "--hook", HOOKS[0]], f"SAE id 'code-tiny.{HOOKS[0]}.topk' is given twice"),
        ([*base, "--sae-id", "A", "--sae-id", "A"], "SAE id 'A' is given twice"),
        ([*base, "--parallel", "pipeline"], "parallel layout 'pipeline' (--parallel) is unknown"),
        ([*base[:4], "--hook", " , "], "--hook is empty"),
        (
            [*base, "--device", "cuda"],
            "2 processes on --device cuda need 2 GPUs on this machine (one per process: "
            "NCCL), but it has 1: run --nproc 1 or fewer",
        ),
    ]
    for args, reason in cases:
        refused(sae_cli(tmp_path / "ws", *args), reason)
    assert not (tmp_path / "ws").exists()


def test_the_memory_check_counts_every_rank_on_the_machine(code_series, notes, monkeypatch):
    """On CPU the ranks of one machine share its memory: SAEs that fit one process are refused for two local ranks
    (data-parallel: a copy each; hook-sharded: one SAE each), before anything is allocated or any collective runs.
    Each SAE needs 70% of the free memory."""
    from workbench.circuits.sae.analysis import _available_bytes, run
    from workbench.circuits.sae.base import SAEInputError
    from workbench.circuits.sae.distributed import Distributed, local_ranks
    from workbench.datasets import load_dataset

    model = code_series.load(code_series.steps[-1]).eval()
    d_in = model.cfg.d_model
    d_sae = int(0.7 * _available_bytes(torch.device("cpu")) / (16 * (2 * d_in + 1)))
    specs = {
        f"L{i}": {"architecture": "relu", "d_sae": d_sae, "hook_in": hook} for i, hook in enumerate(HOOKS)
    }
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for mode, chosen in (("data", ["L0"]), ("hooks", ["L0", "L1"])):
        monkeypatch.setenv("LOCAL_RANK", "1")
        ctx = Distributed(rank=1, world_size=WORLD, mode=mode)
        assert local_ranks(ctx) == range(2)
        with pytest.raises(
            SAEInputError, match="the SAEs of the 2 processes on this machine need about .* or fewer"
        ):
            run(
                model,
                load_dataset(str(notes)),
                {n: specs[n] for n in chosen},
                workspace=None,
                distributed=ctx,
            )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # rank 5 of 8, four per machine: the second machine's ranks
    assert local_ranks(Distributed(rank=5, world_size=8)) == range(4, 8)


def test_launch_names_a_rank_killed_by_a_signal_not_its_peers_broken_connections(capfd):
    """`distributed.launch` on real torchrun with stand-in ranks (tests/torchrun_standin.py, no torch import): rank 0
    killed by SIGKILL is named from torchrun's root cause, not by the `error:` line of its peer's broken connection;
    no traceback or torchrun log gets through. (A rank's own `error:` line: the bad-hook run above.)"""
    from workbench.circuits.sae.distributed import DistributedRunError, launch

    with pytest.raises(DistributedRunError) as killed:
        launch(WORLD, ["killed"], module="tests.torchrun_standin")
    assert str(killed.value) == (
        f"rank 0 of the {WORLD}-process run was killed by SIGKILL (out of memory, or stopped from outside) and the "
        "job stopped; rerun the same command (with --checkpoint-every N it resumes from the last checkpoint)"
    )
    shown = capfd.readouterr()
    assert "rank 0 at work" in shown.out, shown
    assert shown.err == "", (
        shown.err
    )  # torchrun's log, its failure report and the peer's error line held back


def test_a_rerun_finds_the_checkpoint_of_the_same_command_only():
    """`--checkpoint-every`'s directory is keyed by the options that shape the stream and the SAEs, the number of
    processes and the layout: a `--nproc 2` parent's ranks (their --nproc is 1) and a rerun find the same one; other
    data, steps or layouts do not, and progress bars, the workspace and the checkpoint interval do not matter."""
    from typer.main import get_command

    from workbench.circuits.sae.cli import _checkpoint_dir

    train = get_command(app).commands["train"]  # type: ignore[attr-defined]
    base = [
        "code-tiny",
        "--data",
        "notes.txt",
        "--hook",
        HOOKS[0],
        "--workspace",
        "ws",
        "--checkpoint-every",
        "2",
    ]

    def where(*extra: str, world: int = WORLD, mode: str = "data"):
        return _checkpoint_dir(train.make_context("train", [*base, *extra]), Path("ws"), world, mode)

    first = where()
    assert first.parent == Path("ws").resolve() / "jobs" and first.name.startswith("sae-train-")
    assert where("--nproc", "2") == where("--no-progress") == where("--checkpoint-every", "5") == first
    others = [where("--steps", "10"), where("--data", "other.txt"), where(world=4), where(mode="hooks"),
              where("--hook", HOOKS[1]), where("--seed", "1")]  # fmt: skip
    assert len({first, *others}) == len(others) + 1
