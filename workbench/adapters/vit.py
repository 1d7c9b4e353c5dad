"""Vision Transformer (transformers ViT) modules -> TransformerLens hook names.

Position 0 is the [CLS] token, then one position per patch; ``hook_embed`` is the patch + position embedding.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from workbench.adapters.base import (
    AnySite,
    Capabilities,
    HFAdapter,
    ResidMidSite,
    Site,
    block_sites,
    heads_view,
)
from workbench.adapters.registry import register


@register
class ViTAdapter(HFAdapter):
    family = "vit"
    base_attr = "vit"
    model_types = ("vit",)

    def spec(self, config: Any):
        n_patches = (config.image_size // config.patch_size) ** 2
        return self.standard_spec(
            config, d_vocab=getattr(config, "num_labels", 0), n_ctx=n_patches + 1, causal=False
        )

    def prepare_inputs(self, owner: Any, inputs: Any) -> dict[str, torch.Tensor]:
        """Pixels [batch, channels, height, width] (or {"pixel_values": ...}) -> the ViT's keyword arguments."""
        pixels = inputs["pixel_values"] if isinstance(inputs, dict) else inputs
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
            raise ValueError("a ViT takes pixel_values as a float tensor [batch, channels, height, width]")
        return {"pixel_values": pixels.to(owner.device)}

    def capabilities(self, owner: Any) -> Capabilities:
        """Pixels in; class logits where the model has a classifier (``ViTForImageClassification``), else the
        hidden state; pooled at CLS, as the classifier reads it."""
        config = owner.model.config
        side = config.image_size // config.patch_size
        classifier = getattr(owner.model, "classifier", None) is not None
        names = tuple(str(config.id2label[i]) for i in range(config.num_labels)) if classifier else ()
        return replace(
            super().capabilities(owner),
            modality="image",
            output="class" if classifier else "hidden",
            pooling="cls",
            image_shape=(config.num_channels, config.image_size, config.image_size),
            patch_grid=(side, side),
            class_names=names,
        )

    def sites(self, model: nn.Module, spec) -> list[AnySite]:
        base = self.base(model)
        sites: list[AnySite] = [Site(base.embeddings, "output", ("hook_embed",))]
        for layer, block in enumerate(base.layers):
            attn, prefix = block.attention, f"blocks.{layer}."
            qkv = []
            for letter in "qkv":
                split, merge = heads_view(spec.n_heads)
                qkv.append(
                    Site(
                        getattr(attn, f"{letter}_proj"),
                        "output",
                        (prefix + f"attn.hook_{letter}",),
                        split,
                        merge,
                    )
                )
            sites += block_sites(
                layer,
                block,
                attention=attn,
                qkv=qkv,
                out_proj=attn.o_proj,
                n_heads=spec.n_heads,
                mlp_pre=block.mlp.fc1,
                mlp_post=Site(block.mlp.activation_fn, "output", (prefix + "mlp.hook_post",)),
                mlp_out=block.mlp,
                resid_mid=ResidMidSite(block, attn, prefix + "hook_resid_mid"),
                ln1=self.norm_site(block.layernorm_before, prefix + "ln1"),
                ln2=self.norm_site(block.layernorm_after, prefix + "ln2"),
            )
        sites.append(self.norm_site(base.layernorm, "ln_final"))
        return sites
