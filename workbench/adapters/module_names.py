"""Hugging Face module names <-> TransformerLens hook names, per family (both directions, one table).

Trainers that hook modules directly (EleutherAI sparsify, delphi) name a site by the module path under the base
model (``layers.6``, ``h.0.mlp``, ``embed_tokens``), sometimes with the base attribute in front
(``gpt_neox.layers.3.mlp``, ``model.layers.6``). An SAE reads a module's output; a transcoder reads its input and
predicts its output. ``hook_for_module`` and ``module_for_hook`` translate between those names and ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ModuleNameError(ValueError):
    """A module name or hook name with no counterpart in the family's table."""


@dataclass(frozen=True)
class FamilyModules:
    """Module paths of one HF family: ``base`` attribute of the LM, block list, and the modules inside a block."""

    base: str
    layers: str
    embed: str
    attention: str
    mlp: str
    final_norm: str


FAMILY_MODULES = {
    "gpt_neox": FamilyModules("gpt_neox", "layers", "embed_in", "attention", "mlp", "final_layer_norm"),
    "gpt2": FamilyModules("transformer", "h", "wte", "attn", "mlp", "ln_f"),
    "llama": FamilyModules("model", "layers", "embed_tokens", "self_attn", "mlp", "norm"),
}
FAMILY_MODULES |= {name: FAMILY_MODULES["llama"] for name in ("mistral", "qwen2")}

# (module kind, side) <-> hook template; {l} is the layer.
_HOOKS = {
    ("block", "output"): "blocks.{l}.hook_resid_post",
    ("block", "input"): "blocks.{l}.hook_resid_pre",
    ("attention", "output"): "blocks.{l}.hook_attn_out",
    ("mlp", "output"): "blocks.{l}.hook_mlp_out",
    ("mlp", "input"): "blocks.{l}.ln2.hook_normalized",
    ("embed", "output"): "hook_embed",
    ("final_norm", "output"): "ln_final.hook_normalized",
}


def _family(family: str) -> FamilyModules:
    if family not in FAMILY_MODULES:
        raise ModuleNameError(
            f"no HF module-name table for family {family!r}; known families: {sorted(FAMILY_MODULES)}"
        )
    return FAMILY_MODULES[family]


def _kind(names: FamilyModules, module: str) -> tuple[str, int | None] | None:
    """(kind, layer) of a module path relative to the base model, or None."""
    if module == names.embed:
        return "embed", None
    if module == names.final_norm:
        return "final_norm", None
    match = re.fullmatch(rf"{re.escape(names.layers)}\.(\d+)(?:\.(\w+))?", module)
    if not match:
        return None
    layer, sub = int(match.group(1)), match.group(2)
    kinds = {None: "block", names.attention: "attention", names.mlp: "mlp"}
    return (kinds[sub], layer) if sub in kinds else None


def hook_for_module(family: str, module: str, side: str = "output") -> str:
    """Our hook name for a module's ``side`` ("output" or "input"), e.g. ("llama", "layers.6.mlp", "input") ->
    "blocks.6.ln2.hook_normalized". A leading base attribute (``model.``, ``gpt_neox.``) is accepted."""
    names = _family(family)
    relative = module.removeprefix(names.base + ".")
    found = _kind(names, relative)
    if found is None or (found[0], side) not in _HOOKS:
        known = ", ".join(
            (
                f"{names.layers}.L",
                f"{names.layers}.L.{names.attention}",
                f"{names.layers}.L.{names.mlp}",
                names.embed,
                names.final_norm,
            )
        )
        raise ModuleNameError(
            f"module {module!r} ({side}) has no hook name in {family}: the mapped modules are {known}"
        )
    kind, layer = found
    return _HOOKS[(kind, side)].format(l=layer)


def module_for_hook(family: str, hook: str) -> tuple[str, str]:
    """(module path relative to the base model, side) whose ``side`` carries ``hook`` in ``family``."""
    names = _family(family)
    layer_match = re.match(r"blocks\.(\d+)\.", hook)
    layer = layer_match.group(1) if layer_match else None
    paths = {
        "block": f"{names.layers}.{layer}",
        "attention": f"{names.layers}.{layer}.{names.attention}",
        "mlp": f"{names.layers}.{layer}.{names.mlp}",
        "embed": names.embed,
        "final_norm": names.final_norm,
    }
    for (kind, side), template in _HOOKS.items():
        if (layer is not None or "{l}" not in template) and template.format(l=layer) == hook:
            return paths[kind], side
    raise ModuleNameError(
        f"hook {hook!r} is not the input or output of an HF module in {family}: sparsify-style layouts name "
        f"only {', '.join(sorted({t.replace('{l}', 'L') for t in _HOOKS.values()}))}"
    )


def families_for_module(module: str) -> list[str]:
    """Families whose table names ``module`` (to infer a layout's family when no model is given)."""
    found = []
    for family, names in FAMILY_MODULES.items():
        if _kind(names, module.removeprefix(names.base + ".")) is not None:
            found.append(family)
    return found
