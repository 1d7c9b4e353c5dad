"""Attention statistics per layer × head: the table (analysis.py), figures (figures.py), the ``workbench
attention`` command (cli.py). The kernel and the statistics it records stay in ``workbench.attention``."""
