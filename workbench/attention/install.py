"""Route a HookedModel's attention through the fused kernel, so statistics hooks cost O(N) memory.

    install_attention(model)        # HF families: the "workbench" attention function takes the kernel path;
                                    # TransformerLens: each attention block's forward is replaced
    with model.capture("blocks.*.attn.hook_entropy") as cache: model(tokens)
    uninstall_attention(model)      # back to the original attention (hook_pattern available again)

On the kernel path ``hook_pattern`` does not exist (the pattern is never built); asking for it raises an error
that says to uninstall. Logits match the original model's to within the dtype's tolerance.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from workbench.adapters.tl import TLModel
    from workbench.model import HookedModel

STATS = ("entropy", "sink", "lse", "max_logit")


def install_attention(model: HookedModel, sink_k: int = 1) -> HookedModel:
    """Compute ``model``'s attention with the Triton kernel (or its logged fallback); returns the model."""
    if sink_k < 0:
        raise ValueError(f"sink_k must be >= 0, got {sink_k}")
    model.sink_k = sink_k
    model.set_attention_path("kernel")
    return model


def uninstall_attention(model: HookedModel) -> HookedModel:
    """Restore the model's own attention computation."""
    model.set_attention_path("sdpa")
    return model


def unpatch_transformer_lens(model: HookedModel) -> None:
    """Give every TransformerLens attention block its own forward back."""
    tl_model: Any = model.model
    for block in tl_model.blocks:
        block.attn.__dict__.pop("forward", None)


def patch_transformer_lens(model: HookedModel) -> None:
    """Replace each TransformerLens attention block's forward with the fused kernel (unsupported features refused)."""
    tl_model: TLModel = model.model
    cfg = tl_model.cfg
    unsupported = {
        "alibi positions": cfg.positional_embedding_type == "alibi",
        "attention result per head (use_attn_result)": cfg.use_attn_result,
        "split q/k/v inputs (use_split_qkv_input)": getattr(cfg, "use_split_qkv_input", False),
        "attention sinks": getattr(cfg, "use_attention_sinks", False),
        "local attention windows": cfg.attn_types is not None and "local" in cfg.attn_types,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(
            f"the fused kernel does not support {', '.join(found)} in this TransformerLens model; keep its own "
            "attention (statistics still come from hook_attn_scores on that path)"
        )
    for layer, block in enumerate(tl_model.blocks):
        block.attn.forward = types.MethodType(_kernel_forward_for(model, layer), block.attn)


def _kernel_forward_for(owner: HookedModel, layer: int):
    prefix = f"blocks.{layer}.attn."

    def forward(
        attn: Any,
        query_input,
        key_input,
        value_input,
        past_kv_cache_entry=None,
        additive_attention_mask=None,
        attention_mask=None,
        position_bias=None,
    ):
        # deferred: Triton loads only on the kernel path
        from workbench.attention.kernel import flash_attention

        if (
            past_kv_cache_entry is not None
            or additive_attention_mask is not None
            or position_bias is not None
        ):
            raise ValueError(
                "the fused-kernel attention runs full forward passes only (no KV cache, additive masks or position "
                "bias); call workbench.attention.uninstall_attention(model) before generating"
            )
        if attn.hook_pattern._forward_hooks or attn.hook_attn_scores._forward_hooks:
            raise ValueError(
                f"{prefix}hook_pattern needs the materialised pattern, which the fused kernel never builds; call "
                "workbench.attention.uninstall_attention(model) to capture it"
            )
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
        if attn.cfg.positional_embedding_type == "rotary":
            q = attn.hook_rot_q(attn.apply_rotary(q, 0, attention_mask))
            k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
        points = [owner.hook_points[prefix + f"hook_{s}"] for s in STATS]
        want_stats = any(p.active for p in points)
        scale = 1.0 / attn.attn_scale
        out, stats = flash_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            scale=scale,
            causal=attn.cfg.attention_dir == "causal",
            key_padding_mask=attention_mask.bool() if attention_mask is not None else None,
            return_stats=want_stats,
            sink_k=owner.sink_k,
        )
        if want_stats:
            assert stats is not None  # flash_attention(return_stats=True) always returns them
            for point, name in zip(points, STATS, strict=True):
                if point.active:
                    point(stats[name].to(q.dtype))
        z = attn.hook_z(out.transpose(1, 2).to(v.dtype))
        w_o = attn.W_O.flatten(0, 1) if attn.W_O.ndim == 3 else attn.W_O
        return z.flatten(-2) @ w_o + attn.b_O

    return forward


def installed(model: HookedModel) -> bool:
    """Whether ``model`` computes attention with the fused kernel."""
    return model.attention_path == "kernel"


def kernel_statistics(
    model: HookedModel, inputs: Any, layers: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Statistics of every (or the given) layer from one forward pass on the kernel path.

    Returns ``{"blocks.{l}.attn.hook_<stat>": [batch, head, query]}``; the model's path is restored afterwards.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    names = [f"blocks.{layer}.attn.hook_{s}" for layer in layers for s in STATS]
    previous = model.attention_path
    if previous != "kernel":
        install_attention(model, model.sink_k)
    try:
        with torch.no_grad(), model.capture(names) as cache:
            model(inputs)
    finally:
        if previous != "kernel":
            uninstall_attention(model)
    return dict(cache)
