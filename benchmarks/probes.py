"""Batched probes vs scikit-learn: the same captured activations, all layers of a zoo model, same regularisation.

Ours: one :func:`probes.linear.fit_probes` call over every site (standardised inputs, L2 = ``--l2`` on the mean
loss). sklearn: ``StandardScaler`` + ``LogisticRegression(C=1 / (l2 · n_train))`` — the same objective — fitted
site by site with its defaults (lbfgs, tol 1e-4, max_iter 100; raised to 1000 so it converges). Prints the
wall time of each, the ratio, and held-out accuracy per site.

    python benchmarks/probes.py [--model code-small --label-set next_token_type --n-sequences 256]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `probes` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="code-small", help="zoo model (trained into the workspace if missing)"
    )
    parser.add_argument("--workspace", default="workspace")
    parser.add_argument("--label-set", default="next_token_type")
    parser.add_argument("--n-sequences", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from probes.analysis import _split, collect_activations, label_dataset
    from probes.linear import fit_probes
    from workbench.checkpoints import CheckpointSeries
    from workbench.workspace import Workspace
    from workbench.zoo.train import train_zoo_model

    workspace = Workspace(args.workspace).ensure()
    train_zoo_model(args.model, workspace, progress=True)
    series = CheckpointSeries.from_directory(workspace.model_dir(args.model))
    model = series.load(series.steps[-1])
    dataset = label_dataset(args.label_set, tokenizer=model.tokenizer, n_sequences=args.n_sequences,
                            seq_len=args.seq_len)  # fmt: skip
    hooks, x, labels, _, sequence = collect_activations(
        model, dataset, ["hook_embed", "blocks.*.hook_resid_post"]
    )
    train, test = _split(sequence, 0.25, 0)
    n_train = int(train.sum())
    print(f"{args.model} step {series.steps[-1]}: {len(hooks)} sites × {n_train} train tokens × d={x.shape[-1]}, "
          f"{labels.unique().numel()} classes ({args.label_set}); torch threads {torch.get_num_threads()}")  # fmt: skip

    ours_times, sklearn_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        probes = fit_probes(x[:, train], labels[train], l2=args.l2)
        ours_times.append(time.perf_counter() - start)
        ours = probes.score(x[:, test], labels[test]).tolist()
        start = time.perf_counter()
        reference = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for site in range(len(hooks)):
                pipeline = make_pipeline(
                    StandardScaler(), LogisticRegression(C=1 / (args.l2 * n_train), max_iter=1000)
                )
                pipeline.fit(x[site, train].numpy(), labels[train].numpy())
                reference.append(pipeline.score(x[site, test].numpy(), labels[test].numpy()))
        sklearn_times.append(time.perf_counter() - start)
    ours_s, sklearn_s = min(ours_times), min(sklearn_times)
    print(f"ours (batched, {probes.iterations} L-BFGS iterations): {ours_s:.3f} s")
    print(f"sklearn (site by site):                 {sklearn_s:.3f} s")
    print(f"speed-up: {sklearn_s / ours_s:.1f}×")
    print(f"{'site':28} {'ours':>7} {'sklearn':>7} {'diff (points)':>14}")
    for hook, a, b in zip(hooks, ours, reference, strict=True):
        print(f"{hook:28} {a:7.4f} {b:7.4f} {100 * (a - b):14.2f}")
    print(
        f"max |accuracy difference|: {100 * max(abs(a - b) for a, b in zip(ours, reference, strict=True)):.2f} points"
    )


if __name__ == "__main__":
    main()
