"""Cross-layer transcoders through the command line (issue 32): `workbench sae train --architecture clt` on a user's
tiny GPT-2 directory and on the zoo model code-tiny, `workbench sae eval` of the CLT and of a set of per-layer
transcoders (the replacement model, its unigram baseline from the training tokens), and bad input refused with one
`error:` line and nothing written."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from workbench.circuits.sae.clt import (
    CLT_CONFIG_FILE,
    CLT_WEIGHTS_FILE,
    CLTConfig,
    CrossLayerTranscoder,
    load_clt_dir,
)
from workbench.circuits.sae.clt_analysis import TRAINING_TOKENS_FILE
from workbench.circuits.sae.distributed import ENV_KEYS
from workbench.circuits.sae.formats.circuit_tracer import load_clt
from workbench.cli import app
from workbench.faults import ENV_VAR
from workbench.store import ActivationStore
from workbench.workspace import Workspace

runner = CliRunner()
VIEWS = Path(__file__).resolve().parents[3] / "app" / "views"
HOOKS = ["--hook", "blocks.*.ln2.hook_normalized", "--hook-out", "blocks.*.hook_mlp_out"]
SMALL = ["--d-sae", "32", "--steps", "12", "--max-tokens", "1024", "--context-length", "32", "--no-progress"]
LINES = [
    "def add(first, second):    return first + second",
    "for index in range(10):    print(index * index)",
    "the quick brown fox jumps over the lazy dog again and again",
    "class Point:    def __init__(self, x, y):        self.x = x",
    "with open(path) as handle:    text = handle.read()",
] * 12


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("notes") / "notes.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def gpt2_dir(zoo_workspace, tmp_path_factory) -> Path:
    """A user's model directory: a random 2-layer GPT-2 (d_model 32) saved with the zoo's tokenizer."""
    folder = tmp_path_factory.mktemp("user") / "tiny-gpt2"
    torch.manual_seed(0)
    config = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0,
                          eos_token_id=0)  # fmt: skip
    T.GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_workspace.model_dir("code-tiny") / name, folder / name)
    return folder


def _workspace(zoo_workspace, root: Path) -> Workspace:
    workspace = Workspace(root).ensure()
    workspace.model_dir("code-tiny").symlink_to(
        zoo_workspace.model_dir("code-tiny"), target_is_directory=True
    )
    return workspace


def _cli(*args: str) -> list[str]:
    """`workbench ARGS`: exit 0; its standard output's lines."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line.strip()]


def _dead_lines(rows) -> list[str]:
    """The warning line expected of each per-layer row of a CLT's sae_evals ``rows`` with more than a quarter of
    its latents dead (a JumpReLU CLT: AuxK's CLT variants named as the fix)."""
    return [
        f"warning: {row.dead_fraction:.0%} of the {row.d_sae} latents of {row.sae_id} at {row.hook} are dead "
        f"(never active on the {row.n_tokens} evaluation tokens); train --architecture clt_topk or "
        "clt_batchtopk (their AuxK loss revives dead latents), or use a lower learning rate (lr= of "
        "workbench.circuits.sae.clt_analysis.run_clt)"
        for row in rows.itertuples()
        if row.dead_fraction > 0.25
    ]


