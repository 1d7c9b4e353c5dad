"""TransformerLens HookedTransformer: hook names pass through; attention statistics are added per layer.

On TransformerLens's own attention the statistics hooks (``blocks.{l}.attn.hook_entropy|sink|lse|max_logit``)
are computed from ``hook_attn_scores`` (already masked); after ``install_attention`` they come from the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import nn

from workbench.adapters.base import Capabilities
from workbench.attention.install import patch_transformer_lens, unpatch_transformer_lens
from workbench.attention.reference import stats_from_scores
from workbench.hooks import HookPoint
from workbench.spec import ModelSpec

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint as TLHookPoint

STATS = ("entropy", "sink", "lse", "max_logit")
POSITIONAL = {
    "standard": "learned",
    "shortformer": "learned",
}  # TransformerLens name -> Capabilities.positional
NORMS = {"LN": "layernorm", "LNPre": "layernorm", "RMS": "rmsnorm", "RMSPre": "rmsnorm"}

# A TransformerLens ``HookedTransformer`` or ``TransformerBridge`` (not imported: ``import workbench`` stays
# light, and both are accepted). Their attributes (cfg, hook_dict, to_tokens, blocks) are not visible
# through ``nn.Module``, whose ``__getattr__`` torch's stubs type as ``Tensor | Module``.
TLModel: TypeAlias = Any


class TransformerLensAdapter:
    family = "transformer_lens"

    def spec(self, model: TLModel):
        cfg = model.cfg
        return ModelSpec(
            family=self.family,
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
            d_head=cfg.d_head,
            d_mlp=0 if getattr(cfg, "attn_only", False) else cfg.d_mlp or 0,  # attn_only keeps a d_mlp
            d_vocab=cfg.d_vocab,
            n_ctx=cfg.n_ctx,
            causal=cfg.attention_dir == "causal",
            parallel_residual=bool(getattr(cfg, "parallel_attn_mlp", False)),
        )

    def hook_names(self, model: TLModel) -> list[str]:
        names = list(model.hook_dict)
        out: list[str] = []
        for name in names:
            out.append(name)
            if name.endswith("attn.hook_pattern"):
                prefix = name[: -len("hook_pattern")]
                out += [f"{prefix}hook_{s}" for s in STATS]
        return out

    def install(self, owner: Any, active: tuple[str, ...]) -> list[Any]:
        """Attach one TransformerLens hook per active point of ``owner`` (a HookedModel); statistics are
        computed from ``hook_attn_scores``."""
        model, points = owner.model, owner.hook_points
        handles: list[Any] = []
        stat_layers: dict[str, list[str]] = {}
        for name in active:
            head, _, tail = name.rpartition(".hook_")
            if tail in STATS and name not in model.hook_dict:
                if owner.attention_path != "kernel":  # on the kernel path the patched forward feeds them
                    stat_layers.setdefault(head, []).append(name)
                continue
            handles.append(_attach(model.hook_dict[name], _forward_to(points[name])))
        for prefix, names in stat_layers.items():
            scores_point = model.hook_dict[f"{prefix}.hook_attn_scores"]
            handles.append(_attach(scores_point, _stats_from_scores_hook([points[n] for n in names], owner)))
        return handles

    def forward(self, owner: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return owner.model(batch["input_ids"], attention_mask=batch.get("attention_mask"), **kwargs)

    def tokenize(self, owner: Any, texts: list[str], context_length: int | None) -> dict[str, torch.Tensor]:
        # optional: transformer_lens (slow import; TL models only)
        from transformer_lens.utils import get_attention_mask

        model: TLModel = owner.model
        tokens = model.to_tokens(texts, padding_side="right")
        if context_length is not None:
            tokens = tokens[:, :context_length]
        mask = get_attention_mask(model.tokenizer, tokens, model.cfg.default_prepend_bos)
        return {"input_ids": tokens, "attention_mask": mask}

    def prepare_inputs(self, owner: Any, inputs: Any) -> dict[str, torch.Tensor] | None:
        return None

    def embedding_matrix(self, owner: Any) -> torch.Tensor:
        model: TLModel = owner.model
        return model.W_E

    def head_output_weights(self, owner: Any, layer: int) -> torch.Tensor:
        model: TLModel = owner.model
        return model.blocks[layer].attn.W_O

    def capabilities(self, owner: Any) -> Capabilities:
        """Token ids in, token logits out (next-token when the attention is causal), pooled at the last token;
        positions and norms as the TransformerLens config names them."""
        cfg, causal = owner.model.cfg, bool(owner.cfg.causal)
        positional = getattr(cfg, "positional_embedding_type", "standard")
        elementwise = not getattr(cfg, "gated_mlp", False) and not str(getattr(cfg, "act_fn", "")).endswith(
            "_ln"
        )
        mlps = [f"blocks.{layer}.mlp" for layer in range(owner.cfg.n_layers)] if elementwise else []
        return Capabilities(
            output="next_token" if causal else "masked_token",
            pooling="last" if causal else "mean",
            positional=POSITIONAL.get(positional, positional),
            norm=NORMS.get(getattr(cfg, "normalization_type", None) or "", "none"),
            final_norm="ln_final" if "ln_final.hook_normalized" in owner.model.hook_dict else None,
            activations=tuple(
                p for p in mlps if {f"{p}.hook_pre", f"{p}.hook_post"} <= owner.model.hook_dict.keys()
            ),
        )

    def kv_cache(self, owner: Any, kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
        raise ValueError(
            f"{owner.cfg.name} is a TransformerLens model: its forward takes no key/value cache here"
        )

    def cached_keys_values(self, owner: Any, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.kv_cache(owner, None)

    def unembedding(self, owner: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """W_U [d_vocab, d_model] (TransformerLens keeps it [d_model, d_vocab]) and b_U [d_vocab], with the final
        norm's weight w and bias b folded in: TransformerLens fires ``ln_final.hook_normalized`` before applying
        them, so ``logits = hook_normalized @ (w[:, None] * W_U) + (b_U + b @ W_U)`` is what reads that hook (the
        fold TransformerLens's own ``fold_ln`` makes; nothing to fold when the model was loaded folded)."""
        model: TLModel = owner.model
        w_u = getattr(model, "W_U", None)
        if w_u is None:
            return None
        b_u = getattr(model, "b_U", None)
        final = getattr(model, "ln_final", None)
        weight, bias = getattr(final, "w", None), getattr(final, "b", None)
        if isinstance(bias, torch.Tensor):
            b_u = bias @ w_u if b_u is None else b_u + bias @ w_u
        if isinstance(weight, torch.Tensor):
            w_u = weight[:, None] * w_u
        return w_u.T, b_u

    def fresh_copy(self, owner: Any) -> Any:
        # transformer_lens is optional and slow to import: only a random-init baseline of a TL model needs it
        from transformer_lens import HookedTransformer

        return type(owner).from_transformer_lens(HookedTransformer(owner.model.cfg), name=owner.cfg.name)

    def set_attention_path(self, owner: Any, path: str) -> None:
        """The kernel path replaces each attention block's forward (workbench.attention.install); other paths
        restore TransformerLens's own."""
        if path == "kernel":
            patch_transformer_lens(owner)
        else:
            unpatch_transformer_lens(owner)


class _Handle:
    def __init__(self, tl_point: TLHookPoint, torch_handle: Any) -> None:
        self.tl_point, self.torch_handle = tl_point, torch_handle

    def remove(self) -> None:
        self.torch_handle.remove()
        self.tl_point.fwd_hooks = [
            h for h in self.tl_point.fwd_hooks if getattr(h, "hook", h) is not self.torch_handle
        ]


def _attach(tl_point: TLHookPoint, fn: Any) -> _Handle:
    def full_hook(module: nn.Module, module_input: Any, module_output: torch.Tensor) -> torch.Tensor | None:
        return fn(module_output)

    return _Handle(tl_point, tl_point.register_forward_hook(full_hook))


def _forward_to(point: HookPoint):
    def run(activation: torch.Tensor) -> torch.Tensor | None:
        new = point(activation)
        return new if new is not activation else None

    return run


def _stats_from_scores_hook(stat_points: list[HookPoint], owner: Any):
    def run(scores: torch.Tensor) -> None:
        stats = stats_from_scores(scores, sink_k=owner.sink_k)
        for point in stat_points:
            point(stats[point.name.rpartition(".hook_")[2]])
        return None

    return run
