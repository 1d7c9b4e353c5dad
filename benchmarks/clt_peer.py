"""CLT training tokens/s against a peer CLT trainer (issue 32): OpenMOSS's lm-saes, published as ``llamascopium``.

crosslayer-coding has no distribution on the package index, so lm-saes is the peer. Its venv
(``bash benchmarks/peer_envs/llamascopium.sh``: benchmarks/.venv-llamascopium) is separate from ours. This script,
run in our .venv, captures the MLP input (``ln2.hook_normalized``) and output (``hook_mlp_out``) of every layer of a
zoo model once, writes them to a temporary file, and then trains one TopK CLT per run in a fresh child process of
this same script: ours (``train_saes``, the ``workbench sae train --architecture clt_topk`` trainer, with
``run_clt``'s settings: warm-up 20 steps, AuxK on latents dead for 10 batches) under .venv's python, the peer's
(``llamascopium.trainer.Trainer.fit`` on a ``CrossLayerTranscoder`` built by its ``Initializer``, as its
``train_clt`` runner does, fed the same batches through ``activation_stream``) under the peer venv's python.
Both sides: the same batches in the same order, the same rows per step, steps, k, latents per layer, Adam
(0.9, 0.999) at the same learning rate with the same warm-up and linear decay over the last 20 %, float32, the
same torch thread count, one process. Timed: the training call only (ours ``train_saes``, with its per-step
loss / FVU / L0 / dead metrics; theirs ``Trainer.fit``, with ``skip_metrics_calculation``: its per-step metrics
fail on a CLT in 2.0.0b34). Then both score the held-out quarter of the tokens: FVU and L0 per layer, dead
latents. Runs alternate which trainer goes first; best and median tokens/s (wall clock) and tokens per
CPU-second of the training process (less sensitive to other processes on a shared machine), and their ratios,
are printed.

    bash benchmarks/peer_envs/llamascopium.sh                      # once
    python benchmarks/clt_peer.py --ours-noaux                     # code-small (zoo, trained if absent)
    python benchmarks/clt_peer.py --ours-noaux --d-sae 2048 --steps 150
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / "benchmarks" / ".venv-llamascopium" / "bin" / "python"
HOOK_IN, HOOK_OUT = "ln2.hook_normalized", "hook_mlp_out"


def hook_names(layers: list[int]) -> tuple[list[str], list[str]]:
    return [f"blocks.{i}.{HOOK_IN}" for i in layers], [f"blocks.{i}.{HOOK_OUT}" for i in layers]


def make_batches(
    acts: dict[str, torch.Tensor], rows: int, steps: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches {hook: [rows, d]} of shuffled training rows (every hook the same rows), as benchmarks/clt.py."""
    g = torch.Generator().manual_seed(seed)
    n = len(next(iter(acts.values())))
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(rows * steps // n + 1)])
    return [
        {h: v[order[i * rows : (i + 1) * rows]].contiguous() for h, v in acts.items()} for i in range(steps)
    ]


def scores(predict, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float] | float]:
    """Held-out scores of ``predict`` (x [L, n, d] → (latents [L, n, F], prediction [L, n, d])), per layer: FVU
    (Σ residual² / Σ (y − mean y)²), L0 (mean active latents per token), and the share of latents never active."""
    fvu, l0, dead = [], [], []
    with torch.no_grad():
        parts = [predict(x[:, s : s + 4096]) for s in range(0, x.shape[1], 4096)]
        f = torch.cat([p[0] for p in parts], 1)
        prediction = torch.cat([p[1] for p in parts], 1)
    for layer in range(x.shape[0]):
        target = y[layer]
        fvu.append(float((target - prediction[layer]).pow(2).sum() / (target - target.mean(0)).pow(2).sum()))
        active = f[layer] > 0
        l0.append(float(active.sum(-1).float().mean()))
        dead.append(float((~active.any(0)).float().mean()))
    return {"fvu": fvu, "l0": l0, "dead": dead}


