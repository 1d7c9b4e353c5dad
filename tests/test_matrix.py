"""Issue 15's acceptance matrix: every analysis command × {a zoo checkpoint, a GPT-2-architecture directory that is
not from the zoo, MiniLM, a Pythia-style series through the offline hub cache} × {a text file, a jsonl column, a
save_to_disk folder}, plus a TransformerLens HookedTransformer through the Python API. Each cell either writes its
result rows (read back from the results DB, with the cell's model and dataset) or, where the analysis does not apply,
fails at once — exit 2, one line, the reason — having written nothing."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from workbench.cli import app
from workbench.identity import display_name
from workbench.workspace import Workspace

runner = CliRunner()
TEXTS = [
    "def add(a, b):\n    return a + b",
    "import os\nprint(os.path.join('a', 'b'))",
    "for i in range(10):\n    print(i * i)",
    "class Point:\n    def __init__(self, x):\n        self.x = x",
    "data = {'a': [1, 2, 3], 'b': (4, 5)}",
    "while True:\n    break",
]
MODELS = ("zoo", "gpt2-dir", "minilm", "hub")
DATASETS = ("text", "jsonl", "hf-disk")


@pytest.fixture(scope="module")
def matrix(zoo_workspace, hub_repo, tmp_path_factory):
    """A fresh workspace (holding the zoo models), the model references and the dataset references of the matrix."""
    root = tmp_path_factory.mktemp("matrix")
    workspace = root / "workspace"
    shutil.copytree(zoo_workspace.model_dir("code-tiny"), workspace / "models" / "code-tiny")
    gpt2 = root / "my-gpt2"
    torch.manual_seed(0)
    T.GPT2LMHeadModel(
        T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    ).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_workspace.model_dir("code-tiny") / name, gpt2 / name)
    (root / "notes.txt").write_text("\n".join(t.replace("\n", " ; ") for t in TEXTS) + "\n", encoding="utf-8")
    snippets = TEXTS + [
        f"for k in range({i}):\n    total += k" if i % 2 else f"value = {i} * {i}" for i in range(14)
    ]
    (root / "rows.jsonl").write_text("".join(json.dumps({"code": t, "loop": str("for" in t or "while" in t)}) + "\n"
                                             for t in snippets), encoding="utf-8")  # fmt: skip
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(root / "hf"))
    models = {"zoo": "code-tiny@300", "gpt2-dir": str(gpt2), "minilm": "minilm", "hub": hub_repo}
    data = {
        "text": str(root / "notes.txt"),
        "jsonl": f"{root / 'rows.jsonl'}:code",
        "hf-disk": str(root / "hf"),
    }
    names = {"text": "notes.txt", "jsonl": "rows.jsonl:code", "hf-disk": "hf"}
    return {"workspace": workspace, "models": models, "data": data, "dataset_names": names}


def _model_name(matrix, model: str) -> str:
    """The model name result rows carry for a matrix model."""
    return {"zoo": "code-tiny", "minilm": "minilm", "hub": matrix["models"]["hub"]}.get(
        model, matrix["models"]["gpt2-dir"]
    )


def _invoke(args: list[str]):
    start = time.monotonic()
    result = runner.invoke(app, args)
    return result, time.monotonic() - start


def _assert_refused(result, reason: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and reason in lines[-1], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_massive(matrix, model, dataset) -> None:
    ws = matrix["workspace"]
    args = ["massive", "run", matrix["models"][model], "--data", matrix["data"][dataset], "--workspace", str(ws),
            "--no-progress", "--context-length", "32"]  # fmt: skip
    if model == "hub":
        args += ["--step", "0", "--step", "1", "--step", "2", "--step", "3", "--step", "300"]
    result, _ = _invoke(args)
    assert result.exit_code == 0, result.output
    rows = Workspace(ws).results().read("massive_layers", model=_model_name(matrix, model),
                              dataset=matrix["dataset_names"][dataset])  # fmt: skip
    assert len(rows) > 0 and rows["top1"].gt(0).all()
    if (
        model == "hub"
    ):  # a series: one row per distinct checkpoint and hook, step3 (= step2's bytes) analysed once
        assert sorted(rows["checkpoint"].unique()) == [0, 1, 2, 300]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_attention(matrix, model, dataset) -> None:
    ws = matrix["workspace"]
    ref = matrix["models"][model] + ("@step300" if model == "hub" else "")
    result, _ = _invoke(["attention", "run", ref, "--data", matrix["data"][dataset], "--workspace", str(ws),
                         "--no-progress", "--context-length", "32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = Workspace(ws).results().read("attention_stats", model=_model_name(matrix, model),
                              dataset=matrix["dataset_names"][dataset])  # fmt: skip
    assert len(rows) > 0 and rows["entropy"].ge(0).all() and rows["sink"].between(0, 1).all()


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_capture(matrix, model, dataset) -> None:
    from workbench.store import ActivationStore

    out = matrix["workspace"] / "stores" / f"{model}-{dataset}"
    result, _ = _invoke(["capture", matrix["models"][model], "--hooks", "blocks.0.hook_resid_post", "--data",
                         matrix["data"][dataset], "--out", str(out), "--workspace", str(matrix["workspace"]),
                         "--no-progress", "--context-length", "32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(out, verify="full")
    assert store.n_rows > len(TEXTS) and store.manifest["dataset"] == matrix["dataset_names"][dataset]


@pytest.fixture(scope="module")
def tl_model(matrix):
    """A TransformerLens HookedTransformer (rotary, GELU MLPs) wrapped by the resolver, with the zoo tokenizer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.references import resolve_model

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=512, act_fn="gelu",
                                  d_mlp=64, positional_embedding_type="rotary", tokenizer_name=None)  # fmt: skip
    torch.manual_seed(0)
    model = resolve_model(HookedTransformer(cfg))
    model.tokenizer = resolve_model("code-tiny", workspace=matrix["workspace"]).tokenizer
    return model


