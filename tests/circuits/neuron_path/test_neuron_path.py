"""Neuron paths: closed-form IG check, bad input, planted paths, science checks on the zoo ViT and fsm-tiny, the demo
and its view, and `workbench neuron-path run MODEL --data DATA` on zoo models, a user's GPT-2 directory and text
file, with immediate refusals of what cannot work."""

from __future__ import annotations

import shutil
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from tests.conftest import workbench_cli
from workbench.analysis import AnalysisNotApplicable
from workbench.app.demo import recipes
from workbench.circuits.neuron_path.analysis import (
    ANALYSIS,
    HOOK,
    Candidates,
    NeuronPathError,
    Task,
    _Scorer,
    check,
    class_tasks,
    clean_activations,
    estimate,
    influence_pattern_path,
    joint_score,
    lm_tasks,
    locate_path,
    make_task,
    manipulate,
    next_token_rows,
    target_probs,
    top_activation_path,
)
from workbench.cli import app as cli
from workbench.datasets import load_dataset
from workbench.model import HookedModel
from workbench.references import resolve_model
from workbench.workspace import Workspace

VIEW = Path(__file__).resolve().parents[3] / "app" / "views" / "neuron_paths.py"
CODE_LINES = [
    "def add(first, second):    return first + second",
    "for index in range(10):    print(index * index)",
    "import os, sys; print(os.path.join(sys.prefix, 'lib'))",
    "class Point:    def __init__(self, x, y):        self.x = x",
    "with open(path) as handle:    text = handle.read()",
    "if value is None:    raise ValueError('value is required')",
    "x",
] * 4


@pytest.fixture(scope="module")
def vit(vit_model_dir):
    return resolve_model(vit_model_dir).eval()


@pytest.fixture(scope="module")
def task_three(vit):
    return class_tasks(vit, load_dataset("zoo:digits"), per_class=4)[3]


def _probability_drop(model, task: Task, path: dict[int, list[int]]) -> float:
    """Mean of P(target) − P(target with the path's units zeroed and every other unit of their layers held at its
    clean value), at the task position: what the joint score integrates to."""
    with torch.no_grad(), model.capture([HOOK.format(layer=ly) for ly in path]) as cache:
        p_clean = target_probs(model(task.inputs), task.targets, task.position).double()
    clean = {ly: cache[HOOK.format(layer=ly)][:, task.position] for ly in path}

    def patched(layer, neurons):
        def hook(act, hook):
            act = act.clone()
            act[:, task.position] = clean[layer]
            act[:, task.position, neurons] = 0
            return act

        return hook

    with torch.no_grad(), model.hooks([(HOOK.format(layer=ly), patched(ly, n)) for ly, n in path.items()]):
        p_zero = target_probs(model(task.inputs), task.targets, task.position).double()
    return float((p_clean - p_zero).mean())


def test_joint_score_integrates_to_probability_difference(vit, task_three) -> None:
    """Completeness: ∫ dP/dα over [0,1] = P(path at clean) − P(path zeroed), with all other units clean."""
    path = {0: [5, 17], 1: [40]}
    score = joint_score(vit, task_three, path, steps=400)
    assert manipulate(vit, task_three, path, 0.0)["prob_ratio"] > 0
    assert score == pytest.approx(_probability_drop(vit, task_three, path), abs=2e-3)


def test_bad_input_raises_clear_errors(vit, task_three) -> None:
    x = task_three.inputs
    with pytest.raises(NeuronPathError, match="outside the model's 10 outputs"):
        make_task(vit, x, torch.full((x.shape[0],), 10))
    with pytest.raises(NeuronPathError, match="position 40 is out of range"):
        make_task(vit, x, task_three.targets, position=40)
    with pytest.raises(NeuronPathError, match="m=0"):
        joint_score(vit, task_three, {0: [1]}, steps=0)
    with pytest.raises(NeuronPathError, match="layer 5"):
        joint_score(vit, task_three, {5: [1]})
    assert issubclass(NeuronPathError, ValueError)


def test_locate_path_picks_the_best_candidate(vit, task_three) -> None:
    path, scores = locate_path(vit, task_three, steps=6, progress=False)
    assert sorted(path) == [0, 1] and all(len(v) == 1 for v in path.values())
    assert scores[-1] == pytest.approx(joint_score(vit, task_three, path, steps=6), abs=1e-5)
    for other in (0, 1, 2):
        if other != path[1][0]:
            assert joint_score(vit, task_three, {0: path[0], 1: [other]}, steps=6) <= scores[-1] + 1e-6


