"""GPT-NeoX (Pythia) modules -> TransformerLens hook names."""

from __future__ import annotations

from typing import Any

from torch import nn

from workbench.adapters.base import AnySite, HFAdapter, ResidMidSite, Site, block_sites, interleaved_qkv
from workbench.adapters.registry import register


@register
class GPTNeoXAdapter(HFAdapter):
    family = "gpt_neox"
    base_attr = "gpt_neox"
    model_types = ("gpt_neox",)
    positional = "rotary"
    module_names = "gpt_neox"

    def spec(self, config: Any):
        return self.standard_spec(config, parallel_residual=bool(config.use_parallel_residual))

    def sites(self, model: nn.Module, spec) -> list[AnySite]:
        base = self.base(model)
        sites: list[AnySite] = [Site(base.embed_in, "output", ("hook_embed",))]
        split, merge = interleaved_qkv(spec.n_heads, spec.d_head)
        for layer, block in enumerate(base.layers):
            attn, prefix = block.attention, f"blocks.{layer}."
            qkv = Site(
                attn.query_key_value, "output", tuple(prefix + f"attn.hook_{x}" for x in "qkv"), split, merge
            )
            mid = None if spec.parallel_residual else ResidMidSite(block, attn, prefix + "hook_resid_mid")
            sites += block_sites(
                layer,
                block,
                attention=attn,
                qkv=[qkv],
                out_proj=attn.dense,
                n_heads=spec.n_heads,
                mlp_pre=block.mlp.dense_h_to_4h,
                mlp_post=Site(block.mlp.act, "output", (prefix + "mlp.hook_post",)),
                mlp_out=block.mlp,
                resid_mid=mid,
                ln1=self.norm_site(block.input_layernorm, prefix + "ln1"),
                ln2=self.norm_site(block.post_attention_layernorm, prefix + "ln2"),
            )
        sites.append(self.norm_site(base.final_layer_norm, "ln_final"))
        return sites
