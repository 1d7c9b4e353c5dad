"""Neuron paths: closed-form IG check, bad input, science check on the zoo ViT, demo, CLI wiring and view."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from circuits.neuron_path import (
    NeuronPathError,
    Task,
    demo_step,
    joint_score,
    locate_path,
    make_task,
    manipulate,
    target_probs,
    vit_tasks,
)

VIEW = Path(__file__).resolve().parents[1] / "app" / "views" / "neuron_paths.py"


@pytest.fixture(scope="module")
def vit(vit_model_dir):
    from workbench.model import HookedModel

    return HookedModel.from_pretrained(vit_model_dir).eval()


@pytest.fixture(scope="module")
def task_three():
    return vit_tasks(per_class=4)[3]


def _probability_drop(model, task: Task, path: dict[int, list[int]]) -> float:
    """Mean of P(target) − P(target with the path's units zeroed and every other unit of their layers held at its
    clean value), at the task position: what the joint score integrates to."""
    from circuits.neuron_path import HOOK

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
    import shutil

    from streamlit.testing.v1 import AppTest

    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(
        zoo_workspace.model_dir("vit-digits"), workspace.model_dir("vit-digits"), dirs_exist_ok=True
    )
    summary = demo_step(workspace, progress=False)
    assert "vit-digits" in summary
    metrics = workspace.results().read("neuron_path_metrics").set_index("method")
    ours = metrics.loc["joint_ig"]
    assert ours["joint_score"] > metrics.loc["top_activation", "joint_score"]
    assert ours["joint_score"] > metrics.loc["influence_pattern", "joint_score"]
    assert ours["remove_accuracy_change"] < metrics.loc["influence_pattern", "remove_accuracy_change"]
    assert ours["remove_accuracy_change"] < metrics.loc["top_activation", "remove_accuracy_change"]
    paths = workspace.results().read("neuron_paths")
    assert set(paths["target"]) == set(range(10)) and set(paths["layer"]) == {0, 1}

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
    from importlib.metadata import entry_points

    names = {e.name for e in entry_points(group="workbench.cli")}
    assert "neuron-path" in names
    from circuits.neuron_path_cli import app

    assert any(c.name in (None, "run") and c.callback.__name__ == "run" for c in app.registered_commands)


def test_make_task_for_lms_defaults_to_the_next_token(code_series) -> None:
    lm = code_series.load(code_series.steps[-1]).eval()
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
    import transformers

    from workbench.model import HookedModel

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
    from circuits.neuron_path import top_activation_path

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
    import numpy as np

    from circuits.neuron_path import influence_pattern_path

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


@pytest.fixture(scope="module")
def fsm_lm(fsm_series):
    return fsm_series.load(fsm_series.steps[-1]).eval()


@pytest.fixture(scope="module")
def fsm_task(fsm_lm):
    from circuits.neuron_path import fsm_tokens, lm_tasks

    tasks = lm_tasks(fsm_lm, fsm_tokens("fsm-tiny", 8, n_sequences=48), position=6, n_targets=1)
    (task,) = tasks.values()
    return Task(task.inputs[:8], task.targets[:8], task.position)


def test_lm_joint_score_is_complete_and_the_located_path_beats_the_baselines(fsm_lm, fsm_task) -> None:
    """On fsm-tiny at position 6: score ≈ P(clean) − P(path zeroed, every other unit clean) for the next token,
    and the layer-progressive path outscores both baselines and removing it lowers the target probability more."""
    from circuits.neuron_path import influence_pattern_path, top_activation_path

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
    from circuits.neuron_path import HOOK, influence_pattern_path

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


def test_cli_runs_on_an_fsm_model_and_writes_checkpointed_rows(zoo_workspace, tmp_path) -> None:
    from typer.testing import CliRunner

    from circuits.neuron_path_cli import app
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path).ensure()
    workspace.model_dir("fsm-tiny").symlink_to(zoo_workspace.model_dir("fsm-tiny"), target_is_directory=True)
    args = ["--steps", "2", "--position", "4", "--n-targets", "1", "--n-sequences", "24", "--no-progress"]
    result = CliRunner().invoke(app, ["fsm-tiny", *args, "-w", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = workspace.results().read("neuron_path_metrics")
    paths = workspace.results().read("neuron_paths")
    last_step = max(int(p.name.removeprefix("step")) for p in workspace.model_dir("fsm-tiny").glob("step*"))
    assert set(metrics["method"]) == {"joint_ig", "top_activation", "influence_pattern"}
    assert (metrics["checkpoint"] == last_step).all() and (paths["checkpoint"] == last_step).all()
    assert set(paths["layer"]) == {0, 1} and (paths["position"] == 4).all()
    again = CliRunner().invoke(app, ["fsm-tiny", *args, "-w", str(tmp_path)])
    assert again.exit_code == 0 and len(workspace.results().read("neuron_path_metrics")) == 3
    missing = CliRunner().invoke(app, ["nope", "-w", str(tmp_path)])
    assert missing.exit_code == 2 and "error:" in missing.output
