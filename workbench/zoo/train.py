"""Train the embedded model suite with Pythia-style checkpoints, offline, seeded, resumable.

    train_zoo_model("code-tiny", workspace)   ->  <workspace>/models/code-tiny/
        spec.json  tokenizer.json (+ config)  train_log.jsonl  step0/ step1/ step2/ step4/ … (save_pretrained
        + checksums.json)  resume/optimizer.pt (step, optimizer state of the last checkpoint)

Language models are transformers ``GPTNeoXForCausalLM`` (Pythia's architecture: rotary, parallel residual)
trained on the Python standard library's source (``code-*``) or on TokFSM sequences (``fsm-*``); ``vit-digits``
is a ``ViTForImageClassification`` on sklearn's digits. Checkpoints follow Pythia: step 0 (the initialisation),
1, 2, 4, …, 512, then every ``checkpoint_every`` steps, and the last step. Checkpoint N holds the weights after
N optimizer updates. Batches are drawn from a generator seeded by (seed, step), so a resumed run continues
exactly as an uninterrupted one would.

Crash safety (kill -9 at any moment): a checkpoint is written as a hidden directory, fsynced and renamed into
place whole; each log line is flushed as it is written (and the log fsynced at each checkpoint); only then is
``resume/optimizer.pt`` replaced atomically, so it always names a step directory that exists and every log line
up to it. A resume discards what lies past that step (later step directories, log lines) and retrains it, bit
for bit as the killed run would have. Fault-injection points (``workbench.faults``): ``zoo.tokenizer_written``,
``zoo.log_truncated``, ``zoo.step_written``, ``zoo.step_renamed``, ``zoo.log_line``, ``zoo.resume_saved``,
``zoo.dir_trashed``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from workbench.deprecation import renamed_keywords
from workbench.faults import crash_point
from workbench.fileio import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    fsync_tree,
    write_checksums,
)
from workbench.schedules import lr_factor
from workbench.workspace import Workspace
from workbench.zoo.corpora import TokFSM, digits_dataset, python_source_texts
from workbench.zoo.tokenizer import as_transformers, fsm_tokenizer, save_tokenizer, train_bpe

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class ZooError(ValueError):
    """A zoo request cannot be satisfied; the message names the problem and the fix."""


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines a zoo training run (saved as spec.json; a resume must match it)."""

    name: str
    corpus: str  # "code" | "fsm" | "digits"
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    steps: int
    context_length: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    checkpoint_every: int = 250
    seed: int = 0
    vocab_size: int = 512
    max_files: int = 60
    prepend_bos: bool = False  # every training window starts with the BOS token (a fixed first token)
    fsm: dict[str, int] = field(default_factory=lambda: {"n_states": 100, "vocab_size": 20, "branching": 3})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ZOO = (
    ZooSpec("code-tiny", "code", n_layers=2, d_model=64, n_heads=4, d_mlp=256, steps=300, max_files=40),
    ZooSpec(
        "code-small",
        "code",
        n_layers=4,
        d_model=128,
        n_heads=4,
        d_mlp=512,
        steps=600,
        context_length=128,
        lr=2e-3,
        max_files=150,
    ),
    ZooSpec(
        "code-medium",
        "code",
        n_layers=6,
        d_model=128,
        n_heads=4,
        d_mlp=512,
        steps=800,
        context_length=128,
        lr=2e-3,
        max_files=300,
        checkpoint_every=200,
    ),
    ZooSpec("fsm-tiny", "fsm", n_layers=2, d_model=32, n_heads=4, d_mlp=64, steps=1000, batch_size=32),
    ZooSpec(
        "fsm-small", "fsm", n_layers=3, d_model=64, n_heads=4, d_mlp=96, steps=1200, batch_size=32, lr=2e-3
    ),
    ZooSpec(
        "vit-digits",
        "digits",
        n_layers=2,
        d_model=48,
        n_heads=4,
        d_mlp=96,
        steps=800,
        batch_size=64,
        warmup=40,
        checkpoint_every=200,
    ),
)
SPECS: dict[str, ZooSpec] = {spec.name: spec for spec in _ZOO}


