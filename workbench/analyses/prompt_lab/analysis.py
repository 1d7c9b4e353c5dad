"""The prompt lab's model-only computations, for the dashboard page and for notebooks alike.

One input, one model, any family: what the lab shows follows the model's declared
:class:`~workbench.adapters.base.Capabilities` (:func:`capabilities`), never its family name. A text model takes a
prompt (token ids [1, pos]); an image model one image of a dataset reference (:func:`load_image`, pixels
[1, C, H, W], positions = CLS then the patches). Per-position residual norms and largest |activation| per layer (massive activations stand
out), attention entropy / sink mass per layer × head (kernel statistics where the kernel runs, the reference path
otherwise) and one head's full pattern; under a stack of :class:`~workbench.interventions.Intervention`, clean vs
intervened: next-token distributions and greedy or sampled continuations (causal LMs), the masked-LM head's top
tokens at a [MASK] (:func:`compare_outputs` at that position), the pooled embedding's cosines
(:func:`compare_embeddings`, encoders), class probabilities (image classifiers); per-patch values of an image
(:func:`patch_grid`); and the session record the page saves. The figures of all these are in
:mod:`workbench.analyses.prompt_lab.figures`. Readouts that need an analysis package (SAE latents, probes, codebook
codes) live in ``workbench.circuits.sae.readout``, ``workbench.probes.readout`` and
``workbench.circuits.codebook.readout``.

    model = resolve_model("code-tiny")
    tokens = encode_prompt(model, "def f(x):")                       # [1, pos]
    stack = [Intervention("zero", "blocks.0.attn.hook_z", heads=(1,))]
    table = compare_next_token(model, tokens, stack).table          # token, p_clean, p_intervened, ...
    vit = resolve_model("vit-digits")
    image = load_image(vit, "zoo:digits", 3)                         # pixels [1, 1, 8, 8]
    compare_outputs(vit, image.pixels, stack).table                  # class, p_clean, p_intervened, ...
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from workbench.adapters.base import Capabilities
from workbench.analysis import Analysis, AnalysisNotApplicable, Table, write_tables
from workbench.attention.statistics import attention_statistics
from workbench.datasets import DatasetError, load_dataset
from workbench.interventions import Intervention, apply_interventions
from workbench.model import HookedModel
from workbench.references import parse_model_ref, resolve_model, resolve_series
from workbench.workspace import Workspace

MAX_PROMPT_TOKENS = int(os.environ.get("WORKBENCH_PROMPT_LAB_MAX_TOKENS", "256"))
PATTERN_MAX_TOKENS = 64  # the full pattern of a head is drawn for prompts up to this length
MODEL_BUDGET_BYTES = int(float(os.environ.get("WORKBENCH_PROMPT_LAB_BUDGET_GB", "4")) * 2**30)
# Torch intra-op threads in the dashboard server. Streamlit runs every script run in a new thread, and each new
# calling thread pays for its own OpenMP team: with the default (one per core) a new session's first render of
# the page took 3.9-5.8 s on 2 cores for 0.1 s of model work; one thread: 0.5 s (benchmarks/RESULTS.md).
SERVER_THREADS = int(os.environ.get("WORKBENCH_DASHBOARD_THREADS", "1"))

ANALYSIS = Analysis(
    name="prompt_lab",
    command="workbench prompt-lab run MODEL --prompt TEXT [--interventions FILE]  (or the dashboard's Prompt lab "
    "page: type a prompt, intervene, press Save)",
    tables=(
        Table(
            "prompt_lab_sessions",
            keys=("model", "checkpoint", "session"),
            columns=(
                "prompt",
                "tokens",
                "interventions",
                "next_token",
                "focus_token",
                "logit_diff",
                "continuation_clean",
                "continuation_intervened",
                "continuation_note",
                "generation",
                "readouts",
                "output",
                "outputs",
            ),
            description="saved prompt-lab sessions: prompt (or image reference), intervention stack, outputs "
            "clean vs intervened (next-token or masked-token distributions, class probabilities, pooled-embedding "
            "cosines), continuations and readouts",
        ),
    ),
    description="prompt lab sessions: saved from the dashboard, or run from the command line",
)


class PromptLabError(ValueError):
    """Bad prompt-lab input (a prompt too long, a model over the memory budget); the message names the fix."""


# ---------------------------------------------------------------------------------------------- models
def parameter_bytes(model: HookedModel) -> int:
    """Bytes held by the model's parameters and buffers."""
    tensors = [*model.model.parameters(), *model.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """Loaded models kept while used and released least-recently-used first so their parameter bytes stay within
    ``budget_bytes``; a model larger than the whole budget is refused (and released)."""

    def __init__(self, budget_bytes: int = MODEL_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._models: OrderedDict[str, tuple[HookedModel, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], HookedModel]) -> HookedModel:
        """The model cached under ``key``, else ``load()`` it, evicting older models to stay under the budget."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            model = load()
            size = parameter_bytes(model)
            if size > self.budget_bytes:
                del model
                raise PromptLabError(
                    f"{key} holds {size / 2**20:.1f} MiB of parameters, more than the prompt lab's memory budget of "
                    f"{self.budget_bytes / 2**20:.1f} MiB; raise WORKBENCH_PROMPT_LAB_BUDGET_GB (GiB) or pick a "
                    "smaller model"
                )
            while self._models and self.used_bytes + size > self.budget_bytes:
                self._models.popitem(last=False)
            self._models[key] = (model, size)
            return model

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    @property
    def loaded(self) -> list[str]:
        """Keys of the loaded models, least recently used first."""
        return list(self._models)

    def release(self, key: str) -> None:
        with self._lock:
            self._models.pop(key, None)


def model_key(reference: str, step: int | None) -> str:
    return reference if step is None else f"{reference.split('@')[0]}@{step}"


def series_steps(reference: str, workspace: Any = None) -> list[int]:
    """Checkpoint steps of a series reference ([] for a single model), without loading weights."""
    parsed = parse_model_ref(reference.split("@")[0], workspace)
    if parsed.kind not in ("series", "hub"):
        return []
    return list(resolve_series(reference.split("@")[0], workspace=workspace).steps)


def load_lab_model(
    reference: str, step: int | None = None, workspace: Any = None, device: str = "cpu"
) -> HookedModel:
    """Any model reference (``workbench.references``), at checkpoint ``step`` of its series when given."""
    if step is None:
        return resolve_model(reference, workspace=workspace, device=device)
    return resolve_series(reference.split("@")[0], workspace=workspace, device=device).load(step)


# ---------------------------------------------------------------------------------------------- inputs
def capabilities(model: HookedModel) -> Capabilities:
    """What ``model`` has (modality, output head, pooling, image shape), as its adapter declares it."""
    return model.adapter.capabilities(model)


def encode_prompt(model: HookedModel, prompt: str, max_tokens: int = MAX_PROMPT_TOKENS) -> torch.Tensor:
    """The prompt's token ids [1, pos]; an empty prompt or one over ``max_tokens`` / the context is refused."""
    if not prompt or not prompt.strip():
        raise PromptLabError("the prompt is empty; type some text")
    if model.tokenizer is None:
        raise PromptLabError(f"{model.cfg.name} has no tokenizer; the prompt lab needs a text model")
    count = len(model.tokenizer(prompt)["input_ids"])  # untruncated; model.to_tokens cuts at the context
    limit = min(max_tokens, model.cfg.n_ctx or max_tokens)
    if count > limit:
        raise PromptLabError(
            f"the prompt has {count} tokens, over the limit of {limit} "
            f"({'the model context' if limit == model.cfg.n_ctx else 'WORKBENCH_PROMPT_LAB_MAX_TOKENS'}); "
            "shorten it" + ("" if limit == model.cfg.n_ctx else " or raise WORKBENCH_PROMPT_LAB_MAX_TOKENS")
        )
    return model.to_tokens(prompt).cpu()


@dataclass
class LabImage:
    """One image of a dataset as the model takes it: ``pixels`` [1, C, H, W], its label (None when the dataset has
    none), the reference ``name`` (``DATA#INDEX``) and ``note`` saying how it was adapted to the model (or "")."""

    pixels: torch.Tensor
    label: int | None
    name: str
    note: str = ""


def load_image(model: HookedModel, data: str, index: int) -> LabImage:
    """Image ``index`` of the dataset reference ``data`` (``workbench.datasets``: ``zoo:digits``, an image folder)
    for an image model: channels matched (grey repeated to RGB, RGB averaged to grey) and resized bilinearly to the
    model's ``image_shape`` when they differ (``note`` says so)."""
    caps = capabilities(model)
    if caps.image_shape is None:
        raise PromptLabError(f"{model.cfg.name} takes text, not images; type a prompt")
    if index < 0:
        raise PromptLabError(f"image index {index} is negative; pick 0 or more")
    dataset = load_dataset(data, limit=index + 1)
    if dataset.inputs is None:
        raise DatasetError(
            f"dataset {data!r} holds {dataset.modality}, not images; give an image dataset (zoo:digits, a folder "
            "of images)"
        )
    if index >= len(dataset.inputs):
        raise PromptLabError(
            f"dataset {data!r} has {len(dataset.inputs)} images; pick an index in 0..{len(dataset.inputs) - 1}"
        )
    image = torch.as_tensor(dataset.inputs[index]).float()
    image = image[None] if image.ndim == 2 else image  # [H, W] -> [1, H, W]
    channels, height, width = caps.image_shape
    notes = []
    if image.shape[0] != channels:
        if channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        elif channels == 1 and image.shape[0] == 3:
            image = image.mean(0, keepdim=True)
        else:
            raise PromptLabError(
                f"image {index} of {data!r} has {image.shape[0]} channels; {model.cfg.name} takes {channels}"
            )
        notes.append(f"{'grey → RGB' if channels == 3 else 'RGB → grey'}")
    if tuple(image.shape[1:]) != (height, width):
        notes.append(f"resized {image.shape[1]}×{image.shape[2]} → {height}×{width}")
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    label = None
    if dataset.labels:
        values = next(iter(dataset.labels.values()))
        label = int(values[index]) if len(values) > index else None
    return LabImage(image[None].contiguous(), label, f"{data}#{index}", "; ".join(notes))


def n_positions(model: HookedModel, inputs: torch.Tensor) -> int:
    """Positions the model sees for ``inputs``: tokens [1, pos] -> pos; pixels -> 1 (CLS) + the patches."""
    if inputs.is_floating_point():
        grid = capabilities(model).patch_grid
        if grid is None:
            raise PromptLabError(f"{model.cfg.name} takes token ids, not pixels")
        return 1 + grid[0] * grid[1]
    return int(inputs.shape[1])


def patch_grid(model: HookedModel, values: Sequence[float]) -> torch.Tensor:
    """Per-position ``values`` (CLS first, as ``HookedModel.position_labels``) -> the patches' values [rows, columns]."""
    grid = capabilities(model).patch_grid
    if grid is None:
        raise PromptLabError(f"{model.cfg.name} has no patches")
    if len(values) != 1 + grid[0] * grid[1]:
        raise PromptLabError(f"got {len(values)} values for CLS + {grid[0]}×{grid[1]} patches")
    return torch.as_tensor(list(values)[1:], dtype=torch.float64).reshape(grid)


# ---------------------------------------------------------------------------------------------- activations
def final_hook(model: HookedModel) -> str:
    """The hook holding the final hidden state: ``ln_final.hook_normalized`` where the model has a final norm,
    else the last block's ``hook_resid_post`` (post-LN encoders such as BERT)."""
    names = model.hook_names()
    return (
        "ln_final.hook_normalized"
        if "ln_final.hook_normalized" in names
        else (f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    )


def residual_profile(model: HookedModel, tokens: torch.Tensor) -> pd.DataFrame:
    """Per layer (``blocks.{l}.hook_resid_post``) and position of ``tokens`` (token ids [1, pos] or pixels
    [1, C, H, W]): the residual norm, the largest |activation| and its dimension. Columns: layer, position, token,
    resid_norm, max_abs, max_dim."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    with torch.no_grad(), model.capture(names, dtype=torch.float32) as cache:
        model(tokens.to(model.device))
    texts = model.position_labels(tokens)
    rows = []
    for layer, name in enumerate(names):
        resid = cache[name][0]  # [pos, d_model]
        peak = resid.abs().max(-1)
        for position, text in enumerate(texts):
            rows.append(
                {
                    "layer": layer,
                    "position": position,
                    "token": text,
                    "resid_norm": float(resid[position].norm()),
                    "max_abs": float(peak.values[position]),
                    "max_dim": int(peak.indices[position]),
                }
            )
    return pd.DataFrame(rows)


def attention_profile(model: HookedModel, tokens: torch.Tensor, kernel: bool | None = None) -> pd.DataFrame:
    """Attention entropy, sink mass, lse and max logit per layer × head, averaged over the queries of ``tokens``
    (token ids [1, pos]: ``workbench.attention.statistics.attention_statistics``, whose sink average leaves out
    query 0; pixels [1, C, H, W]: the same statistics hooks, mean over the queries after CLS).

    ``kernel``: compute them inside the fused Triton kernel (default: where it runs, i.e. the model is on CUDA),
    else on the reference path. The ``path`` column says which."""
    use_kernel = model.device.type == "cuda" if kernel is None else kernel
    previous = model.attention_path
    path = "kernel" if use_kernel else ("eager" if previous == "kernel" else previous)
    model.set_attention_path(path)
    try:
        if tokens.is_floating_point():
            frame = _input_statistics(model, tokens)
        else:
            frame = attention_statistics(model, tokens.cpu(), batch_size=1, context_length=tokens.shape[1])
    finally:
        model.set_attention_path(previous)
    return frame.assign(path=path)


STATISTICS = ("entropy", "sink", "lse", "max_logit")


def _input_statistics(model: HookedModel, pixels: torch.Tensor) -> pd.DataFrame:
    """Per layer × head statistics of one non-token input (queries 1.., as attention_statistics weighs them)."""
    names = [f"blocks.{layer}.attn.hook_{s}" for layer in range(model.cfg.n_layers) for s in STATISTICS]
    with torch.no_grad(), model.capture(names, dtype=torch.float64) as cache:
        model(pixels.to(model.device))
    rows = []
    for layer in range(model.cfg.n_layers):
        values = {s: cache[f"blocks.{layer}.attn.hook_{s}"][0, :, 1:].mean(-1) for s in STATISTICS}  # [head]
        for head in range(model.cfg.n_heads):
            rows.append(
                {
                    "model": model.cfg.name,
                    "checkpoint": model.cfg.checkpoint,
                    "layer": layer,
                    "head": head,
                    **{s: float(values[s][head]) for s in STATISTICS},
                    "n_queries": int(cache[names[0]].shape[-1] - 1),
                }
            )
    return pd.DataFrame(rows)


def head_pattern(model: HookedModel, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """The attention pattern [query, key] of one head on ``tokens`` (token ids [1, pos] or pixels; inputs up to
    PATTERN_MAX_TOKENS positions)."""
    count = n_positions(model, tokens)
    if count > PATTERN_MAX_TOKENS:
        raise PromptLabError(
            f"the input has {count} positions; the full pattern is drawn for inputs up to "
            f"{PATTERN_MAX_TOKENS} (the per-head statistics cover longer ones)"
        )
    if not 0 <= head < model.cfg.n_heads:
        raise PromptLabError(
            f"head {head} out of range: {model.cfg.name} has {model.cfg.n_heads} heads per layer"
        )
    name = f"blocks.{layer}.attn.hook_pattern"
    previous = model.attention_path
    if previous == "kernel":
        model.set_attention_path("eager")
    try:
        with torch.no_grad(), model.capture([name], dtype=torch.float32) as cache:
            model(tokens.to(model.device))
    finally:
        model.set_attention_path(previous)
    return cache[name][0, head]


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class NextTokenComparison:
    """The model's output logits at one position, clean and under the interventions ([n_out] each: the vocabulary
    for a token head, the classes for a classifier), and ``table``: the union of both top-k outputs with token_id,
    token (the token's text or the class name), p_clean, p_intervened, logit_clean, logit_intervened, delta_p,
    delta_logit. ``focus`` holds the chosen token's logits and their difference."""

    clean: torch.Tensor
    intervened: torch.Tensor
    table: pd.DataFrame
    focus: dict[str, Any] | None = None

    @property
    def kl(self) -> float:
        """KL(clean ‖ intervened) of the two distributions, nats."""
        p, q = self.clean.log_softmax(-1), self.intervened.log_softmax(-1)
        return float((p.exp() * (p - q)).sum())


def output_logits(
    model: HookedModel, inputs: torch.Tensor, interventions: Sequence[Intervention] = (), position: int = -1
) -> torch.Tensor:
    """The model's logits under ``interventions`` (a stack) for ``inputs`` (token ids [1, pos] or pixels): at
    ``position`` for a token head ([d_vocab]), the class logits [n_classes] for a classifier."""
    caps = capabilities(model)
    if caps.output == "hidden":
        raise PromptLabError(
            f"{model.cfg.name} has no output head (its forward returns hidden states); compare its pooled "
            "embedding (compare_embeddings) instead"
        )
    inputs = inputs.to(model.device)
    with torch.no_grad(), apply_interventions(model, interventions, inputs):
        output = model(inputs)
    return (output[0, position] if output.ndim == 3 else output[0]).float().cpu()


def next_token_logits(
    model: HookedModel, tokens: torch.Tensor, interventions: Sequence[Intervention] = ()
) -> torch.Tensor:
    """Logits [d_vocab] of the token after ``tokens`` [1, pos], under ``interventions`` (a stack)."""
    return output_logits(model, tokens, interventions, -1)


def output_names(model: HookedModel, ids: Sequence[int]) -> list[str]:
    """The text of token ids, or the class names of a classifier's output ids."""
    names = capabilities(model).class_names
    if names:
        return [names[i] for i in ids]
    return [model.to_str_tokens([i])[0] for i in ids]


def compare_outputs(
    model: HookedModel,
    inputs: torch.Tensor,
    interventions: Sequence[Intervention],
    top_k: int = 10,
    focus_token: str | None = None,
    position: int = -1,
) -> NextTokenComparison:
    """Output distributions clean vs intervened: the next token (position -1 of a causal LM), a masked-LM head's
    tokens at ``position`` (:func:`mask_positions`), or a classifier's classes; ``focus_token`` (a single token's
    text) adds its logit difference (intervened − clean)."""
    clean = output_logits(model, inputs, (), position)
    intervened = output_logits(model, inputs, interventions, position)
    p_clean, p_int = clean.softmax(-1), intervened.softmax(-1)
    k = min(top_k, clean.shape[0])
    ids = list(dict.fromkeys([*p_clean.topk(k).indices.tolist(), *p_int.topk(k).indices.tolist()]))
    focus = None
    if focus_token:
        focus_id = token_id(model, focus_token)
        ids = list(dict.fromkeys([*ids, focus_id]))
        focus = {
            "token": focus_token,
            "token_id": focus_id,
            "logit_clean": float(clean[focus_id]),
            "logit_intervened": float(intervened[focus_id]),
            "logit_diff": float(intervened[focus_id] - clean[focus_id]),
        }
    table = pd.DataFrame(
        {
            "token_id": ids,
            "token": output_names(model, ids),
            "p_clean": p_clean[ids].tolist(),
            "p_intervened": p_int[ids].tolist(),
            "logit_clean": clean[ids].tolist(),
            "logit_intervened": intervened[ids].tolist(),
        }
    )
    table["delta_p"] = table["p_intervened"] - table["p_clean"]
    table["delta_logit"] = table["logit_intervened"] - table["logit_clean"]
    table = table.sort_values("p_clean", ascending=False, ignore_index=True)
    return NextTokenComparison(clean, intervened, table, focus)


def compare_next_token(
    model: HookedModel,
    tokens: torch.Tensor,
    interventions: Sequence[Intervention],
    top_k: int = 10,
    focus_token: str | None = None,
) -> NextTokenComparison:
    """Next-token distributions clean vs intervened (:func:`compare_outputs` at the last position)."""
    return compare_outputs(model, tokens, interventions, top_k, focus_token, position=-1)


def mask_positions(model: HookedModel, tokens: torch.Tensor) -> list[int]:
    """Positions of the tokenizer's mask token (e.g. ``[MASK]``) in ``tokens`` [1, pos]; [] when it has none."""
    mask = getattr(model.tokenizer, "mask_token_id", None)
    return [] if mask is None else (tokens[0] == mask).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------- embeddings
def pooled_embedding(
    model: HookedModel, tokens: torch.Tensor, interventions: Sequence[Intervention] = ()
) -> torch.Tensor:
    """One vector [d_model] for ``tokens`` (token ids [1, pos] or pixels) under ``interventions``: the final hidden
    state (:func:`final_hook`) pooled as the model declares (``Capabilities.pooling``: mean / max over the
    positions, CLS, last), L2-normalised where it declares ``normalize`` (a sentence-transformers model)."""
    caps = capabilities(model)
    hook = final_hook(model)
    tokens = tokens.to(model.device)
    with torch.no_grad(), apply_interventions(model, interventions, tokens):
        with model.capture([hook], dtype=torch.float32) as cache:
            model(tokens)
    hidden = cache[hook][0].cpu()  # [pos, d_model]
    pooled = {
        "mean": lambda: hidden.mean(0),
        "max": lambda: hidden.max(0).values,
        "cls": lambda: hidden[0],
        "last": lambda: hidden[-1],
    }[caps.pooling]()
    return F.normalize(pooled, dim=0) if caps.normalize else pooled


@dataclass
class EmbeddingComparison:
    """Pooled embeddings [d_model] of the input clean and intervened (and of a second prompt, or None), and
    ``table``: pair, cosine (one row per pair of the vectors present)."""

    clean: torch.Tensor
    intervened: torch.Tensor
    second: torch.Tensor | None
    table: pd.DataFrame

    def cosine(self, pair: str) -> float:
        """The cosine of ``pair`` ("clean · intervened", "clean · second", "intervened · second")."""
        return float(self.table.set_index("pair").loc[pair, "cosine"])


def compare_embeddings(
    model: HookedModel,
    tokens: torch.Tensor,
    interventions: Sequence[Intervention],
    second: str | torch.Tensor | None = None,
) -> EmbeddingComparison:
    """Pooled embeddings (:func:`pooled_embedding`) clean vs intervened, and their cosines to each other and to a
    ``second`` prompt (text, or token ids / pixels), which runs clean."""
    clean = pooled_embedding(model, tokens)
    intervened = pooled_embedding(model, tokens, interventions)
    other = None
    if second is not None:
        other = pooled_embedding(model, encode_prompt(model, second) if isinstance(second, str) else second)
    vectors = {"clean": clean, "intervened": intervened, **({"second": other} if other is not None else {})}
    pairs = [("clean", "intervened"), ("clean", "second"), ("intervened", "second")]
    rows = [
        {
            "pair": f"{a} · {b}",
            "cosine": float(F.cosine_similarity(vectors[a], vectors[b], dim=0)),
            "norm_a": float(vectors[a].norm()),
            "norm_b": float(vectors[b].norm()),
        }
        for a, b in pairs
        if a in vectors and b in vectors
    ]
    return EmbeddingComparison(clean, intervened, other, pd.DataFrame(rows))


def token_id(model: HookedModel, text: str) -> int:
    """The id of ``text`` when it is exactly one token of the model's vocabulary."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise PromptLabError(
            f"{text!r} is {len(ids)} tokens for {model.cfg.name} ({model.to_str_tokens(ids)}); choose one token"
        )
    return int(ids[0])


def generate(
    model: HookedModel,
    tokens: torch.Tensor,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Continue ``tokens`` [1, pos] by ``max_new_tokens`` under the interventions (applied at every step):
    greedy when ``temperature`` is 0, else sampled with a generator seeded by ``seed``. -> new ids [n_new]."""
    device = model.device
    ids = tokens.to(device)
    generator = torch.Generator().manual_seed(seed)
    limit = model.cfg.n_ctx or ids.shape[1] + max_new_tokens
    eos = getattr(model.tokenizer, "eos_token_id", None)
    new: list[int] = []
    with torch.no_grad(), apply_interventions(model, interventions, tokens):
        for _ in range(max_new_tokens):
            if ids.shape[1] >= limit:
                break
            logits = model(ids)[0, -1].float().cpu()
            if temperature > 0:
                choice = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator))
            else:
                choice = int(logits.argmax())
            new.append(choice)
            ids = torch.cat([ids, torch.tensor([[choice]], device=device)], dim=1)
            if choice == eos:
                break
    return torch.tensor(new, dtype=torch.long)


