"""kill -9 at every write boundary of the training writers (zoo, SAE trainer, codebooks), then resume: the result is
byte-for-byte the uninterrupted run's, with every log line once.

Each crash run is a real process that SIGKILLs itself at a named ``crash_point`` (``$WORKBENCH_CRASH_AT``). They
are forked from a forkserver that has imported torch and transformers once, so a run costs its training, not
seconds of imports; every run uses one thread, so all of them compute the same floating-point sums.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.forked import run_forked, start_forked
from workbench.faults import ENV_VAR
from workbench.fileio import verify_checksums

ZOO = dict(
    steps=12, checkpoint_every=4, n_layers=1, d_model=16, n_heads=2, d_mlp=32, batch_size=8, context_length=16
)
ZOO_STEPS = [0, 1, 2, 4, 8, 12]  # its checkpoints
SAE_STEPS, SAE_EVERY = 20, 5
CODEBOOK_STEPS, CODEBOOK_EVERY = 8, 2
SITE = "blocks.0.hook_resid_post"
CLI_STEPS = 30


# ---------------------------------------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def fork():
    """``fork(fn, *args, crash=None)``: ``fn(*args)`` in a process forked from the warm forkserver
    (tests/forked.py), with ``$WORKBENCH_CRASH_AT=crash``; returns its exit code (-9: killed by SIGKILL)."""
    return run_forked


def _crash_then_resume(fork, fn, crashes: list[str], *args) -> None:
    """Each crash point in turn kills a run (exit -9), then a clean run finishes (exit 0)."""
    for crash in crashes:
        assert fork(fn, *args, crash=crash) == -signal.SIGKILL, f"no kill at {crash}: is the point reached?"
    assert fork(fn, *args) == 0


def _files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), hidden temporaries included, ``skip`` names left out."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)
    }


# ---------------------------------------------------------------------------------------------- zoo
def _train_zoo(root: str, overrides: dict | None = None) -> None:
    from workbench.zoo.train import train_zoo_model

    train_zoo_model("fsm-tiny", root, progress=False, **(overrides or ZOO))


def _zoo_state(root: Path, steps: int) -> dict[str, bytes]:
    """The run's files (all but the resume state, checked here, and meta.json's wall time); asserts the log holds
    every step once, the resume state names the last step, and every step directory's checksums verify."""
    model_dir = root / "models" / "fsm-tiny"
    log = [json.loads(line)["step"] for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, steps + 1))
    assert torch.load(model_dir / "resume" / "optimizer.pt", weights_only=True)["step"] == steps
    for step_dir in model_dir.glob("step*"):
        assert (step_dir / "checksums.json").exists() and verify_checksums(step_dir) == []
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta.pop("train_seconds") >= 0
    return _files(model_dir, skip=("resume", "meta.json")) | {"meta": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def zoo_reference(fork, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("zoo-reference")
    assert fork(_train_zoo, str(root)) == 0
    files = _zoo_state(root, ZOO["steps"])
    assert {name.split("/")[0] for name in files if name.startswith("step")} == {
        f"step{s}" for s in ZOO_STEPS
    }
    return root, files


ZOO_CRASHES = [
    ["zoo.tokenizer_written"],  # tokenizer files half moved into place
    ["zoo.log_truncated"],  # fresh run, nothing trained yet
    ["zoo.step_written#1"],  # step0/ complete under its hidden name, not renamed
    ["zoo.step_renamed#1"],  # step0/ in place, no resume state yet
    ["zoo.resume_saved#1"],  # resume state at step 0
    ["zoo.step_written#3"],  # step2/ not renamed yet
    ["zoo.step_renamed#4"],  # step4/ in place, its log line and resume state not written
    ["zoo.log_line#6"],  # between checkpoints
    ["zoo.resume_saved#5"],  # right after the step-8 resume state
    ["zoo.step_renamed#6"],  # the last step's directory in place, nothing else
    ["zoo.log_line#12"],  # the last log line written, no resume state
    ["zoo.resume_saved#6"],  # finished
    ["zoo.step_renamed#4", "zoo.dir_trashed"],  # the resume is killed while discarding the orphan step4/
]


@pytest.mark.parametrize("crashes", ZOO_CRASHES, ids=["+".join(c) for c in ZOO_CRASHES])
def test_zoo_training_killed_at_a_write_boundary_resumes_to_the_same_bytes(
    fork, zoo_reference, tmp_path, crashes
) -> None:
    _crash_then_resume(fork, _train_zoo, crashes, str(tmp_path))
    assert _zoo_state(tmp_path, ZOO["steps"]) == zoo_reference[1]


def test_zoo_cli_killed_at_a_random_time_resumes_to_the_same_bytes(fork, tmp_path) -> None:
    """`workbench zoo train` killed with SIGKILL at a seeded random moment of its training, then resumed."""
    overrides = {"steps": CLI_STEPS, "seed": 3}  # what the command line below asks for
    reference = start_forked(_train_zoo, str(tmp_path / "reference"), overrides)  # runs beside the CLI
    command = [str(Path(sys.executable).with_name("workbench")), "zoo", "train", "fsm-tiny", "--steps",
               str(CLI_STEPS), "--seed", "3", "--workspace", str(tmp_path / "cli")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR} | {"OMP_NUM_THREADS": "1"}
    log = tmp_path / "cli" / "models" / "fsm-tiny" / "train_log.jsonl"
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_text().count("\n") >= 1) and victim.poll() is None:
        assert time.monotonic() < deadline, "the CLI run never started training"
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert log.read_text().count("\n") < CLI_STEPS
    assert fork(_train_zoo, str(tmp_path / "cli"), overrides) == 0  # the resume
    reference.join(300)
    assert reference.exitcode == 0
    assert _zoo_state(tmp_path / "cli", CLI_STEPS) == _zoo_state(tmp_path / "reference", CLI_STEPS)


# ---------------------------------------------------------------------------------------------- SAE trainer
def _sae_stream():
    """Endless deterministic batches {"h": [64, 8]}: sparse combinations of 24 fixed directions."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, 8, generator=gen)
    while True:
        mask = torch.rand(64, 24, generator=gen) < 0.1
        yield {"h": (mask * torch.rand(64, 24, generator=gen)) @ atoms}


def _train_sae(root: str) -> None:
    from workbench.circuits.sae.base import SAEConfig
    from workbench.circuits.sae.train import TrainConfig, seeded_sae, train_saes

    saes = {
        "topk": seeded_sae(SAEConfig("topk", d_in=8, d_sae=32, k=3, hook_in="h"), 0),
        "relu": seeded_sae(SAEConfig("relu", d_in=8, d_sae=16, l1_coefficient=0.05, hook_in="h"), 1),
    }
    cfg = TrainConfig(steps=SAE_STEPS, lr=3e-3, warmup_steps=3, checkpoint_dir=Path(root) / "checkpoint",
                      checkpoint_every=SAE_EVERY, progress=False, dead_after_tokens=256)  # fmt: skip
    result = train_saes(saes, _sae_stream(), cfg)
    for name, sae in result.saes.items():
        sae.save(Path(root) / "saes" / name)
    (Path(root) / "history.json").write_text(json.dumps(result.history))


def _sae_state(root: Path) -> dict[str, bytes]:
    history = json.loads((root / "history.json").read_text())
    assert all([row["step"] for row in rows] == list(range(SAE_STEPS)) for rows in history.values())
    assert sorted(p.name for p in (root / "checkpoint").iterdir()) == ["trainer_state.pt"]  # no leftovers
    return _files(root, skip=("checkpoint",))


@pytest.fixture(scope="module")
def sae_reference(fork, tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("sae-reference")
    assert fork(_train_sae, str(root)) == 0
    return _sae_state(root)


SAE_CRASHES = [
    ["sae.checkpoint_written#1"],  # step-5 state complete under its temporary name
    ["sae.checkpoint_saved#2"],  # right after the step-10 checkpoint
    ["sae.checkpoint_written#4"],  # the last checkpoint not renamed
    ["sae.checkpoint_saved#4"],  # the last checkpoint saved, the SAEs not yet
    ["sae.checkpoint_saved#1", "sae.checkpoint_written#1"],  # the resumed run killed too
]


@pytest.mark.parametrize("crashes", SAE_CRASHES, ids=["+".join(c) for c in SAE_CRASHES])
def test_sae_training_killed_at_a_write_boundary_resumes_to_the_same_bytes(
    fork, sae_reference, tmp_path, crashes
) -> None:
    _crash_then_resume(fork, _train_sae, crashes, str(tmp_path))
    assert _sae_state(tmp_path) == sae_reference


# ---------------------------------------------------------------------------------------------- codebooks
def _train_codebooks(model_dir: str, root: str) -> None:
    from workbench.circuits.codebook import train_codebooks
    from workbench.model import HookedModel
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    model = HookedModel.from_pretrained(model_dir)
    fsm = get_spec("fsm-tiny").fsm
    tokens = torch.from_numpy(TokFSM(**fsm, seed=0).sample(48, 12, seed=3)[0])
    train_codebooks(model, tokens, [SITE], n_codes=12, steps=CODEBOOK_STEPS, batch_size=8,
                    checkpoint_every=CODEBOOK_EVERY, dead_every=3, train_model=True, directory=Path(root) / "run",
                    seed=0, progress=False)  # fmt: skip


def _codebook_state(root: Path) -> dict[str, object]:
    """Analysis files (bytes) and the resume state's tensors (model weights, codes, usage, step)."""
    run = root / "run"
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["step"] == CODEBOOK_STEPS
    tensors = {f"codes.{i}": t for i, t in enumerate(state["codes"])} | {
        f"model.{k}": v for k, v in state["model"].items()
    }
    tensors |= {f"usage.{k}": v for k, v in state["usage"].items()}
    files = _files(run, skip=("train_state.pt",))
    assert sorted(files) == ["codebooks.safetensors", "config.json"]
    return files | {name: t.numpy().tobytes() for name, t in tensors.items()}


@pytest.fixture(scope="module")
def codebook_reference(fork, zoo_reference, tmp_path_factory) -> tuple[str, dict[str, object]]:
    model_dir = str(zoo_reference[0] / "models" / "fsm-tiny" / f"step{ZOO['steps']}")
    root = tmp_path_factory.mktemp("codebook-reference")
    assert fork(_train_codebooks, model_dir, str(root)) == 0
    return model_dir, _codebook_state(root)


CODEBOOK_CRASHES = [
    ["codebook.state_saved#1"],  # train_state.pt at step 2, codebooks.safetensors not yet
    ["codebook.codes_saved#2"],  # codebooks.safetensors at step 4, config.json still at step 2
    ["codebook.state_saved#4"],  # the last train_state.pt, the analysis files one checkpoint behind
    ["codebook.codes_saved#5"],  # the final save (with losses) before its config.json
]


@pytest.mark.parametrize("crashes", CODEBOOK_CRASHES, ids=["+".join(c) for c in CODEBOOK_CRASHES])
def test_codebook_training_killed_at_a_write_boundary_resumes_to_the_same_bytes(
    fork, codebook_reference, tmp_path, crashes
) -> None:
    model_dir, reference = codebook_reference
    _crash_then_resume(fork, _train_codebooks, crashes, model_dir, str(tmp_path))
    assert _codebook_state(tmp_path) == reference
