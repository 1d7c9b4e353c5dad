"""Feature pages out as Neuronpedia / SAEDashboard JSON.

:func:`dashboard_batch` turns ``sae_features`` rows (``circuits.sae.features``) into SAEDashboard's batch JSON
(``batch-N.json``: ``model_id``, ``layer``, ``sae_set``, ``features[]`` with ``feature_index``, ``activations``
(``tokens``, ``values``, ``bin_min`` / ``bin_max`` / ``bin_contains``, ``qualifying_token_index``), ``pos_str`` /
``pos_values`` / ``neg_str`` / ``neg_values``, ``frac_nonzero``, ``freq_hist_data_bar_values`` / ``_heights``,
``logits_hist_data_bar_values`` / ``_heights``, ``neuron_alignment_*``, ...). :func:`write_bulk_export` writes
Neuronpedia's bulk-import folder from it (``{model}/{source}/release.jsonl``, ``model.jsonl``, ``sourceset.jsonl``,
``source.jsonl``, ``features/batch-N.jsonl.gz``, ``activations/batch-N.jsonl.gz``). The field names follow
SAEDashboard's ``neuronpedia_dashboard.py`` / ``neuronpedia_export.py`` (sae-dashboard cannot be installed next to
the project's transformers, so the tests check the files field by field against that schema).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.fileio import atomic_write_bytes, atomic_write_json

N_ALIGNMENT = 10  # decoder entries listed per feature (neuron_alignment_*)
N_LOGIT_BINS = 40


def _layer(hook: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else 0


def _activation(context: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
    return {
        "bin_min": bin_min,
        "bin_max": bin_max,
        "bin_contains": bin_contains,
        "tokens": context["tokens"],
        "values": [float(v) for v in context["acts"]],
        "qualifying_token_index": int(context["focus"]),
    }


def _histogram_bars(histogram: dict) -> tuple[list[float], list[float]]:
    """(bar centres, counts) of a log-spaced activation histogram {edges, counts}."""
    edges, counts = histogram["edges"], histogram["counts"]
    centres = [round(math.sqrt(lo * hi), 6) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return centres, [float(c) for c in counts]


def _count(row: Any, column: str) -> int:
    """A count column of a ``sae_features`` row (0 for pages stored before the column existed)."""
    value = getattr(row, column, None)
    return 0 if value is None or pd.isna(value) else int(value)


def dashboard_batch(
    features: pd.DataFrame,
    sae: SAE,
    *,
    model_id: str,
    sae_set: str,
    logits: torch.Tensor | None = None,
    decode=None,
    n_logits: int = 10,
) -> dict[str, Any]:
    """SAEDashboard batch JSON for the latents in ``features`` (rows of ``sae_features`` for one SAE and dataset).

    ``logits`` [d_sae, d_vocab] (``features.logit_effects``) and ``decode`` (token id -> text) give pos/neg logits and
    the logit histogram; without them pos/neg come from the rows' promoted / suppressed tokens and the logit
    histogram is empty."""
    if features.empty:
        raise SAEInputError("no feature pages to export: run `workbench sae train` (or `sae eval`) first")
    w_dec = sae.W_dec.detach().float().cpu()
    out = []
    for row in features.sort_values("latent").itertuples():
        latent = int(row.latent)
        top = json.loads(row.top_contexts or "[]")
        activations = [_activation(c, -1.0, float(row.max_activation), -1.0) for c in top]
        fires = 0
        for band in json.loads(row.quantile_samples or "[]"):
            fires += int(band["count"])
        for band in json.loads(row.quantile_samples or "[]"):
            high = band["high"] if band["high"] is not None else float(row.max_activation)
            share = band["count"] / fires if fires else 0.0
            activations += [_activation(c, float(band["low"]), float(high), share) for c in band["contexts"]]
        bar_values, bar_heights = _histogram_bars(json.loads(row.histogram))
        direction = w_dec[latent]
        align = direction.abs().topk(min(N_ALIGNMENT, direction.numel()))
        l1 = float(direction.abs().sum()) or 1.0
        feature: dict[str, Any] = {
            "feature_index": latent,
            "neuron_alignment_indices": align.indices.tolist(),
            "neuron_alignment_values": [round(float(direction[i]), 4) for i in align.indices],
            "neuron_alignment_l1": [round(float(direction[i]) / l1, 4) for i in align.indices],
            "correlated_neurons_indices": [],
            "correlated_neurons_l1": [],
            "correlated_neurons_pearson": [],
            "correlated_features_indices": [],
            "correlated_features_l1": [],
            "correlated_features_pearson": [],
            "frac_nonzero": float(row.density),
            "freq_hist_data_bar_values": bar_values,
            "freq_hist_data_bar_heights": bar_heights,
            "n_prompts_total": _count(row, "n_prompts"),
            "n_tokens_in_prompt": _count(row, "n_tokens_in_prompt"),
            "dataset": str(row.dataset or ""),
            "decoder_weights_dist": [],
            "activations": activations,
        }
        if logits is not None and decode is not None:
            effects = logits[latent]
            pos, neg = effects.topk(n_logits), (-effects).topk(n_logits)
            counts, edges = torch.histogram(effects, bins=N_LOGIT_BINS)
            feature |= {
                "pos_str": [decode(int(t)) for t in pos.indices],
                "pos_values": [round(float(v), 4) for v in pos.values],
                "neg_str": [decode(int(t)) for t in neg.indices],
                "neg_values": [round(-float(v), 4) for v in neg.values],
                "logits_hist_data_bar_values": [round(float(e), 4) for e in (edges[:-1] + edges[1:]) / 2],
                "logits_hist_data_bar_heights": counts.tolist(),
            }
        else:
            promoted = json.loads(getattr(row, "promoted_tokens", None) or "[]")
            suppressed = json.loads(getattr(row, "suppressed_tokens", None) or "[]")
            feature |= {
                "pos_str": [t for t, _ in promoted],
                "pos_values": [v for _, v in promoted],
                "neg_str": [t for t, _ in suppressed],
                "neg_values": [v for _, v in suppressed],
                "logits_hist_data_bar_values": [],
                "logits_hist_data_bar_heights": [],
            }
        out.append(feature)
    return {"model_id": model_id, "layer": _layer(sae.hook_in), "sae_set": sae_set, "features": out}


def _jsonl_gz(rows: list[dict[str, Any]]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0)


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_bulk_export(
    out: str | Path,
    batch: dict[str, Any],
    sae: SAE,
    *,
    creator_id: str = "workbench",
    creator_name: str = "",
    batch_name: str = "batch-0",
    description: str = "",
) -> Path:
    """Write ``batch`` as SAEDashboard's ``batch_name.json`` under ``out`` and Neuronpedia's bulk-import folder
    ``out/{model_id}/{layer}-{sae_set}/``; returns the source folder."""
    out = Path(out)
    atomic_write_json(out / f"{batch_name}.json", batch)
    model_id, sae_set, layer = batch["model_id"], batch["sae_set"], batch["layer"]
    source_id = f"{layer}-{sae_set}"
    folder = out / model_id / source_id
    now = datetime.now(UTC).isoformat()
    release = {
        "name": sae_set,
        "description": description or f"{sae_set} ({sae.cfg.architecture}, d_sae={sae.d_sae})",
        "descriptionShort": description or sae_set,
        "creatorName": creator_name or creator_id,
        "creatorNameShort": creator_name or creator_id,
        "creatorId": creator_id,
        "visibility": "PUBLIC",
        "urls": [],
        "createdAt": now,
    }
    model = {
        "id": model_id,
        "instruct": model_id.endswith("-it"),
        "displayNameShort": model_id,
        "displayName": model_id,
        "creatorId": creator_id,
        "createdAt": now,
        "updatedAt": now,
    }
    sourceset = {
        "modelId": model_id,
        "name": sae_set,
        "creatorId": creator_id,
        "creatorName": creator_name or creator_id,
        "releaseName": sae_set,
        "description": description or sae_set,
        "visibility": "PUBLIC",
        "hasDashboards": True,
        "createdAt": now,
    }
    source = {
        "id": source_id,
        "modelId": model_id,
        "setName": sae_set,
        "creatorId": creator_id,
        "hasDashboards": True,
        "visibility": "PUBLIC",
        "dataset": sae.cfg.dataset or None,
        "num_prompts": None,
        "num_tokens_in_prompt": None,
        "createdAt": now,
    }
    for name, row in (("release", release), ("model", model), ("sourceset", sourceset), ("source", source)):
        atomic_write_bytes(folder / f"{name}.jsonl", _jsonl([row]))
    feature_rows, activation_rows = [], []
    for feature in batch["features"]:
        index = str(feature["feature_index"])
        max_act = 0.0
        for number, act in enumerate(feature["activations"]):
            values = act["values"]
            peak = max(values) if values else 0.0
            max_act = max(max_act, peak)
            activation_rows.append(
                {
                    "id": f"{source_id}-{index}-{number}",
                    "tokens": act["tokens"],
                    "modelId": model_id,
                    "layer": source_id,
                    "index": index,
                    "maxValue": peak,
                    "maxValueTokenIndex": values.index(peak) if values else 0,
                    "minValue": min(values) if values else 0.0,
                    "values": values,
                    "creatorId": creator_id,
                    "dfaValues": [],
                    "lossValues": [],
                    "binMin": act["bin_min"],
                    "binMax": act["bin_max"],
                    "binContains": act["bin_contains"],
                    "qualifyingTokenIndex": act["qualifying_token_index"],
                    "createdAt": now,
                }
            )
        keep = {
            k: v
            for k, v in feature.items()
            if k not in ("feature_index", "activations", "n_prompts_total", "n_tokens_in_prompt", "dataset")
        }
        feature_rows.append(
            {
                "modelId": model_id,
                "layer": source_id,
                "index": index,
                "creatorId": creator_id,
                "createdAt": now,
                "maxActApprox": max_act,
                "hasVector": False,
                "vector": [],
                "hookName": sae.hook_in,
                "topkCosSimIndices": [],
                "topkCosSimValues": [],
                **keep,
            }
        )
    atomic_write_bytes(folder / "features" / f"{batch_name}.jsonl.gz", _jsonl_gz(feature_rows))
    atomic_write_bytes(folder / "activations" / f"{batch_name}.jsonl.gz", _jsonl_gz(activation_rows))
    return folder
