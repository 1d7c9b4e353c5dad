"""Codebook features (Tamkin et al., "Codebook Features: Sparse and Discrete Interpretability") on any causal LM and
any dataset.

A codebook is a vector-quantisation bottleneck on one hook site: the activation (LayerNorm-ed, per head for
``attn.hook_z``) picks its top-k codes by inner-product or cosine similarity, and the sum of those code vectors
replaces it. One job per file:

    module.py    Codebook, CodebookSet (hooks, recorded codes, steering rules), CodebookConfig, site_config, save/load
    kmeans.py    k-means++ / Lloyd init of the codes from the site's activations
    data.py      token rows of any dataset through its one iterator, the seeded held-out split, per-token labels
    train.py     train_codebooks (next-token + reconstruction loss, dead codes, checkpoints, resume), train
    analysis.py  ANALYSIS, check, analyse_codes / run (counts, contexts, purity, MI)
    steering.py  generate with forced / disabled codes
    tokfsm.py    the TokFSM science check: fsm_codebook_study, fsm_purity_ceiling, fsm_steering_check
    runs.py      workspace/codebooks/<run>/ and default run names
    cli.py       the `workbench codebook` commands

The names below are loaded on first access (PEP 562): importing the package, as mounting its commands does, loads
no torch, so ``workbench --help`` stays fast. The functions ``train`` and ``kmeans`` are imported from their
modules of the same name (the package attribute of that name is the module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.circuits.codebook.analysis import (
        ANALYSIS,
        CODES_TABLE,
        PURITY_TABLE,
        TRAIN_COMMAND,
        analyse_codes,
        association,
        check,
        collect_codes,
        mutual_information,
        run,
    )
    from workbench.circuits.codebook.data import TokenRows, equal_length_rows, read_rows, split_rows
    from workbench.circuits.codebook.kmeans import init_kmeans
    from workbench.circuits.codebook.module import (
        Codebook,
        CodebookConfig,
        CodebookError,
        CodebookSet,
        site_config,
    )
    from workbench.circuits.codebook.runs import codebook_dir, default_run_name
    from workbench.circuits.codebook.steering import generate
    from workbench.circuits.codebook.tokfsm import fsm_codebook_study, fsm_purity_ceiling, fsm_steering_check
    from workbench.circuits.codebook.train import (
        TRAIN_STATE,
        TrainReport,
        default_site,
        evaluate_loss,
        train_codebooks,
    )

__all__ = [
    "ANALYSIS",
    "CODES_TABLE",
    "Codebook",
    "CodebookConfig",
    "CodebookError",
    "CodebookSet",
    "PURITY_TABLE",
    "TRAIN_COMMAND",
    "TRAIN_STATE",
    "TokenRows",
    "TrainReport",
    "analyse_codes",
    "association",
    "check",
    "codebook_dir",
    "collect_codes",
    "default_run_name",
    "default_site",
    "evaluate_loss",
    "fsm_codebook_study",
    "fsm_purity_ceiling",
    "fsm_steering_check",
    "generate",
    "init_kmeans",
    "mutual_information",
    "read_rows",
    "run",
    "site_config",
    "split_rows",
    "equal_length_rows",
    "train_codebooks",
]
_HOMES = {
    "ANALYSIS": "analysis",
    "CODES_TABLE": "analysis",
    "PURITY_TABLE": "analysis",
    "TRAIN_COMMAND": "analysis",
    "analyse_codes": "analysis",
    "association": "analysis",
    "check": "analysis",
    "collect_codes": "analysis",
    "mutual_information": "analysis",
    "run": "analysis",
    "TokenRows": "data",
    "read_rows": "data",
    "split_rows": "data",
    "equal_length_rows": "data",
    "init_kmeans": "kmeans",
    "Codebook": "module",
    "CodebookConfig": "module",
    "CodebookError": "module",
    "CodebookSet": "module",
    "site_config": "module",
    "codebook_dir": "runs",
    "default_run_name": "runs",
    "generate": "steering",
    "fsm_codebook_study": "tokfsm",
    "fsm_purity_ceiling": "tokfsm",
    "fsm_steering_check": "tokfsm",
    "TRAIN_STATE": "train",
    "TrainReport": "train",
    "default_site": "train",
    "evaluate_loss": "train",
    "train_codebooks": "train",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module when first asked for."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
