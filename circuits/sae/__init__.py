"""Sparse autoencoders and transcoders: architectures, trainer, evaluations, SAELens interop, feature pages, and
the analysis that trains and evaluates them on any model and dataset (``circuits.sae.analysis``)."""

from workbench.circuits.sae import batchtopk, gated, jumprelu, matryoshka, relu, topk  # noqa: F401  (register them)
from workbench.circuits.sae.base import SAE, SAEConfig, SAEInputError
from workbench.circuits.sae.formats import load_sae
from workbench.circuits.sae.registry import REGISTRY, create_sae

__all__ = ["demo_step", "REGISTRY", "SAE", "SAEConfig", "SAEInputError", "create_sae", "load_sae"]


def demo_step(workspace, progress: bool = True) -> str:
    """Demo: an SAE and transcoders on the zoo's code-tiny over zoo:python-stdlib (``analysis.demo_step``)."""
    from workbench.circuits.sae.analysis import demo_step as run

    return run(workspace, progress=progress)
