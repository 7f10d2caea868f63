"""Fitting: factor sets, the study's forms, the optimiser, ``fit`` and JSON."""
