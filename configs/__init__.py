"""Experiment configs (ml_collections), selected with ``--config=configs/NAME.py``."""
