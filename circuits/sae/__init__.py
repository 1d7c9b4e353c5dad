"""Sparse autoencoders and transcoders: architectures, trainer, evaluations, SAELens interop, feature pages."""

from circuits.sae import batchtopk, jumprelu, relu, topk  # noqa: F401  (register architectures)
from circuits.sae.base import REGISTRY, SAE, SAEConfig, SAEInputError, create_sae, load_sae

__all__ = ["demo_step", "REGISTRY", "SAE", "SAEConfig", "SAEInputError", "create_sae", "load_sae"]


def demo_step(workspace, progress: bool = True) -> str:
    """Demo: train and evaluate an SAE and a transcoder on the zoo's code-tiny model (see evals.demo_step)."""
    from circuits.sae.evals import demo_step as run

    return run(workspace, progress=progress)
