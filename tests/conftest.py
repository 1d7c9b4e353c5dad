"""Session-scoped zoo fixtures: code-tiny, fsm-tiny and vit-digits trained once per test session.

Set WORKBENCH_TEST_ZOO_CACHE=DIR to reuse trained models across local runs (CI never sets it). Under pytest-xdist
the workers of one run share the trained models; every worker's zoo_workspace is its own copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TEST_ZOO = ("code-tiny", "fsm-tiny", "vit-digits")
# No test reaches a hub: the hub code path runs against a cache the tests lay out (tests/hub_cache.py). Set before
# anything imports huggingface_hub, which reads these once.
HUB_CACHE = Path(tempfile.mkdtemp(prefix="workbench-hub-cache-"))
os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (`-n 2`, the README's test command) each worker computes on one core: two workers with two
# intra-op threads each would oversubscribe a 2-core machine. Set before torch is imported by any test module.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
# The longest test files, longest first (fresh-clone CI, 2 xdist workers). `make test` distributes whole files
# (--dist loadfile) in collection order (--no-loadscope-reorder) and this order puts these first, so that no worker
# is handed a long file while the other is nearly done (xdist's own order, most tests first, would put the
# notebooks, the browser and the crash tests, a few long tests each, last).
# Named by base name, whichever folder of tests/ holds the file (test file names are unique across the folders).
LONG_FILES = (
    "test_probe_jobs.py",
    "test_notebooks.py",
    "test_crash_store.py",
    "test_sae_cli_distributed.py",
    "test_browser.py",
    "test_browser_prompt_lab.py",
    "test_crash_training.py",
    "test_browser_graph.py",
    "test_clt_cli.py",
    "test_matrix.py",
    "test_sae.py",
    "test_sae_distributed.py",
)
HUB_REPO = "workbench-test/code-tiny"
HUB_STEPS = (0, 1, 2, 300)
HUB_DUPLICATE = ("step3", 2)  # a branch byte-identical to step2, as on some public Pythia branches


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of LONG_FILES first, in that order; the others after them in collection order (a stable sort:
    every file's tests stay together and in their order)."""
    rank = {name: index for index, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


@pytest.fixture(autouse=True)
def _restore_main_module():
    """streamlit's AppTest runs a view script as ``__main__`` and leaves it there; a spawn process pool started
    later in the session (probe jobs) would then re-run that view in every worker. Put the real one back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


def _trained_zoo(tmp_path_factory) -> Path:
    """A workspace holding the trained TEST_ZOO models: WORKBENCH_TEST_ZOO_CACHE, or one directory all xdist
    workers of this run share (each model trained once, under its own lock; workers start on different models)."""
    from workbench.workspace import Workspace
    from workbench.zoo.train import train_zoo_model

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if os.environ.get("WORKBENCH_TEST_ZOO_CACHE"):
        root = Path(os.environ["WORKBENCH_TEST_ZOO_CACHE"])
    elif worker:
        root = tmp_path_factory.getbasetemp().parent / "zoo-trained"
    else:
        root = tmp_path_factory.mktemp("zoo-trained")
    trained = Workspace(root).ensure()
    offset = int(worker[2:]) if worker and worker[2:].isdigit() else 0
    for name in TEST_ZOO[offset % len(TEST_ZOO) :] + TEST_ZOO[: offset % len(TEST_ZOO)]:
        with open(root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            train_zoo_model(name, trained, progress=False)
    return root


@pytest.fixture(scope="session")
def zoo_workspace(tmp_path_factory):
    """This session's own workspace with copies of the trained test zoo (results written here stay private)."""
    from workbench.workspace import Workspace

    trained = Workspace(_trained_zoo(tmp_path_factory))
    workspace = Workspace(tmp_path_factory.mktemp("zoo")).ensure()
    for name in TEST_ZOO:
        shutil.copytree(trained.model_dir(name), workspace.model_dir(name))
    return workspace


@pytest.fixture(scope="session")
def code_series(zoo_workspace):
    from workbench.checkpoints import CheckpointSeries

    return CheckpointSeries.from_directory(zoo_workspace.model_dir("code-tiny"))


@pytest.fixture(scope="session")
def fsm_series(zoo_workspace):
    from workbench.checkpoints import CheckpointSeries

    return CheckpointSeries.from_directory(zoo_workspace.model_dir("fsm-tiny"))


@pytest.fixture(scope="session")
def hub_repo(zoo_workspace) -> str:
    """``workbench-test/code-tiny`` in the offline hub cache: branches step0, step1, step2, step3 (= step2's bytes)
    and step300 (= main), from the code-tiny zoo series."""
    from tests.hub_cache import lay_out_hub_cache

    series_dir = zoo_workspace.model_dir("code-tiny")
    branches = {f"step{s}": series_dir / f"step{s}" for s in HUB_STEPS}
    branches[HUB_DUPLICATE[0]] = series_dir / f"step{HUB_DUPLICATE[1]}"
    lay_out_hub_cache(HUB_CACHE, HUB_REPO, dict(sorted(branches.items(), key=lambda kv: int(kv[0][4:]))))
    return HUB_REPO


@pytest.fixture(scope="session")
def vit_model_dir(zoo_workspace):
    from workbench.zoo.train import get_spec

    return zoo_workspace.model_dir("vit-digits") / f"step{get_spec('vit-digits').steps}"


@pytest.fixture(scope="session")
def dashboard_workspace(zoo_workspace, tmp_path_factory):
    """A workspace whose results database holds massive-activation, attention-statistics, probe, SAE,
    transcoder-circuit, codebook and neuron-path results (every dashboard view has data)."""
    from workbench.analyses.attention import analysis as attention
    from workbench.analyses.massive.analysis import ANALYSIS, fit_emergence, track_massive
    from workbench.analysis import write_tables
    from workbench.checkpoints import CheckpointSeries

    series = CheckpointSeries.from_directory(zoo_workspace.model_dir("code-tiny"))
    texts = ["def f(x):\n    return x\n", "import os\n"]
    report = track_massive(series, texts, steps=[0, 1, 2, 4, 8, 16, 32, 64, 128], progress=False)
    write_tables(zoo_workspace, ANALYSIS, report.frames(fit_emergence(report.layers)))
    write_tables(zoo_workspace, attention.ANALYSIS, attention.run((series.load(s) for s in (0, series.steps[-1])),
                                                                  texts, dataset="test-prompts"))  # fmt: skip
    from workbench.probes import analysis as probes

    settings = probes.ProbeSettings(random_init=False, n_sequences=16, context_length=48)
    frames = probes.run(
        series, labels="zoo:bracket_depth", steps=[0, 64, 300], settings=settings, progress=False
    )
    write_tables(zoo_workspace, probes.ANALYSIS, frames)
    from workbench.app.demo import recipes

    # the demo's SAE and neuron-path commands, then a graph of a python-stdlib row (fewer features: faster)
    for recipe in recipes():
        if recipe.command[:2] in (("sae", "train"), ("neuron-path", "run")):
            workbench_cli(*recipe.argv(zoo_workspace), "--no-progress")
    workbench_cli("circuits", "attribute", "code-tiny", "--transcoders", "code-tiny.L0-mlp-transcoder", "--transcoders",
                  "code-tiny.L1-mlp-transcoder", "--data", "zoo:python-stdlib", "--context-length", "32",
                  "--max-feature-nodes", "500", "--no-progress", "-w", str(zoo_workspace.root))  # fmt: skip
    # the demo's TokFSM study of codebooks, smaller
    workbench_cli("codebook", "tokfsm", "fsm-tiny", "--n-codes", "100", "--steps", "40", "--run", "fsm-tiny-demo",
                  "--no-progress", "-w", str(zoo_workspace.root))  # fmt: skip
    return zoo_workspace


def workbench_cli(*argv: str) -> str:
    """Run `workbench ARGV` in this process (typer's runner); its output, after asserting it exited 0."""
    from typer.testing import CliRunner

    from workbench.cli import app

    result = CliRunner().invoke(app, list(argv))
    assert result.exit_code == 0, result.output
    return result.output
