"""SAE training throughput: our trainer vs SAELens's SAETrainer (and sparsify for TopK) on the same in-memory
activations, for TopK, BatchTopK, JumpReLU and Matryoshka BatchTopK (``--architecture``).

Same architecture (TopK with AuxK), width, k, batch, steps, learning rate (constant), Adam, float32, no activation
normalisation on either side, same torch seed; each trainer keeps its own initialisation (ours: the data-dependent
init from the first batch, inside the timed loop). Only the training loops are timed; runs alternate which trainer
goes first (shared machines drift) and best-of and median are reported. Both trained SAEs are then scored on the
same held-out activations (FVU, L0) through their own encode/decode, and the run fails unless the L0s are equal
before any ratio is printed. The equal-L0 condition per architecture:

- topk: every trainer at L0 = k on every held-out row (its own per-row top-k);
- batchtopk, matryoshka: the same k over the batch on both sides (and the same prefix widths for Matryoshka); the
  held-out FVU is taken with batch top-k over all held-out rows (L0 = k exactly on both, the training-time
  activation, checked). Each SAE's inference form, JumpReLU at its learned global threshold (ours: ``threshold``;
  SAELens: ``topk_threshold``, what it saves), is reported beside it but not required to match: SAELens's
  threshold is a moving average started at 0, so after a few hundred steps it still keeps far more than k;
- jumprelu: L0 is set by the L0 coefficient (loss = MSE + coefficient · L0 on both sides, same bandwidth) and the
  initial threshold, so each side gets its own (``--l0-coefficient`` / ``--peer-l0-coefficient``,
  ``--init-threshold`` / ``--peer-init-threshold``) and the run fails unless the held-out L0s agree within 10 %.
  ``--l0-grid`` trains a few coefficients on both sides once and prints FVU against L0. Over a few hundred steps
  the coefficient barely moves L0: Adam moves each threshold by at most about lr per step, whatever the
  coefficient, so the initial threshold is the knob that matches L0 in a short run.
  ``--target-l0 L`` starts both sides from one SAE (ours, data-initialised, its threshold set to keep L latents
  per row on the first batch; SAELens gets a copy): the matched start the timed runs use.

    python benchmarks/sae.py                      # synthetic: d_in 256, sparse sums of 4096 unit directions
    python benchmarks/sae.py --real               # code-tiny blocks.1.hook_resid_post (d_in 64)
    python benchmarks/sae.py --device cuda        # every trainer on the GPU
    python benchmarks/sae.py --d-in 768 --d-sae 24576 --k 32 --nproc 2   # GPT-2 / Pythia-160m width, + 2 gloo ranks
    python benchmarks/sae.py --architecture batchtopk --threads 1        # ours vs SAELens (sparsify has no BatchTopK)
    python benchmarks/sae.py --architecture jumprelu --l0-grid 3e-3,1e-2,3e-2 --threads 1   # FVU vs L0, both sides
    python benchmarks/sae.py --architecture jumprelu --target-l0 64 --threads 1   # both sides start at L0 64
    python benchmarks/sae.py --d-in 768 --steps 20 --scaling 2048 8192 32768 65536   # cost per token vs d_sae

sparsify (eai-sparsify) runs its SparseCoder through its own training step (``train_sparsify``); ``--nproc N``
also times our trainer data-parallel on N gloo processes over the same global batches.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def synthetic(n: int, d_in: int, n_atoms: int = 4096, active: int = 16, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative sums of ``active`` random unit directions per row: [n, d_in]."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d_in, generator=g), dim=1)
    index = torch.randint(n_atoms, (n, active), generator=g)
    weights = torch.rand(n, active, generator=g) * 2
    return torch.einsum("na,nad->nd", weights, atoms[index])


def real(n: int) -> torch.Tensor:
    from workbench.datasets import load_dataset
    from workbench.references import resolve_model
    from workbench.workspace import Workspace
    from workbench.zoo.train import train_zoo_model

    workspace = Workspace().ensure()
    train_zoo_model("code-tiny", workspace, progress=True)
    model = resolve_model("code-tiny", workspace=workspace)
    tokens, _ = load_dataset("zoo:python-stdlib").token_tensor(
        model.tokenizer, context_length=64, packing=True, max_rows=n // 64 + 1
    )
    with torch.no_grad(), model.capture("blocks.1.hook_resid_post") as cache:
        model(tokens)
    return cache["blocks.1.hook_resid_post"].reshape(-1, model.cfg.d_model)[:n]


class Clock:
    """Wall and this process's CPU seconds (user + system, all threads) since ``start``: with --threads 1 the CPU
    time is the trainer's own work, much less sensitive than wall time to other jobs on a shared machine."""

    def start(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def batches(data: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(len(data), (batch,), generator=g)]


def fvu_l0(encode, decode, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        f = encode(x)
        residual = x - decode(f)
    return float(residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), float((f > 0).float().sum(-1).mean())


def held_out_scores(name: str, sae, x: torch.Tensor, args) -> dict[str, tuple[float, float]]:
    """{evaluation: (held-out FVU, L0)} of one trained SAE through its own encode / decode; the first entry is the
    one the equal-L0 condition and the FVU target are stated on (see the module docstring)."""
    if args.architecture not in ("batchtopk", "matryoshka"):
        return {"own encode": fvu_l0(sae.encode, sae.decode, x)}
    if name.startswith("ours"):  # batch top-k over the held-out rows; then the learned threshold (its encode)
        batch = fvu_l0(lambda v: sae.batch_activation(sae.pre_activation(v)), sae.decode, x)
        return {"batch top-k": batch, "threshold": fvu_l0(sae.encode, sae.decode, x)}

    def at_threshold(v):  # SAELens's saved (JumpReLU) form: its pre-activations above topk_threshold
        _, pre = sae.encode_with_hidden_pre(v)
        return pre.relu() * (pre > sae.topk_threshold).to(pre.dtype)

    return {
        "batch top-k": fvu_l0(sae.encode, sae.decode, x),
        "threshold": fvu_l0(at_threshold, sae.decode, x),
    }


def check_equal_l0(scores: dict[str, dict[str, tuple[float, float]]], args) -> str:
    """Raise SystemExit unless the trainers' held-out L0s meet the architecture's equal-L0 condition; returns the
    line saying how they met it."""
    first = {name: next(iter(modes.values()))[1] for name, modes in scores.items()}
    listed = ", ".join(f"{n} {l0:.2f}" for n, l0 in first.items())
    if args.architecture == "jumprelu":  # L0 set by each side's coefficient: the sides must agree within 10 %
        low, high = min(first.values()), max(first.values())
        if high > 1.1 * low:
            raise SystemExit(
                f"held-out L0s {listed} differ by more than 10 %: pick L0 coefficients that match "
                "(--l0-coefficient / --peer-l0-coefficient; --l0-grid shows FVU against L0)"
            )
        return f"L0 check: within 10 % of each other ({listed}; ratio {high / low:.3f})"
    tolerance = 0.05 if args.architecture == "topk" else 0.01
    for name, l0 in first.items():  # per-row top-k, or batch top-k over the held-out rows: L0 = k
        if abs(l0 - args.k) > tolerance * args.k:
            raise SystemExit(
                f"{name} reached L0 {l0:.2f}, not k={args.k}: the FVU comparison would be unfair"
            )
    line = f"L0 check: all at k={args.k} ({listed})"
    if args.architecture in ("batchtopk", "matryoshka"):  # reported, not required: SAELens's threshold is an
        at = {name: modes["threshold"][1] for name, modes in scores.items()}  # EMA from 0, still low after a
        line += "; at the learned thresholds (reported only): " + ", ".join(
            f"{n} {v:.1f}" for n, v in at.items()
        )
    return line  # few hundred steps (its L0 there is far above k), ours starts at the first batch's value


ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "matryoshka")


def matryoshka_widths(args) -> list[int]:
    """Nested prefix widths for Matryoshka (both sides): ``--matryoshka-widths`` or d_sae/8, /4, /2, d_sae."""
    if args.matryoshka_widths:
        widths = [int(w) for w in args.matryoshka_widths.split(",")]
    else:
        widths = [args.d_sae // 8, args.d_sae // 4, args.d_sae // 2]
    return sorted(set(widths) | {args.d_sae})


def ours_config(d_in: int, args, l0_coefficient: float | None = None):
    """Our SAEConfig for ``args.architecture`` (the same k / widths / L0 coefficient settings as the peer's)."""
    from workbench.circuits.sae.base import SAEConfig

    if args.architecture == "jumprelu":
        coefficient = args.l0_coefficient if l0_coefficient is None else l0_coefficient
        return SAEConfig(
            architecture="jumprelu",
            d_in=d_in,
            d_sae=args.d_sae,
            l0_coefficient=coefficient,
            init_threshold=args.init_threshold,
            bandwidth=args.bandwidth,
        )
    if args.architecture == "matryoshka":
        return SAEConfig(
            architecture="matryoshka_batchtopk",
            d_in=d_in,
            d_sae=args.d_sae,
            k=args.k,
            matryoshka_widths=matryoshka_widths(args),
        )
    return SAEConfig(architecture=args.architecture, d_in=d_in, d_sae=args.d_sae, k=args.k)


def train_ours(data, args, l0_coefficient: float | None = None) -> tuple[float, float, object]:
    from workbench.circuits.sae.base import create_sae
    from workbench.circuits.sae.train import TrainConfig, train_saes

    torch.manual_seed(args.seed)
    sae = create_sae(ours_config(data.shape[1], args, l0_coefficient)).to(args.device)
    shared = getattr(args, "shared_initial", None)
    if shared is not None:
        load_shared_initial(sae, shared, peer=False)
    cfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=0,
        decay_fraction=0.0,
        data_init=shared is None,
        normalize_activations=False,
        progress=False,
        dead_after_tokens=10_000_000,
    )
    stream = batches(data, args.batch, args.seed)
    _sync(args.device)
    clock = Clock().start()
    trained = train_saes({"sae": sae}, stream, cfg).saes["sae"]
    _sync(args.device)
    return *clock.stop(), trained


def saelens_sae(d_in: int, args, l0_coefficient: float | None = None):
    """SAELens's training SAE for ``args.architecture`` with its own defaults except the compared settings (k,
    widths, L0 coefficient, bandwidth, initial threshold)."""
    if args.architecture == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        return BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k, device=args.device)
        )
    if args.architecture == "matryoshka":
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )

        return MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=d_in,
                d_sae=args.d_sae,
                k=args.k,
                matryoshka_widths=matryoshka_widths(args),
                device=args.device,
            )
        )
    if args.architecture == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        coefficient = args.peer_l0_coefficient if l0_coefficient is None else l0_coefficient
        return JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(
                d_in=d_in,
                d_sae=args.d_sae,
                l0_coefficient=coefficient,
                jumprelu_init_threshold=args.peer_init_threshold,
                jumprelu_bandwidth=args.bandwidth,
                device=args.device,
            )
        )
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k, device=args.device))


