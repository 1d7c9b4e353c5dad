"""Train SAEs / transcoders from an iterator of activation batches (one model forward can feed several SAEs).

A cross-layer transcoder (``circuits.sae.clt``) trains here too: its batches are layer-major (x, y [n_layers,
rows, d_model], stacked from each layer's hooks of a dict batch), its normalisation scales are per layer, its loss
sums every layer's squared error, and its history holds L0 and FVU per layer (``l0.<layer>``, ``fvu.<layer>``).

Training draws no random numbers: the same SAEs (``seeded_sae``) on the same stream give identical bytes. A
checkpoint is one file, ``trainer_state.pt`` in ``TrainConfig.checkpoint_dir`` (weights, optimizer, scheduler,
dead-latent counters, scales, history of one step), replaced atomically, so a kill -9 at any moment resumes from
a consistent step and ends in the same SAEs as an uninterrupted run. Fault-injection points
(``workbench.faults``): ``sae.checkpoint_written`` (temporary file complete, not renamed) and
``sae.checkpoint_saved``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeAlias, TypeVar

import torch
from tqdm.auto import tqdm

from workbench.circuits.sae.base import SAE, SAEConfig, SAEInputError, create_sae, token_vectors
from workbench.circuits.sae.clt import CLTConfig, CrossLayerTranscoder, create_clt
from workbench.circuits.sae.distributed import (
    Distributed,
    agreed_resume_path,
    prune_rank_states,
    rank_state_name,
    route_batches,
)
from workbench.circuits.sae.flat_parameters import FlatParameters, flat_parameters
from workbench.circuits.sae.jumprelu import JumpReLUSAE
from workbench.circuits.sae.matryoshka import MatryoshkaBatchTopKSAE
from workbench.circuits.sae.topk import TopKSAE
from workbench.faults import crash_point
from workbench.fileio import atomic_path
from workbench.schedules import lr_factor
from workbench.workspace import safe_name

Trainable: TypeAlias = SAE | CrossLayerTranscoder
TrainableT = TypeVar("TrainableT", bound=Trainable)
TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_VERSION = 3  # 1 (unversioned): weights in separate files; 2: per-parameter optimizer state


@dataclass
class TrainConfig:
    """Optimisation settings; `steps` batches are consumed, LR warms up then decays linearly over the last part."""

    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    dead_after_tokens: int = 20_000
    normalize_activations: bool = True
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0
    progress: bool = True
    data_init: bool = True  # SAE.initialize_from_batch on the first batch (b_dec = mean, encoder scale)
    # Outlier-token masking (attention sinks / massive activations): rows whose input norm exceeds outlier_norm ×
    # the median row norm of the first (global) batch are left out of training ("exclude") or scaled down to that
    # norm ("cap"); None trains on every row. The masked fraction is logged as "masked".
    # outlier_metric "max": the row's largest |entry| instead of its norm (post-LayerNorm models such as BERT /
    # MiniLM keep every token's norm alike, and their sink token stands out in one dimension).
    outlier_norm: float | None = None
    outlier_action: str = "exclude"
    outlier_metric: str = "norm"


@dataclass
class TrainResult(Generic[TrainableT]):
    """Trained SAEs / CLTs (norm scaling already folded in) and per-step metrics per SAE."""

    saes: dict[str, TrainableT]
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def seeded_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """``create_sae(cfg)`` with its random initialisation drawn from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_sae(cfg)


