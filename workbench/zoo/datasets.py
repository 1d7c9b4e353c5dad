"""The zoo's dataset provider (entry point ``zoo`` of ``workbench.datasets``): ``zoo:python-stdlib``,
``zoo:tokfsm`` and ``zoo:digits`` as :class:`workbench.datasets.Dataset` objects, ground truth included."""

from __future__ import annotations

import torch

from workbench.datasets import Dataset, DatasetError
from workbench.zoo.corpora import TokFSM, digits_dataset, python_source_texts

NAMES = ("python-stdlib", "tokfsm", "digits")
FSM_SEQUENCES, FSM_LENGTH = 512, 64


def provide(name: str, limit: int | None = None) -> Dataset:
    """The zoo dataset ``name``; ``limit`` caps documents / sequences / images.

    tokfsm: ``FSM_SEQUENCES`` sequences of ``FSM_LENGTH`` tokens from the zoo's TokFSM (the fsm-* models' machine),
    hidden states in ``labels["fsm_state"]`` [n, pos]. digits: sklearn's digits test split as ``inputs``
    [n, 1, 8, 8] with ``labels["digit"]`` [n].
    """
    if name == "python-stdlib":
        return Dataset("zoo:python-stdlib", texts=lambda: python_source_texts(max_files=limit or 200))
    if name == "tokfsm":
        fsm = TokFSM()
        tokens, states = fsm.sample(limit or FSM_SEQUENCES, FSM_LENGTH, seed=1)

        return Dataset(
            "zoo:tokfsm",
            token_ids=torch.as_tensor(tokens, dtype=torch.long),
            labels={"fsm_state": states},
            meta={"fsm": fsm},
        )
    if name == "digits":
        _, _, x_test, y_test = digits_dataset()
        n = limit or len(x_test)
        return Dataset("zoo:digits", inputs=x_test[:n], labels={"digit": y_test[:n].numpy()})
    raise DatasetError(f"zoo has no dataset {name!r}; zoo datasets: {', '.join(f'zoo:{n}' for n in NAMES)}")
