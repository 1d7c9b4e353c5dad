"""Feature-page data: per latent, top activating contexts, quantile samples, activation histogram and the
tokens its decoder direction promotes / suppresses through the unembedding. Table `sae_features`."""

from __future__ import annotations

import json

import pandas as pd
import torch

from circuits.sae.base import SAE

FEATURE_KEYS = ["sae_id", "latent"]
HIST_EDGES = torch.logspace(-3, 3, 31)


@torch.no_grad()
def feature_pages(
    sae: SAE,
    store,
    sae_id: str,
    *,
    model=None,
    tokenizer=None,
    top_k: int = 8,
    n_quantiles: int = 4,
    window: int = 6,
    n_tokens: int = 8,
    batch_size: int = 2048,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per latent from one streaming pass over an ActivationStore holding `sae.hook_in`.

    Contexts are token windows (window tokens before, 2 after) with the latent's activation on each token.
    Promoted / suppressed tokens come from W_dec @ W_U when `model` (HookedModel) is given and d_out = d_model.
    """
    from tqdm.auto import tqdm

    n_rows = store.n_rows
    top_vals = torch.full((top_k, sae.d_sae), -1.0)
    top_rows = torch.zeros((top_k, sae.d_sae), dtype=torch.long)
    hist = torch.zeros(sae.d_sae, len(HIST_EDGES) - 1, dtype=torch.long)
    fires = torch.zeros(sae.d_sae, dtype=torch.long)
    max_act = torch.zeros(sae.d_sae)
    offset = 0
    bar = tqdm(total=n_rows, disable=not progress, desc=f"feature pages {sae_id}")
    all_acts_sample = []
    for batch in store.iter_batches(sae.hook_in, batch_size, shuffle=False):
        x = batch[sae.hook_in].float().reshape(-1, sae.d_in)
        sae.check_input(x, "store batch")
        f = sae.encode(x)
        rows = torch.arange(offset, offset + f.shape[0])
        vals = torch.cat([top_vals, f])
        idx = torch.cat([top_rows, rows[:, None].expand_as(f)])
        top_vals, order = vals.topk(top_k, dim=0)
        top_rows = idx.gather(0, order)
        active = f > 0
        fires += active.sum(0)
        max_act = torch.maximum(max_act, f.max(0).values)
        bins = torch.bucketize(f.clamp(HIST_EDGES[0], HIST_EDGES[-1] * 0.999), HIST_EDGES) - 1
        bins = bins.clamp(0, len(HIST_EDGES) - 2)
        flat = (torch.arange(sae.d_sae) * (len(HIST_EDGES) - 1) + bins)[active]
        hist += torch.bincount(flat, minlength=hist.numel()).view_as(hist)
        all_acts_sample.append(f[:: max(1, n_rows // 4096)])
        offset += f.shape[0]
        bar.update(f.shape[0])
    bar.close()
    token_ids = store.token_ids()
    locations = store.locations()
    sample = torch.cat(all_acts_sample)
    decode = _decoder(tokenizer or (model.tokenizer if model is not None else None))
    promoted = suppressed = None
    if model is not None and sae.d_out == model.cfg.d_model:
        unembed = model.model.get_output_embeddings().weight.detach().float()
        logits = sae.W_dec.detach() @ unembed.T
        promoted = logits.topk(n_tokens, dim=1)
        suppressed = (-logits).topk(n_tokens, dim=1)

    def context(row: int, latent: int, activation: float) -> dict:
        seq, pos = locations[row].tolist()
        same = (locations[:, 0] == seq) & (locations[:, 1] >= pos - window) & (locations[:, 1] <= pos + 2)
        rows = same.nonzero().flatten()
        acts = sae.encode(store_rows(rows))[:, latent]
        return {
            "activation": activation,
            "focus": int((rows == row).nonzero()[0]),
            "tokens": [decode(int(t)) for t in token_ids[rows]],
            "acts": [round(float(a), 4) for a in acts],
        }

    hook_rows = store.read(sae.hook_in)

    def store_rows(rows: torch.Tensor) -> torch.Tensor:
        return hook_rows[rows].float().reshape(-1, sae.d_in)

    records = []
    for latent in range(sae.d_sae):
        contexts = [
            context(int(r), latent, float(v))
            for v, r in zip(top_vals[:, latent], top_rows[:, latent], strict=True)
            if v > 0
        ]
        positive = sample[:, latent][sample[:, latent] > 0]
        quantiles = []
        if positive.numel():
            qs = torch.quantile(positive, torch.linspace(0.1, 0.9, n_quantiles))
            quantiles = [round(float(q), 4) for q in qs]
        record = {
            "sae_id": sae_id,
            "latent": latent,
            "model": sae.cfg.model,
            "checkpoint": sae.cfg.checkpoint,
            "hook": sae.hook_in,
            "dataset": sae.cfg.dataset,
            "density": float(fires[latent]) / max(n_rows, 1),
            "max_activation": float(max_act[latent]),
            "top_contexts": json.dumps(contexts),
            "quantile_activations": json.dumps(quantiles),
            "histogram": json.dumps({"edges": HIST_EDGES.tolist(), "counts": hist[latent].tolist()}),
        }
        if promoted is not None:
            record["promoted_tokens"] = json.dumps(
                [
                    [decode(int(t)), round(float(v), 4)]
                    for v, t in zip(promoted.values[latent], promoted.indices[latent], strict=True)
                ]
            )
            record["suppressed_tokens"] = json.dumps(
                [
                    [decode(int(t)), round(-float(v), 4)]
                    for v, t in zip(suppressed.values[latent], suppressed.indices[latent], strict=True)
                ]
            )
        records.append(record)
    return pd.DataFrame(records)


def _decoder(tokenizer):
    if tokenizer is None:
        return str
    return lambda token: tokenizer.decode([token])


def write_features(frame: pd.DataFrame, workspace) -> int:
    """Write `sae_features` rows (re-runs replace the same (sae_id, latent))."""
    return workspace.results().write("sae_features", frame, replace_keys=FEATURE_KEYS)
