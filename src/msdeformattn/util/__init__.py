"""Utilities below both the models and the training code (boxes)."""