def train_saelens(data, args, l0_coefficient: float | None = None) -> tuple[float, float, object]:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    sae = saelens_sae(data.shape[1], args, l0_coefficient)
    if getattr(args, "shared_initial", None) is not None:
        load_shared_initial(sae, args.shared_initial, peer=True)
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr,
        lr_scheduler_name="constant",
        device=args.device,
        dead_feature_window=10_000,
        feature_sampling_window=10_000,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, batches(data, args.batch, args.seed))
    _sync(args.device)
    clock = Clock().start()
    trained = trainer.fit()
    _sync(args.device)
    return *clock.stop(), trained


def train_sparsify(data, args) -> tuple[float, float, object]:
    """eai-sparsify's SparseCoder through its own training step (sparsify.trainer's loop body without a model:
    b_dec = mean of the first batch, loss = fvu + auxk_alpha · auxk_loss with its dead mask, gradient parallel to the
    decoder rows removed, Adam, decoder rows renormalised), at the same lr as the others."""
    import os

    if torch.device(args.device).type != "cuda":  # its Triton decoder needs a GPU; on CPU it has an eager one
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    sae = SparseCoder(data.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k), device=args.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=args.device)
    stream = batches(data, args.batch, args.seed)
    _sync(args.device)
    clock = Clock().start()
    for step in range(args.steps):
        x = next(stream)
        if step == 0:
            sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since_fired > 10_000_000)
        loss = out.fvu + (1 / 32) * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[out.latent_indices.flatten()] = 0
        sae.set_decoder_norm_to_unit_norm()
    _sync(args.device)
    wall, cpu = clock.stop()

    class Wrapped:  # encode -> dense latents, decode(dense) like the others
        def encode(self, x):
            top_acts, top_indices, _ = sae.encode(x)
            return torch.zeros(len(x), args.d_sae, device=x.device).scatter(1, top_indices, top_acts)

        def decode(self, f):
            return f @ sae.W_dec + sae.b_dec

    return wall, cpu, Wrapped()


