"""Capture overhead: bare forward vs our all-layer resid_post capture vs TransformerLens run_with_cache, and the
capture -> store stream (tokens/s, MB/s, peak RSS along the stream) at real model shapes.

Same weights (random init; TransformerLens gets the GPT-NeoX ones through its own weight conversion), same batch,
same hooks. Prints median times and ratios. ``--shape`` picks a real architecture's shape (random init):
pythia-14m (GPT-NeoX 6 × 128: the ≥ 1M-token store stream on a CPU), pythia-160m (GPT-NeoX 12 × 768), pythia-410m (24 × 1024), gpt2-small (GPT-2 12 × 768), llama-gqa (Llama,
12 × 768, 12 query heads sharing 4 KV heads); TransformerLens is timed on the GPT-NeoX shapes.
``--store-tokens N`` then streams N tokens through ``capture_to_store`` into a temporary store (all-layer
resid_post, float32) and reports tokens/s, MB/s and the peak RSS at each quarter of the stream (flat = bounded).

    python benchmarks/capture.py [--layers 6 --d-model 512 --batch 8 --seq 128 --repeats 7]
    python benchmarks/capture.py --shape pythia-160m --store-tokens 65536
    python benchmarks/capture.py --scaling pythia-14m pythia-70m pythia-160m pythia-410m --batch 4 --repeats 3

``--scaling`` times the bare forward and our capture at each GPT-NeoX shape (interleaved) and fits the growth
exponent of the time per token against the parameter count less the input embedding (the unembedding computes) (1 = linear in the model's size).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
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


SHAPES = {  # family, layers, d_model, heads, kv heads, vocab
    "pythia-14m": ("gpt_neox", 6, 128, 4, 4, 50304),
    "pythia-70m": ("gpt_neox", 6, 512, 8, 8, 50304),
    "pythia-160m": ("gpt_neox", 12, 768, 12, 12, 50304),
    "pythia-410m": ("gpt_neox", 24, 1024, 16, 16, 50304),
    "gpt2-small": ("gpt2", 12, 768, 12, 12, 50257),
    "llama-gqa": ("llama", 12, 768, 12, 4, 32000),
}


def build_hf(family: str, layers: int, d_model: int, heads: int, kv_heads: int, vocab: int):
    """A random-init HF causal LM of that family and shape."""
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, vocab_size=vocab))
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=layers, hidden_size=d_model,
                                                num_attention_heads=heads, num_key_value_heads=kv_heads,
                                                intermediate_size=int(8 / 3 * d_model) // 64 * 64,
                                                vocab_size=vocab))  # fmt: skip
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=d_model,
                                                num_attention_heads=heads, intermediate_size=4 * d_model,
                                                vocab_size=vocab, rotary_pct=0.25))  # fmt: skip


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def store_stream(model, names: list[str], args, loop_seconds: float) -> None:
    """Capture ``args.store_tokens`` random tokens of all ``names`` into a temporary store (``args``: batch, seq,
    vocab, shard_rows as parsed); tokens/s, MB/s, the ratio to the
    in-memory capture loop (``loop_seconds`` per batch, timed above at the same batch; target >= 0.95: shard writes
    and checksums overlap the next forward), and the peak RSS in each quarter of the stream's time (sampled every
    0.2 s; flat = memory bounded by a batch and a shard)."""
    from workbench.capture import capture_to_store

    n_tokens, seq, batch, vocab, shard_rows = (
        args.store_tokens,
        args.seq,
        args.batch,
        args.vocab,
        args.shard_rows,
    )

    n_rows = max(1, n_tokens // seq)
    rows = torch.randint(0, vocab, (n_rows, seq)).tolist()
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append((time.perf_counter() - start, rss_mb()))

    with tempfile.TemporaryDirectory() as tmp:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        store = capture_to_store(model, rows, names, Path(tmp) / "store", batch_size=batch, context_length=seq,
                                 shard_rows=shard_rows, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        done.set()
        size = sum(f.stat().st_size for f in (Path(tmp) / "store").iterdir()) / 2**20
    tokens = n_rows * seq
    print(f"  capture -> store: {tokens} tokens × {len(names)} hooks in {seconds:.1f} s = {tokens / seconds:.0f} "
          f"tokens/s, {size / seconds:.1f} MB/s ({size:.0f} MB, {store.n_rows} rows, shards of {shard_rows} rows)")  # fmt: skip
    loop_rate = batch * seq / loop_seconds
    print(f"  capture -> store / capture loop  {tokens / seconds / loop_rate:6.3f}x  (target >= 0.95; loop "
          f"{loop_rate:.0f} tokens/s)")  # fmt: skip
    quarters = [max((mb for t, mb in samples if q * seconds / 4 <= t < (q + 1) * seconds / 4), default=float("nan"))
                for q in range(4)]  # fmt: skip
    print("  peak RSS in each quarter of the stream: " + ", ".join(f"{mb:.0f} MB" for mb in quarters))


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
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--store-tokens", type=int, default=0)
    parser.add_argument(
        "--shard-rows", type=int, default=1024, help="store shard size of the --store-tokens stream"
    )
    parser.add_argument("--scaling", nargs="+", choices=sorted(SHAPES), default=None, metavar="SHAPE")
    args = parser.parse_args()
    if args.scaling:
        return scaling(args)
    family = "gpt_neox"
    if args.shape:
        family, args.layers, args.d_model, args.heads, kv_heads, args.vocab = SHAPES[args.shape]
    if family != "gpt_neox":
        return other_family(args, family, kv_heads)

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
        print(f"  {name:32s} {seconds * 1e3:9.1f} ms  ({args.batch * args.seq / seconds:.0f} tokens/s)")
    bare_t = results["bare HF forward"]
    print(
        f"  capture / bare forward          {results['workbench capture'] / bare_t:6.3f}x  (target <= 1.05)"
    )
    print(
        f"  TransformerLens / capture        {results['TransformerLens run_with_cache'] / results['workbench capture']:6.3f}x  (target >= 1.0)"
    )
    if args.store_tokens:
        store_stream(model, names, args, results["workbench capture"])


def scaling(args) -> None:
    """Bare forward and all-layer resid_post capture per token at each ``--scaling`` shape, with the growth exponent
    of the per-token time against the parameter count less the input embedding (log-log least squares)."""
    rows = [time_shape(shape, args) for shape in args.scaling]
    if len(rows) > 1:
        logs = np.log([[params, bare, ours] for _, params, bare, ours in rows])
        for column, name in ((1, "bare forward"), (2, "capture")):
            exponent = np.polyfit(logs[:, 0], logs[:, column], 1)[0]
            print(f"{name}: time per token ∝ params^{exponent:.2f} ({rows[0][0]} → {rows[-1][0]})")


def time_shape(shape: str, args) -> tuple[str, int, float, float]:
    """(shape, parameters less the input embedding, bare seconds per token, capture seconds per token), interleaved medians."""
    from workbench.model import HookedModel

    family, layers, d_model, heads, kv_heads, vocab = SHAPES[shape]
    torch.manual_seed(0)
    hf = build_hf(family, layers, d_model, heads, kv_heads, vocab).eval()
    bare_model = build_hf(family, layers, d_model, heads, kv_heads, vocab).eval()
    bare_model.load_state_dict(hf.state_dict())
    model = HookedModel.from_hf(hf)
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    names = [f"blocks.{i}.hook_resid_post" for i in range(layers)]
    lookup = {
        id(p) for p in hf.get_input_embeddings().parameters()
    }  # a table lookup, no arithmetic per token
    params = sum(p.numel() for p in hf.parameters() if id(p) not in lookup)

    def ours() -> None:
        with model.capture(names, device=None) as cache:
            model(ids)
        assert len(cache) == layers

    with torch.inference_mode():
        times = interleaved_medians({"bare": lambda: bare_model(ids), "capture": ours}, args.repeats)
    tokens = args.batch * args.seq
    bare, captured = times["bare"] / tokens, times["capture"] / tokens
    print(f"  {shape:12s} {params / 1e6:7.1f} M params  bare {bare * 1e3:8.3f} ms/token  capture "
          f"{captured * 1e3:8.3f} ms/token  capture / bare {captured / bare:.3f}x", flush=True)  # fmt: skip
    return shape, params, bare, captured


def other_family(args, family: str, kv_heads: int) -> None:
    """GPT-2 / Llama shapes: bare forward vs our capture (TransformerLens's converters are not timed here)."""
    from workbench.model import HookedModel

    torch.manual_seed(0)
    hf = build_hf(family, args.layers, args.d_model, args.heads, kv_heads, args.vocab).eval().to(args.device)
    bare_model = build_hf(family, args.layers, args.d_model, args.heads, kv_heads, args.vocab).eval()
    bare_model.load_state_dict(hf.state_dict())
    bare_model = bare_model.to(args.device)
    model = HookedModel.from_hf(hf)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    names = [f"blocks.{i}.hook_resid_post" for i in range(args.layers)]

    def ours() -> None:
        with model.capture(names, device=None) as cache:
            model(ids)
        assert len(cache) == args.layers

    with torch.inference_mode():
        results = interleaved_medians({"bare HF forward": lambda: bare_model(ids), "workbench capture": ours},
                                      args.repeats)  # fmt: skip
    print(f"device={args.device} threads={torch.get_num_threads()} model={args.shape} ({family} L{args.layers} "
          f"d{args.d_model} heads {args.heads}/{kv_heads} kv) batch={args.batch}x{args.seq}")  # fmt: skip
    for name, seconds in results.items():
        print(f"  {name:32s} {seconds * 1e3:9.1f} ms  ({args.batch * args.seq / seconds:.0f} tokens/s)")
    print(
        f"  capture / bare forward          {results['workbench capture'] / results['bare HF forward']:6.3f}x"
    )
    if args.store_tokens:
        store_stream(model, names, args, results["workbench capture"])


if __name__ == "__main__":
    main()
