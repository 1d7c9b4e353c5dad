"""ActivationStore: atomic shards, checksums, resume without duplicates, mmap reads, shuffled batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from workbench.model import HookedModel
from workbench.store import ActivationStore, StoreError, capture_to_store


def _rows(n: int, d: int = 8, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, d, generator=gen), "b": torch.randn(n, 2, 3, generator=gen)}, torch.arange(n)


def _store(path, **kwargs) -> ActivationStore:
    defaults = dict(model="m", hooks=["a", "b"], dataset="d", shard_rows=10)
    return ActivationStore.create(path, **{**defaults, **kwargs})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_is_exact_and_memory_mapped(tmp_path, dtype) -> None:
    store = _store(tmp_path / "s", dtype=dtype)
    acts, ids = _rows(25)
    store.append({k: v[:12] for k, v in acts.items()}, ids[:12])
    store.append({k: v[12:] for k, v in acts.items()}, ids[12:])
    store.finalize()
    opened = ActivationStore.open(tmp_path / "s", verify="full")
    assert opened.n_rows == 25 and len(opened.manifest["shards"]) == 2
    torch.testing.assert_close(opened.read("a"), acts["a"].to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(opened.read("b"), acts["b"].to(dtype), rtol=0, atol=0)
    assert torch.equal(opened.token_ids(), ids)
    assert opened.manifest["workbench_version"] and opened.manifest["dtype"] == str(dtype).removeprefix(
        "torch."
    )


def test_reads_are_memory_maps_of_the_shard_file(tmp_path) -> None:
    store = _store(tmp_path / "s", shard_rows=100)
    acts, ids = _rows(20)
    store.append(acts, ids)
    store.finalize()
    column = ActivationStore.open(tmp_path / "s", verify="none").read("a")
    shard = tmp_path / "s" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    offset = header + json.loads(data[8:header])["a"]["data_offsets"][0]
    data[offset : offset + 4] = torch.tensor([123.0]).numpy().tobytes()
    with open(shard, "r+b") as handle:  # rewrite in place: the mapped pages change under the tensor
        handle.write(bytes(data))
    assert column[0, 0].item() == 123.0


def test_shuffled_batches_cover_every_row_once(tmp_path) -> None:
    store = _store(tmp_path / "s")
    acts, ids = _rows(37)
    for start in range(0, 37, 9):
        store.append({k: v[start : start + 9] for k, v in acts.items()}, ids[start : start + 9])
    store.finalize()
    opened = ActivationStore.open(tmp_path / "s")
    seen = []
    for batch in opened.iter_batches("a", batch_size=8, seed=3):
        assert torch.equal(batch["a"], acts["a"][batch["token_ids"]])
        seen += batch["token_ids"].tolist()
    assert sorted(seen) == list(range(37)) and seen != list(range(37))
    again = [b["token_ids"].tolist() for b in opened.iter_batches("a", batch_size=8, seed=3)]
    assert sum(again, []) == seen


def test_corrupted_and_truncated_shards_are_reported_with_their_path(tmp_path) -> None:
    store = _store(tmp_path / "s")
    acts, ids = _rows(30)
    store.append(acts, ids)
    store.finalize()
    shard = tmp_path / "s" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00000.safetensors fails its checksum"):
        ActivationStore.open(tmp_path / "s", verify="full")
    with pytest.raises(StoreError, match="fails its checksum"):
        ActivationStore.open(tmp_path / "s").read("a")
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match="truncated or corrupted"):
        ActivationStore.open(tmp_path / "s").read("a")


def test_interrupted_store_is_not_read_as_complete_and_resumes(tmp_path, monkeypatch) -> None:
    acts, ids = _rows(40)
    store = _store(tmp_path / "s")
    store.append({k: v[:15] for k, v in acts.items()}, ids[:15], sequences_done=3)
    store.flush()  # shard 0 on disk before the writes start failing (shards are otherwise written behind)

    import workbench.store as module

    real_write = module.atomic_write_bytes
    calls = {"n": 0}

    def crash_on_manifest(path, data, boundary=None):
        calls["n"] += 1
        if path.name == "manifest.json":
            raise KeyboardInterrupt("killed between shard and manifest")
        real_write(path, data, boundary)

    monkeypatch.setattr(module, "atomic_write_bytes", crash_on_manifest)
    # the full buffer goes to the writer thread; its error surfaces when the store next waits for it
    store.append({k: v[15:30] for k, v in acts.items()}, ids[15:30], sequences_done=6)
    with pytest.raises(KeyboardInterrupt):
        store.flush()
    monkeypatch.setattr(module, "atomic_write_bytes", real_write)
    assert (tmp_path / "s" / "shard-00001.safetensors").exists()  # orphan shard, not in the manifest
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    resumed = _store(tmp_path / "s")
    assert resumed.n_rows == 15 and resumed.manifest["sequences_done"] == 3
    assert not (tmp_path / "s" / "shard-00001.safetensors").exists()
    resumed.append({k: v[15:] for k, v in acts.items()}, ids[15:], sequences_done=8)
    resumed.finalize()
    final = ActivationStore.open(tmp_path / "s", verify="full")
    assert torch.equal(final.token_ids(), ids)
    torch.testing.assert_close(final.read("a"), acts["a"])


def test_existing_store_with_another_identity_is_refused(tmp_path) -> None:
    _store(tmp_path / "s").finalize()
    with pytest.raises(StoreError, match="model: stored 'm', requested 'other'"):
        _store(tmp_path / "s", model="other")
    with pytest.raises(StoreError, match="hooks"):
        _store(tmp_path / "s", hooks=["a"])
    assert _store(tmp_path / "s", model="other", overwrite=True).n_rows == 0
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        _store(tmp_path / "junk")


def test_non_finite_rows_are_refused(tmp_path) -> None:
    store = _store(tmp_path / "s")
    acts, ids = _rows(5)
    acts["a"][3, 1] = float("nan")
    with pytest.raises(StoreError, match="a holds NaN/inf at appended row 3"):
        store.append(acts, ids)


def _tiny_neox() -> HookedModel:
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                          vocab_size=260, max_position_embeddings=64)  # fmt: skip
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(), pad_token="<pad>", eos_token="<eos>"
    )
    return HookedModel.from_hf(T.GPTNeoXForCausalLM(cfg), tokenizer, name="tiny")


def _byte_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i) if chr(i).isprintable() else f"<0x{i:02X}>": i for i in range(256)}
    vocab.update({"<pad>": 256, "<eos>": 257})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok


@pytest.fixture(scope="module")
def gpt2() -> tuple[T.GPT2LMHeadModel, HookedModel]:
    torch.manual_seed(0)
    config = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    hf = T.GPT2LMHeadModel(config).eval()
    return hf, HookedModel.from_hf(hf, tokenizer=None, name="gpt2-tiny")


def _token_lists(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=gen)
    return [torch.randint(0, 100, (int(k),), generator=gen).tolist() for k in lengths]


def test_capture_rows_match_unpadded_hf_hidden_states(tmp_path, gpt2) -> None:
    hf, model = gpt2
    inputs = _token_lists(9)
    store = capture_to_store(model, inputs, "blocks.*.hook_resid_post", tmp_path / "c", batch_size=4,
                             shard_rows=25, progress=False)  # fmt: skip
    assert store.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert store.n_rows == sum(map(len, inputs)) and len(store.manifest["shards"]) > 1
    assert torch.equal(store.token_ids(), torch.tensor(sum(inputs, [])))
    where = store.locations()
    layer0 = store.read("blocks.0.hook_resid_post")
    for index, ids in enumerate(inputs):
        with torch.no_grad():
            reference = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        rows = where[:, 0] == index
        assert where[rows, 1].tolist() == list(range(len(ids)))
        torch.testing.assert_close(layer0[rows], reference, rtol=1e-5, atol=1e-5)


def test_capture_positions_keep_only_those_tokens(tmp_path, gpt2) -> None:
    _, model = gpt2
    inputs = _token_lists(6)
    full = capture_to_store(model, inputs, "blocks.1.hook_resid_post", tmp_path / "full", batch_size=3,
                            progress=False)  # fmt: skip
    last = capture_to_store(model, inputs, "blocks.1.hook_resid_post", tmp_path / "last", batch_size=3,
                            positions="last", progress=False)  # fmt: skip
    ends = [(i, len(ids) - 1) for i, ids in enumerate(inputs)]
    assert [tuple(r) for r in last.locations().tolist()] == ends
    full_rows = {tuple(r): k for k, r in enumerate(full.locations().tolist())}
    picked = torch.tensor([full_rows[e] for e in ends])
    torch.testing.assert_close(
        last.read("blocks.1.hook_resid_post"), full.read("blocks.1.hook_resid_post")[picked]
    )
    edges = capture_to_store(model, inputs, "blocks.1.hook_resid_post", tmp_path / "edges", batch_size=3,
                             positions=[0, -1], progress=False)  # fmt: skip
    assert [tuple(r) for r in edges.locations().tolist()] == sorted(ends + [(i, 0) for i in range(6)])


def test_capture_crash_then_resume_equals_uninterrupted_run(tmp_path, gpt2, monkeypatch) -> None:
    _, model = gpt2
    inputs = _token_lists(13)
    options = dict(batch_size=3, shard_rows=20, progress=False)
    reference = capture_to_store(model, inputs, "blocks.*.hook_resid_post", tmp_path / "ref", **options)

    import workbench.store as module

    real_write, manifests = module.atomic_write_bytes, []

    def crash_on_third_shard(path, data, boundary=None):
        if path.name == "manifest.json":
            manifests.append(json.loads(data))
            if len(manifests) == 4:  # creation, shard 0, shard 1, then shard 2's manifest update
                raise KeyboardInterrupt("killed after the shard file, before the manifest")
        real_write(path, data, boundary)

    monkeypatch.setattr(module, "atomic_write_bytes", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        capture_to_store(model, inputs, "blocks.*.hook_resid_post", tmp_path / "c", **options)
    monkeypatch.setattr(module, "atomic_write_bytes", real_write)
    assert (tmp_path / "c" / "shard-00002.safetensors").exists()
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(tmp_path / "c")
    partial = ActivationStore.open(tmp_path / "c", allow_incomplete=True)
    assert len(partial.manifest["shards"]) == 2 and 0 < partial.manifest["sequences_done"] < 13
    resumed = capture_to_store(model, inputs, "blocks.*.hook_resid_post", tmp_path / "c", **options)
    assert resumed.manifest["complete"] and resumed.n_rows == reference.n_rows
    assert (reference.rows_at_open, reference.rows_written) == (0, reference.n_rows)
    assert resumed.rows_at_open == partial.n_rows > 0
    assert resumed.rows_written == reference.n_rows - partial.n_rows > 0
    again = capture_to_store(model, inputs, "blocks.*.hook_resid_post", tmp_path / "c", **options)
    assert (again.rows_at_open, again.rows_written) == (reference.n_rows, 0)
    assert torch.equal(resumed.locations(), reference.locations())
    assert torch.equal(resumed.token_ids(), reference.token_ids())
    for hook in reference.hooks:
        assert torch.equal(resumed.read(hook), reference.read(hook))
    with pytest.raises(StoreError, match="inputs_sha256"):
        capture_to_store(model, inputs[:-1], "blocks.*.hook_resid_post", tmp_path / "c", **options)


def test_capture_takes_max_length_for_one_release_and_resumes_stores_that_recorded_it(tmp_path, gpt2) -> None:
    """``max_length=`` is the old name of ``context_length=`` (a DeprecationWarning); a store whose manifest
    recorded ``max_length`` (written before the rename) resumes and verifies as before."""
    _, model = gpt2
    inputs = _token_lists(5)
    new = capture_to_store(model, inputs, "blocks.0.hook_resid_post", tmp_path / "new", context_length=8,
                           progress=False)  # fmt: skip
    with pytest.warns(
        DeprecationWarning, match=r"max_length= in capture_to_store\(\) is deprecated .*context_length="
    ):
        old = capture_to_store(model, inputs, "blocks.0.hook_resid_post", tmp_path / "old", max_length=8,
                               progress=False)  # fmt: skip
    assert torch.equal(old.read("blocks.0.hook_resid_post"), new.read("blocks.0.hook_resid_post"))
    assert old.n_rows == sum(min(len(ids), 8) for ids in inputs)
    with pytest.raises(TypeError, match="gives both max_length= and context_length="):
        capture_to_store(
            model, inputs, "blocks.0.hook_resid_post", tmp_path / "x", max_length=8, context_length=8
        )
    manifest_file = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    recipe = manifest["extra"]["capture"]
    recipe["max_length"] = recipe.pop("context_length")
    manifest_file.write_text(json.dumps(manifest))
    again = capture_to_store(model, inputs, "blocks.0.hook_resid_post", tmp_path / "old", context_length=8,
                             progress=False)  # fmt: skip
    assert (again.rows_at_open, again.rows_written) == (old.n_rows, 0)


def test_capture_from_texts_through_the_tokenizer(tmp_path) -> None:
    model = _tiny_neox()
    texts = [f"def f{i}(x): return x + {i}" for i in range(5)]
    store = capture_to_store(model, texts, "blocks.1.hook_mlp_out", tmp_path / "c", batch_size=2,
                             dtype=torch.bfloat16, progress=False)  # fmt: skip
    assert (
        store.n_rows == sum(map(len, texts)) and store.read("blocks.1.hook_mlp_out").dtype == torch.bfloat16
    )
    with torch.no_grad(), model.capture("blocks.1.hook_mlp_out") as cache:
        model(model.tokenize(texts[3:4]))
    rows = store.locations()[:, 0] == 3
    torch.testing.assert_close(store.read("blocks.1.hook_mlp_out")[rows].float(),
                               cache["blocks.1.hook_mlp_out"][0].bfloat16().float())  # fmt: skip


def _anon_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_ram_stays_flat_while_appending_and_reading_many_shards(tmp_path) -> None:
    store = ActivationStore.create(tmp_path / "big", model="m", hooks=["h"], dataset="d", shard_rows=2048)
    rows = torch.randn(2048, 512)  # 4 MiB per shard, 256 MiB in all
    for index in range(64):
        store.append({"h": rows + index}, torch.full((2048,), index))
        if index == 4:
            after_five = _anon_rss_mib()
    store.finalize()
    assert _anon_rss_mib() - after_five < 16
    opened = ActivationStore.open(tmp_path / "big")
    before = _anon_rss_mib()
    total = 0.0
    for batch in opened.iter_batches("h", batch_size=4096, seed=0):
        total += float(batch["h"][:, 0].sum())
    # a few 8 MiB batches in flight plus what glibc keeps of freed ones (≈ 50 MiB seen), far below the 256 MiB store
    assert _anon_rss_mib() - before < 96
    assert total == pytest.approx(float((rows[:, 0].sum() + 2048 * torch.arange(64.0).mean()) * 64), rel=1e-3)


def test_safetensors_bytes_are_deterministic_and_read_back_by_safetensors(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from workbench.fileio import atomic_save_tensors, safetensors_bytes

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=gen), "f16": torch.randn(5, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(), "i64": torch.arange(7), "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5), "scalar_int": torch.tensor(-3), "empty": torch.empty(0, 4),
        "strided": torch.randn(4, 6, generator=gen)[:, ::2],
    }  # fmt: skip
    metadata = {"b": "2", "a": "1"}
    atomic_save_tensors(tmp_path / "x.safetensors", tensors, metadata)
    reversed_order = dict(reversed(list(tensors.items())))
    assert (
        safetensors_bytes(reversed_order, dict(reversed(list(metadata.items()))))
        == (tmp_path / "x.safetensors").read_bytes()
    )
    loaded = load_file(tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", "pt") as handle:
        assert handle.metadata() == metadata and sorted(handle.keys()) == sorted(tensors)
        opened = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 — not a dict
    for name, tensor in tensors.items():
        for got in (loaded[name], opened[name]):
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
    assert list(tmp_path.iterdir()) == [tmp_path / "x.safetensors"]  # no temporary file left


def _capture(model, inputs, path, **kwargs) -> ActivationStore:
    options = dict(batch_size=3, shard_rows=20, progress=False)
    return capture_to_store(model, inputs, "blocks.*.hook_resid_post", path, **{**options, **kwargs})


def test_identical_captures_have_identical_shard_and_manifest_bytes(tmp_path, gpt2) -> None:
    from workbench.fileio import sha256_file

    _, model = gpt2
    inputs = _token_lists(8)
    first, second = (
        _capture(model, inputs, tmp_path / "a" / "s"),
        _capture(model, inputs, tmp_path / "b" / "t"),
    )
    files = sorted(p.name for p in first.path.iterdir())
    assert files == sorted(p.name for p in second.path.iterdir()) and len(files) > 2
    for name in files:
        assert sha256_file(first.path / name) == sha256_file(second.path / name), name


def test_directory_a_crash_left_without_a_manifest_starts_afresh(tmp_path, gpt2) -> None:
    from workbench.fileio import atomic_path, temp_files

    _, model = gpt2
    inputs = _token_lists(5)
    path = tmp_path / "c"
    with atomic_path(path / "manifest.json") as tmp:  # the writer's own temporary name
        leftover = tmp.with_name(tmp.name.replace("manifest", "manifest.crashed"))
        leftover.write_text("{half a manif")
    assert temp_files(path) == [leftover]
    (path / "manifest.json").unlink()
    (path / "shard-00000.safetensors").write_bytes(b"orphan")
    store = _capture(model, inputs, path)
    assert store.manifest["complete"] and store.n_rows == sum(map(len, inputs))
    assert not leftover.exists() and temp_files(path) == []
    assert ActivationStore.open(path, verify="full").n_rows == store.n_rows


def test_resume_sweeps_the_temporary_files_a_crash_left(tmp_path) -> None:
    from workbench.fileio import TEMP_GLOB

    store = _store(tmp_path / "s")
    acts, ids = _rows(10)
    store.append(acts, ids)
    store.flush()  # the shard is written behind; a resume follows a process that ended
    stale = [
        tmp_path / "s" / ".shard-00001.safetensors.k2j4h1x9.tmp",
        tmp_path / "s" / ".manifest.json.abcd1234.tmp",
    ]
    for file in stale:
        assert file.match(TEMP_GLOB)
        file.write_bytes(b"partial")
    resumed = _store(tmp_path / "s")
    assert resumed.n_rows == 10 and not any(file.exists() for file in stale)


@pytest.mark.parametrize(
    ("positions", "error", "message"),
    [
        (1000, IndexError, r"positions \[1000\] are out of range for 6 of 6 sequences \(shortest \d+ tokens"),
        ([0, 999], IndexError, r"positions \[999\] are out of range .*--context-length.*negative position"),
        (15, IndexError, r"out of range for [1-5] of 6 sequences"),
        (-30, IndexError, r"positions \[-30\]"),
        (slice(100, 200), IndexError, "selects no token"),
        ("first", ValueError, "use an int"),
        ([], ValueError, "non-empty list"),
    ],
)
def test_positions_some_sequence_lacks_are_refused_before_anything_is_written(
    tmp_path, gpt2, positions, error, message
) -> None:
    _, model = gpt2
    inputs = _token_lists(6)
    assert min(map(len, inputs)) < 15 < max(map(len, inputs))
    with pytest.raises(error, match=message):
        _capture(model, inputs, tmp_path / "c", positions=positions)
    assert not (tmp_path / "c").exists()
    shortest = min(map(len, inputs))
    kept = _capture(model, inputs, tmp_path / "ok", positions=[0, shortest - 1, -shortest])
    assert kept.n_rows == sum(len({0, shortest - 1, len(ids) - shortest}) for ids in inputs)


def test_empty_inputs_are_refused(tmp_path, gpt2) -> None:
    _, model = gpt2
    with pytest.raises(StoreError, match="no inputs"):
        _capture(model, [], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(StoreError, match="no inputs"):
        _capture(model, torch.zeros(0, 4, dtype=torch.long), tmp_path / "c")


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["shards"][0].update(file="../../outside.safetensors"),
            r"shards\[0\].file is '../../outside",
        ),
        (lambda m: m["shards"][0].update(file="/etc/passwd"), r"shards\[0\].file is '/etc/passwd'"),
        (lambda m: m.pop("n_rows"), "key 'n_rows' is missing"),
        (lambda m: m["shards"][1].pop("sha256"), r"key shards\[1\].sha256 is missing"),
        (lambda m: m["shards"][0].update(rows="ten"), r"shards\[0\].rows is 'ten', not int"),
        (lambda m: m.update(n_rows=m["n_rows"] + 1), "n_rows is 26 but the shards hold 25 rows"),
        (lambda m: m.update(hooks="a"), "key 'hooks' is 'a', not list"),
        (lambda m: m.update(complete=1), "key 'complete' is 1, not bool"),
        (lambda m: m.update(dtype="int8"), "key 'dtype' is 'int8'"),
        (lambda m: m.pop("checkpoint"), "key 'checkpoint' is missing"),
    ],
)
def test_damaged_manifests_are_refused_naming_the_key(tmp_path, edit, message) -> None:
    store = _store(tmp_path / "s")
    acts, ids = _rows(25)
    store.append({k: v[:12] for k, v in acts.items()}, ids[:12])
    store.append({k: v[12:] for k, v in acts.items()}, ids[12:])
    store.finalize()
    _edit_manifest(tmp_path / "s", edit)
    with pytest.raises(StoreError, match=message):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="recapture the store"):
        _store(tmp_path / "s")


def test_capture_rerun_on_a_finished_store_verifies_its_checksums(tmp_path, gpt2) -> None:
    _, model = gpt2
    inputs = _token_lists(7)
    reference = _capture(model, inputs, tmp_path / "c")
    again = _capture(model, inputs, tmp_path / "c")
    assert again.manifest == reference.manifest
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001.safetensors fails its checksum.*overwrite=True"):
        _capture(model, inputs, tmp_path / "c")
    redone = _capture(model, inputs, tmp_path / "c", overwrite=True)
    assert shard.read_bytes() == (tmp_path / "c" / "shard-00001.safetensors").read_bytes()
    assert torch.equal(redone.read("blocks.0.hook_resid_post"), reference.read("blocks.0.hook_resid_post"))
