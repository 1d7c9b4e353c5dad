"""Batched probes vs scikit-learn: the same captured activations, all layers of a zoo model, same regularisation.

Ours: one :func:`probes.linear.fit_probes` call over every site (standardised inputs, L2 = ``--l2`` on the mean
loss). sklearn: ``StandardScaler`` + ``LogisticRegression(C=1 / (l2 · n_train))`` — the same objective — fitted
site by site with lbfgs. Both get the same stopping rule per site: at most ``--max-iter`` iterations, and done when
the largest (projected-)gradient entry of that site's mean objective is ≤ ``--tol`` (ours: a per-site L-BFGS whose
converged sites leave the batch). ``--ours-tol`` tightens ours only, to time ours reaching sklearn's objective at
every site. Nothing is silenced: sklearn's convergence warnings are counted and printed. Each side is timed in
every configuration this 2-core machine allows, all interleaved within each repeat: ours at torch's default
thread count (that many worker threads over the sites) and at one thread; sklearn site by site at BLAS's default
thread count (``--skip-sklearn-blas-threads`` leaves this one out: OpenBLAS is 3–18× slower with 2 threads on
these skinny matrices) and at one, and over 2 joblib workers (threads, and loky processes warmed before timing)
with one BLAS thread each. Every configuration of a side must give the same fit (asserted); the headline ratio
compares the best of each, and the load average is printed before and after. Prints the wall times (best of
``--repeats``), the ratios and, per site, the held-out accuracy of both, the iterations (sklearn's ``n_iter_``,
ours ``site_iterations``) and the training objective each reached (the same float64 formula for both, so a
positive gap means ours stopped above sklearn's point), with a summary of the gaps.

    python benchmarks/probes.py [--model code-small --label-set next_token_type --n-sequences 256]
    python benchmarks/probes.py --synthetic --d 768 --layers 12 --checkpoints 8 --repeats 1   # real shape
    python benchmarks/probes.py --synthetic --n-tokens 2048 --max-iter 200 --repeats 1 --scaling 12 24 48 96
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `probes` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def objective(z: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, l2: float) -> float:
    """Mean multinomial cross-entropy + l2/2 ‖W‖² in float64: z [n, d], y [n] class indices, weight [d, C]."""
    logits = z.astype(np.float64) @ weight.astype(np.float64) + bias.astype(np.float64)
    top = logits.max(1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return float(
        (lse - logits[np.arange(len(y)), y]).mean() + 0.5 * l2 * (weight.astype(np.float64) ** 2).sum()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="code-small", help="zoo model (trained into the workspace if missing)"
    )
    parser.add_argument("--workspace", default="workspace")
    parser.add_argument("--label-set", default="next_token_type")
    parser.add_argument("--n-sequences", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=1000, help="iteration cap, both sides")
    parser.add_argument("--tol", type=float, default=1e-4, help="gradient tolerance, both sides")
    parser.add_argument(
        "--ours-tol", type=float, default=None, help="gradient tolerance for ours only (default --tol)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-sklearn-blas-threads", action="store_true",
        help="leave out sklearn site by site at the default BLAS thread count (3–18× slower than 1 thread here)",
    )  # fmt: skip
    parser.add_argument(
        "--synthetic", action="store_true", help="real-shape synthetic sites instead of a zoo model"
    )
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--n-tokens", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument(
        "--scaling", type=int, nargs="+", default=None,
        help="site counts (e.g. 12 24 48 96): time both sides (1 thread) on evenly spaced subsets of the sites "
        "and fit the growth exponent of the total time in the number of sites, instead of the headline run",
    )  # fmt: skip
    args = parser.parse_args()

    from sklearn.exceptions import ConvergenceWarning

    from workbench.checkpoints import CheckpointSeries
    from workbench.probes.analysis import collect_activations, label_dataset, split_by_sequence
    from workbench.probes.linear import fit_probes
    from workbench.workspace import Workspace
    from workbench.zoo.train import train_zoo_model

    if args.synthetic:
        hooks, x, labels, sequence = synthetic_sites(args)
        source = f"synthetic {args.checkpoints} checkpoints × {args.layers} layers"
    else:
        workspace = Workspace(args.workspace).ensure()
        train_zoo_model(args.model, workspace, progress=True)
        series = CheckpointSeries.from_directory(workspace.model_dir(args.model))
        model = series.load(series.steps[-1])
        dataset = label_dataset(args.label_set, tokenizer=model.tokenizer, n_sequences=args.n_sequences,
                                context_length=args.context_length)  # fmt: skip
        hooks, x, labels, _, sequence = collect_activations(
            model, dataset, ["hook_embed", "blocks.*.hook_resid_post"]
        )
        source = f"{args.model} step {series.steps[-1]}"
    train, test = split_by_sequence(sequence, 0.25, 0)
    x_train, y_train = x[:, train].contiguous(), labels[train]
    x_test, y_test = x[:, test].contiguous(), labels[test]
    np_train = [x_train[site].numpy() for site in range(len(hooks))]
    n_train = int(train.sum())
    ours_tol = args.tol if args.ours_tol is None else args.ours_tol
    print(f"{source}: {len(hooks)} sites × {n_train} train tokens × d={x.shape[-1]}, "
          f"{labels.unique().numel()} classes ({args.label_set}); torch threads {torch.get_num_threads()}; "
          f"max_iter {args.max_iter}, tol {args.tol:g} (sklearn) / {ours_tol:g} (ours); "
          f"load average {_load()}")  # fmt: skip

    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    if args.scaling:
        scaling(args, x_train, y_train, n_train)
        return

    def fit_ours():
        return fit_probes(x_train, y_train, l2=args.l2, max_iter=args.max_iter, tol=ours_tol)

    def fit_sklearn(backend: str | None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if backend is None:
                pipelines = [sklearn_site(site_x, y_numpy, args) for site_x in np_train]
            else:  # sites split over 2 workers, each with one BLAS thread (loky limits its workers' BLAS itself)
                pipelines = Parallel(n_jobs=2, backend=backend)(
                    delayed(sklearn_site)(site_x, y_numpy, args) for site_x in np_train
                )
        return pipelines, caught

    # Every configuration of each side on this 2-core machine, interleaved within each repeat; the headline compares
    # the best of each. Ours: torch at the default thread count (its sites evaluated by that many worker threads)
    # and at one. sklearn: site by site with BLAS at the default thread count and at one (its OpenBLAS can be much
    # faster single-threaded on skinny matrices), and the sites split over 2 joblib workers (threads; loky
    # processes, whose start-up is warmed before timing) with one BLAS thread each.
    y_numpy = y_train.numpy()
    threads = torch.get_num_threads()
    configs: list[tuple[str, str, int, Callable[[], Any]]] = [
        ("ours", f"{threads} threads", threads, fit_ours),
        ("ours", "1 thread", 1, fit_ours),
        ("sklearn", "1 thread", 1, lambda: fit_sklearn(None)),
        ("sklearn", "joblib threads ×2", 1, lambda: fit_sklearn("threading")),
        ("sklearn", "joblib loky ×2", 1, lambda: fit_sklearn("loky")),
    ]
    if not args.skip_sklearn_blas_threads:
        configs.insert(3, ("sklearn", f"{threads} BLAS threads", threads, lambda: fit_sklearn(None)))
    with threadpool_limits(1):  # start loky's workers (and their imports) in the setting they are timed in
        Parallel(n_jobs=2, backend="loky")(
            delayed(sklearn_site)(x[:256], y_numpy[:256], args) for x in np_train[:2]
        )
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[
        tuple[str, str], list[float]
    ] = {}  # this process's CPU seconds (all its threads; not loky's workers)
    results: dict[tuple[str, str], Any] = {}
    for _ in range(args.repeats):
        for side, name, count, fit in configs:
            torch.set_num_threads(count)
            with threadpool_limits(None if count == threads else 1):
                start, start_cpu = time.perf_counter(), time.process_time()
                results[side, name] = fit()
                times.setdefault((side, name), []).append(time.perf_counter() - start)
                cpu.setdefault((side, name), []).append(time.process_time() - start_cpu)
    torch.set_num_threads(threads)
    best = {
        side: min((min(v), name) for (s, name), v in times.items() if s == side)
        for side in ("ours", "sklearn")
    }
    probes = results["ours", "1 thread"]
    pipelines, caught = results["sklearn", "1 thread"]
    for (side, name), result in results.items():  # every configuration of a side gives the same fit
        if side == "ours":
            assert torch.equal(result.weight, probes.weight), name
        else:
            for ours_pipe, their_pipe in zip(pipelines, result[0], strict=True):
                np.testing.assert_allclose(their_pipe[-1].coef_, ours_pipe[-1].coef_, rtol=0, atol=1e-12)
    capped = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    ours = probes.score(x_test, y_test).tolist()
    site_iterations = probes.site_iterations.tolist()
    ours_capped = sum(count >= args.max_iter for count in site_iterations)
    (ours_s, ours_config), (sklearn_s, sklearn_config) = best["ours"], best["sklearn"]
    print(f"load average after: {_load()}")
    print(f"ours (per-site L-BFGS in one batch, iterations {min(site_iterations)}–{max(site_iterations)}, "
          f"{ours_capped} sites at the cap); sklearn (site by site, {capped} convergence warnings)")  # fmt: skip
    for (side, name), values in times.items():
        seconds = "in other processes" if "loky" in name else _times(cpu[side, name])
        print(f"  {side:8} {name:20}: best {min(values):.3f} s (runs: {_times(values)}; CPU s: {seconds})")
    print(f"speed-up, best of each: {sklearn_s / ours_s:.2f}× (ours {ours_config}, sklearn {sklearn_config})")
    one = min(times[("sklearn", "1 thread")]) / min(times[("ours", "1 thread")])
    print(f"speed-up, both at 1 thread: {one:.2f}×")
    # under a load above the core count the wall times measure the scheduler's share as much as the work; the
    # CPU seconds of the in-process configurations do not
    one_cpu = min(cpu[("sklearn", "1 thread")]) / min(cpu[("ours", "1 thread")])
    print(f"CPU seconds, both at 1 thread (best of each): {one_cpu:.2f}×")
    header = f"{'site':26} {'ours':>7} {'sklearn':>7} {'diff pt':>8} {'it ours':>8} {'it skl':>7} {'objective gap':>14}"
    print(header)
    index = torch.unique(y_train, return_inverse=True)[1].numpy()
    diffs, gaps = [], []
    for site, hook in enumerate(hooks):
        pipeline = pipelines[site]
        reference = pipeline.score(x_test[site].numpy(), y_test.numpy())
        z_ours = ((x_train[site] - probes.mean[site]) / probes.scale[site]).numpy()
        ours_objective = objective(
            z_ours, index, probes.weight[site].numpy(), probes.bias[site].numpy(), args.l2
        )
        scaler, logistic = pipeline[0], pipeline[-1]
        sklearn_objective = objective(
            scaler.transform(np_train[site]), index, logistic.coef_.T, logistic.intercept_, args.l2
        )
        diffs.append(100 * (ours[site] - reference))
        gaps.append(ours_objective - sklearn_objective)
        print(f"{hook:26} {ours[site]:7.4f} {reference:7.4f} {diffs[-1]:8.2f} {site_iterations[site]:8d} "
              f"{int(logistic.n_iter_[0]):7d} {gaps[-1]:14.2e}")  # fmt: skip
    print(f"max |accuracy difference|: {max(abs(d) for d in diffs):.2f} points")
    print(
        f"objective gap ours − sklearn: min {min(gaps):.1e}, median {float(np.median(gaps)):.1e}, "
        f"max {max(gaps):.1e}; ours lower at {sum(g <= 0 for g in gaps)} of {len(gaps)} sites"
    )
    ours_iterations, sklearn_iterations = sum(site_iterations), sum(int(p[-1].n_iter_[0]) for p in pipelines)
    print(f"iterations summed over sites: ours {ours_iterations}, sklearn {sklearn_iterations}")


def sklearn_site(x: np.ndarray, y: np.ndarray, args: argparse.Namespace):
    """sklearn's fit of one site: StandardScaler + LogisticRegression(C=1 / (l2 · n)) with lbfgs (module-level, so
    joblib's loky workers get the site's array, memory-mapped, and not the whole benchmark)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    logistic = LogisticRegression(C=1 / (args.l2 * len(y)), max_iter=args.max_iter, tol=args.tol)
    return make_pipeline(StandardScaler(), logistic).fit(x, y)


