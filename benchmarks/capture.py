"""Capture overhead: bare forward vs our all-layer resid_post capture vs TransformerLens run_with_cache.

Same weights (a Pythia-70m-shaped GPT-NeoX, random init; TransformerLens gets them through its own weight
conversion), same batch, same hooks. Prints median times and ratios.

    python benchmarks/capture.py [--layers 6 --d-model 512 --batch 8 --seq 128 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as T


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per function, timed round-robin so load changes hit every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights

    from workbench.model import HookedModel

    torch.manual_seed(0)
    config = T.GPTNeoXConfig(
        num_hidden_layers=args.layers, hidden_size=args.d_model, num_attention_heads=args.heads,
        intermediate_size=4 * args.d_model, vocab_size=args.vocab, max_position_embeddings=2048, rotary_pct=0.25,
    )  # fmt: skip
    hf = T.GPTNeoXForCausalLM(config).eval().to(args.device)
    d_head = args.d_model // args.heads
    tl_cfg = HookedTransformerConfig(
        n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, d_head=d_head, d_mlp=4 * args.d_model,
        n_ctx=2048, d_vocab=args.vocab, act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
        rotary_dim=d_head // 4, parallel_attn_mlp=True, rotary_adjacent_pairs=False, default_prepend_bos=False,
        rotary_base=config.rope_parameters["rope_theta"], device=args.device,
    )  # fmt: skip
    tl = HookedTransformer(tl_cfg)
    tl.load_and_process_state_dict(
        convert_neox_weights(hf, tl_cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )  # fmt: skip
    tl.eval()
    bare_model = T.GPTNeoXForCausalLM(config).eval().to(args.device)
    bare_model.load_state_dict(hf.state_dict())
    model = HookedModel.from_hf(hf)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    names = [f"blocks.{i}.hook_resid_post" for i in range(args.layers)]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare() -> None:
        bare_model(ids)
        sync()

    def ours() -> None:
        with model.capture(names, device=None) as cache:
            model(ids)
        assert len(cache) == args.layers
        sync()

    def transformer_lens() -> None:
        _, cache = tl.run_with_cache(ids, names_filter=lambda n: n in names)
        assert len(cache) == args.layers
        sync()

    with torch.inference_mode():
        with model.capture(names, device=None) as ours_cache:
            model(ids)
        _, tl_cache = tl.run_with_cache(ids, names_filter=lambda n: n in names)
        worst = max((ours_cache[n] - tl_cache[n]).abs().max().item() for n in names)
        contenders = {
            "bare HF forward": bare,
            "workbench capture": ours,
            "TransformerLens run_with_cache": transformer_lens,
        }
        results = interleaved_medians(contenders, args.repeats)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"model=GPT-NeoX L{args.layers} d{args.d_model} batch={args.batch}x{args.seq}; max |ours - TL| = {worst:.2e}")  # fmt: skip
    for name, seconds in results.items():
        print(f"  {name:32s} {seconds * 1e3:9.1f} ms")
    bare_t = results["bare HF forward"]
    print(
        f"  capture / bare forward          {results['workbench capture'] / bare_t:6.3f}x  (target <= 1.10)"
    )
    print(
        f"  TransformerLens / capture        {results['TransformerLens run_with_cache'] / results['workbench capture']:6.3f}x  (target >= 1.0)"
    )


if __name__ == "__main__":
    main()