def continuations(
    model: HookedModel,
    tokens: torch.Tensor,
    interventions: Sequence[Intervention],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, str]:
    """Clean and intervened continuations (same seed) as text: {"clean": ..., "intervened": ..., "note": ...}.

    ``note`` says why a continuation is shorter than ``max_new_tokens`` (it stopped at end-of-text, naming the
    step — at step 0 the text is empty because the model's first choice was end-of-text — or at the model's
    context length); it is "" when both ran to ``max_new_tokens``.
    """
    out: dict[str, str] = {}
    notes = []
    eos = getattr(model.tokenizer, "eos_token_id", None)
    for name, stack in (("clean", ()), ("intervened", interventions)):
        new = generate(model, tokens, stack, max_new_tokens, temperature, seed)
        out[name] = str(model.to_string(new)) if len(new) else ""
        if len(new) and eos is not None and int(new[-1]) == eos:
            step = len(new) - 1
            first = " (the model's first choice was end-of-text, so it is empty)" if step == 0 else ""
            notes.append(f"{name} stopped at end-of-text at step {step}{first}")
        elif len(new) < max_new_tokens:
            notes.append(
                f"{name} stopped after {len(new)} tokens at the model's context length ({model.cfg.n_ctx})"
            )
    out["note"] = "; ".join(notes)
    return out


