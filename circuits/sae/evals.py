"""Evaluate SAEs / transcoders: reconstruction, sparsity and the model's loss when the SAE is spliced in.

Writes table `sae_evals` keyed by (model, checkpoint, hook, sae_id).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch
import torch.nn.functional as F

from circuits.sae.base import SAE

EVAL_KEYS = ["model", "checkpoint", "hook", "sae_id"]


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, batches: Iterable, dense_threshold: float = 0.1, progress: bool = True
) -> dict:
    """Streaming L0, FVU, explained variance, cosine, dead/dense fractions and density histogram.

    `batches` yields x [batch, d_in] (target = x) or (x [batch, d_in], y [batch, d_out]) pairs, on any device
    (moved to the SAE's); sums are accumulated in float64. `density` comes back on the CPU, [d_sae].
    """
    from tqdm.auto import tqdm

    n = 0
    sq_err = 0.0
    y_sum = y_sq = None
    cos_sum = l0_sum = 0.0
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.device)
    for batch in tqdm(batches, disable=not progress, desc="reconstruction metrics", unit="batch"):
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, batch)
        x = x.reshape(-1, x.shape[-1]).to(device=sae.device, dtype=torch.float32)
        y = y.reshape(-1, y.shape[-1]).to(device=sae.device, dtype=torch.float32)
        sae.check_input(x)
        f = sae.encode(x)
        out = sae.decode(f, x)
        sq_err += float((out - y).double().pow(2).sum())
        y64 = y.double()
        y_sum = y64.sum(0) if y_sum is None else y_sum + y64.sum(0)
        y_sq = y64.pow(2).sum(0) if y_sq is None else y_sq + y64.pow(2).sum(0)
        cos_sum += float(F.cosine_similarity(out, y, dim=-1).sum())
        active = f > 0
        l0_sum += float(active.sum())
        fires += active.sum(0).double()
        n += x.shape[0]
    total_var = float((y_sq - y_sum.pow(2) / n).sum())
    density = (fires / n).cpu()
    fvu = sq_err / max(total_var, 1e-30)
    return {
        "n_tokens": n,
        "L0": l0_sum / n,
        "FVU": fvu,
        "explained_variance": 1 - fvu,
        "cosine": cos_sum / n,
        "dead_fraction": float((density == 0).double().mean()),
        "dense_fraction": float((density > dense_threshold).double().mean()),
        "density": density.float(),
    }


def density_histogram(density: torch.Tensor, bins: int = 30) -> dict:
    """Histogram of log10 latent density [d_sae] (dead latents counted separately)."""
    alive = density[density > 0].double().log10()
    counts, edges = (
        torch.histogram(alive.float(), bins=bins)
        if alive.numel()
        else (torch.zeros(bins), torch.zeros(bins + 1))
    )
    return {
        "log10_density_edges": edges.tolist(),
        "counts": counts.tolist(),
        "dead": int((density == 0).sum()),
    }


def splice_hooks(sae: SAE, mode: str = "sae") -> list:
    """Forward hooks replacing `sae.hook_out` with the SAE's output (mode "sae") or zeros (mode "zero").

    A transcoder reads `sae.hook_in` earlier in the same forward.
    """
    seen: dict[str, torch.Tensor] = {}

    def read_input(act, hook):
        seen["x"] = act
        return None

    def replace(act, hook):
        if mode == "zero":
            return torch.zeros_like(act)
        x = seen.pop("x") if sae.hook_in != sae.hook_out else act
        sae.check_input(x, f"activation of {sae.hook_in!r} while splicing the SAE")
        return sae(x.to(device=sae.device, dtype=torch.float32)).to(device=act.device, dtype=act.dtype)

    if sae.hook_in != sae.hook_out:
        return [(sae.hook_in, read_input), (sae.hook_out, replace)]
    return [(sae.hook_out, replace)]


@torch.no_grad()
def splice_metrics(model, sae: SAE, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True) -> dict:
    """CE loss clean / spliced / zero-ablated, CE loss recovered and KL(clean || spliced) on tokens [batch, pos].

    A hook activation whose width is not the SAE's d_in (or that holds NaN/inf) raises SAEInputError."""
    from tqdm.auto import tqdm

    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0}
    count = 0
    for start in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc="splice metrics"):
        batch = tokens[start : start + batch_size]
        targets = batch[:, 1:].reshape(-1).to(model.device)
        clean = model(batch)[:, :-1].float().log_softmax(-1).flatten(0, 1)
        spliced = (
            model.run_with_hooks(batch, fwd_hooks=splice_hooks(sae))[:, :-1]
            .float()
            .log_softmax(-1)
            .flatten(0, 1)
        )
        zero = (
            model.run_with_hooks(batch, fwd_hooks=splice_hooks(sae, "zero"))[:, :-1].float().log_softmax(-1)
        )
        zero = zero.flatten(0, 1)
        sums["ce_clean"] += float(F.nll_loss(clean, targets, reduction="sum"))
        sums["ce_spliced"] += float(F.nll_loss(spliced, targets, reduction="sum"))
        sums["ce_zero"] += float(F.nll_loss(zero, targets, reduction="sum"))
        sums["kl"] += float((clean.exp() * (clean - spliced)).sum())
        count += targets.numel()
    out = {key: value / count for key, value in sums.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if abs(gap) > 1e-12 else float("nan")
    return out


def evaluate_sae(
    model,
    sae: SAE,
    tokens: torch.Tensor,
    sae_id: str,
    batch_size: int = 8,
    dataset: str = "",
    progress: bool = True,
) -> pd.DataFrame:
    """One `sae_evals` row for `sae` on `model` over tokens [batch, pos]."""
    hooks = [sae.hook_in] if sae.hook_in == sae.hook_out else [sae.hook_in, sae.hook_out]

    def pairs():
        for start in range(0, tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(tokens[start : start + batch_size], hooks)
            x = cache[sae.hook_in].flatten(0, -2)
            yield x if len(hooks) == 1 else (x, cache[sae.hook_out].flatten(0, -2))

    recon = reconstruction_metrics(sae, pairs(), progress=progress)
    density = recon.pop("density")
    row = {
        "model": sae.cfg.model or model.cfg.name,
        "checkpoint": model.cfg.checkpoint,
        "hook": sae.hook_in,
        "dataset": dataset,
        "sae_id": sae_id,
        "hook_out": sae.hook_out,
        "architecture": sae.cfg.architecture,
        "transcoder": sae.cfg.is_transcoder,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.cfg.k,
        **recon,
        **splice_metrics(model, sae, tokens, batch_size, progress=progress),
        "density_histogram": density_histogram(density),
    }
    return pd.DataFrame([row])


def write_evals(frame: pd.DataFrame, workspace) -> int:
    """Write `sae_evals` rows (re-runs replace rows with the same model, checkpoint, hook and sae_id)."""
    return workspace.results().write("sae_evals", frame, replace_keys=EVAL_KEYS)


def sae_dir(workspace, sae_id: str):
    """Where SAE `sae_id` is saved inside the workspace."""
    from workbench.workspace import safe_name

    return workspace.root / "saes" / safe_name(sae_id)


def code_token_sequences(tokenizer, n_sequences: int = 48, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """[n_sequences, seq_len] token ids cut from the zoo's Python-source corpus."""
    from workbench.zoo.corpora import python_source_texts

    ids: list[int] = []
    for text in python_source_texts(max_files=4 * n_sequences, max_chars=4000, seed=seed):
        ids.extend(tokenizer.encode(text))
        if len(ids) >= n_sequences * seq_len:
            break
    if len(ids) < n_sequences * seq_len:
        n_sequences = len(ids) // seq_len
    return torch.tensor(ids[: n_sequences * seq_len]).view(n_sequences, seq_len)


def train_and_evaluate(
    workspace,
    model_name: str,
    specs: dict[str, dict],
    *,
    step: int | None = None,
    n_sequences: int = 48,
    seq_len: int = 64,
    train_steps: int = 300,
    batch_size: int = 256,
    lr: float = 3e-3,
    pages: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Capture a store from a zoo model, train every SAE in `specs` ({sae_id: SAEConfig kwargs}) from one
    stream, save them under the workspace, write `sae_evals` (and `sae_features`) and return the eval rows.
    ``seed`` draws the SAEs' initialisation (the same seed gives the same SAE files, byte for byte)."""
    from circuits.sae.base import SAEConfig
    from circuits.sae.features import feature_pages, write_features
    from circuits.sae.train import TrainConfig, seeded_sae, train_saes
    from workbench.checkpoints import CheckpointSeries
    from workbench.store import capture_to_store

    series = CheckpointSeries.from_directory(workspace.model_dir(model_name))
    step = series.steps[-1] if step is None else step
    model = series.load(step)
    tokens = code_token_sequences(model.tokenizer, n_sequences, seq_len)
    split = max(1, tokens.shape[0] * 3 // 4)
    hooks = sorted(
        {h for spec in specs.values() for h in (spec["hook_in"], spec.get("hook_out") or spec["hook_in"])}
    )
    store = capture_to_store(
        model, tokens[:split], hooks, workspace.store_dir(f"sae-{model_name}-step{step}"),
        dataset="python-stdlib", checkpoint=step, overwrite=True, progress=progress,
    )  # fmt: skip
    saes = {}
    for sae_id, spec in specs.items():
        d_in = store.manifest["shapes"][spec["hook_in"]][-1]
        d_out = store.manifest["shapes"][spec.get("hook_out") or spec["hook_in"]][-1]
        saes[sae_id] = seeded_sae(
            SAEConfig(
                d_in=d_in, d_out=d_out, model=model_name, checkpoint=step, dataset="python-stdlib", **spec
            ),
            seed,
        )

    def stream():
        epoch = 0
        while True:
            yield from store.iter_batches(hooks, batch_size, shuffle=True, seed=epoch, drop_last=True)
            epoch += 1

    cfg = TrainConfig(
        steps=train_steps, lr=lr, warmup_steps=20, progress=progress, dead_after_tokens=10 * batch_size
    )
    trained = train_saes(saes, stream(), cfg).saes
    rows = []
    for sae_id, sae in trained.items():
        sae.eval()
        sae.save(sae_dir(workspace, sae_id))
        rows.append(
            evaluate_sae(model, sae, tokens[split:], sae_id, dataset="python-stdlib", progress=progress)
        )
        if pages and not sae.cfg.is_transcoder:
            write_features(feature_pages(sae, store, sae_id, model=model, progress=progress), workspace)
    frame = pd.concat(rows, ignore_index=True)
    write_evals(frame, workspace)
    return frame


def demo_step(workspace, progress: bool = True) -> str:
    """Train a TopK SAE on code-tiny's layer-0 residual stream and TopK transcoders on its layer-0 and 1 MLPs,
    write `sae_evals` and `sae_features`, return a one-line summary."""
    specs = {
        "code-tiny.L0-resid-topk": {"architecture": "topk", "d_sae": 256, "k": 8, "hook_in": "blocks.0.hook_resid_post"},
        **{
            f"code-tiny.L{layer}-mlp-transcoder": {
                "architecture": "topk", "d_sae": 256, "k": 8,
                "hook_in": f"blocks.{layer}.hook_resid_pre", "hook_out": f"blocks.{layer}.hook_mlp_out",
            }
            for layer in (0, 1)
        },
    }  # fmt: skip
    frame = train_and_evaluate(workspace, "code-tiny", specs, progress=progress)
    parts = [
        f"{r.sae_id}: L0 {r.L0:.1f}, FVU {r.FVU:.3f}, CE recovered {r.ce_recovered:.2f}, dead {r.dead_fraction:.0%}"
        for r in frame.itertuples()
    ]
    return "SAE " + "; ".join(parts)
