"""TopK SAE training throughput: our trainer vs SAELens's SAETrainer on the same in-memory activations.

Same architecture (TopK with AuxK), width, k, batch, steps, learning rate (constant), Adam, float32, no activation
normalisation on either side, same torch seed; each trainer keeps its own initialisation (ours: the data-dependent
init from the first batch, inside the timed loop). Only the training loops are timed; runs alternate which trainer
goes first (shared machines drift) and best-of and median are reported. Both trained SAEs are then scored on the
same held-out activations (FVU, L0) through their own encode/decode, and the run fails unless both sit at L0 = k.

    python benchmarks/sae.py                      # synthetic: d_in 256, sparse sums of 4096 unit directions
    python benchmarks/sae.py --real               # code-tiny blocks.1.hook_resid_post (d_in 64)
    python benchmarks/sae.py --device cuda        # both trainers on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    tokens, _ = load_dataset("zoo:python-stdlib").token_tensor(model.tokenizer, context_length=64, packing=True,
                                                              max_rows=n // 64 + 1)  # fmt: skip
    with torch.no_grad(), model.capture("blocks.1.hook_resid_post") as cache:
        model(tokens)
    return cache["blocks.1.hook_resid_post"].reshape(-1, model.cfg.d_model)[:n]


def batches(data: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(len(data), (batch,), generator=g)]


def fvu_l0(encode, decode, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        f = encode(x)
        residual = x - decode(f)
    return float(residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), float((f > 0).float().sum(-1).mean())


def train_ours(data, args) -> tuple[float, object]:
    from workbench.circuits.sae.base import SAEConfig, create_sae
    from workbench.circuits.sae.train import TrainConfig, train_saes

    torch.manual_seed(args.seed)
    sae = create_sae(SAEConfig(architecture="topk", d_in=data.shape[1], d_sae=args.d_sae, k=args.k)).to(
        args.device
    )
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=0, decay_fraction=0.0,
                      normalize_activations=False, progress=False, dead_after_tokens=10_000_000)  # fmt: skip
    stream = batches(data, args.batch, args.seed)
    _sync(args.device)
    start = time.perf_counter()
    trained = train_saes({"sae": sae}, stream, cfg).saes["sae"]
    _sync(args.device)
    return time.perf_counter() - start, trained


def train_saelens(data, args) -> tuple[float, object]:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=data.shape[1], d_sae=args.d_sae, k=args.k, device=args.device)
    )
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr,
        lr_end=args.lr, lr_scheduler_name="constant", device=args.device, dead_feature_window=10_000, feature_sampling_window=10_000,
        logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    trainer = SAETrainer(cfg, sae, batches(data, args.batch, args.seed))
    _sync(args.device)
    start = time.perf_counter()
    trained = trainer.fit()
    _sync(args.device)
    return time.perf_counter() - start, trained


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--real", action="store_true", help="code-tiny residual activations instead of synthetic"
    )
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both trainers use it)")
    args = parser.parse_args()

    data = real(60_000) if args.real else synthetic(60_000, args.d_in)
    data = data.to(args.device)
    train, held_out = data[:50_000], data[50_000:]
    print(f"activations: {'code-tiny resid' if args.real else 'synthetic'} {tuple(data.shape)}; TopK d_sae "
          f"{args.d_sae}, k {args.k}, batch {args.batch}, steps {args.steps}, lr {args.lr}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    results = {"ours": [], "SAELens": []}
    models = {}
    for repeat in range(args.repeats):  # interleaved, alternating who goes first: shared machines drift
        order = (("ours", train_ours), ("SAELens", train_saelens))
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            seconds, sae = run(train, args)
            results[name].append(seconds)
            models[name] = sae
            print(f"  repeat {repeat}: {name} {seconds:.2f} s", flush=True)
    tokens = args.steps * args.batch
    rows = {}
    for name, sae in models.items():
        seconds = min(results[name])
        fvu, l0 = fvu_l0(sae.encode, sae.decode, held_out)
        rows[name] = (seconds, tokens / seconds, fvu, l0)
    print(f"{'trainer':10} {'best s':>8} {'median s':>9} {'tokens/s':>10} {'held-out FVU':>13} {'L0':>6}")
    for name, (seconds, rate, fvu, l0) in rows.items():
        median = statistics.median(results[name])
        print(f"{name:10} {seconds:8.2f} {median:9.2f} {rate:10.0f} {fvu:13.4f} {l0:6.1f}")
    for name, (*_, l0) in rows.items():  # TopK: every held-out row must have exactly k active latents
        if abs(l0 - args.k) > 0.05 * args.k:
            raise SystemExit(
                f"{name} reached L0 {l0:.2f}, not k={args.k}: the FVU comparison would be unfair"
            )
    print(f"L0 check: both at k={args.k} (ours {rows['ours'][3]:.2f}, SAELens {rows['SAELens'][3]:.2f})")
    ratio = rows["ours"][1] / rows["SAELens"][1]
    print(f"throughput ratio ours / SAELens: {ratio:.2f}× (target ≥ 1.5×); FVU ours − SAELens: "
          f"{rows['ours'][2] - rows['SAELens'][2]:+.4f} (target ≤ 0)")  # fmt: skip


if __name__ == "__main__":
    main()
