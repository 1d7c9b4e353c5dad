"""The demo step of codebooks (``workbench demo``): the TokFSM study on a workspace's fsm-* zoo model and
``zoo:tokfsm``, through the same library calls as ``workbench codebook train|analyse``."""

from __future__ import annotations

from typing import Any

from workbench.analysis import write_tables
from workbench.circuits.codebook.analysis import ANALYSIS
from workbench.circuits.codebook.runs import codebook_dir
from workbench.circuits.codebook.tokfsm import fsm_codebook_study
from workbench.datasets import load_dataset
from workbench.references import resolve_model


def demo_step(
    workspace: Any, progress: bool = True, model_name: str = "fsm-small", n_codes: int = 300, steps: int = 300
) -> str:
    """Codebooks on the last checkpoint of the workspace's TokFSM model ``model_name``, on its last block's residual
    stream, trained and analysed on ``zoo:tokfsm`` (run ``<model_name>-demo``); writes both tables and returns a
    summary line (state purity vs its ceiling, loss gap, steering effect)."""
    model = resolve_model(model_name, workspace=workspace)
    study = fsm_codebook_study(model, load_dataset("zoo:tokfsm"), n_codes=n_codes, steps=steps,
                               directory=codebook_dir(workspace, f"{model_name}-demo"), progress=progress)  # fmt: skip
    write_tables(workspace, ANALYSIS, study["frames"])
    steer = study["steering"]
    return (f"codebooks {model_name}: state purity {study['mean_state_purity']:.3f} (ceiling for a code that knows "
            f"the exact state posterior {study['purity_ceiling']:.3f}), loss gap "
            f"{study['report'].loss_gap:+.3f} nats, forced code → legal from forced state "
            f"{steer['forced_legal_from_forced']:.2f} vs unforced {steer['plain_legal_from_forced']:.2f}")  # fmt: skip
