"""GPT-2 modules -> TransformerLens hook names."""

from __future__ import annotations

from typing import Any

from torch import nn

from workbench.adapters.base import AnySite, HFAdapter, ResidMidSite, Site, block_sites, concat_qkv
from workbench.adapters.registry import register


@register
class GPT2Adapter(HFAdapter):
    family = "gpt2"
    base_attr = "transformer"
    model_types = ("gpt2",)
    module_names = "gpt2"

    def spec(self, config: Any):
        return self.standard_spec(config, d_mlp=config.n_inner or 4 * config.n_embd)

    def sites(self, model: nn.Module, spec) -> list[AnySite]:
        base = self.base(model)
        sites: list[AnySite] = [
            Site(base.wte, "output", ("hook_embed",)),
            Site(base.wpe, "output", ("hook_pos_embed",)),
        ]
        split, merge = concat_qkv(spec.n_heads, spec.n_heads, spec.d_head)
        for layer, block in enumerate(base.h):
            attn, prefix = block.attn, f"blocks.{layer}."
            qkv = Site(attn.c_attn, "output", tuple(prefix + f"attn.hook_{x}" for x in "qkv"), split, merge)
            sites += block_sites(
                layer,
                block,
                attention=attn,
                qkv=[qkv],
                out_proj=attn.c_proj,
                n_heads=spec.n_heads,
                mlp_pre=block.mlp.c_fc,
                mlp_post=Site(block.mlp.act, "output", (prefix + "mlp.hook_post",)),
                mlp_out=block.mlp,
                resid_mid=ResidMidSite(block, attn, prefix + "hook_resid_mid"),
                ln1=self.norm_site(block.ln_1, prefix + "ln1"),
                ln2=self.norm_site(block.ln_2, prefix + "ln2"),
            )
        sites.append(self.norm_site(base.ln_f, "ln_final"))
        return sites
