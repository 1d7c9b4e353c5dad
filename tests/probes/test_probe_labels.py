"""Label sources a user brings: alignment on two tokenizers, planted labels on MiniLM, a non-zoo GPT-2 directory
through the CLI and a job file, label functions, the zoo provider, and label-file errors."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from workbench.labels import LabelError, align_char_labels, load_labels, parse_label_source
from workbench.probes.analysis import (
    ProbeSettings,
    collect_activations,
    fit_model_probes,
    run,
    split_by_sequence,
)
from workbench.probes.jobs import job_status, load_job, run_job
from workbench.probes.readout import load_probe_for
from workbench.references import resolve_model
from workbench.workspace import Workspace

POSITIVE, NEGATIVE = (
    ["wonderful", "excellent", "delightful", "superb"],
    ["terrible", "awful", "dreadful", "horrible"],
)
SUBJECTS = [
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "our dinner",
    "the concert",
    "that book",
    "the show",
]


@pytest.fixture(scope="module")
def minilm():
    return resolve_model("minilm")


@pytest.fixture(scope="module")
def bpe_tokenizer(zoo_workspace):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo_workspace.model_dir("code-tiny"))


@pytest.fixture(scope="module")
def gpt2_dir(zoo_workspace, tmp_path_factory):
    """A GPT-2-architecture HF directory that is not a zoo model: random weights, the zoo's 512-token tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("user-models") / "my-gpt2"
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_workspace.model_dir("code-tiny") / name, path / name)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sentiment_csv(path, n: int = 64, seed: int = 0):
    """Sentences whose label is decided by one word in them (positive or negative adjective)."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["review", "sentiment"])
        writer.writeheader()
        for i in range(n):
            word = rng.choice(POSITIVE if i % 2 else NEGATIVE)
            writer.writerow({"review": f"{rng.choice(SUBJECTS)} was {word} and {rng.choice(SUBJECTS)} ran long",
                             "sentiment": "positive" if i % 2 else "negative"})  # fmt: skip
    return path


# "Ada Lovelace wrote code": NAME = "Ada" (0..3), PART = "Love" (4..8, half of the word), OBJ = "code" (19..23).
SPANS = {"text": "Ada Lovelace wrote code", "spans": [
    {"start": 0, "end": 3, "label": "NAME"}, {"start": 4, "end": 8, "label": "PART"},
    {"start": 19, "end": 23, "label": "OBJ"}]}  # fmt: skip
# classes sorted: NAME 0, O 1, OBJ 2, PART 3. WordPiece: [CLS] ada love ##lace wrote code [SEP];
# byte-level BPE: A d a ĠL o ve l a ce Ġw ro te Ġco de (ĠL and Ġco take the label of L / c, their first visible char)
SPANS_WORDPIECE = [-1, 0, 3, 1, 1, 2, -1]
SPANS_BPE = [0, 0, 0, 3, 3, 3, 1, 1, 1, 1, 1, 1, 2, 2]
# "def add(a, b):" with FN = add, ARG = a, b, the rest ignored (outside=None); classes ARG 0, FN 1.
CODE = {"text": "def add(a, b):", "spans": [{"start": 4, "end": 7, "label": "FN"}, {"start": 8, "end": 9, "label": "ARG"},
                                            {"start": 11, "end": 12, "label": "ARG"}]}  # fmt: skip
PIECES = {
    "tokens": ["def", " add", "(", "a", ", ", "b", "):"],
    "labels": [None, "FN", None, "ARG", None, "ARG", None],
}
CODE_WORDPIECE = [-1, -1, 1, -1, 0, -1, 0, -1, -1, -1]  # [CLS] def add ( a , b ) : [SEP]
CODE_BPE = [-1, 1, 1, 1, -1, 0, -1, 0, -1]  # def Ġa d d ( a , Ġb ):


def test_span_and_piece_labels_align_to_wordpiece_and_byte_level_bpe(minilm, bpe_tokenizer, tmp_path) -> None:
    spans = write_jsonl(tmp_path / "names.jsonl", [SPANS])
    code = write_jsonl(tmp_path / "code.jsonl", [CODE])
    pieces = write_jsonl(tmp_path / "pieces.jsonl", [PIECES])
    for tokenizer, want_spans, want_code in ((minilm.tokenizer, SPANS_WORDPIECE, CODE_WORDPIECE),
                                             (bpe_tokenizer, SPANS_BPE, CODE_BPE)):  # fmt: skip
        dataset = load_labels(spans, tokenizer)
        assert dataset.classes == ("NAME", "O", "OBJ", "PART") and dataset.level == "token"
        assert dataset.labels[0].tolist() == want_spans
        assert dataset.name == "names.jsonl:spans" and dataset.dataset == "names.jsonl"
        assert load_labels(code, tokenizer, outside=None).labels[0].tolist() == want_code
        from_pieces = load_labels(pieces, tokenizer)
        assert from_pieces.labels[0].tolist() == want_code and from_pieces.classes == ("ARG", "FN")
    assert align_char_labels(list("ab c"), [(0, 0), (0, 2), (2, 4)], "ab c") == [None, "a", "c"]


def test_planted_sentiment_on_minilm_cls_beats_its_controls_and_matches_sklearn(minilm, tmp_path) -> None:
    """Each review's label is decided by one adjective in it: a probe on [CLS] reads it at every layer, while the
    control task (a random label per distinct review) and the majority class sit near chance."""
    path = sentiment_csv(tmp_path / "reviews.csv", n=64)
    dataset = load_labels(f"{path}:review:sentiment", minilm.tokenizer, position="first")
    assert dataset.classes == ("negative", "positive") and dataset.name == "reviews.csv:sentiment@first"
    assert (dataset.labelled().sum(1) == 1).all() and dataset.labelled()[:, 0].all()
    hooks = ["blocks.0.hook_resid_post", "blocks.5.hook_resid_post"]
    settings = ProbeSettings(random_init=False, l2=1e-2)
    rows = run(minilm, labels=dataset, hooks=hooks, settings=settings)["probe_results"]
    assert (rows["score"] >= 0.95).all(), rows
    assert (rows["control_score"] <= 0.75).all() and (rows["selectivity"] >= 0.25).all(), rows
    assert (rows["majority_score"] <= 0.65).all() and set(rows["position"]) == {"first"}
    assert json.loads(rows["label_names"].iloc[0]) == ["negative", "positive"]
    names, x, labels, _, sequence = collect_activations(minilm, dataset, hooks)
    train, test = split_by_sequence(sequence, settings.test_fraction, settings.seed)
    for site, hook in enumerate(names):
        scaler = StandardScaler().fit(x[site, train].numpy())
        reference = LogisticRegression(C=1 / (settings.l2 * int(train.sum())), max_iter=2000).fit(
            scaler.transform(x[site, train].numpy()), labels[train].numpy()
        )
        expected = reference.score(scaler.transform(x[site, test].numpy()), labels[test].numpy())
        got = float(rows.set_index("hook").loc[hook, "score"])
        assert abs(got - expected) <= 1 / int(test.sum()) + 1e-9, (hook, got, expected)


def test_mean_pooling_and_regression_on_minilm(minilm, tmp_path) -> None:
    """position=mean pools each review's real tokens ([CLS] and [SEP] included, padding not); numeric labels are
    targets with task=regression."""
    path = sentiment_csv(tmp_path / "reviews.csv", n=24)
    records = list(csv.DictReader(path.read_text().splitlines()))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label"])
        writer.writeheader()
        writer.writerows(
            {"text": r["review"], "label": str(float(r["sentiment"] == "positive"))} for r in records
        )
    pooled = load_labels(path, minilm.tokenizer, position="mean", task="regression")
    assert pooled.labels.dtype == torch.float32 and pooled.name == "reviews.csv:label@mean"
    hook = "blocks.3.hook_resid_post"
    _, x, labels, token_ids, sequence = collect_activations(minilm, pooled, [hook], batch_size=5)
    with torch.no_grad(), minilm.capture(hook) as cache:
        minilm(pooled.tokens, attention_mask=pooled.mask)
    weights = pooled.mask[..., None].float()
    expected = (cache[hook].float() * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(x[0], expected, atol=1e-4, rtol=1e-4)
    assert labels.tolist() == [float(r["sentiment"] == "positive") for r in records]
    assert (token_ids == -1).all() and sequence.tolist() == list(range(24))
    rows = run(
        minilm, labels=pooled, hooks=[hook], settings=ProbeSettings(random_init=False, control=False, l2=1.0)
    )["probe_results"]
    assert rows["metric"].iloc[0] == "r2" and rows["score"].iloc[0] > 0.5, rows
    assert np.isnan(rows["token_identity_score"].iloc[0])


def test_label_functions_per_character_and_per_sequence(bpe_tokenizer, tmp_path) -> None:
    texts = tmp_path / "snippets.txt"
    texts.write_text("x = 12\ny = 345 + 6\n", encoding="utf-8")
    module = tmp_path / "my_labels.py"
    module.write_text("def digits(text):\n    return ['digit' if c.isdigit() else 'other' for c in text]\n\n"
                      "def has_plus(text):\n    return '+' in text\n")  # fmt: skip
    per_char = load_labels(f"{module}:digits", bpe_tokenizer, data=str(texts))
    ids = per_char.tokens[0][per_char.mask[0].bool()].tolist()
    pieces = [bpe_tokenizer.decode([i]) for i in ids]
    want = [per_char.classes.index("digit" if p.strip().isdigit() else "other") for p in pieces]
    assert per_char.labels[0][: len(ids)].tolist() == want and per_char.name == "digits"
    per_text = load_labels(lambda text: "+" in text, bpe_tokenizer, data=str(texts), position="last")
    assert per_text.classes == ("False", "True") and per_text.level == "sequence"
    last = per_text.mask.sum(1) - 1
    assert per_text.labels[torch.arange(2), last].tolist() == [0, 1]
    with pytest.raises(LabelError, match="give them with --data"):
        load_labels(f"{module}:has_plus", bpe_tokenizer)
    with pytest.raises(LabelError, match="has no function 'nope'.*digits, has_plus"):
        parse_label_source(f"{module}:nope")


def test_zoo_label_sets_are_one_provider_and_read_your_own_code(bpe_tokenizer, tmp_path) -> None:
    from workbench.zoo.labels import python_token_labels

    code = tmp_path / "mine.txt"
    code.write_text('print("a", (1, [2]))\n', encoding="utf-8")
    dataset = load_labels("zoo:bracket_depth", bpe_tokenizer, data=str(code), context_length=32)
    tokens, labels = python_token_labels(['print("a", (1, [2]))'], bpe_tokenizer, 32)
    assert torch.equal(dataset.tokens, tokens) and torch.equal(dataset.labels, labels["bracket_depth"])
    assert dataset.dataset == "mine.txt" and int(dataset.labels.max()) == 3
    with pytest.raises(LabelError, match="zoo has no label set 'depth'.*zoo:bracket_depth"):
        parse_label_source("zoo:depth")
    imported = subprocess.run([sys.executable, "-c", "import sys, workbench.labels, probes.analysis, probes.cli; "
                               "print(sorted(m for m in sys.modules if m.startswith('workbench.zoo')))"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    assert imported.stdout.strip() == "[]"


def test_fit_cli_on_a_user_gpt2_directory_puts_span_labels_on_its_tokens(
    gpt2_dir, bpe_tokenizer, tmp_path
) -> None:
    from workbench.cli import app

    model = resolve_model(str(gpt2_dir))
    records = [
        SPANS,
        {"text": "Lovelace wrote code for Ada", "spans": [{"start": 24, "end": 27, "label": "NAME"}]},
    ]
    path = write_jsonl(tmp_path / "people.jsonl", records * 6)
    dataset = load_labels(path, model.tokenizer)
    assert dataset.labels[0, : len(SPANS_BPE)].tolist() == SPANS_BPE
    second = [bpe_tokenizer.decode([i]) for i in dataset.tokens[1][dataset.mask[1].bool()].tolist()]
    named = [piece for piece, label in zip(second, dataset.labels[1].tolist(), strict=False) if label == 0]
    assert "".join(named).strip() == "Ada"
    workspace = tmp_path / "ws"
    result = CliRunner().invoke(app, ["probe", "run", str(gpt2_dir), "--labels", str(path), "--hooks",
                                      "blocks.*.hook_resid_post", "--no-random-init", "-w", str(workspace),
                                      "--save", "people"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "blocks.1.hook_resid_post" in result.output and "wrote 2 rows to probe_results" in result.output
    rows = Workspace(workspace).results().read("probe_results")
    assert set(rows["label_set"]) == {"people.jsonl:spans"} and set(rows["position"]) == {"token"}
    assert rows["n_train"].iloc[0] + rows["n_test"].iloc[0] == int(dataset.labelled().sum())
    # --save keeps the fitted probes: the same weights a fit through the Python API gives
    saved, listing, note = load_probe_for(model, "people", workspace)
    _, fitted = fit_model_probes(model, dataset, "blocks.*.hook_resid_post", ProbeSettings(random_init=False))
    assert saved.sites == fitted.sites == list(rows["hook"]) and listing.label_set == "people.jsonl:spans"
    torch.testing.assert_close(saved.weight, fitted.weight)
    torch.testing.assert_close(saved.bias, fitted.bias)


JOB = """name = "mine"
[settings]
n_sequences = 8
context_length = 32
random_init = false

