"""Graph explorer on a big stored graph: server-side pruning, bytes sent, Chromium first paint, server memory.

A synthetic attribution graph of ``--nodes`` nodes (default 20 000: 12 layers × 40 positions of error nodes, 40
token nodes, 10 logit targets, the rest features) and ``--edges`` edges (default 2 000 000; each feature reads
features of lower layers, errors and tokens; the targets read features) is stored in a fresh workspace through the
attribution store's declared tables (the same ``write_tables`` the CLI uses), its node influence computed from the
targets' weights, so it reads back as any traced graph. Then:

1. In this process: ``load_stored_graph`` (the sparse adjacency from the edge table), ``prune_sparse`` and
   ``subgraph`` at the default thresholds (0.8, 0.98) — seconds, and the process's RSS growth. The peer: the
   library's dense ``prune`` on a ``--dense-nodes`` slice of the same graph (the dense [n, n] matrix the page used
   before: 20 000² float64 is 3.2 GB), both asserting the same kept nodes and edges first, with the ratio.
2. Bytes sent: the plotly figure the page sends (``graph_figure(...).to_json()``) against the whole unpruned graph
   as circuit-tracer's local server sends it (its graph JSON: every node and link; links sized from a sample).
3. A real ``workbench dashboard`` on the workspace and Debian's chromium through Playwright: the graph page opened
   cold (the server reads and prunes the graph) and warm (a new browser session, the server's caches filled);
   per visit the browser's first contentful paint and the time until the graph's WebGL plot is drawn; the server
   process tree's RSS before the first visit and after the last (target: first paint ≤ 3 s, RSS growth ≤ 500 MB).

    python benchmarks/graph_explorer.py [--nodes 20000] [--edges 2000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
import torch

from workbench.analysis import write_tables
from workbench.app.graph_explorer import (
    dense_graph,
    graph_figure,
    influence_sparse,
    load_stored_graph,
    normalised_sparse,
    prune_sparse,
    subgraph,
)
from workbench.circuits.attribution.pruning import prune
from workbench.circuits.attribution.store import ANALYSIS
from workbench.workspace import Workspace

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
N_LAYERS, N_POS, N_TARGETS = 12, 40, 10


def synthetic_graph(n_nodes: int, n_edges: int, seed: int = 0) -> tuple[pd.DataFrame, sp.csr_matrix]:
    """The node table and adjacency [n_nodes, n_nodes] (row target ← column source) of an acyclic graph in the
    store's node order: features (layer-sorted), errors (layer-major), tokens, targets."""
    rng = np.random.default_rng(seed)
    n_errors = N_LAYERS * N_POS
    n_features = n_nodes - n_errors - N_POS - N_TARGETS
    f_layer = np.sort(rng.integers(0, N_LAYERS, n_features))
    f_pos = rng.integers(0, N_POS, n_features)
    e_layer, e_pos = np.repeat(np.arange(N_LAYERS), N_POS), np.tile(np.arange(N_POS), N_LAYERS)
    errors0, tokens0, targets0 = n_features, n_features + n_errors, n_features + n_errors + N_POS
    first_of_layer = np.searchsorted(f_layer, np.arange(N_LAYERS + 1))
    # feature rows: sources among features of lower layers (70 %), errors of lower layers (20 %), tokens (10 %)
    drawn = int(n_edges * 1.25)  # duplicates are dropped below
    n_target_edges = min(drawn // 20, N_TARGETS * n_features)
    n_feature_edges = drawn - n_target_edges
    targets = rng.integers(first_of_layer[1], n_features, n_feature_edges)
    kind = rng.random(n_feature_edges)
    below = first_of_layer[f_layer[targets]]
    sources = (rng.random(n_feature_edges) * below).astype(np.int64)
    err = kind > 0.7
    sources[err] = errors0 + (rng.random(err.sum()) * f_layer[targets[err]] * N_POS).astype(np.int64)
    tok = kind > 0.9
    sources[tok] = tokens0 + f_pos[targets[tok]]
    layer0 = rng.integers(0, first_of_layer[1], max(1, n_features // 4))  # layer-0 features read their token
    targets = np.concatenate([targets, layer0, targets0 + rng.integers(0, N_TARGETS, n_target_edges)])
    sources = np.concatenate([sources, tokens0 + f_pos[layer0], rng.integers(0, n_features, n_target_edges)])
    pairs = np.unique(targets * n_nodes + sources)  # distinct (target, source); the generator oversamples
    pairs = pairs[np.sort(rng.choice(len(pairs), min(n_edges, len(pairs)), replace=False))]
    targets, sources = pairs // n_nodes, pairs % n_nodes
    weights = rng.standard_normal(len(targets)) * np.exp(rng.standard_normal(len(targets)))
    adjacency = sp.csr_matrix((weights, (targets, sources)), shape=(n_nodes, n_nodes))
    kinds = ["feature"] * n_features + ["error"] * n_errors + ["token"] * N_POS + ["target"] * N_TARGETS
    probabilities = np.sort(rng.dirichlet(np.ones(N_TARGETS)))[::-1]
    target_weights = np.zeros(n_nodes)
    target_weights[targets0:] = probabilities
    nodes = pd.DataFrame({
        "node": np.arange(n_nodes), "kind": kinds,
        "layer": np.concatenate([f_layer, e_layer, -np.ones(N_POS, int), np.full(N_TARGETS, N_LAYERS)]),
        "position": np.concatenate([f_pos, e_pos, np.arange(N_POS), np.full(N_TARGETS, N_POS - 1)]),
        "feature": np.concatenate([rng.integers(0, 16384, n_features), -np.ones(n_errors, int),
                                   rng.integers(0, 50000, N_POS), rng.integers(0, 50000, N_TARGETS)]),
        "activation": np.concatenate([rng.exponential(1.0, n_features), rng.exponential(1.0, n_errors),
                                      np.full(N_POS + N_TARGETS, np.nan)]),
        "value": rng.standard_normal(n_nodes), "constant": 0.0, "dropped": 0.0,
        "influence": influence_sparse(normalised_sparse(adjacency), target_weights),
    })  # fmt: skip
    nodes["label"] = [
        *(f"L{la} #{f} @{p}" for la, f, p in zip(f_layer, nodes["feature"][:n_features], f_pos, strict=True)),
        *(f"error L{la} @{p}" for la, p in zip(e_layer, e_pos, strict=True)),
        *(f"emb 't{p}' @{p}" for p in range(N_POS)),
        *(f"logit 'x{t}' p={p:.3f} @{N_POS - 1}" for t, p in enumerate(probabilities)),
    ]
    return nodes, adjacency


def store(
    workspace: Workspace, nodes: pd.DataFrame, adjacency: sp.csr_matrix, name: str = "synthetic"
) -> None:
    keys = {"model": "synthetic-model", "checkpoint": None, "graph": name}
    coo = adjacency.tocoo()
    summary = pd.DataFrame([keys | {
        "prompt": " ".join(f"t{p}" for p in range(N_POS)), "tokens": json.dumps(list(range(N_POS))),
        "targets": json.dumps([str(x) for x in nodes["label"].iloc[-N_TARGETS:]]), "transcoders": json.dumps([]),
        "max_feature_nodes": int((nodes["kind"] == "feature").sum()), "n_active": int((nodes["kind"] == "feature").sum()),
        "n_features": int((nodes["kind"] == "feature").sum()), "n_nodes": len(nodes), "n_edges": int(adjacency.nnz),
        "replacement_score": float("nan"), "completeness_score": float("nan"),
    }])  # fmt: skip
    edges = pd.DataFrame(
        {"target": coo.row.astype(np.int64), "source": coo.col.astype(np.int64), "weight": coo.data}
    )
    write_tables(workspace, ANALYSIS, {"attribution_graphs": summary, "attribution_nodes": nodes.assign(**keys),
                                       "attribution_edges": edges.assign(**keys)})  # fmt: skip


def rss_tree(pid: int) -> int:
    """Resident bytes of a process and its children."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def serve(workspace: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workbench = Path(sys.executable).with_name("workbench")
    command = [str(workbench), "dashboard", "--workspace", str(workspace), "--port", str(port)]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise SystemExit("error: the dashboard did not start")


def visit(browser, url: str) -> dict[str, float]:
    """One new browser session on the graph page: first contentful paint and graph drawn (s since navigation)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    start = time.perf_counter()
    page.goto(f"{url}/graph", wait_until="commit")
    page.get_by_text("pruned:").first.wait_for(timeout=600_000)
    counted = time.perf_counter() - start
    page.wait_for_function(
        "() => { const gd = document.querySelector('[data-testid=\"stPlotlyChart\"] .js-plotly-plot');"
        " return gd && gd._fullData && gd._fullData.length > 0 && gd.querySelector('canvas'); }",
        timeout=600_000,
    )
    drawn = time.perf_counter() - start
    paint = page.evaluate(  # the buffered paint entries; null when the browser reported none within 5 s
        """() => new Promise((resolve) => {
            const entry = performance.getEntriesByName('first-contentful-paint')[0];
            if (entry) return resolve(entry.startTime);
            new PerformanceObserver((list) => {
                const found = list.getEntriesByName('first-contentful-paint')[0];
                if (found) resolve(found.startTime);
            }).observe({type: 'paint', buffered: true});
            setTimeout(() => resolve(null), 5000);
        })"""
    )
    context.close()
    return {"first_contentful_paint_s": float("nan") if paint is None else paint / 1000, "counts_shown_s": counted,
            "graph_drawn_s": drawn}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20_000)
    parser.add_argument("--edges", type=int, default=2_000_000)
    parser.add_argument("--dense-nodes", type=int, default=3000, help="slice for the dense-prune comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workspace", default=None, help="where to store the graph (default: a temporary folder)"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.workspace or tempfile.mkdtemp(prefix="graph-bench-"))
    workspace = Workspace(root).ensure()
    t0 = time.perf_counter()
    nodes, adjacency = synthetic_graph(args.nodes, args.edges)
    print(f"synthetic graph: {len(nodes)} nodes, {adjacency.nnz} edges ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    store(workspace, nodes, adjacency)
    print(f"stored in {workspace.results_path} ({workspace.results_path.stat().st_size / 1e6:.0f} MB, "
          f"{time.perf_counter() - t0:.1f}s)")  # fmt: skip
    small_nodes, small_adjacency = synthetic_graph(
        args.dense_nodes, args.edges * args.dense_nodes // args.nodes, 1
    )
    store(workspace, small_nodes, small_adjacency, name="synthetic-small")
    del nodes, adjacency, small_nodes, small_adjacency

    # 1. the sparse side against the dense library prune on the small graph (equal results first)
    small = load_stored_graph(workspace, "synthetic-model", "synthetic-small")
    dense = dense_graph(small)
    t0 = time.perf_counter()
    want = prune(dense, 0.8, 0.98)
    dense_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = prune_sparse(small, 0.8, 0.98)
    sparse_s = time.perf_counter() - t0
    rows = np.repeat(np.arange(small.n_nodes), np.diff(small.adjacency.indptr))
    edges = np.zeros((small.n_nodes, small.n_nodes), dtype=bool)
    edges[rows[got.edges], small.adjacency.indices[got.edges]] = True
    assert np.array_equal(want.nodes.numpy(), got.nodes) and np.array_equal(want.edges.numpy(), edges)
    print(f"prune at {small.n_nodes} nodes / {small.adjacency.nnz} edges (equal kept nodes and edges): dense library "
          f"{dense_s:.3f}s, sparse {sparse_s:.3f}s, ratio {dense_s / sparse_s:.1f}x")  # fmt: skip
    del dense, small

    process = psutil.Process()
    before = process.memory_info().rss
    t0 = time.perf_counter()
    big = load_stored_graph(workspace, "synthetic-model", "synthetic")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruned = prune_sparse(big, 0.8, 0.98)
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shown = subgraph(big, 0.8, 0.98)
    subgraph_s = time.perf_counter() - t0
    rss_mb = (process.memory_info().rss - before) / 1e6
    print(f"{big.n_nodes} nodes, {big.adjacency.nnz} edges: read {load_s:.2f}s, prune {prune_s:.2f}s "
          f"({int(pruned.nodes.sum())} nodes, {int(pruned.edges.sum())} edges kept), pruned + capped subgraph "
          f"{subgraph_s:.2f}s ({len(shown.nodes)} nodes, {len(shown.edges)} edges sent"
          f"{', capped' if shown.capped else ''}); RSS growth in this process {rss_mb:.0f} MB")  # fmt: skip

    # 2. bytes: the figure the page sends vs the whole graph as circuit-tracer's server sends it
    sent = len(graph_figure(shown, big.token_texts, big.n_layers).to_json().encode())
    node_bytes = sum(len(json.dumps({"node_id": f"{r.layer}_{r.feature}_{r.position}", "feature": int(r.feature),
                                     "layer": str(r.layer), "ctx_idx": int(r.position), "feature_type": r.kind,
                                     "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                                     "jsNodeId": f"{r.layer}_{r.feature}-0", "clerp": r.label,
                                     "influence": float(r.influence), "activation": float(r.activation)}))
                     for r in big.nodes.itertuples())  # fmt: skip
    coo = big.adjacency.tocoo()
    sample = np.random.default_rng(0).choice(coo.nnz, min(coo.nnz, 50_000), replace=False)
    link_bytes = sum(len(json.dumps({"source": f"{big.nodes.at[int(s), 'layer']}_{s}_0",
                                     "target": f"{big.nodes.at[int(t), 'layer']}_{t}_0", "weight": float(w)}))
                     for s, t, w in zip(coo.col[sample], coo.row[sample], coo.data[sample], strict=True))  # fmt: skip
    whole = node_bytes + link_bytes * coo.nnz / len(sample)
    print(f"bytes to the browser: {sent / 1e6:.2f} MB (the page's figure) vs {whole / 1e6:.0f} MB (the whole graph "
          f"as circuit-tracer's server sends it); ratio {whole / sent:.0f}x")  # fmt: skip
    del big, coo

    # 3. chromium: cold and warm visits of the real dashboard
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed: browser timings skipped (apt-get install chromium)")
        return
    from playwright.sync_api import sync_playwright

    server, url = serve(root)
    try:
        urllib.request.urlopen(url, timeout=30).read()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
            bare = rss_tree(server.pid)
            page = (
                browser.new_page()
            )  # the prompt lab imports what the graph page does (torch, plotly, the lab)
            page.goto(f"{url}/prompt_lab", wait_until="commit")
            page.get_by_role("heading", name="Prompt lab").first.wait_for(timeout=600_000)
            page.wait_for_timeout(3000)
            page.close()
            rss_before = rss_tree(server.pid)
            cold = visit(browser, url)
            warm = [visit(browser, url) for _ in range(args.repeats)]
            browser.close()
        rss_after = rss_tree(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"chromium, graph page cold (server reads + prunes): first contentful paint {cold['first_contentful_paint_s']:.2f}s, "
          f"pruned counts shown {cold['counts_shown_s']:.2f}s, graph drawn {cold['graph_drawn_s']:.2f}s")  # fmt: skip
    for key in ("first_contentful_paint_s", "counts_shown_s", "graph_drawn_s"):
        values = [w[key] for w in warm if not math.isnan(w[key])]
        what = f"chromium, warm ({args.repeats} new sessions) {key[:-2].replace('_', ' ')}"
        missing = (
            f" (not reported by the browser in {len(warm) - len(values)} of them)"
            if len(values) < len(warm)
            else ""
        )
        if values:
            print(f"{what}: median {statistics.median(values):.2f}s, max {max(values):.2f}s{missing}")
        else:
            print(f"{what}: not reported by the browser in any session")
    growth = (rss_after - rss_before) / 1e6
    print(f"server RSS: {bare / 1e6:.0f} MB started, {rss_before / 1e6:.0f} MB with the pages' imports loaded (a "
          f"prompt lab visit), {rss_after / 1e6:.0f} MB after the graph visits: growth {growth:.0f} MB from the graph "
          f"(target ≤ 500 MB), {(rss_after - bare) / 1e6:.0f} MB from the bare server")  # fmt: skip


if __name__ == "__main__":
    main()
