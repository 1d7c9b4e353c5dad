"""Analysing trained codebooks: which codes fire (counts, top tokens, top contexts ranked by code-input
similarity) and how they line up with per-token labels (purity / mutual information), on any dataset.

Purity (``codebook_purity``): for each label value (e.g. an FSM state) its best code is the code most often chosen
on that label's tokens, and purity = P(label | best code), the share of the best code's tokens that carry that
label; recall = P(best code | label). ``run(model, data, codebooks)`` → ``{"codebook_codes", "codebook_purity"}``
frames, keyed by (model, checkpoint, dataset, run, site); ``ANALYSIS`` declares them and ``write_tables`` stores
them. Labels: the per-token label arrays a token dataset carries (``zoo:tokfsm``: ``fsm_state``) or any per-token
label source of ``workbench.labels`` (a spans .jsonl, a label function ``FILE.py:FN``); without labels only counts and
contexts are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import torch

from workbench.analysis import Analysis, AnalysisNotApplicable, Table
from workbench.circuits.codebook.data import EVAL_FRACTION, equal_length_rows, read_rows
from workbench.circuits.codebook.module import CodebookError, CodebookSet, site_config
from workbench.datasets import Dataset
from workbench.hooks import HookNameError
from workbench.labels import load_labels

CODES_TABLE = "codebook_codes"
PURITY_TABLE = "codebook_purity"
KEYS = ("model", "checkpoint", "dataset", "run", "site")
ANALYSIS = Analysis(
    name="codebook",
    command="workbench codebook run MODEL --data DATA",
    tables=(
        Table(
            CODES_TABLE,
            keys=KEYS,
            columns=(
                "head",
                "code",
                "count",
                "frequency",
                "top_tokens",
                "top_contexts",
                "top_context_scores",
                "label_set",
                "best_label",
                "purity",
                "loss_gap",
            ),
            description="per live code (per head on attn.hook_z): usage, top tokens and top contexts; with labels "
            "its most frequent label and P(label | code); a rerun of the same model, checkpoint, dataset, run "
            "and site replaces all its rows",
        ),
        Table(
            PURITY_TABLE,
            keys=KEYS,
            columns=(
                "head",
                "label_set",
                "label",
                "label_name",
                "best_code",
                "purity",
                "recall",
                "label_count",
                "mi",
                "label_set_mi",
            ),
            description="per label value: its best code, purity P(label | best code), recall, MI (nats)",
        ),
    ),
    requires=("causal", "text", "tokenizer"),
    description="codebook features: VQ bottlenecks on hook sites of a causal LM, code usage and label purity",
)
TRAIN_COMMAND = "workbench codebook train MODEL --data DATA"


def check(
    model: Any,
    data: Dataset | None = None,
    sites: Sequence[str] = (),
    context_length: int | None = None,
    codebooks: CodebookSet | None = None,
) -> None:
    """Refuse, before any work, what codebooks cannot use: a model without next-token logits (an encoder such as
    MiniLM; codebooks are fine-tuned with the next-token loss), data that is not text or token ids, a site the
    model lacks or that holds no codebook, a context longer than the model's, or ``codebooks`` trained on a model
    of other widths."""
    try:
        ANALYSIS.check(model, data)
    except AnalysisNotApplicable as err:
        raise AnalysisNotApplicable(f"codebooks are fine-tuned with the next-token loss: {err}") from None
    for site in sites:
        try:
            config = site_config(model, site, 1)
        except HookNameError as err:
            raise AnalysisNotApplicable(
                f"{model.cfg.name} has no hook site {site!r} for a codebook: {err.args[0]}"
            ) from None
        if codebooks is not None and site in codebooks.sites:
            trained = codebooks[site].config
            if (trained.d, trained.n_groups) != (config.d, config.n_groups):
                raise AnalysisNotApplicable(
                    f"the codebook on {site} holds codes of width {trained.d} × {trained.n_groups} group(s), but "
                    f"{model.cfg.name} has {config.d} × {config.n_groups} there; analyse it with the model it was "
                    "trained on"
                )
    if context_length is not None:
        model.check_context_length(context_length)


@overload
def collect_codes(
    model: Any,
    codebooks: CodebookSet,
    tokens: torch.Tensor,
    batch_size: int = ...,
    return_scores: Literal[False] = ...,
) -> dict[str, torch.Tensor]: ...


@overload
def collect_codes(
    model: Any,
    codebooks: CodebookSet,
    tokens: torch.Tensor,
    batch_size: int = ...,
    *,
    return_scores: Literal[True],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...


def collect_codes(
    model: Any,
    codebooks: CodebookSet,
    tokens: torch.Tensor,
    batch_size: int = 64,
    return_scores: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Codes chosen at every site for ``tokens`` [n, pos]: {site: [n, pos, n_groups, k]} on the CPU; with
    ``return_scores`` also the chosen codes' similarity to their inputs, {site: [n, pos, n_groups, k]}."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in codebooks.sites}
    scores: dict[str, list[torch.Tensor]] = {s: [] for s in codebooks.sites}
    with torch.no_grad(), model.hooks(codebooks.hooks()):
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i : i + batch_size].to(model.device))
            for s in codebooks.sites:
                out[s].append(codebooks.codes(s).cpu())
                scores[s].append(codebooks.scores(s).float().cpu())
    codes = {s: torch.cat(v) for s, v in out.items()}
    return (codes, {s: torch.cat(v) for s, v in scores.items()}) if return_scores else codes


def association(codes: np.ndarray, labels: np.ndarray, n_codes: int) -> pd.DataFrame:
    """Code ↔ label association from aligned code ids and labels [rows] (label or code −1 ignored): per label
    value, the best code (highest count on that label), its purity P(label | code), recall P(code | label) and the
    mutual information (nats) between the indicators code==best and label==value."""
    keep = (labels >= 0) & (codes >= 0)
    codes, labels = codes[keep].astype(np.int64), labels[keep].astype(np.int64)
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    joint = np.zeros((n_codes, n_labels))
    np.add.at(joint, (codes, labels), 1)
    n = joint.sum()
    per_code, per_label = joint.sum(1), joint.sum(0)
    rows = []
    for label in np.flatnonzero(per_label):
        best = int(joint[:, label].argmax())
        both = joint[best, label]
        p = (
            np.array(
                [
                    [n - per_code[best] - per_label[label] + both, per_label[label] - both],
                    [per_code[best] - both, both],
                ]
            )
            / n
        )
        outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
        mi = float(
            np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / np.where(outer > 0, outer, 1)), 0))
        )
        rows.append(
            {
                "label": int(label),
                "best_code": best,
                "purity": both / per_code[best],
                "recall": both / per_label[label],
                "label_count": int(per_label[label]),
                "mi": mi,
            }
        )
    return pd.DataFrame(rows)


def mutual_information(codes: np.ndarray, labels: np.ndarray) -> float:
    """I(code; label) in nats from aligned arrays [rows] (label −1 and code −1 ignored)."""
    keep = (labels >= 0) & (codes >= 0)
    codes, labels = codes[keep], labels[keep]
    _, ci = np.unique(codes, return_inverse=True)
    _, li = np.unique(labels, return_inverse=True)
    joint = np.zeros((ci.max() + 1, li.max() + 1))
    np.add.at(joint, (ci, li), 1)
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def analyse_codes(
    model: Any,
    codebooks: CodebookSet,
    tokens: torch.Tensor,
    label_sets: dict[str, torch.Tensor] | None = None,
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    top_contexts: int = 5,
    context: int = 4,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-code counts, top tokens and top contexts, and code ↔ label purity / MI for ``tokens`` [n, pos] and
    ``label_sets`` {name: labels [n, pos]}. Returns (codes table, purity table); the first chosen code (k slot 0)
    is the one associated with labels. A code's top contexts are the ``top_contexts`` token windows (``context``
    tokens before the token, then the token) where the code is chosen with the highest similarity to its input,
    best first (``top_context_scores``). Purity per label value is P(label | best code), as in ``association``.
    Per-head sites get one row per (head, code); every row records ``dataset``."""
    name = model_name or model.cfg.name
    step = model.cfg.checkpoint
    tokens = tokens.cpu()
    codes, scores = collect_codes(model, codebooks, tokens, return_scores=True)
    flat_labels = {k: v.cpu().numpy().reshape(-1) for k, v in (label_sets or {}).items()}
    to_str = model.to_str_tokens if model.tokenizer is not None else (lambda t: [str(int(x)) for x in t])
    flat_tok = tokens.reshape(-1).numpy()
    code_rows, purity_rows = [], []
    for site, chosen in codes.items():
        config = codebooks[site].config
        for group in range(config.n_groups):
            first = chosen[:, :, group, 0].numpy().reshape(-1)
            flat = chosen[:, :, group].reshape(-1, config.k).numpy()
            flat_scores = scores[site][:, :, group].reshape(-1, config.k).numpy()
            counts = np.bincount(flat[flat >= 0].reshape(-1), minlength=config.n_codes)
            best = {}
            for set_name, labels in flat_labels.items():
                table = association(first, labels, config.n_codes)
                mi_total = mutual_information(first, labels)
                for row in table.to_dict("records"):
                    purity_rows.append(
                        {
                            "model": name,
                            "checkpoint": step,
                            "dataset": dataset,
                            "site": site,
                            "hook": site,
                            "head": group if config.n_groups > 1 else None,
                            "label_set": set_name,
                            **row,
                            "label_set_mi": mi_total,
                        }
                    )
                best[set_name] = _best_label_per_code(first, labels, config.n_codes)
            for code in np.flatnonzero(counts):
                hit = flat == code
                where = np.flatnonzero(hit.any(1))
                tok_ids, tok_counts = np.unique(flat_tok[where], return_counts=True)
                order = np.argsort(-tok_counts)[:5]
                top_tokens = [to_str(torch.tensor([int(tok_ids[i])]))[0] for i in order]
                similarity = np.where(hit[where], flat_scores[where], -np.inf).max(1)
                ranked = np.argsort(-similarity, kind="stable")[:top_contexts]
                contexts = []
                for row_index in where[ranked]:
                    seq, pos = divmod(int(row_index), tokens.shape[1])
                    window = tokens[seq, max(0, pos - context) : pos + 1]
                    contexts.append(" ".join(to_str(window)))
                row = {
                    "model": name,
                    "checkpoint": step,
                    "dataset": dataset,
                    "site": site,
                    "hook": site,
                    "head": group if config.n_groups > 1 else None,
                    "code": int(code),
                    "count": int(counts[code]),
                    "frequency": float(counts[code] / max(1, flat.shape[0])),
                    "top_tokens": top_tokens,
                    "top_contexts": contexts,
                    "top_context_scores": [float(v) for v in similarity[ranked]],
                }
                if best:
                    set_name, (labels_of, purities) = next(iter(best.items()))
                    row.update(
                        {
                            "label_set": set_name,
                            "best_label": int(labels_of[code]),
                            "purity": float(purities[code]),
                        }
                    )
                code_rows.append(row)
    return pd.DataFrame(code_rows), pd.DataFrame(purity_rows)


