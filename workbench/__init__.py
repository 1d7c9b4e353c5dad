"""Interpretability workbench: hooked models, activation stores and analyses under one naming."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API: ``from workbench import HookedModel, load_series``."""
    if name in ("HookedModel", "ModelSpec"):
        from workbench import model

        return getattr(model, name)
    if name in ("CheckpointSeries", "load_series"):
        from workbench import checkpoints

        return getattr(checkpoints, name)
    if name in ("ActivationStore", "capture_to_store"):
        from workbench import store

        return getattr(store, name)
    if name in ("ResultsDB", "Workspace"):
        from workbench import results, workspace

        return getattr(results if name == "ResultsDB" else workspace, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