def seeded_clt(cfg: CLTConfig, seed: int = 0) -> CrossLayerTranscoder:
    """``create_clt(cfg)`` with its random initialisation drawn from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_clt(cfg)


def _check_config(cfg: TrainConfig) -> None:
    if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(
            f"TrainConfig.steps must be a whole number of at least 1, got {cfg.steps!r}; pass steps=N"
        )
    if (
        cfg.outlier_action not in ("exclude", "cap")
        or cfg.outlier_metric not in ("norm", "max")
        or (cfg.outlier_norm is not None and cfg.outlier_norm <= 1)
    ):
        raise ValueError(
            f"outlier_norm={cfg.outlier_norm!r}, outlier_action={cfg.outlier_action!r}, outlier_metric="
            f"{cfg.outlier_metric!r}: pass a factor above 1 (e.g. 10: rows over 10× the median norm), 'exclude' or "
            "'cap', and 'norm' or 'max', or outlier_norm=None for no masking"
        )
    if cfg.checkpoint_every < 0 or (cfg.checkpoint_every and cfg.checkpoint_dir is None):
        raise ValueError(
            f"checkpoint_every={cfg.checkpoint_every} needs checkpoint_every >= 0 and a checkpoint_dir; set both "
            "(or checkpoint_every=0 for no checkpoints)"
        )


def check_sae_name(name: str) -> str:
    """An SAE name becomes a file name in checkpoint directories (see ``workbench.workspace.safe_name``)."""
    return safe_name(name, "for an SAE: it cannot name a checkpoint file (e.g. 'pythia.L3-resid-topk')")


def _can_fuse(params: list[torch.Tensor]) -> bool:
    """Fused Adam (one kernel per step, ~3× faster on CPU) when every parameter is a float on cpu/cuda."""
    devices = {p.device.type for p in params}
    return (
        bool(params)
        and len(devices) == 1
        and devices <= {"cpu", "cuda"}
        and all(p.is_floating_point() for p in params)
    )


def _as_pair(batch, sae: SAE, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [rows, d_in], y [rows, d_out]) on the SAE's device and dtype; y is x for an SAE."""
    if isinstance(batch, Mapping):
        missing = [hook for hook in dict.fromkeys((sae.hook_in, sae.hook_out)) if hook not in batch]
        if missing:
            raise SAEInputError(
                f"training batch for {name} has no activations for hook(s) {missing} (it holds "
                f"{sorted(k for k in batch if k != 'token_ids')}): capture/read those hooks, or set the SAE's "
                "hook_in/hook_out to hooks the batches carry"
            )
        x, y = batch[sae.hook_in], batch[sae.hook_out]
    elif isinstance(batch, (tuple, list)):
        x, y = batch
    else:
        x = y = batch
    same = y is x
    x = token_vectors(x, sae.d_in)
    x = x.reshape(-1, x.shape[-1]).to(device=sae.device, dtype=sae.W_enc.dtype)
    sae.check_input(x, f"training batch for {name}")
    if same:
        return x, x
    y = token_vectors(y, sae.d_out)
    y = y.reshape(-1, y.shape[-1]).to(device=sae.device, dtype=sae.W_enc.dtype)
    if y.shape[-1] != sae.d_out or not bool(torch.isfinite(y.sum())):
        bad = (~torch.isfinite(y).all(1)).nonzero()
        if y.shape[-1] != sae.d_out or len(bad):
            raise SAEInputError(
                f"target for hook {sae.hook_out!r} has width {y.shape[-1]} (d_out={sae.d_out})"
                + (f" and NaN/inf in row {int(bad[0])}" if len(bad) else "")
                + ": pass finite targets of width d_out"
            )
    return x, y


