"""Training dynamics over checkpoints: the tracked metrics, their emergence fits and order (analysis.py), the
curve families and fits (emergence.py), the architecture → curve parameters predictor (predictor.py), the
architecture sweep (sweep.py), figures (figures.py), the ``workbench dynamics run|sweep`` commands (cli.py)."""