[[probe]]
model = "models/my-gpt2"
hooks = "blocks.*.hook_resid_post"
labels = ["reviews.csv:review:sentiment", "people.jsonl"]
position = "last"
"""


def test_job_with_a_user_model_directory_and_label_files_resumes_without_duplicates(
    gpt2_dir, tmp_path
) -> None:
    root = tmp_path / "job"
    (root / "models").mkdir(parents=True)
    (root / "models" / "my-gpt2").symlink_to(gpt2_dir, target_is_directory=True)
    sentiment_csv(root / "reviews.csv", n=16)
    write_jsonl(root / "people.jsonl", [SPANS, CODE] * 4)
    path = root / "mine.toml"
    path.write_text(JOB)
    workspace = Workspace(tmp_path / "ws")
    status = run_job(path, workspace=workspace, progress=False)
    assert list(status["status"]) == ["done", "done"], status["error"].tolist()
    assert list(status["label_set"]) == ["reviews.csv:sentiment@last", "people.jsonl:spans"]
    first = workspace.results().read("probe_results")
    # the model's identity: the resolved directory (the job's models/my-gpt2 links to it)
    assert len(first) == 2 * 2 and set(first["model"]) == {gpt2_dir.resolve().as_posix()}
    again = run_job(path, workspace=workspace, progress=False)
    assert list(again["status"]) == ["done", "done"]
    assert list(workspace.results().read("probe_results")["created_at"]) == list(first["created_at"])
    write_jsonl(root / "people.jsonl", [SPANS, CODE] * 5)  # a changed label file runs its task again
    assert list(job_status(path, workspace)["status"]) == ["done", "pending"]
    run_job(path, workspace=workspace, progress=False)
    rows = workspace.results().read("probe_results")
    assert (
        len(rows) == 4 and not rows.duplicated(["model", "checkpoint", "hook", "label_set", "dataset"]).any()
    )
    tasks = workspace.results().read("probe_tasks")
    assert len(tasks) == 2 and (tasks["status"] == "done").all()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", "review,label\ngood film,pos\n", r"missing.csv:2: no column 'text' .*TEXT_COLUMN:LABEL_COLUMN"),
        ("outside.jsonl", json.dumps({"text": "short", "spans": [{"start": 2, "end": 9, "label": "X"}]}) + "\n",
         r"outside.jsonl:1: span 2..9 .*outside the text of 5 characters; offsets are 0-based"),
        ("latin.csv", b"text,label\ncaf\xe9,pos\n", r"latin.csv is not UTF-8 .*line 2.*iconv"),
        ("empty.jsonl", "", r"empty.jsonl holds no rows; write one labelled text per row"),
        ("nolabel.csv", "text,label\nfine,\n", r"nolabel.csv:2: the label \('label'\) is empty; fill it in"),
    ],
)  # fmt: skip
def test_bad_label_files_exit_2_with_one_line(gpt2_dir, tmp_path, name, content, message) -> None:
    from workbench.cli import app

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = CliRunner().invoke(
        app, ["probe", "run", str(gpt2_dir), "--labels", str(path), "-w", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(message, lines[0]), lines[0]


def test_example_job_files_parse_with_their_label_files() -> None:
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    job = load_job(examples / "my_labels.toml")
    sources = [entry["_labels"][0] for entry in job.entries]
    assert [s.kind for s in sources] == ["sequence", "chars"] and job.entries[0]["position"] == "first"
    assert sources[0].label_set("first") == "my_sentiment.csv:label@first"
    assert set(sources[0].raw) == {"positive", "negative"} and Path(sources[1].reference).is_file()
    zoo = load_job(examples / "zoo_probes.toml")
    assert zoo.entries[0]["label_sets"] == ["bracket_depth", "inside_string"]