def _clt_pair(batch, clt: CrossLayerTranscoder, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y [n_layers, rows, d_model]) on the CLT's device and dtype from a dict batch {hook: [rows, d_model]}
    holding every layer's input and output hook, or an (x, y) pair already layer-major."""
    if isinstance(batch, Mapping):
        ins, outs = clt.hook_names
        missing = [hook for hook in dict.fromkeys(ins + outs) if hook not in batch]
        if missing:
            raise SAEInputError(
                f"training batch for {name} has no activations for hook(s) {missing[:4]} (it holds "
                f"{sorted(k for k in batch if k != 'token_ids')[:8]}): capture every layer's {clt.hook_in!r} and "
                f"{clt.hook_out!r}"
            )
        x = torch.stack([batch[h].reshape(-1, batch[h].shape[-1]) for h in ins])
        y = torch.stack([batch[h].reshape(-1, batch[h].shape[-1]) for h in outs])
    elif isinstance(batch, (tuple, list)):
        x, y = batch
    else:
        raise SAEInputError(
            f"training batch for {name}: a CLT trains on {{hook: tensor}} dicts or (x, y) pairs "
            f"[n_layers, rows, d_model], not {type(batch).__name__}"
        )
    x = x.to(device=clt.device, dtype=clt.W_enc.dtype)
    y = y.to(device=clt.device, dtype=clt.W_enc.dtype)
    clt.check_input(x, f"training batch for {name}")
    clt.check_input(y, f"target of the training batch for {name}")
    return x, y


def _layer_scales(t: torch.Tensor) -> tuple[float, ...]:
    """Per layer of t [n_layers, rows, d]: the factor making its mean squared norm d."""
    means = t.norm(dim=-1).mean(1).clamp_min(1e-8)
    return tuple(math.sqrt(t.shape[-1]) / m for m in means.tolist())


def _times(t: torch.Tensor, scale: float | Sequence[float]) -> torch.Tensor:
    """t scaled by a float, or t [n_layers, rows, d] scaled per layer."""
    if isinstance(scale, (int, float)):
        return t * scale if scale != 1.0 else t
    return t * torch.tensor(list(scale), dtype=t.dtype, device=t.device)[:, None, None]


def _gather_rows(distributed: Distributed, t: torch.Tensor, layer_major: bool) -> torch.Tensor:
    """Every rank's rows of t ([rows, d], or [n_layers, rows, d] layer-major) in rank order."""
    if not layer_major:
        return distributed.all_gather_rows(t)
    return distributed.all_gather_rows(t.transpose(0, 1).contiguous()).transpose(0, 1)


