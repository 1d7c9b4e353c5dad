"""Attribution graphs (issue 31): batched rows vs one backward pass per row, memory, and time against prompt length.

Three measurements, one per sub-command:

``rows`` (default): a random-init GPT-NeoX (4 layers, d_model 256, sequential blocks) with per-layer ReLU transcoders
of 2 048 latents on ``hook_resid_mid``, a 32-token prompt. ``--rows`` active features, taken in the order
``attribute`` takes them (layer-major), get their adjacency rows from one ``RowComputer`` twice: ``--batch-size`` rows
per backward pass, and one row per backward pass (the same frozen forward, the same injection, the same gradient →
edge step, only the batch differs). The two results must agree (max |difference| asserted) before any ratio is
printed. Times are the process's CPU time (what the work costs: on a shared machine the wall clock also counts the
time other processes hold the cores) and the wall clock; ``--threads 1`` keeps one thread per pass, so that a one-row
pass does not wait on idle threads. ``--profile`` prints the torch profiler's table for one batched pass.

``memory``: the issue's run, a random-init GPT-NeoX of Pythia-70m's shape (6 layers, d_model 512, 8 heads, d_mlp
2 048, vocabulary 50 304), a 128-token prompt, per-layer transcoders of ``--latents`` latents, ``attribute`` with
``--max-feature-nodes`` (head loadings off: they are a second pass, timed apart); each (latents, max_feature_nodes)
pair runs in a fresh process, which prints its time and peak RSS; the table shows how memory grows with kept nodes
and latents (the row matrix is [kept rows, active features + errors + inputs]: no latents × latents matrix).

``scaling``: ``attribute`` on the ``rows`` model for ``--tokens-list`` prompt lengths (every active feature kept), its
time per length and the log-log slope (the growth exponent) of time against tokens.

    python benchmarks/attribution.py rows --threads 1             # CPU, 256 rows, batch 64
    python benchmarks/attribution.py rows --device cuda --rows 1024 --batch-size 256
    python benchmarks/attribution.py memory --latents 4096,8192 --max-feature-nodes 1024,4096
    python benchmarks/attribution.py scaling --tokens-list 16,32,64,128,256
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import transformers

from workbench.circuits.attribution.graph import attribute
from workbench.circuits.attribution.replacement import ReplacementModel
from workbench.circuits.attribution.rows import Row, RowComputer
from workbench.circuits.attribution.transcoders import as_transcoders
from workbench.circuits.sae.base import SAEConfig, create_sae
from workbench.model import HookedModel

PYTHIA_70M = {"layers": 6, "d_model": 512, "heads": 8, "vocab": 50304}


def build(
    device: str, layers: int, d_model: int, latents: int, heads: int = 8, vocab: int = 512, n_ctx: int = 512,
    l0_on: torch.Tensor | None = None, l0: int = 64,
) -> tuple[HookedModel, dict]:  # fmt: skip
    """A random-init GPT-NeoX (sequential blocks, d_mlp 4 · d_model) and one ReLU transcoder per layer reading
    ``hook_resid_mid``: b_enc −0.5 (at d_model 256 a sparse code, ~13 latents per token and layer), or, given a
    prompt ``l0_on`` [pos], b_enc set per layer so that ``l0`` latents per token fire on it on average (at d_model
    512 a fixed −0.5 would leave ~13 % of the latents active, far from a trained transcoder's code)."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads,
                                        intermediate_size=4 * d_model, vocab_size=vocab, max_position_embeddings=n_ctx,
                                        use_parallel_residual=False)  # fmt: skip
    model = HookedModel.from_hf(
        transformers.GPTNeoXForCausalLM(config).eval().to(device), None, name="bench-neox"
    )
    saes = {}
    for layer in range(layers):
        sae = create_sae(SAEConfig("relu", d_in=d_model, d_sae=latents, hook_in=f"blocks.{layer}.hook_resid_mid",
                                   hook_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            sae.b_enc.fill_(-0.5)
        saes[layer] = sae.to(device).eval()
    if l0_on is not None:
        names = [f"blocks.{layer}.hook_resid_mid" for layer in range(layers)]
        with torch.no_grad(), model.capture(names, device=None) as cache:
            model(l0_on[None].to(device))
        for layer, sae in saes.items():
            with torch.no_grad():
                pre = cache[names[layer]][0] @ sae.W_enc  # [pos, latents] without b_enc
                threshold = torch.quantile(pre.flatten().float(), 1 - l0 / latents)
                sae.b_enc.fill_(-float(threshold))
    return model, saes


def prompt(n_tokens: int, vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (n_tokens,), generator=torch.Generator().manual_seed(1))


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(CPU seconds of this process, wall seconds, result) of ``fn()``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ------------------------------------------------------------------------------------------------ rows
def run_rows(args: argparse.Namespace) -> None:
    model, saes = build(args.device, args.layers, args.d_model, args.latents)
    replacement = ReplacementModel(model, as_transcoders(model, saes), prompt(args.tokens, 512))
    tc = replacement.transcoders
    fused = sum(m is not None for m in replacement.value_maps)

    def rows_of(computer: RowComputer) -> list[Row]:
        picked = torch.randperm(computer.n_active, generator=torch.Generator().manual_seed(2))[: args.rows]
        picked = picked[
            torch.sort(computer.features[picked, 0], stable=True).indices
        ]  # layer-major, as attribute
        features = computer.features[picked]
        vectors = [tc.encoder_vectors(int(layer), features[features[:, 0] == layer, 2])[0]
                   for layer in range(tc.n_layers)]  # fmt: skip
        return [Row(tc.hook_in(int(layer)), int(position), vector)
                for (layer, position, _), vector in zip(features.tolist(), torch.cat(vectors), strict=True)]  # fmt: skip

    def run(batch: int) -> tuple[float, float, torch.Tensor]:
        computer = RowComputer(replacement, [], batch)
        rows = rows_of(computer)
        computer.rows(rows[:batch])  # warm-up: first-call allocations
        return timed(
            lambda: torch.cat([computer.rows(rows[i : i + batch]) for i in range(0, len(rows), batch)]),
            args.device,
        )

    active = sum(int((a > 0).sum()) for a in replacement.activations)
    print(f"{args.layers} layers × {args.latents} latents, d_model {args.d_model}, {args.tokens} tokens, {active} "
          f"active features, {args.rows} rows (layer-major) on {args.device}, {torch.get_num_threads()} torch "
          f"threads; {fused} of {args.layers} layers' values from their fused Q/K/V projection's value map; load "
          f"average {load_average()}")  # fmt: skip
    batched_cpu, batched_wall, rows_batched = run(args.batch_size)
    single_cpu, single_wall, rows_single = run(1)
    difference = float((rows_batched - rows_single).abs().max())
    scale = float(rows_single.abs().max())
    assert difference <= 1e-4 * max(1.0, scale), f"batched and one-row results differ by {difference:.3g}"
    n = args.rows
    print(
        f"max |batched − one row per pass| = {difference:.2e} (largest |edge| {scale:.3g}): equal up to rounding"
    )
    print(f"batched ({args.batch_size} rows per backward pass): CPU {batched_cpu:.3f} s ({1e3 * batched_cpu / n:.2f} "
          f"ms per row), wall {batched_wall:.3f} s")  # fmt: skip
    print(f"one backward pass per row:           CPU {single_cpu:.3f} s ({1e3 * single_cpu / n:.2f} ms per row), "
          f"wall {single_wall:.3f} s")  # fmt: skip
    print(
        f"ratio: {single_cpu / batched_cpu:.1f}× on CPU time, {single_wall / batched_wall:.1f}× on the wall clock"
    )
    if args.profile:
        profile_batch(replacement, rows_of, args.batch_size)


def profile_batch(
    replacement: ReplacementModel, rows_of: Callable[[RowComputer], list[Row]], batch: int
) -> None:
    from torch.profiler import ProfilerActivity, profile  # profiling only: not needed for the timings

    computer = RowComputer(replacement, [], batch)
    rows = rows_of(computer)[:batch]
    computer.rows(rows)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        computer.rows(rows)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15,
                                                             max_name_column_width=36, max_shapes_column_width=60))  # fmt: skip


