"""Datasets: the registry of specs, download and verification, splits, few-shot sampling, loading."""
