"""Interpretability workbench: hooked models, activation stores and analyses under one naming."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API: ``from workbench import HookedModel, load_model, load_series, load_dataset``."""
    if name in ("HookedModel", "ModelSpec"):
        from workbench import model  # deferred: lazy API, `import workbench` stays light

        return getattr(model, name)
    if name == "CheckpointSeries":
        from workbench import checkpoints  # deferred: lazy API, `import workbench` stays light

        return checkpoints.CheckpointSeries
    if name in ("load_model", "load_series", "resolve_model", "resolve_series"):
        from workbench import references  # deferred: lazy API, `import workbench` stays light

        return references.resolve_series if name.endswith("series") else references.resolve_model
    if name in ("load_dataset", "DatasetRef"):
        from workbench import datasets  # deferred: lazy API, `import workbench` stays light

        return getattr(datasets, name)
    if name == "ActivationStore":
        from workbench import store  # deferred: lazy API, `import workbench` stays light

        return store.ActivationStore
    if name == "capture_to_store":
        from workbench import capture  # deferred: lazy API, `import workbench` stays light

        return capture.capture_to_store
    if name in ("ResultsDB", "Workspace"):
        from workbench import results, workspace  # deferred: lazy API, `import workbench` stays light

        return getattr(results if name == "ResultsDB" else workspace, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