@pytest.mark.parametrize("dataset", DATASETS)
def test_transformer_lens_model_through_the_python_api(matrix, tl_model, dataset, tmp_path) -> None:
    """The in-memory TransformerLens model through every analysis's library function (the CLI takes tl:NAME, which
    needs the hub)."""
    from workbench.analyses.massive.analysis import detect_massive
    from workbench.attention.statistics import attention_statistics
    from workbench.circuits.codebook.analysis import run as analyse_codebooks
    from workbench.circuits.codebook.train import train as train_codebooks
    from workbench.circuits.neuron_path import analysis as neuron_path
    from workbench.circuits.sae.analysis import run as run_saes
    from workbench.datasets import load_dataset
    from workbench.probes.analysis import ProbeSettings, labels_for_model
    from workbench.probes.analysis import run as run_probes

    model, data = tl_model, load_dataset(matrix["data"][dataset])
    report = detect_massive(model, data, dataset=data.name, context_length=32)
    assert len(report.layers) == 2 and report.layers["top1"].gt(0).all()
    assert len(attention_statistics(model, data, context_length=32)) == 2 * 4
    saes = run_saes(model, data, {"tl-sae": {"architecture": "topk", "d_sae": 32, "k": 4,
                                            "hook_in": "blocks.0.hook_resid_post"}},
                    workspace=tmp_path, max_tokens=400, context_length=32, steps=5, progress=False)  # fmt: skip
    assert len(saes["sae_evals"]) == 1 and saes["sae_evals"]["ce_recovered"].notna().all()
    paths = neuron_path.run(model, data, position=3, n_targets=1, steps=4, max_sequences=6, progress=False)
    assert len(paths["neuron_path_metrics"]) > 0
    books, report = train_codebooks(model, data, n_codes=8, steps=3, context_length=16, directory=tmp_path / "cb",
                                    progress=False)  # fmt: skip
    assert len(analyse_codebooks(model, data, books, context_length=16)["codebook_codes"]) > 0
    labels = labels_for_model(
        "zoo:inside_string", model, data=data, settings=ProbeSettings(random_init=False)
    )
    rows = run_probes(model, labels=labels, settings=ProbeSettings(random_init=False))["probe_results"]
    assert len(rows) == 2 and rows["score"].notna().all()


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_neuron_path(matrix, model, dataset) -> None:
    ws = matrix["workspace"]
    ref = matrix["models"][model] + ("@step300" if model == "hub" else "")
    result, seconds = _invoke(["neuron-path", "run", ref, "--data", matrix["data"][dataset], "--workspace", str(ws),
                               "--no-progress", "--position", "3", "--n-targets", "1", "--steps", "4",
                               "--max-sequences", "6"])  # fmt: skip
    if model == "minilm":  # an encoder whose forward gives hidden states: no target probability to attribute
        _assert_refused(result, "neuron")
        assert seconds < 30
        return
    assert result.exit_code == 0, result.output
    rows = Workspace(ws).results().read("neuron_path_metrics", model=_model_name(matrix, model),
                                        dataset=matrix["dataset_names"][dataset])  # fmt: skip
    assert len(rows) > 0


