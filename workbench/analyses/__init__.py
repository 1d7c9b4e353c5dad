"""The analyses that live in the core distribution, one folder each: ``analysis.py`` (``ANALYSIS``, the tables it
writes, the computation), ``figures.py`` (plotly figures built from those tables) and ``cli.py`` (its command,
mounted through the ``workbench.cli`` entry-point group). They import the core, never each other; the app imports
them."""
