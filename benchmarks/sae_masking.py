"""Outlier-token masking for SAE training: FVU and dead latents with and without, on a model with a sink token.

Every packed row starts with the model's BOS / [CLS] token (a fixed first token). The workbench's massive-activation
detector (``workbench.analyses.massive.analysis.detect_massive``) names where the largest residual entries sit; the row-norm ratio
(or of its largest entry: post-LayerNorm models keep norms alike) of position 0 to the median says how far
that token is from the rest. Then the same TopK SAE (same seed, steps,
batch, lr) is trained on the same activations three times — on every token, with the outlier tokens excluded
(``TrainConfig.outlier_norm``), and with them capped — and scored on held-out sequences: FVU over the ordinary
tokens (position > 0), FVU over all tokens, L0 and the fraction of dead latents (never firing on the held-out
tokens).

    python benchmarks/sae_masking.py                                    # MiniLM, blocks.3.hook_resid_post
    python benchmarks/sae_masking.py --model code-tiny --workspace WS --hook blocks.1.hook_resid_post
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from workbench.analyses.massive.analysis import detect_massive
from workbench.circuits.sae.base import SAEConfig
from workbench.circuits.sae.train import TrainConfig, row_size, seeded_sae, train_saes
from workbench.datasets import load_dataset
from workbench.references import resolve_model


def capture(model, hook: str, data: str, max_tokens: int, context: int):
    """(rows [n, d], position [n], sequence [n]) of every real token of BOS-prefixed packed rows."""
    ids, mask = load_dataset(data).token_tensor(model.tokenizer, context_length=context, packing=True, bos=True,
                                                max_tokens=max_tokens)  # fmt: skip
    rows, positions, sequences = [], [], []
    for start in range(0, len(ids), 16):
        chunk, keep = ids[start : start + 16], mask[start : start + 16].bool()
        with torch.no_grad(), model.capture(hook) as cache:
            model(chunk, attention_mask=keep.long())
        rows.append(cache[hook][keep].float())
        grid = torch.arange(chunk.shape[1]).expand_as(chunk)
        positions.append(grid[keep])
        sequences.append((torch.arange(len(chunk))[:, None] + start).expand_as(chunk)[keep])
    return torch.cat(rows), torch.cat(positions), torch.cat(sequences), ids[:64]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--workspace", default=None)
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--data", default="zoo:python-stdlib")
    parser.add_argument("--max-tokens", type=int, default=60_000)
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--factor", type=float, default=None, help="outlier_norm (default: halfway, in log, "
                        "between the 99.9th percentile of ordinary tokens and position 0's median norm)")  # fmt: skip
    parser.add_argument(
        "--metric", default="norm", help="norm, or max (largest |entry|: post-LayerNorm models)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resolve_model(args.model, workspace=args.workspace).eval()
    x, position, sequence, probe_ids = capture(
        model, args.hook, args.data, args.max_tokens, args.context_length
    )
    report = detect_massive(model, probe_ids, args.hook, context_length=args.context_length)
    top = report.top.head(3)
    print(f"{args.model} {args.hook}: {len(x)} tokens, d={x.shape[1]}; detector's top entries:")
    print(
        top[[c for c in ("value", "position", "token", "dimension", "ratio") if c in top.columns]].to_string()
    )
    factor = args.factor
    for metric in ("norm", "max"):
        sizes = row_size(x, metric)
        median = float(sizes.median())
        first, ordinary = sizes[position == 0], sizes[position > 0]
        ratio_first = float(first.median()) / median
        p999 = float(ordinary.quantile(0.999)) / median
        print(f"row {metric} / median: position 0 {ratio_first:.2f}x (min {float(first.min()) / median:.2f}x), "
              f"ordinary tokens p99.9 {p999:.2f}x, max {float(ordinary.max()) / median:.2f}x")  # fmt: skip
        if metric == args.metric and factor is None:
            factor = float((ratio_first * p999) ** 0.5)
    print(f"outlier_norm = {factor:.2f} on the row {args.metric}")
    held = sequence >= int(sequence.max() * 0.75)
    train, test = x[~held], x[held]
    test_ordinary = test[position[held] > 0]
    generator = torch.Generator().manual_seed(0)

    def stream():
        while True:
            yield train[torch.randint(len(train), (args.batch,), generator=generator)]

    results = []
    masking = {"outlier_norm": factor, "outlier_metric": args.metric}
    for label, extra in (("all tokens", {}), ("exclude outliers", masking),
                         ("cap outliers", masking | {"outlier_action": "cap"})):  # fmt: skip
        generator.manual_seed(0)
        cfg = SAEConfig(
            "topk", d_in=x.shape[1], d_sae=args.expansion * x.shape[1], k=args.k, hook_in=args.hook
        )
        train_cfg = TrainConfig(steps=args.steps, lr=3e-3, warmup_steps=20, progress=False,
                                dead_after_tokens=10 * args.batch, **extra)  # fmt: skip
        began = time.perf_counter()
        result = train_saes({"sae": seeded_sae(cfg, 0)}, stream(), train_cfg)
        seconds = time.perf_counter() - began
        sae = result.saes["sae"].eval()
        with torch.no_grad():
            f_all = sae.encode(test)
            fvu_all = float((sae.decode(f_all) - test).pow(2).sum() / (test - test.mean(0)).pow(2).sum())
            f_ord = sae.encode(test_ordinary)
            fvu_ord = float((sae.decode(f_ord) - test_ordinary).pow(2).sum()
                            / (test_ordinary - test_ordinary.mean(0)).pow(2).sum())  # fmt: skip
        masked = result.history["sae"][-1].get("masked", 0.0)
        results.append({"training": label, "FVU ordinary tokens": fvu_ord, "FVU all tokens": fvu_all,
                        "L0": float((f_ord > 0).sum(-1).float().mean()),
                        "dead fraction": float((f_all > 0).sum(0).eq(0).float().mean()),
                        "masked (last batch)": masked, "seconds": seconds})  # fmt: skip
    print(pd.DataFrame(results).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