def _probe_labels(matrix, dataset: str) -> list[str]:
    """The label source of a probe cell: a zoo label set read over the cell's dataset, or the jsonl's own labels."""
    if dataset == "jsonl":  # one label per text: does the snippet loop?
        return ["--labels", f"{matrix['data']['jsonl'].rpartition(':')[0]}:code:loop"]
    return ["--labels", "zoo:inside_string", "--data", matrix["data"][dataset]]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_probe(matrix, model, dataset) -> None:
    ws = matrix["workspace"]
    ref = matrix["models"][model] + ("@step300" if model == "hub" else "")
    result, _ = _invoke(["probe", "run", ref, *_probe_labels(matrix, dataset), "--hooks", "blocks.*.hook_resid_post",
                         "--no-random-init", "--context-length", "32", "--workspace", str(ws)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = Workspace(ws).results().read("probe_results", model=_model_name(matrix, model))
    assert len(rows) > 0 and rows["score"].notna().all()


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_codebook(matrix, model, dataset) -> None:
    ws = matrix["workspace"]
    ref = matrix["models"][model] + ("@step300" if model == "hub" else "")
    run = f"matrix-{model}-{dataset}"
    common = [
        ref,
        "--data",
        matrix["data"][dataset],
        "--run",
        run,
        "--context-length",
        "16",
        "--workspace",
        str(ws),
    ]
    result, seconds = _invoke(
        ["codebook", "train", *common, "--n-codes", "8", "--steps", "3", "--no-progress"]
    )
    if model == "minilm":  # codebooks are fine-tuned with the next-token loss: an encoder has none
        _assert_refused(result, "causal")
        assert seconds < 30 and not (ws / "codebooks" / run).exists()
        return
    assert result.exit_code == 0, result.output
    analysed, _ = _invoke(["codebook", "run", *common])
    assert analysed.exit_code == 0, analysed.output
    rows = Workspace(ws).results().read("codebook_codes", model=_model_name(matrix, model),
                                        dataset=matrix["dataset_names"][dataset])  # fmt: skip
    assert len(rows) > 0


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_sae(matrix, model, dataset) -> None:
    ws = matrix["workspace"]
    ref = matrix["models"][model] + ("@step300" if model == "hub" else "")
    sae_id = f"matrix-{model}-{dataset}"
    result, _ = _invoke(["sae", "train", ref, "--data", matrix["data"][dataset], "--hook", "blocks.0.hook_resid_post",
                         "--d-sae", "32", "--k", "4", "--steps", "5", "--max-tokens", "400", "--context-length",
                         "32", "--sae-id", sae_id, "--no-progress", "--workspace", str(ws)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = Workspace(ws).results().read("sae_evals", sae_id=sae_id, dataset=matrix["dataset_names"][dataset])
    assert len(rows) == 1 and rows["model"].iloc[0] == _model_name(matrix, model) and rows["FVU"].iloc[0] >= 0
    if model == "minilm":  # an encoder: reconstruction metrics, CE marked not applicable
        assert rows["ce_recovered"].isna().all()


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_transcoder_circuit(matrix, model, dataset) -> None:
    """`sae circuit` (a deprecated alias of `circuits attribute`) with transcoders trained on each layer's MLP input
    (the zoo's parallel blocks: hook_resid_pre; GPT-2, MiniLM: hook_resid_mid): the graph of the default target is
    stored; MiniLM's six layers with two transcoders are refused naming the missing layers, nothing stored."""
    ws = matrix["workspace"]
    ref = matrix["models"][model] + ("@step300" if model == "hub" else "")
    data = matrix["data"][dataset]
    hook = "hook_resid_pre" if model in ("zoo", "hub") else "hook_resid_mid"
    transcoders = []
    for layer in (0, 1):
        sae_id = f"matrix-tc-{model}-{dataset}-L{layer}"
        trained, _ = _invoke(["sae", "train", ref, "--data", data, "--hook", f"blocks.{layer}.{hook}",
                              "--hook-out", f"blocks.{layer}.hook_mlp_out", "--d-sae", "32", "--k", "4", "--steps",
                              "5", "--max-tokens", "400", "--context-length", "32", "--sae-id", sae_id,
                              "--no-progress", "--workspace", str(ws)])  # fmt: skip
        assert trained.exit_code == 0, trained.output
        transcoders += ["--transcoder", sae_id]
    result, _ = _invoke(["sae", "circuit", ref, "--data", data, *transcoders, "--context-length", "16",
                         "--workspace", str(ws)])  # fmt: skip
    db = Workspace(ws).results()
    stored = (
        db.read("attribution_graphs", model=_model_name(matrix, model))
        if "attribution_graphs" in db.tables()
        else None
    )
    if model == "minilm":
        _assert_refused(result, "no transcoder for layer(s) [2, 3, 4, 5]")
        assert stored is None or stored.empty
        return
    assert result.exit_code == 0, result.output
    assert "`workbench sae circuit` is deprecated" in result.output
    assert stored is not None and len(stored) >= 1


VIEW_TABLES = {"massive": "massive_layers", "attention": "attention_stats", "probes": "probe_results",
               "sae": "sae_evals", "graph": "attribution_graphs", "codebooks": "codebook_codes",
               "neuron_paths": "neuron_path_metrics"}  # fmt: skip


@pytest.mark.parametrize("view", sorted(VIEW_TABLES))
def test_every_cell_is_visible_in_its_dashboard_view(matrix, view, monkeypatch) -> None:
    """Runs after the cells above (file order): each view renders the matrix workspace and offers (picker) or shows
    (table) every model that has rows in its table."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    ws = matrix["workspace"]
    models = set(Workspace(ws).results().read(VIEW_TABLES[view])["model"])
    assert models, view
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(ws))
    app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "views" / f"{view}.py"),
                            default_timeout=60).run()  # fmt: skip
    assert not app.exception, app.exception
    offered = {
        str(o) for box in app.selectbox for o in box.options
    }  # a model picker, or a table of all models
    shown = {str(m) for frame in app.dataframe if "model" in frame.value for m in frame.value["model"]}
    missing = [
        m for m in map(str, models) if m not in shown and display_name(m) not in offered
    ]  # pickers show
    assert not missing, (view, missing, offered, shown)  # a model by its display name, tables by its identity


def test_every_written_column_is_declared_by_its_analysis(matrix) -> None:
    """Runs after the cells above: each table the matrix wrote is declared by one installed analysis, and every
    column in it is a key, a declared column or one every row carries, so ``workbench analyses`` describes the data
    users get."""
    from workbench.analysis import registered_analyses

    declared = {table.name: table for analysis in registered_analyses().values() for table in analysis.tables}
    common = {"model", "checkpoint", "hook", "dataset", "workbench_version", "created_at"}
    results = Workspace(matrix["workspace"]).results()
    written = results.tables()
    assert {"massive_layers", "sae_evals", "sae_features", "probe_results"} <= set(written), written
    undeclared = {name: "the table" for name in written if name not in declared}
    for name in set(written) - set(undeclared):
        extra = set(results.columns(name)) - common - set(declared[name].keys) - set(declared[name].columns)
        if extra:
            undeclared[name] = ", ".join(sorted(extra))
    assert not undeclared, f"written but not declared by its analysis: {undeclared}"