# ------------------------------------------------------------------------------------------------ the two trainers
def train_ours(data: dict, args: argparse.Namespace, dense: bool = False, aux_k: bool = True) -> dict:
    from workbench.circuits.sae.clt import CLTConfig
    from workbench.circuits.sae.train import TrainConfig, seeded_clt, train_saes

    layers = data["layers"]
    ins, outs = hook_names(layers)
    batches = make_batches(data["train"], args.rows, args.steps)
    cfg = CLTConfig(len(layers), data["d_model"], args.d_sae, activation="topk", k=args.k, layers=layers,
                    hook_in=HOOK_IN, hook_out=HOOK_OUT)  # fmt: skip
    clt = seeded_clt(cfg, 0)
    clt.sparse_training = not dense  # dense: the TopK step through dense latents (clt.py's "dense step")
    # aux_k False: no latent ever counts as dead, so AuxK never runs (the peer's CLT has no AuxK)
    dead_after = 10 * args.rows if aux_k else 2**62
    train = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, progress=False,
                        dead_after_tokens=dead_after)  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    result = train_saes({"clt": clt}, batches, train)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    clt = result.saes["clt"].eval()
    held = data["heldout"]
    x, y = torch.stack([held[h] for h in ins]), torch.stack([held[h] for h in outs])

    def predict(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = clt.encode(xs)
        return f, clt.decode(f, xs)

    return {"seconds": seconds, "cpu_seconds": cpu} | scores(predict, x, y)


def train_peer(data: dict, args: argparse.Namespace, decode: str) -> dict:
    import llamascopium
    from llamascopium.initializer import Initializer, InitializerConfig
    from llamascopium.models.clt import CLTConfig
    from llamascopium.trainer import Trainer, TrainerConfig

    layers = data["layers"]
    ins, outs = hook_names(layers)
    d_model = data["d_model"]
    extra = {"tokens": torch.zeros(args.rows, dtype=torch.long), "mask": torch.ones(args.rows)}
    batches = [b | extra for b in make_batches(data["train"], args.rows, args.steps)]  # fit iterates it twice
    cfg = CLTConfig(d_model=d_model, expansion_factor=args.d_sae / d_model, act_fn="topk", top_k=args.k,
                    hook_points_in=ins, hook_points_out=outs, norm_activation="dataset-wise",
                    decode_with_csr=decode == "csr", device="cpu", dtype=torch.float32)  # fmt: skip
    assert cfg.d_sae == args.d_sae
    torch.manual_seed(0)
    # the CLT has no encoder-from-decoder initialisation; b_D = the mean normalised target, as ours
    init = InitializerConfig(init_encoder_with_decoder_transpose=False, bias_init_method="geometric_median")
    sae = Initializer(init).initialize_sae_from_config(cfg, activation_stream=batches)
    with tempfile.TemporaryDirectory() as results:
        trainer = Trainer(
            TrainerConfig(
                lr=args.lr,
                lr_scheduler_name="constantwithwarmup",
                lr_warm_up_steps=args.warmup,
                lr_cool_down_steps=0.2,
                lr_end_ratio=0.0,
                total_training_tokens=args.rows * args.steps,
                k_warmup_steps=0,
                amp_dtype=torch.float32,
                n_checkpoints=0,
                # its per-step metrics fail on a CLT (metrics.py:221, ExplainedVarianceMetric: label [L, n, d] minus
                # label_mean [L, d] raises), so they are off: it skips work that ours does every step
                skip_metrics_calculation=True,
                log_frequency=args.steps + 1,
                exp_result_path=results,
            )
        )
        start, cpu = time.perf_counter(), time.process_time()
        trainer.fit(sae, batches)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert trainer.cur_step == args.steps, f"the peer trained {trainer.cur_step} of {args.steps} steps"
    sae.eval()
    held = data["heldout"]
    batch = sae.normalize_activations(dict(held))  # its dataset-wise scale; FVU is scale-free per layer
    x = torch.stack([batch[h] for h in ins])
    y = torch.stack([batch[h] for h in outs])

    def predict(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = sae.encode(xs.transpose(0, 1))  # [n, L, F]
        return f.transpose(0, 1), sae.decode(f)  # decode: [L, n, d]

    version = getattr(llamascopium, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("llamascopium")
    return {"seconds": seconds, "cpu_seconds": cpu, "version": version} | scores(predict, x, y)


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = torch.load(args.acts, weights_only=False)
    if args.side.startswith("ours"):
        result = train_ours(data, args, dense=args.side == "ours-dense", aux_k=args.side != "ours-noaux")
    else:
        result = train_peer(data, args, args.side.split("-", 1)[1])
    tokens = args.rows * args.steps
    result |= {"tokens_per_s": tokens / result["seconds"], "tokens_per_cpu_s": tokens / result["cpu_seconds"],
               "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ the parent (.venv)
def capture_activations(args: argparse.Namespace, path: Path) -> tuple[str, int, int, int, int]:
    # this side runs in the project's venv (the peer's child imports only torch): benchmarks/clt.py's capture
    from clt import capture  # this script's folder is on sys.path

    from workbench.circuits.sae.analysis import packed_token_tensor
    from workbench.circuits.sae.clt_analysis import matched_layers
    from workbench.datasets import load_dataset
    from workbench.references import resolve_model
    from workbench.workspace import Workspace

    workspace = Workspace().ensure()
    if not Path(args.model).exists() and ":" not in args.model:
        from workbench.zoo.train import SPECS, train_zoo_model

        if args.model in SPECS:
            train_zoo_model(args.model, workspace, progress=False)
    model = resolve_model(args.model, workspace=workspace).eval()
    layers, hook_in, hook_out = matched_layers(model, f"blocks.*.{HOOK_IN}", f"blocks.*.{HOOK_OUT}")
    assert (hook_in, hook_out) == (HOOK_IN, HOOK_OUT), (hook_in, hook_out)
    ins, outs = hook_names(layers)
    data = load_dataset(args.data)
    ids, mask = packed_token_tensor(
        model, data, max_tokens=args.max_tokens, context_length=128, batch_size=16
    )
    split = len(ids) * 3 // 4
    acts = {"train": capture(model, ids[:split], mask[:split], ins + outs),
            "heldout": capture(model, ids[split:], mask[split:], ins + outs)}  # fmt: skip
    torch.save({"layers": layers, "d_model": model.cfg.d_model} | acts, path)
    n_train, n_held = (len(acts[s][ins[0]]) for s in ("train", "heldout"))
    return model.cfg.name, len(layers), model.cfg.d_model, n_train, n_held


def run_child(python: Path | str, side: str, args: argparse.Namespace, acts: Path) -> dict:
    command = [str(python), str(Path(__file__).resolve()), "--side", side, "--acts", str(acts), "--rows",
               str(args.rows), "--steps", str(args.steps), "--d-sae", str(args.d_sae), "--k", str(args.k), "--lr",
               str(args.lr), "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"{side} run failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="code-small")
    parser.add_argument("--data", default="zoo:python-stdlib")
    parser.add_argument("--max-tokens", type=int, default=65_536)
    parser.add_argument("--d-sae", type=int, default=1024, help="latents per layer")
    parser.add_argument("--k", type=int, default=16, help="TopK latents per token and layer")
    parser.add_argument("--rows", type=int, default=512, help="activation rows (tokens) per step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3, help="both trainers (run_clt's default)")
    parser.add_argument(
        "--warmup", type=int, default=20, help="warm-up steps, both trainers (run_clt's default)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every child (1: on a shared 2-core VM a second thread mostly waits)")  # fmt: skip
    parser.add_argument("--peer-decode", default="dense,csr",
                        help="the peer's decode paths: dense (its default), csr (decode_with_csr=True) or both")  # fmt: skip
    parser.add_argument("--ours-dense", action="store_true", help="also ours with the dense TopK step")
    parser.add_argument(
        "--ours-noaux", action="store_true", help="also ours without AuxK (as the peer's CLT)"
    )
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--side", help=argparse.SUPPRESS)  # a child run: ours | peer-dense | peer-csr
    parser.add_argument("--acts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    if args.steps < 5:
        raise SystemExit(
            "--steps must be at least 5: lm-saes's scheduler divides by its cool-down, 20 % of the steps"
        )
    if not Path(args.peer_python).exists():
        raise SystemExit(f"no peer venv at {args.peer_python}: run bash benchmarks/peer_envs/llamascopium.sh")
    sides = (
        ["ours"]
        + (["ours-noaux"] if args.ours_noaux else [])
        + (["ours-dense"] if args.ours_dense else [])
        + [f"peer-{d}" for d in args.peer_decode.split(",") if d]
    )
    with tempfile.TemporaryDirectory() as tmp:
        acts = Path(tmp) / "acts.pt"
        name, n_layers, d_model, n_train, n_held = capture_activations(args, acts)
        print(f"{name}: {n_layers} layers, d_model {d_model}; {n_train} training / {n_held} held-out tokens of "
              f"{args.data!r}; CLT {n_layers} × {args.d_sae} latents, TopK k={args.k}, {args.rows} rows × "
              f"{args.steps} steps, lr {args.lr}, {args.threads} threads per run")  # fmt: skip
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides[repeat % len(sides) :] + sides[: repeat % len(sides)]:
                python = sys.executable if side.startswith("ours") else args.peer_python
                result = run_child(python, side, args, acts)
                results[side].append(result)
                print(f"  run {repeat + 1} {side:<10} {result['tokens_per_s']:8,.0f} tokens/s ({result['seconds']:.1f} s"
                      f" wall, {result['cpu_seconds']:.1f} s CPU: {result['tokens_per_cpu_s']:,.0f} tokens per "
                      "CPU-second)", flush=True)  # fmt: skip
    labels = {"ours": "ours (workbench train_saes)", "ours-dense": "ours, dense TopK step",
              "ours-noaux": "ours, no AuxK",
              "peer-dense": "lm-saes (llamascopium), dense decode",
              "peer-csr": "lm-saes (llamascopium), CSR decode"}  # fmt: skip
    print(f"{'trainer':<40} {'best tok/s':>10} {'median':>8} {'best tok/CPU-s':>14}  FVU per layer (held-out)   "
          "L0 per layer   dead")  # fmt: skip
    for side, runs in results.items():
        speeds = [r["tokens_per_s"] for r in runs]
        per_cpu = max(r["tokens_per_cpu_s"] for r in runs)
        last = runs[-1]
        fvu = " ".join(f"{v:.3f}" for v in last["fvu"])
        l0 = " ".join(f"{v:.1f}" for v in last["l0"])
        print(f"{labels[side]:<40} {max(speeds):>10,.0f} {statistics.median(speeds):>8,.0f} {per_cpu:>14,.0f}  "
              f"{fvu:<26} {l0:<14} {statistics.mean(last['dead']):.1%}")  # fmt: skip
    for side in [s for s in sides if s != "ours"]:
        ratio = {key: (max(r[key] for r in results["ours"]) / max(r[key] for r in results[side]),
                       statistics.median(r[key] for r in results["ours"])
                       / statistics.median(r[key] for r in results[side]))
                 for key in ("tokens_per_s", "tokens_per_cpu_s")}  # fmt: skip
        print(f"ours / {labels[side]}: tokens/s {ratio['tokens_per_s'][0]:.2f} (best), {ratio['tokens_per_s'][1]:.2f} "
              f"(median); tokens per CPU-second {ratio['tokens_per_cpu_s'][0]:.2f} (best), "
              f"{ratio['tokens_per_cpu_s'][1]:.2f} (median)")  # fmt: skip
    peer_version = next((r[0].get("version") for s, r in results.items() if s.startswith("peer")), "?")
    mean_fvu = {s: sum(r[-1]["fvu"]) / len(r[-1]["fvu"]) for s, r in results.items()}
    print(f"llamascopium {peer_version}; mean held-out FVU " + ", ".join(f"{s} {v:.4f}" for s, v in mean_fvu.items())
          + f"; torch {results['ours'][0]['torch']}")  # fmt: skip
    assert all(math.isfinite(v) for v in mean_fvu.values())


if __name__ == "__main__":
    main()
