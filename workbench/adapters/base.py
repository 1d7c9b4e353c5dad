"""The adapter protocol, and the machinery shared by the Hugging Face adapters (module sites feeding hook points).

An :class:`Adapter` is everything :class:`~workbench.model.HookedModel` needs to know about a model family, so
neither the model nor an analysis branches on a family name: its ModelSpec, its :class:`Capabilities`, installing
torch hooks for the active hook points, running a forward pass, tokenizing, preparing non-text inputs, the
embedding, unembedding and per-head output weights, a freshly initialised copy, and switching the attention path. A Hugging Face adapter describes which module input or output carries each TransformerLens-named
activation (a :class:`Site`); torch hooks are installed only for sites whose hook points are active, so a forward
pass with nothing captured runs the model untouched.
"""

from __future__ import annotations

import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from workbench.hooks import HookPoint
from workbench.spec import ModelSpec

Split = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
Merge = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass
class Site:
    """A module input ("input": first argument) or output ("output": the tensor or the tuple's first item)
    that carries the activations of ``names``.

    ``split`` maps the module's tensor to one TransformerLens-shaped tensor per name; ``merge`` is its inverse,
    used when a hook replaces an activation. Both default to the identity for a single name.
    """

    module: nn.Module
    when: str
    names: tuple[str, ...]
    split: Split | None = None
    merge: Merge | None = None


@dataclass
class ResidMidSite:
    """``hook_resid_mid`` of a sequential pre-LN block: resid_pre (the block input) + attention output.

    Hooked on the attention module's output so that a replacement flows into both the residual stream and the
    next LayerNorm: the attention output becomes ``new_resid_mid − resid_pre``.
    """

    block: nn.Module
    attention: nn.Module
    name: str


@dataclass
class AttentionSite:
    """Hook points fed from inside the attention function of one layer (pattern and statistics)."""

    module: nn.Module
    layer: int
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class NormSite:
    """A LayerNorm or RMSNorm module feeding ``{prefix}.hook_scale`` [batch, pos, 1] (σ = sqrt(var x + ε), or
    rms = sqrt(mean x² + ε)) and ``{prefix}.hook_normalized`` [batch, pos, d_model] (the module's output, γ and β
    applied). A replaced scale recomputes the output as γ ⊙ (x − mean x) / scale + β (LayerNorm) or γ ⊙ x / scale
    (RMSNorm), the way TransformerLens's own norms use theirs (what attribution freezes)."""

    module: nn.Module
    prefix: str
    kind: str
    eps: float

    @property
    def names(self) -> tuple[str, str]:
        return (f"{self.prefix}.hook_scale", f"{self.prefix}.hook_normalized")


@dataclass
class ResultSite:
    """Per-head writes ``blocks.{l}.attn.hook_result`` [batch, pos, head, d_model] of the attention output projection
    ``module`` (z [batch, pos, heads·d_head] in): head h's write is z_h @ W_O[h], without the output bias. A replaced
    result sets the projection's output to Σ_h result_h + bias."""

    module: nn.Module
    name: str
    n_heads: int


AnySite = Site | ResidMidSite | AttentionSite | NormSite | ResultSite


