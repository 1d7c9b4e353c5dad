"""Session-scoped zoo fixtures: code-tiny, fsm-tiny and vit-digits trained once per test session.

Set WORKBENCH_TEST_ZOO_CACHE=DIR to reuse trained models across local runs (CI never sets it).
"""

from __future__ import annotations

import os
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
HUB_REPO = "workbench-test/code-tiny"
HUB_STEPS = (0, 1, 2, 300)
HUB_DUPLICATE = ("step3", 2)  # a branch byte-identical to step2, as on some public Pythia branches


@pytest.fixture(autouse=True)
def _restore_main_module():
    """streamlit's AppTest runs a view script as ``__main__`` and leaves it there; a spawn process pool started
    later in the session (probe jobs) would then re-run that view in every worker. Put the real one back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def zoo_workspace(tmp_path_factory):
    from workbench.workspace import Workspace
    from workbench.zoo.train import train_zoo_model

    cache = os.environ.get("WORKBENCH_TEST_ZOO_CACHE")
    workspace = Workspace(Path(cache) if cache else tmp_path_factory.mktemp("zoo")).ensure()
    for name in TEST_ZOO:
        train_zoo_model(name, workspace, progress=False)
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
    from workbench.attention.summary import write_attention_statistics
    from workbench.checkpoints import CheckpointSeries
    from workbench.massive import fit_emergence, track_massive, write_results

    series = CheckpointSeries.from_directory(zoo_workspace.model_dir("code-tiny"))
    texts = ["def f(x):\n    return x\n", "import os\n"]
    report = track_massive(series, texts, steps=[0, 1, 2, 4, 8, 16, 32, 64, 128], progress=False)
    write_results(report, fit_emergence(report.layers), zoo_workspace)
    write_attention_statistics((series.load(s) for s in (0, series.steps[-1])), texts, zoo_workspace,
                               dataset="test-prompts")  # fmt: skip
    from workbench.probes.analysis import ProbeSettings, label_dataset, probe_series, write_probe_results

    dataset = label_dataset("bracket_depth", tokenizer=series.load(0).tokenizer, n_sequences=16, seq_len=48)
    rows = probe_series(series, [dataset], settings=ProbeSettings(random_init=False), steps=[0, 64, 300],
                        progress=False)  # fmt: skip
    write_probe_results(rows, zoo_workspace)
    import workbench.circuits.sae
    import workbench.circuits.transcoder_circuits

    workbench.circuits.sae.demo_step(zoo_workspace, progress=False)
    workbench.circuits.transcoder_circuits.demo_step(zoo_workspace, progress=False)
    import workbench.circuits.codebook
    import workbench.circuits.neuron_path

    workbench.circuits.codebook.demo_step(
        zoo_workspace, progress=False, model_name="fsm-tiny", n_codes=100, steps=40
    )
    workbench.circuits.neuron_path.demo_step(zoo_workspace, progress=False)
    return zoo_workspace
