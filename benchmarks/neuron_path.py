"""Neuron paths: the batched, prefix-cached, chunked scorer against the previous algorithm, and memory as the file grows.

The model is a user's GPT-2 of the issue's shape (4 layers × 128 wide, d_mlp 512, random weights seeded, a 512-token
byte-level BPE tokenizer trained on the benchmark's own text); the data a text file of generated sentences (this
script's own grammar, not the zoo's), written at 1×, 4× and 16× ``--lines`` lines.

1. Speed at equal attributions, in one process, old and new interleaved per (target, layer): the tasks are the ones
   ``neuron-path run`` builds from the 1× file (position 8, the 3 most frequent next tokens, 64 rows); per layer
   both sides score the same candidate sets (``--neurons`` neurons per layer, every d_mlp / N-th, with the path so
   far), ``--steps`` α-steps. The previous algorithm (``_old_scores``, as of commit 26e1045: full sequences, 96
   candidates × inputs × steps per forward/backward) is kept here only as the baseline. The scores are asserted
   allclose before the ratio is printed.
2. Memory and cost as the file grows: ``neuron-path run`` (the library call the CLI makes, new code) in a fresh
   process per file size, peak RSS (ru_maxrss) and wall time; the old algorithm likewise at 1× (``--old-rss``).

    python benchmarks/neuron_path.py [--lines 6000] [--steps 20] [--neurons 32] [--run-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# Run as a script, this file's folder comes first on sys.path; keep it off, as benchmarks/probes.py does.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from workbench.circuits.neuron_path import analysis as npth  # noqa: E402
from workbench.datasets import load_dataset  # noqa: E402
from workbench.references import resolve_model  # noqa: E402

SUBJECTS = [
    "the parser",
    "a small model",
    "every layer",
    "the old cache",
    "my tokenizer",
    "this benchmark",
    "a careful reader",
]
VERBS = ["reads", "writes", "skips", "counts", "loads", "checks", "returns", "stores", "sorts", "prints"]
OBJECTS = [
    "the next token",
    "each line",
    "a long file",
    "its own weights",
    "the results table",
    "one chunk",
    "many rows",
]
TAILS = ["before lunch", "in order", "twice", "without a copy", "on two cores", "at every size", "when asked"]


def sentence(rng: random.Random) -> str:
    """One generated line: 2–4 clauses of subject, verb, object and an optional tail."""
    clauses = []
    for _ in range(rng.randint(2, 4)):
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(TAILS))
        clauses.append(" ".join(words))
    return ", and ".join(clauses) + "."


def make_inputs(out: Path, lines: int, scales: list[int]) -> tuple[Path, dict[int, Path]]:
    """The text files (``lines`` × scale lines each) and the model directory (GPT-2 4 × 128 + its tokenizer)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for scale in scales:
        path = out / f"sentences_{scale}x.txt"
        if not path.exists():
            rng = random.Random(scale)
            path.write_text("\n".join(sentence(rng) for _ in range(lines * scale)) + "\n")
        files[scale] = path
    model_dir = out / "my-gpt2"
    if not (model_dir / "config.json").exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        tokenizer.train([str(files[scales[0]])], trainer)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                                    bos_token="<|endoftext|>")  # fmt: skip
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=256,
                                         bos_token_id=0, eos_token_id=0)  # fmt: skip
        transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
        fast.save_pretrained(model_dir)
    return model_dir, files


def _old_scores(model, task, clean, masks: list[dict[int, torch.Tensor]], steps: int) -> torch.Tensor:
    """The previous joint scores (commit 26e1045): every candidate set's steps × inputs as rows of the full sequence,
    one forward/backward per call → [candidates]."""
    n, c = task.inputs.shape[0], len(masks)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
    alpha = alphas.repeat(c * n).requires_grad_(True)
    inputs = task.inputs.repeat_interleave(steps, 0).repeat(c, 1)
    targets = task.targets.repeat_interleave(steps, 0).repeat(c)
    layers = sorted(masks[0])
    row_clean = {ly: clean[ly].repeat_interleave(steps, 0).repeat(c, 1) for ly in layers}
    row_masks = {ly: torch.stack([m[ly] for m in masks]).repeat_interleave(n * steps, 0) for ly in layers}
    with model.hooks(npth._scaled_hooks(row_clean, row_masks, alpha, task.position)):
        probs = npth.target_probs(model(inputs), targets, task.position)
    (grad,) = torch.autograd.grad(probs.sum(), alpha)
    return grad.reshape(c, n * steps).mean(1).detach()