def test_demo_science_check_and_view(zoo_workspace, tmp_path, monkeypatch) -> None:
    """On the zoo ViT our path (3 neurons per layer) beats both baselines on joint score and removing it costs more
    accuracy than removing theirs; the view renders the results."""
    workspace = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(
        zoo_workspace.model_dir("vit-digits"), workspace.model_dir("vit-digits"), dirs_exist_ok=True
    )
    (recipe,) = [r for r in recipes() if r.command[:2] == ("neuron-path", "run")]
    assert "vit-digits" in workbench_cli(*recipe.argv(workspace), "--no-progress")
    metrics = workspace.results().read("neuron_path_metrics").set_index("method")
    ours = metrics.loc["joint_ig"]
    assert ours["joint_score"] > metrics.loc["top_activation", "joint_score"]
    assert ours["joint_score"] > metrics.loc["influence_pattern", "joint_score"]
    assert ours["remove_accuracy_change"] < metrics.loc["influence_pattern", "remove_accuracy_change"]
    assert ours["remove_accuracy_change"] < metrics.loc["top_activation", "remove_accuracy_change"]
    paths = workspace.results().read("neuron_paths")
    assert set(paths["target"]) == set(range(10)) and set(paths["layer"]) == {0, 1}
    assert (paths["n_inputs"] == 3).all() and set(paths["rank"]) == {0, 1, 2}
    assert set(paths["dataset"]) == {"zoo:digits"} and set(paths["model"]) == {"vit-digits"}

    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace.root))
    app = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == 3 and len(app.dataframe) == 2
    app.radio[0].set_value("top_activation").run()
    assert not app.exception

    empty = Workspace(tmp_path / "empty").ensure()
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(empty.root))
    app = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not app.exception
    assert not app.get("plotly_chart")


def test_cli_is_registered() -> None:
    names = {e.name for e in entry_points(group="workbench.cli")}
    assert "neuron-path" in names
    from workbench.circuits.neuron_path.cli import app

    assert any(c.name in (None, "run") and c.callback.__name__ == "run" for c in app.registered_commands)
    assert ANALYSIS.table_names == ["neuron_paths", "neuron_path_metrics"]
    assert all("dataset" in table.keys for table in ANALYSIS.tables)


@pytest.fixture(scope="module")
def code_lm(code_series):
    return code_series.load(code_series.steps[-1]).eval()


@pytest.fixture(scope="module")
def fsm_lm(fsm_series):
    return fsm_series.load(fsm_series.steps[-1]).eval()


@pytest.fixture(scope="module")
def fsm_task(fsm_lm):
    rows = next_token_rows(fsm_lm, load_dataset("zoo:tokfsm"), position=6, max_rows=48)
    (task,) = lm_tasks(fsm_lm, rows, position=6, n_targets=1).values()
    return Task(task.inputs[:8], task.targets[:8], task.position)


def test_make_task_for_lms_defaults_to_the_next_token(code_lm) -> None:
    lm = code_lm
    tokens = torch.randint(0, lm.cfg.d_vocab, (3, 6))
    task = make_task(lm, tokens, None, position=2)
    assert isinstance(task, Task) and torch.equal(task.targets, tokens[:, 3])
    with pytest.raises(NeuronPathError, match="targets are required"):
        make_task(lm, tokens, None, position=5)