def heads_view(n_heads: int) -> tuple[Split, Merge]:
    """[batch, pos, heads·d_head] <-> [batch, pos, heads, d_head]."""

    def split(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x.unflatten(-1, (n_heads, -1)),)

    def merge(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return parts[0].flatten(-2)

    return split, merge


def concat_qkv(n_heads: int, n_kv_heads: int, d_head: int) -> tuple[Split, Merge]:
    """Fused projection laid out [q (heads·d) | k (kv·d) | v (kv·d)] (GPT-2 ``c_attn``) <-> q, k, v heads."""
    sizes = (n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head)

    def split(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = x.split(sizes, dim=-1)
        return (
            q.unflatten(-1, (n_heads, d_head)),
            k.unflatten(-1, (n_kv_heads, d_head)),
            v.unflatten(-1, (n_kv_heads, d_head)),
        )

    def merge(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([p.flatten(-2) for p in parts], dim=-1)

    return split, merge


def interleaved_qkv(n_heads: int, d_head: int) -> tuple[Split, Merge]:
    """Fused projection laid out per head as [q | k | v] (GPT-NeoX ``query_key_value``) <-> q, k, v heads."""

    def split(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.unflatten(-1, (n_heads, 3 * d_head)).split(d_head, dim=-1)

    def merge(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat(parts, dim=-1).flatten(-2)

    return split, merge


@dataclass(frozen=True)
class Capabilities:
    """What a wrapped model has, as its adapter declares it: ask this, never a family name.

    ``modality``: "text" (token ids [batch, pos]) or "image" (pixels [batch, channels, height, width]).
    ``output``: what the model's forward returns — "next_token" logits [batch, pos, d_vocab] (a causal LM head),
    "masked_token" logits [batch, pos, d_vocab] (a masked-LM head), "class" logits [batch, n_classes], or "hidden"
    (the last hidden state [batch, pos, d_model]: no head).
    ``pooling``: how one vector per input is read from the final hidden state — "mean" over the positions, "max",
    "cls" (position 0) or "last" (the last position); ``normalize``: that vector is L2-normalised.
    ``image_shape``: (channels, height, width) an image model takes; ``patch_grid``: (rows, columns) of its
    patches, patch (r, c) at position 1 + r·columns + c (position 0 is CLS). ``class_names``: one per class.
    ``positional``: how positions enter — "rotary" (rotated queries and keys), "learned" (a learned absolute
    embedding added to the token or patch embedding), "none", or another scheme's name (TransformerLens's
    "alibi"...). ``norm``: "layernorm" or "rmsnorm" (every norm of the blocks; "none" without). ``final_norm``: the
    hook prefix of the norm between the last block and the head ("ln_final": ``ln_final.hook_scale`` [batch, pos,
    1], ``ln_final.hook_normalized`` [batch, pos, d_model]), None without one (post-LN encoders).
    ``module_names``: the family's Hugging Face module-name table (:mod:`workbench.adapters.module_names`, for
    trainers that name sites by module: sparsify), None without one.
    ``activations``: hook prefixes P of the elementwise activations, ``P.hook_post`` = f(``P.hook_pre``) unit by
    unit [batch, pos, width] — each non-gated MLP's ``blocks.{l}.mlp``, an MLM head's ``mlm_head`` (what
    attribution freezes at its prompt gain).
    ``prefix_cache``: the forward takes ``cache=`` (:meth:`~workbench.model.HookedModel.kv_cache`, the keys and
    values of the positions before) with ``use_cache``, so a causal LM can run one token after a cached prefix.
    """

    modality: str = "text"
    output: str = "hidden"
    pooling: str = "mean"
    normalize: bool = False
    image_shape: tuple[int, int, int] | None = None
    patch_grid: tuple[int, int] | None = None
    class_names: tuple[str, ...] = ()
    positional: str = "learned"
    norm: str = "layernorm"
    final_norm: str | None = None
    module_names: str | None = None
    activations: tuple[str, ...] = ()
    prefix_cache: bool = False

    @property
    def final_hook(self) -> str | None:
        """The final norm's output ``{final_norm}.hook_normalized`` [batch, pos, d_model] (None without one)."""
        return None if self.final_norm is None else f"{self.final_norm}.hook_normalized"


class Adapter(Protocol):
    """What a HookedModel asks of its model family (``owner`` is the HookedModel)."""

    family: str

    def install(self, owner: Any, active: tuple[str, ...]) -> list[Any]:
        """Register backend hooks feeding the ``active`` hook points; returns handles with ``.remove()``."""
        ...

    def forward(self, owner: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """Run the wrapped model on a prepared batch; logits (or the last hidden state for headless encoders)."""
        ...

    def tokenize(self, owner: Any, texts: list[str], context_length: int | None) -> dict[str, torch.Tensor]:
        """Texts -> {"input_ids", "attention_mask"} [batch, pos] with the family's tokenizer conventions."""
        ...

    def prepare_inputs(self, owner: Any, inputs: Any) -> dict[str, torch.Tensor] | None:
        """Inputs that are not text or token ids (ViT pixels) -> the model's keyword arguments; None: not mine."""
        ...

    def embedding_matrix(self, owner: Any) -> torch.Tensor:
        """Token embedding W_E [d_vocab, d_model]."""
        ...

    def head_output_weights(self, owner: Any, layer: int) -> torch.Tensor:
        """Per-head output projection W_O [n_heads, d_head, d_model] of ``layer``."""
        ...

    def set_attention_path(self, owner: Any, path: str) -> None:
        """Make the model compute attention on ``path`` ("sdpa", "eager" or "kernel")."""
        ...

    def capabilities(self, owner: Any) -> Capabilities:
        """What the model has (modality, output head, pooling, positions, norms): :class:`Capabilities`."""
        ...

    def unembedding(self, owner: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The LM head (causal or masked) that reads the final hidden state at every position: W_U [d_vocab, d_model]
        and its bias [d_vocab] (None when it has none); None without one (a headless encoder, a classifier)."""
        ...

    def fresh_copy(self, owner: Any) -> Any:
        """A HookedModel of the same architecture with freshly initialised weights (drawn from torch's RNG)."""
        ...

    def kv_cache(self, owner: Any, kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
        """A key/value cache the forward takes as ``cache=`` (where ``Capabilities.prefix_cache``): empty, or
        holding ``kv`` (per layer (keys, values) [batch, kv_heads, pos, d_head])."""
        ...

    def cached_keys_values(self, owner: Any, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The per-layer (keys, values) [batch, kv_heads, pos, d_head] a forward with ``use_cache`` left in
        ``cache``."""
        ...


class HFAdapter(ABC):
    """Base for one Hugging Face model family: subclasses give ``spec`` and ``sites``; the rest of the
    :class:`Adapter` protocol is shared here."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    base_attr: str = ""
    positional: str = "learned"  # Capabilities.positional
    norm: str = "layernorm"  # Capabilities.norm: the kind of every norm module the family file names
    module_names: str | None = None  # Capabilities.module_names
    gated_mlp: bool = (
        False  # an MLP's hook_post is act(hook_pre) · (up projection): no Capabilities.activations
    )
    head_activation: str | None = None  # Capabilities.activations: the output head's, when the model has one
    prefix_cache: bool = (
        True  # Capabilities.prefix_cache (of a causal model): the forward takes a DynamicCache
    )

    def spec(self, config: Any) -> ModelSpec:
        """Shape facts from a transformers config (families override what their config names differently)."""
        return self.standard_spec(config)

    def standard_spec(self, config: Any, **overrides: Any) -> ModelSpec:
        """ModelSpec from the standard transformers config attributes, with per-family ``overrides``."""
        n_heads = config.num_attention_heads
        fields: dict[str, Any] = {
            "family": self.family,
            "n_layers": config.num_hidden_layers,
            "d_model": config.hidden_size,
            "n_heads": n_heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
            "d_head": getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            "d_mlp": getattr(config, "intermediate_size", None),
            "d_vocab": getattr(config, "vocab_size", 0),
            "n_ctx": getattr(config, "max_position_embeddings", 0),
            "causal": True,
        }
        fields.update(overrides)
        return ModelSpec(**fields)

    @abstractmethod
    def sites(self, model: nn.Module, spec: ModelSpec) -> list[AnySite]:
        """The family's module sites in forward order (every family file defines this)."""

    def base(self, model: nn.Module) -> Any:
        """The headless model inside a task model (e.g. ``GPT2LMHeadModel.transformer``), or the model itself.

        Typed ``Any``: each family file walks it by that family's submodule names (``base.layers``,
        ``block.attention``...), which torch's stubs would type as ``Tensor | Module`` (``nn.Module.__getattr__``).
        """
        return getattr(model, self.base_attr, model)

    def install(self, owner: Any, active: tuple[str, ...]) -> list[Any]:
        wanted = set(active)
        handles: list[Any] = []
        for site in owner.sites:
            if wanted & set(site_names([site])):
                handles += install_site(site, owner.hook_points)
        return handles

    def forward(self, owner: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        output = owner.model(**batch, **kwargs)
        for field_name in ("logits", "last_hidden_state"):
            value = getattr(output, field_name, None)
            if value is not None:
                return value
        return output[0]

    def tokenize(self, owner: Any, texts: list[str], context_length: int | None) -> dict[str, torch.Tensor]:
        tokenizer = owner.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        encoded = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=context_length or owner.cfg.n_ctx,
        )
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def prepare_inputs(self, owner: Any, inputs: Any) -> dict[str, torch.Tensor] | None:
        return None

    def embedding_matrix(self, owner: Any) -> torch.Tensor:
        return owner.model.get_input_embeddings().weight

    def head_output_weights(self, owner: Any, layer: int) -> torch.Tensor:
        name = f"blocks.{layer}.attn.hook_z"
        module = next(s.module for s in owner.sites if isinstance(s, Site) and s.names == (name,))
        return output_weights(module, owner.cfg.n_heads, owner.cfg.d_head)

    def unembedding(self, owner: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        head = owner.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return None
        bias = getattr(head, "bias", None)
        return weight, bias if isinstance(bias, torch.Tensor) else None

    def fresh_copy(self, owner: Any) -> Any:
        fresh = type(owner.model)(owner.model.config)
        return type(owner).from_hf(fresh, owner.tokenizer, name=owner.cfg.name)

    def norm_site(self, module: nn.Module, prefix: str) -> NormSite:
        """The :class:`NormSite` of one of the family's norm modules (of kind ``norm``; ε as the module keeps it)."""
        eps = next(getattr(module, a) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(module, a))
        return NormSite(module, prefix, self.norm, float(eps))

    def set_attention_path(self, owner: Any, path: str) -> None:
        """Nothing to patch: the registered "workbench" attention function reads ``owner.attention_path``."""
        return None

    def capabilities(self, owner: Any) -> Capabilities:
        """Text in; a token head (``get_output_embeddings``) gives next-token logits when causal, masked-token
        logits otherwise; pooling: what the directory's sentence-transformers config says, else the last
        position (causal) or the mean."""
        head = owner.model.get_output_embeddings()
        causal = bool(owner.cfg.causal)
        output = "hidden" if head is None else "next_token" if causal else "masked_token"
        directory = getattr(owner.model.config, "_name_or_path", "") or ""
        declared = sentence_transformers_pooling(directory) if directory else None
        pooling, normalize = declared or ("last" if causal else "mean", False)
        final = "ln_final" if "ln_final.hook_normalized" in owner.hook_points else None
        mlps = () if self.gated_mlp else tuple(f"blocks.{layer}.mlp" for layer in range(owner.cfg.n_layers))
        activations = tuple(
            prefix
            for prefix in (*mlps, self.head_activation)
            if prefix is not None
            and {f"{prefix}.hook_pre", f"{prefix}.hook_post"} <= owner.hook_points.keys()
        )
        return Capabilities(
            output=output,
            pooling=pooling,
            normalize=normalize,
            positional=self.positional,
            norm=self.norm,
            final_norm=final,
            module_names=self.module_names,
            activations=activations,
            prefix_cache=self.prefix_cache and causal,
        )

    def kv_cache(self, owner: Any, kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
        """A transformers ``DynamicCache``, empty or holding ``kv``."""
        # deferred: transformers takes seconds to import; only a prefix-cached forward needs it
        from transformers.cache_utils import DynamicCache

        return DynamicCache() if kv is None else DynamicCache(ddp_cache_data=kv)

    def cached_keys_values(self, owner: Any, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def attention_site(attention: nn.Module, layer: int) -> AttentionSite:
        prefix = f"blocks.{layer}.attn."
        stats = ("attn_scores", "pattern", "entropy", "sink", "lse", "max_logit")
        return AttentionSite(attention, layer, {s: f"{prefix}hook_{s}" for s in stats})


SENTENCE_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


def sentence_transformers_pooling(directory: str | Path) -> tuple[str, bool] | None:
    """(pooling, normalize) from a sentence-transformers model directory (``modules.json`` naming its Pooling and
    Normalize modules, the Pooling module's ``config.json``); None when the directory has no ``modules.json``."""
    modules_file = Path(directory) / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling") and (Path(directory) / module["path"] / "config.json").is_file():
            config = json.loads((Path(directory) / module["path"] / "config.json").read_text())
            pooling = next((mode for key, mode in SENTENCE_POOLING.items() if config.get(key)), pooling)
    return pooling, normalize


def output_weights(module: nn.Module, n_heads: int, d_head: int) -> torch.Tensor:
    """Per-head W_O [n_heads, d_head, d_model] of an output projection (``nn.Linear``, GPT-2's ``Conv1D``: any
    affine map of z [..., n_heads·d_head]), read off the module: its outputs at the unit vectors minus at zero."""
    d_in = n_heads * d_head
    probe = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).to(
        next(module.parameters())
    )  # [1 + d_in, d_in]
    with torch.no_grad():
        out = module.forward(probe)  # forward, not __call__: no hooks (this runs inside the hook_result one)
    return (out[1:] - out[0]).reshape(n_heads, d_head, -1)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args: tuple, kwargs: dict, tensor: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (tensor, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": tensor}


def _run_points(
    points: list[HookPoint], tensors: tuple[torch.Tensor, ...]
) -> tuple[tuple[torch.Tensor, ...], bool]:
    out, changed = [], False
    for point, tensor in zip(points, tensors, strict=True):
        new = point(tensor) if point.active else tensor
        changed |= new is not tensor
        out.append(new)
    return tuple(out), changed


def install_site(site: AnySite, points: dict[str, HookPoint]) -> list[Any]:
    """Register the torch hooks that feed ``site``'s active hook points; returns the handles."""
    if isinstance(site, AttentionSite):
        return []
    if isinstance(site, ResidMidSite):
        return _install_resid_mid(site, points[site.name])
    if isinstance(site, NormSite):
        return _install_norm(site, points[site.names[0]], points[site.names[1]])
    if isinstance(site, ResultSite):
        return _install_result(site, points[site.name])
    site_points = [points[n] for n in site.names]
    split = site.split or (lambda x: (x,))
    merge = site.merge or (lambda parts: parts[0])
    if site.when == "output":

        def on_output(module: nn.Module, args: tuple, output: Any) -> Any:
            new, changed = _run_points(site_points, split(_first(output)))
            return _replace_first(output, merge(new)) if changed else None

        return [site.module.register_forward_hook(on_output)]

    def on_input(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        new, changed = _run_points(site_points, split(_input_tensor(args, kwargs)))
        return _with_input(args, kwargs, merge(new)) if changed else None

    return [site.module.register_forward_pre_hook(on_input, with_kwargs=True)]


def _install_resid_mid(site: ResidMidSite, point: HookPoint) -> list[Any]:
    stash: dict[str, torch.Tensor] = {}

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stash["resid_pre"] = _input_tensor(args, kwargs)

    def on_attention(module: nn.Module, args: tuple, output: Any) -> Any:
        resid_pre = stash.pop("resid_pre")
        attn_out = _first(output)
        mid = resid_pre + attn_out
        new = point(mid)
        return _replace_first(output, new - resid_pre) if new is not mid else None

    return [
        site.block.register_forward_pre_hook(remember, with_kwargs=True),
        site.attention.register_forward_hook(on_attention),
    ]


def _install_norm(site: NormSite, scale_point: HookPoint, normalized_point: HookPoint) -> list[Any]:
    def on_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out = _first(output)
        changed = False
        if scale_point.active:
            x = _input_tensor(args, kwargs)
            work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            centred = work - work.mean(-1, keepdim=True) if site.kind == "layernorm" else work
            scale = (centred.pow(2).mean(-1, keepdim=True) + site.eps).sqrt()  # [batch, pos, 1]
            before = scale.clone()  # a hook may edit the derived scale in place
            new_scale = scale_point(scale)
            if new_scale is not scale or not torch.equal(scale, before):
                y = centred / new_scale.to(work.dtype)
                weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
                y = y if weight is None else y * weight.to(y.dtype)
                out, changed = (y if bias is None else y + bias.to(y.dtype)).to(out.dtype), True
        if normalized_point.active:
            new = normalized_point(out)
            out, changed = new, changed or new is not out
        return _replace_first(output, out) if changed else None

    return [site.module.register_forward_hook(on_output, with_kwargs=True)]


def _install_result(site: ResultSite, point: HookPoint) -> list[Any]:
    def on_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        z = _input_tensor(args, kwargs).unflatten(-1, (site.n_heads, -1))  # [batch, pos, head, d_head]
        w_o = output_weights(module, site.n_heads, z.shape[-1]).to(z.dtype)  # [head, d_head, d_model]
        result = torch.einsum("bphd,hdm->bphm", z, w_o)
        before = result.sum(-2)  # [batch, pos, d_model]; a hook may edit the derived result in place
        after = point(result).sum(-2)
        if torch.equal(after, before):
            return None
        out = _first(output)
        return _replace_first(output, out + (after - before).to(out.dtype))

    return [site.module.register_forward_hook(on_output, with_kwargs=True)]


# Attention modules -> (weak reference to the owning HookedModel, AttentionSite), read by the attention function.
ATTENTION_OWNERS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, AttentionSite]] = (
    weakref.WeakKeyDictionary()
)


def block_sites(
    layer: int,
    block: nn.Module,
    *,
    attention: nn.Module,
    qkv: list[Site],
    out_proj: nn.Module,
    n_heads: int,
    mlp_pre: nn.Module,
    mlp_post: Site,
    mlp_out: nn.Module,
    resid_mid: AnySite | None,
    ln1: NormSite,
    ln2: NormSite,
    attn_out: nn.Module | None = None,
    post_ln: bool = False,
) -> list[AnySite]:
    """The standard sites of one transformer block, in the order their torch hooks must run. ``ln1`` / ``ln2``:
    the norms before attention and before the MLP (pre-LN), or after each sub-block's residual sum (``post_ln``:
    BERT, as TransformerLens's BERT blocks name them)."""
    prefix = f"blocks.{layer}."
    split, merge = heads_view(n_heads)
    sites: list[AnySite] = [
        Site(block, "input", (prefix + "hook_resid_pre",)),
        *([] if post_ln else [ln1]),
        *qkv,
        Site(out_proj, "input", (prefix + "attn.hook_z",), split, merge),
        HFAdapter.attention_site(attention, layer),
        ResultSite(out_proj, prefix + "attn.hook_result", n_heads),
        Site(attn_out or attention, "output", (prefix + "hook_attn_out",)),
        *([ln1] if post_ln else []),
    ]
    if resid_mid is not None:
        sites.append(resid_mid)
    sites += [
        *([] if post_ln else [ln2]),
        Site(mlp_pre, "output", (prefix + "mlp.hook_pre",)),
        mlp_post,
        Site(mlp_out, "output", (prefix + "hook_mlp_out",)),
        *([ln2] if post_ln else []),
        Site(block, "output", (prefix + "hook_resid_post",)),
    ]
    return sites


def site_names(sites: Sequence[AnySite]) -> list[str]:
    """Every hook name the sites feed, in forward order."""
    names: list[str] = []
    for site in sites:
        if isinstance(site, ResidMidSite):
            names.append(site.name)
        elif isinstance(site, AttentionSite):
            names += list(site.names.values())
        elif isinstance(site, ResultSite):
            names.append(site.name)
        else:
            names += list(site.names)
    return names
