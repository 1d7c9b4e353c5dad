"""BERT-family encoders (BERT, MiniLM) -> TransformerLens hook names.

Post-LayerNorm blocks: ``hook_resid_mid`` is the attention sub-block's output after its LayerNorm,
``hook_resid_post`` the block output (what ``output_hidden_states`` returns); ``hook_embed`` is the embedding
output after its LayerNorm. ``ln1`` is the attention sub-block's LayerNorm (its output is ``hook_resid_mid``),
``ln2`` the block's output LayerNorm (its output is ``hook_resid_post``), as TransformerLens's BERT names them.
There is no final LayerNorm; a masked-LM head's LayerNorm is ``mlm_head.ln`` (TransformerLens's BERT name), its
activation's input ``mlm_head.hook_pre`` (the head's dense output) and output ``mlm_head.hook_post`` (the LayerNorm's
input).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from workbench.adapters.base import AnySite, HFAdapter, Site, block_sites, heads_view
from workbench.adapters.registry import register


@register
class BertAdapter(HFAdapter):
    family = "bert"
    base_attr = "bert"
    model_types = ("bert",)
    head_activation = "mlm_head"

    def spec(self, config: Any):
        return self.standard_spec(config, causal=False)

    def sites(self, model: nn.Module, spec) -> list[AnySite]:
        base = self.base(model)
        sites: list[AnySite] = [Site(base.embeddings, "output", ("hook_embed",))]
        split, merge = heads_view(spec.n_heads)
        for layer, block in enumerate(base.encoder.layer):
            self_attn, prefix = block.attention.self, f"blocks.{layer}."
            qkv = [
                Site(getattr(self_attn, proj), "output", (prefix + f"attn.hook_{letter}",), split, merge)
                for letter, proj in (("q", "query"), ("k", "key"), ("v", "value"))
            ]
            sites += block_sites(
                layer,
                block,
                attention=self_attn,
                qkv=qkv,
                out_proj=block.attention.output.dense,
                n_heads=spec.n_heads,
                mlp_pre=block.intermediate.dense,
                mlp_post=Site(block.intermediate, "output", (prefix + "mlp.hook_post",)),
                mlp_out=block.output.dense,
                resid_mid=Site(block.attention, "output", (prefix + "hook_resid_mid",)),
                attn_out=block.attention.output.dense,
                ln1=self.norm_site(block.attention.output.LayerNorm, prefix + "ln1"),
                ln2=self.norm_site(block.output.LayerNorm, prefix + "ln2"),
                post_ln=True,
            )
        transform = getattr(getattr(getattr(model, "cls", None), "predictions", None), "transform", None)
        if transform is not None:  # a masked-LM head: dense, activation, LayerNorm, then the decoder
            sites += [
                Site(transform.dense, "output", ("mlm_head.hook_pre",)),
                Site(transform.LayerNorm, "input", ("mlm_head.hook_post",)),
                self.norm_site(transform.LayerNorm, "mlm_head.ln"),
            ]
        return sites
