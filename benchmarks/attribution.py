"""Attribution rows: batched backward passes (many rows per pass) vs one backward pass per row.

A random-init GPT-NeoX (4 layers, d_model 256, sequential blocks) with per-layer ReLU transcoders of 2 048
latents on ``hook_resid_mid``, a 32-token prompt: the same ``--rows`` feature rows of the adjacency are computed by
``RowComputer`` once with ``--batch-size`` rows per backward pass and once with one row per pass; both give the same
rows (up to float rounding, checked), and the ratio of their times is printed. On a shared CPU pass ``--threads 1``:
with more threads than free cores every small operation of a one-row pass waits on its threads, which inflates
the single-row time (and the ratio) by contention rather than by work.

    python benchmarks/attribution.py                      # CPU, 256 rows, batch 64
    python benchmarks/attribution.py --rows 128 --threads 1
    python benchmarks/attribution.py --device cuda --rows 1024 --batch-size 256
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from workbench.circuits.attribution.graph import RowComputer, _Row
from workbench.circuits.attribution.replacement import ReplacementModel
from workbench.circuits.attribution.transcoders import as_transcoders
from workbench.circuits.sae.base import SAEConfig, create_sae
from workbench.model import HookedModel


def build(device: str, layers: int, d_model: int, latents: int) -> tuple[HookedModel, dict]:
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=8,
                                        intermediate_size=4 * d_model, vocab_size=512, max_position_embeddings=128,
                                        use_parallel_residual=False)  # fmt: skip
    model = HookedModel.from_hf(
        transformers.GPTNeoXForCausalLM(config).eval().to(device), None, name="bench-neox"
    )
    saes = {}
    for layer in range(layers):
        sae = create_sae(SAEConfig("relu", d_in=d_model, d_sae=latents, hook_in=f"blocks.{layer}.hook_resid_mid",
                                   hook_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            sae.b_enc.fill_(-0.5)  # a sparse code: a few percent of the latents active
        saes[layer] = sae.to(device).eval()
    return model, saes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's own choice)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, saes = build(args.device, args.layers, args.d_model, args.latents)
    tokens = torch.randint(512, (args.tokens,), generator=torch.Generator().manual_seed(1))
    replacement = ReplacementModel(model, as_transcoders(model, saes), tokens)
    tc = replacement.transcoders

    def rows_of(computer: RowComputer) -> list[_Row]:
        picked = computer.features[
            torch.randperm(computer.n_active, generator=torch.Generator().manual_seed(2))
        ]
        picked = picked[: args.rows]
        return [_Row(tc.hook_in(int(layer)), int(position), tc.encoder_vectors(int(layer), feature[None])[0][0])
                for layer, position, feature in picked.tolist() for feature in [torch.tensor(feature)]]  # fmt: skip

    def run(batch: int) -> tuple[float, torch.Tensor]:
        computer = RowComputer(replacement, [], batch)
        rows = rows_of(computer)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = torch.cat([computer.rows(rows[i : i + batch]) for i in range(0, len(rows), batch)])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    active = sum(int((a > 0).sum()) for a in replacement.activations)
    print(f"{args.layers} layers × {args.latents} latents, {args.tokens} tokens, {active} active features, "
          f"{args.rows} rows on {args.device} ({torch.get_num_threads()} torch threads)")  # fmt: skip
    batched, rows_batched = run(args.batch_size)
    single, rows_single = run(1)
    difference = float((rows_batched - rows_single).abs().max())
    per_row = {name: f"{seconds:.3f} s ({1e3 * seconds / args.rows:.2f} ms per row)"
               for name, seconds in (("batched", batched), ("single", single))}  # fmt: skip
    print(f"batched ({args.batch_size} rows per backward pass): {per_row['batched']}")
    print(f"one backward pass per row:                  {per_row['single']}")
    print(f"ratio: {single / batched:.1f}× (max |difference| between the two: {difference:.2e})")


if __name__ == "__main__":
    main()