def _best_label_per_code(
    codes: np.ndarray, labels: np.ndarray, n_codes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(most frequent label, its share P(label | code)) for each code [n_codes]; −1 / 0 where a code never fires."""
    keep = (labels >= 0) & (codes >= 0)
    n_labels = int(labels[keep].max()) + 1 if keep.any() else 1
    joint = np.zeros((n_codes, n_labels))
    np.add.at(joint, (codes[keep], labels[keep]), 1)
    total = joint.sum(1)
    return np.where(total > 0, joint.argmax(1), -1), np.where(
        total > 0, joint.max(1) / np.maximum(total, 1), 0.0
    )


def run(
    model: Any,
    data: Dataset,
    codebooks: CodebookSet | str | Path,
    *,
    labels: Sequence[str] | None = None,
    source: dict[str, Any] | None = None,
    context_length: int | None = None,
    max_tokens: int | None = None,
    run_name: str | None = None,
    top_contexts: int = 5,
    context: int = 4,
) -> dict[str, pd.DataFrame]:
    """Counts, contexts and label purity of ``codebooks`` (a CodebookSet or a run directory) on ``data`` →
    ``{"codebook_codes": frame, "codebook_purity": frame}`` (purity empty without labels).

    Rows: on the dataset the codebooks were trained on, its held-out rows (the seeded split saved with them); on
    any other dataset all its rows (``read_rows`` / ``equal_length_rows``; ``context_length`` / ``max_tokens`` default to
    the training's). ``source``: how the training rows were read (``TrainReport.source``), by default from the run
    directory's metadata. ``labels``: names of ``data``'s per-token label arrays and/or per-token label sources
    (``workbench.labels.load_labels``); default every per-token label array ``data`` carries.
    """
    meta: dict[str, Any] = {}
    if not isinstance(codebooks, CodebookSet):
        directory = Path(codebooks)
        meta = CodebookSet.metadata(directory)
        codebooks = CodebookSet.load(directory, model.device)
        run_name = run_name or directory.name
    source = source or meta.get("source") or {}
    context_length = context_length or source.get("context_length") or 128
    max_tokens = max_tokens or source.get("max_tokens")
    check(model, data, codebooks.sites, context_length, codebooks)
    if source.get("dataset") == data.name:
        rows = read_rows(
            model,
            data,
            context_length=context_length,
            max_tokens=max_tokens,
            seed=source.get("seed", 0),
            eval_fraction=source.get("eval_fraction", EVAL_FRACTION),
        )
        tokens, carried = rows.eval, rows.eval_labels
    else:
        tokens, carried = equal_length_rows(model, data, context_length=context_length, max_tokens=max_tokens)
    wanted = list(carried) if labels is None else list(labels)
    codes, purity = analyse_codes(
        model,
        codebooks,
        tokens,
        {n: carried[n] for n in wanted if n in carried},
        dataset=data.name,
        top_contexts=top_contexts,
        context=context,
    )
    purity = pd.concat(
        [
            purity,
            *(_source_purity(model, codebooks, data, s, context_length) for s in wanted if s not in carried),
        ],
        ignore_index=True,
    )
    codes = codes.assign(run=run_name)
    if meta.get("loss_gap") is not None:
        codes["loss_gap"] = meta["loss_gap"]
    if not len(purity):  # no labels: an empty frame that still names the declared keys
        purity = pd.DataFrame(columns=[*KEYS, *ANALYSIS.table(PURITY_TABLE).columns])
    return {CODES_TABLE: codes, PURITY_TABLE: purity.assign(run=run_name)}


def _source_purity(
    model: Any, codebooks: CodebookSet, data: Dataset, source: str, context_length: int
) -> pd.DataFrame:
    """Purity rows against a per-token label source of ``workbench.labels`` (its own token rows, aligned to the
    model's tokenizer; ``data`` feeds a label function)."""
    labelled = load_labels(source, model.tokenizer, data=data, context_length=context_length)
    if labelled.level != "token" or labelled.task != "classification":
        raise CodebookError(
            f"label source {source!r} gives {labelled.level}-level {labelled.task} labels; code purity needs one "
            "class label per token: a spans .jsonl, a tokens/labels .jsonl or a per-character label function"
        )
    ids = torch.where(
        labelled.labelled(), labelled.labels.long(), torch.full_like(labelled.labels.long(), -1)
    )
    _, purity = analyse_codes(
        model, codebooks, labelled.tokens, {labelled.name: ids}, dataset=data.name, top_contexts=0
    )
    if labelled.classes and len(purity):
        purity["label_name"] = purity["label"].map(lambda i: labelled.classes[int(i)])
    return purity
