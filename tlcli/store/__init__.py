"""Persistence only: the feature store, run folders, locks and atomic writes."""
