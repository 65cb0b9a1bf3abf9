"""Shared core: model loading, data, evaluation, errors and output conventions."""