def _rank_train(rank: int, world: int, port: int, data, args, out) -> None:
    """One rank of a data-parallel run of our trainer: its half of every global batch, one thread."""
    import os

    from workbench.circuits.sae.base import create_sae
    from workbench.circuits.sae.distributed import init_distributed, shutdown
    from workbench.circuits.sae.train import TrainConfig, train_saes

    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = init_distributed("data", args.device)
    torch.manual_seed(args.seed)
    sae = create_sae(ours_config(data.shape[1], args))
    cfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=0,
        decay_fraction=0.0,
        normalize_activations=False,
        progress=False,
        dead_after_tokens=10_000_000,
    )
    local = args.batch // world
    stream = (b[rank * local : (rank + 1) * local] for b in batches(data, args.batch, args.seed))
    ctx.barrier()
    start = time.perf_counter()
    trained = train_saes({"sae": sae}, stream, cfg, distributed=ctx).saes["sae"]
    ctx.barrier()
    if rank == 0:
        torch.save(trained.state_dict(), out[1])
        out[0].put(time.perf_counter() - start)
    shutdown()


def train_ours_processes(data, args) -> tuple[float, float, object]:
    """Our trainer data-parallel on ``args.nproc`` gloo processes (same global batch, threads split)."""
    import socket

    import torch.multiprocessing as mp

    from workbench.circuits.sae.base import create_sae

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = (ctx.Queue(), Path(tmp) / "sae.pt")
        procs = [
            ctx.Process(target=_rank_train, args=(r, args.nproc, port, data, args, out))
            for r in range(args.nproc)
        ]
        for proc in procs:
            proc.start()
        seconds = out[0].get()
        for proc in procs:
            proc.join()
        sae = create_sae(ours_config(data.shape[1], args))
        sae.load_state_dict(torch.load(out[1], weights_only=True))
    return seconds, float("nan"), sae  # the ranks' CPU time is not this process's


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def threshold_for_l0(pre: torch.Tensor, l0: float) -> float:
    """The global threshold t at which pre [rows, d_sae] keeps ``l0`` entries per row on average (Σ 1[pre > t] / rows
    = l0): the (rows · l0)-th largest pre-activation."""
    kept = max(1, min(pre.numel() - 1, round(pre.shape[0] * l0)))
    return float(pre.flatten().topk(kept + 1).values[-1])