def planted_network(write: float = 5.0, unembed: float = 3.0):
    """A 2-layer GPT-NeoX whose influential path for (token 0 → next token 5) is known by construction: layer-0
    neuron 3 reads token 0's embedding direction and writes a direction that only layer-1 neuron 11 reads, which
    writes ``write`` × the unembedding direction of token 5 (its unembedding is ``unembed`` × (e4 − e5)). Decoy
    neurons (7 at layer 0, 9 at layer 1) fire harder but write nothing; attention writes nothing; every other unit
    has small random weights."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        hidden_act="relu", max_position_embeddings=16, use_parallel_residual=True,
    )  # fmt: skip
    model = transformers.GPTNeoXForCausalLM(config).eval()
    e = torch.eye(8)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.05 * torch.randn_like(parameter))
        for norm in [model.gpt_neox.final_layer_norm] + [
            m
            for block in model.gpt_neox.layers
            for m in (block.input_layernorm, block.post_attention_layernorm)
        ]:
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        model.gpt_neox.embed_in.weight[0] = 4 * (e[0] - e[1])
        for block in model.gpt_neox.layers:
            block.attention.dense.weight.zero_()
            block.attention.dense.bias.zero_()
        first, second = (block.mlp for block in model.gpt_neox.layers)
        first.dense_h_to_4h.weight[3] = e[0] - e[1]
        first.dense_h_to_4h.weight[7] = 3 * (e[0] - e[1])
        first.dense_4h_to_h.weight[:, 3] = e[2] - e[3]
        first.dense_4h_to_h.weight[:, 7] = 0
        second.dense_h_to_4h.weight[11] = 2 * (e[2] - e[3])
        second.dense_h_to_4h.weight[9] = 4 * (e[0] - e[1])
        second.dense_4h_to_h.weight[:, 11] = write * (e[4] - e[5])
        second.dense_4h_to_h.weight[:, 9] = 0
        model.get_output_embeddings().weight[5] = unembed * (e[4] - e[5])
    return HookedModel.from_hf(model, name="planted")


def test_planted_path_is_recovered_exactly_and_the_baseline_is_fooled() -> None:
    model = planted_network()
    task = make_task(model, torch.tensor([[0, 1]] * 4), targets=torch.full((4,), 5), position=0)
    with torch.no_grad():
        assert float(target_probs(model(task.inputs), task.targets, 0).mean()) > 0.9
    path, scores = locate_path(model, task, steps=20, progress=False)
    assert path == {0: [3], 1: [11]}
    assert scores[-1] > 0.2
    assert joint_score(model, task, path, steps=200) > 0.7
    assert top_activation_path(model, task) == {0: [7], 1: [9]}
    assert joint_score(model, task, {0: [7], 1: [9]}) < 0.01
    assert manipulate(model, task, path, 0.0)["prob_ratio"] < 0.3
    assert manipulate(model, task, {0: [7], 1: [9]}, 0.0)["prob_ratio"] > 0.99


def test_a_task_built_directly_is_checked_where_it_is_scored(vit, task_three) -> None:
    bad = Task(task_three.inputs, torch.full_like(task_three.targets, 10), 0)
    for call in (
        lambda: joint_score(vit, bad, {0: [1]}, steps=2),
        lambda: locate_path(vit, bad, steps=2, progress=False),
        lambda: influence_pattern_path(vit, bad, steps=2),
        lambda: manipulate(vit, bad, {0: [1]}, 0.0),
    ):
        with pytest.raises(NeuronPathError, match="outside the model's 10 outputs"):
            call()
    for empty in ({}, {0: [], 1: []}):
        with pytest.raises(NeuronPathError, match="no neurons"):
            joint_score(vit, task_three, empty)
        with pytest.raises(NeuronPathError, match="no neurons"):
            manipulate(vit, task_three, empty, 0.0)
    assert joint_score(vit, task_three, {0: [1]}, steps=np.int64(3)) == pytest.approx(
        joint_score(vit, task_three, {0: [1]}, steps=3)
    )
    with pytest.raises(NeuronPathError, match="m=True"):
        joint_score(vit, task_three, {0: [1]}, steps=True)


def test_lm_joint_score_is_complete_and_the_located_path_beats_the_baselines(fsm_lm, fsm_task) -> None:
    """On fsm-tiny at position 6: score ≈ P(clean) − P(path zeroed, every other unit clean) for the next token,
    and the layer-progressive path outscores both baselines and removing it lowers the target probability more."""
    model, task = fsm_lm, fsm_task
    assert torch.equal(task.targets, task.inputs[:, 7])
    path = {0: [3, 10], 1: [5]}
    score = joint_score(model, task, path, steps=300)
    drop = _probability_drop(model, task, path)
    assert abs(drop) > 1e-3 and score == pytest.approx(drop, abs=2e-3)

    ours, scores = locate_path(model, task, steps=4, progress=False)
    baselines = [top_activation_path(model, task), influence_pattern_path(model, task, steps=4)]
    ours_score = joint_score(model, task, ours, steps=20)
    removed = manipulate(model, task, ours, 0.0)["prob_ratio"]
    assert ours_score > 0.02 and removed < 0.95
    for baseline in baselines:
        assert ours_score > joint_score(model, task, baseline, steps=20)
        assert removed < manipulate(model, task, baseline, 0.0)["prob_ratio"]


def test_influence_pattern_on_the_planted_network() -> None:
    """Influence pattern = per layer the largest mean gradient of P(token 5) over α-scaled inputs. In a planted
    network kept out of saturation (layer-1 neuron 11 writes 0.5 (e4 − e5), P ≈ 0.56) its layer-1 pick is neuron
    11, the only writer of the target direction; the decoys (7, 9) write nothing and get exactly zero gradient.
    Every pick equals a one-α-at-a-time autograd reference. At layer 0 the planted neuron 3 has a negative gradient
    (its write grows the final LayerNorm's norm), so the baseline misses it while the joint score finds it."""
    model = planted_network(write=0.5, unembed=1.0)
    task = make_task(model, torch.tensor([[0, 1]] * 4), targets=torch.full((4,), 5), position=0)
    with torch.no_grad():
        assert 0.3 < float(target_probs(model(task.inputs), task.targets, 0).mean()) < 0.8
    names = [HOOK.format(layer=ly) for ly in (0, 1)]
    total = [torch.zeros(16), torch.zeros(16)]
    for alpha in torch.arange(1, 11) / 10:
        with model.hooks([("hook_embed", lambda act, hook, a=alpha: act * a)]):
            with model.capture(names, grad=True) as cache:
                probs = target_probs(model(task.inputs), task.targets, 0)
            grads = torch.autograd.grad(probs.sum(), [cache[n] for n in names])
        total = [t + g[:, 0].mean(0) / 10 for t, g in zip(total, grads, strict=True)]
    influence = influence_pattern_path(model, task, steps=10, top_k=3)
    assert influence == {ly: total[ly].topk(3).indices.tolist() for ly in (0, 1)}
    assert influence[1][0] == 11
    assert float(total[0][7]) == 0 and float(total[1][9]) == 0
    assert float(total[0][3]) < 0 and 3 not in influence[0]
    assert locate_path(model, task, steps=10, progress=False)[0] == {0: [3], 1: [11]}


def test_next_token_rows_come_from_the_datasets_iterator_and_keep_rows_with_a_next_token(
    code_lm, tmp_path
) -> None:
    """A user's text file (a document per line) → rows [n, position + 2] equal to the tokenizer's ids of each line
    that has a token after ``position`` (the one-token line is dropped); a seed shuffles the same rows."""
    path = tmp_path / "snippets.txt"
    path.write_text("\n".join(CODE_LINES[:7]) + "\n")
    data = load_dataset(path)
    expected = [
        ids[:5] for ids in (code_lm.tokenizer(line)["input_ids"] for line in CODE_LINES[:7]) if len(ids) >= 5
    ]
    assert 0 < len(expected) < 7
    rows = next_token_rows(code_lm, data, position=3, max_rows=64, seed=None)
    assert rows.shape == (len(expected), 5) and rows.tolist() == expected
    shuffled = next_token_rows(code_lm, data, position=3, max_rows=64, seed=1)
    assert sorted(shuffled.tolist()) == sorted(expected)
    assert next_token_rows(code_lm, data, position=3, max_rows=2, seed=None).tolist() == expected[:2]
    with pytest.raises(NeuronPathError, match="no row of dataset .* has a token after position 200"):
        next_token_rows(code_lm, data, position=200)


def test_check_refuses_a_model_without_mlp_neurons() -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_vocab=64,
                                     attn_only=True, act_fn="relu")  # fmt: skip
    attention_only = resolve_model(HookedTransformer(config))
    # the adapter reports d_mlp 0 for an attention-only model, so the contract's requirement refuses it first
    with pytest.raises(AnalysisNotApplicable, match=r"neuron_path needs MLP blocks \(d_mlp > 0\)"):
        check(attention_only, load_dataset("zoo:tokfsm", limit=4))


