"""The TokFSM science check of codebooks: on a TokFSM dataset (``zoo:tokfsm``: token rows, the hidden states in
``labels["fsm_state"]`` and the machine in ``meta["fsm"]``), train a k=1 codebook on a TokFSM model, measure how
purely each state's best code names that state against the best any code can do (``fsm_purity_ceiling``), and
force a state's code to see whether the model then continues legally from that state (``fsm_steering_check``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.circuits.codebook.analysis import CODES_TABLE, PURITY_TABLE, association
from workbench.circuits.codebook.analysis import run as analyse
from workbench.circuits.codebook.data import read_rows
from workbench.circuits.codebook.module import CodebookError, CodebookSet
from workbench.circuits.codebook.train import default_site, train
from workbench.datasets import Dataset

STATE_LABELS = "fsm_state"


def dataset_fsm(data: Dataset) -> Any:
    """The TokFSM behind ``data`` (``data.meta["fsm"]``); a dataset without one and its state labels is refused."""
    fsm = data.meta.get("fsm")
    if fsm is None or STATE_LABELS not in data.labels:
        raise CodebookError(
            f"dataset {data.name!r} is not a TokFSM dataset (it has no meta['fsm'] and labels['{STATE_LABELS}']); "
            "the TokFSM study runs on --data zoo:tokfsm"
        )
    return fsm


def fsm_steering_check(
    model: Any,
    codebooks: CodebookSet,
    site: str,
    fsm: Any,
    purity: pd.DataFrame,
    tokens: torch.Tensor,
    states: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """Force, at the last position of each sequence, the best code of a random other FSM state; report the
    rate of greedy next tokens legal from the forced state and from the true state (and both without forcing).

    Target states are those whose best code is not shared with a state of another legal-next-token set (such a
    code names no single state), whose legal set differs from the true state's and whose code differs from the
    true state's best code. Sequences with no such target are skipped (``skipped``); ``n`` counts the rest, and
    the rates are NaN when ``n`` is 0."""
    if codebooks[site].config.n_groups != 1:
        raise CodebookError(
            f"the FSM steering check needs a single codebook per token; {site} has one per head"
        )
    rows = purity[(purity["site"] == site) & (purity["label_set"] == "fsm_state")]
    code_of = dict(zip(rows["label"].astype(int), rows["best_code"].astype(int), strict=True))
    legal = {s: frozenset(fsm.legal_next_tokens(s)) for s in range(fsm.n_states)}
    sets_of_code: dict[int, set[frozenset[int]]] = {}
    for state, code in code_of.items():
        sets_of_code.setdefault(code, set()).add(legal[state])
    targets = sorted(s for s, c in code_of.items() if len(sets_of_code[c]) == 1)
    rng = np.random.default_rng(seed)
    last = tokens.shape[1] - 1
    true_states = states[:, last].cpu().numpy()
    forced_legal = forced_true = plain_true = plain_forced = 0
    n = skipped = 0
    tokens = tokens.to(model.device)
    with torch.no_grad(), model.hooks(codebooks.hooks()):
        plain = model(tokens)[:, -1].argmax(-1).cpu().numpy()
        for i, true in enumerate(true_states):
            true = int(true)
            choices = [s for s in targets if legal[s] != legal[true] and code_of[s] != code_of.get(true, -1)]
            if not choices:
                skipped += 1
                continue
            target = int(rng.choice(choices))
            with codebooks.steer(site, force={last: code_of[target]}):
                token = int(model(tokens[i : i + 1])[0, -1].argmax())
            forced_legal += fsm.is_legal(target, token)
            forced_true += fsm.is_legal(true, token)
            plain_true += fsm.is_legal(true, int(plain[i]))
            plain_forced += fsm.is_legal(target, int(plain[i]))
            n += 1
    rate = (lambda x: x / n) if n else (lambda x: float("nan"))
    return {
        "forced_legal_from_forced": rate(forced_legal),
        "forced_legal_from_true": rate(forced_true),
        "plain_legal_from_true": rate(plain_true),
        "plain_legal_from_forced": rate(plain_forced),
        "n": n,
        "skipped": skipped,
    }


def fsm_purity_ceiling(fsm: Any, tokens: torch.Tensor, states: torch.Tensor) -> dict[str, float]:
    """What the state-purity metric can reach on these sequences at best. A model only sees the tokens, so any
    code is a function of the prefix; the most informative one is the exact posterior over FSM states (forward
    filtering from a uniform first state). Returns ``purity``: the mean state purity of the code "posterior id"
    (one code per distinct posterior), and ``map_accuracy``: how often the posterior's most likely state is the
    true one. With every state's token shared by m states and uniform transitions both are 1/m."""
    token_ids, true_states = tokens.cpu().numpy(), states.cpu().numpy()
    n_states = len(fsm.emission)
    transition = np.zeros((n_states, n_states))
    for state in range(n_states):
        np.add.at(transition[state], fsm.successors[state], 1 / len(fsm.successors[state]))
    emits = fsm.emission[:, None] == np.arange(int(fsm.emission.max()) + 1)[None]  # [state, token]
    belief = np.full((token_ids.shape[0], n_states), 1 / n_states)
    posterior = np.empty((*token_ids.shape, n_states))
    for t in range(token_ids.shape[1]):
        if t:
            belief = belief @ transition
        belief = belief * emits[:, token_ids[:, t]].T
        belief /= belief.sum(1, keepdims=True)
        posterior[:, t] = belief
    flat = posterior.reshape(-1, n_states)
    _, ids = np.unique(np.round(flat, 9), axis=0, return_inverse=True)
    table = association(ids.reshape(-1), true_states.reshape(-1), int(ids.max()) + 1)
    return {
        "purity": float(table["purity"].mean()),
        "map_accuracy": float((flat.argmax(1) == true_states.reshape(-1)).mean()),
    }


