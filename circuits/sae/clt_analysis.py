"""Cross-layer transcoders on any model and dataset: :func:`run_clt` trains one over every layer a pair of hook
patterns matches (one capture pass feeds every layer's encoder) and scores it; :func:`evaluate_transcoders` scores
a CLT or a set of per-layer transcoders, including the replacement model (every MLP replaced at once, errors off).

Results: per-layer rows in ``sae_evals`` (``circuits.sae.analysis.ANALYSIS``; the CE columns of a CLT's per-layer
row are NaN, its ``ce_note`` points to the replacement table) and one row per (model, checkpoint, dataset,
transcoders) in ``transcoder_replacement`` (:data:`REPLACEMENT`), both stored by ``workbench.analysis.write_tables``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from workbench.analysis import Analysis, Table, write_tables
from workbench.circuits.sae.analysis import (
    ANALYSIS,
    _available_bytes,
    _rows_stream,
    _split,
    hook_widths,
    token_rows,
)
from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.clt import CLT_ARCHITECTURES, CLTConfig, CrossLayerTranscoder, clt_training_bytes
from workbench.circuits.sae.distributed import Distributed, document_range
from workbench.circuits.sae.evals import _next_token_log_probs, evaluate_sae, sae_dir, splice_hooks
from workbench.circuits.sae.formats.circuit_tracer import evaluate_clt
from workbench.circuits.sae.train import TrainConfig, check_sae_name, seeded_clt, train_saes
from workbench.hooks import HookNameError
from workbench.references import short_name
from workbench.workspace import Workspace, safe_name

REPLACEMENT = Analysis(
    name="transcoder_replacement",
    command="workbench sae eval CLT_OR_TRANSCODERS MODEL --data DATA",
    tables=(
        Table("transcoder_replacement", keys=("model", "checkpoint", "dataset", "transcoders"),
              columns=("kind", "n_layers", "n_tokens", "mean_L0", "ce_clean", "ce_replacement", "ce_unigram", "kl",
                       "gain_kept"),
              description="the replacement model (every MLP output replaced by the transcoders at once, errors "
              "off): next-token loss, KL against the model, and the share of the model's loss gain over a unigram "
              "baseline that it keeps"),
    ),
    requires=("tokenizer", "causal", "mlp"),
    description="cross-layer and per-layer transcoders as a replacement model",
)  # fmt: skip
LAYER_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


def replacement_hooks(transcoders: CrossLayerTranscoder | Sequence[SAE]) -> list:
    """Forward hooks replacing every MLP output at once by the transcoders' prediction from the replacement
    model's own MLP inputs (errors off): a CLT's layer j writes Σ_{i≤j} f_i W_dec[i][:, j−i] + b_dec[j] (+ skip),
    its features f_i encoded when the forward reaches layer i's input; a per-layer transcoder writes its output."""
    if isinstance(transcoders, CrossLayerTranscoder):
        clt = transcoders
        state: dict[int, torch.Tensor] = {}

        def read(layer: int):
            def hook(act, hook):
                x = act.reshape(-1, clt.d_model).to(device=clt.device, dtype=clt.W_enc.dtype)
                state[layer] = x
                state[-1 - layer] = clt.encode_layer(x, layer)
                return None

            return hook

        def write(layer: int):
            def hook(act, hook):
                out = clt.b_dec[layer].expand(state[layer].shape[0], -1).clone()
                for source in range(layer + 1):
                    out += state[-1 - source] @ clt.W_dec[source][:, layer - source]
                if clt.W_skip is not None:
                    out += state[layer] @ clt.W_skip[layer]
                return out.reshape(act.shape).to(device=act.device, dtype=act.dtype)

            return hook

        hooks = []
        for layer in range(clt.n_layers):
            hook_in, hook_out = clt.hooks(layer)
            hooks += [(hook_in, read(layer)), (hook_out, write(layer))]
        return hooks
    return [pair for sae in transcoders for pair in splice_hooks(sae)]