def scaling(args, x_train: torch.Tensor, y_train: torch.Tensor, n_train: int) -> None:
    """Cost per site as the sites grow: for each count k in ``--scaling``, every (sites / k)-th site (the same mix
    of layers and checkpoints at each size), both sides at one thread, interleaved, best of ``--repeats``; the
    growth exponent b of total time ∝ sites^b fitted by least squares on the logs (1 = linear)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from workbench.probes.linear import fit_probes

    torch.set_num_threads(1)
    total = x_train.shape[0]
    rows = []
    for count in args.scaling:
        pick = torch.arange(0, total, max(1, total // count))[:count]
        x = x_train[pick].contiguous()
        best = {"ours": math.inf, "sklearn": math.inf}
        for _ in range(args.repeats):
            with threadpool_limits(1):
                start = time.perf_counter()
                fit_probes(x, y_train, l2=args.l2, max_iter=args.max_iter, tol=args.tol)
                best["ours"] = min(best["ours"], time.perf_counter() - start)
                start = time.perf_counter()
                for site in range(count):
                    make_pipeline(StandardScaler(), LogisticRegression(C=1 / (args.l2 * n_train),
                                                                       max_iter=args.max_iter, tol=args.tol)
                                  ).fit(x[site].numpy(), y_train.numpy())  # fmt: skip
                best["sklearn"] = min(best["sklearn"], time.perf_counter() - start)
        rows.append((count, best["ours"], best["sklearn"]))
        print(f"{count:4d} sites: ours {best['ours']:.2f} s ({1000 * best['ours'] / count:.1f} ms/site), sklearn "
              f"{best['sklearn']:.2f} s ({1000 * best['sklearn'] / count:.1f} ms/site), ratio "
              f"{best['sklearn'] / best['ours']:.2f}×; load average {_load()}")  # fmt: skip
    logs = np.log(np.array([[c, o, s] for c, o, s in rows], dtype=np.float64))
    for column, side in ((1, "ours"), (2, "sklearn")):
        exponent = np.polyfit(logs[:, 0], logs[:, column], 1)[0]
        print(f"{side}: total time ∝ sites^{exponent:.2f} ({args.scaling[0]} → {args.scaling[-1]} sites)")


def synthetic_sites(args) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real-shape probe sites (d × layers × checkpoints, e.g. Pythia-160m's 768 × 12 × 8): at each site the class
    means differ along a few random directions with a strength that grows with layer and checkpoint, plus unit
    noise -> (site names, x [sites, n, d], labels [n], sequence [n] in 64-token sequences)."""
    g = torch.Generator().manual_seed(0)
    n = args.n_tokens * 5 // 4
    labels = torch.randint(args.classes, (n,), generator=g)
    names, sites = [], []
    for step in range(args.checkpoints):
        for layer in range(args.layers):
            means = (
                torch.randn(args.classes, args.d, generator=g) * 0.05 * (1 + layer) * (1 + step) / args.layers
            )
            sites.append(means[labels] + torch.randn(n, args.d, generator=g))
            names.append(f"step{step}.blocks.{layer}.hook_resid_post")
    return names, torch.stack(sites), labels, torch.arange(n) // 64


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _times(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
