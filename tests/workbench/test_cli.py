"""The `workbench` command line: info, capture, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from workbench.cli import app
from workbench.datasets import DatasetError, count_text_lines, iter_text_lines, load_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    T.GPT2LMHeadModel(
        T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def user_gpt2(saved_gpt2, tmp_path_factory):
    """A user's GPT-2 with 64 learned positions and its own word-level tokenizer, and a text file of long lines
    (every line is longer than 64 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("user")
    user_model = root / "my-gpt2"
    T.GPT2LMHeadModel.from_pretrained(saved_gpt2).save_pretrained(user_model)
    text = root / "mine.txt"
    text.write_text(
        "\n".join(" ".join([f"line {i} of my own notes about foxes and dogs"] * 20) for i in range(40)),
        encoding="utf-8",
    )
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train([str(text)], trainers.WordLevelTrainer(vocab_size=100, special_tokens=["<unk>", "<eos>"]))
    T.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        user_model
    )
    labels = root / "labels.csv"
    labels.write_text(
        "text,label\n" + "".join(f"{' '.join(['fox and dog'] * 60)} {i},{i % 2}\n" for i in range(24)),
        encoding="utf-8",
    )
    return user_model, text, labels


# Every command that feeds --data to a model at --context-length (default or given 128) on the 64-position GPT-2.
TOO_LONG = {
    "sae train": ["sae", "train", "{model}", "--data", "{text}", "--hook", "blocks.0.hook_resid_post", "--steps", "2"],
    "capture": ["capture", "{model}", "--data", "{text}", "--hooks", "blocks.0.hook_resid_post", "--out", "{ws}/stores/c"],
    "massive run": ["massive", "run", "{model}", "--data", "{text}", "--no-progress"],
    "attention run": ["attention", "run", "{model}", "--data", "{text}", "--no-progress"],
    "dynamics run": ["dynamics", "run", "{model}", "--data", "{text}", "--context-length", "128", "--no-progress"],
    "probe run": ["probe", "run", "{model}", "--labels", "{labels}"],
    "codebook train": ["codebook", "train", "{model}", "--data", "{text}", "--steps", "2"],
}  # fmt: skip