@torch.no_grad()
def replacement_metrics(model, transcoders: CrossLayerTranscoder | Sequence[SAE], tokens: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, batch_size: int = 8,
                        progress: bool = False) -> dict[str, float]:  # fmt: skip
    """The replacement model (every MLP output replaced by the transcoders at once, errors off) on tokens
    [batch, pos] (``attention_mask`` [batch, pos]): next-token CE of the model and of the replacement, KL(model ‖
    replacement) per predicted token, the CE of a unigram baseline (the tokens' own frequencies, add-one smoothed
    over the vocabulary) and ``gain_kept`` = (ce_unigram − ce_replacement) / (ce_unigram − ce_clean): the share of
    the model's loss gain over the unigram baseline that the replacement keeps (1: all of it)."""
    from tqdm.auto import tqdm

    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    hooks = replacement_hooks(transcoders)
    real = tokens[:, 1:][(mask[:, 1:] * mask[:, :-1]).bool()]
    counts = torch.bincount(real.reshape(-1).cpu(), minlength=model.cfg.d_vocab).double() + 1.0
    unigram = (counts / counts.sum()).log()
    sums = {"ce_clean": 0.0, "ce_replacement": 0.0, "ce_unigram": 0.0, "kl": 0.0}
    count = 0
    for start in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc="replacement model"):
        batch = {"input_ids": tokens[start : start + batch_size].to(model.device),
                 "attention_mask": mask[start : start + batch_size].to(model.device)}  # fmt: skip
        valid = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool().reshape(-1)
        targets = batch["input_ids"][:, 1:].reshape(-1)[valid]
        clean = _next_token_log_probs(model, batch, valid, [])
        replaced = _next_token_log_probs(model, batch, valid, hooks)
        sums["ce_clean"] += float(F.nll_loss(clean, targets, reduction="sum"))
        sums["ce_replacement"] += float(F.nll_loss(replaced, targets, reduction="sum"))
        sums["ce_unigram"] -= float(unigram[targets.cpu()].sum())
        sums["kl"] += float((clean.exp() * (clean - replaced)).sum())
        count += targets.numel()
    if count == 0:
        raise SAEInputError("no next-token prediction to score: every row has fewer than 2 real tokens")
    out = {key: value / count for key, value in sums.items()}
    gain = out["ce_unigram"] - out["ce_clean"]
    out["gain_kept"] = (
        (out["ce_unigram"] - out["ce_replacement"]) / gain if abs(gain) > 1e-12 else float("nan")
    )
    return out | {"n_tokens": count}


# ---------------------------------------------------------------------------------------------------- layers
def matched_layers(model, hook: str, hook_out: str) -> tuple[list[int], str, str]:
    """(model layers, per-layer input hook, per-layer output hook) of a pair of patterns such as
    ``blocks.*.ln2.hook_normalized`` / ``blocks.*.hook_mlp_out``; SAEInputError when a pattern matches no
    per-layer hook, names several kinds of hook, or the two match different layers, or the model has no MLPs."""
    if not getattr(model.cfg, "d_mlp", 0):
        raise SAEInputError(f"{model.cfg.name} has no MLP blocks (d_mlp = 0): a cross-layer transcoder replaces MLPs; "
                            "pick a model with MLPs")  # fmt: skip
    found = []
    for option, pattern in (("--hook", hook), ("--hook-out", hook_out)):
        try:
            names = model.resolve(pattern)
        except HookNameError as err:
            raise SAEInputError(f"{option} {pattern!r} matches no hook of {model.cfg.name}: {err}") from None
        parsed = [LAYER_HOOK.fullmatch(name) for name in names]
        suffixes = {m.group(2) for m in parsed if m}
        if not names or None in parsed or len(suffixes) != 1:
            raise SAEInputError(f"{option} {pattern!r} matches {names[:4]}: a CLT needs one per-layer hook, e.g. "
                                "--hook 'blocks.*.ln2.hook_normalized' --hook-out 'blocks.*.hook_mlp_out'")  # fmt: skip
        found.append(([int(m.group(1)) for m in parsed if m], suffixes.pop()))
    (layers_in, suffix_in), (layers_out, suffix_out) = found
    if sorted(layers_in) != sorted(layers_out):
        raise SAEInputError(f"--hook {hook!r} matches layers {sorted(layers_in)} but --hook-out {hook_out!r} matches "
                            f"layers {sorted(layers_out)}: give patterns that match the same layers")  # fmt: skip
    return sorted(layers_in), suffix_in, suffix_out