# ------------------------------------------------------------------------------------------------ memory
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_memory_one(args: argparse.Namespace) -> None:
    """One (latents, max_feature_nodes) run in this process: prints one JSON line."""
    shape = PYTHIA_70M
    tokens = prompt(args.tokens, shape["vocab"])
    model, saes = build(args.device, shape["layers"], shape["d_model"], args.latents, shape["heads"],
                        shape["vocab"], n_ctx=2048, l0_on=tokens, l0=args.l0)  # fmt: skip
    before = peak_rss_mib()
    cpu, wall, graph = timed(
        lambda: attribute(model, saes, tokens, max_feature_nodes=args.max_feature_nodes,
                          batch_size=args.batch_size, heads=False),
        args.device,
    )  # fmt: skip
    print(json.dumps({
        "latents": args.latents, "max_feature_nodes": args.max_feature_nodes, "tokens": args.tokens,
        "active": graph.n_active, "kept": graph.n_features, "nodes": graph.n_nodes, "cpu_s": cpu, "wall_s": wall,
        "rss_before_mib": before, "rss_peak_mib": peak_rss_mib(),
        "row_matrix_mib": (graph.n_features + graph.n_targets) * (graph.n_active + graph.n_nodes - graph.n_features)
        * 4 / 2**20, "replacement_score": graph.scores["replacement_score"],
    }))  # fmt: skip