def _unigram_ce(counts: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean next-token CE of the add-one smoothed unigram of ``counts`` over the predicted tokens of ids."""
    probs = (counts.double() + 1) / (counts.double() + 1).sum()
    targets = ids[:, 1:][(mask[:, 1:] * mask[:, :-1]).bool()]
    return float(-probs[targets].log().mean())


def test_a_clt_on_a_users_gpt2_trains_saves_and_evaluates(gpt2_dir, notes, tmp_path) -> None:
    from workbench.circuits.sae.analysis import packed_token_tensor
    from workbench.datasets import load_dataset
    from workbench.references import resolve_model

    ws = tmp_path / "ws"
    out = _cli("sae", "train", str(gpt2_dir), "--data", str(notes), "--architecture", "clt", *HOOKS, *SMALL,
               "--sae-id", "gpt2-clt", "--workspace", str(ws))  # fmt: skip
    assert out[0].startswith("CLT over 2 layers × 32 latents (d_model 32): training needs about "), out
    assert [line.split(":")[0] for line in out[1:3]] == [
        f"blocks.{i}.ln2.hook_normalized -> blocks.{i}.hook_mlp_out" for i in range(2)
    ]
    assert out[3].startswith("replacement model: CE ") and out[-1] == (
        "saved to saes/gpt2-clt; written to the workspace (sae_evals 2 rows, transcoder_replacement 1 rows)"
    )
    trained = Workspace(ws).results().read("sae_evals", sae_id="gpt2-clt").sort_values("hook")
    # the summary warns for each layer with more than 25 % of its latents dead, and only for those
    assert out[4:-1] == _dead_lines(trained), out
    folder = ws / "saes" / "gpt2-clt"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CLT_CONFIG_FILE, CLT_WEIGHTS_FILE, TRAINING_TOKENS_FILE]
    )
    clt = load_clt_dir(folder)
    assert (clt.n_layers, clt.d_model, clt.d_transcoder, clt.layers) == (2, 32, 32, [0, 1])

    lines = _cli("sae", "eval", "gpt2-clt", str(gpt2_dir), "--data", str(notes), "--context-length", "32",
                 "--no-progress", "--workspace", str(ws))  # fmt: skip
    warnings = [line for line in lines if line.startswith("warning: ")]
    lines = [line for line in lines if not line.startswith("warning: ")]
    assert len(lines) == 4, lines
    assert warnings == _dead_lines(
        Workspace(ws).results().read("sae_evals", sae_id="gpt2-clt").sort_values("hook")
    )
    assert lines[0].startswith("gpt2-clt blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out: L0 ")
    assert lines[1].startswith("gpt2-clt blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out: L0 ")
    train_store = ActivationStore.open(next((ws / "stores").iterdir()))
    n_train = train_store.n_rows
    assert "training tokens of 'notes.txt' (counted when gpt2-clt was trained)" in lines[2], lines[2]
    assert f"from the {n_train} training tokens" in lines[2], (n_train, lines[2])
    assert lines[3] == (
        f"gpt2-clt on {resolve_model(str(gpt2_dir)).cfg.name} / 'notes.txt' written to the workspace "
        "(sae_evals 2 rows, transcoder_replacement 1 rows)"
    )
    results = Workspace(ws).results()
    row = results.read("transcoder_replacement").iloc[0]
    assert row["transcoders"] == "gpt2-clt" and row["kind"] == "cross_layer" and row["n_layers"] == 2
    # the baseline: the training tokens' frequencies (the store holds exactly them) scored on the eval tokens
    counts = torch.bincount(train_store.token_ids(), minlength=512)
    model = resolve_model(str(gpt2_dir))
    ids, mask = packed_token_tensor(
        model, load_dataset(str(notes)), max_tokens=20_000, context_length=32, batch_size=16
    )
    assert row["ce_unigram"] == pytest.approx(_unigram_ce(counts, ids, mask), rel=1e-9)
    assert row["n_tokens"] == int((mask[:, 1:] * mask[:, :-1]).sum()) and row["kl"] > 0
    assert row["gain_kept"] == pytest.approx(
        (row["ce_unigram"] - row["ce_replacement"]) / (row["ce_unigram"] - row["ce_clean"])
    )
    evals = results.read("sae_evals", sae_id="gpt2-clt")
    assert len(evals) == 2 and (evals["n_tokens"] == int(mask.sum())).all()  # eval's rows replaced train's

    # the CLT trained here, by its workspace id, under the attribution graph of a prompt on the same model
    traced = _cli("circuits", "attribute", str(gpt2_dir), "--transcoders", "gpt2-clt", "--prompt", LINES[0],
                  "--no-progress", "--workspace", str(ws))  # fmt: skip
    assert traced[0].startswith("graph ") and "replacement_score" in traced[0], traced
    graph = Workspace(ws).results().read("attribution_graphs").iloc[0]
    assert json.loads(graph["transcoders"]) == ["gpt2-clt"] and graph["n_features"] > 0
    assert graph["reproduction_max_diff"] < 1e-4  # errors included, the replacement gives the model's logits
    assert 0 < graph["replacement_score"] <= graph["completeness_score"] <= 1


def test_a_clt_and_per_layer_transcoders_on_code_tiny(zoo_workspace, notes, tmp_path, monkeypatch) -> None:
    """A TopK CLT (k latents per layer and token) and a set of per-layer transcoders with the same total latents,
    each trained by one command on code-tiny, then scored by `sae eval`: the set's unigram baseline comes from
    its training store. The dashboard's SAE page shows both replacement-model rows and, for the one chosen, its
    per-layer FVU, L0, dead and dense fractions."""
    ws = _workspace(zoo_workspace, tmp_path / "ws").root
    out = _cli("sae", "train", "code-tiny", "--data", str(notes), "--architecture", "clt_topk", "--k", "4", *HOOKS,
               *SMALL, "--workspace", str(ws))  # fmt: skip
    clt_id = "code-tiny.ln2.hook_normalized.hook_mlp_out.clt_topk"
    assert (
        out[-1]
        == f"saved to saes/{clt_id}; written to the workspace (sae_evals 2 rows, transcoder_replacement 1 rows)"
    )
    assert all(" L0 4.00 " in line for line in out[1:3]), out  # TopK: exactly k per token and layer
    ins = ",".join(f"blocks.{i}.ln2.hook_normalized" for i in range(2))
    outs = ",".join(f"blocks.{i}.hook_mlp_out" for i in range(2))
    _cli("sae", "train", "code-tiny", "--data", str(notes), "--hook", ins, "--hook-out", outs, "--sae-id", "L0,L1",
         "--architecture", "topk", "--k", "4", "--d-sae", "64", *SMALL[2:], "--workspace", str(ws))  # fmt: skip
    lines = _cli("sae", "eval", "L0,L1", "code-tiny", "--data", str(notes), "--context-length", "32",
                 "--no-progress", "--workspace", str(ws))  # fmt: skip
    assert [line.split(" ")[0] for line in lines[:2]] == ["L0", "L1"], lines
    stores = sorted(Workspace(ws).stores_dir.iterdir())  # the set's store, and the CLT's (its name ends -clt)
    assert [p.name for p in stores] == ["sae-code-tiny@300-notes.txt", "sae-code-tiny@300-notes.txt-clt"]
    n_train = ActivationStore.open(stores[0]).n_rows  # both commands read the same tokens: both stores named
    assert (f"from the {n_train} training tokens of 'notes.txt' (store {stores[0].name}; store {stores[1].name})"
            in lines[2]), lines  # fmt: skip
    assert lines[-1] == (
        "L0+L1 on code-tiny / 'notes.txt' written to the workspace (sae_evals 2 rows, transcoder_replacement 1 rows)"
    )
    rows = Workspace(ws).results().read("transcoder_replacement").set_index("transcoders")
    assert sorted(rows.index) == sorted([clt_id, "L0+L1"])
    assert rows.loc["L0+L1", "kind"] == "per_layer" and rows.loc[clt_id, "kind"] == "cross_layer"
    assert rows.loc["L0+L1", "mean_L0"] == pytest.approx(4.0) and rows.loc[
        clt_id, "mean_L0"
    ] == pytest.approx(4.0)
    evals = Workspace(ws).results().read("sae_evals")
    assert {"L0", "L1"} <= set(evals["sae_id"])  # the set's per-layer rows keep the transcoders' own ids

    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(ws))
    page = AppTest.from_file(str(VIEWS / "sae.py"), default_timeout=60).run()
    assert not page.exception, page.exception
    assert "Replacement model (transcoders)" in [h.value for h in page.subheader]
    shown = next(f.value for f in page.dataframe if "gain_kept" in f.value.columns).set_index("transcoders")
    assert sorted(shown.index) == sorted(rows.index)
    for column in (
        "kind",
        "mean_L0",
        "kl",
        "ce_replacement",
        "ce_clean",
        "ce_unigram",
        "gain_kept",
        "n_tokens",
    ):
        assert shown[column].to_dict() == rows[column].to_dict(), column
    for chosen, ids in ((clt_id, [clt_id, clt_id]), ("L0+L1", ["L0", "L1"])):
        page.selectbox(key="replacement-transcoders").select(chosen).run()
        assert not page.exception, page.exception
        layers = next(f.value for f in page.dataframe if "dead_fraction" in f.value.columns and "hook_out" in
                      f.value.columns and "ce_recovered" not in f.value.columns)  # fmt: skip
        assert layers["sae_id"].tolist() == ids and layers["hook"].tolist() == ins.split(","), layers
        stored = evals.set_index(["sae_id", "hook"]).loc[list(zip(ids, ins.split(","), strict=True))]
        for column in ("L0", "FVU", "dead_fraction", "dense_fraction"):
            assert layers[column].tolist() == stored[column].tolist(), (chosen, column)


@pytest.mark.parametrize(
    "options, reason",
    [
        (["--hook", "blocks.*.ln9.hook_normalized", "--hook-out", "blocks.*.hook_mlp_out"],
         "error: --hook 'blocks.*.ln9.hook_normalized' matches no hook of "),
        (["--hook", "blocks.*.ln2.hook_normalized", "--hook-out", "blocks.0.hook_mlp_out"],
         "error: --hook 'blocks.*.ln2.hook_normalized' matches layers [0, 1] but --hook-out 'blocks.0.hook_mlp_out' "
         "matches layers [0]: give patterns that match the same layers"),
        (["--hook", "blocks.*.ln2.hook_normalized", "--hook-out", "blocks.*.hook_mlp_nowhere"],
         "error: --hook-out 'blocks.*.hook_mlp_nowhere' matches no hook of "),
        ([*HOOKS, "--d-sae", "4000000000"], "too large; use fewer layers (a narrower --hook pattern), a smaller --d-sae"),
    ],
    ids=["no-layer", "different-layers", "hook-out-no-layer", "too-large"],
)  # fmt: skip
def test_bad_clt_input_exits_2_with_one_line_and_writes_nothing(gpt2_dir, notes, tmp_path, options, reason):
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["sae", "train", str(gpt2_dir), "--data", str(notes), "--architecture", "clt",
                                 *options, "--steps", "2", "--no-progress", "--workspace", str(ws)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and reason in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert not ws.exists()


def test_a_model_without_mlps_exits_2_with_one_line_and_writes_nothing(
    notes, zoo_workspace, tmp_path, monkeypatch
):
    """An attention-only TransformerLens model (attn_only=True: no MLP blocks, though its config keeps a default
    d_mlp) given to `sae train --architecture clt`: exit 2, one line naming the problem and the fix."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.circuits.sae import cli as sae_cli
    from workbench.references import resolve_model

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=512,
                                  attn_only=True, tokenizer_name=None)  # fmt: skip
    torch.manual_seed(0)
    attn_only = resolve_model(HookedTransformer(cfg))
    attn_only.tokenizer = resolve_model("code-tiny", workspace=zoo_workspace).tokenizer
    assert attn_only.cfg.d_mlp == 0 and not [
        h for h in attn_only.hook_names() if "ln2" in h or "mlp.hook" in h
    ]
    monkeypatch.setattr(sae_cli, "open_model", lambda *args, **kwargs: attn_only)
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["sae", "train", "attn-only", "--data", str(notes), "--architecture", "clt", *HOOKS,
                                 "--steps", "2", "--no-progress", "--workspace", str(ws)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {attn_only.cfg.name} has no MLP blocks (d_mlp = 0): a cross-layer transcoder replaces MLPs; pick a "
        "model with MLPs"
    ]
    assert not ws.exists()


