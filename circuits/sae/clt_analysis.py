"""Cross-layer transcoders on any model and dataset: :func:`run_clt` trains one over every layer a pair of hook
patterns matches (one capture pass feeds every layer's encoder) and scores it; :func:`evaluate_transcoders` scores
a CLT or a set of per-layer transcoders, including the replacement model (every MLP replaced at once, errors off).

Results: per-layer rows in ``sae_evals`` (``circuits.sae.analysis.ANALYSIS``; the CE columns of a CLT's per-layer
row are NaN, its ``ce_note`` points to the replacement table) and one row per (model, checkpoint, dataset,
transcoders) in ``transcoder_replacement`` (:data:`REPLACEMENT`), both stored by ``workbench.analysis.write_tables``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from workbench.analysis import Analysis, Table, settings_with
from workbench.circuits.sae.analysis import (
    ANALYSIS,
    SAETrainSettings,
    _available_bytes,
    _rows_stream,
    _sae_hooks,
    capture_training_rows,
    check_sae_fits,
    find_sae,
    hook_widths,
    packed_token_tensor,
    train_config,
)
from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.clt import (
    CLT_ARCHITECTURES,
    CLTConfig,
    CrossLayerTranscoder,
    clt_training_bytes,
    is_clt_dir,
    load_clt_dir,
)
from workbench.circuits.sae.distributed import Distributed
from workbench.circuits.sae.evals import _next_token_log_probs, evaluate_sae, sae_dir, splice_hooks
from workbench.circuits.sae.formats.circuit_tracer import CONFIG_FILE as CT_CONFIG_FILE
from workbench.circuits.sae.formats.circuit_tracer import (
    evaluate_clt,
    load_clt,
    load_transcoder_set,
    read_config,
)
from workbench.circuits.sae.train import check_sae_name, seeded_clt, train_saes
from workbench.fileio import atomic_save_tensors
from workbench.hooks import HookNameError
from workbench.identity import provenance_note
from workbench.references import short_name
from workbench.store import ActivationStore
from workbench.workspace import Workspace, safe_name

REPLACEMENT = Analysis(
    name="transcoder_replacement",
    command="workbench sae eval CLT_OR_TRANSCODERS MODEL --data DATA",
    tables=(
        Table(
            "transcoder_replacement",
            keys=("model", "checkpoint", "dataset", "transcoders"),
            columns=(
                "kind",
                "n_layers",
                "n_tokens",
                "mean_L0",
                "ce_clean",
                "ce_replacement",
                "ce_unigram",
                "kl",
                "gain_kept",
                "unigram_tokens",
                "sae_ids",
            ),
            description="the replacement model (every MLP output replaced by the transcoders at once, errors "
            "off): next-token loss, KL against the model, and the share of the model's loss gain over a unigram "
            "baseline that it keeps; unigram_tokens names the tokens whose frequencies gave the baseline; sae_ids "
            "(JSON list) the sae_id of its per-layer sae_evals rows",
        ),
    ),
    requires=("tokenizer", "causal", "mlp"),
    description="cross-layer and per-layer transcoders as a replacement model",
)
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
def replacement_metrics(
    model,
    transcoders: CrossLayerTranscoder | Sequence[SAE],
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = False,
    unigram_counts: torch.Tensor | None = None,
) -> dict[str, float]:
    """The replacement model (every MLP output replaced by the transcoders at once, errors off) on tokens
    [batch, pos] (``attention_mask`` [batch, pos]): next-token CE of the model and of the replacement, KL(model ‖
    replacement) per predicted token, the CE of a unigram baseline (token frequencies ``unigram_counts`` [d_vocab],
    e.g. of the training tokens, or else the scored tokens' own; add-one smoothed over the vocabulary) and
    ``gain_kept`` = (ce_unigram − ce_replacement) / (ce_unigram − ce_clean): the share of the model's loss gain
    over the unigram baseline that the replacement keeps (1: all of it)."""
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    hooks = replacement_hooks(transcoders)
    if unigram_counts is None:
        real = tokens[:, 1:][(mask[:, 1:] * mask[:, :-1]).bool()]
        unigram_counts = torch.bincount(real.reshape(-1).cpu(), minlength=model.cfg.d_vocab)
    counts = unigram_counts.double().cpu() + 1.0
    unigram = (counts / counts.sum()).log()
    sums = {"ce_clean": 0.0, "ce_replacement": 0.0, "ce_unigram": 0.0, "kl": 0.0}
    count = 0
    for start in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc="replacement model"):
        batch = {
            "input_ids": tokens[start : start + batch_size].to(model.device),
            "attention_mask": mask[start : start + batch_size].to(model.device),
        }
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
        raise SAEInputError(
            f"{model.cfg.name} has no MLP blocks (d_mlp = 0): a cross-layer transcoder replaces MLPs; "
            "pick a model with MLPs"
        )
    found = []
    for option, pattern in (("--hook", hook), ("--hook-out", hook_out)):
        try:
            names = model.resolve(pattern)
        except HookNameError as err:
            raise SAEInputError(f"{option} {pattern!r} matches no hook of {model.cfg.name}: {err}") from None
        parsed = [LAYER_HOOK.fullmatch(name) for name in names]
        suffixes = {m.group(2) for m in parsed if m}
        if not names or None in parsed or len(suffixes) != 1:
            raise SAEInputError(
                f"{option} {pattern!r} matches {names[:4]}: a CLT needs one per-layer hook, e.g. "
                "--hook 'blocks.*.ln2.hook_normalized' --hook-out 'blocks.*.hook_mlp_out'"
            )
        found.append(([int(m.group(1)) for m in parsed if m], suffixes.pop()))
    (layers_in, suffix_in), (layers_out, suffix_out) = found
    if sorted(layers_in) != sorted(layers_out):
        raise SAEInputError(
            f"--hook {hook!r} matches layers {sorted(layers_in)} but --hook-out {hook_out!r} matches "
            f"layers {sorted(layers_out)}: give patterns that match the same layers"
        )
    return sorted(layers_in), suffix_in, suffix_out


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def memory_line(cfg: CLTConfig, batch_rows: int, device: torch.device | str, processes: int = 1) -> str:
    """The memory a CLT's training needs on ``device`` (``processes`` copies on one CPU), or SAEInputError with
    the number and the fixes when the device's free memory is smaller."""
    device = torch.device(device)
    need = clt_training_bytes(cfg, batch_rows) * (processes if device.type == "cpu" else 1)
    free = _available_bytes(device)
    text = (
        f"CLT over {cfg.n_layers} layers × {cfg.d_transcoder} latents (d_model {cfg.d_model}): training needs "
        f"about {_size(need)} (weights, gradients, Adam moments, a step's activations), {device} has "
        f"{_size(free)} free"
    )
    if need > free:
        raise SAEInputError(
            f"{text}: too large; use fewer layers (a narrower --hook pattern), a smaller --d-sae, a "
            "smaller --train-batch-size, or a device with more memory"
        )
    return text


# ---------------------------------------------------------------------------------------------------- run
def run_clt(
    model,
    data,
    *,
    sae_id: str | None,
    hook: str,
    hook_out: str,
    architecture: str = "clt",
    d_sae: int = 256,
    k: int | None = None,
    skip: bool = False,
    settings: SAETrainSettings | None = None,
    workspace: Any,
    progress: bool = True,
    distributed: Distributed | None = None,
    train_options: Mapping[str, Any] | None = None,
    announce=None,
    **overrides: Any,
) -> dict[str, pd.DataFrame]:
    """Train a CLT (``architecture`` one of ``CLT_ARCHITECTURES``: clt = JumpReLU, clt_relu, clt_topk,
    clt_batchtopk) of ``d_sae`` latents per layer over the layers ``hook`` / ``hook_out`` match, on ``model``'s
    activations over ``data`` (the last quarter of the token rows held out), save it under ``saes/<id>/`` and score
    it (:func:`evaluate_transcoders`). Everything it refuses is refused before anything is captured or written;
    ``announce`` (a callable) receives the memory line before training. Data-parallel over ``distributed``'s ranks
    (each rank captures its own document range). ``settings``: :class:`SAETrainSettings` (the data budget and the
    optimisation); ``overrides`` replace its fields by keyword (``max_tokens=``, ``steps=``, ...)."""
    chosen = settings_with(settings, SAETrainSettings, overrides)
    batch_size, steps, train_batch_size, seed = (
        chosen.batch_size,
        chosen.steps,
        chosen.train_batch_size,
        chosen.seed,
    )
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
        raise SAEInputError(
            f"the hooks have widths {sorted(set(widths.values()))}: a CLT reads and writes one "
            "width (the MLP's input and output in the residual stream)"
        )
    activation = CLT_ARCHITECTURES[architecture]
    sae_id = check_sae_name(sae_id or f"{short_name(model.cfg.name)}.{suffix_in}.{suffix_out}.{architecture}")
    cfg = CLTConfig(
        len(layers),
        widths[hooks_in[0]],
        d_sae,
        activation=activation,
        k=k if activation in ("topk", "batchtopk") else None,
        skip=skip,
        hook_in=suffix_in,
        hook_out=suffix_out,
        layers=layers,
        model=model.cfg.name,
        checkpoint=model.cfg.checkpoint,
        dataset=data.name,
    )
    rank, world = (distributed.rank, distributed.world_size) if distributed is not None else (0, 1)
    batch = max(1, train_batch_size // world)
    line = memory_line(cfg, batch, model.device, world if distributed is not None else 1)
    if announce is not None and rank == 0:
        announce(line)
    clt = seeded_clt(cfg, seed).to(model.device)
    ids, mask, split, store, _ = capture_training_rows(
        model,
        data,
        hooks_in + hooks_out,
        chosen,
        workspace,
        rank=rank,
        world=world,
        dataset=data.name,
        progress=progress,
        suffix="-clt",
    )
    ws = Workspace(workspace)
    train = train_config(chosen, batch, world, progress, train_options)
    stream = _rows_stream(store, hooks_in + hooks_out, batch, None)
    trained = train_saes({sae_id: clt}, stream, train, distributed=distributed).saes[sae_id].eval()
    frames: dict[str, pd.DataFrame] = {}
    if rank == 0:
        folder = trained.save(sae_dir(ws, sae_id))
        counts = torch.bincount(ids[:split][mask[:split].bool()].cpu(), minlength=int(model.cfg.d_vocab or 0))
        save_training_tokens(folder, counts, data.name)
        unigram = (counts, f"the {int(counts.sum())} training tokens of {data.name!r}")
        frames = evaluate_transcoders(
            model,
            trained,
            ids[split:],
            mask[split:],
            sae_id=sae_id,
            dataset=data.name,
            batch_size=batch_size,
            ce_note=ce_note,
            progress=progress,
            unigram=unigram,
        )
        frames["sae_evals"] = frames["sae_evals"].assign(n_train_rows=store.n_rows * world, train_steps=steps)
    if distributed is not None:
        frames = distributed.all_gather_object(frames)[0]
    return frames


def evaluate_transcoders(
    model,
    transcoders: CrossLayerTranscoder | Sequence[SAE],
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    sae_id: str,
    dataset: str,
    batch_size: int = 8,
    ce_note: str = "",
    progress: bool = False,
    names: Sequence[str] | None = None,
    unigram: tuple[torch.Tensor, str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Score a CLT or per-layer transcoders on tokens [batch, pos]: per-layer ``sae_evals`` rows (FVU, L0,
    cosine, dead / dense fractions) and the ``transcoder_replacement`` row (:func:`replacement_metrics`; omitted when
    ``ce_note`` says the model has no next-token logits). ``sae_id`` names the CLT or the set; ``names`` the
    per-layer transcoders' own ids (default ``<sae_id>/<hook_in>``). ``unigram``: (token counts [d_vocab], what
    they count) for the baseline; default the scored tokens' own frequencies."""
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    base = {"model": model.cfg.name, "checkpoint": model.cfg.checkpoint, "dataset": dataset}
    if isinstance(transcoders, CrossLayerTranscoder):
        rows = [r[m.bool()].tolist() for r, m in zip(tokens, mask, strict=True)]
        layers = evaluate_clt(
            model,
            rows,
            transcoders,
            max_tokens=int(mask.sum()) + 1,
            context_length=tokens.shape[1],
            batch_size=batch_size,
        )
        note = "a CLT's layer: its replacement-model loss is in transcoder_replacement"
        evals = (
            layers.rename(columns={"hook_in": "hook"})
            .assign(
                **base,
                sae_id=sae_id,
                architecture=transcoders.cfg.architecture,
                transcoder=True,
                d_in=transcoders.d_model,
                d_sae=transcoders.d_transcoder,
                k=transcoders.cfg.k,
                explained_variance=1 - layers["FVU"],
                ce_note=ce_note or note,
            )
            .drop(columns=["layer"])
        )
        kind, n_layers, mean_l0 = "cross_layer", transcoders.n_layers, float(layers["L0"].mean())
        members = [sae_id]
    else:
        ids = list(names) if names is not None else [f"{sae_id}/{sae.hook_in}" for sae in transcoders]
        frames = [
            evaluate_sae(model, sae, tokens, name, batch_size, dataset, progress, mask, ce_note)
            for name, sae in zip(ids, transcoders, strict=True)
        ]
        evals = pd.concat(frames, ignore_index=True)
        kind, n_layers, mean_l0 = "per_layer", len(transcoders), float(evals["L0"].mean())
        members = ids
    out = {"sae_evals": evals}
    if not ce_note:
        counts, counted = unigram if unigram is not None else (None, scored_tokens_note(mask, dataset))
        metrics = replacement_metrics(model, transcoders, tokens, mask, batch_size, progress, counts)
        out["transcoder_replacement"] = pd.DataFrame(
            [
                base
                | {"transcoders": sae_id, "kind": kind, "n_layers": n_layers, "mean_L0": mean_l0}
                | metrics
                | {"unigram_tokens": counted, "sae_ids": json.dumps(members)}
            ]
        )
    return out


def replacement_layers(evals: pd.DataFrame, replacement: Mapping[str, Any]) -> pd.DataFrame:
    """The per-layer ``sae_evals`` rows (FVU, L0, dead / dense fractions, ...) behind one ``transcoder_replacement``
    row: those of its transcoders (``sae_ids``; a row written before that column: the CLT's own id) on the same
    model, checkpoint and dataset, ordered by layer."""
    ids = replacement.get("sae_ids")
    members = json.loads(ids) if isinstance(ids, str) else [replacement["transcoders"]]
    rows = evals[evals["sae_id"].isin(members)]
    for column in ("model", "checkpoint", "dataset"):
        value = replacement.get(column)
        missing = value is None or (isinstance(value, float) and value != value)
        rows = rows[rows[column].isna()] if missing else rows[rows[column] == value]
    layer = rows["hook"].map(lambda hook: int(m.group(1)) if (m := LAYER_HOOK.fullmatch(str(hook))) else -1)
    return rows.assign(_layer=layer).sort_values(["_layer", "hook"]).drop(columns="_layer")


# ---------------------------------------------------------------------------------------------------- eval
TRAINING_TOKENS_FILE = "training_tokens.safetensors"  # next to a CLT that run_clt trained: its tokens' counts
STORE_RANK = re.compile(r"-rank\d+-of-\d+$")


@dataclass
class FoundTranscoders:
    """What ``sae eval`` scores as a replacement model: ``name`` (the CLT's or the set's), a CLT or per-layer
    transcoders with their own ids ``names``, and the ``folders`` they were read from."""

    name: str
    transcoders: CrossLayerTranscoder | list[SAE]
    names: list[str] | None
    folders: list[Path]


def _reference_dir(reference: str, ws: Workspace) -> Path | None:
    """The folder a reference names, as ``find_sae`` resolves it: a saved id first, then a directory (or a
    circuit-tracer config.yaml's folder); None when it names neither."""
    path = Path(reference).expanduser()
    bare = len(path.parts) == 1 and not reference.startswith(".")
    if bare and safe_name(reference, "for an SAE") and sae_dir(ws, reference).is_dir():
        return sae_dir(ws, reference)
    if path.is_dir():
        return path
    if path.is_file() and path.name == CT_CONFIG_FILE:
        return path.parent
    return None


def _circuit_tracer_kind(folder: Path) -> str | None:
    if not (folder / CT_CONFIG_FILE).is_file():
        return None
    return str(read_config(folder)[1]["model_kind"])


def find_transcoders(references: Sequence[str], workspace: Any = None) -> FoundTranscoders | None:
    """Resolve ``sae eval``'s SAE argument: one reference to a CLT (a workspace id or a folder, ours or
    circuit-tracer's) or to a circuit-tracer transcoder set, or several references to per-layer transcoders (ids
    or folders); None for one plain SAE (scored by ``analysis.evaluate``). SAEInputError for a set that holds a
    CLT, an SAE that is not a transcoder, or two transcoders writing the same hook."""
    ws = Workspace(workspace)
    if len(references) == 1:
        folder = _reference_dir(references[0], ws)
        if folder is None:
            return None
        kind = _circuit_tracer_kind(folder) if not is_clt_dir(folder) else "workbench_clt"
        if kind == "workbench_clt":
            return FoundTranscoders(folder.name, load_clt_dir(folder), None, [folder])
        if kind == "cross_layer_transcoder":
            return FoundTranscoders(folder.name, load_clt(folder), None, [folder])
        if kind == "transcoder_set":
            pairs = load_transcoder_set(folder)
            return FoundTranscoders(
                folder.name,
                [sae for _, sae in pairs],
                [f"{folder.name}.{name}" for name, _ in pairs],
                [folder],
            )
        return None
    saes: list[SAE] = []
    names: list[str] = []
    folders: list[Path] = []
    for reference in references:
        folder = _reference_dir(reference, ws)
        if folder is not None and (is_clt_dir(folder) or _circuit_tracer_kind(folder) is not None):
            raise SAEInputError(
                f"{reference!r} is a cross-layer transcoder or a circuit-tracer transcoder set: score "
                f"it alone (`workbench sae eval {reference} MODEL --data DATA`), not in a list of "
                "per-layer transcoders"
            )
        name, sae = find_sae(reference, workspace)
        if not sae.cfg.is_transcoder:
            raise SAEInputError(
                f"SAE {name!r} reconstructs its own hook {sae.hook_in!r}: a replacement model is "
                "built from transcoders (MLP input → MLP output, `sae train --hook-out`); leave it "
                "out of the list"
            )
        saes.append(sae)
        names.append(name)
        folders.append(folder if folder is not None else Path(reference))
    writes = [sae.hook_out for sae in saes]
    twice = sorted({hook for hook in writes if writes.count(hook) > 1})
    if twice:
        both = [n for n, sae in zip(names, saes, strict=True) if sae.hook_out == twice[0]]
        raise SAEInputError(
            f"transcoders {', '.join(both)} all write {twice[0]!r}: a replacement model takes one "
            "transcoder per MLP output; keep one of them"
        )
    return FoundTranscoders("+".join(names), saes, names, folders)


def save_training_tokens(folder: Path, counts: torch.Tensor, dataset: str) -> Path:
    """Write the training tokens' counts [d_vocab] next to the transcoders they trained (the unigram baseline of
    a later ``sae eval``)."""
    file = folder / TRAINING_TOKENS_FILE
    atomic_save_tensors(
        file,
        {"counts": counts.to(torch.int64).cpu().contiguous()},
        {"dataset": dataset, "n_tokens": str(int(counts.sum()))},
    )
    return file


def training_unigram(
    model, found: FoundTranscoders, workspace: Any = None
) -> tuple[torch.Tensor, str] | None:
    """(counts [d_vocab], what they count) of the tokens the transcoders were trained on: the counts saved next to
    them (a CLT from :func:`run_clt`), else the workspace's activation store(s) of their model, checkpoint and
    dataset holding their hooks (``sae train``'s training store, every rank's; several such stores only when they
    hold the same tokens); None when neither exists."""
    d_vocab = int(model.cfg.d_vocab or 0)
    for folder in found.folders:
        file = folder / TRAINING_TOKENS_FILE
        if file.is_file():
            with safe_open(str(file), framework="pt") as handle:
                counts, meta = handle.get_tensor("counts"), handle.metadata() or {}
            if counts.numel() == d_vocab:
                return counts, (
                    f"the {meta.get('n_tokens', int(counts.sum()))} training tokens of "
                    f"{meta.get('dataset', '?')!r} (counted when {folder.name} was trained)"
                )
    transcoders = found.transcoders
    if isinstance(transcoders, CrossLayerTranscoder):
        cfgs = [transcoders.cfg]
        hooks = set(transcoders.hook_names[0] + transcoders.hook_names[1])
    else:
        cfgs = [sae.cfg for sae in transcoders]
        hooks = {hook for sae in transcoders for hook in (sae.hook_in, sae.hook_out)}
    identities = {(cfg.model, cfg.checkpoint, cfg.dataset) for cfg in cfgs}
    if len(identities) != 1 or not next(iter(identities))[2]:
        return None
    trained_on, checkpoint, dataset = identities.pop()

    groups: dict[str, list[Path]] = {}
    for manifest in sorted(Workspace(workspace).stores_dir.glob("*/manifest.json")):
        try:
            held = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if (held.get("model"), held.get("checkpoint"), held.get("dataset")) == (
            trained_on,
            checkpoint,
            dataset,
        ) and (held.get("complete") and hooks <= set(held.get("hooks", []))):
            groups.setdefault(STORE_RANK.sub("", manifest.parent.name), []).append(manifest.parent)
    counted: dict[str, torch.Tensor] = {}
    for name, folders in groups.items():
        ids = torch.cat([ActivationStore.open(folder).token_ids() for folder in folders])
        if d_vocab == 0 or (ids.numel() and int(ids.max()) >= d_vocab):
            return None
        counted[name + (f", {len(folders)} ranks" if len(folders) > 1 else "")] = torch.bincount(
            ids, minlength=d_vocab
        )
    if not counted or any(not torch.equal(c, next(iter(counted.values()))) for c in counted.values()):
        return None  # none, or several stores of other tokens: which trained these is unknown
    counts = next(iter(counted.values()))
    stores = "; ".join(f"store {name}" for name in counted)
    return counts, f"the {int(counts.sum())} training tokens of {dataset!r} ({stores})"


def check_clt_fits(clt: CrossLayerTranscoder, model, name: str) -> tuple[str, list[str]]:
    """Refuse a CLT whose hooks the model lacks or whose width is not the model's; (ce_note of
    :func:`hook_widths`, warnings: a CLT trained on another model of the same widths)."""
    hooks = [h for pair in zip(*clt.hook_names, strict=True) for h in pair]
    known = set(model.hook_names())
    missing = [h for h in hooks if h not in known]
    if missing:
        trained_on = f" (trained on {clt.cfg.model!r})" if clt.cfg.model else ""
        raise SAEInputError(
            f"CLT {name!r}{trained_on} reads and writes {missing[0]!r}, which {model.cfg.name} "
            f"lacks: use it on a model with its {clt.n_layers} layers"
        )
    widths, ce_note = hook_widths(model, hooks)
    wrong = [h for h in hooks if widths[h] != clt.d_model]
    if wrong:
        raise SAEInputError(
            f"CLT {name!r} has d_model={clt.d_model}, but {wrong[0]} of {model.cfg.name} has width "
            f"{widths[wrong[0]]}: it is a CLT of another model"
        )
    note = provenance_note(clt.cfg.model, None, model)
    return ce_note, [f"CLT {name!r} was {note}"] if note else []


def find_clt(reference: str, workspace: Any = None) -> tuple[str, CrossLayerTranscoder] | None:
    """(name, CLT) of a reference to a CLT (workspace id, our folder or circuit-tracer's); None otherwise."""
    found = find_transcoders([reference], workspace)
    if found is None or not isinstance(found.transcoders, CrossLayerTranscoder):
        return None
    return found.name, found.transcoders


def evaluate_replacement(
    model,
    data,
    found: FoundTranscoders,
    *,
    sae_id: str | None = None,
    workspace: Any = None,
    max_tokens: int | None = 20_000,
    context_length: int = 128,
    batch_size: int = 16,
    seed: int | None = 0,
    progress: bool = False,
) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """``sae eval`` of a CLT or a set of per-layer transcoders on ``model`` over a token budget of ``data``: the
    frames of :func:`evaluate_transcoders` (unigram baseline from :func:`training_unigram` when found) and the
    warnings to show (transcoders trained on another model of the same widths). Transcoders whose hooks or widths
    are not the model's are refused before any data is read."""
    ANALYSIS.check(model, data)
    if max_tokens is not None and max_tokens < 1:
        raise SAEInputError(f"max_tokens={max_tokens!r}: the token budget must be at least 1 (--max-tokens)")
    name = sae_id or found.name
    transcoders = found.transcoders
    notes: list[str] = []
    if isinstance(transcoders, CrossLayerTranscoder):
        ce_note, notes = check_clt_fits(transcoders, model, name)
        transcoders = transcoders.to(model.device).eval()
    else:
        names = found.names or [f"{name}/{sae.hook_in}" for sae in transcoders]
        hooks = [h for sae, n in zip(transcoders, names, strict=True) for h in _sae_hooks(sae, model, n)]
        widths, ce_note = hook_widths(model, list(dict.fromkeys(hooks)))
        notes += [
            note
            for sae, n in zip(transcoders, names, strict=True)
            if (note := check_sae_fits(sae, model, widths, n))
        ]
        transcoders = [sae.to(model.device).eval() for sae in transcoders]
    ids, mask = packed_token_tensor(
        model,
        data,
        max_tokens=max_tokens,
        context_length=context_length,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    unigram = None if ce_note else training_unigram(model, found, workspace)
    frames = evaluate_transcoders(
        model,
        transcoders,
        ids,
        mask,
        sae_id=name,
        dataset=data.name,
        batch_size=batch_size,
        ce_note=ce_note,
        progress=progress,
        names=found.names,
        unigram=unigram,
    )
    return frames, notes


def scored_tokens_note(mask: torch.Tensor, dataset: str) -> str:
    """What a unigram baseline of the scored tokens (mask [batch, pos]) counts."""
    return f"the {int(mask.sum())} scored tokens of {dataset!r} (no training token counts found)"