def run_memory(args: argparse.Namespace) -> None:
    print(f"Pythia-70m shape (random init GPT-NeoX: 6 layers, d_model 512, vocab 50 304), {args.tokens} tokens, "
          f"transcoders with b_enc set for {args.l0} active latents per token and layer on the prompt, "
          f"batch {args.batch_size}, head loadings off, {torch.get_num_threads()} threads; load average "
          f"{load_average()}")  # fmt: skip
    results = []
    for latents in (int(x) for x in args.latents_list.split(",")):
        for budget in (int(x) for x in args.max_feature_nodes_list.split(",")):
            command = [sys.executable, __file__, "memory-one", "--latents", str(latents), "--max-feature-nodes",
                       str(budget), "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
                       "--threads", str(args.threads), "--device", args.device, "--l0", str(args.l0)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  latents {latents}, max_feature_nodes {budget}: {r['active']} active, {r['kept']} kept, "
                  f"CPU {r['cpu_s']:.1f} s, wall {r['wall_s']:.1f} s, peak RSS {r['rss_peak_mib']:.0f} MiB "
                  f"(before attribute: {r['rss_before_mib']:.0f} MiB), row matrix {r['row_matrix_mib']:.0f} MiB",
                  flush=True)  # fmt: skip
    print(
        "| latents per layer | max_feature_nodes | active features | kept | CPU s | wall s | peak RSS MiB | "
        "RSS added by attribute MiB | row matrix MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['latents']} | {r['max_feature_nodes']} | {r['active']} | {r['kept']} | {r['cpu_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['rss_peak_mib']:.0f} | {r['rss_peak_mib'] - r['rss_before_mib']:.0f} | "
              f"{r['row_matrix_mib']:.0f} |")  # fmt: skip


# ------------------------------------------------------------------------------------------------ scaling
def run_scaling(args: argparse.Namespace) -> None:
    lengths = [int(x) for x in args.tokens_list.split(",")]
    model, saes = build(args.device, args.layers, args.d_model, args.latents, n_ctx=max(lengths))
    print(f"{args.layers} layers × {args.latents} latents, d_model {args.d_model}, every active feature kept, batch "
          f"{args.batch_size}, head loadings off, {torch.get_num_threads()} threads; load average {load_average()}")  # fmt: skip
    print("| tokens | active features | CPU s | wall s | CPU ms per row |")
    print("|---|---|---|---|---|")
    times = []
    for n in lengths:
        cpu, wall, graph = timed(partial(attribute, model, saes, prompt(n, 512), max_feature_nodes=10**9,
                                         batch_size=args.batch_size, heads=False), args.device)  # fmt: skip
        times.append(cpu)
        rows = graph.n_features + graph.n_targets
        print(f"| {n} | {graph.n_active} | {cpu:.2f} | {wall:.2f} | {1e3 * cpu / rows:.2f} |", flush=True)
    x = torch.tensor([math.log(n) for n in lengths], dtype=torch.float64)
    y = torch.tensor([math.log(t) for t in times], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    print(
        f"growth exponent (log-log slope of CPU time against tokens, {lengths[0]}–{lengths[-1]}): {slope:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "mode", nargs="?", default="rows", choices=["rows", "memory", "memory-one", "scaling"]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="prompt tokens (rows: 32, memory: 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--profile", action="store_true", help="rows: the torch profiler's table of one batch"
    )
    parser.add_argument("--latents-list", default="4096,8192", help="memory: latents per layer")
    parser.add_argument("--max-feature-nodes-list", default="1024,4096", help="memory: kept features")
    parser.add_argument("--max-feature-nodes", type=int, default=4096)
    parser.add_argument("--l0", type=int, default=64, help="memory: active latents per token and layer")
    parser.add_argument("--tokens-list", default="16,32,64,128,256", help="scaling: prompt lengths")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's own choice)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tokens is None:
        args.tokens = 128 if args.mode.startswith("memory") else 32
    {"rows": run_rows, "memory": run_memory, "memory-one": run_memory_one, "scaling": run_scaling}[args.mode](
        args
    )


if __name__ == "__main__":
    main()
