"""The prompt lab: one input, one model, interventions — the library functions and the saved-session table
(analysis.py) and their figures (figures.py), for the dashboard's Prompt lab page and notebooks."""