runner = CliRunner()
FAST = ["--steps", "2", "--n-targets", "1", "--max-sequences", "16", "--no-progress"]


def _workspace(zoo_workspace, root: Path) -> Workspace:
    """A fresh workspace whose models/ link to the zoo's, so results land here and not in the shared zoo."""
    workspace = Workspace(root).ensure()
    for name in ("fsm-tiny", "code-tiny", "vit-digits"):
        workspace.model_dir(name).symlink_to(zoo_workspace.model_dir(name), target_is_directory=True)
    return workspace


def _neuron_path(workspace: Workspace, *args: str):
    return runner.invoke(cli, ["neuron-path", "run", *args, "-w", str(workspace.root)])


def _last_step(workspace: Workspace, name: str) -> int:
    return max(int(p.name.removeprefix("step")) for p in workspace.model_dir(name).glob("step*"))


@pytest.fixture(scope="module")
def code_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("np-data") / "snippets.txt"
    path.write_text("\n".join(CODE_LINES) + "\n")
    return path


def test_cli_on_fsm_tiny_with_zoo_tokfsm_and_the_same_tokens_from_a_users_file(
    zoo_workspace, tmp_path
) -> None:
    """`--data zoo:tokfsm` writes rows keyed by model, last checkpoint and dataset; a rerun replaces them; the same
    token rows saved as the user's ids.npy give the same paths under their own dataset name, beside the zoo rows."""
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    args = ["fsm-tiny", "--position", "4", *FAST]
    result = _neuron_path(workspace, *args, "--data", "zoo:tokfsm")
    assert result.exit_code == 0, result.output
    db = workspace.results()
    metrics = db.read("neuron_path_metrics", dataset="zoo:tokfsm")
    paths = db.read("neuron_paths", dataset="zoo:tokfsm")
    step = _last_step(workspace, "fsm-tiny")
    assert set(metrics["method"]) == {"joint_ig", "top_activation", "influence_pattern"} and len(metrics) == 3
    assert (metrics["model"] == "fsm-tiny").all() and (paths["model"] == "fsm-tiny").all()
    assert (metrics["checkpoint"] == step).all() and (paths["checkpoint"] == step).all()
    assert set(paths["layer"]) == {0, 1} and (paths["position"] == 4).all() and paths["target"].nunique() == 1
    assert (paths["hook"] == "blocks.*.mlp.hook_post").all() and (paths["n_inputs"] <= 16).all()
    assert _neuron_path(workspace, *args, "--data", "zoo:tokfsm").exit_code == 0
    assert len(db.read("neuron_path_metrics")) == 3 and len(db.read("neuron_paths")) == len(paths)

    ids = tmp_path / "fsm_ids.npy"
    np.save(ids, load_dataset("zoo:tokfsm").token_ids.numpy())
    name = load_dataset(ids).name
    assert name != "zoo:tokfsm"
    result = _neuron_path(workspace, *args, "--data", str(ids))
    assert result.exit_code == 0, result.output
    both = db.read("neuron_paths")
    assert set(both["dataset"]) == {"zoo:tokfsm", name} and len(db.read("neuron_path_metrics")) == 6
    columns = ["target", "method", "layer", "rank", "neuron"]
    ours = both[both["dataset"] == name].sort_values(columns)[columns].reset_index(drop=True)
    assert ours.equals(
        both[both["dataset"] == "zoo:tokfsm"].sort_values(columns)[columns].reset_index(drop=True)
    )