def shared_initial_sae(train: torch.Tensor, args) -> dict[str, torch.Tensor]:
    """--target-l0 (jumprelu): the one initial SAE both sides train from, as a state dict — ours, seeded, with its
    threshold set so that it keeps ``args.target_l0`` latents per row on the first training batch, then its
    data-dependent initialisation on that batch (which scales the threshold with the encoder: the same latents fire).
    Each side's own default initialisation has a different pre-activation scale (SAELens: decoder rows of norm 0.1),
    which after 100 steps left SAELens at ten times our L0 whatever its coefficient or initial threshold."""
    from workbench.circuits.sae.base import create_sae

    first = next(batches(train, args.batch, args.seed))
    torch.manual_seed(args.seed)
    sae = create_sae(ours_config(train.shape[1], args)).to(args.device)
    with torch.no_grad():
        sae.center_encoder(first.mean(0))
        sae.threshold.fill_(threshold_for_l0(sae.pre_activation(first), args.target_l0))
        sae.initialize_from_batch(first, first)
        l0 = float((sae.encode(first) > 0).float().sum(-1).mean())
    print(
        f"shared initial SAE: threshold {float(sae.threshold[0].detach()):.4g}, L0 {l0:.1f} on the first batch"
    )
    return {name: t.detach().clone() for name, t in sae.state_dict().items()}