def _old_layer(model, task, clean, path: dict[int, list[int]], layer: int, neurons: torch.Tensor,
               steps: int, chunk: int = 96) -> torch.Tensor:  # fmt: skip
    """The previous locate_path's scoring of one layer: candidate masks, 96 candidates per forward/backward."""
    d = model.cfg.d_mlp
    base = {}
    for ly, ns in path.items():
        base[ly] = torch.zeros(d, dtype=torch.bool)
        base[ly][ns] = True
    candidates = []
    for j in neurons.tolist():
        m = {ly: v.clone() for ly, v in base.items()}
        m[layer] = torch.zeros(d, dtype=torch.bool)
        m[layer][j] = True
        candidates.append(m)
    return torch.cat([_old_scores(model, task, clean, candidates[i : i + chunk], steps)
                      for i in range(0, len(candidates), chunk)])  # fmt: skip


def speed(model_dir: Path, data: Path, steps: int, n_neurons: int) -> dict:
    """Old vs new on the same candidate sets of every target and layer, interleaved; asserts equal scores."""
    model = resolve_model(str(model_dir)).eval()
    dataset = load_dataset(str(data))
    tokens = npth.next_token_rows(model, dataset, npth.LM_POSITION, 64, 0)
    tasks = npth.lm_tasks(model, tokens, npth.LM_POSITION, npth.LM_TARGETS)
    d = model.cfg.d_mlp
    neurons = torch.arange(0, d, max(1, d // n_neurons))[:n_neurons]
    times = {"old": 0.0, "new": 0.0}
    rows = 0
    worst = 0.0
    scale = 0.0
    for task in tasks.values():
        clean = npth.clean_activations(model, task)
        start = time.perf_counter()
        scorer = npth._Scorer(model, task, steps)  # its setup (clean forward, prefix cache) is timed as new's
        times["new"] += time.perf_counter() - start
        path: dict[int, list[int]] = {}
        for layer in range(model.cfg.n_layers):
            start = time.perf_counter()
            old = _old_layer(model, task, clean, path, layer, neurons, steps)
            times["old"] += time.perf_counter() - start
            start = time.perf_counter()
            new = scorer.scores(npth.Candidates(dict(path), layer, neurons))
            times["new"] += time.perf_counter() - start
            torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-4 * float(old.abs().max()) + 1e-9)
            worst = max(worst, float((new - old).abs().max()))
            scale = max(scale, float(old.abs().max()))
            assert int(new.argmax()) == int(old.argmax()), "the picked neuron differs"
            path[layer] = [int(neurons[int(new.argmax())])]
            rows += len(neurons) * task.inputs.shape[0] * steps
    return {"targets": len(tasks), "inputs": sum(t.inputs.shape[0] for t in tasks.values()), "rows": rows,
            "old_s": times["old"], "new_s": times["new"], "max_abs_diff": worst, "max_abs_score": scale,
            "tokens_per_row_old": int(next(iter(tasks.values())).inputs.shape[1]), "chunk_rows": scorer.chunk_rows}  # fmt: skip


def child(side: str, model_dir: Path, data: Path, steps: int, n_targets: int, max_sequences: int) -> dict:
    """One ``neuron_path.run`` in this (fresh) process → wall seconds, peak RSS and the cost line."""
    model = resolve_model(str(model_dir)).eval()
    if side == "old":

        def old_locate(model, task, steps=20, top_k=1, chunk_rows=None, progress=True, scorer=None):
            clean = npth.clean_activations(model, task)
            path: dict[int, list[int]] = {}
            for layer in range(model.cfg.n_layers):
                values = _old_layer(model, task, clean, path, layer, torch.arange(model.cfg.d_mlp), steps)
                path[layer] = values.topk(top_k).indices.tolist()
            return path, []

        npth.locate_path = old_locate
    lines: list[str] = []
    start = time.perf_counter()
    frames = npth.run(model, load_dataset(str(data)), steps=steps, n_targets=n_targets,
                      max_sequences=max_sequences, progress=False, report=lines.append)  # fmt: skip
    seconds = time.perf_counter() - start
    paths = frames["neuron_paths"]
    ours = paths[paths["method"] == "joint_ig"][["target", "layer", "neuron"]].values.tolist()
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cost": lines[0] if lines else "", "path": ours}  # fmt: skip


def _spawn(args, side: str, data: Path) -> dict:
    command = [sys.executable, __file__, "--child", side, "--child-data", str(data), "--out", str(args.out),
               "--run-steps", str(args.run_steps), "--n-targets", str(args.n_targets),
               "--max-sequences", str(args.max_sequences)]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/wb-bench-neuron-path"))
    parser.add_argument("--lines", type=int, default=6000, help="lines of the 1× text file")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=20, help="α-steps of the speed comparison")
    parser.add_argument(
        "--neurons", type=int, default=32, help="candidate neurons per layer in the comparison"
    )
    parser.add_argument("--run-steps", type=int, default=20, help="α-steps of the per-file-size runs")
    parser.add_argument("--n-targets", type=int, default=3)
    parser.add_argument("--max-sequences", type=int, default=64)
    parser.add_argument("--old-rss", action="store_true", help="also run the old algorithm's full run at 1×")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shared 2-core VM: 1)")
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--child-data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, files = make_inputs(args.out, args.lines, args.scales)
    if args.child:
        result = child(
            args.child, model_dir, args.child_data, args.run_steps, args.n_targets, args.max_sequences
        )
        print(json.dumps(result))
        return
    print(f"model {model_dir} (GPT-2 4 × 128, d_mlp 512, vocab 512); torch threads {args.threads}; load average "
          f"{_load()}")  # fmt: skip
    result = speed(model_dir, files[args.scales[0]], args.steps, args.neurons)
    print(f"speed at equal attributions ({result['targets']} targets, {result['inputs']} inputs, {args.steps} steps, "
          f"{args.neurons} candidate neurons × 4 layers, {result['rows']:,} rows; old: full {result['tokens_per_row_old']}"
          f"-token rows, 96 candidates per pass; new: prefix cached, {result['chunk_rows']:,} rows per chunk)")  # fmt: skip
    print(
        f"  max |new − old| {result['max_abs_diff']:.2e} (scores up to {result['max_abs_score']:.2e}); "
        "allclose rtol 1e-4 and the same pick per layer: asserted"
    )
    print(f"  old {result['old_s']:.2f} s, new {result['new_s']:.2f} s → {result['old_s'] / result['new_s']:.1f}× "
          f"faster; load average {_load()}")  # fmt: skip
    print(f"neuron_path.run per file size (steps {args.run_steps}, {args.n_targets} targets, {args.max_sequences} "
          "rows; a fresh process each):")  # fmt: skip
    print(f"{'file':>22} {'lines':>8} {'MB':>6} {'side':>4} {'wall s':>8} {'peak RSS MB':>12}")
    runs = []
    for scale in args.scales:
        sides = ["new"] + (["old"] if args.old_rss and scale == args.scales[0] else [])
        for side in sides:
            r = _spawn(args, side, files[scale])
            if side == "new":
                runs.append(r)
            size = files[scale].stat().st_size / 2**20
            print(f"{files[scale].name:>22} {args.lines * scale:8d} {size:6.1f} {side:>4} {r['seconds']:8.1f} "
                  f"{r['peak_rss_mb']:12.0f}")  # fmt: skip
            if side == "new" and scale == args.scales[0]:
                print(f"  cost line printed first: {r['cost']}")
    print(f"new peak RSS at {args.scales[-1]}× / {args.scales[0]}× the file: "
          f"{runs[-1]['peak_rss_mb'] / runs[0]['peak_rss_mb']:.2f}; load average {_load()}")  # fmt: skip


if __name__ == "__main__":
    main()