def test_cli_on_a_zoo_checkpoint_with_a_users_text_file(zoo_workspace, code_file, tmp_path) -> None:
    """`code-tiny@250 --data snippets.txt`: rows of checkpoint 250 under the file's dataset name, the target being
    the most frequent token after position 3 of the file's lines."""
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    result = _neuron_path(workspace, "code-tiny@250", "--data", str(code_file), "--position", "3", *FAST)
    assert result.exit_code == 0, result.output
    paths = workspace.results().read("neuron_paths")
    model = resolve_model("code-tiny@250", workspace=workspace)
    rows = next_token_rows(model, load_dataset(code_file), position=3, max_rows=16)
    values, counts = rows[:, 4].unique(return_counts=True)
    assert (paths["model"] == "code-tiny").all() and (paths["checkpoint"] == 250).all()
    assert (paths["dataset"] == load_dataset(code_file).name).all()
    assert set(paths["target"]) == {int(values[counts.argmax()])}
    assert (paths["n_inputs"] == int(counts.max())).all() and (paths["target_text"].str.len() > 0).all()


def test_cli_on_a_users_gpt2_directory_and_text_file(zoo_workspace, code_file, tmp_path) -> None:
    """A GPT-2 saved by the user (not from the zoo, the zoo tokenizer copied next to it): the cost line first (in
    chunks of --chunk-size rows), rows under its directory, no checkpoint, top-2 neurons per layer inside d_mlp; a
    position past its 64-token context is refused."""
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    model_dir = tmp_path / "my-gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_workspace.model_dir("code-tiny") / name, model_dir / name)
    result = _neuron_path(workspace, str(model_dir), "--data", str(code_file), "--position", "3", "--top-k", "2",
                          "--chunk-size", "7", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    (cost,) = [i for i, line in enumerate(lines) if "neuron paths: 1 targets, " in line]
    assert "of 1 token (the prefix cached per input), in chunks of 7 rows" in lines[cost]
    assert cost < min(i for i, line in enumerate(lines) if "joint_ig" in line)  # stated before the results
    paths = workspace.results().read("neuron_paths")
    metrics = workspace.results().read("neuron_path_metrics")
    assert set(paths["model"]) == {resolve_model(model_dir).cfg.name} and paths["checkpoint"].isna().all()
    assert (paths["dataset"] == load_dataset(code_file).name).all() and len(metrics) == 3
    assert set(paths["layer"]) == {0, 1} and set(paths["rank"]) == {0, 1}
    assert paths["neuron"].between(0, 4 * 32 - 1).all()
    beyond = _neuron_path(workspace, str(model_dir), "--data", str(code_file), "--position", "63", *FAST)
    assert beyond.exit_code == 2 and "pick a position in 0..62" in beyond.output


def test_cli_on_vit_digits_with_zoo_digits(zoo_workspace, tmp_path) -> None:
    """`vit-digits --data zoo:digits --n-targets 2 --max-sequences 6`: the two most frequent classes, 3 images each,
    at CLS, at the last checkpoint."""
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    args = ["--steps", "2", "--n-targets", "2", "--max-sequences", "6", "--no-progress"]
    result = _neuron_path(workspace, "vit-digits", "--data", "zoo:digits", *args)
    assert result.exit_code == 0, result.output
    paths = workspace.results().read("neuron_paths")
    counts = np.bincount(load_dataset("zoo:digits").labels["digit"], minlength=10)
    targets = set(paths["target"])
    assert len(targets) == 2 and min(counts[list(targets)]) >= max(np.delete(counts, list(targets)))
    assert (paths["model"] == "vit-digits").all() and (
        paths["checkpoint"] == _last_step(workspace, "vit-digits")
    ).all()
    assert (
        (paths["dataset"] == "zoo:digits").all()
        and (paths["position"] == 0).all()
        and (paths["n_inputs"] == 3).all()
    )


def test_cli_refuses_at_once_what_cannot_work(zoo_workspace, code_file, tmp_path) -> None:
    """MiniLM (an encoder: hidden states, no target probability), an image dataset for an LM, text for the ViT, a
    position beyond the context, no --data: exit 2, one `error:` line naming the fix, nothing written."""
    workspace = _workspace(zoo_workspace, tmp_path / "ws")
    cases = {
        ("minilm", "--data", str(code_file)): "is an encoder whose forward returns hidden states",
        (
            "fsm-tiny",
            "--data",
            "zoo:digits",
        ): "holds inputs of shape (450, 1, 8, 8) (images); pass a text or token",
        ("vit-digits", "--data", str(code_file)): "is an image classifier, but dataset",
        ("fsm-tiny", "--data", "zoo:tokfsm", "--position", "5000"): "beyond the context of fsm-tiny",
        ("vit-digits", "--data", "zoo:digits", "--position", "40"): "beyond the 17 positions of vit-digits",
        ("vit-digits",): "--data is required",
        ("no-such-model", "--data", "zoo:tokfsm"): "no-such-model",
    }
    for args, message in cases.items():
        result = _neuron_path(workspace, *args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2, (args, result.output)
        assert len(errors) == 1 and message in errors[0], (args, result.output)
        assert "Traceback" not in result.output
    assert "neuron_paths" not in workspace.results().tables()


def _reference_scores(model, task: Task, sets: list[dict[int, list[int]]], steps: int) -> torch.Tensor:
    """Joint scores one α and one input at a time on the full sequence, by autograd on a scalar α: the definition,
    independent of the scorer's batching, prefix cache and chunks → [sets], float64."""
    clean = clean_activations(model, task)
    out = torch.zeros(len(sets), dtype=torch.float64)
    for c, path in enumerate(sets):
        for i in range(task.inputs.shape[0]):
            for k in range(1, steps + 1):
                alpha = torch.tensor(k / steps, requires_grad=True)

                def make(layer, neurons, i=i, alpha=alpha):
                    def hook(act, hook):
                        act = act.clone()
                        row = clean[layer][i].clone()
                        row[neurons] = row[neurons] * alpha
                        act[:, task.position] = row
                        return act

                    return hook

                with model.hooks([(HOOK.format(layer=ly), make(ly, ns)) for ly, ns in path.items()]):
                    prob = target_probs(model(task.inputs[i : i + 1]), task.targets[i : i + 1], task.position)
                (grad,) = torch.autograd.grad(prob.sum(), alpha)
                out[c] += float(grad) / (task.inputs.shape[0] * steps)
    return out


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_one_token_rows_on_the_cached_prefix_equal_the_full_forward_in_any_chunking(
    fsm_lm, fsm_task, family
) -> None:
    """The scorer runs each (set, input, α) row as one token on the cached keys/values of the positions before the
    task position; its scores equal the one-α-at-a-time full-sequence autograd reference (fsm-tiny, GPT-NeoX with
    rotary; a random GPT-2 with learned positions), with chunks of 5 rows or all rows at once, and no forward sees
    more rows than the chunk."""
    if family == "gpt_neox":
        model, task = fsm_lm, Task(fsm_task.inputs[:3], fsm_task.targets[:3], fsm_task.position)
    else:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
        model = HookedModel.from_hf(transformers.GPT2LMHeadModel(config).eval(), name="tiny-gpt2")
        task = make_task(model, torch.randint(0, 64, (3, 7)), None, position=5)
    steps, neurons = 3, torch.tensor([0, 5, 9])
    sets = [{0: [2], 1: [int(j)]} for j in neurons]
    reference = _reference_scores(model, task, sets, steps)
    assert reference.abs().max() > 1e-6
    seen: list[int] = []
    remove = model.add_hook(HOOK.format(layer=1), lambda act, hook: seen.append(act.shape[0]))
    try:
        for chunk in (5, None):
            scorer = _Scorer(model, task, steps, chunk)
            seen.clear()
            assert scorer.prefix is not None and scorer.tokens_per_row == 1
            scores = scorer.scores(Candidates({0: [2]}, 1, neurons))
            torch.testing.assert_close(scores.double(), reference, rtol=1e-4, atol=1e-7)
            assert max(seen) <= (chunk or 27) and sum(seen) == 27  # 3 sets × 3 inputs × 3 steps
    finally:
        remove()
    full = _Scorer(model, task, steps)
    full.prefix = None  # the full-sequence rows the scorer falls back to (ViT, position 0, TransformerLens)
    torch.testing.assert_close(full.scores(Candidates({0: [2]}, 1, neurons)).double(), reference, rtol=1e-4,
                               atol=1e-7)  # fmt: skip


def test_the_cost_is_stated_before_the_work_and_counts_every_row(fsm_lm, fsm_task) -> None:
    """estimate's rows = the rows analyse scores (counted through the scorer's progress updates) for a path search
    with top_k 2 and the three paths' joint scores; the line names the sizes, the chunk and an estimated time."""

    class Count:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    model, task = fsm_lm, Task(fsm_task.inputs[:2], fsm_task.targets[:2], fsm_task.position)
    count = Count()
    scorer = _Scorer(model, task, 2, chunk_rows=64, bar=count)
    path, _ = locate_path(model, task, steps=2, top_k=2, progress=False, scorer=scorer)
    for _ in range(3):
        scorer.scores(Candidates(path))
    cost = estimate(model, {7: task}, steps=2, top_k=2, chunk_rows=64)
    assert cost.rows == count.n == 2 * 2 * (model.cfg.n_layers * (model.cfg.d_mlp + 1) + 3)
    line = cost.line()
    assert line.startswith(f"neuron paths: 1 targets, 2 inputs × 2 steps × {model.cfg.n_layers} layers × "
                           f"{model.cfg.d_mlp} neurons → {cost.rows:,} forward/backward rows of 1 token")  # fmt: skip
    assert "in chunks of 64 rows" in line and "estimated" in line and cost.seconds > 0
