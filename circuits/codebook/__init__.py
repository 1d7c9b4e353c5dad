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
    demo.py      demo_step (the study on a zoo fsm-* model and zoo:tokfsm)
"""

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
from workbench.circuits.codebook.data import TokenRows, read_rows, split_rows, token_rows
from workbench.circuits.codebook.demo import demo_step
from workbench.circuits.codebook.kmeans import init_kmeans, kmeans
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
    train,
    train_codebooks,
)

__all__ = [
    "ANALYSIS", "CODES_TABLE", "PURITY_TABLE", "TRAIN_COMMAND", "TRAIN_STATE", "Codebook", "CodebookConfig", "CodebookError",
    "CodebookSet", "TokenRows", "TrainReport", "analyse_codes", "association", "check",
    "codebook_dir", "collect_codes", "default_run_name", "default_site", "demo_step", "evaluate_loss",
    "fsm_codebook_study", "fsm_purity_ceiling", "fsm_steering_check", "generate", "init_kmeans", "kmeans",
    "mutual_information", "read_rows", "run", "site_config", "split_rows", "token_rows", "train",
    "train_codebooks",
]  # fmt: skip
