"""Cross-layer transcoders (issue 32): training speed and replacement-model quality against per-layer transcoders.

1. Throughput: a CLT of F latents per layer and per-layer transcoders of F latents each (the same total latents,
   L · F) train on the same activation batches of the same model, in the same run, through the same trainer
   (``train_saes``), at each TopK k of ``--speed-ks``; the CLT twice: its sparse TopK step (gradient only at the
   chosen latents, embedding_bag decoders) and the dense formulation it replaced (``sparse_training = False``),
   after checking that one step of each gives the same weights. Runs rotate which goes first; best-of and median
   tokens/s are printed with the ratios.
2. Quality at matched mean L0 (``--quality``): TopK CLTs and TopK per-layer transcoders at the same k (so the same
   L0 per layer and token) trained on the same tokens; each scored as a replacement model on held-out rows
   (every MLP replaced at once, errors off): KL against the model, next-token CE, the share of the loss gain over
   the training tokens' unigram kept.

    python benchmarks/clt.py                             # code-tiny (zoo, trained if absent), F = 256
    python benchmarks/clt.py --quality --ks 2,4,8,16     # + KL at matched L0
    python benchmarks/clt.py --model DIR --d-sae 1024    # any model reference, any dataset reference (--data)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench.circuits.sae.analysis import packed_token_tensor
from workbench.circuits.sae.base import SAEConfig
from workbench.circuits.sae.clt import CLTConfig
from workbench.circuits.sae.clt_analysis import evaluate_transcoders, matched_layers
from workbench.circuits.sae.train import TrainConfig, seeded_clt, seeded_sae, train_saes
from workbench.datasets import load_dataset
from workbench.references import resolve_model
from workbench.workspace import Workspace


def capture(model, ids: torch.Tensor, mask: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """{hook: [real tokens, d]} (float32) of the rows ids [n, pos]."""
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for start in range(0, len(ids), 16):
        batch = {"input_ids": ids[start : start + 16], "attention_mask": mask[start : start + 16]}
        with torch.no_grad(), model.capture(hooks) as cache:
            model(batch)
        for h in hooks:
            parts[h].append(cache[h][batch["attention_mask"].bool()].float())
    return {h: torch.cat(v) for h, v in parts.items()}


def batches(
    acts: dict[str, torch.Tensor], rows: int, steps: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = len(next(iter(acts.values())))
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(rows * steps // n + 1)])
    return [{h: v[order[i * rows : (i + 1) * rows]] for h, v in acts.items()} for i in range(steps)]


def models(kind: str, layers: list[int], d_model: int, d_sae: int, k: int | None):
    """A CLT (F = d_sae per layer; kind "clt_dense": trained through the dense TopK formulation) or per-layer
    transcoders (d_sae each): same total latents."""
    activation = "topk" if k else "jumprelu"
    if kind in ("clt", "clt_dense"):
        cfg = CLTConfig(len(layers), d_model, d_sae, activation=activation, k=k, layers=layers)
        clt = seeded_clt(cfg, 0)
        clt.sparse_training = kind == "clt"
        return {"clt": clt}
    return {f"L{layer}": seeded_sae(SAEConfig(activation, d_in=d_model, d_sae=d_sae, k=k,
                                              hook_in=f"blocks.{layer}.ln2.hook_normalized",
                                              hook_out=f"blocks.{layer}.hook_mlp_out"), layer)
            for layer in layers}  # fmt: skip


def step_gradients(clt, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prediction and every parameter's gradient of one squared-error step of ``clt`` on x, y [L, rows, d]."""
    _, prediction, _, _ = clt.training_forward(x)
    (y - prediction).pow(2).sum(-1).sum(0).mean().backward()
    grads = {name: p.grad for name, p in clt.named_parameters() if p.grad is not None}
    return grads | {"prediction": prediction.detach()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="code-tiny")
    parser.add_argument("--data", default="zoo:python-stdlib")
    parser.add_argument("--max-tokens", type=int, default=32_768)
    parser.add_argument("--d-sae", type=int, default=256, help="latents per layer")
    parser.add_argument("--speed-ks", default="8,16", help="TopK k of the throughput runs (0: JumpReLU)")
    parser.add_argument("--rows", type=int, default=512, help="activation rows per step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--ks", default="2,4,8,16")
    parser.add_argument("--quality-steps", type=int, default=600)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workspace = Workspace().ensure()
    if args.model == "code-tiny":
        from workbench.zoo.train import train_zoo_model

        train_zoo_model("code-tiny", workspace, progress=False)
    model = resolve_model(args.model, workspace=workspace).eval()
    layers, hook_in, hook_out = matched_layers(model, "blocks.*.ln2.hook_normalized", "blocks.*.hook_mlp_out")
    hooks = [f"blocks.{layer}.{h}" for layer in layers for h in (hook_in, hook_out)]
    data = load_dataset(args.data)
    ids, mask = packed_token_tensor(model, data, max_tokens=args.max_tokens, context_length=64, batch_size=16)
    split = len(ids) * 3 // 4
    acts = capture(model, ids[:split], mask[:split], hooks)
    n_train = len(next(iter(acts.values())))
    d_model = model.cfg.d_model
    print(f"{model.cfg.name}: {len(layers)} layers, d_model {d_model}; {n_train} training tokens of {data.name!r}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip

    stream = batches(acts, args.rows, args.steps)
    train = TrainConfig(steps=args.steps, lr=3e-3, warmup_steps=1, progress=False)
    kinds = ("clt", "clt_dense", "per_layer")
    labels = {"clt": f"CLT ({len(layers)} × {args.d_sae} latents), sparse TopK step",
              "clt_dense": f"CLT ({len(layers)} × {args.d_sae} latents), dense TopK step",
              "per_layer": f"per-layer transcoders ({len(layers)} × {args.d_sae})"}  # fmt: skip
    for k in [int(v) or None for v in args.speed_ks.split(",") if v]:  # --speed-ks "": quality only
        if k:  # the sparse and the dense CLT step: the same prediction and gradients on the first batch
            x, y = (
                torch.stack([stream[0][f"blocks.{layer}.{h}"] for layer in layers])
                for h in (hook_in, hook_out)
            )
            sparse, dense = (step_gradients(models(kind, layers, d_model, args.d_sae, k)["clt"], x, y)
                             for kind in ("clt", "clt_dense"))  # fmt: skip
            for name, value in sparse.items():
                torch.testing.assert_close(value, dense[name], rtol=1e-4, atol=1e-6, msg=name)
        timings: dict[str, list[float]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):
            for kind in kinds[repeat % 3 :] + kinds[: repeat % 3]:
                saes = models(kind, layers, d_model, args.d_sae, k)
                start = time.perf_counter()
                train_saes(saes, stream, train)
                timings[kind].append(args.rows * args.steps / (time.perf_counter() - start))
        what = f"TopK k={k}" if k else "JumpReLU"
        for kind in kinds if k else ("clt", "per_layer"):
            print(f"{labels[kind]}, {what}: best {max(timings[kind]):,.0f} tokens/s, median "
                  f"{statistics.median(timings[kind]):,.0f} tokens/s")  # fmt: skip
        best = {kind: max(values) for kind, values in timings.items()}
        print(f"{what}: CLT / per-layer tokens/s (best of {args.repeats}) {best['clt'] / best['per_layer']:.2f}"
              + (f"; sparse / dense CLT step {best['clt'] / best['clt_dense']:.2f}" if k else ""))  # fmt: skip

    if not args.quality:
        return
    counts = torch.bincount(ids[:split][mask[:split].bool()], minlength=model.cfg.d_vocab)
    unigram = (counts, f"the {int(counts.sum())} training tokens")
    print("k   kind        mean L0   KL       CE repl   CE model  gain kept  FVU per layer")
    for k in [int(v) for v in args.ks.split(",")]:
        stream = batches(acts, args.rows, args.quality_steps, seed=1)
        for kind in ("clt", "per_layer"):
            saes = train_saes(models(kind, layers, d_model, args.d_sae, k), stream,
                              TrainConfig(steps=args.quality_steps, lr=3e-3, warmup_steps=20, progress=False,
                                          dead_after_tokens=10 * args.rows)).saes  # fmt: skip
            transcoders = saes["clt"].eval() if kind == "clt" else [s.eval() for s in saes.values()]
            frames = evaluate_transcoders(model, transcoders, ids[split:], mask[split:], sae_id=kind,
                                          dataset=data.name, unigram=unigram)  # fmt: skip
            row = frames["transcoder_replacement"].iloc[0]
            fvu = " ".join(f"{v:.3f}" for v in frames["sae_evals"]["FVU"])
            print(f"{k:<3} {kind:<11} {row['mean_L0']:<9.2f} {row['kl']:<8.4f} {row['ce_replacement']:<9.4f} "
                  f"{row['ce_clean']:<9.4f} {row['gain_kept']:<10.3f} {fvu}")  # fmt: skip


if __name__ == "__main__":
    main()