# ------------------------------------------------------------------------------------ processes
WORLD, STEPS, ROWS_PER_STEP = 2, 6, 64
PARALLEL = ["--architecture", "clt_batchtopk", "--k", "4", *HOOKS, "--d-sae", "16", "--steps", str(STEPS),
            "--max-tokens", "1024", "--context-length", "32", "--train-batch-size", str(ROWS_PER_STEP),
            "--no-progress"]  # fmt: skip
TIME_LIMIT_S = 240  # a run that has not ended by then hangs


def _run(args: list[str], cwd: Path, crash: str | None = None) -> subprocess.Popen:
    """`workbench ARGS` as a user's process (not inside a torchrun job; with ``crash``, killed by SIGKILL at that
    crash point), one thread per process."""
    env = {key: value for key, value in os.environ.items() if key not in (*ENV_KEYS, ENV_VAR)}
    env |= {"OMP_NUM_THREADS": "1"} | ({ENV_VAR: crash} if crash else {})
    command = [str(Path(sys.executable).parent / "workbench"), *args]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIME_LIMIT_S)
    return process.returncode, out, err


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_clt_dir(folder).state_dict()


def test_two_data_parallel_processes_equal_one_process_on_the_global_batches(zoo_workspace, notes, tmp_path):
    """`sae train --architecture clt_batchtopk --nproc 2` (gloo): each rank captures its own documents; the saved CLT
    equals one process training the same CLT on the global batches (both ranks' batches of their stores
    concatenated, rank 0's first), the BatchTopK cut taken over the global batch (rtol 1e-4: the ranks sum
    gradients in another order)."""
    from workbench.circuits.sae.analysis import _rows_stream
    from workbench.circuits.sae.train import TrainConfig, seeded_clt, train_saes

    ws = _workspace(zoo_workspace, tmp_path / "ws")
    code, out, err = _finish(_run(["sae", "train", "code-tiny", "--data", str(notes), *PARALLEL, "--sae-id", "clt",
                                   "--workspace", str(ws.root), "--nproc", str(WORLD)], tmp_path))  # fmt: skip
    assert code == 0, out + err
    assert "Traceback" not in err and "error:" not in err, err
    lines = out.splitlines()
    assert lines[-2:] == [
        f"{WORLD} data-parallel processes (every process trained the CLT)",
        "saved to saes/clt; written to the workspace (sae_evals 2 rows, transcoder_replacement 1 rows)",
    ], out
    assert out.count("saved to saes/clt") == 1  # rank 0 reports and writes
    stores = [ActivationStore.open(p) for p in sorted(ws.stores_dir.iterdir())]
    assert [s.path.name[-len("rank0-of-2") :] for s in stores] == [
        f"rank{r}-of-{WORLD}" for r in range(WORLD)
    ]
    saved = load_clt_dir(ws.root / "saes" / "clt")
    ins, outs = saved.hook_names
    streams = [_rows_stream(store, ins + outs, ROWS_PER_STEP // WORLD, None) for store in stores]
    batches = [{h: torch.cat([b[h] for b in parts]) for h in ins + outs}
               for parts in (tuple(next(s) for s in streams) for _ in range(STEPS))]  # fmt: skip
    cfg = copy.deepcopy(saved.cfg)
    cfg.activation = "batchtopk"  # saved as JumpReLU at its learned thresholds
    options = TrainConfig(
        steps=STEPS, lr=3e-3, warmup_steps=STEPS, progress=False, dead_after_tokens=10 * ROWS_PER_STEP
    )
    alone = train_saes({"clt": seeded_clt(cfg, 0)}, batches, options).saes["clt"]
    want = alone.inference_state()[1]
    got = saved.inference_state()[1]
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()) + 1e-7,
                                   msg=lambda m, k=key: f"{k}: {m}")  # fmt: skip


