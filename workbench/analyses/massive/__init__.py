"""Massive activations: detection and tracking over checkpoints (analysis.py), figures (figures.py), the
``workbench massive`` command (cli.py)."""