def _latent_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents f [batch, d_sae] (dense, or sparse COO as TopK training returns) -> (fired [d_sae] bool, mean L0)."""
    if f.is_sparse:
        active = f._values() > 0
        fired = torch.zeros(f.shape[1], dtype=torch.bool, device=f.device)
        fired[f._indices()[1][active]] = True
        return fired, active.sum() / f.shape[0]
    active = f > 0
    return active.any(0), active.sum(-1).float().mean()


def _flush(pending: dict[str, list], history: dict[str, list[dict[str, float]]]) -> None:
    """Move the per-step metric tensors in ``pending`` into ``history`` as floats (one device sync); a non-finite
    loss raises ValueError naming the SAE and the step, before anything is checkpointed or returned."""
    for name, rows in pending.items():
        if rows:
            values = torch.stack([torch.stack(list(m.values())).float() for _, m in rows]).tolist()
            keys = list(rows[0][1])
            for (step, _), row in zip(rows, values, strict=True):
                if not math.isfinite(row[keys.index("loss")]):
                    raise ValueError(
                        f"SAE {name}: the training loss became {row[keys.index('loss')]} at step {step} (batch "
                        f"{step} of the stream); check that batch's activations (scale, NaN/inf) or lower lr"
                    )
            history[name].extend(
                {"step": step} | dict(zip(keys, v, strict=True))
                for (step, _), v in zip(rows, values, strict=True)
            )
            rows.clear()


def _scale(t: torch.Tensor) -> float:
    """Factor making the mean squared norm equal d (Anthropic-style expected norm sqrt(d))."""
    return float(math.sqrt(t.shape[-1]) / t.norm(dim=-1).mean().clamp_min(1e-8))


def train_saes(
    saes: Mapping[str, TrainableT],
    batches: Iterable,
    cfg: TrainConfig | None = None,
    distributed: Distributed | None = None,
) -> TrainResult[TrainableT]:
    """Train every SAE (or CLT) in `saes` on the same stream.

    Each batch is a dict {hook: [batch, d]} (each SAE reads its hook_in / hook_out; a CLT every layer's), or, for
    one SAE, a tensor [batch, d_in] or an (x [batch, d_in], y [batch, d_out]) pair (a CLT: x, y [n_layers, batch,
    d_model]). Refused with ValueError: steps < 1,
    a stream without batches, a batch with NaN/inf (named by its step), a loss that turns non-finite.

    ``distributed`` (``workbench.circuits.sae.distributed``): in mode "data" every rank passes the same SAEs and
    its own batches, and the ranks train identical SAEs on the global batch; in mode "hooks" every rank passes the
    SAEs it owns (``owned_names``) and its own dict batches, and each SAE trains on the global batch of its hooks.
    """
    cfg = cfg or TrainConfig()
    _check_config(cfg)
    saes = dict(saes)
    for name in saes:
        check_sae_name(name)
    flat = flat_parameters(saes.values())  # one buffer (and one gradient buffer) per device and dtype
    try:
        history = _train(dict(saes), batches, cfg, distributed, flat)
    finally:
        flat.restore()
        for sae in saes.values():
            if isinstance(sae, TopKSAE):
                sae.batch_gather = sae.pre_buffer = None  # training-time state, also after an error
                if isinstance(sae, MatryoshkaBatchTopKSAE):
                    sae.partials = None  # the last step's inner reconstructions (and their autograd graph)
            elif isinstance(sae, JumpReLUSAE):
                sae.pre_buffer = None
            elif isinstance(sae, CrossLayerTranscoder):
                sae.batch_gather = None
    return TrainResult(saes, history)


def _latent_shape(sae: Trainable) -> tuple[int, ...]:
    return (sae.n_layers, sae.d_transcoder) if isinstance(sae, CrossLayerTranscoder) else (sae.d_sae,)


def _train(
    saes: dict[str, Trainable],
    batches: Iterable,
    cfg: TrainConfig,
    distributed: Distributed | None,
    flat: FlatParameters,
) -> dict[str, list[dict[str, float]]]:
    """The body of :func:`train_saes`, with the SAEs' parameters in ``flat``'s buffers."""
    data_parallel = distributed is not None and distributed.mode == "data"
    sharded = distributed is not None and distributed.mode == "hooks"
    world = distributed.world_size if data_parallel and distributed is not None else 1
    params = flat.buffers
    optimizer = torch.optim.Adam(
        params or [torch.zeros(1, requires_grad=True)], lr=cfg.lr, betas=(0.9, 0.999), fused=_can_fuse(params)
    )
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction)) if cfg.decay_fraction > 0 else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps=cfg.steps, warmup=cfg.warmup_steps, decay_start=decay_start)
    )
    tokens_since_fired = {
        n: torch.zeros(_latent_shape(s), dtype=torch.long, device=s.device) for n, s in saes.items()
    }
    scales: dict[str, tuple] = {}  # per SAE (scale in, scale out): floats, or per-layer tuples for a CLT
    history: dict[str, list[dict[str, float]]] = {n: [] for n in saes}
    pending: dict[str, list] = {n: [] for n in saes}  # metrics still as tensors: one device sync per flush
    start = 0
    writes = distributed is None or sharded or distributed.is_main  # data-parallel: rank 0 writes for all
    state_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    resume_from: Path | None = None
    if state_dir is not None:
        for leftover in state_dir.glob(f".{TRAINER_STATE.split('.')[0]}*.tmp") if writes else ():
            leftover.unlink(missing_ok=True)  # a kill before the rename
        if sharded and distributed is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            resume_from = agreed_resume_path(state_dir, TRAINER_STATE, distributed)
        elif (state_dir / TRAINER_STATE).exists():
            resume_from = state_dir / TRAINER_STATE
        if resume_from is not None:
            start = _resume(resume_from, saes, optimizer, scheduler, tokens_since_fired, scales, history)
    iterator: Iterator = iter(batches)
    for skipped in range(start):
        if next(iterator, None) is None:
            raise ValueError(
                f"the batch stream ended after {skipped} batches, but the checkpoint in {cfg.checkpoint_dir} is "
                f"at step {start}: resume with the same stream from its beginning"
            )
    if sharded and distributed is not None:
        needs = distributed.all_gather_object(
            sorted({h for s in saes.values() for h in (s.hook_in, s.hook_out)})
        )
        iterator = route_batches(iterator, dict(enumerate(needs)), distributed)
    elif data_parallel and distributed is not None:
        iterator = _agreed_stream(iterator, distributed)
    for sae in saes.values():
        if isinstance(sae, (TopKSAE, CrossLayerTranscoder)):
            sae.batch_gather = (
                distributed.all_gather_rows if data_parallel and distributed is not None else None
            )
        if isinstance(sae, TopKSAE):
            sae.pre_buffer = torch.empty(0, device=sae.device)  # grown by the first batch, reused after
    bar = tqdm(range(start, cfg.steps), disable=not cfg.progress, desc="train SAE")
    for step in bar:
        batch = next(iterator, None)
        if batch is None:
            if step == 0:
                raise ValueError(
                    "the batch stream yielded no batches: pass an iterable of activation batches (tensors "
                    "[batch, d_in], (x, y) pairs or {hook: tensor} dicts), e.g. store.iter_batches(hook, 256)"
                )
            break
        total: torch.Tensor | float = 0.0
        step_stats: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor], int]] = {}
        for name, sae in saes.items():
            where = f"{name} at step {step} (batch {step} of the stream)"
            clt = isinstance(sae, CrossLayerTranscoder)
            x, y = (
                _clt_pair(batch, sae, where)
                if isinstance(sae, CrossLayerTranscoder)
                else _as_pair(batch, sae, where)
            )
            first = name not in scales
            if first:  # data-parallel: the scale and initialisation come from the first global batch
                gx = _gather_rows(distributed, x, clt) if data_parallel and distributed is not None else x
                gy = (
                    gx
                    if y is x
                    else (_gather_rows(distributed, y, clt) if data_parallel and distributed else y)
                )
                if clt:
                    unit = (1.0,) * x.shape[0]
                    scales[name] = (
                        (_layer_scales(gx), _layer_scales(gy)) if cfg.normalize_activations else (unit, unit)
                    )
                else:
                    scales[name] = (_scale(gx), _scale(gy)) if cfg.normalize_activations else (1.0, 1.0)
            s_in, s_out = scales[name]
            same = y is x
            x = _times(x, s_in)
            y = x if same else _times(y, s_out)
            if first:
                gx, gy = _times(gx, s_in), (_times(gx, s_in) if gy is gx else _times(gy, s_out))
            if cfg.outlier_norm is not None:
                limit_key = f"{name}/outlier_limit"  # in the scales: a resumed run masks the same rows
                if first:
                    sizes = row_size(gx, cfg.outlier_metric)
                    scales[limit_key] = (
                        tuple((cfg.outlier_norm * sizes.median(1).values).tolist())
                        if clt
                        else cfg.outlier_norm * float(sizes.median()),
                        0.0,
                    )
                    gx, gy, _ = _mask_outliers(
                        gx, gy, scales[limit_key][0], cfg.outlier_action, cfg.outlier_metric
                    )
                x, y, masked = _mask_outliers(
                    x, y, scales[limit_key][0], cfg.outlier_action, cfg.outlier_metric
                )
            if first and cfg.data_init:
                sae.initialize_from_batch(gx, gy)
            dead = tokens_since_fired[name] > cfg.dead_after_tokens
            f, prediction, pre, extra = sae.training_forward(x, dead)
            residual = y - prediction
            mse = residual.pow(2).sum(-1).sum(0).mean() if clt else residual.pow(2).sum(-1).mean()
            losses = {"mse": mse} | sae.sparsity_loss(f, pre) | sae.auxiliary_losses(x, y, f, pre) | extra
            if isinstance(sae, TopKSAE) or (clt and sae.cfg.activation in ("topk", "batchtopk")):
                losses["aux_k"] = sae.aux_loss(x, pre.detach(), residual.detach(), dead)
            loss = sum(losses.values())
            rows = x.shape[1] if clt else x.shape[0]
            if (
                cfg.outlier_norm is not None and data_parallel and distributed is not None
            ):  # ranks kept unequal rows
                loss = loss * (rows * world / max(distributed.all_reduce_sum_int(rows), 1))
            total = total + loss
            with torch.no_grad():
                if isinstance(sae, CrossLayerTranscoder):
                    fired, metrics = _clt_metrics(sae, f, y, residual)
                    metrics = {"loss": loss.detach()} | metrics | {"dead": dead.float().mean()}
                else:
                    fired, l0 = _latent_stats(f)
                    variance = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
                    metrics = {
                        "loss": loss.detach(),
                        "fvu": mse.detach() * x.shape[0] / variance,
                        "l0": l0,
                        "dead": dead.float().mean(),
                    }
                if cfg.outlier_norm is not None:
                    metrics["masked"] = masked
            step_stats[name] = (fired, metrics, rows)
        optimizer.zero_grad(set_to_none=False)  # gradient buffers persist: no fresh d_sae × d pages per step
        if isinstance(total, torch.Tensor) and params:
            total.backward()
        if data_parallel and distributed is not None:
            _all_reduce_step(params, step_stats, distributed)
        for name, (fired, metrics, rows) in step_stats.items():
            with torch.no_grad():
                tokens_since_fired[name] += rows * world
                tokens_since_fired[name].masked_fill_(fired, 0)
            pending[name].append((step, metrics))
        if cfg.progress and saes and (step % 10 == 0 or step == cfg.steps - 1):
            _flush(pending, history)
            first_name, first_sae = next(iter(saes.items()))
            last = history[first_name][-1]
            postfix = {"loss": f"{last['loss']:.3g}", "l0": f"{last['l0']:.1f}", "fvu": f"{last['fvu']:.3f}"}
            if isinstance(first_sae, CrossLayerTranscoder):  # per layer: "FVU/L0" of every layer
                postfix["layers"] = " ".join(
                    f"{last[f'fvu.{layer}']:.2f}/{last[f'l0.{layer}']:.0f}" for layer in first_sae.layers
                )
            bar.set_postfix(postfix)
        optimizer.step()
        scheduler.step()
        for sae in saes.values():
            sae.normalize_decoder()
            if hasattr(sae, "clamp_threshold"):
                sae.clamp_threshold()
        if state_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _flush(pending, history)
            if sharded and distributed is not None:
                name = rank_state_name(TRAINER_STATE, distributed.rank, distributed.world_size, step + 1)
                _checkpoint(
                    state_dir / name,
                    step + 1,
                    saes,
                    optimizer,
                    scheduler,
                    tokens_since_fired,
                    scales,
                    history,
                )
                prune_rank_states(state_dir, TRAINER_STATE, distributed, step + 1)
            elif writes:
                _checkpoint(
                    state_dir / TRAINER_STATE,
                    step + 1,
                    saes,
                    optimizer,
                    scheduler,
                    tokens_since_fired,
                    scales,
                    history,
                )
    _flush(pending, history)
    for name, sae in saes.items():
        if isinstance(sae, CrossLayerTranscoder):
            unit = (1.0,) * sae.n_layers
            sae.fold_scaling(*scales.get(name, (unit, unit))[:2])
        else:
            sae.fold_scaling(*scales.get(name, (1.0, 1.0))[:2])
    return history


def _clt_metrics(
    clt: CrossLayerTranscoder, f: torch.Tensor, y: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A CLT step's fired mask [n_layers, F] and metrics: mean over layers of the per-layer FVU and L0 ("fvu",
    "l0"), and each layer's ("fvu.<layer>", "l0.<layer>", the model layer), from f [n_layers, rows, F] (dense, or
    sparse COO as TopK training returns) and y, residual [n_layers, rows, d_model]."""
    if f.is_sparse:  # sparse TopK training: n_layers · rows · k entries
        index, active = f._indices(), f._values() > 0
        fired = torch.zeros(f.shape[0], f.shape[2], dtype=torch.bool, device=f.device)
        fired[index[0][active], index[2][active]] = True
        l0 = torch.bincount(index[0][active], minlength=f.shape[0]).float() / f.shape[1]
    else:
        active = f > 0
        fired, l0 = active.any(1), active.sum(-1).float().mean(1)  # [L, F], [L]
    variance = (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
    fvu = residual.pow(2).sum((1, 2)) / variance
    metrics = {"fvu": fvu.mean(), "l0": l0.mean()}
    for i, layer in enumerate(clt.layers):
        metrics[f"fvu.{layer}"] = fvu[i]
        metrics[f"l0.{layer}"] = l0[i]
    return fired, metrics


def row_size(x: torch.Tensor, metric: str) -> torch.Tensor:
    """[rows, d] -> [rows]: the norm ("norm") or the largest |entry| ("max") of each row."""
    return x.norm(dim=-1) if metric == "norm" else x.abs().amax(dim=-1)


def _mask_outliers(
    x: torch.Tensor, y: torch.Tensor, limit: float | Sequence[float], action: str, metric: str = "norm"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of x [rows, d_in] (and their targets y [rows, d_out]) whose size (``row_size``) exceeds ``limit``:
    dropped ("exclude") or scaled down to size ``limit`` ("cap", the target by the same factor) -> (x, y, masked
    fraction []). A CLT's x, y [n_layers, rows, d] have one limit per layer."""
    norms = row_size(x, metric)
    if not isinstance(limit, (int, float)):  # a CLT's [n_layers, rows, d]: an outlier at any layer is one
        limits = torch.tensor(list(limit), dtype=norms.dtype, device=norms.device)[:, None]
        outlier = (norms > limits).any(0)
        fraction = outlier.float().mean()
        if not bool(outlier.any()):
            return x, y, fraction
        if action == "cap":
            factor = (limits / norms.clamp_min(1e-12)).clamp(max=1.0)[..., None]
            return x * factor, y * factor, fraction
        return x[:, ~outlier], y[:, ~outlier], fraction
    outlier = norms > limit
    fraction = outlier.float().mean()
    if not bool(outlier.any()):
        return x, y, fraction
    if action == "cap":
        factor = (limit / norms.clamp_min(1e-12)).clamp(max=1.0)[:, None]
        return x * factor, (x * factor if y is x else y * factor), fraction
    return x[~outlier], (x[~outlier] if y is x else y[~outlier]), fraction


def _agreed_stream(iterator: Iterator, ctx: Distributed) -> Iterator:
    """Data-parallel: the local batches, ending on every rank as soon as any rank's stream ends."""
    while True:
        batch = next(iterator, None)
        if ctx.all_reduce_min_int(0 if batch is None else 1) == 0:
            return
        yield batch


def _all_reduce_step(
    params: list[torch.Tensor],
    step_stats: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor], int]],
    ctx: Distributed,
) -> None:
    """Data-parallel: average the gradients, the step's metrics and the fired masks [d_sae] over the ranks in one
    all_reduce (a latent fired if it fired on any rank); updates the tensors in ``step_stats`` in place."""
    grads = [p.grad for p in params if p.grad is not None]  # the flat gradient buffers: always present
    fired_parts = {name: fired.float() for name, (fired, _, _) in step_stats.items()}
    metric_parts = [m for _, metrics, _ in step_stats.values() for m in metrics.values()]
    with torch.no_grad():
        ctx.all_reduce_mean_([*grads, *[m.reshape(1) for m in metric_parts], *fired_parts.values()])
    for name, (_, metrics, rows) in list(step_stats.items()):
        step_stats[name] = (fired_parts[name] > 0, metrics, rows)