# ---------------------------------------------------------------------------------------------- saving
def session_frame(
    model: HookedModel,
    prompt: str,
    interventions: Sequence[Intervention],
    comparison: NextTokenComparison | None,
    continuation: dict[str, str],
    generation: dict[str, Any],
    readouts: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """One ``prompt_lab_sessions`` row; ``session`` is a hash of the model, prompt and stack, so saving the same
    session again replaces its row. ``prompt`` is the text, or an image's reference (``DATA#INDEX``);
    ``comparison`` the next-token, masked-token or class comparison (None for a model without a head);
    ``outputs`` what else the page compared (e.g. the pooled-embedding cosines), stored as JSON with the
    model's output kind."""
    stack = [iv.to_dict() for iv in interventions]
    ident = json.dumps([model.cfg.name, model.cfg.checkpoint, prompt, stack, generation], sort_keys=True)
    focus = (comparison.focus if comparison is not None else None) or {}
    tokens = model.to_str_tokens(model.tokenizer(prompt)["input_ids"]) if model.tokenizer is not None else []
    return pd.DataFrame(
        [
            {
                "model": model.cfg.name,
                "checkpoint": model.cfg.checkpoint,
                "hook": None,
                "dataset": None,
                "session": hashlib.sha256(ident.encode()).hexdigest()[:16],
                "prompt": prompt,
                "tokens": json.dumps(tokens),
                "interventions": json.dumps(stack),
                "next_token": comparison.table.to_json(orient="records") if comparison is not None else None,
                "focus_token": focus.get("token"),
                "logit_diff": focus.get("logit_diff"),
                "continuation_clean": continuation.get("clean"),
                "continuation_intervened": continuation.get("intervened"),
                "continuation_note": continuation.get("note", ""),
                "generation": json.dumps(generation),
                "readouts": json.dumps(readouts or {}),
                "output": capabilities(model).output,
                "outputs": json.dumps(outputs or {}),
            }
        ]
    )


def save_session(workspace: Any, frame: pd.DataFrame) -> str:
    """Write a :func:`session_frame` row through the one results writer (one transaction) -> the session id."""
    write_tables(workspace, ANALYSIS, {"prompt_lab_sessions": frame})
    return str(frame["session"].iloc[0])


def run(
    model: HookedModel,
    prompt: str,
    *,
    interventions: Sequence[Intervention] = (),
    top_k: int = 8,
    focus_token: str | None = None,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    masked_position: int | None = None,
    second_prompt: str | None = None,
) -> dict[str, pd.DataFrame]:
    """One prompt-lab session of a text model without the dashboard → ``{"prompt_lab_sessions": one row}``, the row
    the Prompt lab page's Save stores for the same prompt, stack and settings (its overlays aside: ``readouts`` is
    empty); ``write_tables(workspace, ANALYSIS, frames)`` stores it.

    What is compared follows the model's declared output (:func:`capabilities`): a causal LM's next token (top
    ``top_k``, the logit difference of ``focus_token``) and its continuations (greedy when ``temperature`` is 0,
    else sampled with ``seed``); a masked LM's tokens at ``masked_position`` (default: the first [MASK]; none in the
    prompt, no comparison); a classifier's classes; and for every text model without a next-token head the pooled
    embedding's cosines (clean, intervened, ``second_prompt``); ``outputs`` holds KL(clean‖intervened) of the
    comparison in nats (``kl``). ``interventions``: the stack, e.g. read back from a
    saved session's ``interventions`` column with ``Intervention.from_dict``."""
    caps = capabilities(model)
    if caps.modality != "text":
        raise AnalysisNotApplicable(
            f"{model.cfg.name} reads images: open its prompt-lab sessions on the dashboard's Prompt lab page "
            "(workbench dashboard), which takes an image of a dataset"
        )
    tokens = encode_prompt(model, prompt)
    comparison: NextTokenComparison | None = None
    continuation: dict[str, str] = {}
    generation: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    if caps.output == "next_token":
        comparison = compare_next_token(model, tokens, interventions, top_k=top_k, focus_token=focus_token)
        mode = "greedy" if temperature == 0 else "sampled"
        generation = {
            "mode": mode,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        continuation = continuations(model, tokens, interventions, max_new_tokens, temperature, seed)
    elif caps.output == "masked_token":
        masked = mask_positions(model, tokens)
        if masked_position is not None and masked_position not in masked:
            raise PromptLabError(
                f"position {masked_position} of the prompt is not a {model.tokenizer.mask_token}; the masked "
                f"positions are {masked or 'none'}"
            )
        if masked:
            at = masked[0] if masked_position is None else masked_position
            comparison = compare_outputs(model, tokens, interventions, top_k=top_k, position=at)
            outputs["masked_position"] = at
    elif caps.output == "class":
        comparison = compare_outputs(model, tokens, interventions, top_k=top_k)
    if comparison is not None:
        outputs["kl"] = comparison.kl
    if caps.output != "next_token":
        embeddings = compare_embeddings(model, tokens, interventions, second_prompt or None)
        outputs["embedding"] = json.loads(embeddings.table.to_json(orient="records"))
    frame = session_frame(model, prompt, interventions, comparison, continuation, generation, outputs=outputs)
    return {"prompt_lab_sessions": frame}


def saved_models(workspace: Any) -> list[str]:
    """Names of the models trained into ``workspace/models`` (the page's suggestions)."""
    root = Workspace(workspace).models_dir
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