@renamed_keywords(seq_len="context_length")
def get_spec(name: str, /, **overrides: Any) -> ZooSpec:
    """The registered spec ``name`` (with field overrides, e.g. ``steps=100``, or ``name=`` for a variant)."""
    if name not in SPECS:
        raise ZooError(f"no zoo model named {name!r}; valid names: {', '.join(SPECS)}")
    try:
        return dataclasses.replace(SPECS[name], **overrides)
    except TypeError as err:
        raise ZooError(
            f"bad override for {name}: {err}; fields: {', '.join(f.name for f in dataclasses.fields(ZooSpec))}"
        ) from None


def checkpoint_steps(total: int, every: int) -> list[int]:
    """Pythia's schedule: 0, 1, 2, 4, …, 512 (capped at ``total``), then every ``every`` steps, and ``total``."""
    steps = {0, total}
    power = 1
    while power <= min(512, total):
        steps.add(power)
        power *= 2
    steps.update(range(every, total + 1, every))
    return sorted(steps)


# ---------------------------------------------------------------------------------------------- data
class _CodeData:
    def __init__(self, spec: ZooSpec, model_dir: Path) -> None:
        texts = python_source_texts(max_files=spec.max_files, seed=spec.seed)
        tokenizer_file = model_dir / "tokenizer.json"
        if tokenizer_file.exists():
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        else:
            tokenizer = train_bpe(texts, spec.vocab_size)
            _save_tokenizer(tokenizer, model_dir)
        self.tokenizer = as_transformers(tokenizer)
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        for encoding in tokenizer.encode_batch(texts):
            ids += encoding.ids + [eos]
        self.tokens = torch.tensor(ids, dtype=torch.long)
        self.vocab_size = tokenizer.get_vocab_size()
        counts = torch.bincount(self.tokens, minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        self.unigram_entropy = float(-(p * p.log()).sum())

    def batch(self, spec: ZooSpec, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((spec.seed, step)) % (2**63))
        starts = torch.randint(
            0, len(self.tokens) - spec.context_length - 1, (spec.batch_size,), generator=gen
        )
        batch = torch.stack([self.tokens[s : s + spec.context_length] for s in starts.tolist()])
        if spec.prepend_bos:
            batch = torch.cat(
                [torch.full((spec.batch_size, 1), self.tokenizer.bos_token_id), batch[:, :-1]], dim=1
            )
        return batch


class _FSMData:
    def __init__(self, spec: ZooSpec, model_dir: Path) -> None:
        self.fsm = TokFSM(**spec.fsm, seed=spec.seed)
        tokenizer = fsm_tokenizer(self.fsm.vocab_size)
        if not (model_dir / "tokenizer.json").exists():
            _save_tokenizer(tokenizer, model_dir)
        self.tokenizer = as_transformers(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size()
        tokens, _ = self.fsm.sample(2000, spec.context_length, seed=10**6)
        counts = np.bincount(tokens.ravel(), minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        self.unigram_entropy = float(-(p * np.log(p)).sum())

    def batch(self, spec: ZooSpec, step: int) -> torch.Tensor:
        tokens, _ = self.fsm.sample(spec.batch_size, spec.context_length, seed=step)
        return torch.from_numpy(tokens)


# ---------------------------------------------------------------------------------------------- models
def _build_model(spec: ZooSpec, vocab_size: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's global RNG as it was
        torch.manual_seed(spec.seed)
        return _init_model(spec, vocab_size)


def _init_model(spec: ZooSpec, vocab_size: int) -> PreTrainedModel:
    # Keywords the configs read in __post_init__(**kwargs) rather than declare as fields (invisible to a checker).
    labels: dict[str, Any] = {"num_labels": 10}
    rotary: dict[str, Any] = {"rotary_pct": 0.25}
    if spec.corpus == "digits":
        vit_config = transformers.ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=spec.d_model,
            num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads,
            intermediate_size=spec.d_mlp,
            **labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return transformers.ViTForImageClassification(vit_config)
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        intermediate_size=spec.d_mlp,
        max_position_embeddings=max(2048, spec.context_length),
        **rotary,
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
    )
    return transformers.GPTNeoXForCausalLM(config)


def _optimizer(model: torch.nn.Module, spec: ZooSpec) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, LayerNorm or embeddings' norms)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "norm" not in name.lower() else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------------------------- saving
RESUME_FILE = Path("resume") / "optimizer.pt"
_STEP_DIR = re.compile(r"step(\d+)")


def _remove_dir(path: Path) -> None:
    """Delete a directory so that no reader sees part of it: rename it to a hidden name, then remove that."""
    trash = path.with_name(f".{path.name}.trash.tmp-{os.getpid()}")
    os.rename(path, trash)
    crash_point("zoo.dir_trashed")
    shutil.rmtree(trash)


def _remove_temp(model_dir: Path) -> None:
    """Remove what a killed run left half-written: hidden ``.*.tmp*`` files and directories."""
    for path in [*model_dir.glob(".*.tmp*"), *(model_dir / RESUME_FILE.parent).glob(".*.tmp*")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _save_tokenizer(tokenizer, model_dir: Path) -> None:
    """``save_tokenizer`` into a hidden directory, then move its files into ``model_dir``, ``tokenizer.json`` last
    (its presence means the tokenizer is complete)."""
    tmp = model_dir / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(tokenizer, tmp)
    fsync_tree(tmp)
    crash_point("zoo.tokenizer_written")
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "tokenizer.json"):
        os.replace(path, model_dir / path.name)
    tmp.rmdir()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (saving / loading a checkpoint)."""
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _save_checkpoint(model: PreTrainedModel, model_dir: Path, step: int) -> None:
    """Write ``step<step>/`` (save_pretrained + checksums.json) as a hidden directory, then rename it into place
    whole; ``step<step>/`` must not exist yet."""
    tmp = model_dir / f".step{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():
        model.save_pretrained(str(tmp), safe_serialization=True)
    write_checksums(tmp)
    fsync_tree(tmp)
    crash_point("zoo.step_written")
    os.rename(tmp, model_dir / f"step{step}")
    crash_point("zoo.step_renamed")


def _save_resume_state(optimizer: torch.optim.Optimizer, model_dir: Path, step: int, seconds: float) -> None:
    """Replace ``resume/optimizer.pt`` atomically; written only once ``step<step>/`` is in place."""
    atomic_torch_save(
        model_dir / RESUME_FILE, {"step": step, "optimizer": optimizer.state_dict(), "train_seconds": seconds}
    )
    crash_point("zoo.resume_saved")


def _load_resume_state(model_dir: Path) -> dict[str, Any] | None:
    """The resume state, or None. A run killed inside the old delete-then-rename replacement left its complete
    state only in ``.resume.tmp-PID/``: the newest of those whose step directory exists is put back."""
    path = model_dir / RESUME_FILE
    if not path.exists():
        found = []
        for old in model_dir.glob(".resume.tmp-*/optimizer.pt"):
            try:
                step = int(torch.load(old, weights_only=True)["step"])
            except Exception:  # noqa: BLE001 - a half-written leftover is skipped
                continue
            if (model_dir / f"step{step}" / "model.safetensors").exists():
                found.append((step, old))
        if not found:
            return None
        path.parent.mkdir(exist_ok=True)
        os.replace(max(found)[1], path)
    return torch.load(path, weights_only=True)


def _step_dirs(model_dir: Path) -> dict[int, Path]:
    return {
        int(m.group(1)): p for p in model_dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()
    }


def _log_entries(log_path: Path, upto: int) -> list[str]:
    """Log lines of steps ``<= upto`` (a line torn by a kill mid-write is dropped)."""
    kept = []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if step <= upto:
            kept.append(line + "\n")
    return kept


def _check_lengths(spec: ZooSpec) -> None:
    for name in ("steps", "checkpoint_every", "batch_size", "context_length"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            default = getattr(SPECS[spec.name], name) if spec.name in SPECS else 1
            flag = f"--{name} N or " if name == "steps" else ""
            raise ZooError(
                f"{spec.name}: {name} must be a whole number of at least 1, got {value!r}; pass {flag}"
                f"{name}=N with N >= 1 (the default is {default})"
            )


def _check_spec(model_dir: Path, spec: ZooSpec) -> None:
    spec_file = model_dir / "spec.json"
    if not spec_file.exists():
        return
    stored = json.loads(spec_file.read_text())
    if "seq_len" in stored:  # written before context_length was its name
        stored["context_length"] = stored.pop("seq_len")
    defaults = {
        f.name: f.default for f in dataclasses.fields(ZooSpec) if f.default is not dataclasses.MISSING
    }
    # fields added after a run was written compare by their default, so older runs stay resumable
    differs = {
        k: (stored.get(k, defaults.get(k)), v)
        for k, v in spec.to_json().items()
        if stored.get(k, defaults.get(k)) != v
    }
    if differs:
        detail = ", ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in differs.items())
        raise ZooError(
            f"{model_dir} holds a run with a different config ({detail}); use another workspace or name, or delete "
            f"{model_dir} (or pass --restart) to train from scratch"
        )


# ---------------------------------------------------------------------------------------------- training
def train_zoo_model(
    name: str | ZooSpec,
    workspace: str | Path | Workspace | None = None,
    *,
    restart: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    **overrides: Any,
) -> Path:
    """Train (or resume, or find finished) zoo model ``name`` in the workspace; returns its directory.

    ``stop_after`` ends the run after that many optimizer steps (simulating an interruption; the run resumes from
    its last checkpoint next time). ``overrides`` change spec fields (e.g. ``steps=100``, ``seed=1``); the seed
    determines the initialisation and every batch, and the global RNG is left untouched.
    """
    spec = name if isinstance(name, ZooSpec) else get_spec(name, **overrides)
    _check_lengths(spec)
    model_dir = Workspace(workspace).ensure().model_dir(spec.name)
    if restart and model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    _check_spec(model_dir, spec)
    atomic_write_json(model_dir / "spec.json", spec.to_json())
    state = _load_resume_state(model_dir)
    _remove_temp(model_dir)
    steps_on_disk = _step_dirs(model_dir)
    if state is None and spec.steps in steps_on_disk:
        return model_dir  # finished by a workbench that kept no resume state
    if state is None and any(step > 0 for step in steps_on_disk):
        raise ZooError(
            f"{model_dir} has checkpoints but no resume state; pass restart=True (--restart) to retrain"
        )
    start = int(state["step"]) if state is not None else 0
    if state is not None and start not in steps_on_disk:
        raise ZooError(
            f"{model_dir}: resume state is at step {start} but step{start}/ is missing; pass restart=True "
            "(--restart) to retrain"
        )
    if start == spec.steps:
        return model_dir
    for step, path in steps_on_disk.items():  # what a killed run wrote past its resume point is retrained
        if step > start or state is None:
            _remove_dir(path)
    log_path = model_dir / "train_log.jsonl"
    atomic_write_text(log_path, "".join(_log_entries(log_path, upto=start)))
    crash_point("zoo.log_truncated")

    if spec.corpus == "digits":
        data = None
        x_train, y_train, x_test, y_test = digits_dataset(seed=spec.seed)
        model = _build_model(spec, 0)
        meta: dict[str, Any] = {"chance_accuracy": 0.1}
    else:
        data = _CodeData(spec, model_dir) if spec.corpus == "code" else _FSMData(spec, model_dir)
        model = _build_model(spec, data.vocab_size)
        meta = {"unigram_entropy": data.unigram_entropy}
        if spec.corpus == "fsm":
            assert isinstance(data, _FSMData)
            meta["fsm_entropy_rate"] = data.fsm.entropy_rate()
    optimizer = _optimizer(model, spec)
    if state is not None:
        with torch.random.fork_rng(devices=[]), _quiet_transformers():  # from_pretrained may draw an init
            saved = type(model).from_pretrained(str(model_dir / f"step{start}"))
        model.load_state_dict(saved.state_dict())
        del saved
        optimizer.load_state_dict(state["optimizer"])
    atomic_write_json(model_dir / "meta.json", meta)
    if state is None:
        _save_checkpoint(model, model_dir, 0)
        _save_resume_state(optimizer, model_dir, 0, 0.0)

    schedule = set(checkpoint_steps(spec.steps, spec.checkpoint_every))
    seconds = float(state.get("train_seconds", 0.0)) if state is not None else 0.0
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(start, spec.steps), desc=f"train {spec.name}", unit="step", disable=not progress)
    with open(log_path, "a") as log:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = spec.lr * lr_factor(
                    step,
                    steps=spec.steps,
                    warmup=spec.warmup,
                    decay_start=spec.warmup,
                    decay="cosine",
                    floor=0.1,
                )
            if data is None:
                gen = torch.Generator().manual_seed(hash((spec.seed, step)) % (2**63))
                index = torch.randint(0, len(x_train), (spec.batch_size,), generator=gen)
                loss = torch.nn.functional.cross_entropy(
                    model(pixel_values=x_train[index]).logits, y_train[index]
                )
            else:
                tokens = data.batch(spec, step)
                loss = model(input_ids=tokens, labels=tokens).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_value = loss.item()
            entry: dict[str, Any] = {
                "step": step + 1,
                "loss": round(loss_value, 5),
                "lr": optimizer.param_groups[0]["lr"],
            }
            checkpoint = step + 1 in schedule
            if checkpoint:
                if data is None:
                    entry["test_accuracy"] = _accuracy(model, x_test, y_test)
                    model.train()
                _save_checkpoint(model, model_dir, step + 1)
            log.write(json.dumps(entry) + "\n")
            log.flush()  # in the kernel's hands: survives kill -9
            crash_point("zoo.log_line")
            if checkpoint:
                os.fsync(log.fileno())  # every line up to the resume point survives a power cut too
                elapsed = round(seconds + time.perf_counter() - started, 2)
                if step + 1 == spec.steps:
                    atomic_write_json(model_dir / "meta.json", meta | {"train_seconds": elapsed})
                _save_resume_state(optimizer, model_dir, step + 1, elapsed)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if stop_after is not None and step + 1 - start >= stop_after:
                break
    return model_dir


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())


def read_train_log(model_dir: str | Path) -> list[dict[str, Any]]:
    """The training log of a zoo model: one dict per optimizer step (step, loss, lr[, test_accuracy])."""
    path = Path(model_dir) / "train_log.jsonl"
    if not path.exists():
        raise ZooError(f"{model_dir} has no train_log.jsonl; is it a zoo model directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ZooTrainer:
    """The zoo as a model trainer (``workbench.references.ModelTrainer``, entry point ``zoo`` of
    ``workbench.trainers``): :func:`get_spec` and :func:`train_zoo_model`."""

    def spec(self, base: str, **overrides: Any) -> ZooSpec:
        return get_spec(base, **overrides)

    def train(
        self, spec: ZooSpec, workspace: str | Path | Workspace | None, *, progress: bool = True
    ) -> Path:
        return train_zoo_model(spec, workspace, progress=progress)


TRAINER = ZooTrainer()