def _cli_child(crash: str | None, args: list[str], stdout_path: Path) -> None:
    """``workbench ARGS`` in this (forked) process on one thread, its output written to ``stdout_path``; with
    ``crash`` it SIGKILLs itself there. (A file, not the test's captured fd 1: a forkserver started by an earlier test
    keeps the fd 1 of that test's capture.)"""
    torch.set_num_threads(1)
    os.environ.pop(ENV_VAR, None)
    if crash:
        os.environ[ENV_VAR] = crash
    result = runner.invoke(app, args)
    stdout_path.write_text(result.stdout)
    sys.exit(result.exit_code)


def test_a_clt_run_killed_by_sigkill_resumes_to_the_uninterrupted_weights(zoo_workspace, notes, tmp_path):
    """`sae train --architecture clt --checkpoint-every 2` killed by SIGKILL right after its second checkpoint
    (step 4 of 6), then the same command again: it says it resumes, and the saved CLT is byte for byte the one an
    uninterrupted run saves. Each run is a process forked from a forkserver that imported the CLI once."""
    args = ["sae", "train", "code-tiny", "--data", str(notes), "--architecture", "clt", *HOOKS, "--d-sae", "16",
            "--steps", str(STEPS), "--max-tokens", "1024", "--context-length", "32", "--train-batch-size",
            str(ROWS_PER_STEP), "--no-progress", "--sae-id", "clt", "--checkpoint-every", "2"]  # fmt: skip
    roots = [_workspace(zoo_workspace, tmp_path / name).root for name in ("killed", "straight")]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.circuits.sae.test_clt_cli", "workbench.circuits.sae.clt_analysis",
                                "workbench.model", "transformers.models.gpt_neox.modeling_gpt_neox",
                                "safetensors.torch", "tqdm.auto"])  # fmt: skip

    stdout_path = tmp_path / "stdout.txt"

    def run(root: Path, crash: str | None = None) -> int:
        process = ctx.Process(target=_cli_child, args=(crash, [*args, "--workspace", str(root)], stdout_path))
        process.start()
        process.join(TIME_LIMIT_S)
        assert process.exitcode is not None, "the run hangs"
        return process.exitcode

    assert run(roots[0], crash="sae.checkpoint_saved#2") == -signal.SIGKILL
    assert not (roots[0] / "saes").exists()
    (state_dir,) = (roots[0] / "jobs").iterdir()
    assert torch.load(state_dir / "trainer_state.pt", weights_only=True)["step"] == 4
    assert run(roots[0]) == 0
    assert stdout_path.read_text().splitlines()[0] == f"resuming from the checkpoint in {state_dir}"
    assert not state_dir.exists()  # removed once the CLT is saved
    assert run(roots[1]) == 0
    weights = [(root / "saes" / "clt" / CLT_WEIGHTS_FILE).read_bytes() for root in roots]
    assert weights[0] == weights[1]