def live_batches(
    model,
    tokens: torch.Tensor,
    hooks: str | list[str],
    *,
    batch_size: int = 256,
    buffer_rows: int = 16384,
    sequences_per_forward: int = 16,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Activation batches {hook: [batch_size, d]} from a live HookedModel, endlessly, through a shuffling buffer.

    ``tokens`` [n_sequences, seq_len] are run ``sequences_per_forward`` at a time (cycling over epochs); every real
    token's activations of all ``hooks`` enter a buffer of ``buffer_rows`` rows, and once it is full each forward
    pass is followed by draws of random rows, so a batch mixes tokens of many sequences and positions (as with
    SAELens's activation store). Memory stays at the buffer plus one forward pass.
    """
    names = model.resolve(hooks)
    generator = torch.Generator().manual_seed(seed)
    buffer: dict[str, torch.Tensor] = {}
    epoch = 0
    while True:
        order = torch.randperm(len(tokens), generator=generator)
        for begin in range(0, len(order), sequences_per_forward):
            chunk = tokens[order[begin : begin + sequences_per_forward]]
            keep = (
                (chunk != pad_token_id)
                if pad_token_id is not None
                else torch.ones_like(chunk, dtype=torch.bool)
            )
            with torch.no_grad(), model.capture(names) as cache:
                model(chunk, attention_mask=keep.long())
            for name in names:
                rows = cache[name][keep].float()
                buffer[name] = rows if name not in buffer else torch.cat([buffer[name], rows])
            filled = len(buffer[names[0]])
            if filled < buffer_rows:
                continue
            draws = max(1, (filled - buffer_rows // 2) // batch_size)
            perm = torch.randperm(filled, generator=generator)
            for index in perm[: draws * batch_size].view(draws, batch_size):
                yield {name: buffer[name][index] for name in names}
            kept = perm[draws * batch_size :]
            buffer = {name: value[kept] for name, value in buffer.items()}
        epoch += 1


def train_sae(sae: SAE, batches: Iterable, cfg: TrainConfig | None = None) -> SAE:
    """Train one SAE on batches of tensors [batch, d_in] or (x, y) pairs; returns it (scaling folded in)."""
    return train_saes({"sae": sae}, batches, cfg).saes["sae"]


def _checkpoint(path: Path, step, saes, optimizer, scheduler, fired, scales, history) -> None:
    """Write everything a resume needs, weights included, as one file replaced atomically."""
    state = {
        "version": TRAINER_STATE_VERSION,
        "step": step,
        "saes": {
            name: {k: v.detach().cpu() for k, v in sae.state_dict().items()} for name, sae in saes.items()
        },
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "fired": fired,
        "scales": {n: list(s) for n, s in scales.items()},
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        crash_point("sae.checkpoint_written")
    crash_point("sae.checkpoint_saved")


def _resume(path: Path, saes, optimizer, scheduler, fired, scales, history) -> int:
    state = torch.load(path, weights_only=True)
    if state.get("version") != TRAINER_STATE_VERSION:
        raise ValueError(
            f"{path} was written by an older SAE trainer (format {state.get('version', 1)}, this one reads "
            f"{TRAINER_STATE_VERSION}); "
            f"delete {path.parent} (or pick another checkpoint_dir) to train from scratch"
        )
    if sorted(state["saes"]) != sorted(saes):
        raise ValueError(
            f"{path} holds SAEs {sorted(state['saes'])} but these are {sorted(saes)}: train the same SAEs, or pick "
            "another checkpoint_dir"
        )
    for name, sae in saes.items():
        sae.load_state_dict(state["saes"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    fired.update(state["fired"])
    scales.update({n: tuple(s) for n, s in state["scales"].items()})
    history.update(state["history"])
    return int(state["step"])
