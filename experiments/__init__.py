"""Experiment scripts (train.py, eval.py) and their configs (configs/*.py)."""