# ------------------------------------------------------------------------------------ formats
def _random_clt(skip: bool = False, seed: int = 0) -> CrossLayerTranscoder:
    """A JumpReLU CLT for the tiny GPT-2 (2 layers, d_model 32, 24 latents per layer), every tensor random."""
    g = torch.Generator().manual_seed(seed)
    cfg = CLTConfig(2, 32, 24, skip=skip)
    return CrossLayerTranscoder(torch.randn(2, 32, 24, generator=g) / 4, torch.randn(2, 24, generator=g) / 4,
                                torch.rand(2, 24, generator=g) * 0.2,
                                [torch.randn(24, 2 - i, 32, generator=g) / 8 for i in range(2)],
                                torch.randn(2, 32, generator=g) / 8, cfg.hook_in, cfg.hook_out,
                                torch.randn(2, 32, 32, generator=g) / 8 if skip else None, cfg)  # fmt: skip


def _refused(args: list[str], reason: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and reason in errors[-1], result.stderr
    assert "Traceback" not in result.output


def test_the_clt_summary_warns_for_each_layer_with_more_than_a_quarter_of_its_latents_dead(
    gpt2_dir, notes, tmp_path
) -> None:
    """Half of layer 0's latents can never fire (b_enc −100): `sae eval` warns for layer 0 (its dead fraction from
    the stored row, at least that half) and not for layer 1, whose latents are random and fire."""
    clt = _random_clt()
    with torch.no_grad():
        clt.b_enc[0, :12] = -100.0
    ws = tmp_path / "ws"
    clt.save(ws / "saes" / "half-dead")
    lines = _cli("sae", "eval", "half-dead", str(gpt2_dir), "--data", str(notes), "--context-length", "32",
                 "--no-progress", "--workspace", str(ws))  # fmt: skip
    rows = Workspace(ws).results().read("sae_evals", sae_id="half-dead").sort_values("hook")
    assert rows["dead_fraction"].iloc[0] >= 0.5 and rows["dead_fraction"].iloc[1] <= 0.25, rows
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert (
        warnings == _dead_lines(rows)
        and len(warnings) == 1
        and " at blocks.0.ln2.hook_normalized " in warnings[0]
    )
    assert lines.index(warnings[0]) == len(lines) - 2  # after the replacement line, before the closing line


def test_import_eval_and_export_of_a_circuit_tracer_clt(gpt2_dir, notes, zoo_workspace, tmp_path) -> None:
    """circuit-tracer's CLT folder: `sae eval` reads it in place; `sae import` registers it (checked against
    --model first), `sae export --format circuit-tracer` writes it back equal (1e-6); CLTs refused where they do
    not fit: another model's widths, another layout, skip connections, a list of per-layer transcoders."""
    original = _random_clt()
    folder = original.save_circuit_tracer(tmp_path / "ct-clt")
    ws = _workspace(zoo_workspace, tmp_path / "ws").root
    common = ["--workspace", str(ws)]
    _refused(["sae", "import", str(folder), "--id", "ct", "code-tiny", *common],
             "CLT 'ct' has d_model=32, but blocks.0.ln2.hook_normalized of code-tiny has width 64")  # fmt: skip
    assert not (ws / "saes").exists() or not any((ws / "saes").iterdir())
    assert _cli("sae", "import", str(folder), "--id", "ct", str(gpt2_dir), *common) == [
        "imported ct: cross-layer transcoder (jumprelu) over 2 layers, d_model=32 d_transcoder=24 "
        "(blocks.0.ln2.hook_normalized … blocks.1.hook_mlp_out)"
    ]
    assert sorted(p.name for p in (ws / "saes" / "ct").iterdir()) == [
        CLT_WEIGHTS_FILE,
        "source.json",
        CLT_CONFIG_FILE,
    ]

    lines = _cli("sae", "eval", str(folder), str(gpt2_dir), "--data", str(notes), "--context-length", "32",
                 "--no-progress", *common)  # fmt: skip
    assert "(no training token counts found)" in lines[2] and lines[2].startswith("replacement model ("), (
        lines
    )
    in_place = Workspace(ws).results().read("transcoder_replacement", transcoders="ct-clt").iloc[0]
    _cli(
        "sae",
        "eval",
        "ct",
        str(gpt2_dir),
        "--data",
        str(notes),
        "--context-length",
        "32",
        "--no-progress",
        *common,
    )
    imported = Workspace(ws).results().read("transcoder_replacement", transcoders="ct").iloc[0]
    for column in ("ce_clean", "ce_replacement", "ce_unigram", "kl", "mean_L0", "n_tokens"):
        assert imported[column] == pytest.approx(in_place[column], rel=1e-6), column

    out = tmp_path / "exported"
    assert _cli("sae", "export", "ct", "--format", "circuit-tracer", "--out", str(out), *common) == [
        f"ct written as circuit-tracer's cross_layer_transcoder to {out} (2 layers: config.yaml, W_enc_L / "
        "W_dec_L.safetensors)"
    ]
    back = load_clt(out)
    for name, value in original.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, atol=1e-6, rtol=1e-6, msg=name)

    import sae_lens
    from sae_lens.registry import SAE_CLASS_REGISTRY

    assert sae_lens.__version__.startswith("6.")  # the SAELens whose classes were read for the refusal below
    assert not [a for a in SAE_CLASS_REGISTRY if "clt" in a or "cross" in a], sorted(SAE_CLASS_REGISTRY)
    version = ".".join(sae_lens.__version__.split(".")[:2])
    _refused(["sae", "export", "ct", "--format", "saelens", "--out", str(tmp_path / "x"), *common],
             f"error: SAELens {version} has no cross-layer transcoder class (its transcoders read and write one "
             "layer, and a CLT's layer-i latents also write every later layer, so no per-layer split is exact): "
             "export it with --format circuit-tracer (circuit-tracer's CLT layout)")  # fmt: skip
    _refused(["sae", "export", "ct", "--format", "sparsify", "--out", str(tmp_path / "x"), *common],
             "a cross-layer transcoder exports to --format circuit-tracer")  # fmt: skip
    _random_clt(skip=True).save(ws / "saes" / "skip-clt")
    _refused(["sae", "export", "skip-clt", "--format", "circuit-tracer", "--out", str(tmp_path / "y"), *common],
             "circuit-tracer's CLT layout holds JumpReLU / ReLU CLTs without skip connections")  # fmt: skip
    _refused(["sae", "eval", "ct,skip-clt", str(gpt2_dir), "--data", str(notes), *common],
             "'ct' is a cross-layer transcoder or a circuit-tracer transcoder set: score it alone")  # fmt: skip
    _refused(["sae", "features", "ct", str(gpt2_dir), "--data", str(notes), *common],
             "holds a cross-layer transcoder (workbench_clt.json)")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
