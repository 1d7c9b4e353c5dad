"""Results identity (issue 29): two checkpoint series whose folders share a base name (``exp-a/series``,
``exp-b/series``), and two single models likewise (``exp-a/model``, ``exp-b/model``), never overwrite or
impersonate each other. Every analysis and trainer run on both keeps both sets of rows and files, and each set
equals what the analysis gives for that model alone; an explicit id that belongs to another model is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from workbench.cli import app
from workbench.identity import directory_identity, display_name, identity_slug
from workbench.references import resolve_model, resolve_series
from workbench.workspace import Workspace

runner = CliRunner()
TEXTS = [
    "def add(a, b): return a + b",
    "import os ; print(os.path.join('a', 'b'))",
    "for i in range(10): print(i * i)",
    "class Point: def __init__(self, x): self.x = x",
    "data = {'a': [1, 2, 3], 'b': (4, 5)}",
    "while True: break",
] * 3
COMMON = ["--no-progress", "--context-length", "16"]


def _save(model: T.PreTrainedModel, folder: Path, tokenizer_from: Path) -> None:
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)


@pytest.fixture(scope="module")
def twins(zoo_workspace, tmp_path_factory):
    """exp-a/{series,model} (GPT-2 architecture) and exp-b/{series,model} (Llama / GPT-NeoX), random weights at equal
    widths, the zoo's tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("twins")
    tokenizer = zoo_workspace.model_dir("code-tiny")
    gpt2 = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    llama = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=512, max_position_embeddings=64)  # fmt: skip
    for step in (0, 100):
        torch.manual_seed(step)
        _save(T.GPT2LMHeadModel(T.GPT2Config(**gpt2)), root / "exp-a" / "series" / f"step{step}", tokenizer)
        torch.manual_seed(1000 + step)
        _save(
            T.LlamaForCausalLM(T.LlamaConfig(**llama)), root / "exp-b" / "series" / f"step{step}", tokenizer
        )
    torch.manual_seed(1)
    _save(T.GPT2LMHeadModel(T.GPT2Config(**gpt2)), root / "exp-a" / "model", tokenizer)
    torch.manual_seed(2)
    neox = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=512,
                max_position_embeddings=64)  # fmt: skip
    _save(T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**neox)), root / "exp-b" / "model", tokenizer)
    (root / "notes.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return root


def _ids(root: Path, kind: str) -> tuple[str, str]:
    return directory_identity(root / "exp-a" / kind), directory_identity(root / "exp-b" / kind)


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _rows(workspace: Path, table: str, model: str, drop: tuple[str, ...] = ()) -> pd.DataFrame:
    rows = Workspace(workspace).results().read(table, model=model)
    dropped = [c for c in ("created_at", "workbench_version", *drop) if c in rows.columns]
    order = [
        c for c in ("checkpoint", "hook", "metric", "method", "layer", "head", "prompt") if c in rows.columns
    ]
    return rows.drop(columns=dropped).sort_values(order).reset_index(drop=True)


def test_one_identity_per_model_however_it_is_spelled(twins, monkeypatch) -> None:
    series_a, series_b = _ids(twins, "series")
    assert series_a != series_b and display_name(series_a) == "exp-a/series"
    assert identity_slug(series_a) != identity_slug(series_b)
    monkeypatch.chdir(twins)
    spellings = [
        "exp-a/series@100",
        f"{twins}/exp-a/series@last",
        "./exp-a/series/step100",
        "exp-a/../exp-a/series@step100",
    ]
    loaded = [resolve_model(ref) for ref in spellings]
    assert {(m.cfg.name, m.cfg.checkpoint) for m in loaded} == {(series_a, 100)}
    assert resolve_series("exp-b/series").name == series_b
    assert resolve_model("exp-a/model").cfg.name == resolve_model(twins / "exp-a" / "model").cfg.name
    assert resolve_model("exp-a/model").cfg.name != resolve_model("exp-b/model").cfg.name


@pytest.mark.parametrize("command", ["massive run", "dynamics run"])
def test_series_analyses_keep_both_series(twins, tmp_path, command) -> None:
    """Both series in one workspace: both sets of rows, each equal to the series analysed alone."""
    ids = _ids(twins, "series")
    table = {"massive run": "massive_layers", "dynamics run": "dynamics_metrics"}[command]
    both, alone = tmp_path / "both", tmp_path / "alone"
    for exp in ("exp-a", "exp-b"):
        _cli(
            *command.split(),
            str(twins / exp / "series"),
            "--data",
            str(twins / "notes.txt"),
            "-w",
            str(both),
            *COMMON,
        )
    _cli(
        *command.split(),
        str(twins / "exp-b" / "series"),
        "--data",
        str(twins / "notes.txt"),
        "-w",
        str(alone),
        *COMMON,
    )
    a, b = (_rows(both, table, m) for m in ids)
    assert (
        len(a) and len(b) and sorted(a["checkpoint"].unique()) == sorted(b["checkpoint"].unique()) == [0, 100]
    )
    value = a.select_dtypes("number").columns.difference(["checkpoint"])
    assert not a[value].equals(b[value])  # the Llama's numbers are not the GPT-2's
    pd.testing.assert_frame_equal(b, _rows(alone, table, ids[1]), check_dtype=False)


def test_attention_and_sae_training_keep_both_models(twins, tmp_path) -> None:
    ids = _ids(twins, "model")
    ws = tmp_path / "ws"
    hook = "blocks.0.hook_resid_post"
    train = ["--hook", hook, "--d-sae", "32", "--k", "4", "--steps", "5", "--max-tokens", "400"]
    for exp in ("exp-a", "exp-b"):
        _cli(
            "attention",
            "run",
            str(twins / exp / "model"),
            "--data",
            str(twins / "notes.txt"),
            "-w",
            str(ws),
            *COMMON,
        )
        _cli("sae", "train", str(twins / exp / "model"), "--data", str(twins / "notes.txt"), *train, "-w", str(ws),
             *COMMON)  # fmt: skip
    for model in ids:
        assert len(_rows(ws, "attention_stats", model)) == 2 * 4
    evals = Workspace(ws).results().read("sae_evals")
    assert sorted(evals["model"]) == sorted(ids) and evals["sae_id"].nunique() == 2
    saes = sorted(p.name for p in (ws / "saes").iterdir())
    assert saes == sorted(f"{identity_slug(m)}.{hook}.topk" for m in ids)
    stores = [p.name for p in (ws / "stores").iterdir() if p.name.startswith("sae-")]
    assert len(stores) == 2 and all(any(identity_slug(m) in s for s in stores) for m in ids)
    # A's SAE id asked for B: refused, naming the owner and the fix; A's SAE stays as it was.
    before = (ws / "saes" / saes[0] / "sae_weights.safetensors").read_bytes()
    owner = next(m for m in ids if identity_slug(m) in saes[0])
    other = next(m for m in ids if m != owner)
    refused = runner.invoke(app, ["sae", "train", other, "--data", str(twins / "notes.txt"), *train, "--sae-id",
                                  saes[0], "-w", str(ws), *COMMON])  # fmt: skip
    assert refused.exit_code == 2 and "already belongs to" in refused.output and owner in refused.output
    assert (ws / "saes" / saes[0] / "sae_weights.safetensors").read_bytes() == before
    # The other model's SAE evaluated on this one (same widths): it runs, with a warning naming both models.
    evaluated = runner.invoke(app, ["sae", "eval", saes[0], other, "--data", str(twins / "notes.txt"),
                                    "--max-tokens", "200", "-w", str(ws), *COMMON])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "warning:" in evaluated.output and owner in evaluated.output and other in evaluated.output


def test_probe_job_tasks_of_same_named_series_are_separate(twins, tmp_path) -> None:
    from workbench.probes.jobs import run_job

    ws = Workspace(tmp_path / "ws").ensure()
    job = tmp_path / "job.toml"
    table = '[[probe]]\nmodel = "{}"\ncheckpoints = "all"\nhooks = "blocks.0.hook_resid_post"\nlabel_sets = ["bracket_depth"]\n'
    job.write_text('name = "twins"\n[settings]\nn_sequences = 8\ncontext_length = 16\nrandom_init = false\n'
                   + "".join(table.format(twins / exp / "series") for exp in ("exp-a", "exp-b")))  # fmt: skip
    status = run_job(job, workspace=ws, progress=False)
    assert list(status["status"]) == ["done"] * 4 and status["task"].nunique() == 4
    assert not any(task.startswith("series@") for task in status["task"])
    rows = ws.results().read("probe_results")
    assert sorted(rows["model"].unique()) == sorted(_ids(twins, "series"))
    assert len({task.split("@")[0] for task in status["task"]}) == 2


def test_codebook_run_of_another_model_is_refused(twins, tmp_path) -> None:
    ws = tmp_path / "ws"
    args = ["--data", str(twins / "notes.txt"), "--site", "blocks.0.hook_mlp_out", "--n-codes", "8", "--steps", "2",
            "--max-tokens", "400", "-w", str(ws), *COMMON]  # fmt: skip
    _cli("codebook", "train", str(twins / "exp-a" / "model"), *args, "--run", "shared-run")
    saved = (ws / "codebooks" / "shared-run" / "codebooks.safetensors").read_bytes()
    refused = runner.invoke(
        app, ["codebook", "train", str(twins / "exp-b" / "model"), *args, "--run", "shared-run"]
    )
    assert refused.exit_code == 2 and "holds codebooks of" in refused.output, refused.output
    assert (ws / "codebooks" / "shared-run" / "codebooks.safetensors").read_bytes() == saved
    for exp in ("exp-a", "exp-b"):  # default runs: named from each model's identity
        _cli("codebook", "train", str(twins / exp / "model"), *args)
    runs = sorted(p.name for p in (ws / "codebooks").iterdir())
    assert len(runs) == 3 and all(r == "shared-run" or r.startswith("model-") for r in runs), runs


def test_neuron_paths_keep_both_models_each_equal_to_it_alone(twins, tmp_path) -> None:
    ids = _ids(twins, "model")
    args = ["--data", str(twins / "notes.txt"), "--no-progress", "--position", "3", "--n-targets", "1", "--steps",
            "4", "--max-sequences", "6"]  # fmt: skip
    for exp in ("exp-a", "exp-b"):
        _cli("neuron-path", "run", str(twins / exp / "model"), *args, "-w", str(tmp_path / "both"))
    _cli("neuron-path", "run", str(twins / "exp-a" / "model"), *args, "-w", str(tmp_path / "alone"))
    both = [_rows(tmp_path / "both", "neuron_path_metrics", m) for m in ids]
    assert all(len(rows) for rows in both) and not both[0]["method"].empty
    pd.testing.assert_frame_equal(
        both[0], _rows(tmp_path / "alone", "neuron_path_metrics", ids[0]), check_dtype=False
    )