def memory_line(cfg: CLTConfig, batch_rows: int, device: torch.device | str, processes: int = 1) -> str:
    """The memory a CLT's training needs on ``device`` (``processes`` copies on one CPU), or SAEInputError with
    the number and the fixes when the device's free memory is smaller."""
    device = torch.device(device)
    need = clt_training_bytes(cfg, batch_rows) * (processes if device.type == "cpu" else 1)
    free = _available_bytes(device)
    text = (f"CLT over {cfg.n_layers} layers × {cfg.d_transcoder} latents (d_model {cfg.d_model}): training needs "
            f"about {need / 2**30:.2f} GiB (weights, gradients, Adam moments, a step's activations), {device} has "
            f"{free / 2**30:.1f} GiB free")  # fmt: skip
    if need > free:
        raise SAEInputError(f"{text}: too large; use fewer layers (a narrower --hook pattern), a smaller --d-sae, a "
                            "smaller --train-batch-size, or a device with more memory")  # fmt: skip
    return text


# ---------------------------------------------------------------------------------------------------- run
def run_clt(model, data, *, sae_id: str | None, hook: str, hook_out: str, architecture: str = "clt",
            d_sae: int = 256, k: int | None = None, skip: bool = False, workspace: Any, max_tokens: int | None = 100_000,
            context_length: int = 128, batch_size: int = 16, steps: int = 300, train_batch_size: int = 256,
            lr: float = 3e-3, seed: int = 0, progress: bool = True, distributed: Distributed | None = None,
            train_options: Mapping[str, Any] | None = None, announce=None) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Train a CLT (``architecture`` one of ``CLT_ARCHITECTURES``: clt = JumpReLU, clt_relu, clt_topk,
    clt_batchtopk) of ``d_sae`` latents per layer over the layers ``hook`` / ``hook_out`` match, on ``model``'s
    activations over ``data`` (the last quarter of the token rows held out), save it under ``saes/<id>/`` and score
    it (:func:`evaluate_transcoders`). Everything it refuses is refused before anything is captured or written;
    ``announce`` (a callable) receives the memory line before training. Data-parallel over ``distributed``'s ranks
    (each rank captures its own document range)."""
    ANALYSIS.check(model, data)
    if architecture not in CLT_ARCHITECTURES:
        raise SAEInputError(
            f"architecture {architecture!r} is not a CLT; use one of {sorted(CLT_ARCHITECTURES)}"
        )
    if isinstance(steps, bool) or steps < 1:
        raise SAEInputError(f"steps={steps!r}: train at least one step (--steps 1 or more)")
    layers, suffix_in, suffix_out = matched_layers(model, hook, hook_out)
    hooks_in = [f"blocks.{layer}.{suffix_in}" for layer in layers]
    hooks_out = [f"blocks.{layer}.{suffix_out}" for layer in layers]
    widths, ce_note = hook_widths(model, hooks_in + hooks_out)
    if len({widths[h] for h in hooks_in + hooks_out}) != 1:
        raise SAEInputError(f"the hooks have widths {sorted(set(widths.values()))}: a CLT reads and writes one "
                            "width (the MLP's input and output in the residual stream)")  # fmt: skip
    activation = CLT_ARCHITECTURES[architecture]
    sae_id = check_sae_name(sae_id or f"{short_name(model.cfg.name)}.{suffix_in}.{suffix_out}.{architecture}")
    cfg = CLTConfig(len(layers), widths[hooks_in[0]], d_sae, activation=activation,
                    k=k if activation in ("topk", "batchtopk") else None, skip=skip, hook_in=suffix_in,
                    hook_out=suffix_out, layers=layers, model=model.cfg.name, checkpoint=model.cfg.checkpoint,
                    dataset=data.name)  # fmt: skip
    rank, world = (distributed.rank, distributed.world_size) if distributed is not None else (0, 1)
    batch = max(1, train_batch_size // world)
    line = memory_line(cfg, batch, model.device, world if distributed is not None else 1)
    if announce is not None and rank == 0:
        announce(line)
    clt = seeded_clt(cfg, seed).to(model.device)
    ids, mask = token_rows(model, data, max_tokens=max_tokens, context_length=context_length,
                           batch_size=batch_size, seed=seed, progress=progress)  # fmt: skip
    split = _split(len(ids), data, context_length)
    if split < world:
        raise SAEInputError(
            f"dataset {data.name!r} gave {split} training rows for {world} ranks: give more text"
        )
    ws = Workspace(workspace).ensure()  # nothing is written before this point
    mine = document_range(split, rank, world)
    rows = [r[m.bool()].tolist() for r, m in zip(ids[mine], mask[mine], strict=True)]
    step = "" if model.cfg.checkpoint is None else f"@{model.cfg.checkpoint}"
    name = f"sae-{short_name(model.cfg.name)}{step}-{short_name(data.name)}-clt"
    from workbench.store import capture_to_store

    store = capture_to_store(model, rows, hooks_in + hooks_out,
                             ws.store_dir(safe_name(f"{name}-rank{rank}-of-{world}" if world > 1 else name)),
                             batch_size=batch_size, max_length=context_length, dataset=data.name,
                             checkpoint=model.cfg.checkpoint, overwrite=True, progress=progress)  # fmt: skip
    train = TrainConfig(steps=steps, lr=lr, warmup_steps=min(20, steps), progress=progress,
                        dead_after_tokens=10 * batch * world, **(train_options or {}))  # fmt: skip
    stream = _rows_stream(store, hooks_in + hooks_out, batch, None)
    trained = train_saes({sae_id: clt}, stream, train, distributed=distributed).saes[sae_id].eval()
    frames: dict[str, pd.DataFrame] = {}
    if rank == 0:
        trained.save(sae_dir(ws, sae_id))
        frames = evaluate_transcoders(model, trained, ids[split:], mask[split:], sae_id=sae_id, dataset=data.name,
                                      batch_size=batch_size, ce_note=ce_note, progress=progress)  # fmt: skip
        frames["sae_evals"] = frames["sae_evals"].assign(n_train_rows=store.n_rows * world, train_steps=steps)
    if distributed is not None:
        frames = distributed.all_gather_object(frames)[0]
    return frames


def evaluate_transcoders(model, transcoders: CrossLayerTranscoder | Sequence[SAE], tokens: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *, sae_id: str, dataset: str,
                         batch_size: int = 8, ce_note: str = "", progress: bool = False) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Score a CLT or per-layer transcoders on tokens [batch, pos]: per-layer ``sae_evals`` rows (FVU, L0,
    cosine, dead / dense fractions) and the ``transcoder_replacement`` row (:func:`replacement_metrics`; omitted when
    ``ce_note`` says the model has no next-token logits). ``sae_id`` names the CLT or the set."""
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    base = {"model": model.cfg.name, "checkpoint": model.cfg.checkpoint, "dataset": dataset}
    if isinstance(transcoders, CrossLayerTranscoder):
        rows = [r[m.bool()].tolist() for r, m in zip(tokens, mask, strict=True)]
        layers = evaluate_clt(model, rows, transcoders, max_tokens=int(mask.sum()) + 1,
                              context_length=tokens.shape[1], batch_size=batch_size)  # fmt: skip
        note = "a CLT's layer: its replacement-model loss is in transcoder_replacement"
        evals = layers.rename(columns={"hook_in": "hook"}).assign(
            **base, sae_id=sae_id, architecture=transcoders.cfg.architecture, transcoder=True,
            d_in=transcoders.d_model, d_sae=transcoders.d_transcoder, k=transcoders.cfg.k,
            explained_variance=1 - layers["FVU"], ce_note=ce_note or note,
        ).drop(columns=["layer"])  # fmt: skip
        kind, n_layers, mean_l0 = "cross_layer", transcoders.n_layers, float(layers["L0"].mean())
    else:
        frames = [evaluate_sae(model, sae, tokens, f"{sae_id}/{sae.hook_in}", batch_size, dataset, progress, mask,
                               ce_note) for sae in transcoders]  # fmt: skip
        evals = pd.concat(frames, ignore_index=True)
        kind, n_layers, mean_l0 = "per_layer", len(transcoders), float(evals["L0"].mean())
    out = {"sae_evals": evals}
    if not ce_note:
        metrics = replacement_metrics(model, transcoders, tokens, mask, batch_size, progress)
        out["transcoder_replacement"] = pd.DataFrame([base | {"transcoders": sae_id, "kind": kind,
                                                              "n_layers": n_layers, "mean_L0": mean_l0} | metrics])  # fmt: skip
    return out


def write_results(workspace: Any, frames: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """Store :func:`run_clt` / :func:`evaluate_transcoders` frames through the one writer."""
    written = write_tables(workspace, ANALYSIS, {k: v for k, v in frames.items() if k == "sae_evals"})
    rest = {k: v for k, v in frames.items() if k != "sae_evals"}
    return written | (write_tables(workspace, REPLACEMENT, rest) if rest else {})