def load_shared_initial(sae, state: dict[str, torch.Tensor], peer: bool) -> None:
    """Copy the shared initial SAE into ``sae`` (ours, or SAELens's JumpReLU training SAE with ``peer``: it encodes
    (x − b_dec) W_enc + b_enc, so its b_enc is ours + b_dec W_enc: the same pre-activations, checked)."""
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec", "threshold"):
            getattr(sae, name).copy_(state[name])
        b_enc = state["b_enc"] + state["b_dec"] @ state["W_enc"] if peer else state["b_enc"]
        sae.b_enc.copy_(b_enc)
        if peer:
            x = torch.randn(8, state["W_enc"].shape[0], device=b_enc.device)
            _, pre = sae.encode_with_hidden_pre(x)
            expected = torch.addmm(state["b_enc"], x, state["W_enc"])
            torch.testing.assert_close(pre, expected, rtol=1e-4, atol=1e-4)


def l0_grid(train, held_out, args) -> None:
    """JumpReLU: each coefficient of ``--l0-grid`` trained once on both sides (timed once, not interleaved): held-out
    L0 and FVU per side, to read FVU at matched L0 off the two curves and pick the pair for the timed runs."""
    coefficients = [float(c) for c in args.l0_grid.split(",")]
    print(
        f"{'coefficient':>12} {'ours L0':>8} {'ours FVU':>9} {'ours s':>7} {'SAELens L0':>11} {'SAELens FVU':>12} "
        f"{'SAELens s':>10}"
    )
    for coefficient in coefficients:
        cells = []
        for name, run in (("ours", train_ours), ("SAELens", train_saelens)):
            seconds, _, sae = run(train, args, coefficient)
            fvu, l0 = held_out_scores(name, sae, held_out, args)["own encode"]
            cells.append((l0, fvu, seconds))
        (l0_a, fvu_a, s_a), (l0_b, fvu_b, s_b) = cells
        print(
            f"{coefficient:12.3g} {l0_a:8.1f} {fvu_a:9.4f} {s_a:7.1f} {l0_b:11.1f} {fvu_b:12.4f} {s_b:10.1f}",
            flush=True,
        )