def fsm_codebook_study(
    model: Any,
    data: Dataset,
    *,
    site: str | None = None,
    n_codes: int = 200,
    steps: int = 100,
    similarity: str = "dot",
    context_length: int = 32,
    directory: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The TokFSM science check: fine-tune a k=1 codebook on ``site`` (default: the last block's residual stream)
    of an FSM model on the TokFSM dataset ``data``, measure the purity P(state | best code) of the best code of each
    FSM state on its held-out rows (``mean_state_purity`` averages it over states) against ``fsm_purity_ceiling``,
    and the effect of forcing a state's code. Returns the tables (``frames``, the purity rows carrying
    ``purity_ceiling``), numbers and the codebooks."""
    fsm = dataset_fsm(data)
    site = site or default_site(model)
    books, report = train(
        model,
        data,
        [site],
        n_codes=n_codes,
        k=1,
        similarity=similarity,
        steps=steps,
        context_length=context_length,
        directory=directory,
        seed=seed,
        progress=progress,
    )
    frames = analyse(
        model,
        data,
        books,
        source=report.source,
        labels=[STATE_LABELS],
        run_name=Path(directory).name if directory else None,
    )
    held = read_rows(model, data, **{k: v for k, v in report.source.items() if k != "dataset"})
    states = held.eval_labels[STATE_LABELS]
    purity = frames[PURITY_TABLE]
    steering = fsm_steering_check(model, books, site, fsm, purity, held.eval[:64], states[:64])
    ceiling = fsm_purity_ceiling(fsm, held.eval, states)
    frames[PURITY_TABLE] = purity.assign(purity_ceiling=ceiling["purity"])
    frames[CODES_TABLE] = frames[CODES_TABLE].assign(loss_gap=report.loss_gap)
    return {
        "codebooks": books,
        "report": report,
        "frames": frames,
        "codes": frames[CODES_TABLE],
        "purity": frames[PURITY_TABLE],
        "steering": steering,
        "mean_state_purity": float(purity[purity["label_set"] == STATE_LABELS]["purity"].mean()),
        "purity_ceiling": ceiling["purity"],
        "map_accuracy": ceiling["map_accuracy"],
    }
