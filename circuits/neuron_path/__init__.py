"""Neuron-path attribution (joint integrated gradients over MLP neurons) on any causal LM or ViT classifier:
``analysis.py`` (``ANALYSIS``, ``run``, the path search and its baselines) and ``cli.py`` (``workbench neuron-path
run``). The package imports nothing at start-up, so mounting its command stays cheap."""
