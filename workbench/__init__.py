"""Interpretability workbench: hooked models, activation stores and analyses under one naming."""

__version__ = "0.1.0"