@pytest.mark.parametrize("command", TOO_LONG)
def test_a_context_longer_than_the_models_positions_is_refused_before_any_work(
    user_gpt2, tmp_path, command
) -> None:
    """A user's GPT-2 with 64 learned positions at a context of 128 tokens: every command exits 2 with one line
    naming the model's limit, the requested context and the fix, no traceback, and nothing written (it used to end
    in `error: index out of range in self`)."""
    user_model, text, labels = user_gpt2
    workspace = tmp_path / "ws"
    argv = [a.format(model=user_model, text=text, labels=labels, ws=workspace) for a in TOO_LONG[command]]
    result = runner.invoke(app, [*argv, "--workspace", str(workspace)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"error: sequences of 128 tokens are longer than {user_model}'s 64 positions; use a context length of at "
        "most 64 (--context-length 64)"
    ]  # (transformers' weight-loading bar may precede it)
    written = [p for p in workspace.rglob("*") if p.is_file() and p.name != "results.duckdb"]
    assert not written, written
    if (workspace / "results.duckdb").exists():
        from workbench.results import ResultsDB

        assert ResultsDB(workspace).tables() == []
    for folder in ("stores", "saes", "dynamics", "codebooks", "probes"):
        assert not (workspace / folder).exists() or not any((workspace / folder).iterdir()), folder


def test_the_library_forward_refuses_more_tokens_than_the_models_positions(saved_gpt2) -> None:
    from workbench.model import ContextLengthError, HookedModel

    model = HookedModel.from_pretrained(saved_gpt2)
    with pytest.raises(ContextLengthError, match="65 tokens are longer than .* 64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    assert model(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 64, 100)


def test_every_command_has_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "capture", "version"):
        assert command in result.output
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


# Each spelling before issue 30's one grammar: (old argv, the new spelling its note names, what the refusal says).
OLD_SPELLINGS = [
    (["probe", "fit", "m", "--labels", "{tmp}/none.csv"], "`workbench probe run`", "does not exist"),
    (["probe", "run", "{tmp}/none.toml"], "`workbench probe jobs run JOBS.toml`", "does not exist"),
    (["probe", "status", "{tmp}/none.toml"], "`workbench probe jobs status JOBS.toml`", "does not exist"),
    (["codebook", "analyse", "m"], "`workbench codebook run`", "--data is required"),
    (["circuits", "status", "feedfacecafe"], "`workbench circuits jobs status`", "feedfacecafe"),
    (["sae", "export", "none", "--out", "{tmp}/out", "--model", "m"], "`workbench sae export ... MODEL`", "none"),
    (["massive", "m", "--data", "{tmp}/none.txt"], "`workbench massive run MODEL --data DATA`", "none.txt"),
    (["attention", "m", "--data", "{tmp}/none.txt"], "`workbench attention run MODEL --data DATA`", "none.txt"),
    (["circuits", "clt-eval", "{tmp}/clt", "m"], "`workbench sae eval PATH MODEL`", "--data is required"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "new", "refusal"), OLD_SPELLINGS, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None
)
def test_old_spellings_still_run_and_name_the_new_one(argv, new, refusal, tmp_path) -> None:
    """A hidden alias for one release: one deprecation line naming the new spelling, then the same command (here
    refusing bad input with its one `error:` line), and absent from its group's --help."""
    result = runner.invoke(app, [*(a.format(tmp=tmp_path) for a in argv), "-w", str(tmp_path / "ws")])
    lines = result.output.splitlines()
    assert result.exit_code == 2, result.output
    assert lines[0].startswith("warning: `workbench ") and "is deprecated" in lines[0] and new in lines[0]
    assert lines[-1].startswith("error: ") and refusal in lines[-1] and "Traceback" not in result.output
    hidden, where = ("--model", argv[:2]) if argv[:2] == ["sae", "export"] else (f" {argv[1]} ", argv[:1])
    assert argv[1] == "run" or hidden not in runner.invoke(app, [*where, "--help"]).output


def test_sae_circuit_and_circuits_export_take_no_progress() -> None:
    """The retired greedy-search commands accept --no-progress like every other command (they refuse the missing
    --data, not the option)."""
    for argv in (
        ["sae", "circuit", "m", "--transcoder", "t"],
        ["circuits", "export", "m", "--transcoder", "t", "--out", "o"],
    ):
        result = runner.invoke(app, [*argv, "--no-progress"])
        assert result.exit_code == 2 and "--data is required" in result.output, result.output


def test_info_lists_hook_names(saved_gpt2) -> None:
    result = runner.invoke(app, ["info", str(saved_gpt2), "--hooks", "blocks.1.*"])
    assert result.exit_code == 0, result.output
    assert "blocks.1.hook_resid_post" in result.output and "blocks.0.hook_resid_post" not in result.output
    assert "n_layers: 2" in result.output


def test_info_unknown_hook_is_a_clear_error(saved_gpt2) -> None:
    result = runner.invoke(app, ["info", str(saved_gpt2), "--hooks", "blocks.1.hook_resid_psot"])
    assert result.exit_code == 2
    assert "closest valid names" in result.output


def test_info_directory_without_config(tmp_path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_non_utf8_text_file_is_reported_with_its_line(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"not UTF-8 \(byte 14, line 2"):
        count_text_lines(path)  # what loading the dataset does first: the file fails before any model work


def test_texts_from_jsonl_and_txt(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n', encoding="utf-8")
    assert load_dataset(tmp_path / "a.txt").documents() == ["one", "two"]
    assert load_dataset(tmp_path / "b.jsonl").documents() == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"txt": "x"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="c.jsonl: row 1 has no column 'text' \\(it has txt\\)"):
        load_dataset(tmp_path / "c.jsonl")


def test_capture_command_writes_a_complete_store(tmp_path) -> None:
    from workbench.store import ActivationStore

    texts = tmp_path / "corpus.txt"
    texts.write_text("the cat sat\nmassive activations\nhello world\n", encoding="utf-8")
    out = tmp_path / "store"
    args = [
        "capture",
        "minilm",
        "--hooks",
        "blocks.*.hook_resid_post",
        "--data",
        str(texts),
        "--out",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(out, verify="full")
    assert len(store.hooks) == 6 and store.read("blocks.5.hook_resid_post").shape[1] == 384
    assert store.manifest["dataset"] == "corpus.txt" and store.manifest["model"] == "minilm"
    assert f"wrote {store.n_rows} rows × 6 hooks to {out}" in result.output
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert "store complete: 0 new rows" in rerun.output and "wrote" not in rerun.output
    assert f"{store.n_rows} rows × 6 hooks already in {out}" in rerun.output
    mismatch = runner.invoke(
        app,
        [
            "capture",
            "minilm",
            "--hooks",
            "blocks.0.hook_resid_post",
            "--data",
            str(texts),
            "--out",
            str(out),
        ],
    )
    assert mismatch.exit_code == 2 and "already holds a different store" in mismatch.output


def test_capture_command_rejects_non_utf8_texts(tmp_path) -> None:
    texts = tmp_path / "bad.txt"
    texts.write_bytes(b"ok\n\xff\xfe broken\n")
    result = runner.invoke(
        app,
        [
            "capture",
            "minilm",
            "--hooks",
            "blocks.0.hook_resid_post",
            "--data",
            str(texts),
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 2 and "not UTF-8" in result.output
    assert not (tmp_path / "s").exists()


def test_massive_command_on_minilm_and_on_a_zoo_series(zoo_workspace) -> None:
    from workbench.results import ResultsDB

    result = runner.invoke(app, ["massive", "run", "minilm", "--workspace", str(zoo_workspace.root)])
    assert result.exit_code == 0, result.output
    assert "[CLS]" in result.output
    db = ResultsDB(zoo_workspace)
    written = f"massive_layers ({len(db.read('massive_layers', model='minilm'))} rows), massive_top "
    assert written in result.output and "massive_fits" not in result.output
    series = runner.invoke(
        app,
        [
            "massive",
            "run",
            "code-tiny",
            "--workspace",
            str(zoo_workspace.root),
            *sum((["--step", str(s)] for s in (0, 1, 2, 4, 8, 16, 32, 64)), []),
        ],
    )
    assert series.exit_code == 0, series.output
    fits = ResultsDB(zoo_workspace).read("massive_fits", model="code-tiny")
    assert len(fits) == 2 and set(fits["family"]) == {"exp_log"}
    assert all(f"  step {s}: massive at " in series.output for s in (0, 1, 2, 4, 8, 16, 32, 64))
    assert "at step 64 (the last checkpoint):" in series.output and "massive_fits (2 rows)" in series.output
    few = ["massive", "run", "code-tiny", "--workspace", str(zoo_workspace.root), "--max-tokens", "64"]
    logistic = runner.invoke(
        app, [*few, "--family", "logistic", *sum((["--step", str(s)] for s in (0, 1, 2, 4)), [])]
    )
    assert logistic.exit_code == 0, logistic.output
    note = " ".join(line for line in logistic.output.splitlines() if "emergence fit" in line or "--" in line)
    assert "no logistic emergence fit: it needs 5 distinct checkpoints, this run has 4" in note
    assert "--family log " in note and "--family logistic" not in note and "--family exp_log" not in note
    assert (
        "pass more --step values or drop --step (the series has" in note
        and "massive_fits" not in logistic.output
    )
    log = runner.invoke(app, [*few, "--family", "log", "--step", "0", "--step", "1", "--step", "2"])
    assert log.exit_code == 0 and "no log emergence fit" in log.output and "--family" not in log.output, (
        log.output
    )
    one = runner.invoke(app, ["massive", "run", "code-tiny", "--workspace", str(zoo_workspace.root), "--step", "0",
                              "--max-tokens", "64"])  # fmt: skip
    assert one.exit_code == 0, one.output


def test_attention_command_kernel_statistics_equal_the_eager_path(zoo_workspace, tmp_path) -> None:
    from workbench.attention.statistics import STAT_HOOKS, attention_statistics
    from workbench.checkpoints import CheckpointSeries
    from workbench.results import ResultsDB

    texts = tmp_path / "prompts.txt"
    texts.write_text("def f(x):\n    return x\nimport os\n", encoding="utf-8")
    series = CheckpointSeries.from_directory(zoo_workspace.model_dir("code-tiny"))
    steps = [0, series.steps[-1]]
    args = [
        "attention",
        "run",
        "code-tiny",
        "--workspace",
        str(zoo_workspace.root),
        "--data",
        str(texts),
        "--kernel",
    ]
    result = runner.invoke(app, [*args, *sum((["--step", str(s)] for s in steps), [])])
    assert result.exit_code == 0, result.output
    rows = ResultsDB(zoo_workspace).read("attention_stats", model="code-tiny", dataset="prompts.txt")
    assert sorted(rows["checkpoint"].unique()) == steps
    assert len(rows) == len(steps) * series.load(0).cfg.n_layers * series.load(0).cfg.n_heads
    eager = attention_statistics(series.load(steps[-1]), list(iter_text_lines(texts)))
    kernel = rows[rows["checkpoint"] == steps[-1]].sort_values(["layer", "head"])
    for stat in STAT_HOOKS:
        assert kernel[stat].to_numpy() == pytest.approx(eager[stat].to_numpy(), abs=1e-4), stat
    rerun = runner.invoke(app, [*args, "--step", str(steps[-1])])
    assert rerun.exit_code == 0 and len(
        ResultsDB(zoo_workspace).read("attention_stats", dataset="prompts.txt")
    ) == len(rows)
    bad = runner.invoke(
        app, ["attention", "run", "code-tiny", "--workspace", str(zoo_workspace.root), "--step", "7777"]
    )
    assert bad.exit_code == 2 and "no checkpoint at step(s) [7777]" in bad.output


def test_demo_steps_are_recorded_reused_and_failures_keep_finished_steps(tmp_path) -> None:
    from workbench.app.demo import DemoStepError, _step
    from workbench.workspace import Workspace

    db = Workspace(tmp_path).ensure().results()
    calls = []
    _step(db, "first", lambda: calls.append(1) or "note one")
    _step(db, "first", lambda: calls.append(2) or "again")
    assert calls == [1]
    with pytest.raises(DemoStepError, match=r"'second' failed: ValueError: boom.*rerun `workbench demo`"):
        _step(db, "second", lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert db.read("demo_steps")["step"].tolist() == ["first"]
    _step(db, "second", lambda: calls.append(3) and None)
    assert calls == [1, 3] and sorted(db.read("demo_steps")["step"]) == ["first", "second"]
