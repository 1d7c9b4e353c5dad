"""The SAE analysis: train SAEs / transcoders on any model and any dataset, evaluate them, and their feature pages.

:func:`run` takes a HookedModel (``workbench.references.resolve_model``), a Dataset (``workbench.datasets.
load_dataset``) and ``{sae_id: SAEConfig kwargs}``; it reads a token budget of the dataset through its one
iterator, holds out the last quarter of the rows for evaluation, captures the rest into an activation store in
the workspace (one forward feeds every SAE), trains, saves each SAE under ``workspace/saes/<id>/`` and returns the
``sae_evals`` and ``sae_features`` frames. A dataset that *is* an activation store holding the hooks is trained
from directly (its rows are the training data). :func:`evaluate` scores a saved SAE on a model and a dataset.
Everything a run can refuse (hooks the model lacks, an SAE that does not fit in memory, zero steps, a store of
another model) is refused before any capture. The CE metrics need next-token logits: on an encoder such as MiniLM
only the reconstruction metrics are reported and ``ce_note`` says why. ``write_tables(workspace, ANALYSIS, frames)`` stores the frames.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench.analysis import Analysis, AnalysisNotApplicable, Table, settings_with
from workbench.capture import capture_to_store
from workbench.circuits.sae.base import CONFIG_FILE, PER_HEAD_HOOKS, SAE, SAEConfig, SAEInputError
from workbench.circuits.sae.distributed import (
    Distributed,
    document_range,
    local_ranks,
    owned_names,
    store_shards,
)
from workbench.circuits.sae.evals import evaluate_sae, sae_dir
from workbench.circuits.sae.features import feature_pages
from workbench.circuits.sae.formats import load_sae
from workbench.circuits.sae.train import TrainConfig, check_sae_name, seeded_sae, train_saes
from workbench.datasets import Dataset, DatasetError
from workbench.hooks import resolve_hook_names
from workbench.identity import provenance_note
from workbench.references import short_name
from workbench.store import ActivationStore, StoreUnion
from workbench.workspace import Workspace, safe_name

_KEYS = ("model", "checkpoint", "hook", "dataset", "sae_id")
ANALYSIS = Analysis(
    name="sae",
    command="workbench sae train MODEL --data DATA --hook HOOK",
    tables=(
        Table(
            "sae_evals",
            keys=_KEYS,
            columns=(
                "hook_out",
                "architecture",
                "transcoder",
                "d_in",
                "d_sae",
                "k",
                "n_tokens",
                "L0",
                "FVU",
                "explained_variance",
                "cosine",
                "dead_fraction",
                "dense_fraction",
                "ce_clean",
                "ce_spliced",
                "ce_zero",
                "ce_recovered",
                "kl",
                "ce_note",
                "density_histogram",
                "n_train_rows",
                "train_steps",
                "ce_gap_se",
                "ce_recovered_note",
            ),
            description="per SAE, model checkpoint and dataset: sparsity, reconstruction and (causal LMs) the CE "
            "loss with the SAE spliced in; ce_note says when the CE metrics do not apply, ce_recovered_note when "
            "the zero-ablation gap (ce_zero - ce_clean, standard error ce_gap_se) is too small for CE recovered "
            "to mean anything",
        ),
        Table(
            "sae_features",
            keys=_KEYS,
            columns=(
                "latent",
                "density",
                "max_activation",
                "top_contexts",
                "quantile_activations",
                "quantile_samples",
                "histogram",
                "promoted_tokens",
                "suppressed_tokens",
                "n_prompts",
                "n_tokens_in_prompt",
                "head_shares",
            ),
            description="feature pages, one row per latent, from the SAE's training dataset; a rerun replaces "
            "every latent of that SAE and dataset",
        ),
    ),
    requires=("tokenizer", "text"),
    description="sparse autoencoders and transcoders: training, evaluation, feature pages",
)
EVAL_FRACTION = 0.25  # share of the token rows held out for evaluation


# ---------------------------------------------------------------------------------------------------- names
def default_sae_id(model_reference: Any, hook_in: str, architecture: str, hook_out: str | None = None) -> str:
    """``<model short name>.<hook_in>[.<hook_out>].<architecture>``, checked by ``safe_name``."""
    out = f".{hook_out}" if hook_out and hook_out != hook_in else ""
    return check_sae_name(f"{short_name(model_reference)}.{hook_in}{out}.{architecture}")


def check_sae_owner(workspace: Workspace, sae_id: str, model_identity: str) -> None:
    """Refuse to train ``sae_id`` for ``model_identity`` when the workspace holds an SAE of that id trained on
    another model (retraining on the same model replaces it)."""
    folder = sae_dir(workspace, sae_id)
    if not (folder / CONFIG_FILE).is_file():
        return
    owner = json.loads((folder / CONFIG_FILE).read_text()).get("model") or ""
    if owner and owner != model_identity:
        raise SAEInputError(
            f"SAE id {sae_id!r} already belongs to {owner!r}, not {model_identity!r}; pick another --id (the "
            f"default id is built from the model's identity), or delete {folder} to replace it"
        )


def find_sae(reference: str | Path, workspace: Any = None) -> tuple[str, SAE]:
    """An SAE by id in ``workspace/saes`` or by directory (any layout ``load_sae`` reads) → (id, SAE). A bare name
    that is both a saved id and a folder in the working directory means the saved SAE (write ``./NAME`` for the
    folder)."""
    path = Path(reference).expanduser()
    ws = Workspace(workspace)
    name = str(reference)
    bare = len(path.parts) == 1 and not name.startswith(".")
    if bare and safe_name(name, "for an SAE") and sae_dir(ws, name).is_dir():
        return name, load_sae(sae_dir(ws, name))
    if path.is_dir():
        return path.name, load_sae(path)
    saved = sorted(p.name for p in (ws.root / "saes").glob("*") if p.is_dir())
    raise SAEInputError(
        f"no SAE {name!r}: not a directory ({path.resolve()}) and not in {ws.root / 'saes'} (saved SAEs: "
        f"{', '.join(saved) or 'none'}); train one with `workbench sae train`, or pass an SAE directory"
    )


# ---------------------------------------------------------------------------------------------------- checks
def hook_widths(model, hooks: list[str]) -> tuple[dict[str, int], str]:
    """Widths of ``hooks`` (exact names the model has, one [batch, pos, d] activation each, or a per-head
    [batch, pos, n_heads, d_head] one read as n_heads·d_head) from a 2-token forward,
    and ``ce_note``: "" when the model gives next-token logits [batch, pos, d_vocab], else why the CE metrics do
    not apply. Unknown hooks raise HookNameError naming the closest hooks."""
    for hook in hooks:
        matched = model.resolve(hook)
        if matched != [hook]:
            raise SAEInputError(
                f"hook {hook!r} names {len(matched)} hooks ({', '.join(matched[:4])}, …); an SAE "
                "reads one hook: give its exact name"
            )
    ids = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    with torch.no_grad(), model.capture(list(dict.fromkeys(hooks))) as cache:
        out = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    widths = {}
    for hook in hooks:
        shape = tuple(cache[hook].shape)
        if len(shape) == 4 and hook.endswith(PER_HEAD_HOOKS):
            widths[hook] = shape[2] * shape[3]  # heads flattened: n_heads·d_head (token_vectors)
            continue
        if len(shape) != 3:
            raise SAEInputError(
                f"{hook} of {model.cfg.name} has shape {list(shape)} per batch, not [batch, pos, d]; an SAE reads "
                "one vector per token: use a hook such as blocks.L.hook_resid_post, blocks.L.hook_mlp_out, "
                "blocks.L.mlp.hook_post or blocks.L.attn.hook_z (heads flattened)"
            )
        widths[hook] = shape[-1]
    logits = bool(model.cfg.causal) and out.ndim == 3 and out.shape[-1] == model.cfg.d_vocab
    note = (
        ""
        if logits
        else (
            f"CE metrics do not apply: {model.cfg.name} ({model.cfg.family}) is "
            + ("an encoder" if not model.cfg.causal else "a model without an LM head")
            + f" whose forward returns hidden states [batch, pos, {out.shape[-1]}], not next-token logits; the "
            "reconstruction metrics (L0, FVU, cosine, dead/dense fractions) are reported"
        )
    )
    return widths, note


def check_sae_fits(sae: SAE, model, widths: Mapping[str, int], sae_id: str) -> str:
    """Refuse an SAE whose hooks or widths are not the model's (an SAE trained on another model or hook); for one
    that fits but was trained on another model (identity) or checkpoint, the one-line note to show ("" when it
    is the model's own)."""
    trained_on = f" (trained on {sae.cfg.model!r})" if sae.cfg.model else ""
    for hook, width, what in ((sae.hook_in, sae.d_in, "d_in"), (sae.hook_out, sae.d_out, "d_out")):
        if widths[hook] != width:
            raise SAEInputError(
                f"SAE {sae_id!r}{trained_on} has {what}={width}, but {hook} of {model.cfg.name} has width "
                f"{widths[hook]}: it is an SAE for another model or hook; evaluate it on the model it was trained on"
            )
    note = provenance_note(sae.cfg.model, sae.cfg.checkpoint, model)
    return f"SAE {sae_id!r} was {note}" if note else ""


def _sae_hooks(sae: SAE, model, sae_id: str) -> list[str]:
    if not sae.hook_in:
        raise SAEInputError(
            f"SAE {sae_id!r} names no input hook (hook_in/hook_name is empty); it cannot be "
            "spliced into a model"
        )
    hooks = list(dict.fromkeys([sae.hook_in, sae.hook_out]))
    known = set(model.hook_names())
    missing = [h for h in hooks if h not in known]
    if missing:
        trained_on = f"; it was trained on {sae.cfg.model!r}" if sae.cfg.model else ""
        try:
            resolve_hook_names(missing[0], model.hook_names())
        except KeyError as err:
            raise SAEInputError(
                f"SAE {sae_id!r} reads {missing[0]!r}, which {model.cfg.name} lacks{trained_on}: {err}"
            ) from None
    return hooks


def _available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def check_memory(
    configs: Sequence[SAEConfig], device: torch.device | str, holders: str | None = None
) -> None:
    """Refuse SAEs whose weights, gradients and two Adam moments (4 float32 copies) exceed the device's free
    memory, before anything is allocated (``configs``: every SAE the device will hold, repeated per copy;
    ``holders``: the processes that share the device, for the message)."""
    device = torch.device(device)
    need = 0
    for cfg in configs:
        weights = cfg.d_in * cfg.d_sae + cfg.d_sae * cfg.d_out + cfg.d_sae + cfg.d_out
        need += 16 * (weights + (cfg.d_in * cfg.d_out if cfg.skip else 0))
    free = _available_bytes(device)
    if need > free:
        widest = max(configs, key=lambda c: c.d_sae)
        raise SAEInputError(
            f"d_sae={widest.d_sae} is too large to train: {holders or 'the SAE(s)'} need about {need / 2**30:.1f} "
            f"GiB (weights, gradients and Adam moments, float32) but {device} has {free / 2**30:.1f} GiB free; pick a "
            "smaller --d-sae" + (" or fewer processes" if holders else "")
        )


def _union_of_rank_stores(directories: Sequence[Path]):
    """The training stores of every rank read as one (``workbench.store.StoreUnion``): called once training is
    over, when every rank has finalised its capture, so the feature pages cover every rank's documents."""
    return StoreUnion([ActivationStore.open(directory) for directory in directories])


def _check_counts(steps: int, max_tokens: int | None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SAEInputError(f"steps={steps!r}: train at least one step (--steps 1 or more)")
    if max_tokens is not None and max_tokens < 1:
        raise SAEInputError(
            f"max_tokens={max_tokens!r}: the token budget must be at least 1 (--max-tokens), or "
            "None for all of the dataset"
        )


def _store_source(model, data: Dataset, hooks: list[str], widths: Mapping[str, int]):
    """``data.store`` when it holds every hook (checked to come from ``model``), else None (capture from its
    tokens)."""
    store = data.store
    if store is None or not set(hooks) <= set(store.hooks):
        return None
    manifest = store.manifest
    if manifest.get("model") != model.cfg.name or manifest.get("checkpoint") != model.cfg.checkpoint:
        raise AnalysisNotApplicable(
            f"activation store {store.path} was captured from {manifest.get('model')!r} at checkpoint "
            f"{manifest.get('checkpoint')}, not {model.cfg.name!r} at checkpoint {model.cfg.checkpoint}: SAEs "
            "trained on its rows would not fit this model; pass the model it was captured from, or text with --data"
        )
    for hook in hooks:
        shape = manifest.get("shapes", {}).get(hook)
        stored = math.prod(shape) if shape else None  # a per-head row [n_heads, d_head] is read flat
        if stored != widths[hook]:
            raise AnalysisNotApplicable(
                f"activation store {store.path} holds {hook} of width {stored}, but {model.cfg.name} has width "
                f"{widths[hook]}; recapture it with `workbench capture`"
            )
    if manifest.get("extra", {}).get("capture", {}).get("positions") not in (None, "None"):
        raise AnalysisNotApplicable(
            f"activation store {store.path} holds only some positions of each sequence, so the held-out rows "
            "cannot be run through the model for evaluation; capture every token, or pass the text with --data"
        )
    return store


# ---------------------------------------------------------------------------------------------------- data
def packed_token_tensor(
    model,
    data: Dataset,
    *,
    max_tokens: int | None,
    context_length: int,
    batch_size: int,
    seed: int | None = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset's token rows through its one iterator (documents packed into full rows for text):
    (ids [n, pos], attention_mask [n, pos]), checked against the model's vocabulary."""
    ids, mask = data.token_tensor(
        model.tokenizer,
        context_length=context_length,
        batch_size=batch_size,
        packing=data.modality == "text",
        shuffle_seed=seed,
        max_tokens=max_tokens,
        progress=progress,
    )
    data.check_vocabulary(ids[mask.bool()], model)
    return ids, mask


def _split(n_rows: int, data: Dataset, context_length: int) -> int:
    if n_rows < 2:
        raise DatasetError(
            f"dataset {data.name!r} gave {n_rows} token row of at most {context_length} tokens, and a quarter of "
            "the rows is held out for evaluation: give more text, a larger --max-tokens or a smaller "
            "--context-length"
        )
    return max(1, min(n_rows - 1, round(n_rows * (1 - EVAL_FRACTION))))


def _rows_stream(
    store, hooks: list[str], batch_size: int, below_sequence: int | None, shards: list[int] | None = None
) -> Iterator[dict]:
    """Endless shuffled batches {hook: [batch_size, d]} of the store's rows (only sequences < below_sequence; only
    the given shards, for a rank of a distributed run)."""
    epoch = 0
    pending: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    filled = 0
    while True:
        for batch in store.iter_batches(hooks, batch_size, shuffle=True, seed=epoch, shards=shards):
            keep = slice(None) if below_sequence is None else batch["location"][:, 0] < below_sequence
            for hook in hooks:
                pending[hook].append(batch[hook][keep])
            filled += len(pending[hooks[0]][-1])
            while filled >= batch_size:
                joined = {h: torch.cat(v) for h, v in pending.items()}
                yield {h: v[:batch_size] for h, v in joined.items()}
                pending = {h: [v[batch_size:]] for h, v in joined.items()}
                filled -= batch_size
        epoch += 1


def capture_training_rows(
    model,
    data: Dataset,
    hooks: list[str],
    settings: SAETrainSettings,
    workspace: Any,
    *,
    rank: int,
    world: int,
    dataset: str,
    progress: bool,
    suffix: str = "",
) -> tuple[torch.Tensor, torch.Tensor, int, ActivationStore, list[Path]]:
    """``data``'s packed token rows under ``settings``' budget, and this rank's document range of the training rows
    (all but the last quarter) captured at ``hooks`` into the workspace store ``sae-<model>[@step]-<data><suffix>``
    (``-rank<r>-of-<world>`` per rank) → (ids [n, pos], attention mask [n, pos], split: the first held-out row,
    this rank's store, every rank's store folder). Nothing is written when the rows are too few."""
    ids, mask = packed_token_tensor(
        model,
        data,
        max_tokens=settings.max_tokens,
        context_length=settings.context_length,
        batch_size=settings.batch_size,
        seed=settings.seed,
        progress=progress,
    )
    split = _split(len(ids), data, settings.context_length)
    if split < world:
        raise DatasetError(
            f"dataset {data.name!r} gave {split} training rows for {world} ranks: give more text "
            "or run fewer processes"
        )
    ws = Workspace(workspace).ensure()
    mine = document_range(split, rank, world)  # disjoint document ranges per rank
    rows = [r[m.bool()].tolist() for r, m in zip(ids[mine], mask[mine], strict=True)]
    step = "" if model.cfg.checkpoint is None else f"@{model.cfg.checkpoint}"
    name = f"sae-{short_name(model.cfg.name)}{step}-{short_name(data.name)}{suffix}"
    store_dirs = [
        ws.store_dir(safe_name(f"{name}-rank{r}-of-{world}" if world > 1 else name)) for r in range(world)
    ]
    store = capture_to_store(
        model,
        rows,
        hooks,
        store_dirs[rank],
        batch_size=settings.batch_size,
        context_length=settings.context_length,
        dataset=dataset,
        checkpoint=model.cfg.checkpoint,
        overwrite=True,
        progress=progress,
    )
    return ids, mask, split, store, store_dirs


def train_config(
    settings: SAETrainSettings, batch: int, world: int, progress: bool, options: Mapping[str, Any] | None
) -> TrainConfig:
    """The ``TrainConfig`` of ``settings`` for ``batch`` rows per rank and step over ``world`` ranks (warm-up of up
    to 20 steps, a latent dead after 10 steps' tokens without firing); ``options``: further TrainConfig fields."""
    return TrainConfig(
        steps=settings.steps,
        lr=settings.lr,
        warmup_steps=min(20, settings.steps),
        progress=progress,
        dead_after_tokens=10 * batch * world,
        **(options or {}),
    )


# ---------------------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class SAETrainSettings:
    """How SAEs, transcoders and CLTs are trained: shared by :func:`run`, ``clt_analysis.run_clt`` and ``workbench
    sae train`` (its options).

    max_tokens: token budget read from the data (None: all of it; a store's rows are all used);
    context_length, batch_size: tokens per row and rows per forward pass of the capture;
    steps, train_batch_size, lr: optimisation (activation rows per step, over all processes);
    seed: the initialisation and the order of the documents (same seed, same files)."""

    max_tokens: int | None = 100_000
    context_length: int = 128
    batch_size: int = 16
    steps: int = 300
    train_batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0


def run(
    model,
    data: Dataset,
    specs: Mapping[str, Mapping[str, Any]],
    settings: SAETrainSettings | None = None,
    *,
    workspace: Any,
    pages: bool = True,
    progress: bool = True,
    distributed: Distributed | None = None,
    train_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, pd.DataFrame]:
    """Train every SAE / transcoder of ``specs`` on ``model``'s activations over ``data`` → {table: DataFrame}.

    Args:
        model: a HookedModel (any model reference through ``resolve_model``).
        data: a Dataset of text or token ids, or an activation store holding the hooks (trained from directly).
        specs: {sae_id: SAEConfig kwargs}: architecture, d_sae, hook_in, optional hook_out / k / skip / ...
        settings: :class:`SAETrainSettings`; ``overrides`` replace its fields by keyword (``max_tokens=``,
            ``context_length=``, ``batch_size=``, ``steps=``, ``train_batch_size=``, ``lr=``, ``seed=``).
        workspace: where the SAEs (``saes/<id>/``) and the training store (``stores/sae-…``) are written.
        pages: also the feature pages of each SAE (not of transcoders).
        train_options: further ``TrainConfig`` fields (e.g. ``outlier_norm=10`` to mask attention-sink tokens).
        distributed: this rank of a torchrun job (``circuits.sae.distributed.init_distributed``): every rank captures
            its own document range of the training rows into its own store (or reads its own shards of a store
            given as data) and trains (data-parallel: the SAEs on the global batch of ``train_batch_size`` rows;
            hook-sharded: the SAEs it owns); rank 0 saves and evaluates (hook-sharded: each owner its own), and
            every rank returns the same frames. With every rank on one machine the feature pages read every rank's
            store (a ``StoreUnion``); across machines, the writing rank's own.
    Returns ``{"sae_evals": one row per SAE on the held-out quarter of the rows, "sae_features": one row per latent
    of each SAE (absent when only transcoders were trained)}``.
    """
    chosen = settings_with(settings, SAETrainSettings, overrides)
    batch_size, steps, train_batch_size, seed = (
        chosen.batch_size,
        chosen.steps,
        chosen.train_batch_size,
        chosen.seed,
    )
    ANALYSIS.check(model, data)
    _check_counts(steps, chosen.max_tokens)
    if not specs:
        raise SAEInputError("no SAE to train: pass {sae_id: {architecture, d_sae, hook_in, ...}}")
    for sae_id in specs:
        check_sae_name(sae_id)
        check_sae_owner(Workspace(workspace), sae_id, model.cfg.name)
    hooks = list(
        dict.fromkeys(
            h for spec in specs.values() for h in (spec["hook_in"], spec.get("hook_out") or spec["hook_in"])
        )
    )
    widths, ce_note = hook_widths(model, hooks)
    dataset = data.name
    store = _store_source(model, data, hooks, widths)
    if store is not None:
        dataset = store.manifest.get("dataset") or data.name
    configs = {
        sae_id: SAEConfig(
            **{
                **spec,
                "d_in": widths[spec["hook_in"]],
                "d_out": widths[spec.get("hook_out") or spec["hook_in"]],
                "model": model.cfg.name,
                "checkpoint": model.cfg.checkpoint,
                "dataset": dataset,
            }
        )
        for sae_id, spec in specs.items()
    }
    rank, world = (distributed.rank, distributed.world_size) if distributed is not None else (0, 1)
    sharded = distributed is not None and distributed.mode == "hooks"
    mine = owned_names(list(configs), rank, world) if sharded else list(configs)
    held, holders = mine, None  # a GPU holds its rank's SAEs; a CPU's memory every local rank's
    if distributed is not None and model.device.type == "cpu":
        local = local_ranks(distributed)
        held = [n for r in local for n in (owned_names(list(configs), r, world) if sharded else configs)]
        holders = f"the SAEs of the {len(local)} processes on this machine"
    check_memory([configs[n] for n in held], model.device, holders)
    saes = {}
    for sae_id, cfg in ((n, configs[n]) for n in mine):
        try:
            saes[sae_id] = seeded_sae(cfg, seed).to(model.device)
        except RuntimeError as err:  # the allocator refused despite the estimate
            raise SAEInputError(
                f"could not allocate SAE {sae_id!r} (d_sae={cfg.d_sae}): {str(err).splitlines()[0]}; "
                "pick a smaller --d-sae"
            ) from None
    ws = Workspace(workspace).ensure()  # nothing is written before this point
    page_dirs: list[Path] = []  # the stores the feature pages read (none: the training store)
    if store is not None:
        if data.token_ids is None:
            raise SAEInputError(
                f"activation store {store.path} records no token ids, so the held-out rows cannot "
                "be spliced back into the model; recapture it with `workbench capture`"
            )
        ids = data.token_ids
        mask = data.token_mask if data.token_mask is not None else torch.ones_like(ids)
        split = _split(len(ids), data, ids.shape[1])
        sequences = store.locations()[:, 0].unique(sorted=True)
        below = int(sequences[split]) if split < len(sequences) else None
        train_rows = int((store.locations()[:, 0] < below).sum()) if below is not None else store.n_rows
        shards, row_range = store_shards(len(store.manifest["shards"]), store.n_rows, rank, world)
        if row_range is not None:
            raise SAEInputError(
                f"activation store {store.path} has {len(store.manifest['shards'])} shard(s) for {world} ranks, "
                "and each rank reads whole shards: recapture it with more shards (smaller --shard-rows) or run "
                "fewer processes"
            )
    else:
        ids, mask, split, store, store_dirs = capture_training_rows(
            model, data, hooks, chosen, workspace, rank=rank, world=world, dataset=dataset, progress=progress
        )
        below, train_rows, shards = None, store.n_rows, None
        if distributed is not None and len(local_ranks(distributed)) == world:
            page_dirs = store_dirs  # every rank's store is on this machine: the pages read them all
    batch = max(1, min(train_batch_size, train_rows * world) // world)  # rows per rank and step
    cfg = train_config(chosen, batch, world, progress, train_options)
    trained = train_saes(
        saes, _rows_stream(store, hooks, batch, below, shards), cfg, distributed=distributed
    ).saes
    evals, features = [], []
    writes_pages = pages and (distributed is None or sharded or distributed.is_main)
    page_store = _union_of_rank_stores(page_dirs) if page_dirs and writes_pages else store
    for sae_id, sae in trained.items():
        if distributed is not None and not sharded and not distributed.is_main:
            break  # data-parallel ranks hold the same SAEs: rank 0 saves and evaluates them
        sae.eval()
        sae.save(sae_dir(ws, sae_id))
        frame = evaluate_sae(
            model,
            sae,
            ids[split:],
            sae_id,
            batch_size=batch_size,
            dataset=dataset,
            progress=progress,
            attention_mask=mask[split:],
            ce_note=ce_note,
        )
        evals.append(frame.assign(n_train_rows=train_rows, train_steps=steps))
        if pages and not sae.cfg.is_transcoder:
            features.append(feature_pages(sae, page_store, sae_id, model=model, progress=progress))
    if distributed is not None:  # every rank gets every rank's rows
        gathered = distributed.all_gather_object((evals, features))
        evals = [frame for part, _ in gathered for frame in part]
        features = [frame for _, part in gathered for frame in part]
    frames = {"sae_evals": pd.concat(evals, ignore_index=True)}
    if features:
        frames["sae_features"] = pd.concat(features, ignore_index=True)
    return frames


def evaluate(
    model,
    data: Dataset,
    sae: SAE,
    *,
    sae_id: str,
    max_tokens: int | None = 20_000,
    context_length: int = 128,
    batch_size: int = 16,
    seed: int | None = 0,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """A saved SAE spliced into ``model`` over a token budget of ``data`` → {"sae_evals": one row}; an SAE whose
    hooks or widths are not the model's is refused before any data is read."""
    ANALYSIS.check(model, data)
    _check_counts(1, max_tokens)
    hooks = _sae_hooks(sae, model, sae_id)
    widths, ce_note = hook_widths(model, hooks)
    check_sae_fits(sae, model, widths, sae_id)
    ids, mask = packed_token_tensor(
        model,
        data,
        max_tokens=max_tokens,
        context_length=context_length,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    sae = sae.to(model.device).eval()
    frame = evaluate_sae(
        model,
        sae,
        ids,
        sae_id,
        batch_size=batch_size,
        dataset=data.name,
        progress=progress,
        attention_mask=mask,
        ce_note=ce_note,
    )
    return {"sae_evals": frame}


def feature_pages_on_data(
    model,
    data,
    sae: SAE,
    sae_id: str,
    *,
    workspace,
    max_tokens: int | None = 20_000,
    context_length: int = 128,
    batch_size: int = 16,
    seed: int | None = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Feature pages of a saved (or imported) SAE on ``model`` over a token budget of ``data``: the rows are captured
    at ``sae.hook_in`` into ``workspace/stores/pages-<sae_id>-<dataset>`` and read by
    :func:`~workbench.circuits.sae.features.feature_pages`; an SAE whose hook or width is not the model's is refused
    before any data is read."""
    ANALYSIS.check(model, data)
    hooks = _sae_hooks(sae, model, sae_id)
    widths, _ = hook_widths(model, hooks)
    check_sae_fits(sae, model, widths, sae_id)
    ids, mask = packed_token_tensor(
        model,
        data,
        max_tokens=max_tokens,
        context_length=context_length,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
    ws = Workspace(workspace).ensure()
    store = capture_to_store(
        model,
        rows,
        [sae.hook_in],
        ws.store_dir(safe_name(f"pages-{sae_id}-{short_name(data.name)}")),
        batch_size=batch_size,
        context_length=context_length,
        dataset=data.name,
        checkpoint=model.cfg.checkpoint,
        overwrite=True,
        progress=progress,
    )
    sae = sae.to(model.device).eval()
    return feature_pages(sae, store, sae_id, model=model, progress=progress).assign(dataset=data.name)
