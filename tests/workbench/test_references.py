"""Model references: one grammar, one resolver — directories, series, workspace models, MiniLM, the hub (through
an offline cache laid out by the tests), TransformerLens models and bridges; errors that list what was tried."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
import transformers as T

from tests.conftest import HUB_CACHE, HUB_DUPLICATE, HUB_STEPS
from workbench.checkpoints import CheckpointError, CheckpointSeries
from workbench.hub import hub_step_branches
from workbench.model import HookedModel, ModelLoadError
from workbench.references import (
    ModelReferenceError,
    parse_model_ref,
    resolve_model,
    resolve_series,
)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2-architecture model that is not from the zoo, saved with save_pretrained (tokenizer included)."""
    path = tmp_path_factory.mktemp("my-gpt2")
    torch.manual_seed(0)
    T.GPT2LMHeadModel(
        T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    ).save_pretrained(path)
    return path


def test_grammar_forms(zoo_workspace, gpt2_dir, hub_repo) -> None:
    ws = zoo_workspace.root
    assert parse_model_ref("tl:gpt2").kind == "tl"
    assert parse_model_ref("minilm").kind == "packaged"
    assert parse_model_ref(str(gpt2_dir)).kind == "directory"
    series_dir = zoo_workspace.model_dir("code-tiny")
    assert (parse_model_ref(f"{series_dir}@300").kind, parse_model_ref(f"{series_dir}@300").at) == (
        "series",
        "300",
    )
    zoo = parse_model_ref("code-tiny@step300", ws)
    assert (zoo.kind, zoo.at, zoo.name) == ("series", "step300", "code-tiny")
    hub = parse_model_ref(f"{hub_repo}@step1", ws)
    assert (hub.kind, hub.location, hub.at) == ("hub", hub_repo, "step1")


def test_every_form_resolves_to_the_same_weights(zoo_workspace, hub_repo) -> None:
    ws = zoo_workspace.root
    series_dir = zoo_workspace.model_dir("code-tiny")
    tokens = torch.tensor([[1, 5, 9, 33, 2]])
    expected = CheckpointSeries.from_directory(series_dir).load(2)(tokens)
    for ref in (f"{series_dir}@2", f"{series_dir}@step2", "code-tiny@2", str(series_dir / "step2"),
                f"{hub_repo}@step2"):  # fmt: skip
        model = resolve_model(ref, workspace=ws)
        assert torch.allclose(model(tokens), expected, atol=1e-6), ref
    last = resolve_model("code-tiny", workspace=ws)
    assert last.cfg.checkpoint == max(CheckpointSeries.from_directory(series_dir).steps)
    assert resolve_model(f"{hub_repo}@main").tokenizer is not None  # main -> step300, tokenizer from the repo


def test_hub_series_from_the_offline_cache_dedupes_identical_branches(hub_repo) -> None:
    steps = sorted([*HUB_STEPS, int(HUB_DUPLICATE[0][4:])])
    assert hub_step_branches(hub_repo) == steps
    series = resolve_series(hub_repo)
    assert series.steps == steps and series.revision(1) == "step1"
    loaded = [m.cfg.checkpoint for m in series.iter(progress=False)]
    assert loaded == [s for s in steps if s != 3]
    assert series.duplicates == {3: HUB_DUPLICATE[1]}
    one = resolve_series(f"{hub_repo}@step300")
    assert one.steps == [300]


def test_series_tokenizer_reads_no_weights_and_matches_the_loaded_models(
    zoo_workspace, hub_repo, monkeypatch
):
    """``series.tokenizer()`` (the token budget of ``massive|attention --max-tokens``) equals the tokenizer the
    loaded checkpoint carries, for a hub series through the offline cache and a local step-folder series."""
    text = "def f(x):\n    return x + 1\n"
    for series in (resolve_series(hub_repo), resolve_series("code-tiny", workspace=zoo_workspace.root)):
        expected = series.load(series.steps[0]).tokenizer(text)["input_ids"]
        with monkeypatch.context() as patch:  # no model weights may be read
            patch.setattr(
                T.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights read")
            )
            assert series.tokenizer()(text)["input_ids"] == expected


def test_local_series_dedupes_byte_identical_step_folders(zoo_workspace, tmp_path) -> None:
    copy = tmp_path / "my-run"
    source = zoo_workspace.model_dir("code-tiny")
    for step in (0, 1):
        shutil.copytree(source / f"step{step}", copy / f"step{step}")
    shutil.copytree(source / "step1", copy / "step5")
    shutil.copy(source / "tokenizer.json", copy / "tokenizer.json")
    series = resolve_series(copy)
    assert [m.cfg.checkpoint for m in series.iter(progress=False)] == [0, 1]
    assert series.duplicates == {5: 1}