def scaling(train: torch.Tensor, held_out: torch.Tensor, args) -> None:
    """--scaling D1 D2 ...: ours and each peer trained once per width d_sae (the other settings as given), CPU
    microseconds per token, the ratio, held-out FVU at the equal-L0 condition; then the growth exponent of each side's
    cost per token in d_sae (a least-squares line in log-log). The encoder product is d_in · d_sae per token, so the
    cost should grow about linearly."""
    import numpy as np

    peers = [n for n in args.peers.split(",") if n]
    trainers = {"ours": train_ours, "SAELens": train_saelens, "sparsify": train_sparsify}
    tokens = args.steps * args.batch
    print(
        f"{'d_sae':>7} "
        + " ".join(f"{n + ' µs/tok':>16} {n + ' FVU':>12}" for n in ["ours", *peers])
        + " "
        + " ".join(f"{'ours/' + n:>14}" for n in peers)
    )
    costs: dict[str, list[float]] = {n: [] for n in ["ours", *peers]}
    widths = [int(w) for w in args.scaling]
    for width in widths:
        args.d_sae = width
        cells, cpu = {}, {}
        for name in ["ours", *peers]:
            _, cpu[name], sae = trainers[name](train, args)
            cells[name] = held_out_scores(name, sae, held_out, args)
            costs[name].append(cpu[name] / tokens * 1e6)
        check_equal_l0(cells, args)
        row = " ".join(
            f"{costs[n][-1]:16.1f} {next(iter(cells[n].values()))[0]:12.4f}" for n in ["ours", *peers]
        )
        print(f"{width:7d} {row} " + " ".join(f"{cpu[n] / cpu['ours']:13.2f}×" for n in peers), flush=True)
    for name, values in costs.items():
        exponent = np.polyfit(np.log(widths), np.log(values), 1)[0]
        print(f"{name}: CPU time per token ∝ d_sae^{exponent:.2f} ({widths[0]} → {widths[-1]})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real", action="store_true", help="code-tiny residual activations instead of synthetic"
    )
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="topk")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32, help="topk, batchtopk, matryoshka: latents per row")
    parser.add_argument(
        "--matryoshka-widths", default="", help="comma-separated prefix widths (d_sae/8,/4,/2)"
    )
    parser.add_argument("--l0-coefficient", type=float, default=1e-2, help="jumprelu: ours")
    parser.add_argument("--peer-l0-coefficient", type=float, default=1e-2, help="jumprelu: SAELens's")
    parser.add_argument(
        "--l0-grid", default="", help="jumprelu: comma-separated coefficients, FVU vs L0 only"
    )
    parser.add_argument("--init-threshold", type=float, default=0.05, help="jumprelu: ours")
    parser.add_argument(
        "--peer-init-threshold",
        type=float,
        default=None,
        help="jumprelu: SAELens's initial threshold (default --init-threshold)",
    )
    parser.add_argument("--bandwidth", type=float, default=0.05, help="jumprelu: both sides")
    parser.add_argument(
        "--target-l0",
        type=float,
        default=None,
        help="jumprelu: both sides start from one SAE keeping this L0 on the first batch",
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (every trainer uses it)")
    parser.add_argument(
        "--peers",
        default=None,
        help="comma-separated: SAELens, sparsify (topk only); default both for topk, else SAELens",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="also time ours data-parallel on N gloo processes"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n-rows", type=int, default=60_000)
    parser.add_argument(
        "--scaling",
        nargs="+",
        type=int,
        default=None,
        metavar="D_SAE",
        help="one run per d_sae on each side: cost per token and its growth exponent",
    )
    args = parser.parse_args()
    if args.peer_init_threshold is None:
        args.peer_init_threshold = args.init_threshold
    if args.peers is None:
        args.peers = "SAELens,sparsify" if args.architecture == "topk" else "SAELens"
    if args.architecture != "topk" and "sparsify" in args.peers.split(","):
        parser.error("sparsify trains TopK only: pass --peers SAELens for this architecture")
    torch.set_num_threads(args.threads)
    torch.optim.Adam(
        [torch.zeros(1, requires_grad=True)]
    )  # its first use imports torch._dynamo (s): not timed

    data = real(args.n_rows) if args.real else synthetic(args.n_rows, args.d_in)
    data = data.to(args.device)
    split = args.n_rows * 5 // 6
    train, held_out = data[:split], data[split:]
    if args.target_l0 is not None:
        if args.architecture != "jumprelu":
            parser.error("--target-l0 is for --architecture jumprelu (the others fix L0 by k)")
        args.shared_initial = shared_initial_sae(train, args)
    setting = {
        "jumprelu": f"L0 coefficient ours {args.l0_coefficient:g} / SAELens {args.peer_l0_coefficient:g}, "
        f"initial threshold ours {args.init_threshold:g} / SAELens {args.peer_init_threshold:g}, "
        f"bandwidth {args.bandwidth:g}",
        "matryoshka": f"k {args.k}, widths {matryoshka_widths(args)}",
    }.get(args.architecture, f"k {args.k}")
    print(
        f"activations: {'code-tiny resid' if args.real else 'synthetic'} {tuple(data.shape)}; {args.architecture} "
        f"d_sae {args.d_sae}, {setting}, batch {args.batch}, steps {args.steps}, lr {args.lr}; "
        f"torch threads {torch.get_num_threads()}"
    )
    if args.scaling:
        scaling(train, held_out, args)
        return
    if args.l0_grid:
        if args.architecture != "jumprelu":
            parser.error("--l0-grid is for --architecture jumprelu (the others fix L0 by k)")
        l0_grid(train, held_out, args)
        return
    trainers = {"ours": train_ours, "SAELens": train_saelens, "sparsify": train_sparsify}
    order = [("ours", train_ours)] + [(n, trainers[n]) for n in args.peers.split(",") if n]
    if args.nproc > 1:
        order.append((f"ours x{args.nproc} proc", train_ours_processes))
    results: dict[str, list[float]] = {name: [] for name, _ in order}
    cpu_results: dict[str, list[float]] = {name: [] for name, _ in order}
    models = {}
    for repeat in range(args.repeats):  # interleaved, alternating who goes first: shared machines drift
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            seconds, cpu, sae = run(train, args)
            results[name].append(seconds)
            cpu_results[name].append(cpu)
            models[name] = sae
            print(f"  repeat {repeat}: {name} {seconds:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    tokens = args.steps * args.batch
    scores = {name: held_out_scores(name, sae, held_out, args) for name, sae in models.items()}
    modes = list(next(iter(scores.values())))
    rows = {}
    for name in models:
        seconds = min(results[name])
        fvu, l0 = scores[name][modes[0]]
        rows[name] = (seconds, tokens / seconds, fvu, l0)
    extra = "".join(f" {'FVU / L0 ' + mode:>24}" for mode in modes[1:])
    print(
        f"{'trainer':16} {'best s':>8} {'median s':>9} {'best CPU s':>11} {'tokens/s':>10} {'held-out FVU':>13} "
        f"{'L0':>6}{extra}   (FVU, L0: {modes[0]})"
    )
    for name, (seconds, rate, fvu, l0) in rows.items():
        median = statistics.median(results[name])
        cells = "".join(f" {scores[name][m][0]:16.4f} / {scores[name][m][1]:5.1f}" for m in modes[1:])
        print(
            f"{name:16} {seconds:8.2f} {median:9.2f} {min(cpu_results[name]):11.2f} {rate:10.0f} {fvu:13.4f} "
            f"{l0:6.1f}{cells}"
        )
    print(check_equal_l0(scores, args))  # before any ratio
    peers = [n for n in rows if n in ("SAELens", "sparsify")]
    for peer in peers:
        cpu_ratio = min(cpu_results[peer]) / min(cpu_results["ours"])
        print(
            f"throughput ratio ours / {peer}: {rows['ours'][1] / rows[peer][1]:.2f}× wall, {cpu_ratio:.2f}× CPU "
            f"time; FVU ours − {peer}: {rows['ours'][2] - rows[peer][2]:+.4f}"
        )
    if peers:
        fastest = max(peers, key=lambda n: rows[n][1])
        print(
            f"vs the faster peer ({fastest}): {rows['ours'][1] / rows[fastest][1]:.2f}× (target ≥ 1.5×), FVU "
            f"{rows['ours'][2] - rows[fastest][2]:+.4f} (target ≤ 0)"
        )
    if args.nproc > 1:
        name = f"ours x{args.nproc} proc"
        print(
            f"{args.nproc} gloo processes vs 1 process: {rows[name][1] / rows['ours'][1]:.2f}× tokens/s, FVU "
            f"{rows[name][2] - rows['ours'][2]:+.4f}"
        )


if __name__ == "__main__":
    main()
