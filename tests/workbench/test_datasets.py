"""Dataset references and the one iterator: every source form, tokenization options and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.datasets import DatasetError, load_dataset, parse_dataset_ref
from workbench.model import HookedModel

DOCS = ["the cat sat on the mat", "massive activations act as biases", "hello world"]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return HookedModel.from_pretrained("minilm").tokenizer


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "notes.txt").write_text("\n".join(DOCS) + "\n\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text(
        "".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS))
    )
    (tmp_path / "rows.csv").write_text("body,label\n" + "".join(f'"{d}",{i}\n' for i, d in enumerate(DOCS)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "rows.parquet")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"{i}.txt").write_text(doc)
    (corpus / "skip.md").write_text("markdown")
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": DOCS})}).save_to_disk(
        str(tmp_path / "hfd")
    )
    return tmp_path


def test_every_text_form_gives_the_same_documents(sources) -> None:
    for ref in ("notes.txt", "rows.jsonl:body", "rows.csv:body", "rows.parquet", "corpus", "hf", "hf:text",
                "hfd:train/content"):  # fmt: skip
        assert load_dataset(sources / ref if ":" not in ref else f"{sources}/{ref}").documents() == DOCS, ref
    assert load_dataset(f"{sources}/corpus/*.md").documents() == ["markdown"]
    assert parse_dataset_ref(f"{sources}/rows.jsonl:body").name == "rows.jsonl:body"


def test_pre_tokenized_ids_and_activation_store(sources, minilm_tokenizer) -> None:
    ids = np.array([[5, 6, 7, -1], [8, 9, 10, 11]])
    np.save(sources / "ids.npy", ids)
    data = load_dataset(sources / "ids.npy")
    assert data.modality == "tokens"
    assert data.token_rows(None, context_length=8) == [[5, 6, 7], [8, 9, 10, 11]]
    from workbench.capture import capture_to_store

    model = HookedModel.from_pretrained("minilm")
    capture_to_store(model, DOCS, "blocks.0.hook_resid_post", sources / "store", progress=False)
    stored = load_dataset(sources / "store")
    assert stored.store is not None and stored.store.n_rows == sum(
        len(minilm_tokenizer(d)["input_ids"]) for d in DOCS
    )
    assert stored.token_rows(None, context_length=64) == [minilm_tokenizer(d)["input_ids"] for d in DOCS]


def test_tokenization_options(sources, minilm_tokenizer) -> None:
    data = load_dataset(sources / "notes.txt")
    plain = data.token_rows(minilm_tokenizer, context_length=64)
    assert plain == [minilm_tokenizer(d)["input_ids"] for d in DOCS]  # bos=None: what the tokenizer adds
    bare = data.token_rows(minilm_tokenizer, context_length=64, bos=False)
    assert bare == [minilm_tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    with_bos = data.token_rows(minilm_tokenizer, context_length=64, bos=True)
    assert all(r[0] == minilm_tokenizer.cls_token_id for r in with_bos)
    packed = data.token_rows(minilm_tokenizer, context_length=4, packing=True, bos=False)
    assert all(len(r) == 4 for r in packed[:-1]) and sum(bare, []) == sum(packed, [])
    truncated = data.token_rows(minilm_tokenizer, context_length=3)
    assert all(len(r) <= 3 for r in truncated)
    budget = data.token_rows(minilm_tokenizer, context_length=64, max_tokens=10)
    assert sum(map(len, budget)) == 10
    a = data.token_rows(minilm_tokenizer, shuffle_seed=1)
    assert a == data.token_rows(minilm_tokenizer, shuffle_seed=1) and sorted(a) == sorted(plain)
    batch = next(data.batches(minilm_tokenizer, batch_size=2))
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 2
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(plain[0]), len(plain[1])]))


def test_zoo_provider() -> None:
    fsm = load_dataset("zoo:tokfsm", limit=5)
    assert fsm.token_ids.shape == (5, 64) and fsm.labels["fsm_state"].shape == (5, 64)
    digits = load_dataset("zoo:digits", limit=7)
    assert digits.modality == "inputs" and digits.inputs.shape == (7, 1, 8, 8)
    assert load_dataset("zoo:python-stdlib", limit=3).documents()
    with pytest.raises(DatasetError, match="zoo has no dataset 'nope'; zoo datasets: zoo:python-stdlib"):
        load_dataset("zoo:nope")


def test_bad_input_names_file_place_and_fix(tmp_path) -> None:
    (tmp_path / "latin.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin.txt is not UTF-8 \(byte 6, line 2.*iconv"):
        load_dataset(tmp_path / "latin.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match="holds no text; write one document per line"):
        load_dataset(tmp_path / "empty.txt")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DatasetError, match=r"rows.jsonl: row 2 has no column 'text' \(it has body\)"):
        load_dataset(tmp_path / "rows.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:2: not valid JSON"):
        load_dataset(tmp_path / "broken.jsonl")
    with pytest.raises(DatasetError, match=r"no such file or directory .*Forms:"):
        load_dataset(tmp_path / "missing.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="holds no files matching"):
        load_dataset(tmp_path / "empty_dir")
    np.save(tmp_path / "floats.npy", np.ones((2, 2)))
    with pytest.raises(DatasetError, match="token ids must be a non-empty 1-D or 2-D integer array"):
        load_dataset(tmp_path / "floats.npy")
    with pytest.raises(DatasetError, match="holds inputs, not texts"):
        load_dataset("zoo:digits", limit=2).documents()