def test_in_memory_models_pass_through(gpt2_dir) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    hooked = HookedModel.from_pretrained(gpt2_dir)
    assert resolve_model(hooked) is hooked
    hf = T.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    assert resolve_model(hf).cfg.family == "gpt2"
    tl = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_vocab=50,
                                                   act_fn="gelu", d_mlp=32))  # fmt: skip
    wrapped = resolve_model(tl)
    assert wrapped.cfg.family == "transformer_lens"
    assert resolve_series(tl).steps == [0]
    with pytest.raises(ModelReferenceError, match="a Linear is not a model the workbench wraps"):
        resolve_model(torch.nn.Linear(2, 2))


def test_transformer_bridge_is_accepted_and_matches_hf_hidden_states(gpt2_dir) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(gpt2_dir), device="cpu")
    model = resolve_model(bridge)
    tokens = torch.tensor([[3, 7, 11, 2]])
    with model.capture("blocks.*.hook_resid_post") as cache:
        model(tokens)
    reference = T.GPT2LMHeadModel.from_pretrained(gpt2_dir)(tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(cache["blocks.0.hook_resid_post"], reference[1], atol=1e-5)


def test_errors_list_what_was_tried(zoo_workspace, gpt2_dir) -> None:
    ws = zoo_workspace.root
    with pytest.raises(ModelReferenceError, match=r"not a directory .*not a model in the workspace .*Forms:"):
        resolve_model("no-such-model", workspace=ws)
    with pytest.raises(ModelReferenceError, match=r"'@abc' .* is not a checkpoint step; write @300"):
        resolve_model("code-tiny@abc", workspace=ws)
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        resolve_model("code-tiny@7", workspace=ws)
    with pytest.raises(ModelReferenceError, match="single saved model, so '@3' does not apply"):
        resolve_model(f"{gpt2_dir}@3")
    with pytest.raises(ModelReferenceError, match="HF_HUB_OFFLINE is set"):
        resolve_model("someone/not-cached@step5")
    with pytest.raises(CheckpointError, match=r"no checkpoint at step\(s\) \[9\]"):
        resolve_series("code-tiny", workspace=ws).restrict([9])


def test_a_path_like_reference_that_is_not_a_directory_says_so_before_any_hub_lookup(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for ref in (
        "models/nope",
        "models/nope@300",
        "./nope",
        "../no-such-dir-here",
        "~/no-such-dir-wb",
        "/no/such",
    ):
        with pytest.raises(ModelReferenceError, match="no such directory") as caught:
            parse_model_ref(ref, tmp_path)
        assert "hub" not in str(caught.value) and "stepN" not in str(caught.value)
    with pytest.raises(ModelReferenceError, match=r"no such directory: .*models/nope \(the nearest existing "
                       r"directory is .*models\)"):  # fmt: skip
        resolve_model("models/nope")
    with pytest.raises(ModelReferenceError, match="is a file, not a directory"):
        parse_model_ref("models/weights.bin", tmp_path)
    # an ORG/NAME whose ORG is not a local directory stays a hub id
    assert parse_model_ref("someone/not-cached@step5", tmp_path).kind == "hub"


def test_an_unknown_hub_model_fails_at_once_without_a_reachable_hub(tmp_path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_CACHE": str(HUB_CACHE),
        "HOME": str(tmp_path),
    }  # HF_HUB_OFFLINE unset
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "info", "someone/not-cached"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "not in the hub cache" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - start < 20


def test_remote_code_is_refused_unless_allowed(gpt2_dir, tmp_path) -> None:
    custom = tmp_path / "custom"
    shutil.copytree(gpt2_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.M",
    }
    (custom / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (custom / name).write_text("raise SystemExit('foreign code ran')\n")
    assert (
        resolve_model(str(custom)).cfg.family == "gpt2"
    )  # a known architecture loads transformers' own code
    config["model_type"] = "evil-model"  # only the foreign code could build this one
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="asks to run its own Python code.*trust_remote_code=True"):
        resolve_model(str(custom))


def test_corrupted_checkpoint_bytes_are_caught_by_checksums(zoo_workspace, tmp_path) -> None:
    from workbench.fileio import write_checksums

    run = tmp_path / "run"
    shutil.copytree(zoo_workspace.model_dir("code-tiny") / "step0", run / "step0")
    write_checksums(run / "step0")
    weights = run / "step0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors differ from checksums.json"):
        resolve_model(f"{run}@0")
