"""Llama-family modules (Llama, and models sharing its layout) -> TransformerLens hook names.

The MLP is gated: ``mlp.hook_pre`` is the gate projection before the activation, ``mlp.hook_post`` the input
of ``down_proj`` (act(gate) · up), as in TransformerLens.
"""

from __future__ import annotations

from torch import nn

from workbench.adapters.base import AnySite, HFAdapter, ResidMidSite, Site, block_sites, heads_view
from workbench.adapters.registry import register


@register
class LlamaAdapter(HFAdapter):
    family = "llama"
    base_attr = "model"
    model_types = ("llama", "mistral", "qwen2")
    positional = "rotary"
    norm = "rmsnorm"
    module_names = "llama"
    gated_mlp = True

    def sites(self, model: nn.Module, spec) -> list[AnySite]:
        base = self.base(model)
        sites: list[AnySite] = [Site(base.embed_tokens, "output", ("hook_embed",))]
        for layer, block in enumerate(base.layers):
            attn, prefix = block.self_attn, f"blocks.{layer}."
            qkv = []
            for letter, proj, heads in (
                ("q", attn.q_proj, spec.n_heads),
                ("k", attn.k_proj, spec.n_kv_heads),
                ("v", attn.v_proj, spec.n_kv_heads),
            ):
                split, merge = heads_view(heads)
                qkv.append(Site(proj, "output", (prefix + f"attn.hook_{letter}",), split, merge))
            sites += block_sites(
                layer,
                block,
                attention=attn,
                qkv=qkv,
                out_proj=attn.o_proj,
                n_heads=spec.n_heads,
                mlp_pre=block.mlp.gate_proj,
                mlp_post=Site(block.mlp.down_proj, "input", (prefix + "mlp.hook_post",)),
                mlp_out=block.mlp,
                resid_mid=ResidMidSite(block, attn, prefix + "hook_resid_mid"),
                ln1=self.norm_site(block.input_layernorm, prefix + "ln1"),
                ln2=self.norm_site(block.post_attention_layernorm, prefix + "ln2"),
            )
        sites.append(self.norm_site(base.norm, "ln_final"))
        return sites
